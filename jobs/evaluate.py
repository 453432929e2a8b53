"""`padistill evaluate`: sample students and the teacher with fixed prompts and seeds, score, write grids."""

from __future__ import annotations

import sys

from jobs.common import add_config_args, config_from_args, job_main

NAME = "evaluate"
WRITES_RUN_ROOT = True  # holds the run root's lease while it runs (pipeline.lease)
HELP = ("sample each stage's student at its step count and the teacher at 32 and at the student's steps "
        "(fixed prompts and seeds), score them (the toy metrics, or on a non-toy run FID-Whole, FID-Patch and CLIP "
        "score from the weights set in evaluate.*), write grids, metrics.json and the model cards")


def add_arguments(p) -> None:
    add_config_args(p)
    p.add_argument("--stage", action="append", default=None,
                   help="stage index (1-based) or name; repeatable (default: every stage with a model)")
    p.add_argument("--force", action="store_true", help="re-evaluate even when up to date")
    p.add_argument("--report", action="store_true", help="also rewrite <root>/report.md")


def run(args) -> int:
    from pipeline.dag import build_steps, check_only_inputs, stale_upstream
    from pipeline.evaluate import run_evaluate
    from pipeline.report import write_report
    from pipeline.storage import RunStorage

    cfg = config_from_args(args)
    storage = RunStorage.from_config(cfg)
    if args.stage:  # a named stage's student, when there is one, must come from these settings (else refused)
        keys = [cfg.stage(k)[0] for k in args.stage]
        for k in keys:
            if storage.exists(f"{cfg.stage_dir(k)}/model/model_index.json"):
                check_only_inputs(cfg, f"eval-{k}", f"--stage {k}")
    else:  # every stage with a model, but not one trained under other settings than these
        keys = []
        for k in range(1, len(cfg.stages) + 1):
            if storage.exists(f"{cfg.stage_dir(k)}/model/model_index.json"):
                if stale := stale_upstream(cfg, f"eval-{k}"):
                    print(f"padistill evaluate: stage {k} skipped: its student is not from these settings "
                          f"({', '.join(stale)} not finished with them)", file=sys.stderr)
                else:
                    keys.append(k)
    if not keys:
        print(f"padistill evaluate: no stage of {storage.url()} has an exported model from these settings yet",
              file=sys.stderr)
        return 2
    for k in keys:
        run_evaluate(cfg, k, force=args.force)
    if args.report:
        write_report(cfg, [s.name for s in build_steps(cfg)])
    return 0


if __name__ == "__main__":
    sys.exit(job_main(sys.modules[__name__]))
