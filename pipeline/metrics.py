"""The embedded benchmarks' metrics (DESIGN: "The toy benchmark"), analogues of the paper's, for each
dataset of `pipeline.data` (digits, Fashion-MNIST):

- a small classifier per dataset trained on its real train split (shipped in `pipeline/assets/`, its
  held-out accuracy recorded next to it); its 64-d penultimate layer is the feature space;
- `fd`: Fréchet distance between generated and real images in that space (FID analogue); the real
  images are the dataset's reference split (digits: train; Fashion-MNIST: t10k, which trains nothing);
- `fd_patch`: the same on centre 16x16 patches at native scale (FID-Patch analogue: detail);
- `prompt_accuracy`: the classifier's label agrees with the prompted class (CLIP-score analogue);
- `diversity`: mean pairwise feature distance within each prompt, relative to the real images of
  that class (1 = as varied as the real ones, 0 = one image per prompt);
- `sharpness`: high-frequency energy (what a 1-pixel blur removes) relative to the real images'
  (1 = as sharp as real, below 1 = blurrier; independent of the classifier);
- `fd_to_reference`: Fréchet distance to a reference model's samples (a student vs its teacher).

The samples they score come from `pipeline.sampling` (fixed prompts and seeds), which a real run uses
without this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import real_metrics
from .zoo import ASSETS

# the columns of the metrics tables (report, model card): the toy's, and the paper's for a real-data run
METRICS = (("fd", "FD ↓"), ("fd_patch", "FD-patch ↓"), ("prompt_accuracy", "accuracy ↑"),
           ("diversity", "diversity"), ("sharpness", "sharpness"), ("fd_to_reference", "FD to teacher-32 ↓"))
REAL_METRICS = tuple(zip(real_metrics.KEYS, ("FID-Whole ↓", "FID-Patch ↓", "CLIP score ↑")))


def metrics_of(evals: list[dict]) -> tuple[tuple[str, str], ...]:
    """The toy metrics, or the paper's for a non-toy run."""
    return REAL_METRICS if evals and "fid" in evals[0]["student"] else METRICS

CLASSIFIER_FILE = ASSETS / "digit_classifier.safetensors"
CLASSIFIER_INFO = ASSETS / "digit_classifier.json"
CLASSIFIER_FILES = {"toy_digits": CLASSIFIER_FILE, "fashion_mnist": ASSETS / "fashion_classifier.safetensors"}
FEATURE_DIM = 64
PATCH = 16


# ---- the classifier --------------------------------------------------------------------------------------
class DigitClassifier(nn.Module):
    """A small CNN on [-1, 1] digit images; global pooling makes it accept 32x32 images and 16x16
    patches alike. `features()` is the 64-d space the Fréchet distances are measured in."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.fc = nn.Linear(256, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.silu(self.features(x)))


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 px, mild contrast changes and a little noise: robustness to the
    small artefacts of generated digits without changing their class."""
    n = x.shape[0]
    pad = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx, dy = torch.randint(0, 5, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)
    out = torch.stack([pad[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)])
    scale = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    out = (out + 1) * scale - 1
    return (out + 0.1 * torch.randn(out.shape, generator=g)).clamp(-1, 1)


