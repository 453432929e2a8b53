"""The Ray Train workers of `pipeline.toy_teacher`: phase 1 trains the toy VAE (`vae_loop`), phase 2 the
toy UNet (`unet_loop`), each on the embedded dataset's train split, resumable from its latest checkpoint.
The recipe is described in `pipeline.toy_teacher`'s docstring."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from . import cluster
from .schedule import Conditioning, FlowMatchSchedule, Schedule, model_call


# ---- helpers shared by the workers ---------------------------------------------------------------------
def lr_at(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    p = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))


def snr_weights(sched, t: torch.Tensor, gamma: float | None) -> torch.Tensor | None:
    """Min-SNR-gamma weights of an epsilon loss (Hang et al. 2023, diffusers' `snr_gamma`): min(SNR_t, gamma) /
    SNR_t per example, 1 at and above the noise level where SNR = gamma, less below it; None without a gamma."""
    if gamma is None:
        return None
    if getattr(sched, "prediction_type", None) != "epsilon":
        raise ValueError(f"snr_weights: min-SNR weights an epsilon loss, not a {type(sched).__name__} "
                         f"{getattr(sched, 'prediction_type', 'velocity')!r} one")
    snr = sched.snr(t.long()).clamp(min=1e-12)  # a zero terminal SNR weighs 1, as the limit does
    return snr.clamp(max=gamma) / snr


def weighted_mse(out: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean squared error, each example's mean weighted by `weights` (None: the plain mean)."""
    if weights is None:
        return torch.nn.functional.mse_loss(out, target)
    per = ((out.float() - target.float()) ** 2).mean(dim=tuple(range(1, out.ndim)))
    return (per * weights.to(per)).mean()


def class_conditioning(pipe, resolution: int, dataset: str = "toy_digits") -> Conditioning:
    """Text conditioning of the dataset's class captions, row k = class k."""
    from .data import toy_dataset
    from .zoo import encode_prompts

    ds = toy_dataset(dataset)
    return encode_prompts(pipe, [ds.caption_for(k) for k in range(len(ds.names))], resolution)


def _worker_context():
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _wrap_ddp(model):
    import ray.train.torch

    _, world = _worker_context()
    return ray.train.torch.prepare_model(model) if world > 1 else model


def _report(metrics: dict, state_dir: Optional[str] = None):
    import ray.train
    from ray.train import Checkpoint

    rank, _ = _worker_context()
    if state_dir is not None and rank == 0:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(state_dir))
    else:
        ray.train.report(metrics)


def _resume_state() -> Optional[dict]:
    """The latest checkpoint of this phase's Ray Train run ({file: object}), or None on a fresh run."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        if not Path(d, "opt.pt").exists():  # a final-only checkpoint of an older version: start over
            return None
        return {p.name: (json.loads(p.read_text()) if p.suffix == ".json" else torch.load(p, weights_only=True))
                for p in Path(d).iterdir()}


def _save_state(files: dict) -> str:
    """Write {name: object} into a fresh temp dir (torch.save / json) for a checkpoint."""
    d = tempfile.mkdtemp(prefix="padistill-toyteacher-")
    for name, obj in files.items():
        if name.endswith(".json"):
            Path(d, name).write_text(json.dumps(obj))
        else:
            torch.save(obj, Path(d, name))
    return d


def _unnice() -> None:
    """Ray starts workers at niceness 15; on a busy shared machine that starves the training loop
    (measured: 7 s/step instead of 1). Best effort: back to 0 where permitted (all threads)."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > 0:
                os.setpriority(os.PRIO_PROCESS, tid, 0)
        except (OSError, AttributeError):
            return


def _log(phase: str, step: int, total: int, loss: float, t0: float, extra: str = "", start: int = 0) -> None:
    el = time.time() - t0
    per = el / max(1, step - start)
    eta = per * (total - step)
    cluster.worker_log(f"[toy-teacher {phase}]")(
        f"step {step:5d}/{total}  loss {loss:.4f}  {per:.2f} s/step  elapsed {el / 60:.1f} min  eta {eta / 60:.1f} min "
        f"{extra}".rstrip())


def _start_worker(tc: dict, seed_stride: int) -> tuple[int, int]:
    """(rank, world) of a phase's worker, its console, priority, threads and seed set."""
    rank, world = _worker_context()
    cluster.quiet_report_lines()
    _unnice()
    torch.set_num_threads(max(1, int(tc["cpus_per_worker"])))
    torch.manual_seed(tc["seed"] + seed_stride * rank)
    return rank, world


def _train_split(config: dict):
    from .data import toy_dataset

    return toy_dataset(config["tc"]["dataset"]).load("train", config["resolution"],
                                                     config["holdout_fraction"], config["data_seed"])


