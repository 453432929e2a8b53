"""The export contract's LoRA check, shared by the SDXL, SD1.5 and SD3 tests: a stage folder's LoRA file loads
on the base pipeline with stock `load_lora_weights`, changes its denoiser's output (UNet or SD3 transformer),
and gives what the folder's merged denoiser gives."""

from __future__ import annotations

import torch

from pipeline import zoo
from pipeline.schedule import unet_denoiser


@torch.no_grad()
def assert_lora_loads_like_merged(base_source: str, folder, prompt: str, min_change: float) -> None:
    pipe = zoo.load_pipeline(base_source)
    cond = zoo.encode_prompts(pipe, [prompt] * 2, 32)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([749.0, 749.0])
    before = unet_denoiser(zoo.denoiser_of(pipe), cond)(x, t)
    pipe.load_lora_weights(str(folder))
    after = unet_denoiser(zoo.denoiser_of(pipe), cond)(x, t)
    merged = unet_denoiser(zoo.load_denoiser(str(folder)), cond)(x, t)
    assert (after - before).abs().max() > min_change
    torch.testing.assert_close(after, merged, atol=1e-4, rtol=1e-4)