def _augment_photo(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Fashion-MNIST: random horizontal flips and shifts of up to 2 px, nothing that blurs or adds noise
    (the features must keep seeing both)."""
    n = x.shape[0]
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx, dy = torch.randint(0, 5, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)
    return torch.stack([pad[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)])


CLASSIFIER_EPOCHS = {"toy_digits": 30, "fashion_mnist": 8}


def train_classifier(epochs: Optional[int] = None, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                     holdout_fraction: float = 0.1, data_seed: int = 0, verbose: bool = True,
                     dataset: str = "toy_digits") -> tuple[DigitClassifier, dict]:
    """Train the dataset's classifier on its real train split (deterministic for a seed; digits ~1 min on
    2 cores, Fashion-MNIST ~10). Returns it (eval mode) and info with the held-out accuracy (Fashion-MNIST:
    on t10k, which it never trains on)."""
    from .data import toy_dataset

    ds = toy_dataset(dataset)
    epochs = epochs or CLASSIFIER_EPOCHS[dataset]
    augment = _augment if dataset == "toy_digits" else _augment_photo
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train = ds.load("train", holdout_fraction=holdout_fraction, seed=data_seed)
    held = ds.load("heldout", holdout_fraction=holdout_fraction, seed=data_seed)
    x, y = train.images, torch.as_tensor(train.labels)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        tot = 0.0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb = augment(x[idx], g)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
        if verbose and (ep + 1) % 5 == 0:
            acc = accuracy(model, held.images, held.labels)
            print(f"[classifier {dataset}] epoch {ep + 1}/{epochs} loss {tot / len(x):.4f} held-out acc {acc:.4f}", flush=True)
    model.eval()
    info = {"heldout_accuracy": accuracy(model, held.images, held.labels),
            "train_accuracy": accuracy(model, train.images, train.labels),
            "heldout_size": len(held), "train_size": len(train), "epochs": epochs, "seed": seed,
            "holdout_fraction": holdout_fraction, "data_seed": data_seed, "dataset": dataset,
            "params": sum(p.numel() for p in model.parameters())}
    return model, info


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels) -> float:
    was = model.training
    model.eval()
    pred = torch.cat([model(images[i:i + 512]).argmax(1) for i in range(0, len(images), 512)])
    model.train(was)
    return float((pred == torch.as_tensor(labels)).float().mean())


def save_classifier(model: DigitClassifier, info: dict, path: Path = CLASSIFIER_FILE) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    Path(path).with_suffix(".json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


_CACHED: dict = {}


def load_classifier(path: Optional[Path] = None, dataset: str = "toy_digits") -> DigitClassifier:
    """The dataset's shipped classifier (trained and saved on first use when missing)."""
    path = path or CLASSIFIER_FILES[dataset]
    key = str(path)
    if key in _CACHED:
        return _CACHED[key]
    if not Path(path).exists():
        model, info = train_classifier(dataset=dataset)
        save_classifier(model, info, Path(path))
    from safetensors.torch import load_file

    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    model.eval().requires_grad_(False)
    _CACHED[key] = model
    return model


def classifier_info(path: Optional[Path] = None, dataset: str = "toy_digits") -> dict:
    p = Path(path or CLASSIFIER_FILES[dataset]).with_suffix(".json")
    return json.loads(p.read_text()) if p.exists() else {}


# ---- features and distances ----------------------------------------------------------------------------
def centre_patch(images: torch.Tensor, size: int = PATCH) -> torch.Tensor:
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top:top + size, left:left + size]


@torch.no_grad()
def features(images: torch.Tensor, classifier: Optional[DigitClassifier] = None, batch: int = 512) -> np.ndarray:
    clf = classifier or load_classifier()
    images = images.to(torch.float32).clamp(-1, 1)
    return torch.cat([clf.features(images[i:i + batch]) for i in range(0, len(images), batch)]).double().numpy()


@torch.no_grad()
def predict(images: torch.Tensor, classifier: Optional[DigitClassifier] = None) -> np.ndarray:
    clf = classifier or load_classifier()
    images = images.to(torch.float32).clamp(-1, 1)
    return torch.cat([clf(images[i:i + 512]).argmax(1) for i in range(0, len(images), 512)]).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (scipy's sqrtm)."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.real(covmean)
    return float(max(0.0, ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)))


def _pairwise_mean(f: np.ndarray) -> float:
    if len(f) < 2:
        return 0.0
    d = np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))
    n = len(f)
    return float(d.sum() / (n * (n - 1)))


def within_prompt_spread(feats: np.ndarray, labels) -> dict[int, float]:
    labels = np.asarray(labels)
    return {int(k): _pairwise_mean(feats[labels == k]) for k in np.unique(labels)}


def high_frequency_energy(images: torch.Tensor) -> float:
    """Mean squared difference between the (grey) images and their 1-pixel binomial blur: the detail a
    blur removes. Compared with the real images' value it is the `sharpness` metric."""
    x = images.to(torch.float32).clamp(-1, 1).mean(1, keepdim=True)
    k = torch.tensor([0.25, 0.5, 0.25])
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None, :])[None, None])
    return float(((x - blurred) ** 2).mean())