# ---- phase 1: VAE ---------------------------------------------------------------------------------------------
def vae_loop(config: dict) -> None:
    from diffusers import AutoencoderKL

    tc = config["tc"]
    rank, world = _start_worker(tc, seed_stride=17)
    images = _train_split(config).images
    vae = AutoencoderKL.from_pretrained(config["init_dir"], subfolder="vae")
    vae.train()  # gradients are averaged by hand below when world > 1 (encode/decode bypass forward())
    opt = torch.optim.AdamW(vae.parameters(), lr=tc["vae_lr"], weight_decay=0.0)
    steps, bs = tc["vae_steps"], max(1, tc["vae_batch"] // world)
    g = torch.Generator().manual_seed(tc["seed"] * 1000 + rank)
    hist, t0, run_loss = [], time.time(), None
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = tc["vae_lr"] * lr_at(step, steps, min(50, steps // 10))
        x = images[torch.randint(0, len(images), (bs,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        loss = mse + tc["vae_kl_weight"] * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            for p in vae.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        opt.step()
        run_loss = mse.item() if run_loss is None else 0.9 * run_loss + 0.1 * mse.item()
        hist.append({"step": step + 1, "mse": mse.item()})
        if (step + 1) % tc["log_every"] == 0 or step + 1 == steps:
            if rank == 0:
                _log("vae", step + 1, steps, run_loss, t0)
            _report({"phase": "vae", "step": step + 1, "mse": run_loss})
    # scaling factor from the latents (posterior means) of the train split, its first 10,000 images at most
    # (the digits: all 1,617; Fashion-MNIST's 60,000 took each worker 20 minutes for the same estimate)
    vae.eval()
    images = images[:10_000]
    with torch.no_grad():
        lat = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        rec = torch.cat([vae.decode(lat[i:i + 256]).sample for i in range(0, len(images), 256)])
    scaling = float(1.0 / lat.std())
    final = {"phase": "vae", "step": steps, "mse": run_loss, "recon_mse_eval": float(((rec - images) ** 2).mean()),
             "latent_mean": float(lat.mean()), "latent_std": float(lat.std()), "scaling_factor": scaling,
             "seconds": time.time() - t0}
    if rank == 0:
        cluster.worker_log("[toy-teacher vae]")(
            f"done: recon mse {final['recon_mse_eval']:.4f}, latent mean {final['latent_mean']:.3f} "
            f"std {final['latent_std']:.3f} -> scaling_factor {scaling:.4f}")
        d = _save_state({"vae.pt": vae.state_dict(), "history.json": hist, "final.json": final})
        _report(final, d)
    else:
        _report(final)


# ---- phase 2: UNet ------------------------------------------------------------------------------------------
def unet_loop(config: dict) -> None:
    import copy

    from diffusers import AutoencoderKL

    from .zoo import denoiser_of, load_pipeline, schedule_of

    tc = config["tc"]
    rank, world = _start_worker(tc, seed_stride=31)
    res = config["resolution"]
    pipe = load_pipeline(config["init_dir"])
    sched: Schedule | FlowMatchSchedule = schedule_of(pipe)
    vae: AutoencoderKL = pipe.vae
    vae.load_state_dict(torch.load(Path(config["vae_dir"]) / "vae.pt", weights_only=True))
    vae.eval()
    scaling = config["scaling_factor"]
    data = _train_split(config)
    with torch.no_grad():
        post = [vae.encode(data.images[i:i + 256]).latent_dist for i in range(0, len(data), 256)]
        lat_mean = torch.cat([p.mean for p in post]) * scaling
        lat_std = torch.cat([p.std for p in post]) * scaling
        cond = class_conditioning(pipe, res, tc["dataset"])
    labels = torch.as_tensor(data.labels)
    unet = denoiser_of(pipe)  # a UNet, or SD3's transformer
    unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    model = _wrap_ddp(unet)
    call = model_call(model)
    opt = torch.optim.AdamW(unet.parameters(), lr=tc["unet_lr"], weight_decay=tc["weight_decay"])
    steps, bs = tc["unet_steps"], max(1, tc["unet_batch"] // world)
    g = torch.Generator().manual_seed(tc["seed"] * 1000 + 7 + rank)
    hist, t0, run_loss, first = [], time.time(), None, 0
    resumed = _resume_state()
    if resumed is not None:  # a rerun on the same work dir continues from the latest checkpoint
        unet.load_state_dict(resumed["unet.pt"])
        ema.load_state_dict(resumed["unet_ema.pt"])
        opt.load_state_dict(resumed["opt.pt"])
        hist = resumed["history.json"]
        first = len(hist)
        g.manual_seed(tc["seed"] * 1000 + 7 + rank + 7919 * first)  # fresh draws, not a replay
        if rank == 0:
            cluster.worker_log("[toy-teacher unet]")(f"resuming at step {first}/{steps}")
    for step in range(first, steps):
        for grp in opt.param_groups:
            grp["lr"] = tc["unet_lr"] * lr_at(step, steps, tc["warmup_steps"])
        idx = torch.randint(0, len(labels), (bs,), generator=g)
        x0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_in, t, target = sched.training_draw(x0, eps, g)  # epsilon (UNets) or velocity (SD3) targets
        y = labels[idx]
        keep = (torch.rand(bs, generator=g) >= tc["caption_dropout"]).float()
        c = cond.select(y).drop(keep)  # the family's unconditional branch where a caption is dropped
        out = call(x_in, t, c)
        loss = weighted_mse(out, target, snr_weights(sched, t, tc.get("snr_gamma")))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(tc["ema_decay"], (1 + step) / (10 + step))  # EMA warm-up
            for pe_, pu in zip(ema.parameters(), unet.parameters()):
                pe_.lerp_(pu.detach(), 1 - d)
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        hist.append({"step": step + 1, "loss": loss.item()})
        last = step + 1 == steps
        if (step + 1) % tc["log_every"] == 0 or last:
            if rank == 0:
                _log("unet", step + 1, steps, run_loss, t0, f"lr {opt.param_groups[0]['lr']:.2e}", start=first)
            metrics = {"phase": "unet", "step": step + 1, "loss": run_loss, "seconds": time.time() - t0}
            ckpt = last or (step + 1) % tc["checkpoint_every"] == 0
            if ckpt and rank == 0:
                _report(metrics, _save_state({"unet_ema.pt": ema.state_dict(), "unet.pt": unet.state_dict(),
                                              "opt.pt": opt.state_dict(), "history.json": hist,
                                              "final.json": metrics}))
            else:
                _report(metrics)
