"""The toy benchmark of the method, in parts that each finish in well under 90 minutes on 2 cores and
reuse finished runs (every run is `padistill distill`: finished DAG steps are skipped):

    python benchmarks/distill.py --part comparison   # adversarial (toy_digits) vs MSE-only
                                                     # (toy_digits_mse), 3 training seeds each
                                                     # (--arms adversarial --seeds 1: one arm and
                                                     # seed, 10-15 min; the MSE arm 5 min)
    python benchmarks/distill.py --part ablations    # the paper's open questions, seed 0, same budget
    python benchmarks/distill.py --part report       # tables and targets from whatever has finished
    python benchmarks/distill.py --benchmark digits_balanced --arms adversarial --seeds 0   # the digits
                                                     # with a balanced game at 4 and 2 steps (10x MSE, a
                                                     # LoRA through the conditional phase; held rows
                                                     # every 10 updates)
    python benchmarks/distill.py --benchmark fashion --arms adversarial --seeds 0   # the sharp benchmark:
                                                     # the demo's configs (toy_fashion, toy_fashion_mse)
                                                     # at 500 samples (its ablations: --benchmark
                                                     # fashion --part ablations; its recipe mixes in
                                                     # the MSE, so its MSE ablation takes it out)
    python benchmarks/distill.py --benchmark fashion_long --arms adversarial --seeds 0   # the same with
                                                     # 4x longer adversarial stages after 200 D-only
                                                     # warm-up updates, disc_lr 1e-4 (MSE-only: 240
                                                     # updates a stage)

Fair by construction: both arms train every stage for the same number of student updates (each
benchmark's configs set them; `check_fair` refuses arms that differ; a D-only warm-up comes on top) on the same trajectories' data, learning rates from
the same sweep (`benchmarks/discriminator.py` games, recorded in the configs), 3 training seeds
(`train.seed`) each; mean and spread (min-max) are reported, and a difference inside the spread is
called that. Run roots: `<root>/<config>-s<seed>` and `<root>/ablation-<name>` (root: runs/bench,
runs/bench_fashion, runs/bench_fashion_long); the seed-
and arm-independent steps (encode, the first stage's trajectories, the base teacher's evaluation
samples) are copied from the first finished run instead of being recomputed; the MSE-only arm's first
stage (the same MSE stage) from the adversarial arm's run of the same seed, and an ablation's stages
before the first one it changes from the seed-0 recipe run, so the compared stages start from the same
students (the manifests' input hashes decide: anything that differs is recomputed).

Targets (DESIGN "The toy benchmarks"): every adversarial student's FD below the guided teacher's at its
step count, with accuracy >= teacher - 0.01 (500 samples resolve accuracy to about +-1 point); the
4-step FD <= 1.25x and the 1-step FD <= 2x the 32-step teacher's; adversarial vs MSE-only at 1 and 2
steps; every adversarial stage moves its student's FD by more than the seed spread, toward better, and
trains in its conditional phase (issue 13): its held MSE to the teacher falls on every seed while D's held
paired accuracy stays >= 0.6 in the timestep strata D separated when the student's updates began (the report's
table "The games", from each stage's train/history.json).

Writes benchmarks/results/distill.{json,md} (digits), distill_balanced.{json,md} (digits_balanced),
distill_fashion.{json,md} (fashion) or distill_fashion_long_comparison.{json,md} (fashion_long).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.cluster import quiet_driver  # noqa: E402

quiet_driver()  # before Ray is imported: Ray's known-harmless lines off the console

from benchmarks.results_io import int_list, write_report  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# The benchmarks: the two arms' configs, overrides for every run of the benchmark, default root and output.
# Fashion-MNIST (the sharp benchmark) runs the demo's configs with the benchmark's 500 samples a model.
BENCHMARKS = {
    "digits": {"arms": {"adversarial": "toy_digits", "mse": "toy_digits_mse"}, "set": [],
               "root": "runs/bench", "out": "distill"},
    "fashion": {"arms": {"adversarial": "toy_fashion", "mse": "toy_fashion_mse"},
                "set": ["evaluate.samples_per_prompt=50"], "root": "runs/bench_fashion", "out": "distill_fashion"},
    # the same configs with stages too long for the demo's 20 minutes and the discriminator's lr that
    # keeps it confident (benchmarks/results/discriminator_fashion_confidence*.md): each adversarial stage
    # 200 D-only warm-up updates + 160 conditional + 80 unconditional student updates, MSE-only 240; 10x the
    # MSE in every adversarial stage, and the first stage from the 32-step teacher at guidance 2 for 240 updates,
    # as when its report was made (toy_fashion ships 0 at 4 and 2 steps, and the first stage at guidance 3, since)
    "fashion_long": {"arms": {"adversarial": "toy_fashion", "mse": "toy_fashion_mse"},
                     "set": ["evaluate.samples_per_prompt=50", "model.teacher_steps=32", "stages.0.teacher_steps=32",
                             "stages.0.guidance_scale=2.0", "stages.0.mse_steps=240"],
                     "root": "runs/bench_fashion_long",
                     "out": "distill_fashion_long_comparison", "data": "fashion",
                     "arm_set": {"adversarial": [*(f"stages.{k}.{key}={v}" for k in (1, 2, 3) for key, v in (
                         ("disc_warmup_steps", 200), ("conditional_steps", 160), ("unconditional_steps", 80),
                         ("disc_lr", 1e-4), ("mse_weight", 10.0))), "stages.2.renoise_stable_step=320",
                         "stages.3.renoise_stable_step=360"],
                                 "mse": [f"stages.{k}.mse_steps=240" for k in (1, 2, 3)]}},
    # the digits with a balanced game (issue 13, docs/method.md "A balanced game"): in the 4- and 2-step stages 10x the
    # MSE and a rank-8 LoRA through D's warm-up and the conditional phase, merged, then the full UNet at half the lr
    # for the unconditional phase; the 1-step stage (10x MSE already) at student lr 2e-6, which keeps D informative
    # and costs FD there; held rows scored every 10 updates (both arms: they share the first stage)
    "digits_balanced": {"arms": {"adversarial": "toy_digits", "mse": "toy_digits_mse"}, "set": ["train.held_every=10"],
                        "root": "runs/bench_balanced", "out": "distill_balanced", "data": "digits",
                        "arm_set": {"adversarial": [*(f"stages.{k}.{key}={v}" for k in (1, 2) for key, v in (
                            ("mse_weight", 10.0), ("lora.rank", 8), ("lora.steps", 140), ("full_steps", 20),
                            ("full_lr", 5e-6))), "stages.3.lr=2e-6"]}},
}


def arm_overrides(bench: str, arm: str, cli: list[str] | tuple = ()) -> list[str]:
    """The overrides of one arm's runs: the benchmark's, then its per-arm ones, then the command line's
    `--set` (last, so they win)."""
    b = BENCHMARKS[bench]
    return [*b["set"], *b.get("arm_set", {}).get(arm, []), *cli]


def data_of(bench: str) -> str:
    """The benchmark's data (its metrics' noise and the report's header): digits or fashion."""
    return BENCHMARKS[bench].get("data", bench)


