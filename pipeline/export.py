"""Export a stage's student as DESIGN's export contract says: `<root>/stages/<k>-<name>/model/`, a
diffusers pipeline folder that loads with stock `StableDiffusionXLPipeline.from_pretrained` (Euler,
trailing; `prediction_type="sample"` for the x0 1-step student), with `padistill.json`, a model card
(`README.md`, filled with metrics by evaluation) and, for LoRA students, the LoRA file.

Training exports its final checkpoint itself (`pipeline.train.train_stage`); this module exports any
other checkpoint on demand (`padistill export --stage K [--checkpoint PATH]`)."""

from __future__ import annotations

from .config import RunConfig
from .errors import MissingInputError
from .storage import RunStorage


def run_export(cfg: RunConfig, key, checkpoint: str | None = None, log=print) -> str:
    """Export `checkpoint` (a storage path; default the stage's latest) to the stage's model folder."""
    from .train import export_stage, latest_checkpoint

    storage = RunStorage.from_config(cfg)
    idx, stage = cfg.stage(key)
    ckpt = checkpoint or latest_checkpoint(cfg, key, storage)
    if ckpt is None:
        raise MissingInputError(f"stage {idx} ({stage.name}) has no checkpoint under "
                                f"{storage.url(cfg.stage_dir(key))}: run `padistill train-stage --stage {idx}` first")
    url = export_stage(cfg, key, ckpt, storage)
    log(f"padistill export: stage {idx} ({stage.name}) checkpoint {ckpt} -> {url}")
    return url
