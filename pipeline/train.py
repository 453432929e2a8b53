"""Train one stage's student (DESIGN, "The method") with Ray Train and DeepSpeed ZeRO.

`train_stage(cfg, key)` runs a Ray Train `TorchTrainer` (workers from `train.workers`, gloo on CPU,
NCCL on GPUs). Each worker streams its shard of the stage's trajectories (`traj/` Parquet) through
`ray.train.get_dataset_shard` (equal split, `drop_last`: every rank takes the same number of batches,
so ZeRO-3's collectives never wait on a rank that ran out), and trains the student and, for an
adversarial stage, the discriminator as two separate DeepSpeed engines (ZeRO stage, CPU offload,
precision, micro-batch and gradient accumulation from `train`).

Phases of a stage (steps counted from 0, one step = `grad_accum` micro-batches per rank):

    conversion     (prediction_type "sample": `conversion_steps`) MSE of the student's x0 ("sample")
                   prediction against the x0 its initial epsilon weights (the teacher) imply, at
                   `conversion_lr` (default `lr`; the optimizer restarts at `lr` after it). A full
                   student first gets `conv_out` refitted by least squares on the first 4 micro-batches
                   of every rank (`StageLoop.fit_conversion_head`): the best linear read-out of the
                   UNet's last features, so the MSE starts near the target instead of at epsilon
    mse            (`mse_steps`) MSE of the student's one step vs the teacher's n steps: the whole of
                   a loss-mse stage, or an adversarial stage's warm-up at `mse_lr` (default `lr`; the
                   optimizer restarts at `lr` after it). Not in the paper, off by default
    disc_warmup    (adversarial: `disc_warmup_steps`) the conditional discriminator trains alone against
                   the student as it is, so that the student's first adversarial gradients come from a D
                   that already separates (not in the paper; docs/method.md has the measurements)
    conditional    (adversarial: `conditional_steps`) non-saturating GAN, alternating D / student
                   updates, conditional D(x_t, x_{t-ns}, t, c)
    unconditional  (adversarial: `unconditional_steps`) the same with D'(x_{t-ns}, c): the backbone
                   continues, the head is new

The student trains a peft LoRA for the first `lora.steps` steps of the stage (conversion included)
when `lora` is set, is then merged, and continues on the full UNet; `full_steps`, when given with a
LoRA, must be the remaining steps. For 1- and 2-step students both predictions are re-noised to
t* in `renoise_timesteps` (drawn with probabilities proportional to `renoise_weights`) before the
discriminator.

Checkpoints (every `checkpoint_every` steps, at each phase end and at the last step) go through
`ray.train.report` into `<root>/<stage_dir>/train/checkpoint_<step>/`: each rank's DeepSpeed ZeRO
shards plus the student's consolidated weights (see `pipeline.student`), so any checkpoint exports.
Rerunning resumes from the latest checkpoint (same storage path and run name, Ray Train V2).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
import time
import zlib
from typing import Callable, Iterator

import numpy as np
import torch

from . import cluster
from . import student as student_mod
from .config import ConfigError, RunConfig, from_dict
from .errors import MissingInputError
from .engines import DeepSpeedEngines
from .export import export_stage
from .layout import CKPT_PREFIX, RUN_NAME, manifest_step
from .phases import checkpoint_steps, phase_at, plan_phases
from .stage_loop import TRAIN_COLUMNS, StageLoop
from .storage import RunStorage, hash_json

HISTORY_JSON = "history.json"
INPUTS_JSON = "train_inputs.json"  # beside RUN_NAME: the inputs hash its checkpoints were made from
CURVES_PNG = "loss_curves.png"
TB_DIR = "tensorboard"



# ---- data --------------------------------------------------------------------------------------------
def micro_batches(shard, batch_size: int, epoch_hook: Callable[[int], None] | None = None,
                  seed: int = 0, cache_mb: float = 2048) -> Iterator[dict]:
    """Endless micro-batches of a worker's dataset shard (equal count per rank, drop_last). The first
    epoch is streamed in file order (trajectory files mix timesteps, `trajectories.compute_rows`);
    when the shard's tensors fit under `cache_mb` (`train.cache_mb`) it is kept in memory and every later
    epoch deals its rows into new micro-batches (a permutation from `seed` and the epoch), else every
    epoch streams again."""
    cache: list[dict] | None = []
    nbytes = 0
    epoch = 0
    for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=True):
        b = {k: b[k] for k in TRAIN_COLUMNS}
        if cache is not None:
            nbytes += sum(v.numel() * v.element_size() for v in b.values())
            if nbytes <= cache_mb * 2 ** 20:
                cache.append(b)
            else:
                cache = None
        yield b
    if cache is not None and not cache:
        raise ValueError("a training worker got no full micro-batch: fewer trajectory rows than "
                         "train.micro_batch x train.workers")
    rows = None
    if cache is not None:
        rows = {k: torch.cat([b[k] for b in cache]) for k in TRAIN_COLUMNS}
        cache = None
    while True:
        epoch += 1
        if epoch_hook:
            epoch_hook(epoch)
        if rows is not None:
            n = len(rows["t"])
            order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
            for i in range(0, n - batch_size + 1, batch_size):
                sel = order[i:i + batch_size]
                yield {k: v[sel] for k, v in rows.items()}
        else:
            for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=True):
                yield {k: b[k] for k in TRAIN_COLUMNS}


def _held_filter(modulus: int, keep_held: bool):
    def fn(batch):
        import pyarrow as pa

        ids = batch.column("id").to_pylist()
        mask = [(zlib.crc32(str(i).encode()) % modulus == 0) == keep_held for i in ids]
        return batch.filter(pa.array(mask))

    return fn


def read_trajectories(cfg: RunConfig, key, storage: RunStorage | None = None, held_rows: int = 16,
                      data_cpus: float | None = None):
    """(train, held) Ray Datasets of a stage's trajectories. Held rows are whole source ids (all their
    draws), about `held_rows` of them, picked by a hash of the id; never trained on. `data_cpus`: CPUs
    per read/filter task (0 where the training workers take every CPU, else Ray Data would wait forever)."""
    import ray.data

    remote = {} if data_cpus is None else {"num_cpus": data_cpus}
    # the shards stream for the whole stage: Ray Data's progress bars would redraw under the training
    # log for minutes (the trainer prints its own progress); also where `padistill train-stage` reads them
    cluster.quiet_libraries()

    from . import shards
    from .trajectories import SCHEMA_VERSION, step_name as traj_step

    storage = storage or RunStorage.from_config(cfg)
    rel = f"{cfg.stage_dir(key)}/traj"
    idx, _ = cfg.stage(key)
    manifest = storage.read_manifest(traj_step(cfg, key))
    if manifest is None:
        raise MissingInputError(f"{storage.url(rel)}: no finished trajectories; run `padistill trajectories --stage "
                                f"{idx}` first")
    got = manifest["outputs"].get("schema_version")
    if got != SCHEMA_VERSION:
        raise MissingInputError(f"{storage.url(rel)}: trajectories of schema version {got}, this padistill reads "
                                f"{SCHEMA_VERSION}; run `padistill trajectories --stage {idx}` to recompute them")
    shards.check_committed(storage, rel, manifest["outputs"]["files"], cfg.storage.verify_reads,
                           f"`padistill trajectories --stage {idx}`")
    ds = ray.data.read_parquet(storage.path(rel), filesystem=storage.arrow_fs, file_extensions=["parquet"],
                               ray_remote_args=remote)
    n = int(manifest["outputs"]["rows"])  # committed and checked above (counting the Parquet took ~4 s a stage)
    if held_rows <= 0 or n < 4 * held_rows:
        return ds.select_columns(TRAIN_COLUMNS), None, n
    modulus = max(2, n // held_rows)
    train = ds.map_batches(_held_filter(modulus, False), batch_format="pyarrow", **remote).select_columns(TRAIN_COLUMNS)
    held = ds.map_batches(_held_filter(modulus, True), batch_format="pyarrow", **remote).select_columns(TRAIN_COLUMNS)
    return train, held, n


# ---- the Ray Train worker -------------------------------------------------------------------------------
def _finite_mean(values: list[float]) -> float:
    """The mean of a window's finite values (a skipped update's loss is counted, not averaged); NaN when
    none is. Every rank keeps the same keys, so `_all_mean`'s all-reduce stays matched."""
    good = [v for v in values if math.isfinite(v)]
    return float(np.mean(good)) if good else float("nan")


