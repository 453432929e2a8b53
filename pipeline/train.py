"""Train one stage's student (DESIGN, "The method") with Ray Train and DeepSpeed ZeRO: the driver.

`train_stage(cfg, key)` runs a Ray Train `TorchTrainer` (workers from `train.workers`, gloo on CPU,
NCCL on GPUs) on the stage's trajectories (`pipeline.train_data`: equal split, `drop_last`, so ZeRO-3's
collectives never wait on a rank that ran out). Each worker (`pipeline.train_worker`) trains the student
and, for an adversarial stage, the discriminator as two separate engines (`pipeline.engines`: ZeRO stage,
CPU offload, precision, micro-batch and gradient accumulation from `train`) through the stage's phases
(`pipeline.phases`, where they are described), one micro-step at a time (`pipeline.stage_loop`, where
the method is read).

A rerun resumes from the stage's latest checkpoint (same storage path and run name, Ray Train V2) when
its inputs are unchanged (`claim_train_dir`); a finished stage is exported to `model/` and its manifest
committed.
"""

from __future__ import annotations

import dataclasses
import time

from . import cluster
from .config import ConfigError, RunConfig
from .export import export_stage
from .layout import CKPT_RANK, CURVES_PNG, HISTORY_JSON, RUN_NAME, TB_DIR, manifest_step
from .phases import lora_export_step, plan_phases
from .storage import RunStorage, hash_json
from .train_data import stage_datasets
from .train_worker import WorkerArgs, train_loop_per_worker

INPUTS_JSON = "train_inputs.json"  # beside RUN_NAME: the inputs hash its checkpoints were made from


def worker_cpus(cfg: RunConfig, cluster_cpus: float) -> float:
    """CPUs each training worker asks Ray for. GPU workers take 1. CPU workers take 1 where that leaves
    a CPU for Ray Data's read tasks; on a small machine (2 workers on 2 CPUs) they share what is left
    after one CPU for the data, else the streaming split would wait forever for a free CPU."""
    if cfg.train.use_gpu:
        return 1.0
    n = cfg.train.workers
    if cluster_cpus - n >= 1:
        return 1.0
    if cluster_cpus < 2:
        raise ConfigError(f"train.workers: this Ray cluster has {cluster_cpus:g} CPUs; CPU training needs at least "
                          "2 (one for the data)")
    return round((cluster_cpus - 1) / n, 3)


def step_name(cfg: RunConfig, key) -> str:
    """The manifest step of stage `key`'s training: "train-<k>-<name>"."""
    return manifest_step(cfg, key, "train")


def make_trainer(cfg: RunConfig, key, *, held_rows: int | None = None, max_steps: int | None = None,
                 storage: RunStorage | None = None):
    """The TorchTrainer of one stage (not started)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .stage_models import disc_source, student_init_source

    storage = storage or RunStorage.from_config(cfg)
    idx, stage = cfg.stage(key)
    plan_phases(stage)  # config errors before any worker starts
    held_rows = cfg.train.held_rows if held_rows is None else held_rows
    import ray

    per_worker = worker_cpus(cfg, ray.cluster_resources().get("CPU", 0))
    train_ds, held_ds = stage_datasets(cfg, key, storage, held_rows)
    datasets = {"train": train_ds}
    if held_ds is not None:  # read once here, while the CPUs are free: every worker reads all of it
        datasets["held"] = held_ds.materialize()  # (streamed, two workers took ~25 s for 128 rows on 2 CPUs)
    args = WorkerArgs(run=cfg.model_dump(mode="json"), stage=idx, init_source=student_init_source(cfg, key, storage),
                      disc_source=disc_source(cfg, key, storage), has_held=held_ds is not None,
                      cpus_per_worker=per_worker, max_steps=max_steps)
    cluster.fast_train_polls()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(args),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": per_worker}),
        run_config=RayRunConfig(name=RUN_NAME, storage_path=storage.path(cfg.stage_dir(key)),
                                storage_filesystem=storage.arrow_fs,
                                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                                # the latest `keep_checkpoints`, and a LoRA-then-full stage's LoRA (`checkpoint_rank`)
                                checkpoint_config=CheckpointConfig(
                                    num_to_keep=cfg.train.keep_checkpoints + (lora_export_step(stage) is not None),
                                    checkpoint_score_attribute=CKPT_RANK, checkpoint_score_order="max"),
                                logging_config=cluster.train_logging_config()),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def train_stage(cfg: RunConfig, key, *, held_rows: int | None = None, max_steps: int | None = None,
                export: bool = True, restart: bool = False, log=print) -> dict:
    """Train (or resume) stage `key`, export its student to `model/` and commit the step's manifest.
    `restart` discards the stage's checkpoints first (`claim_train_dir`). Returns a summary: final
    metrics (`resumed_from` among them: the step it resumed at, -1 for a fresh start), checkpoint path,
    model URL."""
    from .zoo import family_module

    family_module(cfg)  # settings the model's family does not support fail here in one line, not in a worker
    storage = RunStorage.from_config(cfg)
    idx, stage = cfg.stage(key)
    claim_train_dir(cfg, key, storage, restart=restart, log=log)
    trainer = make_trainer(cfg, key, held_rows=held_rows, max_steps=max_steps, storage=storage)
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error:
        raise result.error
    metrics = dict(result.metrics or {})
    metrics.pop(CKPT_RANK, None)  # Ray Train's bookkeeping, not a result
    ckpt_path = result.checkpoint.path if result.checkpoint is not None else None
    summary = {"stage": idx, "name": stage.name, "metrics": metrics, "checkpoint": ckpt_path, "wall_s": wall,
               "train_dir": storage.url(cfg.stage_dir(key), RUN_NAME)}
    done = metrics.get("step") == plan_phases(stage)[-1].end
    if export and done and ckpt_path:
        summary["model"] = export_stage(cfg, key, ckpt_path, storage)
        storage.commit_manifest(
            step_name(cfg, key),
            inputs=train_inputs(cfg, key, storage),
            outputs={"checkpoint": storage.rel(ckpt_path), "model": storage.rel(summary["model"]),
                     "history": f"{cfg.stage_dir(key)}/{RUN_NAME}/{HISTORY_JSON}",
                     "loss_curves": f"{cfg.stage_dir(key)}/{RUN_NAME}/{CURVES_PNG}",
                     "tensorboard": f"{cfg.stage_dir(key)}/{RUN_NAME}/{TB_DIR}"},
            steps=metrics.get("step"), final_metrics=metrics)
    return summary


def claim_train_dir(cfg: RunConfig, key, storage: RunStorage, *, restart: bool = False, log=print) -> None:
    """Make the stage's Ray Train folder resume only checkpoints of the same inputs. Rerunning resumes
    from the latest checkpoint (same storage path and run name), so checkpoints made from other
    trajectories, stage or train settings (or by a version without `INPUTS_JSON`) would be resumed as
    if they were this run's: such a folder is removed and the stage starts over, as with `restart`."""
    sdir = cfg.stage_dir(key)
    ih = hash_json(train_inputs(cfg, key, storage))
    rel = f"{sdir}/{INPUTS_JSON}"
    prev = storage.read_json(rel).get("inputs_hash") if storage.exists(rel) else None
    if (restart or prev != ih) and storage.exists(sdir, RUN_NAME):
        why = "--force" if restart else "its trajectories, stage or train settings changed"
        log(f"padistill train-stage: discarding the checkpoints in {storage.url(sdir, RUN_NAME)} ({why}): "
            "starting the stage over")
        storage.rm(sdir, RUN_NAME)
        storage.invalidate(step_name(cfg, key))
    if prev != ih:
        storage.write_json(rel, {"inputs_hash": ih})


