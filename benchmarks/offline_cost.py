"""The cost of offline trajectories: a stage's training loop fed precomputed trajectories (padistill's
design) vs the same loop with the teacher rolled out inside it (what DMD2 and the diffusers LCM scripts
do), the same updates, measured side by side in one process.

Both arms run the trainer's own `StageLoop` (plain torch Adam, one process) on a finished run's stage:
the offline arm draws micro-batches from the stage's trajectory rows (in memory, as the trainer's cache
holds them); the in-loop arm draws encoded rows and rolls the teacher out for every micro-batch with
`trajectories.compute_rows`, the function precompute uses (same teacher, guidance and timestep pairs).
An adversarial update consumes `disc_steps` micro-batches (D's extra ones included), so the teacher
runs for every one. Arms alternate (offline, in-loop, offline, ... `--reps` each) after warm-up steps
and the medians are compared, so machine load shows as each arm's spread.

Beside the training speed it prints the total cost of the stage as configured (its student updates):
in-loop = updates x (update + rollouts); offline = the same updates without rollouts + one precompute
pass over the stage's rows (the same rollouts through `compute_rows`, batched as the trajectories step
batches them, timed here too), so the claim stays honest: offline moves the teacher's work off the training nodes and lets epochs and arms reuse it.

    .venv/bin/python benchmarks/offline_cost.py --config runs/bench/toy_digits-s0/config.yaml
    .venv/bin/python benchmarks/offline_cost.py --config toy_fashion --stages 1 2 --steps 20 --reps 2

Writes benchmarks/results/offline_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.discriminator import make_loop  # noqa: E402
from benchmarks.results_io import write_report  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def read_columns(storage, rel: str, columns: list[str]) -> dict[str, np.ndarray]:
    """Columns of a Parquet folder in the run root as numpy arrays (tensor columns keep their shape)."""
    from pipeline.storage import table_to_tensors

    return table_to_tensors(storage.read_table(rel, columns), columns)


def _tensor_batch(cols: dict[str, np.ndarray], idx) -> dict[str, torch.Tensor]:
    from pipeline.stage_loop import train_columns

    def dtype(k):  # integer timesteps stay integers, an SD3 run's float sigmas floats
        return np.int64 if k in ("t", "t_next") and np.issubdtype(cols[k].dtype, np.integer) else np.float32

    return {k: torch.as_tensor(cols[k][idx].astype(dtype(k))) for k in train_columns(cols)}


def offline_batches(traj: dict[str, np.ndarray], bs: int, seed: int):
    rng = np.random.default_rng(seed)
    n = len(traj["t"])
    while True:
        yield _tensor_batch(traj, rng.choice(n, bs, replace=False))


def inloop_batches(teacher, enc: dict[str, np.ndarray], bs: int, seed: int, draws: int, clock: list[float]):
    """Micro-batches rolled out by the teacher as they are needed; `clock[0]` accumulates rollout time."""
    from pipeline.storage import table_to_tensors
    from pipeline.stage_loop import train_columns
    from pipeline.trajectories import compute_rows

    rng = np.random.default_rng(seed)
    n = len(enc["id"])
    while True:
        items = [(int(r), int(d)) for r, d in zip(rng.choice(n, bs, replace=False), rng.integers(0, draws, bs))]
        t0 = time.perf_counter()
        table = next(compute_rows(teacher, enc, items, seed, bs, out_dtype=np.float32))
        b = _tensor_batch(table_to_tensors(table, train_columns(table.column_names)), np.arange(bs))
        clock[0] += time.perf_counter() - t0
        yield b


def run_arm(loop, phase, batches, steps: int, disc_steps: int) -> float:
    """Seconds for `steps` student updates of `phase` fed by `batches` (the trainer's inner loop)."""
    extra = disc_steps - 1 if phase.adversarial else 0
    t0 = time.perf_counter()
    for _ in range(steps):
        d_batches = [next(batches) for _ in range(extra)]
        loop.micro_step(phase, next(batches), d_batches)
    return time.perf_counter() - t0


def measure_stage(cfg, key, steps: int, reps: int, warmup: int, seed: int) -> dict:
    from pipeline.storage import RunStorage
    from pipeline.phases import phase_at, plan_phases
    from pipeline.stage_loop import train_columns
    from pipeline.trajectories import ENCODED_COLUMNS, Teacher, step_name

    idx, stage = cfg.stage(key)
    storage = RunStorage.from_config(cfg)
    bs = cfg.train.micro_batch
    traj_manifest = storage.read_manifest(step_name(cfg, key))
    traj = read_columns(storage, f"{cfg.stage_dir(key)}/traj", train_columns(traj_manifest["outputs"]["columns"]))
    enc = read_columns(storage, "encoded", [c for c in ENCODED_COLUMNS
                                            if c in storage.read_manifest("encode")["outputs"]["columns"]])
    teacher = Teacher.load(cfg, key, storage)
    loop = make_loop(cfg, key, {}, seed)
    phases = plan_phases(stage)
    # the stage's longest phase after the x0 conversion, the models built as the trainer builds them
    phase = max((p for p in phases if p.name != "conversion"), key=lambda p: p.end - p.start)
    gen = offline_batches(traj, bs, seed)
    for s in range(phase.start + 1):
        loop.transition(s, lambda: next(gen))
    assert phase_at(phases, phase.start) is phase
    clock = [0.0]
    arms = {"offline": offline_batches(traj, bs, seed + 1),
            "in-loop": inloop_batches(teacher, enc, bs, seed + 2, cfg.trajectories.draws, clock)}
    for name, batches in arms.items():  # warm-up, not timed
        run_arm(loop, phase, batches, warmup, stage.disc_steps)
    times: dict[str, list[float]] = {k: [] for k in arms}
    rollout: list[float] = []
    for _ in range(reps):
        for name, batches in arms.items():
            clock[0] = 0.0
            times[name].append(run_arm(loop, phase, batches, steps, stage.disc_steps))
            if name == "in-loop":
                rollout.append(clock[0])
    per_update = 1 + (stage.disc_steps - 1 if phase.adversarial else 0)
    samples = steps * bs * per_update
    off, inl = statistics.median(times["offline"]), statistics.median(times["in-loop"])
    # precompute: the same rollouts as the trajectories step batches them (a window of micro_batch rows per
    # timestep pair), timed on as many rows as one timed in-loop run rolled out
    from pipeline.trajectories import compute_rows

    rng = np.random.default_rng(seed + 3)
    items = [(int(r), int(d)) for r, d in zip(rng.integers(0, len(enc["id"]), samples),
                                              rng.integers(0, cfg.trajectories.draws, samples))]
    t0 = time.perf_counter()
    for _ in compute_rows(teacher, enc, items, seed, bs, out_dtype=np.float32):
        pass
    rows_per_s_precompute = samples / (time.perf_counter() - t0)
    updates = sum(p.end - p.start for p in phases)
    n_rows = len(traj["t"])
    offline_total = updates * off / steps + n_rows / rows_per_s_precompute
    inloop_total = updates * inl / steps
    return {
        "stage": idx, "name": stage.name, "phase": phase.name, "teacher_steps": stage.teacher_steps,
        "guidance_scale": stage.guidance_scale, "micro_batch": bs, "rows_per_update": bs * per_update,
        "steps_timed": steps, "reps": reps,
        "offline_s": times["offline"], "inloop_s": times["in-loop"], "inloop_rollout_s": rollout,
        "precompute_rows_per_s": rows_per_s_precompute,
        "offline_samples_per_s": samples / off, "inloop_samples_per_s": samples / inl,
        "training_speedup": inl / off,
        "stage_updates": updates, "stage_rows": n_rows,
        "offline_total_s": offline_total, "inloop_total_s": inloop_total,
        "total_cost_ratio": inloop_total / offline_total,
    }


def markdown(res: dict) -> str:
    lines = [
        "# Offline trajectories vs the teacher in the training loop",
        "",
        f"Config `{res['config']}`, one process, {res['threads']} torch threads; {res['steps']} student updates "
        f"per timed run, {res['reps']} runs per arm alternating, medians. Samples/s count every micro-batch a "
        "student update consumes (D's extra ones included). Total: the stage's own updates; offline adds one "
        "precompute pass over the stage's rows at the precompute speed measured here (`compute_rows` in the "
        "trajectories step's batching).",
        "",
        "| stage | phase | teacher steps (CFG) | offline samples/s | in-loop samples/s | training speedup | "
        "stage total offline (s) | stage total in-loop (s) | total ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["stages"]:
        cfg_note = f" (CFG {r['guidance_scale']:g})" if r["guidance_scale"] > 1 else ""
        lines.append(f"| {r['stage']} {r['name']} | {r['phase']} | {r['teacher_steps']}{cfg_note} | "
                     f"{r['offline_samples_per_s']:.0f} | {r['inloop_samples_per_s']:.0f} | "
                     f"**{r['training_speedup']:.2f}x** | {r['offline_total_s']:.0f} | {r['inloop_total_s']:.0f} | "
                     f"{r['total_cost_ratio']:.2f}x |")
    lines += ["", "Spread: " + "; ".join(
        f"stage {r['stage']} offline {min(r['offline_s']):.1f}-{max(r['offline_s']):.1f} s, in-loop "
        f"{min(r['inloop_s']):.1f}-{max(r['inloop_s']):.1f} s" for r in res["stages"]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    from pipeline.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="runs/bench/toy_digits-s0/config.yaml",
                   help="a run's config whose encode and trajectories steps have finished")
    p.add_argument("--stages", type=int, nargs="+", default=None, help="stage indices (default: all)")
    p.add_argument("--steps", type=int, default=10, help="student updates per timed run")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "offline_cost"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config)
    keys = a.stages or list(range(1, len(cfg.stages) + 1))
    res = {"config": a.config, "threads": a.threads, "steps": a.steps, "reps": a.reps, "stages": [],
           "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                       "torch": torch.__version__}}
    for k in keys:
        r = measure_stage(cfg, k, a.steps, a.reps, a.warmup, a.seed)
        print(f"[offline-cost] stage {r['stage']} {r['name']} ({r['phase']}): offline {r['offline_samples_per_s']:.0f} "
              f"samples/s, in-loop {r['inloop_samples_per_s']:.0f} -> {r['training_speedup']:.2f}x; stage total "
              f"{r['total_cost_ratio']:.2f}x", flush=True)
        res["stages"].append(r)
    write_report(a.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
