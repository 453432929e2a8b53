"""The optimiser engines of a stage: DeepSpeed ZeRO engines (the config from `train`, full state dicts,
safe checkpoint loads) and plain torch engines with the same interface (CPU benchmarks and the fast
numerical tests), plus activation checkpointing of a UNet and the clean-up of a killed DeepSpeed op build."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch


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


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """All-reduce a CPU tensor over the ranks (SUM by default) and return it on the CPU; a no-op without a
    process group of several ranks. NCCL reduces CUDA tensors only: there it goes through this rank's GPU."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    x = t.to(torch.device("cuda", torch.cuda.current_device())) if dist.get_backend() == "nccl" else t
    dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x.cpu()


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


def set_lr(engine, lr: float) -> None:
    """Set the learning rate of every parameter group of `engine`'s optimizer (a DeepSpeed engine's ZeRO
    optimizer exposes its wrapped optimizer's groups, as DeepSpeed's own lr schedulers use them; a
    PlainEngine's is torch's)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


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
