"""Shared fixtures: a real local Ray, a real S3 endpoint (moto_server on 127.0.0.1), tiny models."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

# Tests never reach the hub; keep Ray quiet and small.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
# the AWS credentials of the whole session (moto accepts any); no file a run writes may contain either. Set
# here, before any test starts a Ray, so the workers of the session's Ray (`ray_local`) hold them too, as a
# cluster's nodes would hold an instance role's: S3 runs need no process of their own
SENTINEL_KEY_ID = "AKIAPADISTILLSENTNL7Q"
SENTINEL_SECRET = "padistill+Sentinel/Secret+4f1c9e2ab7d3"
os.environ.update({"AWS_ACCESS_KEY_ID": SENTINEL_KEY_ID, "AWS_SECRET_ACCESS_KEY": SENTINEL_SECRET,
                   "AWS_DEFAULT_REGION": "us-east-1"})
# the session's own download cache (teachers fetched from S3, the tiny random pipeline), for its Ray's workers
# too: nothing an earlier session left in the machine-wide default is read
os.environ["PADISTILL_CACHE"] = tempfile.mkdtemp(prefix="padistill-test-cache-")
atexit.register(shutil.rmtree, os.environ["PADISTILL_CACHE"], ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """A moto_server on 127.0.0.1 (one per test module) with a bucket `padistill-test` (the session's
    sentinel credentials are in the environment). Yields the endpoint URL."""
    port = _free_port()
    # this interpreter's moto_server (a system-wide one may be another, older release)
    exe = str(Path(sys.executable).parent / "moto_server")
    if not Path(exe).exists():
        exe = shutil.which("moto_server") or exe
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:  # poll until it answers (not a sleep-as-synchronisation: we wait on the real signal)
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {url}")
            time.sleep(0.1)
    import boto3

    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="padistill-test")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray with 2 CPUs for the whole test session."""
    import ray

    from pipeline import cluster

    # its workers inherit this environment: the S3 tests need the session's credentials in it
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") == SENTINEL_SECRET
    if not ray.is_initialized():
        cluster.init_local(num_cpus=2)  # as every entry point starts one (never joining another cluster)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny random SDXL-class pipeline folder built by the zoo (seed 0)."""
    from pipeline import zoo

    path = tmp_path_factory.mktemp("tiny") / "pipe"
    zoo.save_pipeline(zoo.build_pipeline(seed=0), path, {"num_inference_steps": 32, "guidance_scale": 0.0,
                                                         "resolution": 32, "stage": "tiny"})
    return path


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_pipeline_dir):
    from pipeline import zoo

    return zoo.load_pipeline(str(tiny_pipeline_dir))
