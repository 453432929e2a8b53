"""Process helpers for tests that really kill jobs (no mocks): a job started with
start_new_session=True is killed together with every process of its session."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def _session_pids(sid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # field 6 of /proc/PID/stat: session id
                pids.append(int(d))
    return pids


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a job started with start_new_session=True and every process of its session: the
    local Ray it started (Ray puts its workers in their own process groups, not sessions)."""
    deadline = time.monotonic() + 60
    while True:
        pids = _session_pids(proc.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.wait(timeout=60)
        if not pids or not _session_pids(proc.pid):
            return
        assert time.monotonic() < deadline, f"processes of session {proc.pid} survive SIGKILL"
        time.sleep(0.05)


def kill_when(args: list[str], ready, log_path, timeout: float = 240, what: str = "the signal", every: float = 0.05,
              **popen) -> None:
    """Start `args` as a job in its own session and SIGKILL it (and its Ray) once `ready()` is true: the
    real signal a kill test waits for, polled `every` seconds (more where `ready` asks S3: each poll costs
    the job CPU on a small machine), never a fixed sleep. Fails if the job ends first."""
    from pathlib import Path

    log_path = Path(log_path)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen)
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, f"no {what} in time"
                time.sleep(every)
        finally:
            kill_session(proc)


def kill_at_first_commit(args: list[str], marker_dir, log_path, timeout: float = 240, **popen) -> None:
    """`kill_when` a unit's commit marker appears in `marker_dir`."""
    from pathlib import Path

    marker_dir = Path(marker_dir)
    kill_when(args, lambda: marker_dir.exists() and any(marker_dir.glob("*.json")), log_path, timeout,
              what="unit committed", **popen)
