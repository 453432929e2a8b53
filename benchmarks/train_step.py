"""Samples/s of the full Ray Train + DeepSpeed stage loop vs a bare single-process torch loop running
the same student + discriminator updates (`pipeline.stage_loop.StageLoop` with plain torch Adam) on the same
cores, measured side by side in one run: bare, Ray, bare, Ray, bare (`--reps 2`), medians compared, so
a change in machine load shows up as the spread of each side's runs.

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
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.cluster import quiet_driver  # noqa: E402

quiet_driver()  # before Ray is imported: Ray's known-harmless lines off the console

from pipeline import cluster, zoo  # noqa: E402
from pipeline.sampling import latent_shape  # noqa: E402
from pipeline.config import CONFIG_DIR, from_dict  # noqa: E402
from pipeline.storage import RunStorage  # noqa: E402
from results_io import write_result  # noqa: E402


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
    level = np.int32 if sched.level_dtype == torch.long else np.float32  # an SD3 schedule's levels are sigmas
    shape = latent_shape(pipe)
    cols = {"id": [f"r{i}" for i in range(rows)], "draw": np.zeros(rows, np.int32),
            "t": np.array([p.t for p in pick], level), "t_next": np.array([p.t_next for p in pick], level),
            "x_t": g.standard_normal((rows, *shape)).astype(np.float32),
            "target": g.standard_normal((rows, *shape)).astype(np.float32),
            "prompt_embeds": np.repeat(cond.prompt_embeds.numpy(), rows, 0).astype(np.float32)}
    if cond.pooled is not None:  # SDXL
        cols["pooled_embeds"] = np.repeat(cond.pooled.numpy(), rows, 0).astype(np.float32)
    storage.write_table(f"{cfg.stage_dir(1)}/traj/part-00000.parquet", cols)
    return cols


def bare_loop(cfg, cols, steps: int, threads: int, warmup: int = 2) -> dict:
    """The same StageLoop updates in one process, plain torch + Adam, global batch per step."""
    from pipeline.engines import PlainEngines
    from pipeline.phases import phase_at
    from pipeline.stage_loop import StageLoop, train_columns

    torch.set_num_threads(threads)
    _, stage = cfg.stage(1)
    teacher = zoo.load_denoiser(cfg.model.source)
    loop = StageLoop(cfg, stage, zoo.schedule_of(zoo.resolve_source(cfg.model.source)), teacher,
                     PlainEngines(cfg.train), "cpu", seed=0)
    gb = cfg.train.micro_batch * cfg.train.workers
    n = len(cols["t"]) // gb
    batches = [loop.batch_to({k: torch.as_tensor(np.asarray(cols[k][i * gb:(i + 1) * gb])) for k in train_columns(cols)})
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
    from pipeline.train import train_stage
    from pipeline.train_worker import WorkerArgs

    t0 = time.perf_counter()
    summary = train_stage(cfg, 1, held_rows=0, export=False)
    m = summary["metrics"]  # steady-state: after the worker's warm-up steps, as bare_loop's `warmup`
    return {"samples_per_s": m["steady_samples_per_s"], "timed_steps": steps - WorkerArgs.warmup_steps,
            "wall_s_including_startup": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--kind", choices=["adversarial", "mse"], default="adversarial")
    p.add_argument("--zero", type=int, choices=[2, 3], default=2)
    p.add_argument("--reps", type=int, default=2, help="Ray runs; bare runs bracket each (reps + 1 of them)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step.json"))
    a = p.parse_args(argv)
    import ray

    def fresh_cfg():  # a new run root each time: the same one would resume the finished run
        cfg = make_cfg(tempfile.mkdtemp(prefix="padistill-bench-train-"), a.steps, a.workers, a.micro_batch,
                       a.kind, a.zero)
        cols = synthetic_trajectories(cfg, RunStorage.from_config(cfg), rows=max(64, 4 * a.workers * a.micro_batch))
        return cfg, cols

    cfg, cols = fresh_cfg()
    threads = cfg.ray.num_cpus or os.cpu_count()
    # Ray is up for every run, bare ones included (its idle processes are part of the machine's load)
    cluster.init_local(threads)
    load_before = os.getloadavg()
    bare = [bare_loop(cfg, cols, a.steps, threads)]
    rays = []
    for _ in range(a.reps):
        rays.append(ray_loop(fresh_cfg()[0], a.steps))
        bare.append(bare_loop(cfg, cols, a.steps, threads))
    ray.shutdown()
    bare_med = statistics.median(b["samples_per_s"] for b in bare)
    ray_med = statistics.median(r["samples_per_s"] for r in rays)
    ratio = ray_med / bare_med
    print(f"\n{a.kind} stage step, global batch {a.workers * a.micro_batch}, {a.steps} steps (2 warm-up), "
          f"runs alternate bare / Ray")
    print(f"{'loop':55s} {'samples/s (each run)':>30s} {'median':>8s}")
    each = lambda runs: " ".join(f"{r['samples_per_s']:.1f}" for r in runs)  # noqa: E731
    print(f"{'bare torch, 1 process, %d threads' % threads:55s} {each(bare):>30s} {bare_med:8.1f}")
    print(f"{f'Ray Train + DeepSpeed ZeRO-{a.zero}, {a.workers} workers':55s} {each(rays):>30s} {ray_med:8.1f}")
    print(f"{'Ray / bare (medians)':55s} {ratio:39.3f}   target >= 0.85")
    print(f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    out = {"kind": a.kind, "steps": a.steps, "workers": a.workers, "micro_batch": a.micro_batch,
           "zero_stage": a.zero, "global_batch": a.workers * a.micro_batch, "reps": a.reps,
           "bare": bare, "ray": rays, "bare_median_samples_per_s": bare_med, "ray_median_samples_per_s": ray_med,
           "ratio_ray_over_bare": ratio, "meets_target": ratio >= 0.85,
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "python": platform.python_version(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_result(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
