"""Where along its steps does a student lose quality? The guided teacher takes over chosen steps of a student's
sampling: for each student step named, the teacher walks the step the way the stage's targets were made (its
own grid points inside the step, with guidance), the student takes the others; every variant starts from the
evaluation's fixed noise and is scored with the toy metrics, beside the student alone and the teacher alone.

    python benchmarks/takeover.py runs/toy_fashion/stages/1-8step/model --teacher-steps 16 --guidance 3 \\
        --takeovers 1 1-2 1-4 5-8 3-8 7-8 --out F

(toy_fashion's first stage since 2026-12-06; benchmarks/results/takeover_fashion_stage1.md was made on the
earlier one: `--teacher-steps 32 --guidance 2`.)

A step range is 1-based and inclusive over the student's steps ("5-8": its last four of eight). If the
teacher's first steps restore the teacher's prompt accuracy, the student loses it where the class is decided;
if every range restores a share, the loss is spread along the trajectory. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_report  # noqa: E402

KEYS = ("fd", "fd_patch", "prompt_accuracy", "diversity", "sharpness")


def steps_of(spec: str, n: int) -> set[int]:
    """0-based student steps of a 1-based inclusive range ("3-8") or single step ("1"); an error names the
    range when it is malformed, reversed or outside 1..n."""
    a, dash, b = spec.partition("-")
    try:
        lo, hi = int(a), int(b if dash else a)
    except ValueError:
        raise ValueError(f"--takeovers: {spec!r} is not a step or a range like 3-8") from None
    if lo > hi:
        raise ValueError(f"--takeovers: {spec!r} runs backwards (write {hi}-{lo})")
    if not 1 <= lo <= hi <= n:
        raise ValueError(f"--takeovers: {spec!r} is outside the student's steps 1..{n}")
    return set(range(lo - 1, hi))


def default_takeovers(n: int) -> list[str]:
    """The first step, the first and second halves, and all but the first two (for n >= 4): 1 1-4 5-8 3-8 at 8."""
    out = ["1"] + ([f"1-{n // 2}", f"{n // 2 + 1}-{n}"] if n >= 2 else [])
    return out + ([f"3-{n}"] if n >= 4 else [])


def takeover_sampler(sched, teacher, student, teacher_steps: int, guidance: float, student_steps: int,
                     takeover: set[int], prediction_type: str | None = None):
    """`sample_captions`' sampler: the student's grid walked step by step, the teacher (`teacher_path`, with
    guidance) on the steps in `takeover`, the student (one step, no guidance) on the others."""
    from pipeline.schedule import unet_denoiser

    pairs = [(p.t, p.t_next) for p in sched.stage_pairs(student_steps)]  # the student's own grid, step by step

    def sample(cond, noise):
        dt, ds = unet_denoiser(teacher, cond, guidance), unet_denoiser(student, cond, 0.0)
        x = sched.start(noise)
        for k, (a, b) in enumerate(pairs):
            if k in takeover:
                x = sched.rollout(dt, x, sched.teacher_path(teacher_steps, a, b), b)
            else:
                x = sched.rollout(ds, x, [a], b, prediction_type)
        return x
    return sample


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", help="an exported student folder (a stage's model/)")
    p.add_argument("--teacher", default=None, help="the teacher's source (default: the student's padistill.json)")
    p.add_argument("--teacher-steps", type=int, required=True, help="the stage's teacher_steps (a first stage's: its stages[0].teacher_steps, 16 in toy_fashion)")
    p.add_argument("--guidance", type=float, default=0.0, help="the stage's teacher guidance (its guidance_scale)")
    p.add_argument("--takeovers", nargs="+", default=None,
                   help="student steps the teacher takes, each a step or a 1-based inclusive range (default: the "
                        "first step, each half, all but the first two: 1 1-4 5-8 3-8 for 8 steps)")
    p.add_argument("--samples-per-class", type=int, default=50, help="default 50: 500 samples, the benchmark's")
    p.add_argument("--seed", type=int, default=1234, help="the noise seed (default 1234, the evaluation's default)")
    p.add_argument("--out", required=True, help="output path without extension")
    args = p.parse_args(argv)

    from pipeline import zoo
    from pipeline.metrics import METRICS, score
    from pipeline.sampling import fixed_noise, latent_shape, sample_captions
    from pipeline.data import toy_dataset

    info = json.loads((Path(args.student) / "padistill.json").read_text())
    n, dataset = int(info["num_inference_steps"]), info.get("dataset", "fashion_mnist")
    specs = args.takeovers or default_takeovers(n)
    try:
        takeovers = {spec: steps_of(spec, n) for spec in specs}
    except ValueError as e:
        p.error(str(e))
    source = args.teacher or info["teacher"]
    pipe = zoo.load_pipeline(source)
    sched, teacher = zoo.schedule_of(pipe), zoo.denoiser_of(pipe)
    student = zoo.load_denoiser(args.student)
    ds = toy_dataset(dataset)
    labels = [y for y in range(10) for _ in range(args.samples_per_class)]
    captions = [ds.caption_for(y) for y in labels]
    noise = fixed_noise(args.samples_per_class, args.seed, latent_shape(pipe))
    variants = {"student alone": set(), **{f"teacher on step(s) {k}": v for k, v in takeovers.items()},
                "teacher on every step": set(range(n))}
    rows = []
    for name, steps in variants.items():
        t0 = time.time()
        sampler = takeover_sampler(sched, teacher, student, args.teacher_steps, args.guidance, n, steps,
                                   info.get("prediction_type"))
        images = sample_captions(pipe, captions, noise, n, sampler=sampler)
        sc = score(images, labels, dataset=dataset)
        rows.append({"variant": name, "teacher_steps_taken": sorted(k + 1 for k in steps),
                     **{k: sc[k] for k in KEYS}})
        print(f"{name}: " + "  ".join(f"{k} {sc[k]:.3f}" for k in KEYS) + f"  ({time.time() - t0:.0f} s)", flush=True)
    names = dict(METRICS)
    md = [f"# The teacher takes over a student's steps ({args.student}, {n} steps; {dataset}, "
          f"{10 * args.samples_per_class} samples a row)\n",
          f"Teacher `{source}` at {args.teacher_steps} steps with guidance {args.guidance:g}, walking a taken step "
          "from its start over its own grid points inside it (as the stage's targets were made); fixed noise, seed "
          f"{args.seed}. 'Teacher on every step' is the teacher's own {args.teacher_steps}-step sampling where the "
          "student's grid points are on the teacher's (the trailing grids of SDXL and SD1.5); a flow model's grids "
          "do not nest, so there it also visits the student's grid points.\n",
          f"`python benchmarks/takeover.py {args.student} --teacher-steps {args.teacher_steps} --guidance "
          f"{args.guidance:g} --takeovers {' '.join(specs)} --seed {args.seed} --out {args.out}`\n",
          "| variant | " + " | ".join(names.get(k, k) for k in KEYS) + " |", "| --- |" + " ---: |" * len(KEYS)]
    md += [f"| {r['variant']} | " + " | ".join(f"{r[k]:.3f}" for k in KEYS) + " |" for r in rows]
    write_report(args.out, {"student": args.student, "teacher": source, "teacher_steps": args.teacher_steps,
                            "guidance": args.guidance, "rows": rows, "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
                 "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
