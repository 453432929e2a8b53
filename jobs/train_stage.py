"""`padistill train-stage`: Ray Train + DeepSpeed: train one stage's student from its trajectories.

Rerunning the same command resumes from the stage's latest checkpoint. At the end the student is
exported to `<root>/stages/<k>-<name>/model/` and the step's manifest is committed; the last line of
stdout is a JSON summary (`PADISTILL_TRAIN_SUMMARY {...}`)."""

from __future__ import annotations

import json
import sys

from jobs.common import add_config_args, config_from_args, job_main

NAME = "train-stage"
WRITES_RUN_ROOT = True  # holds the run root's lease while it runs (pipeline.lease)
HELP = "Ray Train + DeepSpeed: train one stage's student from its trajectories"
SUMMARY_PREFIX = "PADISTILL_TRAIN_SUMMARY "


def add_arguments(p) -> None:
    add_config_args(p)
    p.add_argument("--stage", required=True, help="stage index (1-based) or name")
    p.add_argument("--held-rows", type=int, default=None,
                   help="trajectory rows held out of training for the held metrics (default: train.held_rows)")
    p.add_argument("--no-export", action="store_true", help="train only: no model/ export, no manifest")


def run(args) -> int:
    from pipeline.cluster import ensure_ray
    from pipeline.storage import RunStorage
    from pipeline.train import train_stage
    from pipeline.train_data import finished_trajectories

    cfg = config_from_args(args)
    cfg.stage(args.stage)  # a clear error for an unknown stage before anything starts
    finished_trajectories(cfg, args.stage, RunStorage.from_config(cfg))  # and for missing inputs
    ensure_ray(cfg)
    summary = train_stage(cfg, args.stage, held_rows=args.held_rows, export=not args.no_export)
    print(SUMMARY_PREFIX + json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
