"""The Ray Train worker of a stage (`train_loop_per_worker`): set-up, resume, the step loop around
`StageLoop`, progress lines, TensorBoard, the history and its plot, and checkpoints through
`ray.train.report`. The algorithm of a step is `pipeline.stage_loop`; the driver is `pipeline.train`.

Checkpoints (every `checkpoint_every` steps, at each phase end and at the last step) go to
`<root>/<stage_dir>/train/checkpoint_<step>/`: each rank's DeepSpeed ZeRO shards plus the student's
consolidated weights (see `pipeline.student`), so any checkpoint exports. A rerun with the same storage
path and run name resumes from the latest one (Ray Train V2)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from . import cluster
from . import student as student_mod
from .config import from_dict
from .engines import DeepSpeedEngines, all_reduce, clear_stale_extension_locks
from .layout import CKPT_PREFIX, CKPT_RANK, CURVES_PNG, HISTORY_JSON, RUN_NAME, TB_DIR
from .phases import checkpoint_rank, checkpoint_steps, phase_at
from .stage_loop import StageLoop
from .storage import RunStorage
from .train_data import micro_batches

LOGGED = ("loss", "mse", "d_loss", "d_real", "d_fake", "held_mse", "held_d_pacc", "held_d_auc")
CONSOLE_LINES = 6  # progress lines a stage prints; history.json and TensorBoard keep every logged step


def console_steps(total: int, log_every: int, end: int | None = None, lines: int = CONSOLE_LINES) -> set[int]:
    """The steps (up to `end`, default `total`) whose progress line goes to the console: every multiple of
    the smallest multiple of `log_every` (the steps the history records) that gives at most `lines` lines
    for `total` steps, and the last step."""
    end = total if end is None else end
    every = log_every * max(1, math.ceil(total / (lines * log_every)))
    return set(range(every, end + 1, every)) | {end}


@dataclasses.dataclass
class WorkerArgs:
    """What the driver (`train.make_trainer`) hands every worker (Ray Train passes a dict: `asdict`)."""

    run: dict  # the RunConfig as JSON
    stage: int
    init_source: str  # the student's starting UNet
    disc_source: str  # the UNet the discriminator's backbone is copied from
    has_held: bool  # a "held" dataset is passed
    cpus_per_worker: float
    max_steps: int | None = None  # stop early (tests, benchmarks); None: the stage's last step
    warmup_steps: int = 2  # steps after start or resume before the steady-state samples/s clock starts


def train_loop_per_worker(config: dict) -> None:
    StageWorker(WorkerArgs(**config)).run()


def _finite_mean(values: list[float]) -> float:
    """The mean of a window's finite values (a skipped update's loss is counted, not averaged); NaN when
    none is. Every rank keeps the same keys, so `_all_mean`'s all-reduce stays matched."""
    good = [v for v in values if math.isfinite(v)]
    return float(np.mean(good)) if good else float("nan")


