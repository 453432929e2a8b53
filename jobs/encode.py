"""`padistill encode`: Ray Data: images and captions to VAE latents and text embeddings, as Parquet under <root>/encoded/."""

from __future__ import annotations

import sys

from jobs.common import add_config_args, config_from_args, job_main

NAME = "encode"
WRITES_RUN_ROOT = True  # holds the run root's lease while it runs (pipeline.lease)
HELP = "Ray Data: images and captions to VAE latents and text embeddings, as Parquet under <root>/encoded/"


def add_arguments(p) -> None:
    add_config_args(p)
    p.add_argument("--force", action="store_true",
                   help="recompute everything, even committed units and a finished step")


def run(args) -> int:
    from pipeline.encode import run_encode

    run_encode(config_from_args(args), force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
