"""Typed run configs loaded from YAML, with `--set a.b=c` overrides.

Every mistake is reported as a `ConfigError` naming the key (`stages.1.student_steps`) and the
reason; unknown keys are errors, never ignored."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Field, PositiveInt, ValidationError, field_validator, model_validator

from .errors import ConfigError  # noqa: F401  (imported from here by most modules)
from .stage_config import StageConfig, _Strict

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "toy_digits"


class StorageConfig(_Strict):
    """How to reach the run root. Credentials never go here: they come from the usual AWS
    variables (AWS_ACCESS_KEY_ID, ...) or a named profile."""

    endpoint_url: Optional[str] = None  # MinIO / moto / other S3-compatible endpoint
    region: Optional[str] = None
    profile: Optional[str] = None  # an AWS profile name (not a secret)
    max_attempts: int = Field(10, ge=1, description=(
        "attempts per S3 request (the first plus retries, with exponential backoff) for throttling (503 "
        "SlowDown), 5xx and dropped connections; both S3 clients (s3fs/botocore and pyarrow) use it"))
    lease_timeout_s: float = Field(300.0, gt=0, description=(
        "a run root's lease (`_lease.json`, one writer per root) whose heartbeat is older than this is taken "
        "over: its holder crashed on another machine (a dead holder on the same host is taken over at once)"))
    verify_reads: Literal["checksum", "size"] = Field("checksum", description=(
        "how committed Parquet units are checked against their markers before they are used (a rerun's "
        "committed units, the encoded rows a trajectories step reads, the trajectories a stage trains on): "
        "checksum reads every file back once per check (SHA-256: a full read of the step's files), size only "
        "lists them (a same-size corruption then goes unseen)"))


def local_abspath(v: str) -> str:
    """A relative local path made absolute where the config is loaded: Ray workers and Ray Data actors
    run in Ray's own folders, where a relative path would point elsewhere. URIs and builtins unchanged."""
    return v if "://" in v or v.startswith("builtin:") else os.path.abspath(os.path.expanduser(v))


class ModelConfig(_Strict):
    # builtin:toy_teacher | builtin:toy_fashion_teacher | builtin:toy_fashion_teacher_sd15 | builtin:toy_fashion_teacher_sd3
    # | builtin:tiny_random | builtin:tiny_random_sd15 | builtin:tiny_random_sd3 | a local or s3:// diffusers pipeline
    # folder of the SDXL, SD1.5 or SD3 family
    source: str = "builtin:toy_teacher"
    # the source's family (sdxl, sd15, sd3), read from its model_index.json when unset;
    # set, it is checked against the source (and `padistill plan`, which reads nothing remote, plans it)
    family: Optional[Literal["sdxl", "sd15", "sd3"]] = None
    # the published base model `padistill plan` sizes (default: the family's: sdxl-base-1.0, sd-1.5,
    # sd3.5-medium); the run itself reads the source folder
    base: Optional[Literal["sdxl-base-1.0", "sd-1.5", "sd3.5-medium", "sd3.5-large"]] = None
    resolution: int = Field(32, gt=0)

    @model_validator(mode="after")
    def _base_of_family(self) -> "ModelConfig":
        fam = {"sdxl-base-1.0": "sdxl", "sd-1.5": "sd15", "sd3.5-medium": "sd3", "sd3.5-large": "sd3"}.get(self.base)
        if fam is not None and self.family is not None and fam != self.family:
            raise ValueError(f"base: {self.base} is of the {fam} family, model.family is {self.family}")
        return self
    teacher_steps: int = Field(32, ge=1, description="steps the base model samples with (the first teacher)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    _source = field_validator("source")(local_abspath)


DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS: above it Pillow warns of a bomb


class DataConfig(_Strict):
    # toy_digits | fashion_mnist (the embedded benchmarks, pipeline/data.py) | parquet (your images)
    kind: Literal["toy_digits", "fashion_mnist", "parquet"] = "toy_digits"
    # parquet: a Parquet folder or file (local or s3://), required; fashion_mnist: a folder with the four
    # .gz files of the Debian package dataset-fashion-mnist (default /usr/share/datasets/fashion-mnist)
    path: Optional[str] = None
    image_column: str = "image"
    caption_column: str = "caption"
    id_column: Optional[str] = None
    # parquet: images with more pixels are skipped from their header, unread (decompression bombs);
    # the default is Pillow's own warning threshold
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, gt=0)
    limit: Optional[int] = Field(None, gt=0)
    holdout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0

    _path = field_validator("path")(lambda v: None if v is None else local_abspath(v))

    @property
    def toy(self) -> bool:
        """The embedded toy benchmark: evaluated with the toy metrics (else the paper's FID and CLIP)."""
        return self.kind in ("toy_digits", "fashion_mnist")

    @model_validator(mode="after")
    def _path_for_parquet(self):
        if self.kind == "parquet" and not self.path:
            raise ValueError("data.path: required when data.kind is 'parquet'")
        return self


