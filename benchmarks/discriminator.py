"""The discriminator probe: can each discriminator tell the teacher's rollout from the student's step,
and does the trainer's alternating game keep it informative while the student moves toward its teacher?

Reads one adversarial stage's trajectories from a finished run root (`traj/` Parquet) and the models
the trainer would use (the stage's init student, the base model for D), in one process, through the
trainer's own `StageLoop` with plain torch Adam: the same D inputs (`StageLoop.d_inputs`: x0
re-noising where the stage has it), the same updates, the same held metrics. Held rows are the
trainer's held split (whole source ids by a hash of the id), at least --held rows.

(a) D alone, `--d-steps` updates against the frozen student, per arm:
    trained   the paper's D: the base model's UNet encoder copy, trained whole with its head
    frozen    the same with the backbone frozen (only the head trains: padistill before the fix)
    cnn       a small plain CNN on the latents
    control   the trained arm against a positive control: fake = the teacher's target blurred by a
              Gaussian whose strength matches the measured real/fake distance (any working D separates it)
  reporting the held paired accuracy P(D(real_i) > D(fake_i)) (same x_t, caption, t*, noise) and AUC
  per timestep stratum.
(b) the trainer's game (`--game`: one or more `name:key=value,...` stage overrides, e.g.
    `paper:` or `k4:disc_steps=4`): `--game-steps` alternating steps, logging every `--every` steps the
    held paired accuracy and the student's held MSE to its teacher.

    python benchmarks/discriminator.py --run runs/toy_digits --stage 2
    python benchmarks/discriminator.py --run runs/toy_digits --stage 2 --arms '' --game paper: --game k4:disc_steps=4

Prints tables; writes benchmarks/results/discriminator.json and .md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_report  # noqa: E402
from pipeline.metrics import blur  # noqa: E402  the positive control's blur, the metrics' calibration one

RESULTS = REPO / "benchmarks" / "results"


def load_rows(cfg, key, held_rows: int):
    """(train, held) dicts of tensors: a stage's trajectories split as the trainer splits them (whole
    source ids by a hash of the id, `pipeline.train_data.held_mask`), with at least `held_rows` held rows
    (the hash modulus is lowered until there are)."""
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset as pads
    import torch

    from pipeline.storage import RunStorage
    from pipeline.stage_loop import train_columns
    from pipeline.train_data import held_mask

    storage = RunStorage.from_config(cfg)
    ds = pads.dataset(storage.path(cfg.stage_dir(key), "traj"), filesystem=storage.arrow_fs, format="parquet")
    shapes = {f.name: json.loads(f.metadata[b"ARROW:extension:metadata"]) for f in ds.schema
              if f.metadata and b"ARROW:extension:metadata" in f.metadata}
    columns = train_columns(ds.schema.names)
    table = ds.to_table(columns=["id"] + columns)
    n = table.num_rows
    ids = table.column("id").to_pylist()
    modulus = max(2, n // held_rows)
    held = held_mask(ids, modulus)
    while modulus > 2 and int(held.sum()) < held_rows:
        modulus -= 1
        held = held_mask(ids, modulus)

    def cols(mask):
        sub = table.filter(pa.array(mask))
        out = {}
        for k in columns:
            col = sub.column(k).combine_chunks()
            if k in ("t", "t_next"):  # integer timesteps, or an SD3 run's float sigmas
                v = col.to_numpy()
                out[k] = torch.as_tensor(v.astype(np.int64 if np.issubdtype(v.dtype, np.integer) else np.float32))
            else:
                # Ray's tensor extension type when Ray registered it in this process, else its storage list
                flat = (col.storage if hasattr(col, "storage") else col).values.to_numpy()
                out[k] = torch.as_tensor(flat.astype(np.float32)).reshape(len(sub), *shapes[k])
        return out

    return cols(~held), cols(held)


def make_loop(cfg, key, overrides: dict, seed: int):
    import torch

    from pipeline import zoo
    from pipeline.config import from_dict
    from pipeline.storage import RunStorage
    from pipeline.stage_models import disc_source, student_init_source
    from pipeline.engines import PlainEngines
    from pipeline.stage_loop import StageLoop

    data = cfg.model_dump(mode="json")
    idx, _ = cfg.stage(key)
    data["stages"][idx - 1].update(overrides)
    cfg = from_dict(data)
    _, stage = cfg.stage(key)
    storage = RunStorage.from_config(cfg)
    init_dir = zoo.resolve_source(student_init_source(cfg, key, storage))
    init = zoo.load_denoiser(str(init_dir))
    disc = zoo.load_denoiser(str(zoo.resolve_source(disc_source(cfg, key, storage)))).requires_grad_(False)
    sched = zoo.schedule_of(init_dir)  # as the trainer: the student's starting UNet's schedule
    torch.manual_seed(seed)
    return StageLoop(cfg, stage, sched, init, PlainEngines(cfg.train), "cpu", seed=seed, disc_unet=disc)


def batches(rows: dict, bs: int, seed: int):
    import torch

    n = len(rows["t"])
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=g)
        for i in range(0, n - bs + 1, bs):
            yield {k: v[order[i:i + bs]] for k, v in rows.items()}


def student_outputs(loop, rows: dict, chunk: int = 128):
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(rows["t"]), chunk):
            b = {k: v[i:i + chunk] for k, v in rows.items()}
            outs.append(loop.student_step(b, loop.cond(b))[0])
    return torch.cat(outs)


def matched_blur(target, fake) -> tuple[float, float]:
    """The blur sigma whose RMS change of the target is closest to the real/fake RMS distance."""
    import torch

    want = (target - fake).pow(2).mean().sqrt().item()
    best = min((abs((target - blur(target, s)).pow(2).mean().sqrt().item() - want), s)
               for s in torch.linspace(0.05, 2.0, 40).tolist())
    return best[1], want


def d_alone(cfg, key, train, held, arm: str, steps: int, bs: int, seed: int, control_sigma: float | None,
            overrides: dict | None = None):
    """Train D alone against fixed fakes (the frozen student's, or the blurred-target control)."""
    import torch

    from pipeline.discriminator import nonsaturating_d_loss
    from pipeline.stage_loop import discriminator_scores

    kind = "trained" if arm == "control" else arm
    loop = make_loop(cfg, key, {**(overrides or {}), "disc_backbone": kind}, seed)
    cond_phase = next(p for p in loop.phases if p.name == "conditional")
    loop.transition(cond_phase.start)

    def fakes(rows):
        return blur(rows["target"], control_sigma) if arm == "control" else student_outputs(loop, rows)

    train = dict(train, fake=fakes(train))
    held = dict(held, fake=fakes(held))
    it = batches(train, bs, seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        b = next(it)
        loop._d_update(b, loop.cond(b), b["fake"])
    wall = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1234)
    real, fake, ts = [], [], []
    with torch.no_grad():
        for i in range(0, len(held["t"]), 128):
            b = {k: v[i:i + 128] for k, v in held.items()}
            cond = loop.cond(b)
            r_in, f_in, t_hat, xt_in = loop.d_inputs(b, b["fake"], g, paired=True)
            m = len(b["t"])
            lg = loop._dcall(torch.cat([r_in, f_in]), torch.cat([t_hat, t_hat]), cond, xt_in, b["t"], k=2, frozen=True)
            real.append(lg[:m])
            fake.append(lg[m:])
            ts.append(loop.schedule.model_timestep(b["t"]))  # strata in the model's timestep units
    real, fake = torch.cat(real), torch.cat(fake)
    scores = discriminator_scores(real, fake, torch.cat(ts))
    opt, total = loop.disc_counts
    # how confident D is, not only how it ranks: its loss on the held pairs (2 ln 2 = 1.386 for a D that says
    # 0.5 to everything, however well it ranks), the mean real - fake margin, and the logits' spread
    confidence = {"d_loss": nonsaturating_d_loss(real, fake).item(), "margin": (real - fake).mean().item(),
                  "logit_std": torch.cat([real, fake]).std().item()}
    return {"arm": arm, "steps": steps, "wall_s": wall, "d_params_optimised": opt, "d_params_total": total,
            **{k.replace("held_d_", ""): v for k, v in scores.items()}, **confidence}


def toy_fd(cfg, loop, samples_per_digit: int) -> dict:
    """FD and prompt accuracy of the loop's current student at its step count (the toy evaluation's
    fixed noise, `samples_per_digit` x 10 digits)."""
    from pipeline import zoo
    from pipeline.metrics import score
    from pipeline.sampling import sample_classes

    pipe = zoo.load_pipeline(cfg.model.source)
    n = loop.stage.student_steps
    kind = cfg.data.kind
    imgs = sample_classes(pipe, n, 0.0, samples_per_digit, unet=loop.student.module,
                          prediction_type=loop.student_ptype, dataset=kind)
    sc = score(imgs.images, imgs.labels, dataset=kind)  # FD to the real images, the report's FD
    return {k: sc[k] for k in ("fd", "fd_patch", "prompt_accuracy", "sharpness") if k in sc}


def game(cfg, key, train, held, name: str, overrides: dict, steps: int, every: int, bs: int, seed: int,
         fd_samples: int = 0):
    """The trainer's alternating loop from the stage's first adversarial step (MSE warm-up and the x0
    conversion, if the stage has them, are skipped: this probes the game, not the chain). With
    `fd_samples`, the student's toy FD and accuracy before and after."""
    from pipeline.phases import phase_at

    loop = make_loop(cfg, key, overrides, seed)
    start = next(p for p in loop.phases if p.adversarial or p.name == "mse").start
    warm = next((p for p in loop.phases if p.name == "disc_warmup"), None)
    if warm is not None:  # D's warm-up steps come on top: `steps` counts the student's updates
        steps += warm.end - warm.start
    it = batches(train, bs, seed)
    curve = []
    fd = {}
    if fd_samples:
        loop.transition(start)
        fd["before"] = toy_fd(cfg, loop, fd_samples)
    t0 = time.perf_counter()
    for s in range(start, start + steps + 1):
        loop.transition(min(s, loop.total - 1))
        if (s - start) % every == 0:
            ev = loop.evaluate(held)
            curve.append({"step": s - start, "held_mse": ev["held_mse"], "pacc": ev.get("held_d_pacc"),
                          "auc": ev.get("held_d_auc"), "wall_s": time.perf_counter() - t0,
                          **{k.replace("held_d_", ""): v for k, v in ev.items() if k.startswith("held_d_pacc_t")}})
            print(f"  game {name} step {s - start:4d}: held MSE {ev['held_mse']:.5f}  paired acc "
                  f"{ev.get('held_d_pacc', float('nan')):.3f}  AUC {ev.get('held_d_auc', float('nan')):.3f}", flush=True)
        if s == start + steps:
            break
        phase = phase_at(loop.phases, min(s, loop.total - 1))
        extra = [next(it) for _ in range(loop.stage.disc_steps - 1)]
        loop.micro_step(phase, next(it), extra if phase.adversarial else None)
    if fd_samples:
        fd["after"] = toy_fd(cfg, loop, fd_samples)
        print(f"  game {name}: FD {fd['before']['fd']:.3f} -> {fd['after']['fd']:.3f}, accuracy "
              f"{fd['before']['prompt_accuracy']:.3f} -> {fd['after']['prompt_accuracy']:.3f}", flush=True)
    return {"name": name, "overrides": overrides, "curve": curve, "fd": fd}


def parse_game(spec: str) -> tuple[str, dict]:
    import yaml

    name, _, rest = spec.partition(":")
    kv = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", rest)):  # commas outside [lists]
        k, _, v = item.partition("=")
        kv[k.strip()] = yaml.safe_load(v)
    return name, kv


def markdown(res: dict) -> str:
    alone = (f"; D alone for {res['d_steps']} updates at batch {res['batch']} (stage overrides "
             f"{res.get('arm_overrides') or 'none'}); positive control: target blurred by sigma "
             f"{res.get('control_sigma', 0):.2f} px (latent) to the real/fake RMS distance "
             f"{res.get('real_fake_rms', 0):.4f}") if res["arms"] else \
        f"; games at batch {res['batch']}, from the stage's first D or student update"
    seed = f", probe seed {res['seed']}" if "seed" in res else ""
    lines = [f"# Discriminator probe: `{res['run_root']}` stage {res['stage']}{seed}\n",
             f"{res['train_rows']} training rows, {res['held_rows']} held rows{alone}.\n"]
    if res["arms"]:
        strata = sorted({k for a in res["arms"] for k in a if k.startswith("pacc_t")}, key=lambda k: int(k[6:]))
        lines += ["## (a) D alone: held paired accuracy per stratum (AUC in brackets)\n",
                  "| arm | params trained | " + " | ".join(f"t={k[6:]}" for k in strata)
                  + " | mean | held D loss (1.386: says 0.5) | margin real - fake | logit std |",
                  "| --- | ---: |" + " ---: |" * (len(strata) + 4)]
        for a in res["arms"]:
            cells = [f"{a[k]:.3f} ({a['auc_t' + k[6:]]:.3f})" for k in strata]
            conf = [f"{a[k]:.4g}" if k in a else "–" for k in ("d_loss", "margin", "logit_std")]
            lines.append(f"| {a['arm']} | {a['d_params_optimised']:,} / {a['d_params_total']:,} | "
                         + " | ".join(cells) + f" | {a['pacc']:.3f} ({a['auc']:.3f}) | " + " | ".join(conf) + " |")
        lines.append("")
    for gm in res["games"]:
        lines += [f"## (b) game `{gm['name']}` {gm['overrides']}\n", "| step | held MSE | paired acc | AUC |",
                  "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {c['step']} | {c['held_mse']:.5f} | " + (f"{c['pacc']:.3f} | {c['auc']:.3f} |"
                  if c["pacc"] is not None else "– | – |") for c in gm["curve"]]
        if gm.get("fd"):
            b, a = gm["fd"]["before"], gm["fd"]["after"]
            lines.append(f"\nFD {b['fd']:.3f} -> {a['fd']:.3f}, accuracy {b['prompt_accuracy']:.3f} -> "
                         f"{a['prompt_accuracy']:.3f} ({res.get('fd_samples', 0) * 10} samples)")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="toy_digits", help="the run's config (default toy_digits)")
    p.add_argument("--run", default=None, help="its run root (default: the config's)")
    p.add_argument("--stage", default="2", help="an adversarial stage with finished trajectories (default 2)")
    p.add_argument("--held", type=int, default=512, help="at least this many held rows (default 512)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--d-steps", type=int, default=300, help="D-alone updates per arm (default 300)")
    p.add_argument("--arms", default="trained,frozen,cnn,control", help="comma-separated; '' for none")
    p.add_argument("--arm-set", default="", metavar="K=V,...", help="stage overrides for every D-alone arm "
                   "(e.g. disc_lr=1e-4)")
    p.add_argument("--game", action="append", default=[], metavar="NAME:K=V,...",
                   help="a game to run with these stage overrides (repeatable); 'paper:' for the config as is")
    p.add_argument("--game-steps", type=int, default=200)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--fd-samples", type=int, default=50,
                   help="games: toy FD/accuracy before and after on this many samples per digit (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "discriminator"), help="output path without extension")
    args = p.parse_args(argv)

    import torch

    from pipeline.config import load_config

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = load_config(args.config, [f"run_root={args.run}"] if args.run else [])
    _, stage = cfg.stage(args.stage)
    if stage.loss != "adversarial":
        raise SystemExit(f"stage {args.stage}: not an adversarial stage")
    train, held = load_rows(cfg, args.stage, args.held)
    print(f"{cfg.stage_dir(args.stage)}: {len(train['t'])} training rows, {len(held['t'])} held rows")
    res = {"run_root": cfg.run_root, "stage": args.stage, "train_rows": len(train["t"]), "held_rows": len(held["t"]),
           "d_steps": args.d_steps, "arm_overrides": parse_game(":" + args.arm_set)[1], "batch": args.batch, "fd_samples": args.fd_samples, "seed": args.seed, "arms": [], "games": []}
    arms = [a for a in args.arms.split(",") if a]
    if arms:
        probe = make_loop(cfg, args.stage, {}, args.seed)
        probe.transition(0)
        sigma, rms = matched_blur(held["target"], student_outputs(probe, held))
        res.update(control_sigma=sigma, real_fake_rms=rms)
        del probe
        for arm in arms:
            r = d_alone(cfg, args.stage, train, held, arm, args.d_steps, args.batch, args.seed, sigma,
                        parse_game(":" + args.arm_set)[1])
            print(f"  D alone, {arm:8s}: paired acc {r['pacc']:.3f}  AUC {r['auc']:.3f}  held D loss {r['d_loss']:.4f}  "
                  f"margin {r['margin']:.3g}  logit std {r['logit_std']:.3g}  "
                  f"({r['d_params_optimised']:,} of {r['d_params_total']:,} parameters trained, {r['wall_s']:.0f} s)",
                  flush=True)
            res["arms"].append(r)
    for spec in args.game:
        name, ov = parse_game(spec)
        res["games"].append(game(cfg, args.stage, train, held, name, ov, args.game_steps, args.every, args.batch,
                                 args.seed, args.fd_samples))
    res.update(cpus=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
               time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_report(args.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