ARMS = BENCHMARKS["digits"]["arms"]  # the digits' arms: what `ablations` and `ablation_table` default to
DEFAULT_SEEDS = (0, 1, 2)


def ablations(config: str = ARMS["adversarial"], extra: list[str] | tuple = ()) -> dict[str, list[str]]:
    """Each ablation: config overrides on the adversarial arm (`config` with the benchmark's `extra`
    overrides), derived from its adversarial stages (same stages, same student updates). The MSE term's
    ablation depends on the recipe: where it is adversarial alone, the MSE added (at every adversarial
    stage, or at the 1-step one); where it mixes in the MSE (the toy configs' `mse_weight` at 1 step), the
    MSE taken out, and, where only some stages mix it in, the same weight in every stage."""
    from pipeline.config import load_config

    stages = [(i, st) for i, st in enumerate(load_config(config, list(extra)).stages) if st.loss == "adversarial"]

    def each(key_value: str, only=lambda st: True) -> list[str]:
        return [f"stages.{i}.{key_value}" for i, st in stages if only(st)]

    mixed = max((st.mse_weight for _, st in stages), default=0.0)  # the recipe's MSE weight, where it has one

    return {
        "conditional only": [o for i, st in stages for o in (
            f"stages.{i}.conditional_steps={st.conditional_steps + st.unconditional_steps}",
            f"stages.{i}.unconditional_steps=0")],
        "no re-noising (1, 2 steps)": each("renoise=false", lambda st: st.uses_renoise),
        "D backbone frozen": each("disc_backbone=frozen"),
        "D plain CNN": each("disc_backbone=cnn"),
        **({"adversarial alone (no MSE term)": each("mse_weight=0.0")} if mixed else
           {"MSE + adversarial": each("mse_weight=1.0"),
            "MSE + adversarial at 1 step": each("mse_weight=1.0", lambda st: st.student_steps == 1)}),
        # where the recipe mixes the MSE into some stages only (the paper's loss alone in the others), the
        # same weight in every stage: the stages that had none become the recipe's earlier MSE-mixed ones
        **({f"MSE term at every stage ({mixed:g}x)": each(f"mse_weight={mixed:g}", lambda st: not st.mse_weight)}
           if mixed and not all(st.mse_weight for _, st in stages) else {}),
        # LoRA through both objectives, merged, then the full UNet at half the lr (the paper's 4000 + 1000 of
        # 5000 steps, 1e-6 -> 5e-7); the 4- and 2-step stages (the 1-step stage's x0 conversion trains conv_out).
        # lora.steps counts the stage's steps from 0, so a D-only warm-up comes on top of its 4/5
        "LoRA then full (4, 2 steps)": [o for i, st in stages if st.prediction_type != "sample" for o in (
            f"stages.{i}.lora.rank=8", f"stages.{i}.lora.steps={st.disc_warmup_steps + student_updates(st) * 4 // 5}",
            f"stages.{i}.full_steps={student_updates(st) - student_updates(st) * 4 // 5}",
            f"stages.{i}.full_lr={st.lr / 2:g}")],
    }


def student_updates(stage) -> int:
    """A stage's student updates: every phase but the discriminator's warm-up (D only)."""
    from pipeline.phases import plan_phases

    return sum(p.end - p.start for p in plan_phases(stage) if p.name != "disc_warmup")


