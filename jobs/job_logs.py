"""`padistill logs JOB`: the logs of a submitted job, optionally followed until it ends."""

from __future__ import annotations

import asyncio
import sys

from jobs.common import job_main

NAME = "logs"
HELP = "print (or --follow) the logs of a submitted job"


def add_arguments(p) -> None:
    p.add_argument("job_id", help="the id `padistill submit` printed")
    p.add_argument("--address", required=True, help="the head's dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--follow", "-f", action="store_true", help="stream new lines until the job ends")


def run(args) -> int:
    from pipeline.submit import follow, logs

    if not args.follow:
        print(logs(args.address, args.job_id), end="")
        return 0

    async def _tail():
        async for chunk in follow(args.address, args.job_id):
            print(chunk, end="", flush=True)

    asyncio.run(_tail())
    return 0


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
