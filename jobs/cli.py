"""The `padistill` console script: one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module in jobs/
JOBS = {
    "config": "jobs.show_config",
    "toy-teacher": "jobs.toy_teacher",
    "encode": "jobs.encode",
    "trajectories": "jobs.trajectories",
    "train-stage": "jobs.train_stage",
    "evaluate": "jobs.evaluate",
    "export": "jobs.export",
    "distill": "jobs.distill",
    "submit": "jobs.submit",
    "status": "jobs.job_status",
    "logs": "jobs.job_logs",
    "plan": "jobs.plan",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="padistill",
        description="Progressive adversarial diffusion distillation (SDXL-Lightning) on Ray.",
        epilog="Each job also runs as `python -m jobs.<module> …`, e.g. under `ray job submit`.",
    )
    sub = p.add_subparsers(dest="job", metavar="JOB", required=True)
    for name, modname in JOBS.items():
        mod = importlib.import_module(modname)
        sp = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(sp)
        sp.set_defaults(_module=mod)
    return p


def main(argv: list[str] | None = None) -> int:
    from jobs.common import run_job

    args = parser().parse_args(argv)
    return run_job(args._module, args)


if __name__ == "__main__":
    sys.exit(main())
