"""A stage's student against the teacher at the student's step count, paired over evaluation seeds and training
runs: the margins a target such as "the 4-step student's FD below the teacher's at 4 steps, with accuracy >= the
teacher's - 0.01" needs, where FD moves more between evaluation seeds than between the models compared.

Evaluate a finished stage at more seeds first (each seed draws its own noise, shared by the teacher and the
student; every evaluation keeps its metrics in `<stage>/eval/seeds/<seed>.json` with a key of what it scored and
how), then pair them:

    padistill distill --config R/config.yaml --set evaluate.seed=E --only eval-K     # E = 1, 2, 3
    padistill distill --config R/config.yaml --set evaluate.seed=1234 --only eval-K  # the run's own seed last
    python benchmarks/eval_seeds.py R [R2 ...] --stage K --out benchmarks/results/NAME

(`R/config.yaml` is the settings the run was made with; the last evaluation's seed is the one the stage's
metrics.json, model card and manifest hold. Only files from the stage's current student and evaluation settings
are paired; the others are named as left out.)

FD margin = the student's FD - the teacher's at the same steps and seed (below 0: the student wins); accuracy
margin = the student's prompt accuracy - (the teacher's - tolerance) (at or above 0: within the tolerance). A
non-toy run pairs FID-Whole and CLIP score the same way. Prints a row per (run, seed), then each margin's mean,
standard deviation, range and how many pairs are below 0; writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_report  # noqa: E402


def seed_metrics(cfg, storage, stage: int) -> tuple[list[dict], list[int]]:
    """Stage `stage`'s metrics at every evaluation seed at which its current student was scored with the run's
    current evaluation settings (by seed), and the seeds whose files were left out: kept from an earlier student
    of the stage, or scored with other settings (sample count, guidance, ...)."""
    from pipeline.evaluate import eval_inputs, evaluation_key
    from pipeline.layout import EVAL_SEEDS_DIR

    if not 1 <= stage <= len(cfg.stages):
        raise SystemExit(f"{cfg.run_root}: --stage {stage}: the run has stages 1-{len(cfg.stages)}")
    inputs = eval_inputs(cfg, stage, storage)
    if inputs is None:
        raise SystemExit(f"{cfg.run_root}: stage {stage} has no trained student")
    folder = f"{cfg.stage_dir(stage)}/{EVAL_SEEDS_DIR}"
    found = [storage.read_json(f"{folder}/{name}") for name in storage.ls(folder) if name.endswith(".json")]
    key = evaluation_key(inputs)
    kept = sorted((m for m in found if m.get("evaluation_key") == key), key=lambda m: m["seed"])
    if not kept:
        raise SystemExit(f"{storage.url(folder)}: no evaluation of stage {stage}'s student with these settings kept "
                         f"per seed (evaluate it: padistill distill --config {cfg.run_root}/config.yaml "
                         f"--set evaluate.seed=E --only eval-{stage})")
    return kept, sorted(m["seed"] for m in found if m.get("evaluation_key") != key)


def load_run(root: str):
    """A local run root's config (as its last `distill` wrote it) and storage."""
    from pipeline.config import load_config
    from pipeline.storage import RunStorage

    if not Path(root, "config.yaml").exists():
        raise SystemExit(f"{root}: no config.yaml (not a run root a `padistill distill` wrote)")
    cfg = load_config(str(Path(root, "config.yaml")), [f"run_root={root}"])
    return cfg, RunStorage.from_config(cfg)


