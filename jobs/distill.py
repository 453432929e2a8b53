"""`padistill distill`: the whole run as a resumable DAG (encode, per stage trajectories and training,
evaluation beside the next stage's precompute, report). Rerun the same command to resume."""

from __future__ import annotations

import sys

from jobs.common import add_config_args, config_from_args, job_main

NAME = "distill"
WRITES_RUN_ROOT = True  # holds the run root's lease while it runs (pipeline.lease)
HELP = ("the whole run as a resumable DAG: encode, per stage trajectories -> train -> export, evaluation, "
        "report; rerunning the same command skips finished steps and resumes the interrupted one")


def add_arguments(p) -> None:
    add_config_args(p)
    p.add_argument("--until", default=None, metavar="STAGE", help="stop after this stage (index or name)")
    p.add_argument("--only", default=None, metavar="STEP",
                   help="run one step: encode, traj-K, train-K, eval-K or report (every step upstream of it must be "
                        "finished with these settings; else it names them)")


def run(args) -> int:
    from pipeline.dag import run_dag
    from pipeline.storage import RunStorage

    cfg = config_from_args(args)
    run_dag(cfg, until=args.until, only=args.only)
    import ray

    ray.shutdown()  # flush and stop the workers' log streams, so the table below is the last thing printed
    storage = RunStorage.from_config(cfg)
    if storage.exists("report.md"):
        print(f"\nreport: {storage.url('report.md')}\n")
        text = storage.read_text("report.md")
        start = text.find("| model |")
        if start >= 0:
            print(text[start:].split("\n\n")[0])
    return 0


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
