"""Starting or joining Ray for a run, and keeping Ray's console to what a user needs to read.

Every padistill entry point (the CLI's steps, the toy teacher, the tests' fixture, the benchmarks) starts
a local Ray through `init_local`, so they share one set of quieting rules:

- Ray Train V2 patches `print` in its workers to tee into the redirected stdout *and* its logger, so a
  printed line reached the driver twice: the workers' environment switches the patch off
  (`RAY_TRAIN_ENABLE_PRINT_PATCH=0`) and `worker_log` writes to stdout itself.
- Ray Train's own INFO lines (worker-group notices; every `ray.train.report` of every rank, with the whole
  metrics dict) drown the progress lines: `train_logging_config` and `quiet_report_lines`.
- Train's detached PlacementGroupCleaner asks the State API every second whether its controller is alive.
  The State API is served by the dashboard, which a local Ray started here leaves out (memory and CPU on
  small machines), so every query failed and logged a warning: 3,201 lines in one toy-teacher run. The
  cleaner exists to free a placement group when its controller dies with the cluster still up; a local
  cluster dies with its driver. `quiet_worker`, run in every worker process of a local Ray, raises that
  logger to ERROR, and the autoscaling client's (a local Ray has no autoscaler). Without an address the
  State API reads the last `ray start` cluster's from /tmp/ray/ray_current_cluster, which a local Ray
  never rewrites: a dead cluster's address made each query wait 40 s for its GCS, and so every `fit`
  ~11 s after training ended (the cleaner's stop timeout), a live one's answers for the wrong cluster. A
  local Ray's workers get `RAY_API_SERVER_ADDRESS` pointing nowhere (`NO_API_SERVER`): each query fails
  at once with the State API's own error, the one the cleaner catches. On a real cluster (`ray.address`,
  `ray job submit`) nothing is changed.
- Three of Ray's own lines are dropped from the driver's console (`DRIVER_SKIP`, through Ray's
  `RAY_DEDUP_LOGS_SKIP_REGEX`, part of its log filter, on unless `RAY_DEDUP_LOGS=0`; they stay in the
  session's log files): the core worker's error that an actor with restarts has its constructor
  arguments in the object store, which Ray Data's actor pools and Ray Train's PreemptionWatcher trigger
  on every precompute step and training stage (ray#53727: a restart after losing them would fail,
  nothing padistill passes or can change), and the raylet's warning that more worker processes started
  than the CPU count, which padistill's fractional-CPU workers and actors cause by design on a small
  machine (a driver joining a cluster through `RAY_ADDRESS` keeps it). A third, the GCS's error that its
  KillActor call to an actor failed, appears in a normal run when the actor's worker has already exited
  (seen once in a demo, as an actor pool ended); Ray's developers call a failing KillActor the success
  path and later dropped the line (ray#53412, ray#58544). `quiet_driver` sets it, before Ray is imported
  (`jobs/__init__.py`, the benchmarks that start Ray).
- Library notices for their own authors are off in a local Ray's workers: DeepSpeed's "no accelerator
  found" (`DS_ACCELERATOR=cpu` where torch sees no GPU) and its "op built" print at `init_distributed`,
  Ray Data's deprecation of a field Ray Train sets, transformers' torchvision fallback.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
              "TRANSFORMERS_VERBOSITY": "error"}
# Where a local Ray's workers find the State API: nowhere (it runs no dashboard), so a query fails at once
# instead of reading another cluster's address from /tmp/ray/ray_current_cluster (see the module's docstring)
NO_API_SERVER = "http://127.0.0.1:0"
# Ray's lines the driver does not print (see the module's docstring)
WORKER_COUNT_WARNING = r"PYTHON worker processes have been started on node"
DRIVER_SKIP = (r"has constructor arguments in the object store and max_restarts > 0", WORKER_COUNT_WARNING,
               r"Failed to kill actor .*KillActor RPC failed for actor")
# Ray Data's own logging configuration with its console notices off (they go to its log file)
RAY_DATA_LOGGING = Path(__file__).with_name("assets") / "ray_data_logging.yaml"
# ... and in a padistill driver: the same with Ray Data's warnings kept on its console
RAY_DATA_DRIVER_LOGGING = Path(__file__).with_name("assets") / "ray_data_logging_driver.yaml"
# Ray Train loggers that only speak to a cluster service a local Ray does not run: the State API (the
# dashboard, left out) and the autoscaler ("Failed to send resource request ... safe to ignore", with a
# traceback, whenever the 2 cores are busy)
LOCAL_ONLY_NOISE = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
                    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client")


def quiet_driver() -> None:
    """Drop `DRIVER_SKIP`'s lines from this driver's console (a skip pattern the user set wins), and send
    this process's Ray Data notices to its log file (`RAY_DATA_DRIVER_LOGGING`, unless set). Ray reads
    the setting when it is imported: in a process that imported Ray already it has no effect. A driver
    that joins a cluster through `RAY_ADDRESS` (`ray job submit`) keeps the worker-count warning: on a
    real cluster it can mean a runaway of worker processes."""
    skip = [x for x in DRIVER_SKIP if not (os.environ.get("RAY_ADDRESS") and x == WORKER_COUNT_WARNING)]
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "|".join(skip))
    # a step run alone (`padistill encode`, `trajectories`, `evaluate`) runs Ray Data in this process: its
    # notices and logged progress (13 lines for the smoke's one encode unit, a block every few seconds on a
    # long one) go to ray-data.log, its warnings stay (`RAY_DATA_DRIVER_LOGGING`); padistill prints a line
    # per unit. A user's own Ray Data logging (a config, or JSON encoding) is left as it is
    if not os.environ.get("RAY_DATA_LOG_ENCODING"):
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_DRIVER_LOGGING))


def quiet_worker() -> None:
    """`worker_process_setup_hook` of a local Ray without a dashboard (see the module's docstring)."""
    for name in LOCAL_ONLY_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Ray Train's own DatasetManager sets a field Ray Data deprecated: a notice for Ray's authors, per stage
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions.exclude_resources` is deprecated")
    # the same cleaner's monitor thread dies with a 30-line traceback when its State API query times out
    # on busy cores (seen in one smoke run of three); on a local Ray it has nothing to clean anyway
    previous = threading.excepthook

    def drop_local_cleaner_crash(args) -> None:
        if args.thread is None or args.thread.name != "PlacementGroupCleanerMonitor":
            previous(args)

    threading.excepthook = drop_local_cleaner_crash


def quiet_libraries() -> None:
    """Library bars and notices off in a process of a run (a DAG step, a precompute actor, a training
    worker), where padistill prints its own lines (one per precompute unit, training report or
    evaluation): diffusers' and transformers' loading bars (evaluation loads three pipelines a stage, two
    bars each) and notices, and Ray Data's progress bars (they count the same units, redrawn as text lines
    in a log file). Ray Data's console notices are off in a local Ray's workers (`RAY_DATA_LOGGING`) and in a
    padistill driver (`RAY_DATA_DRIVER_LOGGING`)."""
    import diffusers
    import ray.data
    import transformers

    for lib in (diffusers.utils.logging, transformers.utils.logging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    ray.data.DataContext.get_current().enable_progress_bars = False
    # DeepSpeed's ZeRO calls it on every step: a notice for DeepSpeed's authors, printed per step
    warnings.filterwarnings("ignore", message=r"`torch.distributed.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


def local_runtime_env() -> dict:
    import torch

    env = {**WORKER_ENV, "RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_LOGGING), "RAY_API_SERVER_ADDRESS": NO_API_SERVER}
    if not torch.cuda.is_available():  # else DeepSpeed warns in every worker that it found no accelerator
        env["DS_ACCELERATOR"] = "cpu"
    return {"env_vars": env, "worker_process_setup_hook": f"{__name__}.quiet_worker"}


def init_local(num_cpus: int | None = None, log_to_driver: bool = True, **kw: Any) -> None:
    """Start a local Ray for this process (never silently joining another cluster on this machine)."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
             runtime_env=local_runtime_env(), **kw)


def ensure_ray(cfg) -> None:
    """Join the configured Ray cluster, or start a local one sized by `ray.num_cpus`; a no-op when
    this process is already connected (tests, `ray job submit`)."""
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=True)
    elif os.environ.get("RAY_ADDRESS"):  # a driver under `ray job submit`: join that cluster as it is
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        init_local(cfg.ray.num_cpus or None)


def fast_train_polls() -> None:
    """Ray Train's controller polls its worker group every 2 s (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`), and a
    fit's start, its checkpoints and its end each wait for a poll: the smoke's 4-step stage took 35-38 s at
    2 s and 29 s at 0.5 s (`padistill train-stage`, measured alternately, twice each). padistill asks for
    0.5 s unless the variable is set; a poll is one actor call, nothing against a real stage (a slow poll is
    waited on again; a worker is declared dead only after Ray's 600 s health-check timeout). Called in the
    process that builds a trainer, before its fit: Ray Train hands the variable on to its controller and
    workers. It stays set in that process and its children, for their later fits too."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def train_logging_config():
    """Ray Train's RunConfig logging: its INFO lines (the controller's worker-group and run-snapshot
    notices: 63 -> 38 lines in a resumed smoke stage) drown a run's progress; warnings and errors show."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="WARNING")


def quiet_report_lines() -> None:
    """In a Train worker: Ray Train (2.60) logs every `ray.train.report` of every rank at INFO
    ("Reporting training result ...", the whole metrics dict) through a logger named by its module's
    *file path*, outside "ray.train", so `train_logging_config` does not reach it."""
    try:
        from ray.train.v2._internal.execution import context as ray_train_context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)


def worker_log(prefix: str) -> Callable[..., None]:
    """A console logger for a Ray Train worker that writes to stdout itself (one line per call, whether
    or not Train's print patch is on)."""
    def log(*a) -> None:
        sys.stdout.write(" ".join([prefix, *map(str, a)]) + "\n")
        sys.stdout.flush()
    return log
