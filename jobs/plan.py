"""`padistill plan`: capacity plan: parameter counts, per-GPU memory under ZeRO, trajectory storage, GPU-hours."""

from __future__ import annotations

import sys

from jobs.common import add_config_args, job_main, not_built

NAME = "plan"
HELP = "capacity plan: parameter counts, per-GPU memory under ZeRO, trajectory storage, GPU-hours"


def add_arguments(p) -> None:
    add_config_args(p)


def run(args) -> int:
    return not_built(NAME, 7)


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
