"""`padistill trajectories`: Ray Data: teacher rollouts of one stage, as Parquet under <root>/stages/<k>-<name>/traj/."""

from __future__ import annotations

import sys

from jobs.common import add_config_args, job_main, not_built

NAME = "trajectories"
HELP = "Ray Data: teacher rollouts of one stage, as Parquet under <root>/stages/<k>-<name>/traj/"


def add_arguments(p) -> None:
    add_config_args(p)
    p.add_argument("--stage", required=True, help="stage index (1-based) or name")


def run(args) -> int:
    return not_built(NAME, 4)


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
