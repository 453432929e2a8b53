"""The paper's metrics for real (non-toy) runs: FID-Whole, FID-Patch and CLIP score (SDXL-Lightning,
section 4), computed with torchmetrics from weights the user provides (nothing is downloaded).

- FID-Whole: Fréchet distance between the real images of the evaluation prompts and the generated ones,
  whole images (an Inception extractor resizes them to 299 px itself).
- FID-Patch: the same on the centre `evaluate.patch_size` (299) px crop of every image, without
  resizing: the detail a whole-image FID at 299 px cannot see on a 1024 px image.
- CLIP score: torchmetrics' CLIPScore (100 x cosine of image and caption embeddings) of the generated
  images against their prompts.

The FID feature extractor is either torch-fidelity's Inception weights file
(`evaluate.fid_inception_weights`, e.g. `pt_inception-2015-12-05-6726825d.pth`; needs `torch-fidelity`)
or any TorchScript module mapping uint8 images [N, 3, H, W] to features [N, D]
(`evaluate.fid_extractor`); CLIP reads a local transformers CLIP folder (`evaluate.clip_model`: a
`CLIPModel` and its `CLIPProcessor`, as `save_pretrained` writes them). Images here are uint8 tensors
[N, 3, H, W].
"""

from __future__ import annotations

import os

import torch

from .config import ConfigError, EvaluateConfig

KEYS = ("fid", "fid_patch", "clip_score")
# the settings the features depend on (what a cache of them is keyed by)
FID_SETTINGS = ("fid_inception_weights", "fid_extractor", "patch_size")
FEATURE_SETTINGS = FID_SETTINGS + ("clip_model",)


def settings(ev: EvaluateConfig, keys=FEATURE_SETTINGS) -> dict:
    return {k: getattr(ev, k) for k in keys}


def check(ev: EvaluateConfig, resolution: int) -> None:
    """A clear error, naming the keys, when the real metrics cannot be computed."""
    if ev.patch_size > resolution:
        raise ConfigError(f"evaluate.patch_size: the FID-Patch crop ({ev.patch_size} px) is larger than the "
                          f"images (model.resolution {resolution} px)")
    if bool(ev.fid_inception_weights) == bool(ev.fid_extractor):
        raise ConfigError("evaluate.fid_inception_weights / evaluate.fid_extractor: set exactly one (the FID feature "
                          "extractor for a non-toy run: torch-fidelity's Inception weights file, or a TorchScript "
                          "module mapping uint8 images [N, 3, H, W] to features [N, D]); nothing is downloaded")
    if not ev.clip_model:
        raise ConfigError("evaluate.clip_model: required for a non-toy run (a local transformers CLIP folder with "
                          "the model and its processor, for the CLIP score); nothing is downloaded")
    for key in ("fid_inception_weights", "fid_extractor", "clip_model"):
        path = getattr(ev, key)
        if path and not os.path.exists(path):
            raise ConfigError(f"evaluate.{key}: {path} does not exist")
    if ev.fid_inception_weights:
        import importlib.util

        if importlib.util.find_spec("torch_fidelity") is None:
            raise ConfigError("evaluate.fid_inception_weights: torchmetrics builds the Inception extractor with the "
                              "torch-fidelity package, which is not installed (pip install torch-fidelity)")


def _fid_metric(ev: EvaluateConfig):
    from torchmetrics.image.fid import FrechetInceptionDistance

    if ev.fid_extractor:
        extractor = torch.jit.load(ev.fid_extractor, map_location="cpu").eval()
        return FrechetInceptionDistance(feature=extractor)
    return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=ev.fid_inception_weights)


def centre_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    if min(h, w) < size:
        raise ConfigError(f"evaluate.patch_size: {size} px is larger than the {h}x{w} images")
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top:top + size, left:left + size]


class _ProjectedFeatures(torch.nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embeddings as
    tensors, as torchmetrics (1.9) expects: transformers 5 returns output objects (the projection in
    `pooler_output`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *a, **k) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*a, **k))

    def get_text_features(self, *a, **k) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*a, **k))