def check_fair(adv, mse) -> None:
    """The arms (run configs) must differ in their loss only: the same chain (teachers, student starts,
    timesteps, prediction types) and the same student updates per stage. Raises on a config edit that
    breaks it."""
    from pipeline.config import ConfigError

    if len(adv.stages) != len(mse.stages):
        raise ConfigError(f"{adv.name} and {mse.name}: different numbers of stages")
    for k, (a, m) in enumerate(zip(adv.stages, mse.stages), start=1):
        same = {"steps": (a.teacher_steps, a.student_steps) == (m.teacher_steps, m.student_steps),
                "teacher": adv.teacher_of(k) == mse.teacher_of(k),
                "student start": adv.student_init_of(k) == mse.student_init_of(k),
                "timesteps": a.multi_timestep == m.multi_timestep,
                "prediction type": a.prediction_type == m.prediction_type,
                "student updates": student_updates(a) == student_updates(m)}
        broken = [name for name, ok in same.items() if not ok]
        if broken:
            raise ConfigError(f"stage {k}: the comparison's arms differ in {', '.join(broken)} "
                              f"({student_updates(a)} vs {student_updates(m)} student updates)")


SHARED = ("encoded", "stages/1-8step/traj", "eval/teacher")
SHARED_MANIFESTS = ("encode", "trajectories-1-8step")


def slug(name: str) -> str:
    return "-".join(filter(None, "".join(c if c.isalnum() else " " for c in name.lower()).split()))


def share_prefix(donor: Path, root: Path) -> None:
    """Copy the seed- and arm-independent outputs of a finished run into a new run root."""
    if not donor.exists() or donor.resolve() == root.resolve():
        return
    for rel in SHARED:
        if (donor / rel).exists() and not (root / rel).exists():
            shutil.copytree(donor / rel, root / rel)
    for m in SHARED_MANIFESTS:
        src, dst = donor / "_manifest" / f"{m}.json", root / "_manifest" / f"{m}.json"
        if src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def shared_stages(a, b) -> int:
    """How many leading stages two run configs compute identically (the same stage configs, and every
    section a stage reads); 0 when a global section differs."""
    keep = ("model", "data", "encode", "trajectories", "train", "evaluate")
    if not all(getattr(a, k) == getattr(b, k) for k in keep):
        return 0
    n = 0
    for sa, sb in zip(a.stages, b.stages):
        if sa != sb:
            break
        n += 1
    return n


def share_stages(donor: Path, root: Path, cfg, n: int) -> int:
    """Copy the first `n` stages (students, checkpoints, evaluations) of a finished run whose first `n`
    stages are the same computation (`shared_stages`), with their trajectories: the comparison's MSE-only
    arm takes its seed's first stage (the same MSE stage) from the adversarial run, and an ablation the
    recipe run's stages before the first one it changes, so the compared stages start from the same
    student (a paired comparison, and 15-60 minutes less per run). Trajectory manifests name an earlier
    stage's teacher relative to the run root, so a copied stage stays finished; the manifests' input
    hashes still decide: anything that differs is recomputed. Returns the number of stages copied."""
    def key(k: int) -> str:
        return cfg.stage_dir(k).split("/", 1)[1]

    def copy(rel: str) -> None:
        if (donor / rel).exists() and not (root / rel).exists():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (donor / rel).is_dir() else shutil.copy2)(donor / rel, root / rel)

    done = 0
    for k in range(1, n + 1):
        if not (donor / "_manifest" / f"eval-{key(k)}.json").exists():
            break
        for p in (donor / cfg.stage_dir(k)).iterdir():
            copy(f"{cfg.stage_dir(k)}/{p.name}")
        for m in (f"trajectories-{key(k)}", f"train-{key(k)}", f"eval-{key(k)}"):
            copy(f"_manifest/{m}.json")
        done = k
    return done


def run(config: str, root: str, overrides: list[str], donor: str | None,
        stages_from: tuple[str, int] | None = None) -> dict:
    from pipeline.config import load_config
    from pipeline.dag import run_dag
    from pipeline.report import collect
    from pipeline.storage import RunStorage

    cfg = load_config(config, [f"run_root={root}", *overrides])
    if donor:
        share_prefix(Path(donor), Path(root))
    if stages_from and stages_from[1] and (n := share_stages(Path(stages_from[0]), Path(root), cfg, stages_from[1])):
        print(f"stages 1-{n} shared from {stages_from[0]} (the same computation)", flush=True)
    t0 = time.time()
    print(f"\n=== {config} {' '.join(overrides)} -> {root}", flush=True)
    run_dag(cfg)
    storage = RunStorage.from_config(cfg)
    return {"config": config, "overrides": overrides, "run_root": root,
            "wall_s_this_invocation": time.time() - t0, "evals": collect(cfg, storage), "games": games(cfg, storage)}


