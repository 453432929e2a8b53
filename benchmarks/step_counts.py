"""Exported students sampled at other step counts than their own: the toy metrics of each pipeline folder
at each step count, on the evaluation's prompts and fixed noise (the same samples `padistill evaluate`
draws at a stage's own step count, so its figures are this table's at that count).

    python benchmarks/step_counts.py runs/long/mse/stages/1-8step/model --steps 8,4,2 \
        --out benchmarks/results/step_counts_fashion

The question it answers: is a progressive stage worth training, or does the previous stage's student,
simply sampled with fewer steps, already score as well (issue 13's "every stage measurably trains")?
Guidance 0 (students carry their teacher's guidance). Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results_io import int_list, write_report  # noqa: E402

KEYS = ("fd", "fd_patch", "prompt_accuracy", "diversity", "sharpness")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="exported pipeline folders (a stage's model/)")
    p.add_argument("--steps", type=int_list, default=[8, 4, 2], help="step counts, comma-separated (default 8,4,2)")
    p.add_argument("--dataset", default="fashion_mnist", help="the toy data the students were distilled on")
    p.add_argument("--samples-per-class", type=int, default=50, help="default 50: 500 samples, the benchmark's")
    p.add_argument("--out", required=True, help="output path without extension")
    args = p.parse_args(argv)

    from pipeline import zoo
    from pipeline.metrics import METRICS, score
    from pipeline.sampling import sample_classes

    steps = args.steps
    rows = []
    for folder in args.models:
        if not (Path(folder) / "model_index.json").exists():
            p.error(f"{folder}: not a pipeline folder (no model_index.json)")
        pipe = zoo.load_pipeline(folder)
        for n in steps:
            t0 = time.time()
            imgs = sample_classes(pipe, n, 0.0, args.samples_per_class, dataset=args.dataset)
            sc = score(imgs.images, imgs.labels, dataset=args.dataset)
            rows.append({"model": folder, "steps": n, **{k: sc[k] for k in KEYS if k in sc}})
            print(f"{folder} at {n} steps: " + "  ".join(f"{k} {sc[k]:.3f}" for k in KEYS if k in sc)
                  + f"  ({time.time() - t0:.0f} s)", flush=True)
    names = dict(METRICS)
    cols = [k for k in KEYS if all(k in r for r in rows)]
    md = [f"# Students at other step counts ({args.dataset}, {10 * args.samples_per_class} samples a row, "
          "guidance 0, the evaluation's fixed noise)\n",
          f"`python benchmarks/step_counts.py {' '.join(args.models)} --steps {args.steps}`\n",
          "| model | steps | " + " | ".join(names.get(k, k) for k in cols) + " |",
          "| --- | ---: |" + " ---: |" * len(cols)]
    md += [f"| {r['model']} | {r['steps']} | " + " | ".join(f"{r[k]:.3f}" for k in cols) + " |" for r in rows]
    write_report(args.out, {"rows": rows, "dataset": args.dataset, "samples_per_class": args.samples_per_class,
                            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
