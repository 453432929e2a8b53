"""Student pieces without Ray: LoRA targets and merge, x0 target, phase plan of a stage."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline import student
from pipeline.config import ConfigError, StageConfig
from pipeline.schedule import unet_denoiser
from pipeline.train import checkpoint_steps, plan_phases, student_mode_at


def test_lora_targets_skip_io_convs_and_time_embeddings(tiny_pipeline):
    names = student.lora_target_modules(tiny_pipeline.unet)
    assert names and not any(n.split(".")[0] in ("conv_in", "conv_out", "time_embedding", "add_embedding")
                             for n in names)
    assert any(n.endswith("conv1") for n in names) and any(n.endswith("to_q") for n in names)


def test_lora_merge_keeps_the_function(tiny_pipeline):
    from pipeline import zoo

    unet = student.add_lora(copy.deepcopy(tiny_pipeline.unet), rank=4)
    assert all(("lora_" in n) == p.requires_grad for n, p in unet.named_parameters())
    for n, p in unet.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    cond = zoo.encode_prompts(tiny_pipeline, ["a handwritten digit five"], 32)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([499.0])
    with torch.no_grad():
        a = unet_denoiser(unet, cond)(x, t)
        merged = student.merge_lora(unet)
        b = unet_denoiser(merged, cond)(x, t)
    assert not student.has_lora(merged)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert set(merged.state_dict()) == set(tiny_pipeline.unet.state_dict())


def _stage(**kw):
    base = dict(teacher_steps=4, student_steps=1, loss="adversarial", prediction_type="sample",
                conversion_steps=3, conditional_steps=5, unconditional_steps=2)
    return StageConfig(**{**base, **kw})


def test_phase_plan():
    ph = plan_phases(_stage())
    assert [(p.name, p.start, p.end) for p in ph] == [("conversion", 0, 3), ("conditional", 3, 8),
                                                       ("unconditional", 8, 10)]
    st = _stage(lora={"rank": 4, "steps": 6}, full_steps=4)
    assert [student_mode_at(st, s) for s in (0, 5, 6, 9)] == ["lora", "lora", "full", "full"]
    assert checkpoint_steps(st, 100) == {3, 6, 8, 10}
    with pytest.raises(ConfigError, match="lora.steps"):
        plan_phases(_stage(lora={"rank": 4, "steps": 6}, full_steps=5))
    with pytest.raises(ConfigError, match="mse_steps"):
        plan_phases(_stage(mse_steps=3))
    with pytest.raises(ConfigError, match="no training steps"):
        plan_phases(StageConfig(teacher_steps=8, student_steps=4, loss="mse"))