def finished(config: str, root: str, overrides: list[str]) -> dict | None:
    """A run root's results, read without running anything, when every step of it finished with today's
    settings (`config` and `overrides`, by the steps' manifests as `distill` judges them); None when it did
    not run; None too, said on the console, when it is unfinished or ran with other settings (a config
    changed since: its figures are not this benchmark's)."""
    from pipeline.config import load_config
    from pipeline import encode
    from pipeline.dag import build_steps, finished_manifests
    from pipeline.report import collect
    from pipeline.storage import RunStorage

    cfg = load_config(config, [f"run_root={root}", *overrides])
    storage = RunStorage.from_config(cfg)
    if storage.read_manifest(encode.STEP) is None:
        return None
    stale = [name for name, m in finished_manifests(cfg, build_steps(cfg)).items() if m is None]
    if stale:
        print(f"{root}: not reported: {', '.join(stale)} not finished with these settings ({config} "
              f"{' '.join(overrides)}): unfinished, or run with other settings; run it to report it", flush=True)
        return None
    evals = collect(cfg, storage)
    return {"config": config, "overrides": overrides, "run_root": root, "evals": evals,
            "games": games(cfg, storage)} if len(evals) == len(cfg.stages) else None


# D's held paired accuracy the "well above 0.5" is read as (issue 13: every adversarial stage trains)
INFORMATIVE_D = 0.6
STRATUM = "held_d_pacc_t"  # a held record's paired accuracy in one timestep stratum (StageLoop.evaluate)


def games(cfg, storage) -> list[dict]:
    """Each stage's game, from its training history on the held rows (`train/history.json`): the student's MSE
    to its teacher when its updates start (after the x0 conversion and D's warm-up, which leave it as it is
    or change its output's kind), at the end of the conditional phase and at the end; for an adversarial
    stage also D's paired accuracy P(D(real) > D(fake)) then, its lowest through the conditional phase, and
    at the end, and the timestep strata D separated after its D-only warm-up (`strata_resolved`; None without
    one) with D's lowest accuracy averaged over them through the conditional phase (`pacc_cond_min_resolved`)."""
    from pipeline.phases import main_phase, plan_phases

    out = []
    for k, st in enumerate(cfg.stages, start=1):
        rel = f"{cfg.stage_dir(k)}/train/history.json"
        hist = storage.read_json(rel) if storage.exists(rel) else []
        held = [h for h in hist if "held_mse" in h]
        if not held:  # not trained here, or too few rows to hold any out
            continue
        adversarial = st.loss == "adversarial"
        # the game's first phase, from the trainer's own plan: an adversarial stage's first with D and the student
        # (after any x0 conversion, MSE warm-up or D-only warm-up), an MSE stage's MSE phase; a history record's
        # step counts the updates done, and every phase end is evaluated on the held rows
        game = main_phase(st, plan_phases(st))
        before = [h for h in held if h["step"] <= game.start]
        first = before[-1] if before else {key[6:]: v for key, v in hist[0].items() if key.startswith("start_held_")}
        cond = [h for h in held if game.start < h["step"] <= game.end]
        g = {"stage": k, "steps": st.student_steps, "loss": st.loss, "mse_start": first.get("held_mse"),
             "mse_cond_end": cond[-1]["held_mse"] if cond else None, "mse_end": held[-1]["held_mse"]}
        if adversarial:
            paccs = [h["held_d_pacc"] for h in cond if "held_d_pacc" in h]
            g.update(pacc_start=first.get("held_d_pacc"), pacc_end=held[-1].get("held_d_pacc"),
                     pacc_cond_min=min(paccs, default=None))
            # the timestep strata D separates after its D-only warm-up, when the student's updates start: there the
            # game can stay balanced (where D never separated the student from its teacher, the student's first
            # updates against D invert it). Without a warm-up D has not trained then: no strata (None), and the
            # game is judged over all of them. A check missing a stratum's score counts as 0 there.
            if st.disc_warmup_steps:
                strata = [k for k in first if k.startswith(STRATUM)]  # the trainer's held_d_pacc_t<t> scores
                resolved = [k for k in strata if first[k] >= INFORMATIVE_D]
                g.update(strata_resolved=[int(k[len(STRATUM):]) for k in resolved], strata_total=len(strata),
                         pacc_cond_min_resolved=min((sum(h.get(k, 0.0) for k in resolved) / len(resolved)
                                                     for h in cond), default=None) if resolved else None)
            else:
                g.update(strata_resolved=None, strata_total=None, pacc_cond_min_resolved=None)
        out.append(g)
    return out


# ---- statistics -----------------------------------------------------------------------------------------
def stat(values: list[float]) -> dict:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "n": len(v),
            "values": [float(x) for x in v]}


def fmt(s: dict, d: int = 3) -> str:
    if s["n"] == 1:
        return f"{s['mean']:.{d}f}"
    return f"{s['mean']:.{d}f} [{s['min']:.{d}f}, {s['max']:.{d}f}]"


def seed_of(run: dict) -> int:
    """The training seed a comparison run was made with (its `train.seed=` override)."""
    return next(int(o.split("=", 1)[1]) for o in run["overrides"] if o.startswith("train.seed="))


def per_steps(runs: list[dict], model: str, key: str) -> dict[int, dict]:
    """steps -> stat of metric `key` of `model` (student, student_start, teacher_same_steps) over runs."""
    out: dict[int, list[float]] = {}
    for r in runs:
        for e in r["evals"]:
            if model in e:
                out.setdefault(e["student_steps"], []).append(e[model][key])
    return {n: stat(v) for n, v in sorted(out.items(), reverse=True)}