ACTORS_HELP = ("actor pool size: a number, or 'auto' = one actor per GPU when gpus_per_actor > 0, else one "
               "single-threaded actor per CPU (separate processes scale better than torch threads on CPU)")


def _check_actors(v):
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        return v
    raise ValueError(f"must be a positive integer or 'auto' (got {v!r})")


class EncodeConfig(_Strict):
    batch_size: int = Field(64, gt=0)
    actors: Union[int, str] = Field("auto", description=ACTORS_HELP)
    gpus_per_actor: float = Field(0.0, ge=0)
    dtype: Literal["float16", "float32"] = "float16"
    max_rows_per_file: int = Field(20000, gt=0)

    _actors = field_validator("actors", mode="before")(_check_actors)


class TrajectoryConfig(_Strict):
    draws: int = Field(1, gt=0, description="noise draws per encoded row")
    batch_size: int = Field(64, gt=0)
    actors: Union[int, str] = Field("auto", description=ACTORS_HELP)
    gpus_per_actor: float = Field(0.0, ge=0)
    dtype: Literal["float16", "float32"] = "float16"
    max_rows_per_file: int = Field(20000, gt=0)
    seed: int = 0

    _actors = field_validator("actors", mode="before")(_check_actors)


class TrainConfig(_Strict):
    workers: int = Field(2, gt=0)
    use_gpu: bool = False
    zero_stage: Literal[2, 3] = 2
    offload: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    micro_batch: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    gradient_checkpointing: bool = Field(False, description=(
        "recompute the student's and the discriminator's block activations in the backward (diffusers' "
        "gradient checkpointing): ~10x less activation memory for about one more forward; SDXL at "
        "micro-batch 8 needs it on 80 GiB GPUs (docs/capacity.md)"))
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0, description=(
        "checkpoints a stage keeps, the latest ones (Ray Train deletes older ones from the run root as new ones "
        "register), and a LoRA-then-full stage also its LoRA phase's last; resuming reads the latest only. Each "
        "holds the student's and D's weights and ZeRO optimizer states. Not an input of the stage: changing it "
        "retrains nothing"))
    max_failures: int = Field(2, ge=0)
    log_every: int = Field(10, gt=0)
    held_rows: int = Field(256, ge=0, description="trajectory rows (whole source ids) held out of training to "
                           "watch the stage: the student's held MSE to its teacher and D's paired accuracy per "
                           "timestep stratum; 0: none")
    held_every: int = Field(50, gt=0, description="steps between held evaluations (and at every checkpoint)")
    max_nonfinite: int = Field(5, gt=0, description=(
        "an update whose loss or gradient is NaN or infinite is skipped and counted (history: "
        "skipped_student_updates, skipped_disc_updates); this many skipped updates of one model in a row "
        "stop the stage with an error, its latest checkpoint holding the last finite weights"))
    cache_mb: float = Field(2048, ge=0, description=(
        "a training worker keeps its shard of the trajectories in memory when its tensors fit under this "
        "(MiB), and deals the rows into new micro-batches every epoch; above it, every epoch streams again "
        "in file order (was the environment variable PADISTILL_TRAIN_CACHE_MB)"))
    d_saturation_window: int = Field(20, gt=0, description=(
        "micro-steps in a row with both of D's mean logits saturated (sigmoid beyond 0.99 or below 0.01) "
        "before a warning; every saturated step is counted (history: d_saturated_steps)"))
    seed: int = 0


