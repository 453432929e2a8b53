"""Verified reads: every committed Parquet unit's marker records its size and SHA-256; a truncated,
bit-flipped or deleted object is recomputed by the step that made it, and a reader of a finished step
(trajectories reading `encoded/`, a stage's training reading its trajectories) stops with an error
naming the object instead of using it. On local disk with the real steps on Ray, and on S3 (moto)."""

from __future__ import annotations

import json
import numpy as np
import pyarrow as pa
import pytest

from pipeline import encode as enc
from pipeline import shards
from pipeline import trajectories as tj
from pipeline.config import load_config
from pipeline.errors import MissingInputError
from pipeline.storage import RunStorage, table_to_tensors
from reliability import record

OVERRIDES = ["trajectories.dtype=float32", "trajectories.draws=2", "trajectories.max_rows_per_file=8"]


def _truncate(path, keep: int = 100):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _flip(path, at: int = 200):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def _rows(table):
    a = table_to_tensors(table)
    order = np.lexsort((a["draw"], a["id"].astype(str)))
    return a["id"][order].tolist(), a["target"][order]


def test_damaged_units_are_recomputed_and_never_trained_on(ray_local, tmp_path, request):
    from pipeline.train_data import stage_datasets

    root = tmp_path / "run"
    cfg = load_config("smoke", [f"run_root={root}"] + OVERRIDES)
    st = RunStorage.from_config(cfg)
    enc.run_encode(cfg)
    tj.run_trajectories(cfg, 1)
    clean = _rows(tj.read_trajectories(st, cfg, 1))
    m = st.read_manifest(tj.step_name(cfg, 1))
    assert all(len(f["sha256"]) == 64 for f in m["outputs"]["files"])

    traj = root / "stages" / "1-8step" / "traj"
    _truncate(traj / "part-00003.parquet")
    _flip(traj / "part-00007.parquet")
    (traj / "part-00011.parquet").unlink()
    # training reads nothing damaged: it stops naming every damaged object and the step that fixes it
    with pytest.raises(MissingInputError) as e:
        stage_datasets(cfg, 1, st, 0)
    msg = str(e.value)
    assert "3 damaged file(s)" in msg and "padistill trajectories --stage 1" in msg
    for name, what in (("part-00003", "bytes"), ("part-00007", "checksum"), ("part-00011", "missing")):
        assert f"{name}.parquet" in msg and what in msg.split(f"{name}.parquet")[1].split(";")[0], msg
    # `distill`'s check before it starts a Ray (a finished run writes its report without one) sees them too
    from pipeline.dag import all_finished, build_steps, select

    traj_step = select(build_steps(cfg), cfg, only="traj-1")
    assert not all_finished(cfg, traj_step)
    # the rerun finds them and recomputes exactly those units: the same rows as before the damage
    logs = []
    tj.run_trajectories(cfg, 1, log=logs.append)
    assert all_finished(cfg, traj_step)
    assert any("3 committed file(s) damaged" in line for line in logs), logs
    m = st.read_manifest(tj.step_name(cfg, 1))
    assert m["units_run"] == 3 and m["outputs"]["rows"] == 128
    t = tj.read_trajectories(st, cfg, 1)
    ids, target = _rows(t)
    assert ids == clean[0]
    keys = list(zip(t.column("id").to_pylist(), t.column("draw").to_pylist()))  # one row per (id, draw)
    record(request, "committed trajectory units truncated, bit-flipped and deleted (local disk)",
           "training stops with one line naming each damaged object and the command that recomputes it; the "
           "rerun recomputes just those units (3 of 16), the same rows as before", injected=3, completed=1,
           rows_lost=128 - len(set(keys)), duplicates=len(keys) - len(set(keys)))
    np.testing.assert_allclose(target, clean[1], atol=1e-5, rtol=0)
    assert shards.verify_files(st, f"{cfg.stage_dir(1)}/traj", m["outputs"]["files"]) == {}

    # a damaged encoded unit: trajectories will not read it, encode recomputes it (that unit only)
    _flip(root / "encoded" / "part-00000.parquet", at=300)
    with pytest.raises(MissingInputError, match=r"encoded/part-00000\.parquet does not match its checksum.*"
                                                r"padistill encode"):
        tj.run_trajectories(cfg, 1, force=True)
    assert st.read_manifest(tj.step_name(cfg, 1)) is not None  # stopped before touching anything
    assert (traj / "part-00001.parquet").exists()
    m = enc.run_encode(cfg)
    assert m["units_run"] == 1
    # with verify_reads: size, a same-size bit flip goes unseen (the cheap mode says so in its help)
    _flip(traj / "part-00001.parquet")
    sized = load_config("smoke", [f"run_root={root}", "storage.verify_reads=size"] + OVERRIDES)
    files = st.read_manifest(tj.step_name(cfg, 1))["outputs"]["files"]
    assert shards.verify_files(st, f"{cfg.stage_dir(1)}/traj", files, sized.storage.verify_reads) == {}
    assert list(shards.verify_files(st, f"{cfg.stage_dir(1)}/traj", files)) == ["part-00001.parquet"]
    # trajectories of another schema version: one line naming both versions, before any row is read
    mpath = root / st.manifest_path(tj.step_name(cfg, 1))
    doc = json.loads(mpath.read_text())
    doc["outputs"]["schema_version"] = tj.SCHEMA_VERSION - 1
    mpath.write_text(json.dumps(doc))
    with pytest.raises(MissingInputError, match=f"schema version {tj.SCHEMA_VERSION - 1}, this padistill reads "
                                                f"{tj.SCHEMA_VERSION}"):
        stage_datasets(cfg, 1, st, 0)
    record(request, "a damaged `encoded/` unit; trajectories of another schema version",
           "`trajectories` will not read the damaged unit (touches nothing), `encode` recomputes that unit only; "
           "training stops with one line naming both schema versions", injected=2, completed=1)