def blur(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """A separable Gaussian blur of `sigma` px (edges replicated): the calibration's 'blurred' images and
    the discriminator probe's positive control."""
    r = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(images)
    c = images.shape[1]
    x = F.conv2d(F.pad(images, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


@dataclass
class RealReference:
    """Statistics of the real images every metric compares against (the dataset's reference split)."""

    feats: np.ndarray
    patch_feats: np.ndarray
    spread: dict[int, float]
    hf: float = 0.0  # high_frequency_energy of the real images


_REAL: dict = {}


def real_reference(split: Optional[str] = None, classifier: Optional[DigitClassifier] = None,
                   dataset: str = "toy_digits") -> RealReference:
    from .data import toy_dataset

    ds = toy_dataset(dataset)
    split = split or ds.reference_split
    clf = classifier or load_classifier(dataset=dataset)
    key = (dataset, split, id(clf))
    if key not in _REAL:
        d = ds.load(split)
        f = features(d.images, clf)
        _REAL[key] = RealReference(f, features(centre_patch(d.images), clf), within_prompt_spread(f, d.labels),
                                   high_frequency_energy(d.images))
    return _REAL[key]


def score(images: torch.Tensor, labels, reference_images: Optional[torch.Tensor] = None,
          classifier: Optional[DigitClassifier] = None, real: Optional[RealReference] = None,
          dataset: str = "toy_digits") -> dict:
    """Every toy metric for a set of images [N, 3, 32, 32] in [-1, 1] prompted with `labels`."""
    clf = classifier or load_classifier(dataset=dataset)
    real = real or real_reference(classifier=clf, dataset=dataset)
    labels = np.asarray(labels)
    f = features(images, clf)
    pf = features(centre_patch(images), clf)
    spread = within_prompt_spread(f, labels)
    ratios = [spread[k] / real.spread[k] for k in spread if real.spread.get(k)]
    out = {
        "fd": frechet_distance(f, real.feats),
        "fd_patch": frechet_distance(pf, real.patch_feats),
        "prompt_accuracy": float((predict(images, clf) == labels).mean()),
        "diversity": float(np.mean(ratios)) if ratios else 0.0,
        "sharpness": high_frequency_energy(images) / real.hf if real.hf else float("nan"),
        "n": int(len(images)),
    }
    if reference_images is not None:
        out["fd_to_reference"] = frechet_distance(f, features(reference_images, clf))
    return out


# ---- calibration: known answers the metrics must get right ------------------------------------------------
CALIBRATION_ROWS = ("real (floor)", "real, 1 px blur", "real + noise 0.2", "real, captions shuffled",
                    "pure noise")


def calibration_images(dataset: str = "toy_digits", per_class: int = 50, seed: int = 0
                       ) -> tuple[torch.Tensor, np.ndarray]:
    """`per_class` real images of each class that the reference never holds (Fashion-MNIST: the train
    split against t10k; digits: the held-out split against train, all of it when it has fewer)."""
    from .data import toy_dataset

    ds = toy_dataset(dataset)
    d = ds.load("train" if ds.reference_split == "heldout" else "heldout")
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(np.flatnonzero(d.labels == k))[:per_class] for k in range(len(ds.names))])
    return d.images[idx], d.labels[idx]


def calibration(dataset: str = "toy_digits", per_class: int = 50, seed: int = 0) -> list[dict]:
    """Score real images, and the same images spoiled in known ways, against the reference: each spoiled
    row must score clearly worse than the floor on the metric that should see it (blur: FD, FD-patch and
    sharpness; noise: FD-patch and sharpness above 1; shuffled captions: accuracy; pure noise: everything
    but diversity). Rows: {"name", **score}."""
    images, labels = calibration_images(dataset, per_class, seed)
    g = torch.Generator().manual_seed(seed)
    shuffled = labels[np.random.default_rng(seed + 1).permutation(len(labels))]
    sets = {
        CALIBRATION_ROWS[0]: (images, labels),
        CALIBRATION_ROWS[1]: (blur(images, 1.0), labels),
        CALIBRATION_ROWS[2]: ((images + 0.2 * torch.randn(images.shape, generator=g)).clamp(-1, 1), labels),
        CALIBRATION_ROWS[3]: (images, shuffled),
        CALIBRATION_ROWS[4]: (torch.rand(images.shape, generator=g) * 2 - 1, labels),
    }
    return [{"name": name, **score(x, y, dataset=dataset)} for name, (x, y) in sets.items()]
