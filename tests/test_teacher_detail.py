"""benchmarks/teacher_detail.py: its partial rollouts walk the one sampling loop (the grid's whole length from
pure noise is `Schedule.sample`'s sample), its ceiling row is the VAE's reconstruction, and bad options and
teachers it cannot read are named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.teacher_detail import main  # noqa: E402


def test_whole_grid_is_the_teachers_own_sampling_and_reconstruction_the_ceiling(tiny_pipeline_dir, tmp_path):
    from pipeline import metrics, zoo
    from pipeline.data import toy_dataset
    from pipeline.schedule import unet_denoiser

    out = main(["--source", str(tiny_pipeline_dir), "--steps", "2", "--starts", "2,1,2", "--per-class", "2",
                "--seed", "3", "--out", str(tmp_path / "d")])
    run = out["runs"][0]
    assert [r["steps"] for r in run["rows"]] == [0, 1, 2] and out["starts"] == [1, 2]
    assert run["photos"] == 20 and json.loads((tmp_path / "d.json").read_text())["command"].endswith("--seed 3")
    assert "| real, noised to t=499 | 1 |" in (tmp_path / "d.md").read_text()
    # the pure-noise row, computed the way sampling computes a sample
    pipe = zoo.load_pipeline(str(tiny_pipeline_dir))
    ds = toy_dataset("toy_digits")
    ref = ds.load(ds.reference_split)
    labels = np.concatenate([ref.labels[ref.labels == k][:2] for k in range(10)])
    images = ref.images[np.concatenate([np.where(ref.labels == k)[0][:2] for k in range(10)])]
    sf = pipe.vae.config.scaling_factor
    with torch.no_grad():
        lat = pipe.vae.encode(images).latent_dist.mean * sf
        noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(3))
        cond = zoo.encode_prompts(pipe, [ds.caption_for(k) for k in range(10)], 32).select(torch.as_tensor(labels))
        own = zoo.schedule_of(pipe).sample(unet_denoiser(zoo.denoiser_of(pipe), cond, run["guidance_scale"]), noise, 2)
        real = metrics.high_frequency_energy(ref.images)
        assert run["rows"][2]["sharpness"] == round(metrics.high_frequency_energy(pipe.vae.decode(own / sf).sample)
                                                    / real, 3)
        assert run["rows"][0]["sharpness"] == round(metrics.high_frequency_energy(pipe.vae.decode(lat / sf).sample)
                                                    / real, 3)


@pytest.mark.parametrize("args, message", [(["--starts", "0,1"], "--starts"), (["--starts", "3"], "--starts"),
                                           (["--per-class", "0"], "--per-class")])
def test_bad_options_are_named(args, message, capsys):
    with pytest.raises(SystemExit):
        main(["--source", "builtin:tiny_random", "--steps", "2", *args])
    assert message in capsys.readouterr().err


def test_a_flow_matching_teacher_is_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match="not a UNet"):
        main(["--source", "builtin:tiny_random_sd3", "--steps", "2", "--starts", "1", "--per-class", "1",
              "--out", str(tmp_path / "d")])