class _Given(torch.nn.Module):
    """Features already extracted (by the evaluation's actors) handed to torchmetrics' FID as its "images":
    the metric then accumulates and compares them exactly as it does its own extractor's output."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_of_features(real: torch.Tensor, fake: torch.Tensor, batch: int = 4096) -> float:
    """torchmetrics' FID of two sets of extracted features [N, D]."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    for feats, is_real in ((real, True), (fake, False)):
        for i in range(0, len(feats), batch):
            metric.update(feats[i:i + batch], real=is_real)
    return float(metric.compute())


class Extractor:
    """The features every real metric is computed from, for a batch of uint8 images: the FID extractor's on
    the whole images and on their centre crops, and the CLIP score's sum over the images (with their count).
    Feature sets of any split of the images add up to the whole's (`score_features`), so actors can extract
    them unit by unit."""

    def __init__(self, ev: EvaluateConfig, device: str = "cpu"):
        self.ev, self.device = ev, device
        self._fid = self._clip = None  # each loaded on first use (the real images need no CLIP score)

    @property
    def fid(self):
        if self._fid is None:
            self._fid = _fid_metric(self.ev).to(self.device)
        return self._fid

    @property
    def clip(self):
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        if self._clip is None:
            path = self.ev.clip_model
            self._clip = CLIPScore(model_name_or_path=lambda: (
                _ProjectedFeatures(CLIPModel.from_pretrained(path).eval()), CLIPProcessor.from_pretrained(path))
            ).to(self.device)
        return self._clip

    @torch.no_grad()
    def fid_features(self, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
        return torch.cat([self.fid.inception(images[i:i + batch].to(self.device)).float().cpu()
                          for i in range(0, len(images), batch)])

    @torch.no_grad()
    def clip_sums(self, images: torch.Tensor, prompts: list[str], batch: int = 64) -> tuple[float, int]:
        """torchmetrics' CLIPScore state over `images`: the sum of the per-image scores and their count."""
        self.clip.reset()
        for i in range(0, len(images), batch):
            self.clip.update(images[i:i + batch].to(self.device), prompts[i:i + batch])
        return float(self.clip.score), int(self.clip.n_samples)

    def __call__(self, images: torch.Tensor, prompts: list[str], batch: int = 64, clip: bool = True) -> dict:
        if images.dtype != torch.uint8:
            raise TypeError("real_metrics: images must be uint8 [N, 3, H, W]")
        out = {"fid": self.fid_features(images, batch),
               "fid_patch": self.fid_features(centre_crop(images, self.ev.patch_size), batch)}
        if clip:
            out["clip_sum"], out["clip_n"] = self.clip_sums(images, prompts, batch)
        return out


def frechet(real: torch.Tensor, fake: torch.Tensor, ev: EvaluateConfig) -> float:
    """FID between two sets of uint8 images, by the configured extractor."""
    ex = Extractor(ev)
    return frechet_of_features(ex.fid_features(real), ex.fid_features(fake))


def clip_score(images: torch.Tensor, prompts: list[str], ev: EvaluateConfig) -> float:
    total, n = Extractor(ev).clip_sums(images, prompts)
    return max(total / n, 0.0)


def score_features(fake: dict, real: dict) -> dict[str, float]:
    """FID-Whole, FID-Patch and the CLIP score from `Extractor` outputs (whole sets, or their units merged)."""
    return {"fid": frechet_of_features(real["fid"], fake["fid"]),
            "fid_patch": frechet_of_features(real["fid_patch"], fake["fid_patch"]),
            "clip_score": max(fake["clip_sum"] / fake["clip_n"], 0.0)}


def score(images: torch.Tensor, prompts: list[str], real: torch.Tensor, ev: EvaluateConfig) -> dict[str, float]:
    """FID-Whole and FID-Patch against `real` (uint8, the prompts' own images) and the CLIP score, in this
    process."""
    if images.dtype != torch.uint8 or real.dtype != torch.uint8:
        raise TypeError("real_metrics.score: images must be uint8 [N, 3, H, W]")
    ex = Extractor(ev)
    return score_features(ex(images, prompts), ex(real, prompts, clip=False))
