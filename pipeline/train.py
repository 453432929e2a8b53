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

import gc
import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from . import cluster
from . import student as student_mod
from .config import ConfigError, RunConfig, StageConfig, from_dict
from .discriminator import Discriminator, nonsaturating_d_loss, nonsaturating_g_loss
from .errors import MissingInputError
from .guard import UpdateWatch, finite_everywhere
from .schedule import Conditioning, Schedule, unet_denoiser
from .storage import RunStorage, hash_json

TRAIN_COLUMNS = ["t", "t_next", "x_t", "target", "prompt_embeds", "pooled_embeds"]
RUN_NAME = "train"  # Ray Train run name: the storage folder under the stage dir
CKPT_PREFIX = "checkpoint_"
HISTORY_JSON = "history.json"
INPUTS_JSON = "train_inputs.json"  # beside RUN_NAME: the inputs hash its checkpoints were made from
CURVES_PNG = "loss_curves.png"
TB_DIR = "tensorboard"
CACHE_MB = float(os.environ.get("PADISTILL_TRAIN_CACHE_MB", "2048"))  # keep a worker's shard in memory below this


# ---- phases ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    name: str  # conversion | mse | disc_warmup | conditional | unconditional
    start: int
    end: int  # exclusive

    @property
    def adversarial(self) -> bool:
        """A phase with a discriminator (the D warm-up trains D only)."""
        return self.name in ("disc_warmup", "conditional", "unconditional")


def plan_phases(stage: StageConfig) -> list[Phase]:
    """The stage's phases in order (and a check that its step counts make sense)."""
    where = f"stage {stage.name!r}"
    phases: list[Phase] = []
    s = 0

    def add(name: str, n: int) -> None:
        nonlocal s
        if n > 0:
            phases.append(Phase(name, s, s + n))
            s += n

    if stage.prediction_type == "sample":
        add("conversion", stage.conversion_steps)
    elif stage.conversion_steps:
        raise ConfigError(f"{where}: conversion_steps is for prediction_type 'sample' (the x0 conversion)")
    if stage.loss == "mse":
        if stage.conditional_steps or stage.unconditional_steps:
            raise ConfigError(f"{where}: conditional_steps/unconditional_steps are for adversarial stages")
        add("mse", stage.mse_steps)
    else:
        add("mse", stage.mse_steps)  # the optional warm-up
        if stage.disc_warmup_steps and not stage.conditional_steps:
            raise ConfigError(f"{where}: disc_warmup_steps trains the conditional discriminator before its phase; "
                              "set conditional_steps")
        add("disc_warmup", stage.disc_warmup_steps)
        add("conditional", stage.conditional_steps)
        add("unconditional", stage.unconditional_steps)
    if s == 0:
        raise ConfigError(f"{where}: no training steps (set mse_steps, or conditional_steps/unconditional_steps)")
    if stage.lora is not None and stage.full_steps and stage.lora.steps + stage.full_steps != s:
        raise ConfigError(f"{where}: lora.steps ({stage.lora.steps}) + full_steps ({stage.full_steps}) must equal "
                          f"the stage's {s} steps (conversion + loss phases)")
    if stage.lora is None and stage.full_steps and stage.full_steps != s:
        raise ConfigError(f"{where}: full_steps ({stage.full_steps}) must equal the stage's {s} steps "
                          "(or be 0) when there is no LoRA phase")
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    for p in phases:
        if p.start <= step < p.end:
            return p
    return phases[-1]


def student_mode_at(stage: StageConfig, step: int) -> str:
    return "lora" if stage.lora is not None and step < stage.lora.steps else "full"


def disc_mode_at(phase: Phase) -> str | None:
    if phase.name == "disc_warmup":
        return "conditional"
    return phase.name if phase.adversarial else None


def checkpoint_steps(stage: StageConfig, every: int) -> set[int]:
    """Steps (counted as completed steps) after which a checkpoint is taken: every `every`, at each
    phase end and at the end of the LoRA phase (before the merge, so the LoRA itself is exportable)."""
    phases = plan_phases(stage)
    total = phases[-1].end
    lora_end = {stage.lora.steps} if stage.lora is not None and 0 < stage.lora.steps < total else set()
    return {s for s in range(every, total + 1, every)} | {p.end for p in phases} | lora_end


