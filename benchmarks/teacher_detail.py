"""Where along its sampling path does a toy teacher lose its detail? Real photos of the teacher's dataset (its
reference split: Fashion-MNIST's t10k) are encoded, noised to a timestep of the N-step trailing grid, and the rest
of the grid is sampled with the teacher's own Euler steps and guidance (`Schedule.rollout`, the one sampling
loop); the decoded results' sharpness (high-frequency energy relative to the whole reference split's, as the
benchmarks' `sharpness`) says how much detail the path from that noise level keeps. The VAE's reconstruction
of the same photos is the ceiling; the grid's whole length starts from pure noise (the same noise, so these
samples are the teacher's own, not the benchmark's fixed-noise set). UNet teachers (SDXL, SD1.5) only.

    python benchmarks/teacher_detail.py --source builtin:toy_fashion_teacher [--source OTHER_TEACHER ...]

Prints the table and writes benchmarks/results/<out>.{json,md} (default teacher_detail_fashion, or
teacher_detail_toy_digits). About 7 min
a teacher on 2 cores (50 photos a class, 32 steps, the default starts: 125 guided UNet steps over 500 latents).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results_io import int_list, write_report  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def detail_along_path(source: str, steps: int, starts: list[int], per_class: int, seed: int) -> dict:
    """Sharpness after sampling the last k steps of the grid from real latents noised to its (steps - k)-th
    timestep, for each k in `starts` (k = steps: from pure noise, the teacher's sample), and of the VAE's
    reconstruction."""
    import numpy as np
    import torch

    from pipeline import metrics
    from pipeline.data import toy_dataset
    from pipeline.encode import encode_images
    from pipeline.sampling import sample_captions
    from pipeline.schedule import CLEAN, Schedule, unet_denoiser
    from pipeline.zoo import denoiser_of, load_pipeline, read_info, resolve_source, schedule_of

    folder = resolve_source(source)
    info = read_info(folder)
    ds = toy_dataset(info.get("dataset", "toy_digits"))
    ref = ds.load(ds.reference_split)
    idx = np.concatenate([np.where(ref.labels == k)[0][:per_class] for k in range(10)])
    captions = [ds.caption_for(int(y)) for y in ref.labels[idx]]
    real_hf = metrics.high_frequency_energy(ref.images)
    pipe = load_pipeline(str(folder))
    sched, unet = schedule_of(pipe), denoiser_of(pipe)
    if not isinstance(sched, Schedule):
        raise SystemExit(f"teacher_detail: {source} is not a UNet (SDXL, SD1.5) teacher; its noise levels are "
                         "not timesteps of a trailing grid")
    guidance = info.get("guidance_scale", 0.0)  # as benchmarks/toy_teacher.py: no padistill.json, no guidance
    grid = [int(t) for t in sched.timesteps(steps)]
    with torch.no_grad():
        lat = encode_images(pipe.vae, ref.images[idx])
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(seed))

    def sharpness(start: torch.Tensor, path: list[int]) -> float:
        """Decoded by the benchmarks' own sampling (prompts, batches, VAE), the latents walked through `path`."""
        def walk(cond, x):
            return sched.rollout(unet_denoiser(unet, cond, guidance), x, path, CLEAN) if path else x
        images = sample_captions(pipe, captions, start, steps, guidance, sampler=walk)
        return round(metrics.high_frequency_energy(images) / real_hf, 3)

    rows = [{"start": "VAE reconstruction", "steps": 0, "timestep": None, "sharpness": sharpness(lat, [])}]
    for k in sorted(starts):
        first = steps - k
        x = sched.start(noise) if first == 0 else sched.renoise(lat, noise, grid[first])
        rows.append({"start": "pure noise" if first == 0 else f"real, noised to t={grid[first]}", "steps": k,
                     "timestep": grid[first], "sharpness": sharpness(x, grid[first:])})
        print(f"[teacher-detail] {source}: {rows[-1]['start']}, {k} steps: sharpness {rows[-1]['sharpness']}",
              flush=True)
    return {"source": source, "dataset": ds.kind, "guidance_scale": guidance, "photos": len(idx), "rows": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source", action="append", required=True, help="a teacher folder or builtin: name (repeatable)")
    p.add_argument("--steps", type=int, default=32, help="the sampling grid (default 32, the teachers' own)")
    p.add_argument("--starts", type=int_list, default=[1, 4, 8, 12, 16, 24, 28, 32],
                   help="how many of the grid's last steps to sample (comma-separated; the grid's length = from "
                        "pure noise; default 1,4,8,12,16,24,28,32)")
    p.add_argument("--per-class", type=int, default=50,
                   help="reference photos a class (default 50; fewer where a class has fewer)")
    p.add_argument("--seed", type=int, default=1, help="the noise's seed")
    p.add_argument("--out", help="output path without extension (default benchmarks/results/teacher_detail_<dataset "
                                  "of the first source>)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.per_class < 1:
        p.error(f"--steps and --per-class: at least 1, got {args.steps} and {args.per_class}")
    bad = [k for k in args.starts if not 1 <= k <= args.steps]
    if bad or not args.starts:
        p.error(f"--starts: one or more, each between 1 and --steps ({args.steps}), got {args.starts}")
    args.starts = sorted(set(args.starts))
    runs = [detail_along_path(s, args.steps, args.starts, args.per_class, args.seed) for s in args.source]
    head = "| start | steps sampled | " + " | ".join(f"sharpness: {r['source']}" for r in runs) + " |"
    lines = [f"# Where a teacher's detail goes ({args.steps}-step trailing grid)", "",
             f"Real photos of the reference split ({args.per_class} a class) encoded, noised to a timestep of the "
             f"grid (noise seed {args.seed}), the rest of the grid sampled with the teacher's Euler steps and its "
             "guidance; sharpness is the decoded results' high-frequency energy relative to the whole reference "
             "split's (1 = as sharp).", "",
             head, "|---|---:|" + "---:|" * len(runs)]
    for i, row in enumerate(runs[0]["rows"]):
        cells = " | ".join(f"{r['rows'][i]['sharpness']:.3f}" for r in runs)
        lines.append(f"| {row['start']} | {row['steps']} | {cells} |")
    cmd = ("python benchmarks/teacher_detail.py " + " ".join(f"--source {s}" for s in args.source)
           + f" --steps {args.steps} --starts {','.join(map(str, args.starts))} --per-class {args.per_class}"
           + f" --seed {args.seed}")
    lines += ["", f"`{cmd}`", ""]
    result = {"steps": args.steps, "starts": args.starts, "per_class": args.per_class, "seed": args.seed,
              "runs": runs, "command": cmd}
    out = args.out or str(RESULTS / f"teacher_detail_{runs[0]['dataset'].replace('_mnist', '')}")
    write_report(out, result, "\n".join(lines))
    return result


if __name__ == "__main__":
    main()
