"""`padistill trajectories`: teacher rollouts with Ray Data, on a local root and on S3 (moto): rows and
schema, targets equal to a direct single-process rollout, the previous stage's export as teacher, and
a real process kill followed by a rerun that ends with exactly one row per (id, draw)."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import encode as enc
from pipeline import trajectories as tj
from pipeline.config import load_config
from pipeline.schedule import Conditioning, unet_denoiser
from pipeline.stage_models import teacher_source
from pipeline.storage import RunStorage, table_to_tensors
from procs import kill_at_first_commit
from reliability import record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["trajectories.dtype=float32", "trajectories.draws=2", "trajectories.max_rows_per_file=8"]


def direct_rollout(unet, schedule, stage, row_id, draw, latent, prompt_embeds, pooled, seed=0):
    """One (row, draw) rolled out in this process, batch of one, from the stage's definition."""
    noise = tj.draw_noise(tj.draw_seed(row_id, draw, seed)[0], latent.shape)[None]
    pair = tj.pick_pair(row_id, draw, seed, schedule.stage_pairs(stage.student_steps, stage.multi_timestep))
    x0 = torch.as_tensor(latent, dtype=torch.float32)[None]
    x_t = schedule.forward_diffuse(x0, noise, torch.tensor([pair.t]))
    cond = Conditioning(torch.as_tensor(prompt_embeds, dtype=torch.float32)[None],
                        torch.as_tensor(pooled, dtype=torch.float32)[None], Conditioning.sdxl_time_ids(1, 32))
    with torch.no_grad():
        target = schedule.rollout(unet_denoiser(unet, cond, stage.guidance_scale), x_t,
                                  schedule.teacher_path(stage.teacher_steps, pair.t, pair.t_next), pair.t_next)
    return pair, x_t[0].numpy(), target[0].numpy()


