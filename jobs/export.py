"""`padistill export`: export a stage's student (from its latest or a given checkpoint)."""

from __future__ import annotations

import sys

from jobs.common import add_config_args, config_from_args, job_main

NAME = "export"
WRITES_RUN_ROOT = True  # holds the run root's lease while it runs (pipeline.lease)
HELP = ("export a stage's student as a diffusers pipeline folder (<root>/stages/<k>-<name>/model/, with "
        "padistill.json and, for LoRA students, the LoRA file) from its latest or a given checkpoint")


def add_arguments(p) -> None:
    add_config_args(p)
    p.add_argument("--stage", required=True, help="stage index (1-based) or name")
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder of the stage (default: the latest)")


def run(args) -> int:
    from pipeline.export import run_export

    run_export(config_from_args(args), args.stage, args.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
