"""The models of a stage's chain, by where they live: its teacher, the UNet its student starts from, the
UNet its discriminator is copied from (a previous stage's exported student under the run root, or the
base model `model.source`), their fingerprints (a re-exported teacher invalidates what was computed
from it) and a local copy of an s3:// one."""

from __future__ import annotations

import hashlib
import json

from .config import RunConfig
from .errors import MissingInputError
from .storage import RunStorage


def teacher_source(cfg: RunConfig, key, storage: RunStorage | None = None) -> str:
    """Where stage `key`'s teacher lives: the previous (or `teacher_stage`) student's exported
    pipeline folder under the run root, or `model.source` (the base model) for the first stage."""
    return _model_of(cfg, cfg.teacher_of(key), storage)


def student_init_source(cfg: RunConfig, key, storage: RunStorage | None = None) -> str:
    """Where the UNet stage `key`'s student starts from lives: the previous (or `student_init`) stage's
    exported student, or the base model for the first stage. Unless the teacher is skip-level this is
    the teacher."""
    return _model_of(cfg, cfg.student_init_of(key), storage)


def _model_of(cfg: RunConfig, j: int | None, storage: RunStorage | None) -> str:
    """Stage `j`'s exported student under the run root; the base model for None."""
    if j is None:
        return cfg.model.source
    storage = storage or RunStorage.from_config(cfg)
    return storage.url(cfg.stage_dir(j), "model")


def disc_source(cfg: RunConfig, key, storage: RunStorage | None = None) -> str:
    """The UNet whose encoder initialises stage `key`'s discriminator: the base model (`disc_init:
    base`, the paper) or the stage's teacher."""
    _, stage = cfg.stage(key)
    return cfg.model.source if stage.disc_init == "base" else teacher_source(cfg, key, storage)


def _open_teacher(source: str, cfg: RunConfig):
    """A teacher folder's filesystem, root path, model_index.json and family module (local or s3://); one line
    naming the source when it is not a diffusers pipeline folder."""
    from . import family
    from .storage import filesystem_for
    from .zoo import resolve_source

    if source.startswith("s3://"):
        fs, root = filesystem_for(source, cfg.storage), source[len("s3://"):].rstrip("/")
    else:
        fs, root = filesystem_for("file://"), str(resolve_source(source, cfg.storage))
    if not fs.exists(f"{root}/model_index.json"):
        raise MissingInputError(f"teacher {source}: not a diffusers pipeline folder (no model_index.json); "
                                "export the teacher stage first")
    index = json.loads(fs.cat(f"{root}/model_index.json"))
    return fs, root, index, family.get(family.name_of_index(index))


def _parts(index: dict, fam, text: bool) -> list[str]:
    """The subfolders of a teacher folder that are fetched and fingerprinted: its denoiser and scheduler, and
    with `text` what its family's unconditional branch is encoded with; a component the folder has none of
    ([null, null] in model_index.json) is skipped."""
    subs = (fam.DENOISER[0], "scheduler", *(fam.UNCOND_COMPONENTS if text else ()))
    return [sub for sub in subs if (index.get(sub) or [None])[0]]


def files_under(files: dict, subs) -> dict:
    """The entries of a fingerprint (`teacher_fingerprint`'s relative paths) under the subfolders `subs`."""
    return {f: v for f, v in files.items() if f.split("/", 1)[0] in subs}


def _fingerprint(fs, root: str, subs: list[str]) -> dict:
    out = {}
    for sub in subs:
        for p, info in sorted(fs.find(f"{root}/{sub}", detail=True).items()):
            out[p[len(root) + 1:]] = [info.get("size"), str(info.get("ETag") or info.get("mtime") or "")]
    return out


def teacher_fingerprint(source: str, cfg: RunConfig, *, text: bool = False) -> dict:
    """Sizes and versions (mtime or ETag) of the teacher's denoiser (UNet, or SD3 transformer) and scheduler
    files, and with `text` of the text encoders and tokenizers its unconditional branch is encoded with (a
    guided SD1.5 or SD3 stage): a re-exported teacher, or new text encoders beside the same denoiser,
    invalidates the stage's trajectories."""
    fs, root, index, fam = _open_teacher(source, cfg)
    return _fingerprint(fs, root, _parts(index, fam, text))


FETCHED = 3  # the version of what `fetch_teacher` copies (3: text parts only when asked), part of its cache key


def fetch_teacher(source: str, cfg: RunConfig, *, text: bool = False):
    """A local folder with the teacher's denoiser and scheduler. An s3:// teacher is downloaded (only
    model_index.json, unet/ (SD3: transformer/) and scheduler/; with `text`, also what its family's
    unconditional branch is encoded with: SD1.5's and SD3's tokenizers and text encoders, T5's where it has
    one, which only a guided stage's unconditional branch needs (`trajectories.unconditional_branch`, one Ray
    task a step): SD3.5's T5-XXL alone is ~9.5 GB) into a cache keyed by its URI, the parts fetched *and* its
    files' versions, so a re-exported teacher at the same URI is fetched again rather than served stale. A
    cached copy with the text parts serves a call without: on the node that encoded the first stage's branch,
    its actors and training workers reuse that copy."""
    from pathlib import Path

    from .zoo import _cache_dir, _staging_dir, resolve_source

    if not source.startswith("s3://"):
        return resolve_source(source, cfg.storage)
    fs, root, index, fam = _open_teacher(source, cfg)
    fp = _fingerprint(fs, root, _parts(index, fam, True))  # the text parts' files too: one listing serves both keys

    def cached(subs: list[str]) -> Path:  # FETCHED, the parts and their files' versions: a cache that holds
        # other parts, or other versions of them, is not served
        key = hashlib.sha256(json.dumps([source, files_under(fp, subs), FETCHED, subs], sort_keys=True).encode()).hexdigest()[:16]
        return _cache_dir() / "teachers" / key

    full = cached(_parts(index, fam, True))  # with the text parts: it serves a call without them too
    path = full if (full / "model_index.json").exists() else cached(_parts(index, fam, text))
    if not (path / "model_index.json").exists():
        tmp = _staging_dir(_cache_dir() / "teachers")
        for sub in _parts(index, fam, text):
            fs.get(f"{root}/{sub}/", str(tmp / sub), recursive=True)
        fs.get(f"{root}/model_index.json", str(tmp / "model_index.json"))  # last: marks it complete
        try:
            tmp.rename(path)
        except OSError:  # another actor on this node won the race with identical files
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return Path(path)
