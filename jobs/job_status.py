"""`padistill status JOB`: the status of a submitted job."""

from __future__ import annotations

import sys

from jobs.common import job_main

NAME = "status"
HELP = "print the status of a submitted job (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)"


def add_arguments(p) -> None:
    p.add_argument("job_id", help="the id `padistill submit` printed")
    p.add_argument("--address", required=True, help="the head's dashboard address, e.g. http://HEAD:8265")


def run(args) -> int:
    from pipeline.submit import status

    st = status(args.address, args.job_id)
    print(st)
    return 0 if st in ("SUCCEEDED", "RUNNING", "PENDING") else 1


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