@pytest.fixture(scope="module")
def encoded_root(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("traj") / "encoded-run"
    cfg = load_config("smoke", [f"run_root={root}"] + OVERRIDES)
    enc.run_encode(cfg)
    return root


def _copy_encoded(src, dst):
    shutil.copytree(src / "encoded", dst / "encoded")
    (dst / "_manifest").mkdir()
    shutil.copy(src / "_manifest" / f"{enc.STEP}.json", dst / "_manifest")


def test_rows_schema_and_targets_equal_direct_rollout(ray_local, encoded_root):
    from pipeline.zoo import load_denoiser, resolve_source, schedule_of

    cfg = load_config("smoke", [f"run_root={encoded_root}"] + OVERRIDES)
    m = tj.run_trajectories(cfg, 1)
    st = RunStorage.from_config(cfg)
    out = m["outputs"]
    assert out["rows"] == out["expected_rows"] == 128 and len(out["files"]) == 16
    assert out["max_rows_per_file"] <= 8 and out["raw_tensor_bytes_per_row"] == (2 * 256 + 16 * 96 + 32) * 4
    assert out["embedding_bytes_per_row"] == (16 * 96 + 32) * 4
    table = tj.read_trajectories(st, cfg, 1)
    assert table.column_names == tj.COLUMNS
    sch = table.schema
    assert sch.field("id").type == pa.string()
    assert all(sch.field(c).type == pa.int32() for c in ("draw", "t", "t_next"))
    c = table_to_tensors(table)
    assert c["x_t"].shape == c["target"].shape == (128, 4, 8, 8) and c["x_t"].dtype == np.float32
    assert c["prompt_embeds"].shape == (128, 16, 96) and c["pooled_embeds"].shape == (128, 32)

    encoded = table_to_tensors(st.read_table("encoded"))
    ids = list(encoded["id"])
    keys = list(zip(c["id"].tolist(), c["draw"].tolist()))
    assert len(set(keys)) == 128 and set(keys) == {(i, d) for i in ids for d in (0, 1)}
    # rows are in item order (encoded row, draw), not grouped by timestep: training streams the files
    # in order, and a file sorted by t would give micro-batches of one timestep, in timestep order
    assert keys == [(i, d) for i in ids for d in (0, 1)]
    assert all(len(set(c["t"][s:s + 8].tolist())) >= 3 for s in range(0, 128, 8))

    teacher = resolve_source("builtin:tiny_random")
    unet, schedule = load_denoiser(str(teacher)).eval(), schedule_of(teacher)
    _, stage = cfg.stage(1)
    pairs = {(p.t, p.t_next) for p in schedule.stage_pairs(8)}
    assert set(zip(c["t"].tolist(), c["t_next"].tolist())) <= pairs
    assert len(set(c["t"].tolist())) >= 4  # draws spread over the student's steps
    # embeddings are the encoded row's
    for r in (0, 77):
        e = ids.index(c["id"][r])
        np.testing.assert_array_equal(c["prompt_embeds"][r], encoded["prompt_embeds"][e].astype(np.float32))
    # targets equal a direct single-process rollout (CFG 2 on the first stage), including a t = T row
    rows = [0, 41, 100] + [int(np.flatnonzero(c["t"] == 999)[0])]
    for r in rows:
        e = ids.index(c["id"][r])
        pair, x_t, target = direct_rollout(unet, schedule, stage, c["id"][r], int(c["draw"][r]),
                                           encoded["latent"][e], encoded["prompt_embeds"][e],
                                           encoded["pooled_embeds"][e])
        assert (pair.t, pair.t_next) == (c["t"][r], c["t_next"][r])
        np.testing.assert_allclose(c["x_t"][r], x_t, atol=1e-5, rtol=0)
        # targets reach |x| ~ 30 in Euler space after several UNet calls; float32 results differ in the last
        # bits with the batch a row is computed in (seen: 1.1e-5 at 27.4, a relative 4.8e-6)
        np.testing.assert_allclose(c["target"][r], target, atol=1e-5, rtol=2e-5)
    r = rows[-1]  # pure noise at t = T: x_t carries no latent
    noise = tj.draw_noise(tj.draw_seed(c["id"][r], int(c["draw"][r]), 0)[0], (4, 8, 8)).numpy()
    np.testing.assert_allclose(c["x_t"][r], noise * schedule.init_noise_sigma(), rtol=1e-6)
    # finished: a rerun is skipped
    assert tj.run_trajectories(cfg, 1)["finished_at"] == m["finished_at"]
    # ... also after a change to how the stage trains (its lr, its updates), which the rollouts do not read;
    # a change to what they read (guidance, the teacher's steps) rolls them out again
    def finished_with(*sets):
        return tj.finished(load_config("smoke", [f"run_root={encoded_root}", *OVERRIDES, *sets]), 1, st)

    assert finished_with("stages.0.lr=3e-4", "stages.0.mse_steps=9") == m
    assert finished_with("stages.0.guidance_scale=3.0") is None
    assert finished_with("model.teacher_steps=16", "stages.0.teacher_steps=16") is None
    # a manifest written before (its inputs held the whole stage, training keys too) is finished as it
    # stands, never rewritten: the stages' manifests after it hash its inputs_hash
    from pipeline import shards

    legacy = {**m, "inputs": {**m["inputs"], "stage": stage.model_dump(mode="json")}}
    legacy["inputs_hash"] = shards.inputs_hash(legacy["inputs"])
    st.write_json(st.manifest_path(tj.step_name(cfg, 1)), legacy)
    assert tj.finished(cfg, 1, st) == legacy and finished_with("stages.0.lr=3e-4") == legacy
    assert finished_with("stages.0.guidance_scale=3.0") is None
    assert tj.run_trajectories(cfg, 1) == legacy


def test_kill_halfway_and_rerun_gives_exact_rows(ray_local, encoded_root, tmp_path, request):
    """A real SIGKILL of `python -m jobs.trajectories` (and the Ray it started) once some unit is
    committed; the rerun (here in this process) runs only the missing units and ends with exactly one row
    per (id, draw)."""
    root = tmp_path / "run"
    _copy_encoded(encoded_root, root)
    args = [sys.executable, "-m", "jobs.trajectories", "--config", "smoke", "--stage", "1",
            "--set", f"run_root={root}"] + [x for o in OVERRIDES for x in ("--set", o)]
    marker_dir = root / "stages" / "1-8step" / "traj" / "_shards"
    kill_at_first_commit(args, marker_dir, tmp_path / "first.log", cwd=REPO)
    committed = len(list(marker_dir.glob("*.json")))
    assert 0 < committed < 16, f"{committed} of 16 units committed at the kill: not halfway"
    cfg = load_config("smoke", [f"run_root={root}"] + OVERRIDES)
    st = RunStorage.from_config(cfg)
    assert st.read_manifest(tj.step_name(cfg, 1)) is None

    lines: list[str] = []  # the rerun, on this session's Ray (a second job process would start a Ray of its own)
    m = tj.run_trajectories(cfg, 1, log=lines.append)
    assert any(f"{committed} already committed" in line for line in lines), lines
    assert m == st.read_manifest(tj.step_name(cfg, 1))
    assert m["units_run"] == 16 - committed and m["outputs"]["rows"] == 128
    t = tj.read_trajectories(st, cfg, 1)
    keys = list(zip(t.column("id").to_pylist(), t.column("draw").to_pylist()))
    assert len(keys) == len(set(keys)) == 128
    # the same rows as the uninterrupted run
    ref_cfg = load_config("smoke", [f"run_root={encoded_root}"] + OVERRIDES)
    tj.run_trajectories(ref_cfg, 1)  # skipped when the first test made it
    ref = tj.read_trajectories(RunStorage.from_config(ref_cfg), ref_cfg, 1)
    a, b = table_to_tensors(t), table_to_tensors(ref)
    ia = np.lexsort((a["draw"], a["id"].astype(str)))
    ib = np.lexsort((b["draw"], b["id"].astype(str)))
    assert a["id"][ia].tolist() == b["id"][ib].tolist() and a["t"][ia].tolist() == b["t"][ib].tolist()
    np.testing.assert_allclose(a["target"][ia], b["target"][ib], atol=1e-5, rtol=0)
    # no files other than the committed parts, markers and the plan
    names = sorted(p.name for p in (root / "stages" / "1-8step" / "traj").iterdir())
    assert names == sorted([f"part-{i:05d}.parquet" for i in range(16)] + ["_plan.json", "_shards"])
    record(request, "`trajectories` killed mid-run (SIGKILL of the job and its Ray)",
           f"the rerun runs only the {16 - committed} units without a commit marker; the rows equal an "
           "uninterrupted run's", injected=1, completed=1, rows_lost=128 - len(set(keys)),
           duplicates=len(keys) - len(set(keys)))


def test_s3_chain_stage2_teacher_is_stage1_export(ray_local, s3_endpoint, tmp_path):
    """Encode and stage 1's trajectories with the run root on S3; a stand-in for stage 1's export (a
    different, seed-1 pipeline) uploaded under the run root; stage 2's trajectories are rolled out by it."""
    from pipeline import zoo
    from pipeline.zoo import build_pipeline, resolve_source, schedule_of

    ov = ["run_root=s3://padistill-test/traj-run", f"storage.endpoint_url={s3_endpoint}",
          "trajectories.dtype=float32", "trajectories.max_rows_per_file=40"]
    cfg = load_config("smoke", ov)
    st = RunStorage.from_config(cfg)
    enc.run_encode(cfg, log=lambda *_: None)
    tj.run_trajectories(cfg, 1, log=lambda *_: None)
    zoo.save_pipeline(zoo.build_pipeline(seed=1), tmp_path / "export", {})
    st.put_dir(str(tmp_path / "export"), cfg.stage_dir(1) + "/model")
    tj.run_trajectories(cfg, 2, log=lambda *_: None)
    assert teacher_source(cfg, 2, st) == "s3://padistill-test/traj-run/stages/1-8step/model"
    enc_t = table_to_tensors(st.read_table("encoded"))
    ids = list(enc_t["id"])
    for k, n_files in ((1, 2), (2, 2)):
        m = st.read_manifest(tj.step_name(cfg, k))
        assert m["outputs"]["rows"] == 64 and len(m["outputs"]["files"]) == n_files
        assert set(st.ls(cfg.stage_dir(k), "traj")) == {"part-00000.parquet", "part-00001.parquet", "_plan.json",
                                                        "_shards"}
    # stage 2 (8 -> 4 steps, no CFG) was rolled out by the exported seed-1 UNet, not the base model
    c = table_to_tensors(tj.read_trajectories(st, cfg, 2))
    _, stage = cfg.stage(2)
    exported = build_pipeline(seed=1).unet.eval()
    base = build_pipeline(seed=0).unet.eval()
    sched = schedule_of(resolve_source("builtin:tiny_random"))
    for r_ in (0, 63):
        e = ids.index(c["id"][r_])
        args = (stage, c["id"][r_], int(c["draw"][r_]), enc_t["latent"][e], enc_t["prompt_embeds"][e],
                enc_t["pooled_embeds"][e])
        _, _, want = direct_rollout(exported, sched, *args)
        np.testing.assert_allclose(c["target"][r_], want, atol=1e-5, rtol=0)
        _, _, other = direct_rollout(base, sched, *args)
        assert np.abs(c["target"][r_] - other).max() > 1e-3
    _check_a_moved_run_root_keeps_its_trajectories(cfg, st, ov)


def _check_a_moved_run_root_keeps_its_trajectories(cfg, st, ov):
    """Stage 2's teacher (stage 1's student) is named relative to the run root: a run root copied
    elsewhere (object versions kept, as `aws s3 sync`, `cp -a` or the distill bench's shared stages do)
    finds its stage-2 trajectories up to date instead of rolling them out again. A manifest written when
    the teacher was named by its full URL is still accepted, and kept as it is (later steps hash its
    `inputs_hash`), unless the teacher's files changed."""
    first = st.read_manifest(tj.step_name(cfg, 2))
    assert first["inputs"]["teacher"] == "stages/1-8step/model"
    st.fs.copy(st.path(""), "padistill-test/moved-run", recursive=True)
    moved = load_config("smoke", [o for o in ov if not o.startswith("run_root=")] +
                        ["run_root=s3://padistill-test/moved-run"])
    lines = []
    again = tj.run_trajectories(moved, 2, log=lines.append)  # no Ray: nothing to run
    assert "up to date" in lines[-1] and again["finished_at"] == first["finished_at"], lines

    mst = RunStorage.from_config(moved)
    legacy_inputs = {**first["inputs"], "teacher": st.url(cfg.stage_dir(1), "model")}
    legacy = {**first, "inputs": legacy_inputs, "inputs_hash": tj.shards.inputs_hash(legacy_inputs)}
    mst.write_json(mst.manifest_path(tj.step_name(moved, 2)), legacy)
    lines.clear()
    assert tj.run_trajectories(moved, 2, log=lines.append) == legacy and "up to date" in lines[-1], lines
    # ... but not once the teacher's files changed (a re-exported stage 1)
    mst.write_text(f"{moved.stage_dir(1)}/model/unet/config.json",
                   mst.read_text(f"{moved.stage_dir(1)}/model/unet/config.json") + " ")
    assert not tj._legacy_finished(legacy, tj.trajectory_inputs(moved, 2, mst, mst.read_manifest(enc.STEP)))


def test_plan_units_split_each_file_into_equal_bounded_units():
    files = [{"file": "part-00000.parquet", "rows": 10}, {"file": "part-00001.parquet", "rows": 3},
             {"file": "part-00002.parquet", "rows": 0}]
    units = tj.plan_units(files, draws=2, max_rows_per_file=8)
    assert [u["index"] for u in units] == list(range(len(units)))
    by_file = {}
    for u in units:
        by_file.setdefault(u["file"], []).append(u)
    # 20 items -> 3 units of 6-7 (not 8, 8, 4); 6 items -> 1 unit; an empty file -> none
    assert [u["stop"] - u["start"] for u in by_file["part-00000.parquet"]] == [6, 7, 7]
    assert [(u["start"], u["stop"]) for u in by_file["part-00001.parquet"]] == [(0, 6)]
    assert "part-00002.parquet" not in by_file
    for us in by_file.values():  # contiguous, no gaps, no overlaps
        assert us[0]["start"] == 0 and all(a["stop"] == b["start"] for a, b in zip(us, us[1:]))


def test_actor_pool_layout_auto_is_one_single_threaded_actor_per_cpu(ray_local):
    from pipeline.shards import pool_layout

    cpus = int(ray_local.cluster_resources()["CPU"])
    assert pool_layout("auto", 0.0, n_units=10) == (cpus, 1)
    assert pool_layout("auto", 0.0, n_units=1) == (1, cpus)  # one unit: one actor with every CPU as threads
    assert pool_layout(1, 0.0, n_units=10) == (1, cpus)
    assert pool_layout(5, 0.0, n_units=3) == (3, max(1, cpus // 3))
    assert pool_layout(4, 1.0, n_units=10) == (4, 1)  # GPU actors take one CPU each

