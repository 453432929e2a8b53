"""benchmarks/gpu_check.py on a machine without a GPU: the same path (encode, rollout, one adversarial stage
under Ray Train + DeepSpeed ZeRO-2 with gradient checkpointing, the evaluation's actor-pool sampling) at tiny
size on CPU, saying so, with every figure it prints for a GPU present and sane. It runs in this process on
the session's Ray (a second local Ray beside it cost the test half its time)."""

from __future__ import annotations

import importlib.util
import json
import os

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_runs_the_gpu_path_at_tiny_size_on_cpu(ray_local, tmp_path, capsys):
    assert not torch.cuda.is_available()  # what this test is about; a GPU machine runs the real thing
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "benchmarks", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--root", str(tmp_path / "work"), "--steps", "4", "--rows", "8", "--images", "10",
                           "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "gpu_check: no GPU: the same path at tiny size on CPU" in stdout
    res = json.loads(out.read_text())
    assert res["size"] == "tiny" and res["gpus"] == 0 and res["device"].startswith("CPU")
    assert res["zero_stage"] == 2 and res["gradient_checkpointing"] is True
    assert res["rollout_rows"] == 8 and res["train_steps"] == 4 and res["eval_images"] == 10
    for k in ("rollout_rows_per_s", "train_samples_per_s", "eval_images_per_s", "achieved_tflops"):
        assert res[k] > 0, (k, res[k])
    # a worker's resident set holds at least its model and optimizer; the plan counts more than nothing
    assert 0.1 < res["peak_memory_gib"] < 24 and res["plan_memory_gib"] > 0
    # FLOPs per sample = 3 UNet forwards + 9 discriminator forwards, as `padistill plan` counts them
    assert res["flops_per_sample"] > 0 and res["mfu"] is None
    for row in ("| trajectory rollout |", "| adversarial training |", "| evaluation sampling |",
                "| peak memory per GPU |", "| plan's prediction |", "| MFU | n/a (CPU) |"):
        assert row in stdout, row
