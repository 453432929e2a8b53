"""The run-root lease (`pipeline.lease`): one writer per run root. Two real processes on a local root
(the second refuses in one line naming the first; after the first is killed the second takes over and
says so), and the S3 protocol on a real endpoint (moto): conditional PUTs, a refused second holder, a
stale lease of a crashed remote holder taken over, and a holder that notices it lost the lease."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import StorageConfig
from pipeline.lease import LEASE, RunLease, RunRootBusy
from pipeline.storage import RunStorage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import kill_session  # noqa: E402
from reliability import record

REPO = Path(__file__).resolve().parent.parent


def _job(module: str, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", f"jobs.{module}", "--config", "smoke", "--set", f"run_root={root}", *extra]


def test_a_second_run_on_a_held_root_refuses_and_takes_over_once_the_first_is_killed(tmp_path, request):
    root = tmp_path / "run"
    first = subprocess.Popen(_job("distill", root), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (root / LEASE).exists():  # the real signal: the first run's lease in the run root
            assert first.poll() is None and time.monotonic() < deadline, "the first run took no lease"
            time.sleep(0.05)
        held = json.loads((root / LEASE).read_text())
        assert held["pid"] == first.pid and held["job"] == "distill"
        second = subprocess.run(_job("export", root, "--stage", "1"), cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and f"in use by `padistill distill` on {held['host']} (pid {first.pid}" in err[0], err
        assert json.loads((root / LEASE).read_text())["pid"] == first.pid  # the holder's lease untouched
    finally:
        kill_session(first)
    # the first run is gone (killed, as by an OOM or a lost node): the next run takes over at once, says
    # so, runs (here: stops at its own missing input) and releases the lease
    third = subprocess.run(_job("export", root, "--stage", "1"), cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert third.returncode == 2 and "no checkpoint" in third.stderr.lower() + third.stdout.lower(), third.stderr
    assert f"took over the run root's lease from `padistill distill` on {held['host']} (pid {first.pid}" \
        in third.stdout and "no longer runs on this host" in third.stdout, third.stdout
    assert not (root / LEASE).exists()
    record(request, "two runs on one run root; then the holder killed (same host)",
           "the second stops with one line naming the holder (host, pid, Ray job, start, heartbeat age); once "
           "the holder is killed the next run takes the lease over at once and logs it", injected=2, completed=1)


def test_the_s3_lease_is_a_conditional_put_and_a_stale_one_is_taken_over(s3_endpoint, request):
    st = RunStorage("s3://padistill-test/lease-run", StorageConfig(endpoint_url=s3_endpoint))
    logs: list[str] = []
    a = RunLease(st, "distill", timeout_s=60, log=logs.append).acquire()
    with pytest.raises(RunRootBusy, match=r"in use by `padistill distill` on .* heartbeat \d+ s ago"):
        RunLease(st, "encode", timeout_s=60).acquire()
    a.release()
    assert not st.exists(LEASE)

    # what a holder that crashed on another machine leaves: a lease whose heartbeat stopped 2 minutes ago
    crashed = {"host": "node-7", "pid": 4242, "job": "distill", "ray_job": "raysubmit_x", "token": "t",
               "started": time.time() - 3600, "heartbeat": time.time() - 120}
    st.write_json(LEASE, crashed)
    with pytest.raises(RunRootBusy, match="node-7 .*Ray job raysubmit_x"):
        RunLease(st, "encode", timeout_s=600).acquire()  # 2 minutes is within a 10-minute timeout
    b = RunLease(st, "encode", timeout_s=60, log=logs.append).acquire()
    assert "took over the run root's lease from `padistill distill` on node-7" in logs[-1]
    assert "heartbeat is 120 s old, over storage.lease_timeout_s=60" in logs[-1]
    assert json.loads(st.read_text(LEASE))["token"] == b.holder["token"]

    # another run takes it (b's heartbeat stalled past the timeout): b's next conditional beat fails,
    # b says it lost the lease and does not delete the new holder's lease on release
    st.write_json(LEASE, {**crashed, "host": "node-8", "heartbeat": time.time()})
    b._stop.set()
    b._thread.join()
    b._stop.clear()
    b._beat_once()
    assert b.lost and "lost the run root's lease" in logs[-1]
    b.release()
    assert json.loads(st.read_text(LEASE))["host"] == "node-8"
    record(request, "a lease holder crashed on another machine (S3); a holder whose lease was taken over",
           "its lease is taken over once its heartbeat is older than `storage.lease_timeout_s`, logged; the old "
           "holder's next conditional PUT fails, it reports the loss and leaves the new lease alone",
           injected=2, completed=1)