class EvaluateConfig(_Strict):
    samples_per_prompt: int = Field(50, gt=0, description=(
        "samples per prompt (digit) for the toy metrics: 50 x 10 digits = 500, at which the toy FD moves "
        "~0.1 between seeds; at 10 it moved more between seeds than between models"))
    seed: int = 1234
    # CFG of the base teacher when it is sampled for comparison; None: its padistill.json's guidance_scale
    teacher_guidance_scale: Optional[float] = Field(None, ge=0.0)
    batch_size: int = Field(100, gt=0)
    # sampling runs as Ray Data batch inference (pipeline/eval_sampling.py), in restartable units
    actors: Union[int, str] = Field("auto", description=ACTORS_HELP)
    gpus_per_actor: float = Field(0.0, ge=0)
    unit_samples: int = Field(100, gt=0, description=(
        "samples per evaluation unit: one Parquet file and marker; a killed evaluation reruns only the units "
        "without one"))
    # non-toy runs (data.kind parquet): the paper's FID-Whole, FID-Patch and CLIP score (pipeline/real_metrics.py)
    prompts: int = Field(1000, gt=1, description="non-toy runs: evaluation prompts (the first captions of the "
                         "data source, one image each; their real images are the FID reference)")
    fid_inception_weights: Optional[str] = Field(None, description="torch-fidelity's Inception weights file "
                                                 "(pt_inception-2015-12-05-6726825d.pth) for FID; needs torch-fidelity")
    fid_extractor: Optional[str] = Field(None, description="instead: a TorchScript module, uint8 images "
                                         "[N, 3, H, W] -> features [N, D], for FID")
    clip_model: Optional[str] = Field(None, description="a local transformers CLIP folder (model + processor)")
    patch_size: int = Field(299, gt=0, description="FID-Patch: centre crop in px")
    speed_repeats: int = Field(2, gt=0, description="timed repeats of the sampling-speed comparison (best of)")
    speed_batch_size: int = Field(16, gt=0, description=(
        "samples per batch of the sampling-speed comparison (teacher and student alike): its cost is 64 teacher "
        "UNet passes plus the student's round(64 / steps) x steps (64 at 1, 2, 4, 8 or 32 steps) per sample and repeat"))

    _actors = field_validator("actors", mode="before")(_check_actors)


class ToyTeacherSection(_Strict):
    """`padistill toy-teacher`: which preset of `pipeline.toy_teacher.ToyTeacherConfig` to train
    (full: the shipped teacher; smoke: a ~2-minute run) and a few overrides (None: the preset's)."""

    preset: Literal["full", "smoke"] = "full"
    # the miniature's model family (pipeline.family); default model.family, else sdxl
    family: Optional[Literal["sdxl", "sd15", "sd3"]] = None
    # default: pipeline/assets/toy_teacher, toy_fashion_teacher or toy_fashion_teacher_sd15 / _sd3 (full, by
    # data.kind and family), <run_root>/toy_teacher (smoke; toy_teacher_sd15 / _sd3 for SD1.5 / SD3)
    output: Optional[str] = None
    vae_steps: Optional[int] = Field(None, gt=0)
    unet_steps: Optional[int] = Field(None, gt=0)
    unet_batch: Optional[int] = Field(None, gt=0)
    unet_lr: Optional[float] = Field(None, gt=0)
    # min-SNR-gamma weighting of the UNet's epsilon loss (pipeline.toy_teacher.ToyTeacherConfig.snr_gamma)
    snr_gamma: Optional[float] = Field(None, gt=0)
    # the UNet's sizes (the preset's ToyModelConfig otherwise): channels per level, layers per block
    unet_channels: Optional[list[PositiveInt]] = Field(None, min_length=2)
    unet_layers_per_block: Optional[int] = Field(None, gt=0)
    workers: Optional[int] = Field(None, gt=0)
    cpus_per_worker: Optional[int] = Field(None, gt=0)


class RayConfig(_Strict):
    address: Optional[str] = None  # None: start a local Ray for the run; "auto" or ray://… to join
    num_cpus: Optional[int] = Field(None, gt=0)