# the FD's spread between evaluation seeds at 500 samples, per benchmark (README; Fashion-MNIST:
# benchmarks/results/fashion_metric_noise.md): the least a difference must exceed to mean anything, also
# where one training seed gives no seed spread; and on Fashion-MNIST FD-patch's and sharpness's
FD_NOISE = {"digits": 0.1, "fashion": 0.8}
FD_PATCH_NOISE, SHARPNESS_NOISE = 1.9, 0.03


def beyond_noise(a: dict, b: dict, seed_spread: float = 0.0, noise: float = FD_NOISE["digits"]) -> tuple[bool, str]:
    """Whether two FD stats differ beyond the seed spread (ranges that do not overlap, 2+ seeds each) and
    beyond the evaluation `noise`; with one seed on a side, beyond `seed_spread` (the spread the arms showed
    over the seeds either has finished) and `noise`. The note says which yardstick applied."""
    gap = abs(a["mean"] - b["mean"])
    if min(a["n"], b["n"]) < 2:
        if seed_spread > noise:
            return gap > seed_spread, f"1 seed: against the {seed_spread:.2f} spread over training seeds"
        return gap > noise, f"1 seed: against the evaluation noise {noise:g} only"
    apart = (a["max"] < b["min"] or b["max"] < a["min"]) and gap > noise
    return apart, "beyond the seed spread" if apart else "inside the seed spread"


def targets(adv: list[dict], mse: list[dict], bench: str = "digits") -> list[dict]:
    """The DESIGN targets from the finished runs of both arms; the sharp benchmark adds the paper's central
    claim (issue 14): at 1 and 2 steps the adversarial students' FD-patch >= 20% below MSE-only's, their
    sharpness within 15% of the real photos' while MSE-only's is lower."""
    out = []
    noise = FD_NOISE[data_of(bench)]

    def add(name, value, limit, ok, note=""):
        out.append({"target": name, "value": value, "limit": limit, "met": bool(ok), "note": note})

    if not adv:
        return out
    fd, acc = per_steps(adv, "student", "fd"), per_steps(adv, "student", "prompt_accuracy")
    tfd, tacc = per_steps(adv, "teacher_same_steps", "fd"), per_steps(adv, "teacher_same_steps", "prompt_accuracy")
    t32 = adv[0]["evals"][0]["teacher_32"]["fd"]
    for n in fd:
        add(f"{n}-step FD < teacher's at {n} steps (mean)", fd[n]["mean"], tfd[n]["mean"], fd[n]["mean"] < tfd[n]["mean"])
        add(f"{n}-step accuracy >= teacher's - 0.01 (mean)", acc[n]["mean"], tacc[n]["mean"] - 0.01,
            acc[n]["mean"] >= tacc[n]["mean"] - 0.01)
    if 4 in fd:
        add("4-step FD <= 1.25x teacher-32 (mean)", fd[4]["mean"], 1.25 * t32, fd[4]["mean"] <= 1.25 * t32)
    if 1 in fd:
        add("1-step FD <= 2x teacher-32 (mean)", fd[1]["mean"], 2 * t32, fd[1]["mean"] <= 2 * t32)
    # the arms compared on the training seeds both have finished (the same seeds in each, never a mean
    # of two seeds against one)
    common = sorted({seed_of(r) for r in adv} & {seed_of(r) for r in mse})
    pfd = per_steps([r for r in adv if seed_of(r) in common], "student", "fd")
    mfd = per_steps([r for r in mse if seed_of(r) in common], "student", "fd")
    for n in (2, 1):
        if n in pfd and n in mfd:
            better = pfd[n]["mean"] < mfd[n]["mean"]
            all_mse = per_steps(mse, "student", "fd")
            spread = max(fd[n]["max"] - fd[n]["min"], all_mse[n]["max"] - all_mse[n]["min"])
            apart, how = beyond_noise(pfd[n], mfd[n], spread, noise)
            add(f"adversarial {n}-step FD < MSE-only's (mean over the seeds both arms finished)", pfd[n]["mean"],
                mfd[n]["mean"], better and apart, ("a difference" if apart else "no difference")
                + f" ({how}; seeds {', '.join(map(str, common))})")
    start = per_steps(adv, "student_start", "fd")
    for n in fd:
        if n in start and n < 8:  # the adversarial stages
            moved = start[n]["mean"] - fd[n]["mean"]
            spread = max(fd[n]["max"] - fd[n]["min"], start[n]["max"] - start[n]["min"], noise)
            add(f"{n}-step stage moves FD toward better by more than the seed spread (at least {noise:g})",
                moved, spread, moved > spread, f"start {fmt(start[n])} -> {fmt(fd[n])}, {fd[n]['n']} seed(s)")
    out += stages_train(adv)
    if data_of(bench) == "fashion" and common:
        out += central_claim([r for r in adv if seed_of(r) in common], [r for r in mse if seed_of(r) in common],
                             common)
    return out


def per_stage_games(runs: list[dict]) -> dict[int, list[dict]]:
    """steps -> the runs' games of that stage (runs from before games were collected have none)."""
    out: dict[int, list[dict]] = {}
    for r in runs:
        for g in r.get("games", []):
            out.setdefault(g["steps"], []).append(g)
    return dict(sorted(out.items(), reverse=True))


