"""The run-root lease: one writer per run root. `padistill distill` and each standalone job that writes a
run root hold `<root>/_lease.json` (holder host, pid, job, start time, heartbeat) while they run.

- Taking it is an atomic create: on local disk a hard link of a finished file (fails if the name
  exists), on S3 a conditional PUT (`If-None-Match: *`).
- A second run on a held root stops with one line naming the holder.
- The holder rewrites the heartbeat every `storage.lease_timeout_s / 5` seconds, conditionally (on S3
  `If-Match` its last ETag; locally under an `flock` of `_lease.lock`), so it notices a takeover.
- A lease is taken over, and the takeover logged, when its heartbeat is older than
  `storage.lease_timeout_s` (the holder crashed on another machine), or at once when its holder was a
  process on this host that no longer runs (a killed run, rerun on the same machine). The takeover is
  the same conditional write: of two runs racing for a dead lease, one wins.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from .errors import PadistillError
from .storage import RunStorage

LEASE = "_lease.json"


class RunRootBusy(PadistillError):
    """Another run holds the run root's lease."""


def _pid_running(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class _Local:
    """Compare-and-swap of one small file on local disk: create by hard link, replace under flock."""

    def __init__(self, storage: RunStorage):
        self.path = storage.path(LEASE)
        self.lock = storage.path("_lease.lock")
        storage.makedirs("")

    def _tmp(self, body: bytes) -> str:
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(body)
        return tmp

    def create(self, body: bytes):
        tmp = self._tmp(body)
        try:
            os.link(tmp, self.path)
            return body
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)

    def read(self):
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            return data, data
        except FileNotFoundError:
            return None, None

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        with open(self.lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def replace(self, body: bytes, expect):
        with self._locked():
            if self.read()[1] != expect:
                return None
            os.replace(self._tmp(body), self.path)
            return body

    def delete(self, expect) -> None:
        with self._locked():
            if self.read()[1] == expect:
                os.unlink(self.path)


class _S3:
    """Compare-and-swap of one object on S3: conditional PUTs (`If-None-Match: *`, `If-Match: <ETag>`)."""

    def __init__(self, storage: RunStorage):
        self.fs = storage.fs
        self.bucket, self.key = storage.path(LEASE).split("/", 1)

    def _put(self, body: bytes, **cond):
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, **cond)["ETag"]
        except FileExistsError:  # s3fs's 412 for If-None-Match: the object exists
            return None
        except OSError as e:  # 412 for If-Match (the ETag moved on); 409: a concurrent conditional write
            if any(c in str(e) for c in ("pre-conditions", "PreconditionFailed", "ConditionalRequestConflict")):
                return None
            raise

    def create(self, body: bytes):
        return self._put(body, IfNoneMatch="*")

    def read(self):
        try:
            r = self.fs.call_s3("get_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            return None, None
        from fsspec.asyn import sync

        return sync(self.fs.loop, r["Body"].read), r["ETag"]  # body and ETag of one and the same version

    def replace(self, body: bytes, expect):
        return self._put(body, IfMatch=expect)

    def delete(self, expect) -> None:
        if self.read()[1] == expect:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)


class RunLease:
    """`with RunLease(storage, job, timeout_s):` holds the run root for the block."""

    def __init__(self, storage: RunStorage, job: str, timeout_s: float, log=print):
        self.storage, self.timeout_s, self.log = storage, float(timeout_s), log
        self.store = _S3(storage) if storage.scheme == "s3" else _Local(storage)
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "job": job,
                       "ray_job": os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID"),
                       "token": uuid.uuid4().hex, "started": time.time()}
        self.version = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.holder, "heartbeat": time.time()}, sort_keys=True).encode()

    def describe(self, h: dict) -> str:
        age = time.time() - float(h.get("heartbeat", 0))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h.get("started", 0))))
        job = f", Ray job {h['ray_job']}" if h.get("ray_job") else ""
        return (f"`padistill {h.get('job')}` on {h.get('host')} (pid {h.get('pid')}{job}, started {started}, "
                f"heartbeat {age:.0f} s ago)")

    def _dead(self, h: dict) -> str | None:
        """Why the holder `h` is presumed dead, or None while it may be alive."""
        age = time.time() - float(h.get("heartbeat", 0))
        if age > self.timeout_s:
            return f"its heartbeat is {age:.0f} s old, over storage.lease_timeout_s={self.timeout_s:.0f}"
        if h.get("host") == self.holder["host"] and not _pid_running(int(h.get("pid", -1))):
            return f"its process {h.get('pid')} no longer runs on this host"
        return None

    def acquire(self) -> "RunLease":
        url = self.storage.url(LEASE)
        for _ in range(5):  # a lease released between our create and our read: try again
            self.version = self.store.create(self._body())
            if self.version is not None:
                break
            data, version = self.store.read()
            if data is None:
                continue
            try:
                held = json.loads(data)
            except ValueError:
                held = {}
            why = self._dead(held)
            if why is None:
                raise RunRootBusy(f"run root {self.storage.url()} is in use by {self.describe(held)}; wait for "
                                  f"it to finish, or use another run_root (the lease: {url})")
            self.version = self.store.replace(self._body(), version)
            if self.version is None:
                continue  # another run took it first: read again
            self.log(f"padistill: took over the run root's lease from {self.describe(held)}: {why}")
            break
        else:
            raise RunRootBusy(f"run root {self.storage.url()}: could not take its lease {url} (contended)")
        self._thread = threading.Thread(target=self._beat, name="padistill-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 5) and self._beat_once():
            pass

    def _beat_once(self) -> bool:
        """Rewrite the heartbeat if the lease is still ours; False once it is lost."""
        try:
            version = self.store.replace(self._body(), self.version)
        except Exception as e:  # a transient store error: the next beat tries again
            self.log(f"padistill: lease heartbeat failed ({type(e).__name__}: {e}); retrying")
            return True
        if version is None:
            self.lost = True
            self.log(f"padistill: ERROR lost the run root's lease {self.storage.url(LEASE)} to another run; "
                     "stop this run (its writes now interleave with the other's)")
            return False
        self.version = version
        return True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.lost and self.version is not None:
            self.store.delete(self.version)

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