def pair(m: dict, tolerance: float) -> dict:
    """One evaluation's student and teacher (at the student's steps) side by side, with the two margins."""
    toy = "fd" in m["student"]
    fd, acc = ("fd", "prompt_accuracy") if toy else ("fid", "clip_score")
    st, te = m["student"], m["teacher_same_steps"]
    return {"seed": m["seed"], "steps": m["student_steps"], "fd_key": fd, "acc_key": acc,
            "teacher_fd": te[fd], "student_fd": st[fd], "teacher_acc": te[acc], "student_acc": st[acc],
            "fd_margin": st[fd] - te[fd], "acc_margin": st[acc] - (te[acc] - tolerance)}


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "below_0": sum(v < 0 for v in values), "n": len(values)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="local run roots whose stage was evaluated at one or more seeds")
    p.add_argument("--stage", type=int, required=True, help="the stage, 1-based")
    p.add_argument("--tolerance", type=float, default=None,
                   help="how far below the teacher's prompt accuracy (toy) or CLIP score (a non-toy run, 0-100) the "
                        "student may be; default 0.01 on the toy, required on a non-toy run")
    p.add_argument("--labels", default=None, help="comma-separated short names of the runs (default: their roots)")
    p.add_argument("--out", required=True, help="output path without extension")
    args = p.parse_args(argv)
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else list(args.runs)
    if len(labels) != len(args.runs):
        p.error(f"--labels: {len(labels)} names for {len(args.runs)} runs")

    found, left_out = [], []
    for root, label in zip(args.runs, labels):
        kept, dropped = seed_metrics(*load_run(root), args.stage)
        found += [(label, m) for m in kept]
        left_out += [f"{label}: seed {e}" for e in dropped]
    for what, of in (("step counts", lambda m: m["student_steps"]), ("teacher guidance", lambda m: m["teacher_guidance_scale"]),
                     ("metrics (toy and non-toy)", lambda m: "fd" in m["student"]),
                     ("sample counts", lambda m: m["student"]["n"])):
        if len({of(m) for _, m in found}) > 1:
            raise SystemExit(f"--stage {args.stage}: the runs' evaluations differ in {what}; pair like with like")
    toy = "fd" in found[0][1]["student"]
    if args.tolerance is None and not toy:
        p.error("--tolerance: a non-toy run pairs CLIP scores (0-100): say how far below the teacher's is allowed")
    tolerance = 0.01 if args.tolerance is None else args.tolerance
    rows = [{"run": label, **pair(m, tolerance)} for label, m in found]
    names = {"fd": "FD", "prompt_accuracy": "accuracy", "fid": "FID-Whole", "clip_score": "CLIP score"}
    fd, acc, n = names[rows[0]["fd_key"]], names[rows[0]["acc_key"]], rows[0]["steps"]
    fd_s, acc_s = summary([r["fd_margin"] for r in rows]), summary([r["acc_margin"] for r in rows])
    md = [f"Stage {args.stage}: the {n}-step student against the teacher at {n} steps, paired by evaluation seed. "
          f"{fd} margin = student - teacher (below 0: the student wins); {acc} margin = student - (teacher - "
          f"{tolerance:g}) (at or above 0: within the tolerance). Rows of one evaluation seed share its noise and the "
          f"teacher's samples, so the pairs are not independent: the spread mixes evaluation seeds and runs."
          + (f" Left out (another student of the stage, or other evaluation settings): {'; '.join(left_out)}."
             if left_out else ""), "",
          f"| run | evaluation seed | teacher {fd} | student {fd} | teacher {acc} | student {acc} | {fd} margin | "
          f"{acc} margin |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    md += [f"| {r['run']} | {r['seed']} | {r['teacher_fd']:.3f} | {r['student_fd']:.3f} | {r['teacher_acc']:.3f} | "
           f"{r['student_acc']:.3f} | {r['fd_margin']:+.3f} | {r['acc_margin']:+.3f} |" for r in rows]
    for name, s in ((f"{fd} margin", fd_s), (f"{acc} margin", acc_s)):
        sd = "–" if s["sd"] is None else f"{s['sd']:.3f}"
        md.append(f"\n{name} over {s['n']} pairs: mean {s['mean']:+.3f}, sd {sd}, range "
                  f"[{s['min']:+.3f}, {s['max']:+.3f}], {s['below_0']} of {s['n']} below 0")
    write_report(args.out, {"stage": args.stage, "tolerance": tolerance, "rows": rows, "left_out": left_out,
                            "fd_margin": fd_s, "acc_margin": acc_s}, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