def stages_train(adv: list[dict]) -> list[dict]:
    """Issue 13's 'every adversarial stage measurably trains', from the games: in the conditional phase the
    student's held MSE to its teacher falls on every seed, while D's held paired accuracy stays at or above
    INFORMATIVE_D throughout it on every seed, in the timestep strata D separated (at INFORMATIVE_D or more)
    after its D-only warm-up: a stratum D never separated has no balance to keep (the probe's "every stratum it
    can resolve"); a game without a D warm-up is judged over all strata. The note gives the all-strata lowest
    too. (The FD half is the target above.)"""
    out = []
    for n, gs in per_stage_games(adv).items():
        gs = [g for g in gs if g["loss"] == "adversarial" and None not in (g["mse_start"], g["mse_cond_end"],
                                                                          g["pacc_cond_min"])]
        if not gs:
            continue
        falls = [g["mse_cond_end"] - g["mse_start"] for g in gs]
        low_all = min(g["pacc_cond_min"] for g in gs)
        # per game: the strata-judged lowest after a D warm-up (None: no stratum separated), else the all-strata one
        judged = [g.get("pacc_cond_min_resolved") if g.get("strata_resolved") is not None else g["pacc_cond_min"]
                  for g in gs]
        low = min(judged) if None not in judged else None
        by_strata = [g for g in gs if g.get("strata_resolved") is not None]
        how = ("value: D's lowest in the strata it separated after its warm-up ("
               + ", ".join(f"{len(g['strata_resolved'])} of {g['strata_total']}" for g in by_strata) + " per seed)"
               if by_strata else "value: D's lowest over all strata (no D warm-up to pick strata by)")
        if low is None:
            how = "not met: D separated no stratum after its warm-up on some seed; value: the all-strata lowest"
        out.append({"target": f"{n}-step stage trains: held MSE falls in the conditional phase (every seed) while D's "
                              f"held paired accuracy stays >= {INFORMATIVE_D:g} in the strata it separates",
                    "value": low if low is not None else low_all, "limit": INFORMATIVE_D,
                    "met": bool(max(falls) < 0 and low is not None and low >= INFORMATIVE_D),
                    "note": f"{how}; over all strata {low_all:.2f}; held MSE "
                            + ", ".join(f"{g['mse_start']:.4f} -> {g['mse_cond_end']:.4f}" for g in gs)
                            + f" ({len(gs)} seed(s))"})
    return out


def game_table(arms: dict[str, list[dict]]) -> str:
    """The games on the held rows, per arm and stage, mean [min, max] over seeds: the student's MSE to its
    teacher when its updates start, at the end of the conditional (or MSE) phase and at the end; D's paired
    accuracy when the student starts, its lowest through the conditional phase (over all timestep strata, and over
    the strata it separated when the student started), and at the end."""
    cols = (("mse_start", "held MSE at start"), ("mse_cond_end", "after the conditional phase (MSE stages: the stage)"),
            ("mse_end", "at end"),
            ("pacc_start", "D paired acc. at start"), ("pacc_cond_min", "lowest in the conditional phase"),
            ("pacc_cond_min_resolved", "lowest there, in the strata D separated at start"), ("pacc_end", "at end"))
    lines = ["| arm | steps | " + " | ".join(name for _, name in cols) + " | seeds |",
             "| --- | ---: |" + " ---: |" * len(cols) + " ---: |"]
    for arm, runs in arms.items():
        for n, gs in per_stage_games(runs).items():
            cells = []
            for key, _ in cols:
                v = [g[key] for g in gs if g.get(key) is not None]
                cells.append(fmt(stat(v), 4 if key.startswith("mse") else 2) if v else "")
            lines.append(f"| {arm} | {n} | " + " | ".join(cells) + f" | {len(gs)} |")
    return "\n".join(lines) if len(lines) > 2 else "(no games recorded)"


def central_claim(adv: list[dict], mse: list[dict], seeds: list[int]) -> list[dict]:
    """The paper's claim on the sharp benchmark, on the seeds both arms finished: FD-patch and sharpness at
    1 and 2 steps, a difference judged by `beyond_noise` with each metric's evaluation noise."""
    out = []
    on = f"seeds {', '.join(map(str, seeds))}"
    patch_a, patch_m = per_steps(adv, "student", "fd_patch"), per_steps(mse, "student", "fd_patch")
    sharp_a, sharp_m = per_steps(adv, "student", "sharpness"), per_steps(mse, "student", "sharpness")
    for n in (2, 1):
        if n in patch_a and n in patch_m:
            a, m = patch_a[n], patch_m[n]
            apart, how = beyond_noise(a, m, noise=FD_PATCH_NOISE)  # the FD comparison's rule, FD-patch's noise
            out.append({"target": f"adversarial {n}-step FD-patch <= 0.8x MSE-only's (mean)", "value": a["mean"],
                        "limit": 0.8 * m["mean"], "met": bool(a["mean"] <= 0.8 * m["mean"] and apart),
                        "note": f"{on}; " + ("a difference" if apart else "no difference") + f" ({how})"})
        if n in sharp_a and n in sharp_m:
            a, m = sharp_a[n], sharp_m[n]
            out.append({"target": f"adversarial {n}-step sharpness within 15% of real (mean)", "value": a["mean"],
                        "limit": 0.85, "met": bool(a["mean"] >= 0.85), "note": on})
            apart, how = beyond_noise(a, m, noise=SHARPNESS_NOISE)
            lower = apart and m["mean"] < a["mean"]
            out.append({"target": f"MSE-only {n}-step sharpness below the adversarial's (mean)", "value": m["mean"],
                        "limit": a["mean"], "met": bool(lower),
                        "note": f"{on}; " + ("lower" if lower else "not lower" if m["mean"] >= a["mean"] else
                                             "no difference") + f" ({how})"})
    return out


