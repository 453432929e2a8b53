"""Arms of a variant experiment over training seeds: one table of mean [min, max] per arm, from finished run roots.

    python benchmarks/seed_table.py --seeds 0,1,2 --out benchmarks/results/long_1step_fashion \
        --arm "shipped" toy_fashion "runs/bench_fashion/toy_fashion-s{seed}" \
        --arm "240 updates" toy_fashion "runs/s48/long1-toy_fashion-s{seed}" stages.3.conditional_steps=160 …

Each `--arm LABEL CONFIG ROOT [SET …]`: a config name or path, a run root (`{seed}` in it stands for each
seed), and the `--set` overrides the runs were made with (beside `train.seed=<seed>`, the `--benchmark`'s own
overrides and the `--set` ones, added for every run). A run is reported only when every step of it finished
with exactly these settings (the benchmark's own `finished`, as `distill` judges its manifests), so a table
cannot mix a changed config's figures in. The table is the benchmark's `comparison_table` (the teacher's rows,
each arm's start of stage and student at every step count); `--steps` keeps some step counts. Writes <out>.md
(with this command line) and <out>.json (every run's metrics at those step counts, and its stages' games: held
MSE, D's accuracy).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.distill import BENCHMARKS, comparison_table, finished  # noqa: E402
from benchmarks.results_io import int_list, write_report  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", nargs="+", action="append", required=True, metavar="LABEL CONFIG ROOT [SET]",
                   help="an arm: its label, config, run root with {seed}, and the --set overrides it ran with")
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2],
                   help="training seeds, comma-separated (default 0,1,2)")
    p.add_argument("--benchmark", choices=sorted(BENCHMARKS), default="fashion",
                   help="whose run roots the arms copied: every run has that benchmark's overrides (default "
                   f"fashion, the sharp benchmark: {' '.join(BENCHMARKS['fashion']['set'])})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another override every run had (repeatable)")
    p.add_argument("--steps", type=int_list, default=[],
                   help="student step counts to keep, comma-separated (default all)")
    p.add_argument("--title", default="", help="the Markdown file's heading (what the experiment asks)")
    p.add_argument("--note", default="", help="a paragraph under the heading (how the runs were made)")
    p.add_argument("--out", required=True, help="output path without extension")
    a = p.parse_args(argv)
    labels = [arm[0] for arm in a.arm]
    if len(set(labels)) != len(labels):
        p.error(f"--arm: each arm needs its own label ({', '.join(labels)})")
    for arm in a.arm:
        if len(arm) < 3:
            p.error(f"--arm {' '.join(arm)}: needs LABEL CONFIG ROOT, then any SETs")
        if "{seed}" not in arm[2] and len(a.seeds) > 1:
            p.error(f"--arm {arm[0]}: the run root {arm[2]!r} has no {{seed}} in it, and --seeds names several")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    seeds, keep = a.seeds, set(a.steps)
    base = [*BENCHMARKS[a.benchmark]["set"], *a.set]
    arms, missing = {}, []
    for label, config, root, *sets in a.arm:
        runs = [finished(config, root.format(seed=s), [*base, f"train.seed={s}", *sets]) for s in seeds]
        missing += [f"{label}: {root.format(seed=s)}" for s, r in zip(seeds, runs) if r is None]
        arms[label] = runs
    if missing:
        raise SystemExit("not finished with these settings (run them first):\n  " + "\n  ".join(missing))
    if keep:
        arms = {label: [{**r, "evals": [e for e in r["evals"] if e["student_steps"] in keep]} for r in runs]
                for label, runs in arms.items()}
        lacking = [f"{label}: {r['run_root']}" for label, runs in arms.items() for r in runs
                   if {e["student_steps"] for e in r["evals"]} != keep]
        if lacking:
            raise SystemExit(f"--steps {','.join(map(str, a.steps))}: not every step count evaluated in:\n  "
                             + "\n  ".join(lacking))
    command = "python benchmarks/seed_table.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    heading = (f"# {a.title}\n\n" if a.title else "") + (f"{a.note}\n\n" if a.note else "")
    md = (f"{heading}Training seeds {', '.join(map(str, seeds))}, mean [min, max]; each run checked finished with "
          f"its settings. Written by\n\n    {command}\n\n{comparison_table(arms)}\n")
    runs_of = {label: [{"seed": s, **{k: r[k] for k in ("run_root", "overrides", "evals", "games")}}
                       for s, r in zip(seeds, runs)] for label, runs in arms.items()}
    result = {"title": a.title, "command": command, "arms": runs_of}
    write_report(a.out, result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
