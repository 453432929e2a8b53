"""The embedded toy teacher: DESIGN's dataset pixel for pixel, the shipped teacher as a stock
diffusers pipeline that draws the prompted digits, and a short `padistill toy-teacher` run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.zoo import BUILTIN, DIGIT_WORDS

TEACHER = BUILTIN["builtin:toy_teacher"]
FASHION_ACC = 0.8  # measured: see the README's Fashion-MNIST teacher table


# ---- dataset ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [0, 1, 17, 900, 1796])
def test_dataset_matches_design_pixel_for_pixel(index):
    from sklearn.datasets import load_digits as sk_digits

    from pipeline.data import load_digits

    raw = sk_digits()
    # DESIGN: images[i] / 16.0, bilinear (align_corners=False) to 32x32, 3 channels, [-1, 1]
    img = torch.tensor(raw.images[index] / 16.0, dtype=torch.float32)[None, None]
    want = F.interpolate(img, size=(32, 32), mode="bilinear", align_corners=False)[0].repeat(3, 1, 1) * 2 - 1
    allset = load_digits("all")
    pos = allset.ids.index(f"digits-{index}")
    assert torch.equal(allset.images[pos], want)
    assert allset.captions[pos] == f"a handwritten digit {DIGIT_WORDS[raw.target[index]]}"
    # white ink on black: the background corner is -1
    assert allset.images[pos][0, 0, 0] == -1.0


def test_split_is_deterministic_and_disjoint():
    from pipeline.data import load_digits

    a, b = load_digits("train"), load_digits("heldout")
    assert len(a) + len(b) == 1797 and not set(a.ids) & set(b.ids)
    assert load_digits("heldout").ids == b.ids
    assert set(b.labels.tolist()) == set(range(10))


# ---- the shipped teachers --------------------------------------------------------------------------------
# dataset -> (folder, a prompt, the prompt accuracy its 32-step samples must reach on 10 classes x K seeds)
SHIPPED = {"toy_digits": (TEACHER, "a handwritten digit three", 0.9, 2),
           "fashion_mnist": (BUILTIN["builtin:toy_fashion_teacher"], "a photo of a sneaker", FASHION_ACC, 3)}


@pytest.mark.parametrize("dataset", sorted(SHIPPED))
def test_shipped_teacher_is_small_and_described(dataset):
    folder = SHIPPED[dataset][0]
    assert (folder / "model_index.json").exists(), f"{folder} must be committed"
    weights = list(folder.rglob("*.safetensors"))
    assert weights and not list(folder.rglob("*.bin"))
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 15_000_000  # 15 MB
    info = json.loads((folder / "padistill.json").read_text())
    assert info["num_inference_steps"] == 32 and info["resolution"] == 32
    assert info.get("dataset", "toy_digits") == dataset
    assert 1.0 < info["guidance_scale"] <= 4.0
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerDiscreteScheduler" and sched["timestep_spacing"] == "trailing"
    assert sched["prediction_type"] == "epsilon" and sched["beta_schedule"] == "scaled_linear"
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] != 0.18215  # set from the trained latents


@pytest.mark.parametrize("dataset", sorted(SHIPPED))
def test_shipped_teacher_runs_in_stock_diffusers(dataset):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    folder, prompt = SHIPPED[dataset][:2]
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.config.force_zeros_for_empty_prompt
    image = pipe(prompt, num_inference_steps=8, guidance_scale=2.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    arr = np.asarray(image)
    assert arr.std() > 20  # a drawn object, not a flat image


@pytest.mark.parametrize("dataset", sorted(SHIPPED))
def test_shipped_teacher_draws_the_prompted_class(dataset):
    from pipeline import metrics, sampling
    from pipeline.zoo import load_pipeline, read_info

    folder, _, want, per_class = SHIPPED[dataset]
    pipe = load_pipeline(str(folder))
    g = read_info(folder)["guidance_scale"]
    s = sampling.sample_classes(pipe, 32, g, samples_per_digit=per_class, seed=4321, dataset=dataset)
    acc = float((metrics.predict(s.images, metrics.load_classifier(dataset=dataset)) == s.labels).mean())
    assert acc >= want, f"prompt accuracy {acc}"


# ---- the job ---------------------------------------------------------------------------------------------
def test_toy_teacher_smoke_run_exports_a_loadable_pipeline(ray_local, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from jobs.cli import main

    out = tmp_path / "teacher"
    rc = main(["toy-teacher", "--config", "smoke", "--output", str(out), "--set", f"run_root={tmp_path / 'run'}",
               "--work-dir", str(tmp_path / "work")])
    assert rc == 0
    training = json.loads((out / "training.json").read_text())
    assert training["config"]["vae_steps"] > 0 and training["config"]["unet_steps"] > 0
    assert (out / "loss_curves.png").stat().st_size > 1000
    # the VAE was trained (reconstruction far better than an untrained one's ~0.5) and scaled
    assert training["vae"]["recon_mse_eval"] < 0.25
    vae_cfg = json.loads((out / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(training["scaling_factor"])
    info = json.loads((out / "padistill.json").read_text())
    assert info["num_inference_steps"] == 32 and info["resolution"] == 32
    # Ray Train left checkpoints of both phases in the work dir
    assert list((tmp_path / "work" / "ray" / "unet").glob("checkpoint_*"))
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    img = pipe("a handwritten digit seven", num_inference_steps=2, guidance_scale=0).images[0]
    assert img.size == (32, 32)
    # a rerun on the same work dir (here asked for 5 more UNet steps) reuses the trained VAE and resumes the
    # UNet from its last checkpoint instead of starting over
    first = json.loads((tmp_path / "work" / "unet_state" / "history.json").read_text())
    steps = training["config"]["unet_steps"]
    rc = main(["toy-teacher", "--config", "smoke", "--output", str(out), "--set", f"run_root={tmp_path / 'run'}",
               "--work-dir", str(tmp_path / "work"), "--unet-steps", str(steps + 5)])
    assert rc == 0
    again = json.loads((out / "training.json").read_text())
    assert again["vae_reused_from"] == str(tmp_path / "work" / "vae_state")
    hist = json.loads((tmp_path / "work" / "unet_state" / "history.json").read_text())
    assert len(hist) == steps + 5 and hist[:steps] == first


def test_vae_from_takes_an_exported_teacher_folder(tmp_path):
    """`--vae-from` given a teacher folder (not a work dir's vae_state): the VAE phase's record is rebuilt from
    the folder, and the weights the UNet phase loads are the folder's VAE, bit for bit."""
    from diffusers import AutoencoderKL

    from pipeline.errors import ConfigError
    from pipeline.toy_teacher import vae_state_from_teacher

    folder = SHIPPED["fashion_mnist"][0]
    vae_state_from_teacher(folder, tmp_path / "vae_state")
    shipped = AutoencoderKL.from_pretrained(folder / "vae")
    rebuilt = AutoencoderKL.from_config(shipped.config)
    rebuilt.load_state_dict(torch.load(tmp_path / "vae_state" / "vae.pt", weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(shipped.state_dict().values(), rebuilt.state_dict().values()))
    final = json.loads((tmp_path / "vae_state" / "final.json").read_text())
    assert final["scaling_factor"] == pytest.approx(shipped.config.scaling_factor)
    assert json.loads((tmp_path / "vae_state" / "history.json").read_text()) == []
    (tmp_path / "bare").mkdir()
    with pytest.raises(ConfigError, match="--vae-from"):
        vae_state_from_teacher(tmp_path / "bare", tmp_path / "other")


def test_a_bad_vae_from_leaves_the_work_dirs_vae_as_it_was(ray_local, tmp_path):
    from dataclasses import replace

    from pipeline.errors import ConfigError
    from pipeline.toy_teacher import ToyTeacherConfig, train_toy_teacher

    kept = tmp_path / "work" / "vae_state"
    kept.mkdir(parents=True)
    (kept / "final.json").write_text('{"scaling_factor": 1.0, "seconds": 2100.0}')
    (kept / "vae.pt").write_bytes(b"a VAE that took 35 minutes")
    (tmp_path / "bare").mkdir()
    with pytest.raises(ConfigError, match="neither a work dir's vae_state folder"):
        train_toy_teacher(tmp_path / "out", ToyTeacherConfig.smoke(), work_dir=tmp_path / "work",
                          vae_from=tmp_path / "bare")
    assert (kept / "vae.pt").read_bytes() == b"a VAE that took 35 minutes"
    # a VAE batch the workers cannot split is refused before the VAE phase, naming the key to change
    with pytest.raises(ConfigError, match="toy_teacher.workers: 2 workers do not split the VAE batch of 15"):
        train_toy_teacher(tmp_path / "out", replace(ToyTeacherConfig.smoke(), vae_batch=15), work_dir=tmp_path / "w3")


def test_toy_teacher_settings_meet_in_one_place(tmp_path):
    """The preset (by data.kind), the config's toy_teacher section and the job's flags (which become
    toy_teacher.* overrides) are merged by pipeline.toy_teacher.from_run_config alone."""
    from dataclasses import replace

    from pipeline.config import ConfigError, load_config
    from pipeline.toy_teacher import DEFAULT_OUTPUTS, ToyTeacherConfig, from_run_config, train_toy_teacher
    from pipeline.zoo import build_components

    tc, out = from_run_config(load_config("toy_fashion"))
    assert tc == ToyTeacherConfig.full("fashion_mnist") and out == DEFAULT_OUTPUTS["fashion_mnist"]
    path = tmp_path / "a: b" / "teacher"  # a path YAML would read as a mapping, passed as the job passes it
    tc, out = from_run_config(load_config("smoke", ["toy_teacher.unet_steps=7", "train.seed=3",
                                                    f'toy_teacher.output="{path}"']))
    assert (tc.unet_steps, tc.seed, tc.vae_steps) == (7, 3, ToyTeacherConfig.smoke().vae_steps)
    assert out == path and tc.dataset == "toy_digits"
    tc, _ = from_run_config(load_config("toy_fashion", ["toy_teacher.unet_batch=64", "toy_teacher.unet_lr=5e-4"]))
    assert (tc.unet_batch, tc.unet_lr, tc.unet_steps) == (64, 5e-4, ToyTeacherConfig.full("fashion_mnist").unet_steps)
    for key, bad in (("unet_batch", 0), ("unet_lr", -1e-3), ("snr_gamma", 0), ("unet_channels", "[32]"),
                     ("unet_layers_per_block", 0)):
        with pytest.raises(ConfigError, match=f"toy_teacher.{key}"):
            load_config("toy_fashion", [f"toy_teacher.{key}={bad}"])
    tc, _ = from_run_config(load_config("toy_fashion", ["toy_teacher.snr_gamma=5", "toy_teacher.unet_channels=[48,64,96]",
                                                        "toy_teacher.unet_layers_per_block=2"]))
    full = ToyTeacherConfig.full("fashion_mnist")
    assert tc.snr_gamma == 5 and (tc.model.unet_channels, tc.model.unet_layers_per_block) == ((48, 64, 96), 2)
    assert tc.model.latent_channels == full.model.latent_channels and full.snr_gamma is None
    with pytest.raises(ConfigError, match="toy_teacher.unet_channels.*multiple of the UNet's 16 norm groups"):
        from_run_config(load_config("toy_fashion", ["toy_teacher.unet_channels=[40,64,96]"]))
    with pytest.raises(ConfigError, match="toy_teacher.unet_batch: 128 does not split evenly over toy_teacher.workers = 3"):
        from_run_config(load_config("toy_fashion", ["toy_teacher.workers=3"]))
    with pytest.raises(ConfigError, match="toy_teacher.snr_gamma.*SD3"):
        from_run_config(load_config("toy_fashion_sd3", ["toy_teacher.snr_gamma=5"]))
    with pytest.raises(ConfigError, match="toy_teacher.unet_channels: sizes a UNet; the SD3"):
        from_run_config(load_config("toy_fashion_sd3", ["toy_teacher.unet_channels=[48,64,96]"]))
    # the sizes reach the UNet the teacher trains and exports (built from tc.model, as train_toy_teacher does)
    unet = build_components(tc.model, seed=tc.seed, family=tc.family)["unet"]
    assert tuple(unet.config.block_out_channels) == (48, 64, 96) and unet.config.layers_per_block == 2
    # a direct caller of train_toy_teacher is refused too, before Ray or any training starts
    with pytest.raises(ConfigError, match="toy_teacher.unet_batch: 15 does not split evenly"):
        train_toy_teacher(tmp_path / "out", replace(ToyTeacherConfig.smoke(), unet_batch=15))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="toy_teacher.output"):
        from_run_config(load_config("smoke", ["toy_teacher.output=s3://bucket/teacher"]))
    with pytest.raises(ConfigError, match="data.kind"):
        from_run_config(load_config("smoke", ["data.kind=parquet", "data.path=/nowhere"]))


def test_shipped_sd3_teacher_runs_in_stock_diffusers_and_draws_the_prompted_class():
    """The shipped SD3 Fashion-MNIST teacher (issue 17): small, its flow-matching scheduler (shift 3.0) and
    recommended guidance recorded, it loads in the stock StableDiffusion3Pipeline (no T5: passed as None) and
    draws an object, and padistill's sampler draws the prompted class (30 samples at 32 steps)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from pipeline import metrics, sampling
    from pipeline.zoo import load_pipeline, read_info

    folder = BUILTIN["builtin:toy_fashion_teacher_sd3"]
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 15_000_000
    info = read_info(folder)
    assert (info["dataset"], info["prediction_type"], info["guidance_scale"]) == ("fashion_mnist", "flow", 2.0)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    image = pipe("a photo of a sneaker", num_inference_steps=8, guidance_scale=2.0, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32) and np.asarray(image).std() > 20
    s = sampling.sample_classes(load_pipeline(str(folder)), 32, 2.0, samples_per_digit=3, seed=4321,
                                dataset="fashion_mnist")
    acc = float((metrics.predict(s.images, metrics.load_classifier(dataset="fashion_mnist")) == s.labels).mean())
    assert acc >= FASHION_ACC, f"prompt accuracy {acc}"


def test_min_snr_weights_are_diffusers_min_snr_gamma():
    """toy_teacher.snr_gamma weights the UNet's epsilon loss as diffusers' training scripts do (`compute_snr`,
    min(SNR, gamma) / SNR per example, the per-example mean squared error weighted): 1 where SNR <= gamma (high
    noise, pure noise included), below 1 at low noise; without a gamma the plain mean."""
    from diffusers.training_utils import compute_snr

    from pipeline.schedule import Schedule, sdxl_scheduler
    from pipeline.toy_teacher_loops import snr_weights, weighted_mse

    scheduler = sdxl_scheduler()
    sched = Schedule.from_scheduler_config(dict(scheduler.config))
    t = torch.tensor([0, 10, 100, 300, 500, 999])
    snr = compute_snr(scheduler, t)
    assert torch.allclose(sched.snr(t), snr, rtol=1e-4)
    w = snr_weights(sched, t.float(), 5.0)
    assert torch.allclose(w, torch.stack([snr, 5.0 * torch.ones_like(snr)]).min(dim=0)[0] / snr, rtol=1e-4)
    assert w[0] < 0.01 and w[-1] == 1 and snr_weights(sched, t, None) is None
    with pytest.raises(ValueError, match="min-SNR weights an epsilon loss"):
        snr_weights(Schedule.from_scheduler_config(dict(scheduler.config), prediction_type="sample"), t, 5.0)
    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    per = torch.nn.functional.mse_loss(out, target, reduction="none").mean(dim=(1, 2, 3))
    assert torch.allclose(weighted_mse(out, target, w), (per * w).mean())
    assert torch.allclose(weighted_mse(out, target, None), torch.nn.functional.mse_loss(out, target))
