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


def frechet(real: torch.Tensor, fake: torch.Tensor, ev: EvaluateConfig, batch: int = 64) -> float:
    metric = _fid_metric(ev)
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, len(images), batch):
            metric.update(images[i:i + batch], real=is_real)
    return float(metric.compute())


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


def clip_score(images: torch.Tensor, prompts: list[str], ev: EvaluateConfig, batch: int = 64) -> float:
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    path = ev.clip_model
    metric = CLIPScore(model_name_or_path=lambda: (_ProjectedFeatures(CLIPModel.from_pretrained(path).eval()),
                                                   CLIPProcessor.from_pretrained(path)))
    for i in range(0, len(images), batch):
        metric.update(images[i:i + batch], prompts[i:i + batch])
    return float(metric.compute())


@torch.no_grad()
def score(images: torch.Tensor, prompts: list[str], real: torch.Tensor, ev: EvaluateConfig) -> dict[str, float]:
    """FID-Whole and FID-Patch against `real` (uint8, the prompts' own images) and the CLIP score."""
    if images.dtype != torch.uint8 or real.dtype != torch.uint8:
        raise TypeError("real_metrics.score: images must be uint8 [N, 3, H, W]")
    return {"fid": frechet(real, images, ev),
            "fid_patch": frechet(centre_crop(real, ev.patch_size), centre_crop(images, ev.patch_size), ev),
            "clip_score": clip_score(images, prompts, ev)}
