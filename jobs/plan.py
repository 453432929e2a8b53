"""`padistill plan`: capacity plan: parameter counts, per-GPU memory under ZeRO, trajectory storage, GPU-hours.

The models are built on the meta device (no weights are read, nothing is downloaded); see pipeline/plan.py and pipeline/meta_models.py."""

from __future__ import annotations

import sys

from jobs.common import add_config_args, config_from_args, job_main

NAME = "plan"
HELP = "capacity plan: parameter counts, per-GPU memory under ZeRO, trajectory storage, GPU-hours"


def add_arguments(p) -> None:
    add_config_args(p)
    p.add_argument("--gpus", type=int, default=None, help="GPU count (default: train.workers)")
    p.add_argument("--micro-batch", type=int, default=None, help="per-GPU micro-batch (default: train.micro_batch)")
    p.add_argument("--samples", type=int, default=None,
                   help="trajectory rows per draw (default: data.limit, else 1,000,000)")
    p.add_argument("--throughput", type=float, default=None,
                   help="measured training samples/s/GPU for the GPU-hours (default: derived from the "
                        "measured FLOPs at --peak-tflops x --mfu)")
    p.add_argument("--rollout-throughput", type=float, default=None,
                   help="teacher UNet evaluations/s/GPU for the precompute GPU-hours")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU for the 'fits' columns (default 80)")
    p.add_argument("--peak-tflops", type=float, default=312.0,
                   help="GPU peak TFLOP/s at the run's precision (default 312: A100 bf16)")
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation for the derived throughput "
                                                           "(default 0.35)")
    p.add_argument("--eval-prompts", type=int, default=None,
                   help="evaluation images per model for the evaluation GPU-hours (default: evaluate.prompts; "
                        "the paper's protocol: 10000 COCO prompts)")
    p.add_argument("--other-bases", action="store_true",
                   help="also count the denoisers of SD1.5, SD3.5-Medium and SD3.5-Large on the meta device "
                        "(their published configs; to plan a run on one, set model.base: sd-1.5, sd3.5-medium or "
                        "sd3.5-large, as configs/sd15_lightning.yaml and sd35_*_lightning.yaml do)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")


def run(args) -> int:
    from pipeline import plan

    cfg = config_from_args(args)
    for flag in ("gpus", "micro_batch", "samples", "eval_prompts"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            print(f"padistill plan: --{flag.replace('_', '-')} must be positive (got {v})", file=sys.stderr)
            return 2
    p = plan.make_plan(cfg, gpus=args.gpus, micro_batch=args.micro_batch, samples=args.samples,
                       throughput=args.throughput, rollout_throughput=args.rollout_throughput,
                       gpu_memory_gib=args.gpu_memory, peak_tflops=args.peak_tflops, mfu=args.mfu,
                       eval_prompts=args.eval_prompts, other_bases=args.other_bases, config_name=args.config or cfg.name)
    print(plan.to_json(p) if args.json else plan.render(p))
    return 0


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
