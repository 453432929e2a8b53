"""Does another diffusers sampler make a toy teacher's samples sharper? The teacher's exported folder sampled by
the stock `StableDiffusionXLPipeline` (no padistill sampling code) with each named diffusers scheduler, trailing
timesteps, at the folder's recommended steps (or `--steps`) and guidance, 50 prompts a class from the benchmarks'
own fixed noise (`sampling.fixed_noise`, the latents `benchmarks/toy_teacher.py` starts from at the same seed),
scored by every toy metric of the teacher's dataset. `EulerDiscreteScheduler` is the control: padistill's own sampler
(`Schedule.sample`) takes the same Euler steps, so its row reads as `benchmarks/toy_teacher.py`'s at that seed.

    python benchmarks/teacher_sampler.py --source builtin:toy_fashion_teacher \\
        --schedulers EulerDiscreteScheduler,EulerAncestralDiscreteScheduler,DPMSolverMultistepScheduler
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import write_report  # noqa: E402

COLUMNS = ("fd", "fd_patch", "prompt_accuracy", "diversity", "sharpness")


def scheduler_classes(names: list[str]) -> list:
    """The diffusers scheduler classes named, or SystemExit naming the first that is not one."""
    import diffusers

    out = []
    for name in names:
        cls = getattr(diffusers, name, None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
            raise SystemExit(f"teacher_sampler: --schedulers: {name!r} is not a diffusers scheduler class")
        out.append(cls)
    return out


def stock_samples(pipe, info: dict, scheduler, per_class: int, seed: int):
    """Images [10 * per_class, 3, R, R] in [-1, 1], class-major, from the stock pipeline with `scheduler` (a class;
    trailing timesteps) at the folder's steps and guidance (`info`: its padistill.json), starting from
    `fixed_noise` (the latents `sampling.sample_classes` starts from); a stochastic scheduler's per-step noise comes
    from a generator seeded seed + k for class k."""
    import torch

    from pipeline.data import toy_dataset
    from pipeline.sampling import fixed_noise, latent_shape

    ds = toy_dataset(info.get("dataset", "toy_digits"))
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    noise = fixed_noise(per_class, seed, latent_shape(pipe))
    res = int(info.get("resolution", 32))
    images = []
    for k in range(10):
        out = pipe([ds.caption_for(k)] * per_class, num_inference_steps=int(info.get("num_inference_steps", 32)),
                   guidance_scale=float(info.get("guidance_scale", 0.0)),
                   latents=noise[k * per_class:(k + 1) * per_class], generator=torch.Generator().manual_seed(seed + k),
                   output_type="pt", height=res, width=res).images
        images.append(out * 2 - 1)  # the pipeline's [0, 1] back to the metrics' [-1, 1]
    return torch.cat(images).float().clamp(-1, 1)


def sample_with(source: str, schedulers: list[str], per_class: int, seed: int, steps: int | None = None) -> dict:
    from diffusers import StableDiffusionXLPipeline

    from pipeline import metrics
    from pipeline.zoo import read_info, resolve_source

    classes = scheduler_classes(schedulers)  # before the pipeline loads: a typo costs nothing
    folder = resolve_source(source)
    info = read_info(folder)
    if steps is not None:  # instead of the folder's recommended steps
        info = {**info, "num_inference_steps": steps}
    dataset = info.get("dataset", "toy_digits")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    labels = [k for k in range(10) for _ in range(per_class)]
    rows = []
    for name, cls in zip(schedulers, classes):
        t0 = time.time()
        s = metrics.score(stock_samples(pipe, info, cls, per_class, seed), labels, dataset=dataset)
        rows.append({"scheduler": name, "seconds": round(time.time() - t0, 1), **s})
        print(f"[teacher-sampler] {name}: " + ", ".join(f"{c} {s[c]:.3f}" for c in COLUMNS), flush=True)
    return {"source": source, "dataset": dataset,
            "steps": int(info.get("num_inference_steps", 32)), "guidance_scale": float(info.get("guidance_scale", 0.0)),
            "per_class": per_class, "seed": seed, "rows": rows,
            "notes": "seconds: each scheduler's sampling and scoring; the first includes warm-up"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="a teacher folder or builtin: name (SDXL family)")
    p.add_argument("--schedulers", default="EulerDiscreteScheduler,EulerAncestralDiscreteScheduler",
                   help="diffusers scheduler classes, comma-separated (default: Euler, the control, and Euler "
                        "ancestral)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the folder's recommended steps)")
    p.add_argument("--per-class", type=int, default=50, help="samples a class (default 50)")
    p.add_argument("--seed", type=int, default=1234, help="the fixed noise's seed (default 1234, as toy_teacher.py)")
    p.add_argument("--out", help="output path without extension (default benchmarks/results/teacher_sampler_<data>, "
                                  "<data> fashion or digits)")
    args = p.parse_args(argv)
    if args.per_class < 1:
        p.error(f"--per-class: at least 1, got {args.per_class}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps: at least 1, got {args.steps}")
    names = [s.strip() for s in args.schedulers.split(",") if s.strip()]
    result = sample_with(args.source, names, args.per_class, args.seed, args.steps)
    short = "fashion" if result["dataset"] == "fashion_mnist" else "digits"
    out = args.out or str(Path(__file__).resolve().parent / "results" / f"teacher_sampler_{short}")
    md = [f"# {result['source']} sampled by the stock diffusers pipeline with other schedulers", "",
          f"{result['steps']} steps (trailing), guidance {result['guidance_scale']}, {result['per_class']} samples "
          f"a class from the benchmarks' fixed noise (seed {result['seed']}: the latents toy_teacher.py starts from); "
          "Euler is the control (padistill's own sampler takes the same steps). One run. "
          f"Command: `python benchmarks/teacher_sampler.py --source {result['source']} --schedulers "
          f"{','.join(r['scheduler'] for r in result['rows'])}"
          + (f" --per-class {args.per_class}" if args.per_class != 50 else "")
          + (f" --seed {args.seed}" if args.seed != 1234 else "")
          + (f" --steps {args.steps}" if args.steps is not None else "") + "`.", "",
          "| scheduler | FD ↓ | FD-patch ↓ | accuracy ↑ | diversity | sharpness |", "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['scheduler']} | {r['fd']:.2f} | {r['fd_patch']:.2f} | {r['prompt_accuracy']:.3f} | "
           f"{r['diversity']:.2f} | {r['sharpness']:.3f} |" for r in result["rows"]]
    write_report(out, result, "\n".join(md) + "\n")
    return result


if __name__ == "__main__":
    main()
