"""The run as a DAG of resumable steps, executed as Ray tasks chained by their dependencies:

    encode ─► traj-1 ─► train-1 ─► traj-2 ─► train-2 ─► … ─► report
                            └──► eval-1 (beside traj-2)  └──► eval-2 (after eval-1)

(train-K trains stage K and exports its student to `stages/<K>-<name>/model/`, the teacher of K+1.
Evaluations run one after another: eval-1 samples the base teacher and caches its samples for the
others, which would otherwise each sample it again at the same time.)

Each step is idempotent: it skips itself when its manifest exists with matching input hashes, resumes
from its own checkpoints/shards when interrupted, and writes its manifest last. So rerunning the same
command after a crash or Ctrl-C finishes the run with the same outputs, and rerunning a finished run only
writes its report again, without starting Ray. Orchestration tasks ask for
`num_cpus=0` (the Ray Data and Ray Train work they start takes the CPUs), so nothing deadlocks on a
2-CPU machine."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from dataclasses import dataclass, field
from typing import Callable

from .config import ConfigError, RunConfig
from .errors import MissingInputError
from .layout import TIMINGS_DIR
from .storage import RunStorage



@dataclass
class Step:
    name: str
    run: Callable[[RunConfig], dict]
    deps: list[str] = field(default_factory=list)
    # the step's manifest when it is finished with today's inputs, else None; asked without Ray. None: the
    # step always runs, as the report does
    finished: Callable[[RunConfig], dict | None] | None = None
    # whether a finished step's committed files verify, given its manifest (steps that commit Parquet units);
    # says which do not through `log=`
    intact: Callable[..., bool] | None = None


def _encode(cfg):
    from .encode import run_encode

    return run_encode(cfg)


def _traj(k):
    def run(cfg):
        from .trajectories import run_trajectories

        return run_trajectories(cfg, k)
    return run


def _train(k):
    def run(cfg):
        from .train import run_train_stage

        return run_train_stage(cfg, k)
    return run


def _eval(k):
    def run(cfg):
        from .evaluate import run_evaluate

        return run_evaluate(cfg, k)
    return run


def _asked(module: str, what: str, *key):
    """`pipeline.<module>.<what>(cfg, *key, …)`, imported when asked (a step's `finished` or `intact`)."""
    def ask(cfg, *args, **kw):
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{module}"), what)(cfg, *key, *args, **kw)
    return ask


def finished_manifests(cfg: RunConfig, steps: list[Step]) -> dict[str, dict | None]:
    """Each step's manifest when it is finished with today's inputs, else None, by manifests alone (no file
    read, no Ray); the report, which always runs, is not among them."""
    return {s.name: s.finished(cfg) for s in steps if s.finished is not None}


def all_finished(cfg: RunConfig, steps: list[Step], log=print) -> bool:
    """Whether every step but the report is finished with today's inputs: first by their manifests alone,
    then, only if all are, by their committed files (one read of every file)."""
    manifests = finished_manifests(cfg, steps)
    if None in manifests.values():
        return False
    return all(s.intact is None or s.intact(cfg, manifests[s.name], log=log) for s in steps if s.name in manifests)


def _report(cfg):
    from .report import write_report

    return write_report(cfg, [s.name for s in build_steps(cfg)])


def build_steps(cfg: RunConfig) -> list[Step]:
    """All steps of a run, in a valid execution order."""
    steps = [Step("encode", _encode, finished=_asked("encode", "finished"), intact=_asked("encode", "intact"))]
    for k, st in enumerate(cfg.stages, start=1):
        teacher = cfg.teacher_of(k)
        traj_deps = ["encode"] + ([f"train-{teacher}"] if teacher else [])
        steps += [Step(f"traj-{k}", _traj(k), traj_deps, _asked("trajectories", "finished", k),
                       _asked("trajectories", "intact", k)),
                  Step(f"train-{k}", _train(k), [f"traj-{k}"] + ([f"train-{cfg.student_init_of(k)}"]
                                                                    if cfg.student_init_of(k) not in (None, teacher)
                                                                    else []), _asked("train", "finished", k)),
                  Step(f"eval-{k}", _eval(k), [f"train-{k}"] + ([f"eval-{k - 1}"] if k > 1 else []),
                       _asked("evaluate", "finished", k))]
    steps.append(Step("report", _report, [f"eval-{k}" for k in range(1, len(cfg.stages) + 1)]))
    return steps


def select(steps: list[Step], cfg: RunConfig, until: str | None = None, only: str | None = None) -> list[Step]:
    """--until STAGE: every step up to and including that stage's eval (and a report of what exists);
    --only STEP: that step alone (its inputs must be finished: `run_dag` checks, `check_only_inputs`)."""
    names = [s.name for s in steps]
    if only is not None:
        if only not in names:
            raise ConfigError(f"--only {only!r}: no such step (steps: {', '.join(names)})")
        return [s for s in steps if s.name == only]
    if until is not None:
        k, _ = cfg.stage(until)
        keep = {"encode"} | {f"{p}-{i}" for i in range(1, k + 1) for p in ("traj", "train", "eval")}
        out = [s for s in steps if s.name in keep]
        return out + [Step("report", _report, [f"eval-{i}" for i in range(1, k + 1)])]
    return steps


def stale_upstream(cfg: RunConfig, name: str) -> list[str]:
    """The steps upstream of step `name` (its inputs, theirs, ...; not the evaluation before an evaluation, which
    only orders them) that are not finished with today's settings, in DAG order; by manifests, without Ray."""
    steps = build_steps(cfg)
    by_name = {s.name: s for s in steps}
    upstream, todo = set(), [d for d in by_name[name].deps if not d.startswith("eval-")]
    while todo:
        d = todo.pop()
        if d not in upstream:
            upstream.add(d)
            todo += [e for e in by_name[d].deps if not e.startswith("eval-")]
    return [n for n, m in finished_manifests(cfg, [s for s in steps if s.name in upstream]).items() if m is None]


def check_only_inputs(cfg: RunConfig, name: str, what: str | None = None) -> None:
    """A step run alone (`--only STEP`, `padistill evaluate --stage K`) uses what its inputs' manifests name, so
    every step upstream of it must be finished with today's settings; else it would take a stale output for
    today's (an evaluation scoring a student trained from an earlier stage 1, whose own manifests still match
    each other). Raises MissingInputError naming them."""
    if stale := stale_upstream(cfg, name):
        raise MissingInputError(
            f"{what or f'--only {name}'}: {', '.join(stale)} {'is' if len(stale) == 1 else 'are'} not finished "
            f"with these settings (not run yet, or run with other settings since). If the run was made with other "
            f"settings, pass them (`--config <run root>/config.yaml` holds its last); else bring "
            f"{'it' if len(stale) == 1 else 'them'} up to date first: `padistill distill` (with --until STAGE to stop "
            f"there) runs what is missing")


def _timed(step: Step, cfg: RunConfig) -> dict:
    storage = RunStorage.from_config(cfg)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    manifest = step.run(cfg) or {}
    seconds = time.perf_counter() - t0
    finished = manifest.get("finished_at")
    ran = finished is None or datetime.fromisoformat(finished) >= started
    # a step that found itself finished returns at once: keep the time of the run that did the work
    if ran:
        storage.write_json(f"{TIMINGS_DIR}/{step.name}.json", {"step": step.name, "seconds": round(seconds, 3)})
    return {"step": step.name, "seconds": seconds, "ran": ran}


def _rerun_finished(cfg: RunConfig, steps: list[Step], storage: RunStorage, log) -> list[dict]:
    """A run whose every step but the report is finished: the report is written again, here, and the
    others are said to be skipped, as the DAG says it."""
    results = []
    for s in steps:
        r = _timed(s, cfg) if s.name == "report" else {"step": s.name, "seconds": 0.0, "ran": False}
        log(_said(r))
        results.append(r)
    _check_outputs(storage)
    return results


def _said(r: dict) -> str:
    """The console line of a step's end (tests and users grep it)."""
    return f"padistill distill: {r['step']} {'done' if r['ran'] else 'already finished, skipped'} in {r['seconds']:.1f}s"


def _check_outputs(storage: RunStorage) -> None:
    missing = storage.missing_outputs()
    if missing:  # a step that says it wrote what it did not is a bug, not a user's mistake
        raise RuntimeError(f"{storage.url()}: manifests list outputs that do not exist: {'; '.join(missing[:20])}")


def run_dag(cfg: RunConfig, until: str | None = None, only: str | None = None, log=print) -> list[dict]:
    """Run the selected steps as Ray tasks, each starting when its dependencies have finished; when every
    step but the report is finished (and this process has no Ray yet), write the report without Ray."""
    import ray

    from . import cluster

    from .zoo import family_module

    family_module(cfg)  # a wrong path, family or stage setting for it fails here in one line, not in an actor
    storage = RunStorage.from_config(cfg)
    steps = select(build_steps(cfg), cfg, until, only)
    if only is not None and not cfg.ray.address:  # through a Ray client the driver may not see the data: not asked
        check_only_inputs(cfg, only)
    storage.write_text("config.yaml", cfg.to_yaml())
    if not cfg.data.toy and any(s.name.startswith("eval-") for s in steps):
        from . import real_metrics

        real_metrics.check(cfg.evaluate, cfg.model.resolution)  # before hours of training, not after
    # nothing to compute: the report is written here and no Ray starts. Not asked through a Ray client
    # (`ray.address`), whose driver may not see the data; damaged files are said once, by their step on Ray
    if not ray.is_initialized() and not cfg.ray.address and all_finished(cfg, steps, log=lambda *_: None):
        return _rerun_finished(cfg, steps, storage, log)
    cluster.ensure_ray(cfg)

    @ray.remote(num_cpus=0, max_retries=0)
    def run_step(step: Step, cfg_json: str, *deps):
        cluster.quiet_libraries()
        return _timed(step, RunConfig.model_validate_json(cfg_json))

    refs: dict[str, "ray.ObjectRef"] = {}
    names = {s.name for s in steps}
    cfg_json = cfg.model_dump_json()
    for s in steps:
        deps = [refs[d] for d in s.deps if d in names]
        refs[s.name] = run_step.options(name=f"padistill:{s.name}").remote(s, cfg_json, *deps)
    results = []
    pending = list(refs.values())
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        r = ray.get(done[0])  # raises the step's own error, with its traceback
        log(_said(r))
        results.append(r)
    _check_outputs(storage)
    return results
