"""`padistill train-stage`: Ray Train + DeepSpeed: train one stage's student from its trajectories."""

from __future__ import annotations

import sys

from jobs.common import add_config_args, job_main, not_built

NAME = "train-stage"
HELP = "Ray Train + DeepSpeed: train one stage's student from its trajectories"


def add_arguments(p) -> None:
    add_config_args(p)
    p.add_argument("--stage", required=True, help="stage index (1-based) or name")


def run(args) -> int:
    return not_built(NAME, 5)


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
