"""The first stage's learning rate, swept: the guided first (MSE) stage of a toy config trained for the
same student updates at each lr (one training seed), its 8-step student evaluated as the DAG evaluates
it (500 samples on the benchmark). The stage is trained to follow its guided teacher, so the sweep
ranks the lrs by FD to the 32-step teacher's samples and shows the FD to the real photos beside it.

Each lr is one `padistill distill --until 8step` run (encode, the stage's trajectories, training,
evaluation) in its own run root, `<root>/<updates>-lr<lr>`: rerunning reuses finished runs, so a sweep
can be widened one lr at a time.

    .venv/bin/python benchmarks/stage1_lr.py --lrs 1e-4,3e-5,1e-5 --updates 240   # ~10 min an lr

(benchmarks/results/stage1_lr_toy_fashion.md was made from toy_fashion's first stage of 2026-12-04, the 32-step
teacher at guidance 2; today's toy_fashion sweeps its 16-step teacher at guidance 3.)

Writes benchmarks/results/stage1_lr_<config>.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_report  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
COLUMNS = {"fd_to_reference": "FD to teacher-32 ↓", "fd": "FD ↓", "fd_patch": "FD-patch ↓",
           "prompt_accuracy": "accuracy ↑", "diversity": "diversity", "sharpness": "sharpness"}


def run_one(config: str, root: Path, lr: str, updates: int, samples_per_prompt: int) -> dict:
    """Train and evaluate the first stage at `lr` (or read the finished run); its evaluation metrics."""
    from pipeline.config import load_config
    from pipeline.dag import run_dag
    from pipeline.layout import manifest_step
    from pipeline.report import collect
    from pipeline.storage import RunStorage

    run_root = root / f"{updates}-lr{lr}"
    cfg = load_config(config, [f"run_root={run_root}", f"stages.0.lr={lr}", f"stages.0.mse_steps={updates}",
                               f"evaluate.samples_per_prompt={samples_per_prompt}"])
    if cfg.stages[0].loss != "mse":
        raise SystemExit(f"{config}: its first stage is not an MSE stage")
    storage = RunStorage.from_config(cfg)
    if storage.read_manifest(manifest_step(cfg, 1, "eval")) is None:
        print(f"\n=== stage 1 at lr {lr}, {updates} updates -> {run_root}", flush=True)
        run_dag(cfg, until=cfg.stages[0].name)
    metrics = collect(cfg, storage)[0]
    return {"lr": float(lr), "run_root": str(run_root), "student": metrics["student"],
            "start": metrics["student_start"], "teacher_same_steps": metrics["teacher_same_steps"]}


def markdown(result: dict) -> str:
    rows = result["runs"]
    best = min(rows, key=lambda r: r["student"]["fd_to_reference"])
    head = "| lr | " + " | ".join(COLUMNS.values()) + " |"
    lines = [f"# The first stage's learning rate ({result['config']}, {result['updates']} updates, seed 0)\n",
             f"The guided first MSE stage at each lr, the same updates; {result['samples']} samples a model. "
             "FD to teacher-32: to the guided 32-step teacher's samples (what the stage is trained to follow; "
             "ranks the lrs; its noise between evaluation seeds is not measured); FD: to the real photos, "
             "whose noise between evaluation seeds is 0.8 on Fashion-MNIST: a smaller FD difference is not one. "
             "One training seed.\n", head,
             "| --- |" + " ---: |" * len(COLUMNS)]
    start = rows[0]["start"]
    lines.append("| start of stage | " + " | ".join(f"{start[c]:.3f}" for c in COLUMNS) + " |")
    teacher = rows[0]["teacher_same_steps"]
    lines.append("| guided teacher at 8 steps | " + " | ".join(f"{teacher[c]:.3f}" for c in COLUMNS) + " |")
    for r in sorted(rows, key=lambda r: -r["lr"]):
        mark = "**" if r is best else ""
        lines.append(f"| {mark}{r['lr']:g}{mark} | " + " | ".join(f"{r['student'][c]:.3f}" for c in COLUMNS) + " |")
    lines.append(f"\nLowest FD to teacher-32: lr {best['lr']:g}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="toy_fashion", help="a toy config whose first stage is MSE (default toy_fashion)")
    p.add_argument("--lrs", default="1e-4,3e-5,1e-5", help="comma-separated learning rates")
    p.add_argument("--updates", type=int, default=240, help="student updates at each lr (default 240)")
    p.add_argument("--samples-per-prompt", type=int, default=50, help="evaluation samples per class (default 50)")
    p.add_argument("--root", default="runs/stage1_lr", help="where the run roots go")
    p.add_argument("--out", default=None, help="output path without extension")
    args = p.parse_args(argv)
    from pipeline import cluster

    cluster.quiet_driver()  # before Ray is imported, as every driver
    lrs = [x.strip() for x in args.lrs.split(",") if x.strip()]
    if not lrs:
        p.error("--lrs: no learning rate given")
    runs = [run_one(args.config, Path(args.root), lr, args.updates, args.samples_per_prompt) for lr in lrs]
    result = {"config": args.config, "updates": args.updates, "samples": 10 * args.samples_per_prompt, "runs": runs,
              "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_report(args.out or str(RESULTS / f"stage1_lr_{args.config}"), result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