def _all_mean(values: dict[str, float], world: int) -> dict[str, float]:
    import torch.distributed as dist

    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


def _write_history_outputs(storage: RunStorage, train_rel: str, history: list[dict], tb_local: str | None) -> None:
    storage.write_json(f"{train_rel}/{HISTORY_JSON}", history)
    if tb_local and storage.scheme != "file":
        storage.put_dir(tb_local, f"{train_rel}/{TB_DIR}")


def plot_curves(history: list[dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "mse", "d_loss", "d_real", "d_fake", "held_mse", "held_d_real", "held_d_fake",
                        "held_d_pacc") if any(k in h for h in history)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for k in keys:
        pts = [(0, h[f"start_{k}"]) for h in history[:1] if f"start_{k}" in h] + \
            [(h["step"], h[k]) for h in history if k in h]  # held_mse from the student before training
        ax = axes[2] if k == "held_d_pacc" else axes[1] if k.startswith(("d_", "held_d")) else axes[0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="." if len(pts) < 30 else None)
    axes[0].set_yscale("log" if all(h.get("loss", 1) > 0 for h in history) else "linear")
    axes[0].set_title("losses")
    axes[1].set_title("discriminator logits")
    axes[2].axhline(0.5, color="grey", lw=0.5, ls="--")
    axes[2].set_title("held: D's paired accuracy (0.5 = chance)")
    for ax in axes:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:  # an MSE stage draws nothing on D's panels
            ax.legend(fontsize=7)
    phases = sorted({(h["phase"], h["step"]) for h in history}, key=lambda x: x[1])
    seen = set()
    for name, s in phases:
        if name not in seen:
            seen.add(name)
            for ax in axes:
                ax.axvline(s, color="grey", lw=0.5)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def clear_stale_extension_locks(max_age_s: float = 900.0, log=print) -> list[str]:
    """Remove torch JIT-extension build locks older than `max_age_s`. DeepSpeed JIT-builds a small
    op on first use; a process killed mid-build (Ctrl-C, a preempted node) leaves its `lock` file
    behind and every later run waits on it forever (torch's FileBaton polls for it to vanish). The op
    builds in about a minute, so a lock a quarter of an hour old is stale."""
    import glob

    from torch.utils.cpp_extension import get_default_build_root

    base = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # where torch builds them
    removed = []
    for lock in glob.glob(os.path.join(base, "**", "lock"), recursive=True):
        try:
            if time.time() - os.path.getmtime(lock) > max_age_s:
                os.remove(lock)
                removed.append(lock)
                log(f"padistill: removed a stale torch extension build lock {lock} (left by a killed build)")
        except FileNotFoundError:
            pass
    return removed


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    from .trajectories import fetch_teacher
    from .zoo import load_unet, schedule_of

    cluster.quiet_report_lines()
    cluster.quiet_libraries()
    cfg = from_dict(config["run"])
    key = config["stage"]
    idx, stage = cfg.stage(key)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    import deepspeed

    clear_stale_extension_locks()
    with contextlib.redirect_stdout(io.StringIO()):  # on CPU it prints "…shm_comm_op built successfully"
        deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")
    if not cfg.train.use_gpu:  # fractional CPU workers get one thread each (Ray sets none below 1 CPU)
        torch.set_num_threads(max(1, int(config.get("cpus_per_worker", 1))))
    torch.manual_seed(cfg.train.seed * 1009 + rank)
    storage = RunStorage.from_config(cfg)
    sdir = cfg.stage_dir(key)
    train_rel = f"{sdir}/{RUN_NAME}"
    init_dir = fetch_teacher(config["init_source"], cfg)
    schedule = schedule_of(init_dir)  # the student's schedule and prediction type are its starting UNet's
    init_unet = load_unet(str(init_dir)).to(device)
    disc_unet = None
    if stage.loss == "adversarial" and config["disc_source"] != config["init_source"]:
        # kept on the CPU: only its encoder is copied into D (`build_disc` moves D to the device)
        disc_unet = load_unet(str(fetch_teacher(config["disc_source"], cfg))).requires_grad_(False)
    engines = DeepSpeedEngines(cfg.train, world)
    loop = StageLoop(cfg, stage, schedule, init_unet, engines, device, seed=cfg.train.seed * 7919 + rank,
                     disc_unet=disc_unet)
    total = loop.total
    ckpt_at = checkpoint_steps(stage, cfg.train.checkpoint_every)
    max_steps = config.get("max_steps") or total
    log = cluster.worker_log(f"[train {idx}-{stage.name}]") if rank == 0 else (lambda *a: None)

    # -- resume ---------------------------------------------------------------------------------------------
    step, history, resumed_from = 0, [], None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        local = tempfile.mkdtemp(prefix=f"padistill-resume-r{rank}-")
        ckpt.to_directory(local)
        state = student_mod.read_state(local)
        step, history, resumed_from = int(state["step"]), state.get("history", []), int(state["step"])
        loop.watch.resume(history[-1] if history else {})
        loop.build_student(state["student_mode"], lr=loop.student_lr_at(step - 1))
        engines.load(loop.student, os.path.join(local, "student", "ds"))
        if state.get("disc_mode"):
            loop.build_disc(state["disc_mode"])
            engines.load(loop.disc, os.path.join(local, "disc", "ds"))
        shutil.rmtree(local, ignore_errors=True)
        log(f"resumed from checkpoint at step {step} ({state['student_mode']} student, "
            f"discriminator {state.get('disc_mode')})")
        if rank == 0:  # checkpoints a killed run uploaded after its last registered one are junk
            for name in storage.ls(train_rel):
                if name.startswith(CKPT_PREFIX) and name[len(CKPT_PREFIX):].isdigit() \
                        and int(name[len(CKPT_PREFIX):]) > step:
                    storage.rm(train_rel, name)
    else:
        log(f"starting: {total} steps, phases "
            + ", ".join(f"{p.name} [{p.start}, {p.end})" for p in loop.phases)
            + f"; {world} workers x micro-batch {cfg.train.micro_batch} x accum {cfg.train.grad_accum}, "
              f"ZeRO-{cfg.train.zero_stage}{' + offload' if cfg.train.offload else ''}, {cfg.train.precision}")

    # -- data -------------------------------------------------------------------------------------------------
    batches = micro_batches(ray.train.get_dataset_shard("train"), cfg.train.micro_batch,
                            seed=cfg.train.seed * 7919 + rank, cache_mb=cfg.train.cache_mb)
    held = None
    held_shard = ray.train.get_dataset_shard("held") if config.get("has_held") else None
    if held_shard is not None:  # every rank evaluates the same held rows (all of them)
        parts = [loop.batch_to(hb) for hb in held_shard.iter_torch_batches(batch_size=256, drop_last=False)]
        held = {k: torch.cat([h[k] for h in parts]) for k in TRAIN_COLUMNS} if parts else None

    # -- observability ------------------------------------------------------------------------------------------
    writer, tb_local = None, None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        tb_local = storage.path(train_rel, TB_DIR) if storage.scheme == "file" else tempfile.mkdtemp(prefix="padistill-tb-")
        os.makedirs(tb_local, exist_ok=True)
        writer = SummaryWriter(tb_local, purge_step=step)

    start_held, want_start = None, held is not None and step == 0

    samples_per_step = cfg.train.micro_batch * cfg.train.grad_accum * world
    acc: dict[str, list[float]] = {}
    t_window, n_window = time.perf_counter(), 0
    timed_steps, timed_s, t_steady = 0, 0.0, time.perf_counter()
    end = min(total, max_steps)
    while step < end:
        for ev in loop.transition(step, lambda: loop.batch_to(next(batches))):
            log(ev)
        if want_start:  # the student (built by the first transition) before any update: where held metrics start
            want_start = False
            start_held = {f"start_{k}": v for k, v in _all_mean(loop.evaluate(held), world).items()}
            log("start: " + " ".join(f"{k}={v:.4g}" for k, v in start_held.items() if "_t" not in k[6:]))
        phase = phase_at(loop.phases, step)
        extra_d = stage.disc_steps - 1 if phase.adversarial else 0
        for _ in range(cfg.train.grad_accum):
            d_batches = [loop.batch_to(next(batches)) for _ in range(extra_d)]
            b = loop.batch_to(next(batches))
            for k, v in loop.micro_step(phase, b, d_batches).items():
                acc.setdefault(k, []).append(v)
            while loop.watch.warnings:
                log(loop.watch.warnings.pop(0))
        step += 1
        n_window += 1
        if step - (resumed_from or 0) == config.get("warmup_steps", 2):
            t_steady, timed_steps = time.perf_counter(), 0  # steady-state clock: after warm-up, all included
        elif step - (resumed_from or 0) > config.get("warmup_steps", 2):
            timed_steps += 1
            timed_s = time.perf_counter() - t_steady
        is_ckpt = step in ckpt_at or step == end
        if not (is_ckpt or step % cfg.train.log_every == 0):
            continue
        # -- report (every rank, the same steps) --
        now = time.perf_counter()
        metrics = _all_mean({k: _finite_mean(v) for k, v in sorted(acc.items())}, world)
        metrics.update(loop.watch.metrics())
        metrics.update(step=step, phase=phase.name, student_mode=loop.student_mode,
                       samples_per_s=n_window * samples_per_step / max(now - t_window, 1e-9),
                       steady_samples_per_s=(timed_steps * samples_per_step / timed_s) if timed_s else 0.0,
                       resumed_from=resumed_from if resumed_from is not None else -1)
        if loop.conversion_init is not None and phase.name == "conversion":
            metrics.update({f"conversion_init_{k}": v for k, v in loop.conversion_init.items()})
        if loop.disc_counts is not None:
            metrics.update(d_params_optimised=loop.disc_counts[0], d_params_total=loop.disc_counts[1])
        if held is not None and (is_ckpt or step % cfg.train.held_every == 0):
            metrics.update(_all_mean(loop.evaluate(held), world))
        if start_held is not None:  # in the first entry of the history
            metrics.update(start_held)
            start_held = None
        acc, t_window, n_window = {}, now, 0
        history.append(metrics)
        log(f"step {step}/{total} {phase.name:13s} " + " ".join(
            f"{k}={metrics[k]:.4g}" for k in ("loss", "mse", "d_loss", "d_real", "d_fake", "held_mse", "held_d_pacc",
                                              "held_d_auc") if k in metrics)
            + f" {metrics['samples_per_s']:.1f} samples/s")
        if writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    writer.add_scalar(f"{stage.name}/{k}", v, step)
            writer.flush()
        if not is_ckpt:
            ray.train.report(metrics)
            continue
        tmp = tempfile.mkdtemp(prefix=f"padistill-ckpt-r{rank}-")
        engines.save(loop.student, os.path.join(tmp, "student", "ds"))
        if loop.disc is not None:
            engines.save(loop.disc, os.path.join(tmp, "disc", "ds"))
        sd = engines.full_state_dict(loop.student)  # collective under ZeRO-3
        if rank == 0:
            from safetensors.torch import save_file

            if loop.student_mode == "lora":
                from peft.utils import get_peft_model_state_dict

                weights = {k: v.contiguous() for k, v in get_peft_model_state_dict(loop.student.module, state_dict=sd).items()}
                save_file(weights, os.path.join(tmp, "student", "lora.safetensors"))
            else:
                save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(tmp, "student", "unet.safetensors"))
            state = {"step": step, "stage": idx, "stage_name": stage.name, "phase": phase.name,
                     "student_mode": loop.student_mode, "disc_mode": loop.disc_mode,
                     "prediction_type": loop.student_ptype,
                     "lora": ({"rank": stage.lora.rank, "alpha": stage.lora.alpha} if stage.lora else None),
                     "zero_stage": cfg.train.zero_stage, "world_size": world, "history": history}
            with open(os.path.join(tmp, student_mod.STATE_JSON), "w") as f:
                json.dump(state, f, indent=1)
            _write_history_outputs(storage, train_rel, history, tb_local)
        del sd
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"{CKPT_PREFIX}{step:07d}")
        shutil.rmtree(tmp, ignore_errors=True)

    if rank == 0:
        writer.close()
        _write_history_outputs(storage, train_rel, history, tb_local)
        local_png = os.path.join(tempfile.mkdtemp(prefix="padistill-png-"), CURVES_PNG)
        plot_curves(history, local_png, f"stage {idx} ({stage.name}): {stage.teacher_steps} -> {stage.student_steps} steps")
        with open(local_png, "rb") as f:
            storage.write_bytes(f"{train_rel}/{CURVES_PNG}", f.read())
        log(f"done at step {step}; loss curves: {storage.url(train_rel, CURVES_PNG)}")


