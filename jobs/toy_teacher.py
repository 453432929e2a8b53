"""`padistill toy-teacher`: train the embedded toy teacher (miniature SDXL on handwritten digits) and export it."""

from __future__ import annotations

import sys

from jobs.common import add_config_args, job_main, not_built

NAME = "toy-teacher"
HELP = "train the embedded toy teacher (miniature SDXL on handwritten digits) and export it"


def add_arguments(p) -> None:
    add_config_args(p)


def run(args) -> int:
    return not_built(NAME, 3)


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
