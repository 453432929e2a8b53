"""`padistill config`: validate a run config and print it resolved (defaults and --set applied)."""

from __future__ import annotations

import sys

from jobs.common import add_config_args, config_from_args, job_main

NAME = "config"
HELP = "validate a run config and print it resolved (defaults and --set overrides applied)"


def add_arguments(p) -> None:
    add_config_args(p)


def run(args) -> int:
    print(config_from_args(args).to_yaml(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
