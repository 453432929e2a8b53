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
CKPT_RANK = "checkpoint_rank"  # the metric Ray Train keeps checkpoints by (`phases.checkpoint_rank`)
HISTORY_JSON = "history.json"  # beside them: the stage's metrics every log_every steps,
CURVES_PNG = "loss_curves.png"  # their plot,
TB_DIR = "tensorboard"  # and its TensorBoard events
EVAL_SEEDS_DIR = "eval/seeds"  # <stage_dir>/eval/seeds/<evaluate.seed>.json: a stage's metrics per evaluation seed


def manifest_step(cfg: RunConfig, key, kind: str) -> str:
    """The manifest name of stage `key`'s step `kind` (trajectories | train | eval): "<kind>-<k>-<name>"."""
    return f"{kind}-" + cfg.stage_dir(key).split("/", 1)[1]


def teacher_cache_rel(cfg: RunConfig, steps: int, guidance: float) -> str:
    """Where the base teacher's samples at `steps` are cached in the run root; the name holds a hash of what
    else they depend on (the teacher, its dtype, the prompts' source; a real run's feature extractors)."""
    from .sampling import NOISE_VERSION
    from .storage import hash_json

    ev = cfg.evaluate
    what = {"teacher": cfg.model.source, "dtype": cfg.model.dtype, "resolution": cfg.model.resolution,
            "data": cfg.data.kind if cfg.data.toy else cfg.data.model_dump(mode="json")}
    if not cfg.data.toy:
        # the real metrics' features of every sample (by these extractors) and the first images
        from .real_metrics import settings

        what.update(settings(ev))
        return f"{TEACHER_DIR}/real-steps-{steps}-g{guidance:g}-p{ev.prompts}-s{ev.seed}-{hash_json(what)[:8]}.npz"
    return (f"{TEACHER_DIR}/steps-{steps}-g{guidance:g}-k{ev.samples_per_prompt}-s{ev.seed}-n{NOISE_VERSION}"
            f"-{hash_json(what)[:8]}.npz")