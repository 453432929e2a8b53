"""Export a stage's student as DESIGN's export contract says: `<root>/stages/<k>-<name>/model/`, a
diffusers pipeline folder that loads with its family's stock pipeline class (`StableDiffusionXLPipeline`,
`StableDiffusionPipeline`: Euler, trailing, `prediction_type="sample"` for the x0 1-step student;
`StableDiffusion3Pipeline`: the teacher's flow-matching scheduler) through `from_pretrained`, with `padistill.json`, a model card
(`README.md`, filled with metrics by evaluation) and, for LoRA students, the LoRA file.

Training exports its final checkpoint through `export_stage` (`pipeline.train.train_stage`); `run_export`
exports any other checkpoint on demand (`padistill export --stage K [--checkpoint PATH]`)."""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile

from . import student as student_mod
from .config import RunConfig
from .errors import MissingInputError
from .layout import RUN_NAME
from .storage import RunStorage


def latest_checkpoint(cfg: RunConfig, key, storage: RunStorage | None = None) -> str | None:
    """Storage path of the latest *registered* checkpoint of a stage (Ray Train's snapshot), or None."""
    storage = storage or RunStorage.from_config(cfg)
    rel = f"{cfg.stage_dir(key)}/{RUN_NAME}/checkpoint_manager_snapshot.json"
    if not storage.exists(rel):
        return None
    snap = storage.read_json(rel)
    latest = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    if latest is None:
        names = [json.loads(r)["checkpoint_dir_name"] if isinstance(r, str) else r.get("checkpoint_dir_name")
                 for r in snap.get("checkpoint_results", [])]
        latest = max((n for n in names if n), default=None)
    return storage.path(cfg.stage_dir(key), RUN_NAME, latest) if latest else None


def download_checkpoint(storage: RunStorage, path: str, local: str) -> str:
    """Copy a checkpoint folder (a storage path) to a local folder."""
    if storage.scheme == "file":
        return path
    storage.fs.get(path.rstrip("/") + "/", local.rstrip("/") + "/", recursive=True)
    return local


def export_stage(cfg: RunConfig, key, checkpoint_path: str, storage: RunStorage | None = None) -> str:
    """Export a checkpoint's student to `<root>/<stage_dir>/model/` (a diffusers pipeline folder)."""
    from .stage_models import teacher_source
    from .zoo import resolve_source

    storage = storage or RunStorage.from_config(cfg)
    idx, stage = cfg.stage(key)
    teacher_dir = resolve_source(teacher_source(cfg, key, storage), cfg.storage)
    work = tempfile.mkdtemp(prefix="padistill-export-")
    try:
        local_ckpt = download_checkpoint(storage, checkpoint_path, os.path.join(work, "ckpt"))
        folder = student_mod.export_checkpoint(
            local_ckpt, teacher_dir, os.path.join(work, "model"),
            info={"num_inference_steps": stage.student_steps, "guidance_scale": 0.0,
                  "resolution": cfg.model.resolution, "stage": stage.name, "stage_index": idx,
                  "teacher": teacher_source(cfg, key, storage), "source_run": cfg.name,
                  "checkpoint": posixpath.basename(checkpoint_path.rstrip("/"))})
        rel = f"{cfg.stage_dir(key)}/model"
        storage.rm(rel)
        storage.put_dir(str(folder), rel)
        return storage.url(rel)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_export(cfg: RunConfig, key, checkpoint: str | None = None, log=print) -> str:
    """Export `checkpoint` (a storage path; default the stage's latest) to the stage's model folder."""
    storage = RunStorage.from_config(cfg)
    idx, stage = cfg.stage(key)
    ckpt = checkpoint or latest_checkpoint(cfg, key, storage)
    if ckpt is None:
        raise MissingInputError(f"stage {idx} ({stage.name}) has no checkpoint under "
                                f"{storage.url(cfg.stage_dir(key))}: run `padistill train-stage --stage {idx}` first")
    url = export_stage(cfg, key, ckpt, storage)
    log(f"padistill export: stage {idx} ({stage.name}) checkpoint {ckpt} -> {url}")
    return url
