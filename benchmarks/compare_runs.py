"""Finished toy runs side by side: one PNG and one table, the teacher against each run's students at every
step count, on the same prompts and seeds (every run samples its evaluation from the same fixed noise).

    python benchmarks/compare_runs.py runs/toy_fashion runs/toy_fashion_mse --out benchmarks/results/toy_fashion_demo

The runs must share their evaluation settings and base teacher (else their samples are not comparable);
each contributes the stages it finished. Rows of the PNG: the teacher at 32 steps, then per step count the
teacher (with its CFG), each run's student; columns: the first sample of each class. The table: the
report's toy metrics per model. Writes <out>.png, <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results_io import int_list, write_report  # noqa: E402

def load_run(root: Path) -> dict:
    """A finished run's config, and per evaluated stage (by step count) its metrics (the report's
    `collect`) and the student's evaluation samples."""
    import numpy as np

    from pipeline.config import load_config
    from pipeline.report import collect
    from pipeline.storage import RunStorage

    cfg = load_config(str(root / "config.yaml"), [f"run_root={root}"])
    if not cfg.data.toy:
        raise SystemExit(f"{root}: not a toy run (data.kind {cfg.data.kind}); this compares toy runs only")
    storage = RunStorage.from_config(cfg)
    stages = {e["student_steps"]: {"metrics": e, "images": np.load(io.BytesIO(storage.read_bytes(
        f"{cfg.stage_dir(e['stage'])}/eval/samples.npz")))["images"]} for e in collect(cfg, storage)}
    if not stages:
        raise SystemExit(f"{root}: no evaluated stage yet (run `padistill distill --config {root}/config.yaml`)")
    return {"name": cfg.name, "cfg": cfg, "storage": storage, "stages": stages}


def steps_label(name: str, steps: int) -> str:
    """A grid row's name: who drew it, then at how many steps on a line of its own ("teacher\n32 steps")."""
    return f"{name}\n{steps} step{'s' if steps > 1 else ''}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="finished run roots (local folders)")
    p.add_argument("--out", required=True, help="output path without extension")
    p.add_argument("--labels", default=None, help="comma-separated short names of the runs (default: their "
                   "config names), for the PNG's rows and the table")
    p.add_argument("--steps", type=int_list, default=[], help="student step counts to show, comma-separated "
                   "(default: every evaluated stage's)")
    args = p.parse_args(argv)
    keep = set(args.steps)

    import numpy as np
    import torch

    from pipeline.data import DATASETS
    from pipeline.evaluate import teacher_guidance
    from pipeline.images import save_grid
    from pipeline.layout import teacher_cache_rel
    from pipeline.metrics import METRICS  # the report's columns
    from pipeline.zoo import resolve_source

    runs = [load_run(Path(r)) for r in args.runs]
    if args.labels is not None:
        labels = [x.strip() for x in args.labels.split(",")]
        if len(labels) != len(runs):
            p.error(f"--labels: {len(labels)} names for {len(runs)} runs")
        for r, name in zip(runs, labels):
            r["name"] = name
    if keep:
        for r in runs:
            r["stages"] = {n: st for n, st in r["stages"].items() if n in keep}
        if not any(r["stages"] for r in runs):
            p.error(f"--steps {','.join(map(str, args.steps))}: no run has a stage evaluated at these step counts")
        for r in runs:
            if set(r["stages"]) != keep:
                lacking = sorted(keep - set(r["stages"]))
                print(f"{r['name']}: no stage evaluated at {lacking} steps; its rows are left out", flush=True)
    base = runs[0]["cfg"]
    for r in runs[1:]:
        c = r["cfg"]
        if (c.evaluate, c.model.source, c.data.kind) != (base.evaluate, base.model.source, base.data.kind):
            raise SystemExit(f"{r['name']}: its evaluation settings or base teacher differ from {runs[0]['name']}'s; "
                             "their samples are not comparable")
    K = base.evaluate.samples_per_prompt
    shown = np.arange(10) * K  # each class's first fixed seed
    g = teacher_guidance(base, resolve_source(base.model.source))

    def teacher(steps: int):  # the base teacher's samples, cached by the evaluations in the run roots
        rel = teacher_cache_rel(base, steps, g)
        storage = next((r["storage"] for r in runs if r["storage"].exists(rel)), None)
        return torch.from_numpy(np.load(io.BytesIO(storage.read_bytes(rel)))["images"][shown]) \
            if storage is not None else None

    keys = [k for k, _ in METRICS]
    rows, labels, table = [], [], []
    if (t := teacher(32)) is not None:
        rows.append(t)
        labels.append(steps_label("teacher", 32))
    any_stage = next(iter(next(r for r in runs if r["stages"])["stages"].values()))["metrics"]
    table.append({"model": "teacher", "steps": 32, **{k: any_stage["teacher_32"][k] for k in keys}})
    for n in sorted({n for r in runs for n in r["stages"]}, reverse=True):
        t = teacher(n)
        if t is not None:
            rows.append(t)
            labels.append(steps_label("teacher", n))
        first = next(r for r in runs if n in r["stages"])["stages"][n]["metrics"]
        table.append({"model": "teacher", "steps": n, **{k: first["teacher_same_steps"][k] for k in keys}})
        for r in runs:
            if n in r["stages"]:
                st = r["stages"][n]
                rows.append(torch.from_numpy(st["images"][shown]))
                labels.append(steps_label(r["name"], n))
                table.append({"model": r["name"], "steps": n, **{k: st["metrics"]["student"][k] for k in keys}})
    save_grid(rows, f"{args.out}.png", labels, col_labels=list(DATASETS[base.data.kind].names))
    n_samples = 10 * K
    md = [f"Samples per model: {n_samples} (the same fixed noise for every model); teacher rows with CFG "
          f"(guidance {g:g}), students without. Grid: `{Path(args.out).name}.png`.", "",
          "| model | steps | " + " | ".join(h for _, h in METRICS) + " |", "|---|---:|" + "---:|" * len(METRICS)]
    md += [f"| {row['model']} | {row['steps']} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |" for row in table]
    write_report(args.out, {"runs": args.runs, "samples_per_model": n_samples, "rows": table}, "\n".join(md) + "\n")
    print(f"wrote {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