def comparison_table(arms: dict[str, list[dict]]) -> str:
    """The report's toy metric columns (`pipeline.metrics.METRICS`), each shown where every run has it
    (FD-patch and sharpness: runs since the metrics were made per dataset); mean [min, max] over seeds."""
    from pipeline.metrics import METRICS

    any_runs = next((r for r in arms.values() if r), None)
    if not any_runs:
        return "(no finished runs)"
    ref = any_runs[0]["evals"]
    cols = [(k, name) for k, name in METRICS if all(k in e["teacher_32"] for r in arms.values() for x in r
                                                    for e in x["evals"])]
    lines = ["| model | steps | " + " | ".join(name for _, name in cols) + " | seeds |",
             "| --- | ---: |" + " ---: |" * len(cols) + " ---: |"]
    t32 = ref[0]["teacher_32"]
    lines.append("| teacher (CFG) | 32 | " + " | ".join("0" if k == "fd_to_reference" else f"{t32[k]:.3f}"
                                                        for k, _ in cols) + " | |")
    for e in ref:
        n = e["student_steps"]
        t = e["teacher_same_steps"]
        lines.append(f"| teacher (CFG) | {n} | " + " | ".join(f"{t[k]:.3f}" for k, _ in cols) + " | |")
        for arm, runs in arms.items():
            if not runs:
                continue
            for model, label in (("student_start", f"{arm}: start of stage"), ("student", f"**{arm}**")):
                ss = {k: per_steps(runs, model, k).get(n) for k, _ in cols}
                if ss["fd"] is None:
                    continue
                lines.append(f"| {label} | {n} | " + " | ".join(fmt(ss[k]) for k, _ in cols) + f" | {ss['fd']['n']} |")
    return "\n".join(lines)


def ablation_table(base: dict | None, abl: dict[str, dict], recipe: str = ARMS["adversarial"]) -> str:
    """One row per run and step count, in the report's toy metric columns (those every run has), the
    recipe's run (seed 0) first at each step count."""
    from pipeline.metrics import METRICS

    rows = ([(f"recipe ({recipe}, seed 0)", base)] if base else []) + list(abl.items())
    if not rows:
        return "(no finished ablations)"
    cols = [(k, name) for k, name in METRICS if all(k in e["student"] for _, r in rows for e in r["evals"])]
    lines = ["| run | steps | " + " | ".join(name for _, name in cols) + " |",
             "| --- | ---: |" + " ---: |" * len(cols)]
    for n in [e["student_steps"] for e in rows[0][1]["evals"]]:
        for name, r in rows:
            by = {e["student_steps"]: e["student"] for e in r["evals"]}
            if n in by:
                lines.append(f"| {name} | {n} | " + " | ".join(f"{by[n][k]:.3f}" for k, _ in cols) + " |")
    return "\n".join(lines)


HEADERS = {
    "digits": "Shipped toy teacher (guidance 2.0); 500 samples per model (digits 0-9 x 50, each with its own "
              "fixed noise, the same for every model). FD: Fréchet distance to real digits in the digit "
              "classifier's feature space",
    "fashion": "Shipped Fashion-MNIST toy teacher (guidance 2.0); 500 samples per model (10 classes x 50, each "
               "with its own fixed noise, the same for every model). FD and FD-patch: Fréchet distance to the "
               "t10k photos in the Fashion-MNIST classifier's feature space; sharpness: high-frequency energy "
               "relative to the real photos (1 = as sharp). Differences are judged against this benchmark's own "
               "noise between evaluation seeds (FD 0.8, FD-patch 1.9, sharpness 0.03: "
               "benchmarks/results/fashion_metric_noise.md)",
}


