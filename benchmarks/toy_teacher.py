"""Baseline table of an embedded benchmark: a toy teacher sampled with Euler (trailing) at 32, 8, 4, 2
and 1 steps with its own guidance scale, scored by every toy metric, under the metrics' calibration rows
(real images, and the same images blurred by 1 px, noised, with shuffled captions, and pure noise: each
spoiled row must score clearly worse than the real one, or the metric cannot judge this method).

These are the numbers every distilled student must beat at its own step count.

    python benchmarks/toy_teacher.py                       # builtin:toy_teacher (digits), 50 samples per class
    python benchmarks/toy_teacher.py --source builtin:toy_fashion_teacher   # Fashion-MNIST
    python benchmarks/toy_teacher.py --dataset fashion_mnist --calibration-only
    python benchmarks/toy_teacher.py --source PATH --samples-per-digit 50 --name my_model

Writes benchmarks/results/<name>.json, <name>.md and <name>_grid.png (rows: step counts, columns:
classes 0-9, the first sample of each).
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
COLUMNS = ("fd", "fd_patch", "prompt_accuracy", "diversity", "sharpness", "fd_to_reference")
DATASET_NAMES = {"toy_digits": "digits", "fashion_mnist": "Fashion-MNIST"}
DEFAULT_NAMES = {"toy_digits": "toy_teacher", "fashion_mnist": "toy_fashion_teacher"}
REFERENCE = {"toy_digits": "digits' train split", "fashion_mnist": "Fashion-MNIST t10k photos"}
CALIBRATION_SOURCE = {"toy_digits": "the held-out digits, 18 per class", "fashion_mnist": "from the train split"}


def calibration_rows(dataset: str, per_class: int = 50) -> list[dict]:
    """The metrics on known answers (`pipeline.metrics.calibration`), as table rows."""
    from pipeline import metrics

    rows = []
    for r in metrics.calibration(dataset, per_class):
        name = r.pop("name")
        rows.append({"model": f"calibration: {name}", "steps": None, "guidance_scale": None, **r})
        print(f"[benchmark] {name:24s} " + ", ".join(f"{k} {r[k]:.3f}" for k in COLUMNS if k in r), flush=True)
    return rows


def run(source: str = "builtin:toy_teacher", steps=STEPS, samples_per_digit: int = 50, seed: int = 1234,
        guidance_scale: float | None = None, name: str | None = None, out_dir: Path = RESULTS,
        grid_seeds: int = 1, dataset: str | None = None, calibration_only: bool = False) -> dict:
    import torch

    from pipeline import images, metrics, sampling
    from pipeline.zoo import load_pipeline, read_info, resolve_source

    torch.manual_seed(0)
    info = {} if calibration_only else read_info(resolve_source(source))
    dataset = dataset or info.get("dataset", "toy_digits")
    name = name or DEFAULT_NAMES[dataset]
    if calibration_only:
        name += "_calibration"
    clf_info = metrics.classifier_info(dataset=dataset)
    print(f"[benchmark] {DATASET_NAMES[dataset]}: classifier held-out accuracy {clf_info.get('heldout_accuracy')}",
          flush=True)
    rows = calibration_rows(dataset, samples_per_digit)
    g, ref_steps, samples = None, None, {}
    if not calibration_only:
        pipe = load_pipeline(source)
        g = float(info.get("guidance_scale", 0.0) if guidance_scale is None else guidance_scale)
        ref_steps = int(info.get("num_inference_steps", max(steps)))
        print(f"[benchmark] {source}: guidance {g}, reference = its own {ref_steps}-step samples", flush=True)
    seconds = {}
    for n in (sorted(set(steps) | {ref_steps}, reverse=True) if not calibration_only else []):
        t0 = time.time()
        samples[n] = sampling.sample_classes(pipe, n, g, samples_per_digit, seed, dataset=dataset)
        seconds[n] = time.time() - t0
        print(f"[benchmark] sampled {len(samples[n].labels)} images at {n} steps in {seconds[n]:.1f} s", flush=True)
    for n in (steps if not calibration_only else []):
        s = metrics.score(samples[n].images, samples[n].labels, reference_images=samples[ref_steps].images,
                          dataset=dataset)
        rows.append({"model": "toy teacher", "steps": n, "guidance_scale": g,
                     "sample_seconds": round(seconds[n], 2), **s})
        print(f"[benchmark] {n:2d} steps: " + ", ".join(f"{k} {s[k]:.3f}" for k in COLUMNS), flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "source": None if calibration_only else source, "dataset": dataset, "guidance_scale": g,
        "reference_steps": ref_steps, "samples_per_digit": samples_per_digit,
        "seed": seed, "classifier": clf_info, "rows": rows,
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "notes": f"fd / fd_patch: Fréchet distance to the real {REFERENCE[dataset]} in the {DATASET_NAMES[dataset]} "
                 "classifier's 64-d feature space (whole 32x32 images / centre 16x16 patches); prompt_accuracy: the "
                 "classifier agrees with the prompted class; diversity: within-prompt mean pairwise feature distance "
                 "relative to the real images of that class; sharpness: high-frequency energy (what a 1-px blur "
                 "removes) relative to the real images'; "
                 + (f"fd_to_reference: Fréchet distance to the teacher's own {ref_steps}-step samples (same prompts "
                    "and seeds). " if ref_steps else "")
                 + f"Calibration rows: {samples_per_digit} real "
                 f"images per class that the reference does not hold ({CALIBRATION_SOURCE[dataset]}), then the same "
                 "blurred (Gaussian, sigma 1 px), with Gaussian noise of std 0.2 (images in [-1, 1]), with captions "
                 "shuffled across classes, and uniform noise images.",
    }
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(result))
    grid_rows, labels = [], []
    for n in (steps if not calibration_only else []):
        for k in range(grid_seeds):
            grid_rows.append(samples[n].grid_row(k))
            labels.append(f"{n} step" + ("s" if n > 1 else "") + (f" s{k}" if grid_seeds > 1 else ""))
    if grid_rows:
        images.save_grid(grid_rows, out_dir / f"{name}_grid.png", labels)
    print(f"[benchmark] wrote {out_dir / name}.json, .md" + (", _grid.png" if grid_rows else ""), flush=True)
    return result


def markdown(result: dict) -> str:
    acc = result["classifier"].get("heldout_accuracy")
    ds = DATASET_NAMES[result.get("dataset", "toy_digits")]
    lines = [
        f"# Toy teacher baseline ({result['source'] or ds + ': calibration only'})",
        "",
        (f"Euler (trailing) sampling with guidance {result['guidance_scale']}, classes 0-9 x "
         f"{result['samples_per_digit']} samples, each with its own fixed noise (seed {result['seed']}). "
         if result["source"] else "")
        + (f"{ds} classifier held-out accuracy: {acc:.4f}." if acc is not None else ""),
        "",
        "| model | steps | FD ↓ | FD-patch ↓ | prompt acc ↑ | diversity (real = 1) | sharpness (real = 1) | "
        "FD to 32-step teacher ↓ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['steps'] if r['steps'] is not None else '—'} | {r['fd']:.2f} | "
                     f"{r['fd_patch']:.2f} | {r['prompt_accuracy']:.3f} | {r['diversity']:.3f} | "
                     f"{r.get('sharpness', float('nan')):.3f} | "
                     + (f"{r['fd_to_reference']:.2f} |" if "fd_to_reference" in r else "— |"))
    lines += ["", result["notes"], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="builtin:toy_teacher")
    p.add_argument("--dataset", choices=sorted(DATASET_NAMES), default=None,
                   help="the embedded dataset (default: the teacher's padistill.json, else toy_digits)")
    p.add_argument("--calibration-only", action="store_true", help="only the metrics' calibration rows")
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    p.add_argument("--samples-per-digit", type=int, default=50, help="50 = the toy configs' evaluate.samples_per_prompt, so students compare")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the folder's padistill.json")
    p.add_argument("--name", default=None, help="default: toy_teacher (digits), toy_fashion_teacher")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--grid-seeds", type=int, default=1, help="grid rows per step count (seeds)")
    a = p.parse_args(argv)
    run(a.source, a.steps, a.samples_per_digit, a.seed, a.guidance_scale, a.name, a.out_dir, a.grid_seeds,
        a.dataset, a.calibration_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