class RunConfig(_Strict):
    name: str = "run"
    run_root: str = "runs/run"  # local path, file://…, or s3://bucket/prefix
    storage: StorageConfig = Field(default_factory=StorageConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    trajectories: TrajectoryConfig = Field(default_factory=TrajectoryConfig)
    stages: list[StageConfig] = Field(default_factory=list)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    toy_teacher: ToyTeacherSection = Field(default_factory=ToyTeacherSection)
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("run_root")
    @classmethod
    def _root(cls, v: str) -> str:
        if not v:
            raise ValueError("must not be empty")
        if "://" in v and not v.startswith(("s3://", "file://")):
            raise ValueError(f"{v!r}: only local paths, file:// and s3:// run roots are supported")
        # a relative local root is the caller's: Ray Train workers run in Ray's own folders, where a
        # relative path would put the stage's history and TensorBoard events (and lose them with the session)
        return local_abspath(v)

    @model_validator(mode="after")
    def _chain(self):
        names: dict[str, StageConfig] = {}
        prev_steps = self.model.teacher_steps
        for i, st in enumerate(self.stages):
            if st.name in names:
                raise ValueError(f"stages.{i}.name: {st.name!r} is used by an earlier stage")
            if st.teacher_stage is not None:
                if st.teacher_stage not in names:
                    raise ValueError(f"stages.{i}.teacher_stage: {st.teacher_stage!r} is not an earlier stage")
                expected = names[st.teacher_stage].student_steps
                source = f"stage {st.teacher_stage!r}'s student"
            else:
                expected = prev_steps
                source = "the previous stage's student" if i else "model.teacher_steps (the base model)"
            if st.teacher_steps != expected:
                raise ValueError(f"stages.{i}.teacher_steps: {st.teacher_steps} does not match {source} "
                                 f"({expected} steps)")
            if st.student_init is not None and st.student_init not in names:
                raise ValueError(f"stages.{i}.student_init: {st.student_init!r} is not an earlier stage")
            if st.guidance_scale > 1.0 and i > 0:
                raise ValueError(f"stages.{i}.guidance_scale: classifier-free guidance is for the first stage "
                                 "only (later teachers are distilled students sampled without CFG)")
            names[st.name] = st
            prev_steps = st.student_steps
        return self

    # ---- helpers -------------------------------------------------------------------------------
    def stage(self, key: int | str) -> tuple[int, StageConfig]:
        """A stage by 1-based index or by name."""
        for i, st in enumerate(self.stages, start=1):
            if str(key) in (str(i), st.name):
                return i, st
        raise ConfigError(f"stage {key!r}: no such stage (have {[s.name for s in self.stages]})")

    def stage_dir(self, key: int | str) -> str:
        i, st = self.stage(key)
        return f"stages/{i}-{st.name}"

    def teacher_of(self, key: int | str) -> Optional[int]:
        """1-based index of the stage whose student teaches stage `key`; None for the base model."""
        i, st = self.stage(key)
        if st.teacher_stage is not None:
            return self.stage(st.teacher_stage)[0]
        return i - 1 if i > 1 else None

    def student_init_of(self, key: int | str) -> Optional[int]:
        """1-based index of the stage whose student the student of stage `key` starts from (the previous
        stage's, or `student_init`); None for the base model."""
        i, st = self.stage(key)
        if st.student_init is not None:
            return self.stage(st.student_init)[0]
        return i - 1 if i > 1 else None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---- loading ------------------------------------------------------------------------------------------------
def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            # validators above already prefix their own key; keep that one
            if ":" in msg.split(" ")[0]:
                sub, _, msg = msg.partition(": ")
                key = f"{key}.{sub}" if key else sub
        got = e.get("input")
        detail = f" (got {got!r})" if e["type"] not in ("extra_forbidden", "value_error", "missing") and not isinstance(
            got, (dict, list)) else ""
        lines.append(f"  {key or '<root>'}: {msg}{detail}")
    if len(lines) == 1:  # the usual case: one mistake, one line
        return "invalid config: " + lines[0].strip()
    return "invalid config:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.workers=2")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides or []:
        path, value = parse_override(item)
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            where = ".".join(path[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {item}: {where} is not an index of a list of {len(node)}")
                node = node[int(part)]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                raise ConfigError(f"--set {item}: {'.'.join(path[:depth])} is a value, not a section")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"--set {item}: {'.'.join(path)} is not an index of a list of {len(node)}")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def find_config(name_or_path: str | None) -> Path:
    """A config path, or the name of one shipped in configs/ (`toy_digits`, `smoke`, …)."""
    name = name_or_path or DEFAULT_CONFIG
    p = Path(name).expanduser()
    if p.exists():
        return p
    for cand in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if cand.exists():
            return cand
    shipped = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name!r}: no such file, and not a shipped config ({', '.join(shipped)})")


def from_dict(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    path = find_config(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return from_dict(apply_overrides(data, overrides or []))
