"""Samples/s of the full Ray Train + DeepSpeed stage loop vs a bare single-process torch loop running
the same student + discriminator updates (`pipeline.train.StageLoop` with plain torch Adam) on the same
cores, measured side by side in one run (bare, Ray, bare: the two bare runs bracket the Ray one so a
change in machine load shows up as their spread).

    .venv/bin/python benchmarks/train_step.py [--steps 80] [--workers 2] [--micro-batch 32] [--kind adversarial]

Both loops train the smoke config's tiny SDXL-class UNet (32 px, 8x8 latents) as stage 1 with the same
global batch per step (workers x micro-batch) on synthetic trajectories in the agreed schema; the
throughput counts every step after 2 warm-up steps, Ray Train's reports included, start-up excluded.
The default micro-batch (32 per worker) is the toy configs' training micro-batch. Every step pays a
fixed cost for DeepSpeed's gradient reduce-scatter and parameter all-gather over gloo (two engines),
so smaller batches show more of it (2 workers x 8: 0.70x on 2026-11-23). Short runs are noisy on a
shared 2-core machine: 30 steps gave 0.76x and 80 steps 0.88x minutes apart with the same code.
Prints a table and writes JSON to benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import zoo  # noqa: E402
from pipeline.config import CONFIG_DIR, from_dict  # noqa: E402
from pipeline.storage import RunStorage  # noqa: E402
from results_io import write_result


def make_cfg(root: str, steps: int, workers: int, micro: int, kind: str, zero: int):
    data = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    data["run_root"] = root
    st = data["stages"][0]
    st.update(mse_steps=0, conditional_steps=0, unconditional_steps=0, lr=1e-4, betas=[0.0, 0.99])
    if kind == "mse":
        st.update(loss="mse", mse_steps=steps)
    else:
        st.update(loss="adversarial", conditional_steps=steps)
    data["train"].update(workers=workers, micro_batch=micro, checkpoint_every=10 ** 6, log_every=10,
                         zero_stage=zero)
    return from_dict(data)


def synthetic_trajectories(cfg, storage, rows: int, seed: int = 0):
    pipe = zoo.load_pipeline(cfg.model.source)
    sched = zoo.schedule_of(pipe)
    _, stage = cfg.stage(1)
    pairs = sched.stage_pairs(stage.student_steps, stage.multi_timestep)
    g = np.random.default_rng(seed)
    cond = zoo.encode_prompts(pipe, ["a handwritten digit one"], cfg.model.resolution)
    pick = [pairs[i % len(pairs)] for i in range(rows)]
    cols = {"id": [f"r{i}" for i in range(rows)], "draw": np.zeros(rows, np.int32),
            "t": np.array([p.t for p in pick], np.int32), "t_next": np.array([p.t_next for p in pick], np.int32),
            "x_t": g.standard_normal((rows, 4, 8, 8)).astype(np.float32),
            "target": g.standard_normal((rows, 4, 8, 8)).astype(np.float32),
            "prompt_embeds": np.repeat(cond.prompt_embeds.numpy(), rows, 0).astype(np.float32),
            "pooled_embeds": np.repeat(cond.pooled.numpy(), rows, 0).astype(np.float32)}
    storage.write_table(f"{cfg.stage_dir(1)}/traj/part-00000.parquet", cols)
    return cols


def bare_loop(cfg, cols, steps: int, threads: int, warmup: int = 2) -> dict:
    """The same StageLoop updates in one process, plain torch + Adam, global batch per step."""
    from pipeline.train import TRAIN_COLUMNS, PlainEngines, StageLoop, phase_at

    torch.set_num_threads(threads)
    _, stage = cfg.stage(1)
    teacher = zoo.load_unet(cfg.model.source)
    loop = StageLoop(cfg, stage, zoo.schedule_of(zoo.resolve_source(cfg.model.source)), teacher,
                     PlainEngines(cfg.train), "cpu", seed=0)
    gb = cfg.train.micro_batch * cfg.train.workers
    n = len(cols["t"]) // gb
    batches = [loop.batch_to({k: torch.as_tensor(np.asarray(cols[k][i * gb:(i + 1) * gb])) for k in TRAIN_COLUMNS})
               for i in range(n)]
    t_start = None
    for step in range(steps):
        loop.transition(step)
        loop.micro_step(phase_at(loop.phases, step), batches[step % n])
        if step + 1 == warmup:
            t_start = time.perf_counter()
    wall = time.perf_counter() - t_start
    return {"samples_per_s": (steps - warmup) * gb / wall, "timed_steps": steps - warmup, "wall_s": wall}


def ray_loop(cfg, steps: int) -> dict:
    import ray

    from pipeline.train import train_stage

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True)
    t0 = time.perf_counter()
    summary = train_stage(cfg, 1, held_rows=0, export=False, extra_config={"warmup_steps": 2})
    m = summary["metrics"]
    return {"samples_per_s": m["steady_samples_per_s"], "timed_steps": steps - 2,
            "wall_s_including_startup": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--kind", choices=["adversarial", "mse"], default="adversarial")
    p.add_argument("--zero", type=int, choices=[2, 3], default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step.json"))
    a = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="padistill-bench-train-")
    cfg = make_cfg(root, a.steps, a.workers, a.micro_batch, a.kind, a.zero)
    storage = RunStorage.from_config(cfg)
    cols = synthetic_trajectories(cfg, storage, rows=max(64, 4 * a.workers * a.micro_batch))
    threads = cfg.ray.num_cpus or os.cpu_count()
    load_before = os.getloadavg()
    bare1 = bare_loop(cfg, cols, a.steps, threads)
    ray_r = ray_loop(cfg, a.steps)
    bare2 = bare_loop(cfg, cols, a.steps, threads)
    bare_mean = (bare1["samples_per_s"] + bare2["samples_per_s"]) / 2
    ratio = ray_r["samples_per_s"] / bare_mean
    rows = [("bare torch, 1 process, %d threads (before)" % threads, bare1["samples_per_s"]),
            (f"Ray Train + DeepSpeed ZeRO-{a.zero}, {a.workers} workers", ray_r["samples_per_s"]),
            ("bare torch, 1 process, %d threads (after)" % threads, bare2["samples_per_s"])]
    print(f"\n{a.kind} stage step, global batch {a.workers * a.micro_batch}, {a.steps} steps (2 warm-up)")
    print(f"{'loop':55s} {'samples/s':>10s}")
    for name, v in rows:
        print(f"{name:55s} {v:10.2f}")
    print(f"{'Ray / bare (mean of before+after)':55s} {ratio:10.3f}   target >= 0.85")
    print(f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    out = {"kind": a.kind, "steps": a.steps, "workers": a.workers, "micro_batch": a.micro_batch,
           "zero_stage": a.zero, "global_batch": a.workers * a.micro_batch, "bare_before": bare1,
           "ray": ray_r, "bare_after": bare2, "ratio_ray_over_bare": ratio,
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "python": platform.python_version(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_result(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
