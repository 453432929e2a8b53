"""The toy benchmark's data: scikit-learn's bundled handwritten digits, exactly as DESIGN fixes them.

An image is `images[i] / 16.0` (white ink on black), upsampled 8x8 -> 32x32 with bilinear
interpolation (align_corners=False), replicated to 3 channels and scaled to [-1, 1]. Its caption is
"a handwritten digit <word>". The train / held-out split is deterministic (a seeded permutation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .zoo import DIGIT_WORDS

NUM_DIGITS = 1797


def caption_for(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


def digit_image(pixels_8x8: np.ndarray, resolution: int = 32) -> torch.Tensor:
    """One or many raw 8x8 digit arrays (values 0..16) -> float tensors [N, 3, R, R] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(pixels_8x8, dtype=np.float32) / 16.0)
    if x.ndim == 2:
        x = x[None]
    x = torch.nn.functional.interpolate(x[:, None], size=(resolution, resolution), mode="bilinear",
                                        align_corners=False)
    return (x.repeat(1, 3, 1, 1) * 2.0 - 1.0).clamp(-1.0, 1.0)


@dataclass
class Digits:
    ids: list[str]  # "digits-<index into sklearn's array>"
    images: torch.Tensor  # [N, 3, R, R] in [-1, 1]
    labels: np.ndarray  # [N] int
    captions: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def split_indices(holdout_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices into sklearn's digits; deterministic for a seed."""
    perm = np.random.default_rng(seed).permutation(NUM_DIGITS)
    n_hold = int(round(NUM_DIGITS * holdout_fraction))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def load_digits(split: str = "train", resolution: int = 32, holdout_fraction: float = 0.1, seed: int = 0,
                limit: int | None = None) -> Digits:
    """The digits of a split ("train", "heldout" or "all"), in index order."""
    from sklearn.datasets import load_digits as _sk

    raw = _sk()
    if split == "all":
        idx = np.arange(NUM_DIGITS)
    elif split in ("train", "heldout"):
        idx = split_indices(holdout_fraction, seed)[0 if split == "train" else 1]
    else:
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    if limit is not None:
        idx = idx[:limit]
    labels = raw.target[idx].astype(np.int64)
    return Digits(ids=[f"digits-{i}" for i in idx], images=digit_image(raw.images[idx], resolution),
                  labels=labels, captions=[caption_for(y) for y in labels])