def test_s3_objects_truncated_flipped_or_deleted_are_found_and_rerun(s3_endpoint, request):
    """Committed units on a real S3 endpoint: sizes from one listing, checksums read back through s3fs;
    the rerun's `prepare_output` keeps the good units and hands back the damaged ones."""
    cfg = load_config("smoke", ["run_root=s3://padistill-test/verified", f"storage.endpoint_url={s3_endpoint}"])
    st = RunStorage.from_config(cfg)
    out = "encoded"
    assert shards.prepare_output(st, out, "h1") == {}
    for i in range(4):
        w = shards.ShardWriter(st, out, i)
        w.write(pa.table({"id": [f"r{i}-{j}" for j in range(50)], "x": np.arange(50, dtype=np.float32) + i}))
        w.commit(inputs_hash="h1")
    part = {i: st.path(out, shards.part_name(i)) for i in range(4)}
    st.fs.pipe(part[1], st.fs.cat(part[1])[:-40])  # truncated
    data = bytearray(st.fs.cat(part[2]))
    data[120] ^= 0x01
    st.fs.pipe(part[2], bytes(data))  # one bit flipped, same size
    st.fs.rm(part[3])  # deleted
    logs = []
    done = shards.prepare_output(st, out, "h1", log=logs.append)
    assert sorted(done) == [0]
    assert len(logs) == 3 and all("recomputing" in line for line in logs), logs
    assert "part-00001.parquet is" in logs[0] and "checksum" in logs[1] and "missing" in logs[2]
    markers = shards.read_markers(st, out)
    with pytest.raises(MissingInputError, match="3 damaged file"):
        shards.check_committed(st, out, list(markers.values()), "checksum", "`padistill encode`")
    record(request, "committed objects truncated, bit-flipped and deleted on S3",
           "found from one listing and a SHA-256 read-back; a rerun keeps the good unit and recomputes the 3 "
           "others; readers stop naming them", injected=3, completed=1)
