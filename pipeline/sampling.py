"""Sampling with fixed prompts and seeds: every model (teacher, student, at any step count) sampled with the
same seed gets the same noise for the same prompt, so their numbers and grids compare sample for sample.
Sampling goes through `Schedule.sample` and `unet_denoiser` like everything else in padistill; the toy
metrics (`pipeline.metrics`) and the real ones (`pipeline.real_metrics`) score what this draws.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

DEFAULT_SEED = 1234
NOISE_VERSION = 2  # fixed_noise's protocol (2: one noise per sample); in caches and evaluation inputs


@dataclass
class ClassSamples:
    images: torch.Tensor  # [10 * K, 3, R, R] in [-1, 1], class-major: row c * K + k
    labels: np.ndarray  # [10 * K]
    num_steps: int
    guidance_scale: float
    seed: int

    def grid_row(self, k: int = 0) -> torch.Tensor:
        """Classes 0-9 at seed index k: [10, 3, R, R]."""
        K = len(self.labels) // 10
        return self.images[torch.arange(10) * K + k]


def fixed_noise(samples_per_digit: int, seed: int = DEFAULT_SEED, shape=(4, 8, 8), digits: int = 10) -> torch.Tensor:
    """Noise [digits * K, *shape], digit-major (row d * K + k), drawn from one generator seeded with
    `seed`: every sample has its own noise, and every model sampled with the same seed gets the same
    noise for (digit, k). (Noise shared across digits made the 10 x K samples only K independent
    draws; the toy FD then moved more between seeds than between models.)"""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((digits * samples_per_digit, *shape), generator=g)


@torch.no_grad()
def sample_captions(pipe, captions: list[str], noise: torch.Tensor, num_steps: int, guidance_scale: float = 0.0,
                    unet=None, batch_size: int = 200, prediction_type: Optional[str] = None,
                    sampler: Optional[Callable] = None) -> torch.Tensor:
    """Images [N, 3, R, R] in [-1, 1] of `captions` from `noise` (one latent each) with N trailing Euler
    steps through `Schedule.sample` (CFG when g > 1), decoded with the pipeline's VAE; `unet` (a student)
    replaces the pipeline's own UNet when given. Each distinct caption is encoded once. `sampler(cond,
    noise) -> latents`, when given, draws a batch's latents instead (num_steps, guidance, unet and prediction_type
    unused)."""
    from .schedule import unet_denoiser
    from .zoo import denoiser_of, encode_prompts, schedule_of

    unet = unet if unet is not None else denoiser_of(pipe)
    sched = schedule_of(pipe)
    vae = pipe.vae
    res = denoiser_of(pipe).config.sample_size * pipe.vae_scale_factor
    distinct = sorted(set(captions))
    where = {c: i for i, c in enumerate(distinct)}
    cond_all = encode_prompts(pipe, distinct, res)
    out = []
    for i in range(0, len(captions), batch_size):
        y = torch.as_tensor([where[c] for c in captions[i:i + batch_size]])
        cond = cond_all.select(y)
        x = noise[i:i + batch_size].to(torch.float32)
        if sampler is not None:
            lat = sampler(cond, x)
        else:
            lat = sched.sample(unet_denoiser(unet, cond, guidance_scale), x, num_steps, prediction_type)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        img = vae.decode((lat / vae.config.scaling_factor + shift).to(vae.dtype)).sample
        out.append(img.float().clamp(-1, 1))
    return torch.cat(out)


def latent_shape(pipe, unet=None) -> tuple[int, int, int]:
    from .zoo import denoiser_of

    unet = unet if unet is not None else denoiser_of(pipe)
    side = denoiser_of(pipe).config.sample_size
    return (unet.config.in_channels, side, side)


def sample_classes(pipe, num_steps: int, guidance_scale: float = 0.0, samples_per_digit: int = 10,
                  seed: int = DEFAULT_SEED, unet=None, batch_size: int = 200,
                  prediction_type: Optional[str] = None, dataset: str = "toy_digits") -> ClassSamples:
    """Sample the dataset's 10 classes x K fixed seeds (`fixed_noise`) with `sample_captions`."""
    from .data import toy_dataset

    ds = toy_dataset(dataset)
    labels = np.repeat(np.arange(10), samples_per_digit)
    noise = fixed_noise(samples_per_digit, seed, latent_shape(pipe, unet))  # class-major
    images = sample_captions(pipe, [ds.caption_for(int(y)) for y in labels], noise, num_steps, guidance_scale,
                             unet=unet, batch_size=batch_size, prediction_type=prediction_type)
    return ClassSamples(images, labels, num_steps, guidance_scale, seed)


@torch.no_grad()
def sampling_speed(teacher, student_unet, student_steps: int, teacher_guidance: float, batch: int, repeats: int,
                   prediction_type: str) -> dict:
    """Latent sampling wall time of the 32-step teacher with CFG (64 UNet evaluations) vs the student at
    its own steps, same batch, measured alternately in one process; the best of `repeats` each. One
    student measurement samples 64 / steps times back to back (per-sample time = total / count), so
    both sides span about the same wall time: in the DAG, evaluation runs beside the next stage's
    precompute and training, and a single short student run could catch a quiet moment that a
    teacher run cannot (measured: "speedups" of 12.5x for the 8-step student, ideal 8x). On a GPU every
    timing waits for the device's queued work to finish. The student is a UNet sampled with the teacher's
    text encoders and schedule, as the evaluation samples it."""
    from .data import caption_for  # the timing does not depend on which captions
    from .schedule import unet_denoiser
    from .zoo import denoiser_of, encode_prompts, schedule_of

    captions = [caption_for(i % 10) for i in range(batch)]
    cond = encode_prompts(teacher, captions)
    sched = schedule_of(teacher)
    model = denoiser_of(teacher)
    res = model.config.sample_size
    noise = torch.randn(batch, model.config.in_channels, res, res,
                        generator=torch.Generator().manual_seed(0)).to(teacher.device)

    def now() -> float:
        if teacher.device.type == "cuda":
            torch.cuda.synchronize(teacher.device)
        return time.perf_counter()

    g = max(teacher_guidance, 1.0 + 1e-6)  # CFG always on for the reference: 2 UNet passes per step
    t_times, s_times = [], []
    for _ in range(repeats):
        t0 = now()
        sched.sample(unet_denoiser(model, cond, g), noise, 32)
        t_times.append(now() - t0)
        k = max(1, round(64 / student_steps))
        t0 = now()
        for _ in range(k):
            sched.sample(unet_denoiser(student_unet, cond, 0.0), noise, student_steps, prediction_type)
        s_times.append((now() - t0) / k)
    t, s = min(t_times), min(s_times)
    ideal = 64 / student_steps
    return {"teacher_s": t, "student_s": s, "speedup": t / s, "ideal_speedup": ideal,
            "fraction_of_ideal": (t / s) / ideal, "batch": batch, "teacher_unet_evals": 64,
            "student_unet_evals": student_steps}
