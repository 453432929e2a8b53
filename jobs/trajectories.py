"""`padistill trajectories`: Ray Data: teacher rollouts of one stage, as Parquet under <root>/stages/<k>-<name>/traj/."""

from __future__ import annotations

import sys

from jobs.common import add_config_args, config_from_args, job_main

NAME = "trajectories"
WRITES_RUN_ROOT = True  # holds the run root's lease while it runs (pipeline.lease)
HELP = "Ray Data: teacher rollouts of one stage, as Parquet under <root>/stages/<k>-<name>/traj/"


def add_arguments(p) -> None:
    add_config_args(p)
    p.add_argument("--stage", required=True, help="stage index (1-based) or name")
    p.add_argument("--force", action="store_true",
                   help="recompute everything, even committed units and a finished step")


def run(args) -> int:
    from pipeline.trajectories import run_trajectories

    cfg = config_from_args(args)
    cfg.stage(args.stage)  # a clear error for an unknown stage before anything starts
    run_trajectories(cfg, args.stage, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
