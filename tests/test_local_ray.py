"""A local Ray started by padistill (`pipeline.cluster.init_local`, what the CLI, the toy teacher and this
suite's fixture use) keeps Ray Train's noise off the console in every worker process it starts: tasks,
actors, and detached actors like Train's PlacementGroupCleaner, whose State API queries fail without a
dashboard (3,201 warnings in one toy-teacher run before this)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ray

from pipeline import cluster

REPO = Path(__file__).resolve().parent.parent


def test_every_worker_of_a_local_ray_is_quiet(ray_local):
    names = cluster.LOCAL_ONLY_NOISE  # defined here, the functions travel by value (tests/ is not on workers)

    def _state() -> dict:
        import contextlib
        import io
        import threading

        err = io.StringIO()
        with contextlib.redirect_stderr(err):  # Train's cleaner thread crashing, and any other thread
            for name in ("PlacementGroupCleanerMonitor", "another-thread"):
                t = threading.Thread(target=lambda: 1 / 0, name=name)
                t.start()
                t.join()
        return {"levels": {n: logging.getLogger(n).getEffectiveLevel() for n in names},
                "print_patch": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH"),
                "hub_offline": os.environ.get("HF_HUB_OFFLINE"),
                "library_notices": (os.environ.get("DS_ACCELERATOR"), os.environ.get("TRANSFORMERS_VERBOSITY")),
                "thread_crashes_shown": ["PlacementGroupCleanerMonitor" in err.getvalue(),
                                         "another-thread" in err.getvalue() and "ZeroDivisionError" in err.getvalue()]}

    @ray.remote(num_cpus=0)
    def _task_state() -> dict:
        return _state()

    @ray.remote(num_cpus=0)
    class _Probe:
        def state(self) -> dict:
            return _state()

    quiet = {n: logging.ERROR for n in cluster.LOCAL_ONLY_NOISE}
    expected = {"levels": quiet, "print_patch": "0", "hub_offline": "1", "library_notices": ("cpu", "error"),
                "thread_crashes_shown": [False, True]}  # (this machine has no GPU: DeepSpeed told it is CPU)
    assert ray.get(_task_state.remote()) == expected
    probe = _Probe.remote()
    assert ray.get(probe.state.remote()) == expected
    # a detached actor, as Train starts its cleaner, gets the same set-up
    detached = _Probe.options(lifetime="detached", name="padistill-test-probe").remote()
    try:
        assert ray.get(detached.state.remote()) == expected
    finally:
        ray.kill(detached)
    # the driver itself is untouched: only Ray's worker processes are quieted
    assert logging.getLogger(cluster.LOCAL_ONLY_NOISE[0]).level != logging.ERROR


def test_the_state_api_of_a_local_ray_fails_at_once_instead_of_asking_another_cluster(ray_local):
    """A local Ray runs no dashboard, so Ray's State API has no server in it; without an address it reads
    the last `ray start` cluster's from /tmp/ray/ray_current_cluster, a file a local Ray never rewrites.
    Train's PlacementGroupCleaner asks it each second whether its controller lives: with a dead cluster's
    address each query waited 40 s for that GCS, holding every `fit` ~11 s after training ended (the
    cleaner's stop timeout; the smoke run's three stages, and this suite after its `ray start` tests), and
    a live one answers for the wrong cluster. In a local Ray's workers the query fails at once with the
    State API's own error, the one the cleaner catches."""
    from ray._common.utils import get_ray_address_file

    address_file = get_ray_address_file(None)
    before = Path(address_file).read_text() if os.path.exists(address_file) else None

    @ray.remote(num_cpus=0)
    def _ask() -> tuple[str, bool, float]:
        import time

        from ray.util.state import get_actor
        from ray.util.state.exception import RayStateApiException

        t0 = time.monotonic()
        try:
            get_actor("ff" * 16, timeout=5)
            return "answered", False, time.monotonic() - t0
        except Exception as e:  # noqa: BLE001  (which error is what this test checks)
            return type(e).__name__, isinstance(e, RayStateApiException), time.monotonic() - t0

    try:
        Path(address_file).write_text("127.0.0.1:1")  # a cluster `ray start` left behind, long gone
        name, state_api_error, took = ray.get(_ask.remote())
    finally:
        if before is None:
            os.remove(address_file)
        else:
            Path(address_file).write_text(before)
    assert state_api_error and took < 5, (name, took)


def test_ray_data_notices_stay_off_the_console_of_a_local_ray(ray_local):
    """Ray Data reconfigures its logger on every execution in a worker; the configuration file the local
    Ray's workers get keeps its console at ERROR and its log file on."""

    @ray.remote(num_cpus=0)
    def _ray_data_handlers() -> dict:
        import ray.data  # noqa: F401  (configures the logger on import)
        from ray.data._internal.logging import configure_logging

        configure_logging()  # what each dataset execution in a worker does again
        return {type(h).__name__: h.level for h in logging.getLogger("ray.data").handlers}

    handlers = ray.get(_ray_data_handlers.remote())
    assert handlers == {"SessionFileHandler": logging.NOTSET, "PlainRayHandler": logging.ERROR}