# ---- engines ------------------------------------------------------------------------------------------
def deepspeed_config(train, lr: float, betas, weight_decay: float, world: int) -> dict:
    opt = {"type": "AdamW" if weight_decay else "Adam",
           "params": {"lr": lr, "betas": list(betas), "eps": 1e-8, "weight_decay": weight_decay,
                      "torch_adam": True}}
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if train.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch * train.grad_accum * world,
        "optimizer": opt,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # torch Adam (no compiled op) also under offload
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngines:
    """Builds DeepSpeed engines (one per model: their configs stay separate) and moves their state."""

    def __init__(self, train, world: int):
        import deepspeed

        self.ds = deepspeed
        self.train = train
        self.world = world
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        deepspeed.utils.logger.setLevel(logging.WARNING)

    def make(self, module, lr: float, betas, weight_decay: float):
        params = [p for p in module.parameters() if p.requires_grad]
        counts = optimised_counts(module, params)  # before ZeRO-3 partitions the parameters away
        engine, *_ = self.ds.initialize(model=module, model_parameters=params,
                                        config=deepspeed_config(self.train, lr, betas, weight_decay, self.world))
        engine.padistill_counts = counts
        return engine

    def full_state_dict(self, engine) -> dict[str, torch.Tensor]:
        """The module's complete state dict on every rank (gathered under ZeRO-3), on the CPU."""
        m = engine.module
        if engine.zero_optimization_stage() == 3:
            with self.ds.zero.GatheredParameters(list(m.parameters()), modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
        return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}

    def save(self, engine, folder: str) -> None:
        engine.save_checkpoint(folder, tag="ds")

    def load(self, engine, folder: str) -> None:
        engine.checkpoint_engine.load = weights_only_load  # DeepSpeed's own unpickles anything
        path, _ = engine.load_checkpoint(folder, tag="ds")
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {folder}")

    def destroy(self, engine) -> None:
        try:
            engine.destroy()
        except Exception:  # older engines have no destroy(); dropping references is enough
            pass


def weights_only_load(path: str, map_location=None):
    """DeepSpeed's checkpoint engine `load`, without running code from the file: `torch.load` with
    `weights_only=True`, allowing the three DeepSpeed classes its ZeRO-2/3 checkpoints hold (listed for
    fp32 and bf16, with and without offload) and fp16's dynamic loss scaler. A checkpoint holding anything
    else is refused, naming the file and the object (torch's own message would advise `weights_only=False`)."""
    import pickle

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from .errors import UnsafeCheckpointError

    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        what = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), str(e).splitlines()[0])
        raise UnsafeCheckpointError(f"{path}: not loaded, it would run code when unpickled ({what}); a checkpoint "
                                    "padistill wrote holds only tensors and DeepSpeed's optimizer state. Delete "
                                    "the stage's checkpoints to restart it, or find out who altered them") from e


def optimised_counts(module, params) -> tuple[int, int]:
    """(parameters handed to the optimizer, parameters of the module)."""
    return sum(p.numel() for p in params), sum(p.numel() for p in module.parameters())


class PlainEngine:
    """A single-process torch model + Adam with DeepSpeed's engine interface (`__call__`, `backward`,
    `step`, `module`): the bare loop the benchmark compares against, running the same updates."""

    def __init__(self, module, lr: float, betas, weight_decay: float, grad_accum: int = 1):
        self.module = module
        params = [p for p in module.parameters() if p.requires_grad]
        cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
        self.optimizer = cls(params, lr=lr, betas=tuple(betas), eps=1e-8, weight_decay=weight_decay)
        self.padistill_counts = optimised_counts(module, params)
        self.grad_accum = grad_accum
        self.micro = 0
        self._applied = False

    def __call__(self, *a, **k):
        return self.module(*a, **k)

    def parameters(self):
        return self.module.parameters()

    def backward(self, loss):
        (loss / self.grad_accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro + 1) % self.grad_accum == 0

    def step(self):
        """At an accumulation boundary: Adam's step unless a gradient is not finite (then skipped, as
        DeepSpeed's ZeRO optimizers do; `was_step_applied` says which)."""
        self.micro += 1
        self._applied = False
        if self.micro % self.grad_accum == 0:
            grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            self._applied = all(bool(torch.isfinite(g).all()) for g in grads)
            if self._applied:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def was_step_applied(self) -> bool:
        return self._applied


