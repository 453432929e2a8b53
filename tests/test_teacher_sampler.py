"""benchmarks/teacher_sampler.py: the shipped teacher through the stock diffusers pipeline with named schedulers."""
from __future__ import annotations

import json
import math

import pytest


def test_stock_euler_is_padistills_sampler_on_the_same_noise():
    """The control row is a control: the stock pipeline with Euler (trailing), from the benchmarks' fixed noise,
    draws the images `sampling.sample_classes` (Schedule.sample, padistill's one loop) draws; Euler ancestral,
    from the same latents, does not. At 8 steps rather than the folder's 32 (the same grid arithmetic, a quarter of
    the time)."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

    from benchmarks.teacher_sampler import stock_samples
    from pipeline.sampling import sample_classes
    from pipeline.zoo import load_pipeline, read_info, resolve_source

    folder = resolve_source("builtin:toy_fashion_teacher")
    info = {**read_info(folder), "num_inference_steps": 8}
    stock = StableDiffusionXLPipeline.from_pretrained(str(folder))
    stock.set_progress_bar_config(disable=True)
    ours = sample_classes(load_pipeline(str(folder)), info["num_inference_steps"], info["guidance_scale"], 1, 7,
                          dataset="fashion_mnist").images
    euler = stock_samples(stock, info, EulerDiscreteScheduler, 1, 7)
    assert euler.shape == ours.shape == (10, 3, 32, 32)
    assert (euler - ours).abs().max() < 2e-3
    ancestral = stock_samples(stock, info, EulerAncestralDiscreteScheduler, 1, 7)
    assert (ancestral - ours).abs().mean() > 0.05


def test_teacher_sampler_scores_each_scheduler_and_refuses_an_unknown_one(tmp_path):
    from benchmarks.teacher_sampler import main

    out = tmp_path / "sampler"
    result = main(["--source", "builtin:toy_fashion_teacher", "--per-class", "2", "--steps", "4", "--out", str(out),
                   "--schedulers", "EulerDiscreteScheduler,DPMSolverMultistepScheduler"])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["scheduler"] for r in rows] == ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"]
    assert all(r["n"] == 20 and math.isfinite(r["sharpness"]) and r["sharpness"] > 0 for r in rows)
    assert result["steps"] == 4 and result["guidance_scale"] == 2.0  # --steps over the folder's 32, its guidance
    assert "--steps 4`" in out.with_suffix(".md").read_text()  # the command that wrote the table, as run
    assert "| DPMSolverMultistepScheduler |" in out.with_suffix(".md").read_text()
    for bad in ("NotAScheduler", "UNet2DConditionModel"):  # a diffusers class that is not a scheduler, too
        with pytest.raises(SystemExit, match=f"'{bad}' is not a diffusers scheduler class"):
            main(["--source", "builtin:toy_fashion_teacher", "--schedulers", f"EulerDiscreteScheduler,{bad}",
                  "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad.json").exists()
