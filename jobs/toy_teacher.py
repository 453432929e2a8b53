"""`padistill toy-teacher`: train an embedded toy teacher (a miniature SDXL, or SD1.5 or SD3 with
toy_teacher.family, on the config's data.kind: handwritten digits or Fashion-MNIST) and export it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jobs.common import add_config_args, job_main

NAME = "toy-teacher"
HELP = ("train an embedded toy teacher (a miniature SDXL, or SD1.5 / SD3 with --config toy_fashion_sd15 / "
        "toy_fashion_sd3 or --set toy_teacher.family=sd15 / sd3, on the config's data: digits, or Fashion-MNIST "
        "with --config toy_fashion) and export it")


def add_arguments(p) -> None:
    add_config_args(p)
    p.add_argument("--output", "-o", default=None,
                   help="pipeline folder to write (default for the full preset: pipeline/assets/toy_teacher, or "
                        "pipeline/assets/toy_fashion_teacher for Fashion-MNIST, with _sd15 / _sd3 appended for an "
                        "SD1.5 / SD3 teacher; <run_root>/toy_teacher (toy_teacher_sd15, toy_teacher_sd3) for smoke)")
    p.add_argument("--work-dir", default=None, help="keep Ray Train storage and checkpoints here (default: temporary); "
                   "rerunning with the same folder reuses its trained VAE and resumes the UNet (SD3: transformer) from its last "
                   "checkpoint")
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers")
    p.add_argument("--cpus-per-worker", type=int, default=None)
    p.add_argument("--vae-from", default=None, metavar="DIR",
                   help="skip VAE training: reuse <work-dir>/vae_state of an earlier run, or the VAE of an exported "
                        "toy teacher folder (e.g. pipeline/assets/toy_fashion_teacher)")


def run(args) -> int:
    from pipeline.config import load_config
    from pipeline.toy_teacher import from_run_config, train_toy_teacher

    flags = {"output": args.output, "vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
             "workers": args.workers, "cpus_per_worker": args.cpus_per_worker}
    # the flags are the toy_teacher section's keys, and win over it (a JSON string keeps a path a string)
    cfg = load_config(args.config, [*args.overrides, *(f"toy_teacher.{k}={json.dumps(v)}"
                                                       for k, v in flags.items() if v is not None)])
    tc, output = from_run_config(cfg)
    summary = train_toy_teacher(output, tc, work_dir=args.work_dir, resolution=cfg.model.resolution,
                                holdout_fraction=cfg.data.holdout_fraction, data_seed=cfg.data.seed,
                                ray_address=cfg.ray.address, ray_num_cpus=cfg.ray.num_cpus, vae_from=args.vae_from)
    print(f"padistill {NAME}: wrote {output} in {summary['total_seconds'] / 60:.1f} min "
          f"(final UNet loss {summary['final_unet_loss']:.4f}); loss curves in {Path(output) / 'loss_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
