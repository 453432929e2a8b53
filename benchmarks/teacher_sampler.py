"""Does another diffusers sampler make a toy teacher's samples sharper? The teacher's exported folder sampled by
the stock `StableDiffusionXLPipeline` (no padistill sampling code) with each named diffusers scheduler, trailing
timesteps, at the folder's recommended steps and guidance, 50 prompts a class (each class its own generator seed),
scored by every toy metric of the teacher's dataset. `EulerDiscreteScheduler` is the control: padistill's own
sampler (`Schedule.sample`) is the same Euler steps, so its row should read as `benchmarks/toy_teacher.py`'s does.

    python benchmarks/teacher_sampler.py --source builtin:toy_fashion_teacher \
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


def sample_with(source: str, schedulers: list[str], per_class: int, seed: int) -> dict:
    import diffusers
    import torch
    from diffusers import StableDiffusionXLPipeline

    from pipeline import metrics
    from pipeline.data import toy_dataset
    from pipeline.zoo import read_info, resolve_source

    folder = resolve_source(source)
    info = read_info(folder)
    dataset = info.get("dataset", "toy_digits")
    ds = toy_dataset(dataset)
    steps, guidance = int(info.get("num_inference_steps", 32)), float(info.get("guidance_scale", 0.0))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    res = int(info.get("resolution", 32))
    labels = [k for k in range(10) for _ in range(per_class)]
    rows = []
    for name in schedulers:
        cls = getattr(diffusers, name, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise SystemExit(f"teacher_sampler: --schedulers: {name!r} is not a diffusers scheduler class")
        pipe.scheduler = cls.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        t0, images = time.time(), []
        for k in range(10):
            g = torch.Generator().manual_seed(seed + k)
            out = pipe([ds.caption_for(k)] * per_class, num_inference_steps=steps, guidance_scale=guidance,
                       generator=g, output_type="pt", height=res, width=res).images
            images.append(out * 2 - 1)  # the pipeline's [0, 1] back to the metrics' [-1, 1]
        s = metrics.score(torch.cat(images).float().clamp(-1, 1), labels, dataset=dataset)
        rows.append({"scheduler": name, "seconds": round(time.time() - t0, 1), **s})
        print(f"[teacher-sampler] {name}: " + ", ".join(f"{c} {s[c]:.3f}" for c in COLUMNS), flush=True)
    return {"source": source, "dataset": dataset, "steps": steps, "guidance_scale": guidance,
            "per_class": per_class, "seed": seed, "rows": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="a teacher folder or builtin: name (SDXL family)")
    p.add_argument("--schedulers", default="EulerDiscreteScheduler,EulerAncestralDiscreteScheduler",
                   help="diffusers scheduler classes, comma-separated (default: Euler, the control, and Euler "
                        "ancestral)")
    p.add_argument("--per-class", type=int, default=50, help="samples a class (default 50)")
    p.add_argument("--seed", type=int, default=1234, help="class k's generator seed is seed + k (default 1234)")
    p.add_argument("--out", help="output path without extension (default benchmarks/results/teacher_sampler_<dataset>)")
    args = p.parse_args(argv)
    if args.per_class < 1:
        p.error(f"--per-class: at least 1, got {args.per_class}")
    result = sample_with(args.source, [s.strip() for s in args.schedulers.split(",") if s.strip()],
                         args.per_class, args.seed)
    short = {"fashion_mnist": "fashion", "toy_digits": "digits"}[result["dataset"]]
    out = args.out or str(Path(__file__).resolve().parent / "results" / f"teacher_sampler_{short}")
    md = [f"# {result['source']} sampled by the stock diffusers pipeline with other schedulers", "",
          f"{result['steps']} steps (trailing), guidance {result['guidance_scale']}, {result['per_class']} samples "
          f"a class (class k's generator seed {result['seed']} + k); Euler is the control (padistill's own sampler). "
          f"Command: `python benchmarks/teacher_sampler.py --source {result['source']} --schedulers "
          f"{','.join(r['scheduler'] for r in result['rows'])}`.", "",
          "| scheduler | FD ↓ | FD-patch ↓ | accuracy ↑ | diversity | sharpness |", "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['scheduler']} | {r['fd']:.2f} | {r['fd_patch']:.2f} | {r['prompt_accuracy']:.3f} | "
           f"{r['diversity']:.2f} | {r['sharpness']:.3f} |" for r in result["rows"]]
    write_report(out, result, "\n".join(md) + "\n")
    return result


if __name__ == "__main__":
    main()
