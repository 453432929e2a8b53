"""The toy benchmark of the method: distill the shipped toy teacher 32 -> 8 -> 4 -> 2 -> 1 with
progressive adversarial distillation (configs/toy_digits.yaml) and with the MSE-only progressive
baseline (configs/toy_digits_mse.yaml), then check the quality and speed targets:

- every student beats the teacher sampled at the student's own step count on FD, and is at least as
  accurate (the guided teacher is at 0.990-0.996 over 500 samples at every step count);
- the 4-step student's FD is at most 1.25x the 32-step teacher's (SDXL-Lightning's 4-step: 1.21x FID);
- the 1-step student's FD is at most 2x the 32-step teacher's;
- the adversarial 1-step student's FD is at least 30% lower than the MSE baseline's 1-step;
- the 4-step student samples at least 80% of the ideal 16x faster than the 32-step teacher with CFG.

    python benchmarks/distill.py                       # both runs (finished steps are skipped)
    python benchmarks/distill.py --set train.workers=2 # overrides go to both configs

Each run is `padistill distill` (the same DAG, run roots from the configs, so a finished `make demo`
is reused). Writes benchmarks/results/distill.json and distill.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_result  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def run_config(name: str, overrides: list[str]) -> dict:
    from pipeline.config import load_config
    from pipeline.dag import run_dag
    from pipeline.report import collect
    from pipeline.storage import RunStorage

    cfg = load_config(name, overrides)
    t0 = time.time()
    run_dag(cfg)
    storage = RunStorage.from_config(cfg)
    return {"config": name, "run_root": storage.url(), "wall_s_this_invocation": time.time() - t0,
            "evals": collect(cfg, storage)}


def targets(adv: list[dict], mse: list[dict]) -> list[dict]:
    by = {e["student_steps"]: e for e in adv}
    t32 = adv[0]["teacher_32"]["fd"]
    out = []

    def add(name, value, limit, ok):
        out.append({"target": name, "value": value, "limit": limit, "met": bool(ok)})

    for e in adv:
        n, s, t = e["student_steps"], e["student"], e["teacher_same_steps"]
        add(f"{n}-step student FD < teacher at {n} steps", s["fd"], t["fd"], s["fd"] < t["fd"])
        add(f"{n}-step student accuracy >= teacher at {n} steps", s["prompt_accuracy"], t["prompt_accuracy"],
            s["prompt_accuracy"] >= t["prompt_accuracy"])
    if 4 in by:
        add("4-step student FD <= 1.25x teacher-32 FD", by[4]["student"]["fd"], 1.25 * t32,
            by[4]["student"]["fd"] <= 1.25 * t32)
        sp = by[4]["speed"]
        add("4-step sampling speedup >= 0.8x ideal 16x", sp["speedup"], 0.8 * sp["ideal_speedup"],
            sp["speedup"] >= 0.8 * sp["ideal_speedup"])
    if 1 in by:
        add("1-step student FD <= 2x teacher-32 FD", by[1]["student"]["fd"], 2 * t32, by[1]["student"]["fd"] <= 2 * t32)
        m1 = {e["student_steps"]: e for e in mse}.get(1)
        if m1:
            add("adversarial 1-step FD <= 0.7x MSE baseline 1-step FD", by[1]["student"]["fd"],
                0.7 * m1["student"]["fd"], by[1]["student"]["fd"] <= 0.7 * m1["student"]["fd"])
    return out


def markdown(runs: dict, checks: list[dict]) -> str:
    from pipeline.report import table

    lines = ["# Toy benchmark: progressive adversarial distillation vs MSE-only\n",
             "Shipped toy teacher (guidance 2.0); digits 0-9 x samples_per_prompt samples, each with its own "
             "fixed noise, the same for every model. "
             "FD: Fréchet distance to real digits in the digit classifier's feature space.\n"]
    for name, r in runs.items():
        lines += [f"## {name} (`{r['run_root']}`)\n", table(r["evals"]) if r["evals"] else "(no evaluations)", ""]
    lines += ["## Targets\n", "| target | value | limit | met |", "| --- | ---: | ---: | :---: |"]
    lines += [f"| {c['target']} | {c['value']:.4f} | {c['limit']:.4f} | {'yes' if c['met'] else '**no**'} |"
              for c in checks]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="toy_digits", help="the adversarial run (default toy_digits)")
    p.add_argument("--baseline", default="toy_digits_mse", help="the MSE-only run (default toy_digits_mse)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to both runs")
    p.add_argument("--out", default=str(RESULTS / "distill"), help="output path without extension")
    args = p.parse_args(argv)

    import torch

    runs = {args.config: run_config(args.config, args.overrides),
            args.baseline: run_config(args.baseline, args.overrides)}
    checks = targets(runs[args.config]["evals"], runs[args.baseline]["evals"])
    md = markdown(runs, checks)
    print("\n" + md)
    result = {"runs": runs, "targets": checks, "cpus": os.cpu_count(), "torch": torch.__version__,
              "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_result(args.out + ".json", result)
    Path(args.out + ".md").write_text(md)
    print(f"wrote {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
