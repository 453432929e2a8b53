"""`padistill evaluate`: sample students and teacher with fixed prompts and seeds, score them, write grids."""

from __future__ import annotations

import sys

from jobs.common import add_config_args, job_main, not_built

NAME = "evaluate"
HELP = "sample students and teacher with fixed prompts and seeds, score them, write grids"


def add_arguments(p) -> None:
    add_config_args(p)


def run(args) -> int:
    return not_built(NAME, 6)


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