# ---- the driver ------------------------------------------------------------------------------------------
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
                 storage: RunStorage | None = None, extra_config: dict | None = None):
    """The TorchTrainer of one stage (not started)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .trajectories import disc_source, student_init_source

    storage = storage or RunStorage.from_config(cfg)
    idx, stage = cfg.stage(key)
    plan_phases(stage)  # config errors before any worker starts
    held_rows = cfg.train.held_rows if held_rows is None else held_rows
    import ray

    per_worker = worker_cpus(cfg, ray.cluster_resources().get("CPU", 0))
    train_ds, held_ds, n_rows = read_trajectories(cfg, key, storage, held_rows)
    datasets = {"train": train_ds}
    if held_ds is not None:  # read once here, while the CPUs are free: every worker reads all of it
        datasets["held"] = held_ds.materialize()  # (streamed, two workers took ~25 s for 128 rows on 2 CPUs)
    loop_config = {"run": cfg.model_dump(mode="json"), "stage": idx,
                   "init_source": student_init_source(cfg, key, storage),
                   "disc_source": disc_source(cfg, key, storage),
                   "has_held": held_ds is not None, "max_steps": max_steps,
                   "n_rows": n_rows, "cpus_per_worker": per_worker, **(extra_config or {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": per_worker}),
        run_config=RayRunConfig(name=RUN_NAME, storage_path=storage.path(cfg.stage_dir(key)),
                                storage_filesystem=storage.arrow_fs,
                                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=None),
                                logging_config=cluster.train_logging_config()),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def train_stage(cfg: RunConfig, key, *, held_rows: int | None = None, max_steps: int | None = None,
                export: bool = True, extra_config: dict | None = None, restart: bool = False,
                log=print) -> dict:
    """Train (or resume) stage `key`, export its student to `model/` and commit the step's manifest.
    `restart` discards the stage's checkpoints first (`claim_train_dir`). Returns a summary: final
    metrics, checkpoint path, model URL, resumed_from."""
    storage = RunStorage.from_config(cfg)
    idx, stage = cfg.stage(key)
    claim_train_dir(cfg, key, storage, restart=restart, log=log)
    trainer = make_trainer(cfg, key, held_rows=held_rows, max_steps=max_steps, storage=storage,
                           extra_config=extra_config)
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error:
        raise result.error
    metrics = dict(result.metrics or {})
    ckpt_path = result.checkpoint.path if result.checkpoint is not None else None
    summary = {"stage": idx, "name": stage.name, "metrics": metrics, "checkpoint": ckpt_path, "wall_s": wall,
               "train_dir": storage.url(cfg.stage_dir(key), RUN_NAME)}
    finished = metrics.get("step") == plan_phases(stage)[-1].end
    if export and finished and ckpt_path:
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


def train_inputs(cfg: RunConfig, key, storage: RunStorage) -> dict:
    """What a stage's training depends on (its manifest's inputs): the stage, the train section, the
    model, and the trajectories it reads."""
    from .trajectories import step_name as traj_step, student_init_source, teacher_fingerprint

    _, stage = cfg.stage(key)
    traj = storage.read_manifest(traj_step(cfg, key)) or {}
    out = {"stage": stage.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
           "model": cfg.model.model_dump(mode="json"), "trajectories": traj.get("inputs_hash")}
    if cfg.student_init_of(key) != cfg.teacher_of(key):  # a student that starts from another stage's student
        try:
            out["student_init"] = teacher_fingerprint(student_init_source(cfg, key, storage), cfg)
        except FileNotFoundError:
            out["student_init"] = None
    return out


def run_train_stage(cfg: RunConfig, key, *, force: bool = False, log=print) -> dict:
    """The DAG's train step: skipped when its manifest matches its inputs, else `train_stage` (which
    resumes from the latest checkpoint). Returns the step's manifest."""
    storage = RunStorage.from_config(cfg)
    step = step_name(cfg, key)
    if not force and storage.is_finished(step, train_inputs(cfg, key, storage)):
        log(f"padistill train-stage: {step} is up to date")
        return storage.read_manifest(step)
    summary = train_stage(cfg, key, restart=force, log=log)
    manifest = storage.read_manifest(step)
    if manifest is None:
        raise RuntimeError(f"{step}: training ended at step {summary['metrics'].get('step')} without finishing "
                           f"its phases; rerun to resume")
    return manifest
