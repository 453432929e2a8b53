"""Baseline table of the toy benchmark: the shipped toy teacher sampled with Euler (trailing) at
32, 8, 4, 2 and 1 steps with its own guidance scale, scored by every toy metric.

These are the numbers every distilled student must beat at its own step count.

    python benchmarks/toy_teacher.py                       # builtin:toy_teacher, 50 samples per digit
    python benchmarks/toy_teacher.py --source PATH --samples-per-digit 50 --name my_model

Writes benchmarks/results/<name>.json, <name>.md and <name>_grid.png (rows: step counts, columns:
digits 0-9, the first sample of each).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
STEPS = (32, 8, 4, 2, 1)
COLUMNS = ("fd", "fd_patch", "prompt_accuracy", "diversity", "fd_to_reference")


def run(source: str = "builtin:toy_teacher", steps=STEPS, samples_per_digit: int = 50, seed: int = 1234,
        guidance_scale: float | None = None, name: str = "toy_teacher", out_dir: Path = RESULTS,
        grid_seeds: int = 1) -> dict:
    import torch

    from pipeline import metrics
    from pipeline.data import load_digits
    from pipeline.zoo import load_pipeline, read_info, resolve_source

    torch.manual_seed(0)
    pipe = load_pipeline(source)
    info = read_info(resolve_source(source))
    g = float(info.get("guidance_scale", 0.0) if guidance_scale is None else guidance_scale)
    ref_steps = int(info.get("num_inference_steps", max(steps)))
    clf_info = metrics.classifier_info()
    print(f"[benchmark] {source}: guidance {g}, reference = its own {ref_steps}-step samples; "
          f"classifier held-out accuracy {clf_info.get('heldout_accuracy')}", flush=True)

    samples, seconds = {}, {}
    for n in sorted(set(steps) | {ref_steps}, reverse=True):
        t0 = time.time()
        samples[n] = metrics.sample_digits(pipe, n, g, samples_per_digit, seed)
        seconds[n] = time.time() - t0
        print(f"[benchmark] sampled {len(samples[n].labels)} images at {n} steps in {seconds[n]:.1f} s", flush=True)
    ref = samples[ref_steps].images
    rows = []
    held = load_digits("heldout")
    real = metrics.score(held.images, held.labels, reference_images=ref)
    rows.append({"model": "real digits (held-out split)", "steps": None, "guidance_scale": None, **real})
    for n in steps:
        s = metrics.score(samples[n].images, samples[n].labels, reference_images=ref)
        rows.append({"model": "toy teacher", "steps": n, "guidance_scale": g,
                     "sample_seconds": round(seconds[n], 2), **s})
        print(f"[benchmark] {n:2d} steps: " + ", ".join(f"{k} {s[k]:.3f}" for k in COLUMNS), flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "source": source, "guidance_scale": g, "reference_steps": ref_steps, "samples_per_digit": samples_per_digit,
        "seed": seed, "classifier": clf_info, "rows": rows,
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "notes": "fd / fd_patch: Fréchet distance to the real train split in the digit classifier's 64-d feature "
                 "space (whole 32x32 images / centre 16x16 patches); prompt_accuracy: classifier agrees with the "
                 "prompted digit; diversity: within-prompt mean pairwise feature distance relative to the real "
                 "digits of that class; fd_to_reference: Fréchet distance to the teacher's own "
                 f"{ref_steps}-step samples (same prompts and seeds).",
    }
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(result))
    grid_rows, labels = [], []
    for n in steps:
        for k in range(grid_seeds):
            grid_rows.append(samples[n].grid_row(k))
            labels.append(f"{n} step" + ("s" if n > 1 else "") + (f" s{k}" if grid_seeds > 1 else ""))
    metrics.save_grid(grid_rows, out_dir / f"{name}_grid.png", labels)
    print(f"[benchmark] wrote {out_dir / name}.json, .md, _grid.png", flush=True)
    return result


def markdown(result: dict) -> str:
    acc = result["classifier"].get("heldout_accuracy")
    lines = [
        f"# Toy teacher baseline ({result['source']})",
        "",
        f"Euler (trailing) sampling with guidance {result['guidance_scale']}, digits 0-9 x "
        f"{result['samples_per_digit']} samples, each with its own fixed noise (seed {result['seed']}). "
        "Digit classifier held-out accuracy: "
        f"{acc:.4f}." if acc is not None else "",
        "",
        "| model | steps | FD ↓ | FD-patch ↓ | prompt acc ↑ | diversity (real = 1) | FD to 32-step teacher ↓ |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['steps'] if r['steps'] is not None else '—'} | {r['fd']:.2f} | "
                     f"{r['fd_patch']:.2f} | {r['prompt_accuracy']:.3f} | {r['diversity']:.3f} | "
                     f"{r.get('fd_to_reference', float('nan')):.2f} |")
    lines += ["", result["notes"], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="builtin:toy_teacher")
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    p.add_argument("--samples-per-digit", type=int, default=50, help="50 = the toy configs' evaluate.samples_per_prompt, so students compare")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the folder's padistill.json")
    p.add_argument("--name", default="toy_teacher")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--grid-seeds", type=int, default=1, help="grid rows per step count (seeds)")
    a = p.parse_args(argv)
    run(a.source, a.steps, a.samples_per_digit, a.seed, a.guidance_scale, a.name, a.out_dir, a.grid_seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
