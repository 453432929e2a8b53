"""`padistill distill`: the whole run as a resumable DAG: encode, per stage trajectories, train, export, evaluate, report."""

from __future__ import annotations

import sys

from jobs.common import add_config_args, job_main, not_built

NAME = "distill"
HELP = "the whole run as a resumable DAG: encode, per stage trajectories, train, export, evaluate, report"


def add_arguments(p) -> None:
    add_config_args(p)


def run(args) -> int:
    return not_built(NAME, 6)


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
