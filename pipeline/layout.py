"""Names in a run root that more than one module reads or writes (the rest live beside their writer):
the DAG's timings folder, the base teacher's cached evaluation samples, a stage's training folder and
what it holds."""

from __future__ import annotations

from .config import RunConfig

TIMINGS_DIR = "_timings"  # <root>/_timings/<step>.json: the wall time of each DAG step that ran
TEACHER_DIR = "eval/teacher"  # the base teacher's evaluation samples, shared by every stage
REAL_DIR = "eval/real"  # a non-toy run's real images' FID features, shared by every stage
RUN_NAME = "train"  # Ray Train's run name: a stage's training folder, <root>/<stage_dir>/train/
CKPT_PREFIX = "checkpoint_"  # its checkpoint folders, checkpoint_<step:07d>
HISTORY_JSON = "history.json"  # beside them: the stage's metrics every log_every steps,
CURVES_PNG = "loss_curves.png"  # their plot,
TB_DIR = "tensorboard"  # and its TensorBoard events


def manifest_step(cfg: RunConfig, key, kind: str) -> str:
    """The manifest name of stage `key`'s step `kind` (trajectories | train | eval): "<kind>-<k>-<name>"."""
    return f"{kind}-" + cfg.stage_dir(key).split("/", 1)[1]


def teacher_cache_rel(cfg: RunConfig, steps: int, guidance: float) -> str:
    """Where the base teacher's samples at `steps` are cached in the run root."""
    from .sampling import NOISE_VERSION

    if not cfg.data.toy:
        from .storage import hash_json

        # the real metrics' features of every sample (by these extractors) and the first images
        ev = cfg.evaluate
        f = hash_json({k: getattr(ev, k) for k in ("fid_inception_weights", "fid_extractor", "clip_model", "patch_size")})
        return f"{TEACHER_DIR}/real-steps-{steps}-g{guidance:g}-p{ev.prompts}-s{ev.seed}-f{f[:8]}.npz"
    K, seed = cfg.evaluate.samples_per_prompt, cfg.evaluate.seed
    return f"{TEACHER_DIR}/steps-{steps}-g{guidance:g}-k{K}-s{seed}-n{NOISE_VERSION}.npz"