# stage keys added after runs were trained, with their defaults (a stage at the default hashes as before the key)
LATER_STAGE_KEYS = {"disc_blocks": None, "lr_warmup_steps": 0, "lr_decay": "none"}


def train_inputs(cfg: RunConfig, key, storage: RunStorage) -> dict:
    """What a stage's training depends on (its manifest's inputs): the stage, the train section, the
    model, and the trajectories it reads."""
    from .stage_models import student_init_source, teacher_fingerprint
    from .trajectories import step_name as traj_step

    _, stage = cfg.stage(key)
    traj = storage.read_manifest(traj_step(cfg, key)) or {}
    # keys added since (disc_blocks, lr_warmup_steps, lr_decay) are left out at their defaults, so a stage trained before
    # them stays finished
    later = {k for k, default in LATER_STAGE_KEYS.items() if getattr(stage, k) == default}
    out = {"stage": stage.model_dump(mode="json", exclude=later or None),
           # how many checkpoints stay on disk changes nothing trained (and a run root from before the key stays finished)
           "train": cfg.train.model_dump(mode="json", exclude={"keep_checkpoints"}),
           # model.family is fixed by the source (and checked against it), model.base only sizes `padistill
           # plan`: a run root trained before the keys existed, or with them set, stays finished
           "model": cfg.model.model_dump(mode="json", exclude={"family", "base"}),
           "trajectories": traj.get("inputs_hash")}
    if cfg.student_init_of(key) != cfg.teacher_of(key):  # a student that starts from another stage's student
        try:
            out["student_init"] = teacher_fingerprint(student_init_source(cfg, key, storage), cfg)
        except FileNotFoundError:
            out["student_init"] = None
    return out


def finished(cfg: RunConfig, key, storage: RunStorage | None = None) -> dict | None:
    """Stage `key`'s training manifest when it finished with today's inputs; else None (no Ray)."""
    storage = storage or RunStorage.from_config(cfg)
    step = step_name(cfg, key)
    return storage.finished_manifest(step, train_inputs(cfg, key, storage))


def run_train_stage(cfg: RunConfig, key, *, force: bool = False, log=print) -> dict:
    """The DAG's train step: skipped when its manifest matches its inputs, else `train_stage` (which
    resumes from the latest checkpoint). Returns the step's manifest."""
    storage = RunStorage.from_config(cfg)
    step = step_name(cfg, key)
    if not force and (manifest := finished(cfg, key, storage)) is not None:
        log(f"padistill train-stage: {step} is up to date")
        return manifest
    summary = train_stage(cfg, key, restart=force, log=log)
    manifest = storage.read_manifest(step)
    if manifest is None:
        raise RuntimeError(f"{step}: training ended at step {summary['metrics'].get('step')} without finishing "
                           f"its phases; rerun to resume")
    return manifest
