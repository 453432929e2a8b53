"""The toy metrics on known inputs: real vs real ~ 0, real vs noise large, a mode-collapsed set worse
than the real set on FD and diversity; the shipped classifier really recognises held-out digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import metrics, sampling
from pipeline.data import load_digits


@pytest.fixture(scope="module")
def real():
    return load_digits("train"), load_digits("heldout")


def test_shipped_classifier_recognises_heldout_digits(real):
    _, held = real
    assert metrics.CLASSIFIER_FILE.exists(), "the digit classifier must ship in pipeline/assets/"
    acc = metrics.accuracy(metrics.load_classifier(), held.images, held.labels)
    assert acc >= 0.97
    assert abs(acc - metrics.classifier_info()["heldout_accuracy"]) < 1e-6


def test_frechet_distance_matches_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) * 2.0 + 1.0
    # N(0, I) vs N(1, 4I): |mu|^2 = 3, trace term 3 * (1 + 4 - 2 * 2) = 3
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance(a, b) == pytest.approx(6.0, rel=0.1)


def test_real_vs_real_is_near_zero_and_noise_is_far(real):
    train, held = real
    same = metrics.score(train.images, train.labels)
    assert same["fd"] == pytest.approx(0.0, abs=1e-3)
    assert same["fd_patch"] == pytest.approx(0.0, abs=1e-3)
    assert same["diversity"] == pytest.approx(1.0, abs=1e-6)
    assert same["prompt_accuracy"] > 0.99

    heldout = metrics.score(held.images, held.labels, reference_images=train.images)
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(held.images.shape, generator=g) * 2 - 1
    junk = metrics.score(noise, held.labels, reference_images=train.images)
    assert junk["fd"] > 20 * max(heldout["fd"], 1e-3)
    assert junk["fd_patch"] > 5 * heldout["fd_patch"]
    assert junk["fd_to_reference"] > 20 * heldout["fd_to_reference"]
    assert junk["prompt_accuracy"] < 0.3 < 0.95 < heldout["prompt_accuracy"]


def test_mode_collapse_scores_worse_than_real(real):
    _, held = real
    # one real exemplar per class, repeated with tiny noise: perfect prompt accuracy, no variety
    g = torch.Generator().manual_seed(0)
    first = {int(k): int(np.flatnonzero(held.labels == k)[0]) for k in range(10)}
    collapsed = torch.stack([held.images[first[int(y)]] for y in held.labels])
    collapsed = (collapsed + 0.01 * torch.randn(collapsed.shape, generator=g)).clamp(-1, 1)
    good = metrics.score(held.images, held.labels)
    bad = metrics.score(collapsed, held.labels)
    assert bad["prompt_accuracy"] > 0.9  # the classifier still reads them ...
    assert bad["fd"] > 2 * good["fd"]  # ... but the distribution is wrong
    assert bad["diversity"] < 0.2 * good["diversity"]
    assert good["diversity"] > 0.7


def test_fixed_noise_is_reproducible_and_distinct_per_sample():
    a = sampling.fixed_noise(3, seed=5)
    b = sampling.fixed_noise(3, seed=5)
    assert torch.equal(a, b) and a.shape == (30, 4, 8, 8)
    # every (digit, k) has its own noise: no two of the 30 rows are equal
    flat = a.reshape(30, -1)
    assert torch.cdist(flat, flat).fill_diagonal_(float("inf")).min() > 1
    assert not torch.equal(sampling.fixed_noise(3, seed=6), a)


def test_sample_classes_is_deterministic_and_class_major(tiny_pipeline):
    s1 = sampling.sample_classes(tiny_pipeline, 2, guidance_scale=2.0, samples_per_digit=2, seed=3)
    s2 = sampling.sample_classes(tiny_pipeline, 2, guidance_scale=2.0, samples_per_digit=2, seed=3)
    assert s1.images.shape == (20, 3, 32, 32)
    assert list(s1.labels[:4]) == [0, 0, 1, 1]
    assert torch.equal(s1.images, s2.images)
    assert s1.images.min() >= -1 and s1.images.max() <= 1
    assert s1.grid_row(1).shape == (10, 3, 32, 32)
    assert torch.equal(s1.grid_row(1)[3], s1.images[3 * 2 + 1])


@pytest.mark.parametrize("dataset", ["toy_digits", "fashion_mnist"])
def test_calibration_spoiled_images_score_worse_than_the_real_floor(dataset):
    """The metrics must see what this method is about: a 1-pixel blur (FD, FD-patch and sharpness), noise
    (FD-patch, sharpness), captions that do not match (accuracy), and noise images (everything but
    diversity). Measured (benchmarks/results/toy_fashion_teacher_calibration.md): on Fashion-MNIST a 1 px
    blur moves FD 0.65 -> 22.3 and sharpness 1.00 -> 0.06."""
    rows = {r["name"]: r for r in metrics.calibration(dataset, per_class=50 if dataset == "fashion_mnist" else 18)}
    floor, blurred, noisy, shuffled, noise = (rows[n] for n in metrics.CALIBRATION_ROWS)
    assert floor["sharpness"] == pytest.approx(1.0, abs=0.1) and floor["prompt_accuracy"] >= 0.85
    assert blurred["sharpness"] < 0.6 * floor["sharpness"] and blurred["fd_patch"] > floor["fd_patch"]
    assert blurred["fd"] > floor["fd"]
    # noise: FD-patch on both (FD misses it on the digits, whose classifier trained with noise augmentation)
    assert noisy["fd_patch"] > 1.1 * floor["fd_patch"] and noisy["sharpness"] > floor["sharpness"]
    assert shuffled["prompt_accuracy"] < 0.3 and shuffled["fd"] == pytest.approx(floor["fd"])
    assert noise["fd"] > 10 * floor["fd"] and noise["prompt_accuracy"] < 0.3


def test_sharpness_is_relative_to_the_reference_and_falls_with_blur(real):
    train, _ = real
    x = train.images[:200]
    assert metrics.high_frequency_energy(metrics.blur(x, 1.0)) < 0.6 * metrics.high_frequency_energy(x)
    assert metrics.score(train.images, train.labels)["sharpness"] == pytest.approx(1.0, abs=1e-6)


def test_the_discriminator_probe_scores_a_fashion_run_with_the_fashion_classifier():
    """benchmarks/discriminator.py's before/after FD of a game samples and scores the run's dataset: it
    once scored Fashion-MNIST samples with the digits classifier (accuracy 0.0 for a teacher at 0.84). The
    loop is a StageLoop built as the probe's `make_loop` builds it (plain engines, D from the base model),
    here from the shipped teacher, at the 8->4 stage's first step."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.discriminator import toy_fd
    from pipeline import zoo
    from pipeline.config import load_config
    from pipeline.engines import PlainEngines
    from pipeline.stage_loop import StageLoop

    cfg = load_config("toy_fashion")
    folder = zoo.resolve_source(cfg.model.source)
    init = zoo.load_denoiser(str(folder))
    disc = zoo.load_denoiser(str(folder)).requires_grad_(False)
    loop = StageLoop(cfg, cfg.stages[1], zoo.schedule_of(folder), init, PlainEngines(cfg.train), "cpu", disc_unet=disc)
    loop.transition(0)  # builds the student (and D), as the probe does before its first FD
    res = toy_fd(cfg, loop, 3)  # 30 samples at the stage's 4 steps, without CFG
    assert res["prompt_accuracy"] >= 0.5  # the digits classifier gave 0.0 on these
    assert {"fd", "fd_patch", "sharpness"} <= set(res)
