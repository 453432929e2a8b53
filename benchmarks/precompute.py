"""Precompute benchmark: trajectory rows/s through Ray Data (`padistill trajectories`) vs a bare
single-process torch loop over the same rows, and stored bytes per row vs the raw fp16 tensor bytes.

Both sides do the same work end to end on the same encoded rows: load the teacher, read the encoded
Parquet, roll out every (row, draw) with the same batch size and torch threads, write Parquet. The
Ray Data side also starts its actor pool and commits units and the manifest (Ray itself is started
before timing, as on a cluster). Repetitions alternate the two sides; medians are reported.

    .venv/bin/python benchmarks/precompute.py [--config toy_digits --limit 1600 --draws 8 --stage 1 --reps 2 --files 4]

The default size (12,800 rows, ~100 s of rollouts) keeps Ray's fixed start-up (actor processes import
torch and diffusers and load the teacher: ~6 s) from dominating; at 1,024 rows of the smoke config it
does (`--config smoke --limit 512 --draws 2`: 0.57x on 2026-11-24, results/precompute_smoke.json).

The Ray Data side runs as `padistill trajectories` does by default (`trajectories.actors: auto`: one
single-threaded actor per CPU); the rows are split into `--files` output files (units), so that every
actor has work. The bare loop is one process using every CPU through torch's threads.

Targets (issue 4): Ray Data >= 0.9x the bare loop's rows/s; stored bytes <= 1.1x raw fp16 bytes.
Writes benchmarks/results/precompute.json.
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
from results_io import write_result

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.cluster import quiet_driver  # noqa: E402

quiet_driver()  # before Ray is imported: Ray's known-harmless lines off the console


def bare_loop(cfg, stage: int, out_dir: str, threads: int) -> tuple[int, float]:
    """The same rollouts in this process with no Ray: read encoded/, compute, write one Parquet file."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from pipeline import trajectories as tj
    from pipeline.storage import RunStorage, table_to_tensors

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    st = RunStorage.from_config(cfg)
    teacher = tj.Teacher.load(cfg, stage, st)
    rows = table_to_tensors(st.read_table("encoded", columns=tj.ENCODED_COLUMNS))
    R = cfg.trajectories.draws
    items = [(i, d) for i in range(len(rows["id"])) for d in range(R)]
    writer, n = None, 0
    path = os.path.join(out_dir, "bare.parquet")
    for t in tj.compute_rows(teacher, rows, items, cfg.trajectories.seed, cfg.trajectories.batch_size, np.float16):
        if writer is None:
            writer = pq.ParquetWriter(path, t.schema, compression="snappy", use_dictionary=False)
        writer.write_table(t)
        n += t.num_rows
    writer.close()
    return n, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="toy_digits")
    ap.add_argument("--limit", type=int, default=1600, help="encoded rows (digits)")
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--stage", default="1")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--files", type=int, default=4, help="output files (units) the rows are split into")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "precompute.json"))
    args = ap.parse_args(argv)

    import ray

    from pipeline import cluster
    from pipeline import encode as enc
    from pipeline import trajectories as tj
    from pipeline.config import load_config

    tmp = tempfile.mkdtemp(prefix="padistill-bench-")
    cfg = load_config(args.config, [f"run_root={tmp}/run", f"data.limit={args.limit}",
                                    f"trajectories.draws={args.draws}", "trajectories.dtype=float16",
                                    f"trajectories.max_rows_per_file={-(-args.limit * args.draws // args.files)}",
                                    "trajectories.gpus_per_actor=0",
                                    f"ray.num_cpus={args.cpus}"])
    cluster.init_local(args.cpus, log_to_driver=False)
    quiet = lambda *a, **k: None  # noqa: E731
    enc.run_encode(cfg, log=quiet)
    k, stage = cfg.stage(args.stage)

    ray_rates, bare_rates, manifest = [], [], None
    for rep in range(args.reps):
        n, secs = bare_loop(cfg, k, tmp, args.cpus)
        bare_rates.append(n / secs)
        t0 = time.perf_counter()
        manifest = tj.run_trajectories(cfg, k, force=True, log=quiet)
        secs_ray = time.perf_counter() - t0
        ray_rates.append(manifest["outputs"]["rows"] / secs_ray)
        print(f"rep {rep}: bare {n} rows in {secs:.1f} s, Ray Data {manifest['outputs']['rows']} rows in "
              f"{secs_ray:.1f} s", flush=True)
    ray.shutdown()

    out = manifest["outputs"]
    ray_rps, bare_rps = statistics.median(ray_rates), statistics.median(bare_rates)
    stored, raw = out["bytes_per_row"], out["raw_tensor_bytes_per_row"]
    result = {
        "config": args.config, "stage": k, "stage_name": stage.name,
        "teacher_steps_per_row": stage.jump, "guidance_scale": stage.guidance_scale,
        "rows": out["rows"], "encoded_rows": args.limit, "draws": args.draws, "reps": args.reps, "cpus": args.cpus,
        "ray_data_rows_per_s": ray_rps, "bare_loop_rows_per_s": bare_rps, "throughput_ratio": ray_rps / bare_rps,
        "ray_data_rows_per_s_all": ray_rates, "bare_loop_rows_per_s_all": bare_rates,
        "stored_bytes_per_row": stored, "raw_fp16_tensor_bytes_per_row": raw, "bytes_ratio": stored / raw,
        "embedding_bytes_per_row": out["embedding_bytes_per_row"], "files": len(out["files"]),
        "actors": cfg.trajectories.actors,
        "targets": {"throughput_ratio_min": 0.9, "bytes_ratio_max": 1.1},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "loadavg_at_end": os.getloadavg()},
    }
    result["meets_targets"] = result["throughput_ratio"] >= 0.9 and result["bytes_ratio"] <= 1.1
    print()
    print(f"{'':34s}{'Ray Data':>14s}{'bare loop':>14s}{'ratio':>8s}{'target':>10s}")
    print(f"{'trajectory rows/s':34s}{ray_rps:14.2f}{bare_rps:14.2f}{ray_rps / bare_rps:8.2f}{'>= 0.90':>10s}")
    print(f"{'':34s}{'stored':>14s}{'raw fp16':>14s}")
    print(f"{'bytes per row':34s}{stored:14.0f}{raw:14d}{stored / raw:8.2f}{'<= 1.10':>10s}")
    print(f"\n{out['rows']} rows (stage {k} {stage.name}: {stage.jump} teacher steps/row, guidance "
          f"{stage.guidance_scale}), {args.cpus} CPUs, load average at end {os.getloadavg()[0]:.1f}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
