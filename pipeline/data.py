"""The embedded benchmarks' data (DESIGN: "The toy benchmark"): labelled 32x32 images with one caption
per class, small enough for CPUs, each a `ToyDataset` named by its `data.kind`:

- `toy_digits`: scikit-learn's bundled handwritten digits. An image is `images[i] / 16.0` (white ink on
  black), upsampled 8x8 -> 32x32 with bilinear interpolation (align_corners=False), replicated to 3
  channels and scaled to [-1, 1]; caption "a handwritten digit <word>". The train / held-out split is a
  seeded permutation (`holdout_fraction`, `seed`); the metrics compare against the train split. Smooth:
  what a 1-pixel binomial blur removes is 0.2% of their pixel variance, so blur costs little here (the
  fast smoke data).
- `fashion_mnist`: Zalando's Fashion-MNIST (MIT licence) from Debian's `dataset-fashion-mnist`: 60,000
  train and 10,000 test (t10k) 28x28 grey product photos, padded by 2 black pixels to 32x32 (light
  object on black, as stored), replicated to 3 channels, scaled to [-1, 1]; caption "a photo of a
  <name>". The split is the dataset's own: "train" trains everything, "heldout" is t10k, the metrics'
  reference, and never trains anything. Sharp: the same blur removes 5.7% of their variance (26x).
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import MissingInputError

NUM_DIGITS = 1797
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_PACKAGE = "dataset-fashion-mnist"
SPLITS = ("train", "heldout", "all")


@dataclass
class Labelled:
    ids: list[str]  # "<kind prefix>-<index into the source's array>"
    images: torch.Tensor  # [N, 3, R, R] in [-1, 1]
    labels: np.ndarray  # [N] int
    captions: list[str]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ToyDataset:
    """One embedded benchmark's data: its classes, captions, splits, and which split the metrics
    compare generated images with."""

    kind: str
    names: tuple[str, ...]  # class names in label order
    template: str  # caption of a class: template.format(name)
    reference_split: str  # the metrics' real images
    id_prefix: str

    def caption_for(self, label: int) -> str:
        return self.template.format(self.names[int(label)])

    @property
    def caption_words(self) -> tuple[str, ...]:
        """Every word of every caption (the toy tokenizer keeps each one a single token)."""
        words = " ".join(self.caption_for(k) for k in range(len(self.names))).replace("-", " ").split()
        return tuple(dict.fromkeys(words))

    def load(self, split: str = "train", resolution: int = 32, holdout_fraction: float = 0.1, seed: int = 0,
             limit: Optional[int] = None, root: Optional[str] = None) -> Labelled:
        """The images of a split ("train", "heldout" or "all"), in index order, the first `limit`."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self.kind == "toy_digits":
            raw_images, raw_labels, idx = _digits_split(split, holdout_fraction, seed)
            to_images = functools.partial(digit_image, resolution=resolution)
        else:
            raw_images, raw_labels, idx = _fashion_split(split, root)
            to_images = functools.partial(fashion_image, resolution=resolution)
        if limit is not None:
            idx = idx[:limit]
        labels = raw_labels[idx].astype(np.int64)
        return Labelled(ids=[f"{self.id_prefix}-{i}" for i in idx], images=to_images(raw_images[idx]),
                        labels=labels, captions=[self.caption_for(y) for y in labels])


DIGITS = ToyDataset("toy_digits", DIGIT_WORDS, "a handwritten digit {}", "train", "digits")
FASHION = ToyDataset("fashion_mnist", FASHION_NAMES, "a photo of a {}", "heldout", "fashion")
DATASETS = {d.kind: d for d in (DIGITS, FASHION)}


def toy_dataset(kind: str) -> ToyDataset:
    try:
        return DATASETS[kind]
    except KeyError:
        raise ValueError(f"not an embedded dataset: {kind!r} (one of {sorted(DATASETS)})") from None


