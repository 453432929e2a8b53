"""Shared plumbing of the job entry points: config arguments, errors, `python -m jobs.X` mains."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from pipeline.config import RunConfig, load_config
from pipeline.errors import user_error


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, metavar="PATH|NAME",
                   help="run config YAML, or the name of one in configs/ (default: toy_digits)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.workers=2 --set stages.0.lr=1e-5 "
                        "(repeatable; values are parsed as YAML)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)


def not_built(job: str, issue: int) -> int:
    """The honest answer of a job whose implementation has not landed yet."""
    print(f"padistill {job}: not implemented yet in this version (tracked as issue #{issue}); "
          f"nothing was run.", file=sys.stderr)
    return 2


def run_job(module: ModuleType, args: argparse.Namespace) -> int:
    """Run a job; a user's mistake (pipeline.errors) prints one line and returns 2, a bug raises. A job
    that writes a run root (`WRITES_RUN_ROOT`) holds the root's lease while it runs: a second run on the
    same root stops with one line naming the first."""
    try:
        if getattr(module, "WRITES_RUN_ROOT", False):
            from pipeline.lease import RunLease
            from pipeline.storage import RunStorage

            cfg = config_from_args(args)
            with RunLease(RunStorage.from_config(cfg), module.NAME, cfg.storage.lease_timeout_s):
                return int(module.run(args) or 0)
        return int(module.run(args) or 0)
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        print(f"padistill {module.NAME}: {err}", file=sys.stderr)
        return 2


def job_main(module: ModuleType, argv: list[str] | None = None) -> int:
    """`python -m jobs.X …` (also what `ray job submit -- python -m jobs.X` runs)."""
    p = argparse.ArgumentParser(prog=f"python -m {getattr(module.__spec__, 'name', module.__name__)}", description=module.HELP)
    module.add_arguments(p)
    return run_job(module, p.parse_args(argv))