def markdown(result: dict) -> str:
    bench = result.get("benchmark", "digits")
    lines = [f"# Toy benchmark ({bench}): progressive adversarial distillation vs MSE-only, and ablations\n",
             HEADERS[data_of(bench)] + "; 'start of stage': the student the stage started from, sampled at "
             "the stage's step count. Spread: [min, max] over training seeds.\n",
             *([f"Every run of this benchmark with `{' '.join(BENCHMARKS[bench]['set'])}`.\n"]
               if BENCHMARKS[bench]["set"] else []),
             *([f"Variant: both arms' runs with `{' '.join(result['set'])}` (`--set`).\n"] if result.get("set") else []),
             *[f"The {arm} arm's runs with `{' '.join(ov)}`.\n" for arm, ov in result.get("arm_set", {}).items()],
             "## Adversarial vs MSE-only (same student updates per stage)\n",
             comparison_table(result["comparison"]), "",
             "## The games (held rows: the student's MSE to its teacher, D's paired accuracy)\n",
             game_table(result["comparison"]), "",
             *(["## Ablations (seed 0, same student updates)\n", ablation_table(
                 result.get("ablation_base"), result["ablations"], BENCHMARKS[bench]["arms"]["adversarial"]), "",
                "The ablations' games (as above):\n", game_table({name: [r] for name, r in result["ablations"].items()}),
                ""] if result["ablations"] else []),
             "## Targets\n", "| target | value | limit | met | note |", "| --- | ---: | ---: | :---: | --- |"]
    lines += [f"| {c['target']} | {c['value']:.4f} | {c['limit']:.4f} | {'yes' if c['met'] else '**no**'} | "
              f"{c['note']} |" for c in result["targets"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("comparison", "ablations", "report"), default="comparison")
    p.add_argument("--benchmark", choices=tuple(BENCHMARKS), default="digits",
                   help="digits (default); digits_balanced: the digits with a balanced game at 4 and 2 steps (10x "
                   "MSE, a LoRA through the conditional phase); fashion: the demo's configs at 500 samples a model; "
                   "fashion_long: the same with 4x longer adversarial stages (200 D-only warm-up updates first) and "
                   "disc_lr 1e-4")
    p.add_argument("--seeds", type=int_list, default=list(DEFAULT_SEEDS),
                   help="training seeds of the comparison to run (default 0,1,2)")
    p.add_argument("--arms", default="adversarial,mse", help="comparison arms to run (default both)")
    p.add_argument("--only", default=None, help="ablations: run only these (comma-separated names or slugs)")
    p.add_argument("--root", default=None, help="where the run roots go (default runs/bench, runs/bench_balanced, "
                   "runs/bench_fashion or runs/bench_fashion_long)")
    p.add_argument("--out", default=None, help="output path without extension (default benchmarks/results/"
                   "distill, distill_balanced, distill_fashion or distill_fashion_long_comparison)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run of both arms (repeatable; e.g. stages.0.lr=3e-5): "
                   "give such a variant its own --root and --out")
    args = p.parse_args(argv)
    bench = BENCHMARKS[args.benchmark]
    arms = bench["arms"]
    if args.set and (args.root is None or args.out is None):
        p.error("--set changes every run: give the variant its own --root and --out")
    args.root = args.root or bench["root"]
    args.out = args.out or str(RESULTS / bench["out"])

    import torch

    seeds = args.seeds
    all_seeds = sorted(set(seeds) | set(DEFAULT_SEEDS))  # run `seeds`; report every finished one of these
    root = Path(args.root)

    def donor() -> str | None:
        """A run root whose shared steps have finished (the first run of a part computes them)."""
        cands = [root / f"{c}-s{s}" for s in all_seeds for c in arms.values()] + sorted(root.glob("ablation-*"))
        return next((str(c) for c in cands if (c / "_manifest" / "trajectories-1-8step.json").exists()), None)

    from pipeline.config import load_config

    arm_set = {arm: arm_overrides(args.benchmark, arm, args.set) for arm in arms}
    adv_cfg, mse_cfg = (load_config(arms[arm], arm_set[arm]) for arm in ("adversarial", "mse"))
    same = shared_stages(adv_cfg, mse_cfg)

    def arm_runs(arm: str, do_run: bool) -> list[dict]:
        """The arm's runs: those of `--seeds` run (or resumed) when `do_run`, and every other finished
        seed of the default three read as they are, so each part's report has all runs finished so far."""
        out = []
        for s in all_seeds:
            r_root, ov = str(root / f"{arms[arm]}-s{s}"), [*arm_set[arm], f"train.seed={s}"]
            other = str(root / f"{arms['adversarial' if arm == 'mse' else 'mse']}-s{s}")
            r = run(arms[arm], r_root, ov, donor(), (other, same)) if do_run and s in seeds \
                else finished(arms[arm], r_root, ov)
            if r is not None:
                out.append(r)
        return out

    check_fair(adv_cfg, mse_cfg)
    wanted = set(args.arms.split(","))
    comparison = {arm: arm_runs(arm, args.part == "comparison" and arm in wanted) for arm in arms}
    abl_runs = {}
    only = None if args.only is None else {x.strip() for x in args.only.split(",")}
    recipe = arms["adversarial"]
    abl = ablations(recipe, arm_set["adversarial"])
    known = {n for name in abl for n in (name, slug(name))}
    if only is not None and only - known:
        p.error(f"--only: no ablation named {', '.join(sorted(only - known))}; the ablations: "
                f"{', '.join(slug(n) for n in abl)}")
    for name, ov in abl.items():
        r_root, ov = str(root / f"ablation-{slug(name)}"), [*arm_set["adversarial"], *ov, "train.seed=0"]
        if args.part == "ablations" and (only is None or name in only or slug(name) in only):
            s0 = (str(root / f"{recipe}-s0"), shared_stages(adv_cfg, load_config(recipe, ov)))
            abl_runs[name] = run(recipe, r_root, ov, donor(), s0)
        else:
            r = finished(recipe, r_root, ov)
            if r is not None:
                abl_runs[name] = r
    base = next((r for r in comparison["adversarial"] if r["run_root"].endswith("-s0")), None)
    result = {"benchmark": args.benchmark, "set": args.set, "arm_set": bench.get("arm_set", {}), "comparison": comparison, "ablations": abl_runs, "ablation_base": base,
              "targets": targets(comparison["adversarial"], comparison["mse"], args.benchmark), "seeds_run": seeds,
              "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_report(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