def _all_mean(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = all_reduce(torch.tensor([values[k] for k in keys], dtype=torch.float64))
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


def _all_max(value: float, world: int) -> float:
    import torch.distributed as dist

    if world == 1:
        return value
    return float(all_reduce(torch.tensor([value], dtype=torch.float64), dist.ReduceOp.MAX).item())


def peak_memory_gib() -> float:
    """This rank's peak memory so far: on a GPU what torch allocated there; on the CPU the process's peak
    resident set (the model, optimizer and activations, plus the interpreter and its libraries)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


class StageWorker:
    """One rank of a stage's training. Rank 0 logs, writes TensorBoard, the history and the plot."""

    def __init__(self, args: WorkerArgs):
        import ray.train

        from .stage_models import fetch_teacher
        from .zoo import load_denoiser, schedule_of

        cluster.quiet_report_lines()
        cluster.quiet_libraries()
        self.args = args
        self.cfg = cfg = from_dict(args.run)
        self.idx, self.stage = cfg.stage(args.stage)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
        import deepspeed

        clear_stale_extension_locks()
        with contextlib.redirect_stdout(io.StringIO()):  # on CPU it prints "…shm_comm_op built successfully"
            deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")
        if not cfg.train.use_gpu:  # fractional CPU workers get one thread each (Ray sets none below 1 CPU)
            torch.set_num_threads(max(1, int(args.cpus_per_worker)))
        torch.manual_seed(cfg.train.seed * 1009 + self.rank)
        self.storage = RunStorage.from_config(cfg)
        self.train_rel = f"{cfg.stage_dir(args.stage)}/{RUN_NAME}"
        init_dir = fetch_teacher(args.init_source, cfg)
        schedule = schedule_of(init_dir)  # the student's schedule and prediction type are its starting UNet's
        init_unet = load_denoiser(str(init_dir)).to(device)
        disc_unet = None
        if self.stage.loss == "adversarial" and args.disc_source != args.init_source:
            # kept on the CPU: only its encoder is copied into D (`build_disc` moves D to the device)
            disc_unet = load_denoiser(str(fetch_teacher(args.disc_source, cfg))).requires_grad_(False)
        self.engines = DeepSpeedEngines(cfg.train, self.world)
        self.loop = StageLoop(cfg, self.stage, schedule, init_unet, self.engines, device,
                              seed=cfg.train.seed * 7919 + self.rank, disc_unet=disc_unet)
        self.log = cluster.worker_log(f"[train {self.idx}-{self.stage.name}]") if self.rank == 0 \
            else (lambda *a: None)
        self.step, self.history, self.resumed_from = 0, [], None
        self.writer, self.tb_local = None, None
        # the report window (samples/s since the last report) and the steady-state clock (after warm-up)
        self.samples_per_step = cfg.train.micro_batch * cfg.train.grad_accum * self.world
        self.t_window, self.n_window = time.perf_counter(), 0
        self.timed_steps, self.timed_s = 0, 0.0

    # -- resume ------------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Load the latest checkpoint Ray Train hands back, if any; else log the plan."""
        import ray.train

        loop, cfg = self.loop, self.cfg
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            self.log(f"starting: {loop.total} steps, phases "
                     + ", ".join(f"{p.name} [{p.start}, {p.end})" for p in loop.phases)
                     + f"; {self.world} workers x micro-batch {cfg.train.micro_batch} x accum {cfg.train.grad_accum}, "
                       f"ZeRO-{cfg.train.zero_stage}{' + offload' if cfg.train.offload else ''}, {cfg.train.precision}")
            return
        local = tempfile.mkdtemp(prefix=f"padistill-resume-r{self.rank}-")
        ckpt.to_directory(local)
        state = student_mod.read_state(local)
        self.step = self.resumed_from = int(state["step"])
        self.history = state.get("history", [])
        loop.watch.resume(self.history[-1] if self.history else {})
        loop.build_student(state["student_mode"], lr=loop.student_lr_at(self.step - 1))
        self.engines.load(loop.student, os.path.join(local, "student", "ds"))
        if state.get("disc_mode"):
            loop.build_disc(state["disc_mode"])
            self.engines.load(loop.disc, os.path.join(local, "disc", "ds"))
        shutil.rmtree(local, ignore_errors=True)
        self.log(f"resumed from checkpoint at step {self.step} ({state['student_mode']} student, "
                 f"discriminator {state.get('disc_mode')})")
        if self.rank == 0:  # checkpoints a killed run uploaded after its last registered one are junk
            for name in self.storage.ls(self.train_rel):
                if name.startswith(CKPT_PREFIX) and name[len(CKPT_PREFIX):].isdigit() \
                        and int(name[len(CKPT_PREFIX):]) > self.step:
                    self.storage.rm(self.train_rel, name)

    def load_held(self) -> dict | None:
        """The held rows, all of them on every rank (every rank evaluates the same rows)."""
        import ray.train

        if not self.args.has_held:
            return None
        shard = ray.train.get_dataset_shard("held")
        parts = [self.loop.batch_to(hb) for hb in shard.iter_torch_batches(batch_size=256, drop_last=False)]
        return {k: torch.cat([h[k] for h in parts]) for k in parts[0]} if parts else None

    # -- the step loop ---------------------------------------------------------------------------------------
    def run(self) -> None:
        import ray.train

        cfg, loop, stage = self.cfg, self.loop, self.stage
        self.resume()
        batches = micro_batches(ray.train.get_dataset_shard("train"), cfg.train.micro_batch,
                                seed=cfg.train.seed * 7919 + self.rank, cache_mb=cfg.train.cache_mb)
        held = self.load_held()
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            st = self.storage
            self.tb_local = st.path(self.train_rel, TB_DIR) if st.scheme == "file" \
                else tempfile.mkdtemp(prefix="padistill-tb-")
            os.makedirs(self.tb_local, exist_ok=True)
            self.writer = SummaryWriter(self.tb_local, purge_step=self.step)

        start_held, want_start = None, held is not None and self.step == 0
        ckpt_at = checkpoint_steps(stage, cfg.train.checkpoint_every)
        end = min(loop.total, self.args.max_steps or loop.total)
        acc: dict[str, list[float]] = {}
        self.t_window = t_steady = time.perf_counter()
        since = self.resumed_from or 0
        console_at = console_steps(loop.total, cfg.train.log_every, end)
        while self.step < end:
            for ev in loop.transition(self.step, lambda: loop.batch_to(next(batches))):
                self.log(ev)
            if want_start:  # the student (built by the first transition) before any update: where held metrics start
                want_start = False
                start_held = {f"start_{k}": v for k, v in _all_mean(loop.evaluate(held), self.world).items()}
                self.log("start: " + " ".join(f"{k}={v:.4g}" for k, v in start_held.items() if "_t" not in k[6:]))
            phase = phase_at(loop.phases, self.step)
            extra_d = stage.disc_steps - 1 if phase.adversarial else 0
            for _ in range(cfg.train.grad_accum):
                d_batches = [loop.batch_to(next(batches)) for _ in range(extra_d)]
                b = loop.batch_to(next(batches))
                for k, v in loop.micro_step(phase, b, d_batches).items():
                    acc.setdefault(k, []).append(v)
                while loop.watch.warnings:
                    self.log(loop.watch.warnings.pop(0))
            self.step += 1
            self.n_window += 1
            if self.step - since == self.args.warmup_steps:
                t_steady, self.timed_steps = time.perf_counter(), 0  # steady-state clock: after warm-up
            elif self.step - since > self.args.warmup_steps:
                self.timed_steps += 1
                self.timed_s = time.perf_counter() - t_steady
            is_ckpt = self.step in ckpt_at or self.step == end
            if not (is_ckpt or self.step % cfg.train.log_every == 0):
                continue
            metrics = self.window_metrics(phase, acc, held if is_ckpt or self.step % cfg.train.held_every == 0 else None)
            if start_held is not None:  # in the first entry of the history
                metrics.update(start_held)
                start_held = None
            acc = {}
            self.history.append(metrics)
            self.show(metrics, phase, console=self.step in console_at)
            if is_ckpt:
                self.checkpoint(metrics, phase)
            else:
                ray.train.report(metrics)
        self.finish()

    def window_metrics(self, phase, acc: dict[str, list[float]], held: dict | None) -> dict:
        """The metrics of the steps since the last report, averaged over ranks (every rank calls it at the
        same steps); starts the next window."""
        loop, now = self.loop, time.perf_counter()
        metrics = _all_mean({k: _finite_mean(v) for k, v in sorted(acc.items())}, self.world)
        metrics.update(loop.watch.metrics())
        metrics.update(step=self.step, phase=phase.name, student_mode=loop.student_mode,
                       samples_per_s=self.n_window * self.samples_per_step / max(now - self.t_window, 1e-9),
                       steady_samples_per_s=(self.timed_steps * self.samples_per_step / self.timed_s)
                       if self.timed_s else 0.0,
                       resumed_from=self.resumed_from if self.resumed_from is not None else -1,
                       peak_memory_gib=_all_max(peak_memory_gib(), self.world))  # the largest rank's
        if loop.conversion_init is not None and phase.name == "conversion":
            metrics.update({f"conversion_init_{k}": v for k, v in loop.conversion_init.items()})
        if loop.disc_counts is not None:
            metrics.update(d_params_optimised=loop.disc_counts[0], d_params_total=loop.disc_counts[1])
        if held is not None:
            metrics.update(_all_mean(loop.evaluate(held), self.world))
        self.t_window, self.n_window = now, 0
        return metrics

    def show(self, metrics: dict, phase, console: bool = True) -> None:
        """The TensorBoard scalars, and (`console`) one progress line (rank 0)."""
        if console:
            self.log(f"step {self.step}/{self.loop.total} {phase.name:13s} "
                     + " ".join(f"{k}={metrics[k]:.4g}" for k in LOGGED if k in metrics)
                     + f" {metrics['samples_per_s']:.1f} samples/s")
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(f"{self.stage.name}/{k}", v, self.step)
            self.writer.flush()

    # -- checkpoints and the end ------------------------------------------------------------------------------
    def checkpoint(self, metrics: dict, phase) -> None:
        """Every rank's engine state, rank 0's consolidated student and state, reported to Ray Train."""
        import ray.train
        from ray.train import Checkpoint

        loop, engines, stage = self.loop, self.engines, self.stage
        tmp = tempfile.mkdtemp(prefix=f"padistill-ckpt-r{self.rank}-")
        engines.save(loop.student, os.path.join(tmp, "student", "ds"))
        if loop.disc is not None:
            engines.save(loop.disc, os.path.join(tmp, "disc", "ds"))
        sd = engines.full_state_dict(loop.student)  # collective under ZeRO-3
        if self.rank == 0:
            from safetensors.torch import save_file

            if loop.student_mode == "lora":
                from peft.utils import get_peft_model_state_dict

                weights = {k: v.contiguous() for k, v in
                           get_peft_model_state_dict(loop.student.module, state_dict=sd).items()}
                save_file(weights, os.path.join(tmp, "student", "lora.safetensors"))
            else:
                save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(tmp, "student", "unet.safetensors"))
            state = {"step": self.step, "stage": self.idx, "stage_name": stage.name, "phase": phase.name,
                     "student_mode": loop.student_mode, "disc_mode": loop.disc_mode,
                     "prediction_type": loop.student_ptype,
                     "lora": ({"rank": stage.lora.rank, "alpha": stage.lora.alpha} if stage.lora else None),
                     "zero_stage": self.cfg.train.zero_stage, "world_size": self.world, "history": self.history}
            with open(os.path.join(tmp, student_mod.STATE_JSON), "w") as f:
                json.dump(state, f, indent=1)
            self.write_history()
        del sd
        ray.train.report({**metrics, CKPT_RANK: checkpoint_rank(stage, self.step)},
                         checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=f"{CKPT_PREFIX}{self.step:07d}")
        shutil.rmtree(tmp, ignore_errors=True)

    def write_history(self) -> None:
        self.storage.write_json(f"{self.train_rel}/{HISTORY_JSON}", self.history)
        if self.tb_local and self.storage.scheme != "file":
            self.storage.put_dir(self.tb_local, f"{self.train_rel}/{TB_DIR}")

    def finish(self) -> None:
        if self.rank != 0:
            return
        self.writer.close()
        self.write_history()
        local_png = os.path.join(tempfile.mkdtemp(prefix="padistill-png-"), CURVES_PNG)
        plot_curves(self.history, local_png,
                    f"stage {self.idx} ({self.stage.name}): {self.stage.teacher_steps} -> {self.stage.student_steps} steps")
        with open(local_png, "rb") as f:
            self.storage.write_bytes(f"{self.train_rel}/{CURVES_PNG}", f.read())
        self.log(f"done at step {self.step}; loss curves: {self.storage.url(self.train_rel, CURVES_PNG)}")


