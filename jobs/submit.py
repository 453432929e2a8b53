"""`padistill submit`: submit the distill job to a Ray cluster through the Job Submission API."""

from __future__ import annotations

import sys

from jobs.common import add_config_args, job_main

NAME = "submit"
HELP = "submit the distill job to a Ray cluster through the Job Submission API"


def add_arguments(p) -> None:
    p.add_argument("--address", required=True, help="the head's dashboard address, e.g. http://HEAD:8265")
    add_config_args(p)
    p.add_argument("--until", default=None, metavar="STAGE", help="passed to distill: stop after this stage")
    p.add_argument("--allow-local-root", action="store_true",
                   help="accept a local run_root (only sensible for a one-node cluster)")
    p.add_argument("--submission-id", default=None, help="a job id of your choosing (default: generated)")


def run(args) -> int:
    from pipeline.submit import submit

    job_id = submit(args.address, args.config, args.overrides, until=args.until,
                    allow_local_root=args.allow_local_root,
                    submission_id=args.submission_id)
    print(f"submitted {job_id}")
    print(f"  status: padistill status --address {args.address} {job_id}")
    print(f"  logs:   padistill logs --address {args.address} --follow {job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
