"""Run storage on a local root and on a real S3 endpoint (moto_server): tensors, manifests, secrets."""

import numpy as np
import pytest

from pipeline.config import StorageConfig
from pipeline.storage import RunStorage, table_to_tensors, tensors_to_table
from reliability import record


def _columns(rng):
    return {
        "id": [f"row-{i}" for i in range(5)],
        "t": np.array([999, 749, 499, 249, 0], dtype=np.int32),
        "latent": rng.standard_normal((5, 4, 8, 8)).astype(np.float16),
        "prompt_embeds": rng.standard_normal((5, 16, 96)).astype(np.float32),
        "pooled": rng.standard_normal((5, 32)).astype(np.float16),
    }


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return RunStorage(str(tmp_path / "run"))
    endpoint = request.getfixturevalue("s3_endpoint")
    return RunStorage(f"s3://padistill-test/{tmp_path.name}", StorageConfig(endpoint_url=endpoint))


def test_parquet_tensor_roundtrip_is_exact(store):
    cols = _columns(np.random.default_rng(0))
    store.write_table("encoded/part-0.parquet", cols)
    back = table_to_tensors(store.read_table("encoded"))
    assert back["id"].tolist() == cols["id"]
    for k in ("t", "latent", "prompt_embeds", "pooled"):
        assert back[k].dtype == cols[k].dtype, k
        assert back[k].shape == cols[k].shape, k
        assert np.array_equal(back[k], cols[k]), k


def test_read_folder_of_files(store):
    rng = np.random.default_rng(1)
    a, b = _columns(rng), _columns(rng)
    store.write_table("traj/part-0.parquet", a)
    store.write_table("traj/part-1.parquet", b)
    back = table_to_tensors(store.read_table("traj"))
    assert np.array_equal(back["latent"], np.concatenate([a["latent"], b["latent"]]))
    assert store.ls("traj") == ["part-0.parquet", "part-1.parquet"]


def test_listing_needs_no_working_directory(store, tmp_path, monkeypatch):
    """A Ray job's working dir can vanish under its driver (on one machine, every node's runtime env
    agent unpacks the job's package into one shared session folder, replacing it): listing the run
    root must not ask the process for its working directory."""
    store.write_text("_manifest/encode.json", "{}")
    gone = tmp_path / "cwd"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert store.ls("_manifest") == ["encode.json"] and store.missing_outputs() == []


def test_step_without_manifest_is_unfinished(store):
    store.write_table("encoded/part-0.parquet", _columns(np.random.default_rng(2)))
    assert store.finished_manifest("encode") is None  # outputs alone do not make a finished step

    def costly():  # inputs described only once a manifest exists (a data source's listing)
        raise AssertionError("described without a manifest")

    assert store.finished_manifest("encode", costly) is None
    store.commit_manifest("encode", inputs={"config": 1}, outputs={"rows": 5})
    assert store.finished_manifest("encode") is not None
    assert store.finished_manifest("encode", inputs={"config": 1}) is not None
    assert store.finished_manifest("encode", lambda: {"config": 1}) == store.read_manifest("encode")
    assert store.finished_manifest("encode", inputs={"config": 2}) is None  # inputs changed: rerun
    assert store.read_manifest("encode")["outputs"] == {"rows": 5}
    store.invalidate("encode")
    assert store.finished_manifest("encode") is None


def test_tensors_to_table_accepts_torch():
    import torch

    t = tensors_to_table({"x": torch.arange(24, dtype=torch.float16).reshape(2, 3, 4)})
    assert table_to_tensors(t)["x"].shape == (2, 3, 4)


def test_throttling_and_dropped_connections_are_retried(s3_endpoint, tmp_path, request):
    """Through a proxy that answers every 4th request 503 SlowDown or resets its connection (tests/
    faultproxy.py): bytes, Parquet (pyarrow), listings, deletes and the lease's conditional PUTs all
    succeed with `storage.max_attempts`; with a single attempt the same work fails."""
    from faultproxy import FaultProxy
    from pipeline.lease import RunLease

    proxy = FaultProxy(s3_endpoint, every=4).start()
    try:
        def work(cfg):
            st = RunStorage(f"s3://padistill-test/{tmp_path.name}-{cfg.max_attempts}", cfg)
            cols = _columns(np.random.default_rng(1))
            for i in range(4):
                st.write_json(f"m/{i}.json", {"i": i})
                st.write_table(f"t/part-{i}.parquet", cols)
            with RunLease(st, "test", timeout_s=60, log=lambda *_: None):
                pass
            back = [st.read_json(f"m/{i}.json")["i"] for i in range(4)]
            t = table_to_tensors(st.read_table("t"), ["latent"])["latent"]
            st.rm("m/0.json")
            return back, t.shape, sorted(st.ls("m"))

        back, shape, listing = work(StorageConfig(endpoint_url=proxy.url))
        assert back == [0, 1, 2, 3] and shape == (20, 4, 8, 8) and listing == ["1.json", "2.json", "3.json"]
        injected = dict(proxy.counts)
        injected_first = proxy.faults
        assert proxy.faults >= 10 and any(k.startswith("503 PUT") for k in injected) and \
            any(k.startswith("reset") for k in injected) and any(k.endswith("GET") for k in injected), injected
        with pytest.raises(Exception):
            work(StorageConfig(endpoint_url=proxy.url, max_attempts=1))
        record(request, "every 4th S3 request throttled (503 SlowDown) or its connection reset",
               "retried with backoff (`storage.max_attempts`, both S3 clients): bytes, Parquet, listings, deletes "
               "and the lease's conditional PUTs all succeed; with one attempt the same work fails",
               injected=injected_first, completed=1)
    finally:
        proxy.stop()
