"""`padistill plan`: the real SDXL UNet and the discriminator built on the meta device, counted; the
memory model; the command prints the tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import meta_models, plan
from pipeline.config import load_config

REPO = Path(__file__).resolve().parent.parent
# diffusers' UNet2DConditionModel built from stabilityai/stable-diffusion-xl-base-1.0's unet/config.json
SDXL_UNET_PARAMS = 2_567_463_684


@pytest.fixture(scope="module")
def unet():
    return meta_models.build_unet()


def test_sdxl_unet_count_on_meta(unet):
    assert all(p.device.type == "meta" for p in unet.parameters())
    assert meta_models.count_params(unet) == SDXL_UNET_PARAMS
    # the encoder half (what the discriminator copies) and the decoder
    enc = sum(meta_models.count_params(getattr(unet, n)) for n in
              ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block"))
    assert enc == 1_243_367_040


def test_lora_rank64_count(unet):
    # rank 64 on every Linear/Conv2d except conv_in, conv_out and the time embedding: the size of the
    # released SDXL-Lightning LoRA files (~394 MB in fp16)
    assert meta_models.lora_params(unet, 64) == 197_177_344


def test_discriminator_on_meta():
    d = meta_models.build_discriminator(True)
    u = meta_models.build_discriminator(False)
    assert all(p.device.type == "meta" for p in d.parameters())
    n_d, n_u = meta_models.count_params(d), meta_models.count_params(u)
    assert 1_243_367_040 < n_u < n_d < 1_243_367_040 + 300_000_000
    assert meta_models.head_blocks(d) >= 3
    # the conditional head sees twice the mid-block channels
    first = next(m for m in d.head.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 2 * 1280


def test_zero_memory_model():
    n, g = 1_000_000_000, 8
    z2 = plan.zero_memory(n, 0, g, 2, False, "bf16", 0, 0)
    z3 = plan.zero_memory(n, 0, g, 3, False, "bf16", 0, 0)
    off = plan.zero_memory(n, 0, g, 3, True, "bf16", 0, 0)
    assert z2.weights == 2 * n and z2.grads == 2 * n / g and z2.optimizer == 12 * n / g
    assert z3.weights == 2 * n / g and z3.total == 16 * n / g
    assert off.optimizer == 0 and off.cpu == 12 * n / g
    frozen = plan.zero_memory(0, n, g, 2, False, "bf16", 0, 0)
    assert frozen.weights == 2 * n and frozen.grads == 0 and frozen.optimizer == 0


def test_plan_command_prints_the_table():
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "plan", "--config", "configs/sdxl_lightning.yaml"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "2,567,463,684" in out and "2.567 B" in out
    assert "| phase | ZeRO | weights | grads | Adam states | activations | total |" in out
    for z in ("ZeRO-2", "ZeRO-3", "ZeRO-3 + offload"):
        assert f"| {z} |" in out
    assert "Trajectory storage for 1,000,000 samples" in out and "GPU-hours" in out
    assert "### Evaluation: 1,000 images per model" in out and "| teacher @ 32 (once) | 64,000 | 1,000 |" in out


def test_plan_states_the_evaluation_gpu_hours_of_the_papers_protocol(capsys):
    """10,000 prompts (the paper's COCO protocol): the teacher at 32 steps with CFG once, and per stage
    the student without CFG and the teacher at the student's steps with CFG; SDXL's VAE and text encoders
    built on meta at their published sizes; the GPU-hours follow from the counted FLOPs."""
    from jobs.cli import main

    assert main(["plan", "--config", "sdxl_lightning", "--eval-prompts", "10000", "--peak-tflops", "100",
                 "--mfu", "0.5", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)["evaluation"]
    cfg = load_config("sdxl_lightning")
    assert e["images_per_model"] == 10_000 and len(e["stages"]) == len(cfg.stages) + 1
    assert e["vae_params"] == 83_653_863 and e["text_encoder_params"] == 817_720_320  # SDXL base's vae, two CLIPs
    assert e["stages"][0]["unet_passes"] == 10_000 * 32 * 2 and e["stages"][0]["decodes"] == 10_000
    assert cfg.evaluate.teacher_guidance_scale > 1 and e["teacher_guidance"] == cfg.evaluate.teacher_guidance_scale
    speed = cfg.evaluate.speed_repeats * cfg.evaluate.speed_batch_size * 128  # 64 teacher + 64 x 1 student passes
    last = e["stages"][-1]  # the 1-step student and the teacher at 1 step with CFG
    assert cfg.stages[-1].student_steps == 1 and last["unet_passes"] == 10_000 * (1 + 2) + speed
    # a teacher evaluated without CFG: one pass a step
    assert main(["plan", "--config", "sdxl_lightning", "--eval-prompts", "10000", "--set",
                 "evaluate.teacher_guidance_scale=0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["evaluation"]["stages"][0]["unet_passes"] == 10_000 * 32
    for r in e["stages"]:
        flops = r["unet_passes"] * e["unet_forward_tflop"] + r["decodes"] * e["vae_decode_tflop"]
        assert r["gpu_hours"] == pytest.approx(flops * 1e12 / (100e12 * 0.5) / 3600)
    assert 5 < e["unet_forward_tflop"] < 10 and e["vae_decode_tflop"] > 1


def test_plan_flags_and_numbers(capsys):
    """`padistill plan` with flags, as JSON (in-process): the numbers follow from the config and flags."""
    from jobs.cli import main

    assert main(["plan", "--config", "sdxl_lightning", "--gpus", "64", "--micro-batch", "8",
                 "--samples", "1000000", "--throughput", "2.0", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    cfg = load_config("sdxl_lightning")
    assert d["gpus"] == 64 and d["micro_batch"] == 8 and d["throughput"] == 2.0
    assert d["unet_params"] == SDXL_UNET_PARAMS
    row = d["storage"][0]
    # x_t + target (4x128x128 fp16 each) + prompt embeds 77x2048 + pooled 1280 (fp16) + id, t, t_next
    assert row["bytes_per_row"] == 2 * 4 * 128 * 128 * 2 + (77 * 2048 + 1280) * 2 + 24
    assert row["rows"] == 1_000_000 and len(d["storage"]) == len(cfg.stages)
    assert row["teacher_evals_per_row"] == 4 * 2  # 128 -> 32 with CFG
    c = d["compute"][0]
    assert c["samples_seen"] == 2000 * 512
    assert c["train_gpu_hours"] == pytest.approx(2000 * 512 / 2.0 / 3600)
    # activations were measured (not zero) and checkpointing reduces them
    assert 0 < d["unet_act"]["saved_ckpt"] < d["unet_act"]["saved"]
    full = {m["zero"]: m for m in d["memory"] if m["phase"].startswith("adversarial: full")}
    assert full["ZeRO-3"]["weights"] < full["ZeRO-2"]["weights"]
    assert full["ZeRO-3 + offload"]["optimizer"] == 0 < full["ZeRO-3 + offload"]["cpu"]


def test_plan_of_the_default_toy_config_builds_d_at_its_latent_size(capsys):
    """`padistill plan` with no --config (the toy, 32 px: SDXL's UNet at a 4x4 latent) used to crash:
    the discriminator's head was sized for SDXL's 128x128 latents but measured on 4x4 ones."""
    from jobs.cli import main

    assert main(["plan", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["latent_size"] == 4 and d["disc_act"]["saved"] > 0


def test_other_base_models_are_counted_on_meta_near_their_published_sizes(capsys):
    """`--other-bases`: SD1.5's UNet and the SD3.5-Medium / -Large transformers built on the meta device
    from their published configs land within 5% of their publishers' figures (0.86 B, 2.5 B, 8.1 B) once
    the SD3 positional-embedding table (a buffer in diffusers) is counted, as their checkpoints hold it."""
    from jobs.cli import main

    assert main(["plan", "--config", "smoke", "--other-bases", "--json"]) == 0
    rows = {b["model"]: b for b in json.loads(capsys.readouterr().out)["other_bases"]}
    assert set(rows) == {"SD1.5 UNet", "SD3.5-Medium MMDiT-X", "SD3.5-Large MMDiT"}
    for b in rows.values():
        assert abs(b["total"] / b["published"] - 1) < 0.05, b
    assert rows["SD1.5 UNet"]["pos_embed_table"] == 0
    med = rows["SD3.5-Medium MMDiT-X"]
    assert med["pos_embed_table"] == 384 * 384 * 1536  # 384^2 positions x 1536 (24 heads x 64)
    assert abs(med["parameters"] / med["published"] - 1) > 0.05  # without the table it is 10% short
    assert main(["plan", "--config", "smoke"]) == 0 and "Other base models" not in capsys.readouterr().out


def test_plan_of_an_sd15_run_measures_the_sd15_unet(capsys):
    """`configs/sd15_lightning.yaml` (model.family sd15) is planned on SD1.5's published UNet built on meta
    (859,520,964 parameters: the publisher's 0.86 B), with its one text encoder and rows without a pooled
    embedding; a source folder on this machine gives its family without model.family, one elsewhere is
    planned as SDXL and the plan says so."""
    from jobs.cli import main

    assert main(["plan", "--config", "sd15_lightning", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["family"], d["family_from"]) == ("sd15", "model.family")
    assert d["unet_params"] == 859_520_964 and d["latent_size"] == 64
    assert (d["text_dim"], d["pooled_dim"]) == (768, 0)
    assert d["storage"][0]["bytes_per_row"] == 2 * 4 * 64 * 64 * 2 + 77 * 768 * 2 + 3 * 8
    assert 120e6 < d["evaluation"]["text_encoder_params"] < 125e6  # CLIP ViT-L alone
    assert main(["plan", "--config", "smoke", "--set", "model.source=builtin:tiny_random_sd15", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "sd15"
    assert main(["plan", "--config", "sd15_lightning", "--set", "model.family=null"]) == 0
    out = capsys.readouterr().out
    assert "Model family: sdxl (s3://my-bucket/models/stable-diffusion-v1-5 is not on this machine: planned as " \
           "SDXL (set model.family)); sized as SDXL (`model.base`: sdxl-base-1.0)." in out


@pytest.mark.parametrize("size", ["medium", "large"])
def test_plan_of_an_sd35_run_measures_its_transformer(size, capsys):
    """`configs/sd35_<size>_lightning.yaml` (model.base sd3.5-medium / -large) is planned on that published
    SD3.5 transformer built on meta (the counts `--other-bases` checks against the publishers' 2.5 B and 8.1 B,
    without the positional table, a buffer), 16-channel latents, its discriminator the transformer's first
    half of blocks, rows holding 77 CLIP + 256 T5 tokens x 4096 and the 2048 pooled embedding, the T5-XXL
    encoder among the evaluation's text encoders (a stage's `disc_blocks` sizes a deeper D); with gradient checkpointing the adversarial stages fit in
    80 GiB at the config's ZeRO stage, without it they do not. model.base of another family is refused."""
    from jobs.cli import main
    from pipeline import meta_models as mm

    assert main(["plan", "--config", f"sd35_{size}_lightning", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    spec = mm.BASES[f"sd3.5-{size}"][2]
    with torch.device("meta"):
        from diffusers import SD3Transformer2DModel

        n = mm.count_params(SD3Transformer2DModel(**spec))
    assert (d["family"], d["base"], d["denoiser"]) == ("sd3", f"sd3.5-{size}", "transformer")
    assert d["unet_params"] == n == {"medium": 2_243_171_520, "large": 8_056_627_520}[size]
    assert (d["latent_channels"], d["latent_size"], d["text_tokens"], d["text_dim"], d["pooled_dim"]) == \
        (16, 128, 333, 4096, 2048)
    assert d["storage"][0]["bytes_per_row"] == 2 * 16 * 128 * 128 * 2 + (333 * 4096 + 2048) * 2 + 3 * 8
    # half the blocks and the embeddings, and a head of 4x4 convs as wide as the tokens: more than half, less than all
    assert n / 2 < d["disc_params_unconditional"] < d["disc_params_conditional"] < n
    layers = spec["num_layers"]
    assert d["disc_blocks"] == layers // 2
    # a deeper discriminator (`disc_blocks` on an adversarial stage) is planned as deep, and says so
    adv_stage = next(i for i, st in enumerate(load_config(f"sd35_{size}_lightning").stages) if st.loss == "adversarial")
    assert main(["plan", "--config", f"sd35_{size}_lightning", "--json", "--set",
                 f"stages.{adv_stage}.disc_blocks={layers - 1}"]) == 0
    deep = json.loads(capsys.readouterr().out)
    assert deep["disc_blocks"] == layers - 1 and deep["disc_params_conditional"] > d["disc_params_conditional"] + n / 3
    assert d["evaluation"]["text_encoder_params"] > 4.7e9  # T5-XXL's encoder with the two CLIPs
    zero = {"medium": "ZeRO-2", "large": "ZeRO-3"}[size]
    adv = [m for m in d["memory"] if m["phase"].startswith("adversarial: full") and m["zero"] == zero][0]
    assert adv["fits_ckpt"] and not adv["fits"]
    with pytest.raises(Exception, match="base: sd3.5-large is of the sd3 family, model.family is sdxl"):
        load_config("smoke", ["model.base=sd3.5-large", "model.family=sdxl"])
    assert main(["plan", "--config", "toy_fashion_sd3", "--json"]) == 0  # the family's default base
    assert json.loads(capsys.readouterr().out)["base"] == "sd3.5-medium"