def plot_curves(history: list[dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "mse", "d_loss", "d_real", "d_fake", "held_mse", "held_d_real", "held_d_fake",
                        "held_d_pacc") if any(k in h for h in history)]
    with_d = any(k.startswith(("d_", "held_d")) for k in keys)  # an MSE stage has only the losses panel
    fig, axes = plt.subplots(1, 3 if with_d else 1, figsize=(15 if with_d else 5, 4), squeeze=False)
    axes = list(axes[0])
    for k in keys:
        pts = [(0, h[f"start_{k}"]) for h in history[:1] if f"start_{k}" in h] + \
            [(h["step"], h[k]) for h in history if k in h]  # held_mse from the student before training
        ax = axes[2] if k == "held_d_pacc" else axes[1] if k.startswith(("d_", "held_d")) else axes[0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="." if len(pts) < 30 else None)
    axes[0].set_yscale("log" if all(h.get("loss", 1) > 0 for h in history) else "linear")
    axes[0].set_title("losses")
    if with_d:
        axes[1].set_title("discriminator logits")
        axes[2].axhline(0.5, color="grey", lw=0.5, ls="--")
        axes[2].set_title("held: D's paired accuracy (0.5 = chance)")
    for ax in axes:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for prev, h in zip(history, history[1:]):  # a phase ends at a checkpoint, so at a record: a line there
        if h["phase"] != prev["phase"]:
            for ax in axes:
                ax.axvline(prev["step"], color="grey", lw=0.5)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
