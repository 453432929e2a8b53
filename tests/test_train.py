"""The stage trainer end to end on real Ray Train + DeepSpeed (2 CPU workers, gloo), on the smoke
config with a tiny random teacher and trajectories made by `traj_helpers` in the agreed schema.

Runs are shared between assertions (Ray/DeepSpeed start-up dominates on 2 busy cores):
- `mse_lora_run`: stage 1 (32 -> 8, MSE) with a LoRA phase then the full UNet, ZeRO-2;
- `x0_adv_run`:   stage 3 (-> 1 step, x0 conversion, conditional then unconditional D), ZeRO-3;
- the kill/resume test drives `python -m jobs.train_stage` in a subprocess against the test's Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import zoo
from pipeline.config import CONFIG_DIR, from_dict
from pipeline.storage import RunStorage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from traj_helpers import make_trajectories, write_trajectories  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def smoke_cfg(root: Path, **changes):
    """The smoke config with its run root in `root` and per-test changes: `stage_<i>` dicts update
    stages, `train` updates the train section."""
    data = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    data["run_root"] = str(root)
    for k, v in changes.items():
        if k.startswith("stage_"):
            data["stages"][int(k[6:]) - 1].update(v)
        else:
            data.setdefault(k, {}).update(v)
    return data


def setup_teacher_of_stage3(cfg, storage, pipe_dir):
    """Stage 3's teacher is stage 2's exported student; here: the tiny pipeline itself."""
    shutil.copytree(pipe_dir, storage.path(cfg.stage_dir(2), "model"))


@pytest.fixture(scope="module")
def tiny_source(tiny_pipeline_dir):
    return str(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def mse_lora_run(ray_local, tiny_pipeline, tiny_source, tmp_path_factory):
    from pipeline.train import train_stage

    root = tmp_path_factory.mktemp("mse_lora")
    data = smoke_cfg(root, model={"source": tiny_source},
                     stage_1={"mse_steps": 60, "lora": {"rank": 8, "steps": 8}, "full_steps": 52, "lr": 2e-4},
                     train={"zero_stage": 2, "micro_batch": 8, "checkpoint_every": 1000, "log_every": 4})
    cfg = from_dict(data)
    storage = RunStorage.from_config(cfg)
    write_trajectories(storage, cfg, 1, tiny_pipeline, n_ids=16, seed=1)
    summary = train_stage(cfg, 1, held_rows=0)
    return cfg, storage, summary


def test_mse_overfits_and_exports(mse_lora_run, tiny_source):
    cfg, storage, summary = mse_lora_run
    hist = storage.read_json(f"{cfg.stage_dir(1)}/train/history.json")
    losses = [h["loss"] for h in hist]
    assert hist[-1]["step"] == 60 and hist[-1]["student_mode"] == "full"
    assert losses[0] / losses[-1] >= 10, losses
    # observability: TensorBoard events, loss curves, manifest written last, model exported
    assert any(n.startswith("events.out.tfevents") for n in storage.ls(cfg.stage_dir(1), "train", "tensorboard"))
    assert storage.exists(cfg.stage_dir(1), "train", "loss_curves.png")
    m = storage.read_manifest("train-1-8step")
    assert m is not None and m["steps"] == 60
    model = storage.path(cfg.stage_dir(1), "model")
    assert json.loads(Path(model, "padistill.json").read_text())["num_inference_steps"] == 8


def test_lora_from_checkpoint_loads_on_teacher(mse_lora_run, tiny_source, tmp_path):
    """A checkpoint of the LoRA phase exports a LoRA file that `load_lora_weights` accepts on the
    teacher and that changes its output (the merged export gives the same output)."""
    from pipeline import student
    from pipeline.schedule import unet_denoiser

    cfg, storage, _ = mse_lora_run
    ckpt = storage.path(cfg.stage_dir(1), "train", "checkpoint_0000008")
    assert student.read_state(ckpt)["student_mode"] == "lora"
    out = student.export_checkpoint(ckpt, tiny_source, tmp_path / "exported")
    assert (out / student.LORA_WEIGHT_NAME).exists()
    pipe = zoo.load_pipeline(tiny_source)
    cond = zoo.encode_prompts(pipe, ["a handwritten digit three"] * 2, 32)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([749.0, 749.0])
    with torch.no_grad():
        before = unet_denoiser(pipe.unet, cond)(x, t)
        pipe.load_lora_weights(str(out))
        after = unet_denoiser(pipe.unet, cond)(x, t)
        merged = unet_denoiser(zoo.load_unet(str(out)), cond)(x, t)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, merged, atol=1e-4, rtol=1e-4)