class PlainEngines:
    def __init__(self, train):
        self.train = train

    def make(self, module, lr, betas, weight_decay):
        return PlainEngine(module, lr, betas, weight_decay, self.train.grad_accum)

    def full_state_dict(self, engine):
        return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}

    def destroy(self, engine):
        pass


def checkpoint_activations(module: torch.nn.Module) -> int:
    """Turn on diffusers' gradient checkpointing in every block of `module` that has it (a UNet, a
    peft-wrapped UNet, the discriminator's copy of the UNet's encoder), as `ModelMixin.
    enable_gradient_checkpointing` does for a whole diffusers model; returns the number of blocks."""
    import torch.utils.checkpoint

    def recompute(block, *args):
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    n = 0
    for m in module.modules():
        if hasattr(m, "gradient_checkpointing"):
            m._gradient_checkpointing_func, m.gradient_checkpointing = recompute, True
            n += 1
    if not n:
        raise ValueError(f"train.gradient_checkpointing: {type(module).__name__} has no blocks that support it")
    return n


# ---- the per-stage loop (shared by the Ray Train worker and the bare benchmark loop) -------------------
class StageLoop:
    """Student (and discriminator) of one stage, their phase transitions and one micro-step of each
    loss. `engines` is DeepSpeedEngines (training) or PlainEngines (the bare reference loop).

    `init_unet`: the UNet the student starts from (the previous stage's student, which is the stage's
    teacher unless the teacher is skip-level), kept frozen as the x0 conversion's reference.
    `disc_unet`: the UNet whose encoder initialises the discriminator (the base model, `disc_init`;
    default `init_unet`). The trajectories' targets are the teacher's: the teacher itself is not needed."""

    def __init__(self, cfg: RunConfig, stage: StageConfig, schedule: Schedule, init_unet, engines,
                 device, seed: int = 0, disc_unet=None):
        self.cfg, self.stage, self.schedule, self.engines = cfg, stage, schedule, engines
        self.init_unet = init_unet.requires_grad_(False).eval()
        self.disc_unet = disc_unet if disc_unet is not None else self.init_unet
        self.step = 0  # the stage step the models were last brought to (`transition`)
        self.device = torch.device(device)
        self.phases = plan_phases(stage)
        self.total = self.phases[-1].end
        self.student = None  # engine
        self.student_mode: str | None = None
        self.student_lr: float | None = None
        self.disc = None  # engine
        self.disc_mode: str | None = None
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.renoise_t = torch.tensor(stage.renoise_timesteps, dtype=torch.long)
        self.student_ptype = "sample" if stage.prediction_type == "sample" else schedule.prediction_type
        self.disc_lr = stage.disc_lr or stage.lr
        self.disc_betas = stage.disc_betas or stage.betas
        self.conversion_init_batches = 4  # micro-batches per rank for the least-squares conv_out fit
        self.conversion_init: dict[str, float] | None = None
        self._pending_student = None
        self.watch = UpdateWatch(stage.name, cfg.train.max_nonfinite, cfg.train.d_saturation_window)

    # -- building -----------------------------------------------------------------------------------------
    def _student_module(self, mode: str):
        import copy

        unet = copy.deepcopy(self.init_unet).requires_grad_(True).train()
        if mode == "lora":
            student_mod.add_lora(unet, self.stage.lora.rank, self.stage.lora.alpha)
        return unet

    def student_lr_at(self, step: int) -> float:
        """The student's learning rate at `step`: `conversion_lr` in the x0 conversion, `mse_lr` in an
        adversarial stage's MSE warm-up, `full_lr` on the full UNet after a LoRA phase, `lr` otherwise."""
        name = phase_at(self.phases, step).name
        if name == "conversion" and self.stage.conversion_lr:
            return self.stage.conversion_lr
        if name == "mse" and self.stage.mse_lr:
            return self.stage.mse_lr
        if self.stage.full_lr and student_mode_at(self.stage, step) == "full":
            return self.stage.full_lr
        return self.stage.lr

    def build_student(self, mode: str, state_dict: dict | None = None,
                      init_batches: list[dict] | None = None, lr: float | None = None) -> None:
        if self.student is not None:
            self.engines.destroy(self.student)
            self.student = None
            gc.collect()
        unet = self._student_module(mode)
        if state_dict is not None:
            unet.load_state_dict(state_dict)
        if self.cfg.train.gradient_checkpointing:
            checkpoint_activations(unet)
        if init_batches is not None and mode == "full":
            self._pending_student = unet
            try:
                self.conversion_init = self.fit_conversion_head(init_batches)
            finally:
                self._pending_student = None
        self.student_lr = lr if lr is not None else self.stage.lr
        self.student = self.engines.make(unet, self.student_lr, self.stage.betas, self.stage.weight_decay)
        self.student_mode = mode

    @torch.no_grad()
    def fit_conversion_head(self, batches: list[dict], ridge: float = 1e-3) -> dict[str, float]:
        """Start the x0 conversion from the best linear read-out: refit the student's `conv_out` (a
        linear map of the UNet's last features) by ridge least squares so that its direct ("sample")
        output approximates the x0 the epsilon weights imply on `batches`. The normal equations are
        summed over ranks (every rank solves the same system: identical weights, as ZeRO needs).
        Called on the plain module before its engine exists (full student at the conversion start).
        Returns the relative RMS error of the sample output before and after on these batches."""
        import torch.distributed as dist

        unet = self._pending_student
        conv = unet.conv_out
        feats: list[torch.Tensor] = []
        hook = conv.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
        gram = rhs = None
        err = torch.zeros(2, dtype=torch.float64)  # [sum sq err before, sum sq target]
        conds = [self.cond(b) for b in batches]
        targets = [student_mod.implied_x0(self.schedule, unet_denoiser(self.init_unet, c), b["x_t"], b["t"])
                   for b, c in zip(batches, conds)]
        try:
            for b, cond, target in zip(batches, conds, targets):
                feats.clear()
                _, x0 = self.schedule.step(unet_denoiser(unet, cond), b["x_t"], b["t"], b["t"], "sample")
                err += torch.tensor([(x0 - target).double().pow(2).sum().item(),
                                     target.double().pow(2).sum().item()])
                for f_i, y_i in zip(feats[0], target):  # one sample at a time: SDXL's maps are large
                    cols = torch.nn.functional.unfold(f_i[None].float(), conv.kernel_size, dilation=conv.dilation,
                                                      padding=conv.padding, stride=conv.stride)[0]
                    x = torch.cat([cols.T, torch.ones(cols.shape[1], 1, dtype=cols.dtype, device=cols.device)], 1)
                    y = y_i.reshape(y_i.shape[0], -1).T.float()
                    g, r = (x.T @ x).double().cpu(), (x.T @ y).double().cpu()
                    gram, rhs = (g, r) if gram is None else (gram + g, rhs + r)
        finally:
            hook.remove()

        def all_sum(t_: torch.Tensor) -> torch.Tensor:  # NCCL reduces CUDA tensors only
            if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
                return t_
            on = t_.to(self.device) if dist.get_backend() == "nccl" else t_
            dist.all_reduce(on)
            return on.cpu()

        gram, rhs, err = all_sum(gram), all_sum(rhs), all_sum(err)
        lam = ridge * gram.diagonal().mean()
        w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), rhs)
        conv.weight.copy_(w[:-1].T.reshape(conv.weight.shape).to(conv.weight))
        conv.bias.copy_(w[-1].to(conv.bias))
        err_after = torch.zeros(1, dtype=torch.float64)
        for b, cond, target in zip(batches, conds, targets):
            _, x0 = self.schedule.step(unet_denoiser(unet, cond), b["x_t"], b["t"], b["t"], "sample")
            err_after += (x0 - target).double().pow(2).sum().item()
        err_after = all_sum(err_after)
        return {"rel_before": float((err[0] / err[1]).sqrt()), "rel_after": float((err_after[0] / err[1]).sqrt())}

    def build_disc(self, mode: str, backbone_state: dict | None = None) -> None:
        if self.disc is not None:
            self.engines.destroy(self.disc)
            self.disc = None
            gc.collect()
        d = Discriminator(self.disc_unet, conditional=(mode == "conditional"), backbone_kind=self.stage.disc_backbone)
        if backbone_state is not None:
            d.backbone.load_state_dict(backbone_state)
        d = d.to(self.device)
        if self.cfg.train.gradient_checkpointing and self.stage.disc_backbone != "cnn":
            checkpoint_activations(d)
        d.train()
        self.disc = self.engines.make(d, self.disc_lr, self.disc_betas, self.stage.weight_decay)
        self.disc_mode = mode

    @property
    def disc_counts(self) -> tuple[int, int] | None:
        """(parameters in D's optimizer, D's parameters), or None without a discriminator."""
        return None if self.disc is None else self.disc.padistill_counts

    def transition(self, step: int, next_batch: Callable[[], dict] | None = None) -> list[str]:
        """Bring the models to what step `step` needs (merge the LoRA, start or switch the
        discriminator). Collective under ZeRO-3: every rank calls it at the same steps. A fresh
        student whose first phase is the x0 conversion starts from the least-squares `conv_out`
        (`fit_conversion_head`, on `conversion_init_batches` micro-batches drawn with `next_batch`)."""
        events = []
        self.step = step
        want_s = student_mode_at(self.stage, step)
        if self.student is None:
            init = None
            if (step == 0 and self.phases[0].name == "conversion" and want_s == "full" and next_batch is not None
                    and self.conversion_init_batches > 0):
                init = [next_batch() for _ in range(self.conversion_init_batches)]
            self.build_student(want_s, init_batches=init, lr=self.student_lr_at(step))
            if self.conversion_init is not None:
                events.append("x0 conversion: conv_out fitted by least squares, relative RMS error of the sample "
                              f"output {self.conversion_init['rel_before']:.3f} -> "
                              f"{self.conversion_init['rel_after']:.3f} on {len(init)} micro-batch(es) per rank")
        elif self.student_mode == "lora" and want_s == "full":
            sd = self.engines.full_state_dict(self.student)
            unet = self._student_module("lora")
            unet.load_state_dict(sd)
            merged = student_mod.merge_lora(unet).state_dict()
            self.build_student("full", merged, lr=self.student_lr_at(step))
            events.append(f"merged the LoRA into the full UNet at step {step}")
        elif self.student_lr != self.student_lr_at(step):  # conversion_lr/mse_lr -> lr: a fresh optimizer
            self.build_student(self.student_mode, self.engines.full_state_dict(self.student),
                               lr=self.student_lr_at(step))
            events.append(f"student optimizer restarted at lr {self.student_lr:g} at step {step}")
        want_d = disc_mode_at(phase_at(self.phases, step))
        if want_d is not None and self.disc is None:
            self.build_disc(want_d)
            src = "a plain CNN" if self.stage.disc_backbone == "cnn" else \
                f"the {'base model' if self.stage.disc_init == 'base' else 'teacher'}'s encoder ({self.stage.disc_backbone})"
            opt, total = self.disc_counts
            events.append(f"discriminator ({want_d}) built from {src} at step {step}: {opt:,} of {total:,} "
                          "parameters train")
        elif want_d is not None and want_d != self.disc_mode:
            sd = self.engines.full_state_dict(self.disc)
            bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
            self.build_disc(want_d, bb)
            events.append(f"discriminator switched to {want_d} (backbone kept, new head) at step {step}")
        return events

    # -- pieces ---------------------------------------------------------------------------------------------
    def batch_to(self, b: dict) -> dict:
        out = {}
        for k in TRAIN_COLUMNS:
            v = torch.as_tensor(b[k])
            out[k] = v.to(self.device, torch.long if k in ("t", "t_next") else torch.float32)
        return out

    def cond(self, b: dict) -> Conditioning:
        n = b["x_t"].shape[0]
        return Conditioning(b["prompt_embeds"], b["pooled_embeds"],
                            Conditioning.sdxl_time_ids(n, self.cfg.model.resolution, device=self.device))

    def student_step(self, b: dict, cond: Conditioning, prediction_type: str | None = None):
        den = unet_denoiser(self.student, cond)
        return self.schedule.step(den, b["x_t"], b["t"], b["t_next"], prediction_type or self.student_ptype)

    def d_inputs(self, b: dict, x_next: torch.Tensor, gen: torch.Generator | None = None, paired: bool = False):
        """What the discriminator sees of one micro-batch, in one place for training and evaluation:
        (real input, fake input, their timesteps, x_t's scaled input). Real is the teacher's rollout
        target, fake the student's step (`x_next`). With re-noising (`StageConfig.uses_renoise`) both
        become the x0 of their jump (`Schedule.jump_x0`), re-noised to t* drawn from `renoise_timesteps`
        with the weights in force at this step (SDXL-Lightning eqs. 25-26); else D sees them at t_next.
        `paired`: real and fake of a row share t* and noise (the held paired accuracy)."""
        t, t_next = b["t"], b["t_next"]
        xt_in = self.schedule.scale_input(b["x_t"], self.schedule.sigma(t.cpu()))
        if not self.stage.uses_renoise:
            sigma = self.schedule.sigma(t_next.cpu())
            t_hat = t_next.clamp(min=0).to(torch.float32)
            return (self.schedule.scale_input(b["target"], sigma), self.schedule.scale_input(x_next, sigma),
                    t_hat, xt_in)
        g = gen or self.gen
        n = x_next.shape[0]
        w = torch.tensor(self.stage.renoise_weights_at(self.step), dtype=torch.float64)
        t_star = self.renoise_t[torch.multinomial(w / w.sum(), n, replacement=True, generator=g)]
        shape = (n,) + tuple(x_next.shape[1:])
        n_real = torch.randn(shape, generator=g).to(self.device)
        n_fake = n_real if paired else torch.randn(shape, generator=g).to(self.device)
        sigma = self.schedule.sigma(t_star)
        x0_real = self.schedule.jump_x0(b["x_t"], b["target"], t, t_next)
        x0_fake = self.schedule.jump_x0(b["x_t"], x_next, t, t_next)
        real = self.schedule.scale_input(self.schedule.renoise(x0_real, n_real, t_star), sigma)
        fake = self.schedule.scale_input(self.schedule.renoise(x0_fake, n_fake, t_star), sigma)
        return real, fake, t_star.to(self.device, torch.float32), xt_in

    def _dcall(self, x_hat, t_hat, cond: Conditioning, xt_in, t, k: int = 1, frozen: bool = False):
        """D's logits. `frozen` (the student's update) calls the module, not the engine: the engine's
        forward arms its own gradient reduction for the backward, which belongs to the student."""
        pe, po, ti = cond.prompt_embeds, cond.pooled, cond.time_ids
        if k > 1:
            pe, po, ti = pe.repeat(k, 1, 1), po.repeat(k, 1), ti.repeat(k, 1)
        d = self.disc.module if frozen else self.disc
        if self.disc_mode == "conditional":
            return d(x_hat, t_hat, pe, po, ti, x_t=xt_in, t=t.to(torch.float32))
        return d(x_hat, t_hat, pe, po, ti)

    # -- one micro-step of each kind ---------------------------------------------------------------------------
    def micro_step(self, phase: Phase, b: dict, d_batches: list[dict] | None = None) -> dict[str, float]:
        """One micro-batch of `phase`. Adversarial: `disc_steps` D updates (on `d_batches`, the extra
        micro-batches beyond `b`, then on `b`), then the student against the updated D."""
        cond = self.cond(b)
        if phase.name == "conversion":
            target = student_mod.implied_x0(self.schedule, unet_denoiser(self.init_unet, cond), b["x_t"], b["t"])
            _, x0 = self.student_step(b, cond, "sample")
            loss = torch.nn.functional.mse_loss(x0, target)
            self._apply("student", self.student, loss)
            return {"loss": loss.item()}
        if phase.name == "mse":
            x_next, _ = self.student_step(b, cond)
            loss = torch.nn.functional.mse_loss(x_next, b["target"])
            self._apply("student", self.student, loss)
            return {"loss": loss.item()}
        out: dict[str, float] = {}
        for db in d_batches or []:
            db_cond = self.cond(db)
            with torch.no_grad():
                x_db, _ = self.student_step(db, db_cond)
            self._d_update(db, db_cond, x_db)
        if phase.name == "disc_warmup":  # D only, against the student as it is
            with torch.no_grad():
                x_next, _ = self.student_step(b, cond)
            self._d_update(b, cond, x_next, out)
            return out
        x_next, _ = self.student_step(b, cond)
        fake_in, fake_t, xt_in = self._d_update(b, cond, x_next, out)
        # the student against the updated D (D's parameters frozen for this backward)
        d_params = [p for p in self.disc.module.parameters() if p.requires_grad]
        for p in d_params:
            p.requires_grad_(False)
        try:
            g_logits = self._dcall(fake_in, fake_t, cond, xt_in, b["t"], frozen=True)
            g_loss = nonsaturating_g_loss(g_logits)
            loss = g_loss
            if self.stage.mse_weight:
                mse = torch.nn.functional.mse_loss(x_next, b["target"])
                loss = g_loss + self.stage.mse_weight * mse
                out["mse"] = mse.item()
            self._apply("student", self.student, loss)
        finally:
            for p in d_params:
                p.requires_grad_(True)
        out["loss"] = g_loss.item()
        return out

    def _apply(self, who: str, engine, loss: torch.Tensor) -> None:
        """`engine`'s backward and step on `loss`, unless it is non-finite on some rank (then neither, on
        every rank); a step DeepSpeed (or PlainEngine) skipped for a non-finite gradient is counted too."""
        if not finite_everywhere(loss):
            self.watch.update(who, False, self.step + 1, "non-finite loss")
            return
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(loss)
        engine.step()
        if boundary:
            self.watch.update(who, engine.was_step_applied(), self.step + 1, "non-finite gradient")

    def _d_update(self, b: dict, cond: Conditioning, x_next: torch.Tensor, out: dict | None = None):
        """One discriminator update on a detached fake; returns the fake's D inputs (not detached)."""
        real_in, fake_in, t_hat, xt_in = self.d_inputs(b, x_next)
        n = x_next.shape[0]
        logits = self._dcall(torch.cat([real_in, fake_in.detach()]), torch.cat([t_hat, t_hat]), cond, xt_in,
                             b["t"], k=2)
        d_real, d_fake = logits[:n], logits[n:]
        d_loss = nonsaturating_d_loss(d_real, d_fake)
        self._apply("disc", self.disc, d_loss)
        real_mean, fake_mean = d_real.mean().item(), d_fake.mean().item()
        self.watch.discriminator(real_mean, fake_mean, self.step + 1)
        if out is not None:
            out.update(d_loss=d_loss.item(), d_real=real_mean, d_fake=fake_mean)
        return fake_in, t_hat, xt_in

    @torch.no_grad()
    def evaluate(self, held: dict, seed: int = 1234, chunk: int = 64) -> dict[str, float]:
        """Held-row metrics (rows never trained on), in chunks of `chunk` rows: the student's MSE to the
        teacher (`held_mse`) and, with a discriminator, its **paired accuracy** P(D(real_i) > D(fake_i))
        (the same x_t, caption, t* and re-noising noise for both of a pair) and ROC AUC, each per
        timestep stratum (`held_d_pacc_t<t>`: logit offsets between strata would pull a pooled AUC
        toward 0.5) and averaged over strata (`held_d_pacc`, `held_d_auc`), plus D's mean logits."""
        g = torch.Generator().manual_seed(seed)
        n = held["x_t"].shape[0]
        sq, real, fake, ts = [], [], [], []
        for i in range(0, n, chunk):
            b = {k: v[i:i + chunk] for k, v in held.items()}
            cond = self.cond(b)
            x_next, _ = self.student_step(b, cond)
            sq.append((x_next - b["target"]).pow(2).flatten(1).mean(1))
            if self.disc is None:
                continue
            real_in, fake_in, t_hat, xt_in = self.d_inputs(b, x_next, g, paired=True)
            m = x_next.shape[0]
            logits = self._dcall(torch.cat([real_in, fake_in]), torch.cat([t_hat, t_hat]), cond, xt_in, b["t"],
                                 k=2, frozen=True)
            real.append(logits[:m].flatten().cpu())
            fake.append(logits[m:].flatten().cpu())
            ts.append(b["t"].cpu())
        out = {"held_mse": torch.cat(sq).mean().item()}
        if self.disc is None:
            return out
        r, f, t = torch.cat(real), torch.cat(fake), torch.cat(ts)
        out.update(discriminator_scores(r, f, t))
        return out