# ---- digits ------------------------------------------------------------------------------------------------
def caption_for(label: int) -> str:
    return DIGITS.caption_for(label)


def digit_image(pixels_8x8: np.ndarray, resolution: int = 32) -> torch.Tensor:
    """One or many raw 8x8 digit arrays (values 0..16) -> float tensors [N, 3, R, R] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(pixels_8x8, dtype=np.float32) / 16.0)
    if x.ndim == 2:
        x = x[None]
    x = torch.nn.functional.interpolate(x[:, None], size=(resolution, resolution), mode="bilinear",
                                        align_corners=False)
    return (x.repeat(1, 3, 1, 1) * 2.0 - 1.0).clamp(-1.0, 1.0)


def split_indices(holdout_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices into sklearn's digits; deterministic for a seed."""
    perm = np.random.default_rng(seed).permutation(NUM_DIGITS)
    n_hold = int(round(NUM_DIGITS * holdout_fraction))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def _digits_split(split: str, holdout_fraction: float, seed: int):
    from sklearn.datasets import load_digits as _sk

    raw = _sk()
    if split == "all":
        idx = np.arange(NUM_DIGITS)
    else:
        idx = split_indices(holdout_fraction, seed)[0 if split == "train" else 1]
    return raw.images, raw.target, idx


def load_digits(split: str = "train", resolution: int = 32, holdout_fraction: float = 0.1, seed: int = 0,
                limit: int | None = None) -> Labelled:
    """The digits of a split ("train", "heldout" or "all"), in index order."""
    return DIGITS.load(split, resolution, holdout_fraction, seed, limit)


# ---- Fashion-MNIST -----------------------------------------------------------------------------------------
def fashion_image(pixels_28x28: np.ndarray, resolution: int = 32) -> torch.Tensor:
    """Raw 28x28 uint8 photos -> [N, 3, 32, 32] in [-1, 1]: padded by 2 black pixels on each side."""
    if resolution != 32:
        raise ValueError(f"model.resolution: fashion_mnist images are 32x32 (28x28 padded by 2), got {resolution}")
    x = torch.as_tensor(np.asarray(pixels_28x28, dtype=np.float32) / 127.5 - 1.0)
    if x.ndim == 2:
        x = x[None]
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    return x[:, None].repeat(1, 3, 1, 1)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if int.from_bytes(data[:4], "big") != magic:
        raise MissingInputError(f"{path}: not an IDX file (magic {data[:4].hex()}); reinstall {FASHION_PACKAGE}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise MissingInputError(f"{path}: truncated ({arr.size} of {int(np.prod(dims))} values); "
                                f"reinstall {FASHION_PACKAGE}")
    return arr.reshape(dims)


@functools.lru_cache(maxsize=4)
def fashion_arrays(part: str, root: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N]) of "train" or "t10k" from the Debian package's folder."""
    base = Path(root or FASHION_MNIST_DIR)
    images, labels = base / f"{part}-images-idx3-ubyte.gz", base / f"{part}-labels-idx1-ubyte.gz"
    for p in (images, labels):
        if not p.exists():
            raise MissingInputError(f"Fashion-MNIST not found ({p}): install it with `apt-get install -y "
                                    f"{FASHION_PACKAGE}` (or `make install` as root), or set data.path to a "
                                    "folder holding its four .gz files")
    x, y = _read_idx(images, 0x803), _read_idx(labels, 0x801)
    if len(x) != len(y):
        raise MissingInputError(f"{base}: {len(x)} images but {len(y)} labels in {part}; reinstall {FASHION_PACKAGE}")
    return x, y


def _fashion_split(split: str, root: Optional[str]):
    if split == "all":
        (xa, ya), (xb, yb) = fashion_arrays("train", root), fashion_arrays("t10k", root)
        x, y = np.concatenate([xa, xb]), np.concatenate([ya, yb])
    else:
        x, y = fashion_arrays("train" if split == "train" else "t10k", root)
    return x, y, np.arange(len(y))