def test_quiet_libraries_turns_the_loading_and_progress_bars_off():
    import diffusers
    import ray.data
    import transformers

    ctx = ray.data.DataContext.get_current()
    before = ctx.enable_progress_bars
    try:
        cluster.quiet_libraries()
        assert not diffusers.utils.logging.is_progress_bar_enabled()
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert not ctx.enable_progress_bars
        assert transformers.utils.logging.get_verbosity() == logging.ERROR
    finally:
        ctx.enable_progress_bars = before
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()
        diffusers.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()


def test_worker_log_writes_each_line_once(capfd):
    cluster.worker_log("[train 1-8step]")("step", 3, "loss", 0.5)
    assert capfd.readouterr().out == "[train 1-8step] step 3 loss 0.5\n"


def test_the_driver_drops_rays_known_harmless_lines():
    """The lines `cluster.DRIVER_SKIP` names (Ray Data's and Ray Train's actors with constructor arguments in
    the object store, one error line per precompute step and training stage; the raylet's worker-count
    warning; the GCS's error that it could not kill an actor already gone, seen once in a demo) go through
    a padistill driver's Ray log filter and are dropped; other lines are printed. A driver that joins a
    cluster through RAY_ADDRESS keeps the worker-count warning. Run in a fresh interpreter: Ray reads the
    setting at import, as in the CLI."""
    script = textwrap.dedent("""
        import json, os
        os.environ.pop("RAY_DEDUP_LOGS_SKIP_REGEX", None)
        os.environ.pop("RAY_DEDUP_LOGS", None)  # the suite turns the filter off (conftest); a user has it on
        import jobs  # the CLI's package: sets the filter before Ray is imported
        from ray._private.ray_logging import stdout_deduplicator
        lines = [
            "[2026-11-30 22:51:23,523 E 23484 23560] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
            "and ID: '64b8' has constructor arguments in the object store and max_restarts > 0. If the arguments in "
            "the object store go out of scope or are lost, the actor restart will fail.",
            "WARNING: 10 PYTHON worker processes have been started on node: c0b2 with address: 192.0.2.2, which is "
            "5x the maximum expected startup concurrency (2).",
            "[2026-12-04 15:14:38,489 E 24631 24631] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor "
            "58fadd0f51fe267148db16a201000000, return status: Invalid: KillActor RPC failed for actor "
            "58fadd0f51fe267148db16a201000000: RpcError: RPC error: Socket closed rpc_code: 14",
            "[train 1-8step] step 10/60 mse loss=0.01727 10.8 samples/s",
            "padistill encode: 1 units, 0 already committed, 1 to run",
        ]
        out = stdout_deduplicator.deduplicate({"ip": "192.0.2.2", "pid": 1, "lines": lines})
        print(json.dumps([ln for b in out for ln in b["lines"]]))
    """)

    def printed(**env) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
        r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return [ln.split(":")[0] for ln in json.loads(r.stdout.strip().splitlines()[-1])]

    assert printed() == ["[train 1-8step] step 10/60 mse loss=0.01727 10.8 samples/s", "padistill encode"]
    assert printed(RAY_ADDRESS="127.0.0.1:6379") == [  # nothing connects: Ray's filter is all that runs
        "WARNING", "[train 1-8step] step 10/60 mse loss=0.01727 10.8 samples/s", "padistill encode"]


def test_a_stage_prints_a_handful_of_progress_lines_and_logs_every_step_it_records():
    """The console gets about six progress lines a stage, on steps the history records (multiples of
    `train.log_every`), and always the last; the history keeps every `log_every` step. The demo's stages
    (240, 160, 160, 200 steps at log_every 10, a 100-step D warm-up in each adversarial one) print 6, 6, 6
    and 5 lines (every step they record would be 24, 16, 16, 20)."""
    from pipeline.config import load_config
    from pipeline.phases import plan_phases
    from pipeline.train_worker import console_steps

    def lines(total, log_every):
        at = console_steps(total, log_every)  # the set the worker's loop prints at
        assert all(s % log_every == 0 or s == total for s in at) and total in at
        return len(at)

    cfg = load_config("toy_fashion")
    totals = [plan_phases(st)[-1].end for st in cfg.stages]
    assert totals == [960, 160, 160, 200]
    assert [lines(t, cfg.train.log_every) for t in totals] == [6, 6, 6, 5]
    assert lines(40, 1) == 6 and lines(3, 1) == 3 and lines(10_000, 10) == 6 and lines(7, 10) == 1
    assert max(console_steps(240, 10, end=100)) == 100  # a run cut short (max_steps) still prints its last step


def test_ray_trains_controller_polls_every_half_second_unless_the_user_says():
    """`fast_train_polls` (called before every fit) asks Ray Train's controller for a poll every 0.5 s, and
    keeps a value the user set."""
    var = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    code = f"import os; from pipeline import cluster; cluster.fast_train_polls(); print(os.environ[{var!r}])"
    env = {k: v for k, v in os.environ.items() if k != var}
    got = [subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip() for e in (env, {**env, var: "3"})]
    assert got == ["0.5", "3"]