def discriminator_scores(real: torch.Tensor, fake: torch.Tensor, strata: torch.Tensor) -> dict[str, float]:
    """Paired accuracy P(real_i > fake_i) and ROC AUC (ties count half) per stratum and their means
    over strata, and the mean logits. `real`, `fake`: logits of the same rows; `strata`: a row's
    timestep. Shared by the trainer's held evaluation and `benchmarks/discriminator.py`."""
    out: dict[str, float] = {"held_d_real": real.mean().item(), "held_d_fake": fake.mean().item()}
    paccs, aucs = [], []
    for s in sorted(set(strata.tolist())):
        sel = strata == s
        r, f = real[sel], fake[sel]
        pacc = ((r > f).float().mean() + 0.5 * (r == f).float().mean()).item()
        diff = r[:, None] - f[None, :]
        auc = ((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()).item()
        out[f"held_d_pacc_t{int(s)}"], out[f"held_d_auc_t{int(s)}"] = pacc, auc
        paccs.append(pacc)
        aucs.append(auc)
    out["held_d_pacc"], out["held_d_auc"] = float(np.mean(paccs)), float(np.mean(aucs))
    return out


# ---- data --------------------------------------------------------------------------------------------
def micro_batches(shard, batch_size: int, epoch_hook: Callable[[int], None] | None = None,
                  seed: int = 0) -> Iterator[dict]:
    """Endless micro-batches of a worker's dataset shard (equal count per rank, drop_last). The first
    epoch is streamed in file order (trajectory files mix timesteps, `trajectories.compute_rows`);
    when the shard's tensors fit under PADISTILL_TRAIN_CACHE_MB it is kept in memory and every later
    epoch deals its rows into new micro-batches (a permutation from `seed` and the epoch), else every
    epoch streams again."""
    cache: list[dict] | None = []
    nbytes = 0
    epoch = 0
    for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=True):
        b = {k: b[k] for k in TRAIN_COLUMNS}
        if cache is not None:
            nbytes += sum(v.numel() * v.element_size() for v in b.values())
            if nbytes <= CACHE_MB * 2 ** 20:
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
    # log for minutes (the trainer prints its own progress)
    ray.data.DataContext.get_current().enable_progress_bars = False

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
    n = ds.count()
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
    cfg = from_dict(config["run"])
    key = config["stage"]
    idx, stage = cfg.stage(key)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    import deepspeed

    clear_stale_extension_locks()
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
                            seed=cfg.train.seed * 7919 + rank)
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
    return "train-" + cfg.stage_dir(key).split("/", 1)[1]


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
    if held_ds is not None:
        datasets["held"] = held_ds
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
    from .trajectories import teacher_source
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
