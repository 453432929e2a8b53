"""`padistill encode`: Ray Data: images and captions to VAE latents and text embeddings, as Parquet under <root>/encoded/."""

from __future__ import annotations

import sys

from jobs.common import add_config_args, job_main, not_built

NAME = "encode"
HELP = "Ray Data: images and captions to VAE latents and text embeddings, as Parquet under <root>/encoded/"


def add_arguments(p) -> None:
    add_config_args(p)


def run(args) -> int:
    return not_built(NAME, 4)


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
