"""Train an embedded toy teacher: a miniature SDXL, SD1.5 or SD3 (`toy_teacher.family`; the zoo's real classes
at tiny sizes) on one of the embedded datasets (`pipeline.data`: the digits, or Fashion-MNIST's train split),
with Ray Train, and export it as a `StableDiffusionXLPipeline` (`StableDiffusionPipeline`,
`StableDiffusion3Pipeline`) folder.

Two phases, each a `TorchTrainer` run on CPU workers (the same loop runs data-parallel on more; the
loops are in `pipeline.toy_teacher_loops`):

1. VAE: reconstruction (MSE) + a tiny KL term on the train split; afterwards its `scaling_factor`
   is set to 1 / std of the posterior-mean latents (DESIGN: the latents stay uncentred, that works).
2. UNet: epsilon prediction with SDXL's betas, x_t = forward_diffuse(x0, eps, t) (pure noise at
   t = T), input scale_input(x_t, sigma_t), target eps; the caption is dropped ~10% of the time to
   the family's unconditional branch (SDXL: zero embeddings, force_zeros_for_empty_prompt; SD1.5: the
   empty prompt's embedding), which is what CFG samples with. AdamW,
   linear warm-up then cosine decay, an EMA of the weights is what gets exported. `toy_teacher.snr_gamma`
   weights the loss by min-SNR-gamma; `toy_teacher.unet_channels` / `unet_layers_per_block` resize the UNet. The SD3 family's
   transformer learns the rectified-flow velocity instead (`FlowMatchSchedule.training_draw`: logit-normal
   time, shifted; its unconditional branch is the empty prompt's encoding, pooled embedding included).

The CLIP text encoders and the tokenizer stay as the zoo builds them (random but fixed for a
seed), as in the prototype: ten distinct captions need no trained text model, only distinct codes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from . import cluster
from .errors import ConfigError
from .toy_teacher_loops import unet_loop, vae_loop
from .zoo import ASSETS, ToyModelConfig

DEFAULT_OUTPUT = ASSETS / "toy_teacher"
DEFAULT_OUTPUTS = {"toy_digits": DEFAULT_OUTPUT, "fashion_mnist": ASSETS / "toy_fashion_teacher"}
# the full preset's folder of another family: beside the SDXL one, suffixed with the family
FAMILY_SUFFIX = {"sdxl": "", "sd15": "_sd15", "sd3": "_sd3"}


def teacher_model_config() -> ToyModelConfig:
    """The shipped teacher's sizes: the zoo's defaults with two layers per UNet block (~2.6 M
    params, the prototype's size). The zoo default (one layer) stays for tiny random pipelines."""
    return ToyModelConfig(unet_layers_per_block=2)


def fashion_model_config() -> ToyModelConfig:
    """The Fashion-MNIST teacher's sizes, chosen by measurement (benchmarks/fashion_vae_shape.py, README).
    Latents 16x16x4 (a two-level VAE): after 500 VAE steps they reconstruct t10k at FD 0.90 and 0.80 of
    the photos' high-frequency energy, where the first teacher's 8x8x8 latents reached 3.33 and 0.66 (and
    0.73 after 1500 steps: its samples could not be sharp). A three-level UNet (32, 64, 96 channels,
    one layer per block: 2.8 M params) keeps a 4x4 mid block for the discriminator's head; at 16x16 it
    costs 1.18 s per step of 64 on one thread where (48, 96) with two layers cost 2.29. The SD3 family's
    transformer (its only use of the transformer sizes): 6 blocks of 4 x 16 (0.89 M params) at 1.37 s per step
    of 64 on one thread, where 4 x 32 wide cost 2.12 s and 6 x 16 wide 2.31 s (its prompt is 272 tokens: 16
    CLIP, 256 of T5's zeros, as the stock pipeline pads them)."""
    from .data import FASHION

    return ToyModelConfig(latent_channels=4, vae_channels=(32, 64), unet_channels=(32, 64, 96),
                          unet_layers_per_block=1, extra_words=FASHION.caption_words,
                          transformer_layers=6, transformer_heads=4, transformer_head_dim=16)


@dataclass
class ToyTeacherConfig:
    """Hyper-parameters of `padistill toy-teacher` (defaults: the shipped teacher)."""

    # VAE phase
    vae_steps: int = 250
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # UNet phase
    unet_steps: int = 1200
    unet_batch: int = 128
    unet_lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_steps: int = 100
    ema_decay: float = 0.998
    caption_dropout: float = 0.1
    # min-SNR-gamma loss weighting (Hang et al. 2023) of a UNet's epsilon loss: each example weighted
    # min(SNR_t, gamma) / SNR_t, which lowers the weight of the low-noise timesteps; None: the plain mean
    snr_gamma: float | None = None
    # what the exported folder recommends (padistill.json)
    guidance_scale: float = 2.0
    num_inference_steps: int = 32
    # Ray Train: data-parallel workers with one thread each. Measured on 2 busy shared cores: 2 x 1 CPU
    # ran the UNet at 0.5 s/step (batch 64) where 1 worker x 2 threads took several s/step.
    workers: int = 2
    cpus_per_worker: int = 1
    log_every: int = 25
    checkpoint_every: int = 100
    seed: int = 0
    dataset: str = "toy_digits"  # pipeline.data's kind: what the teacher learns (its train split)
    family: str = "sdxl"  # pipeline.family: the miniature's pipeline, text encoders and UNet conditioning
    model: ToyModelConfig = field(default_factory=teacher_model_config)

    @classmethod
    def smoke(cls) -> "ToyTeacherConfig":
        """A ~2-minute run that exercises everything (tests)."""
        return cls(vae_steps=20, vae_batch=16, unet_steps=30, unet_batch=16, warmup_steps=5, log_every=10,
                   checkpoint_every=1000, ema_decay=0.9, model=ToyModelConfig())

    @classmethod
    def full(cls, dataset: str = "toy_digits") -> "ToyTeacherConfig":
        """The shipped teacher of a dataset."""
        return fashion_teacher_config() if dataset == "fashion_mnist" else cls()

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Refuse, by their toy_teacher key, settings the UNet loop would run wrongly or silently change."""
        if self.family == "sd3" and self.snr_gamma is not None:
            raise ConfigError("toy_teacher.snr_gamma: weights a UNet's epsilon loss; the SD3 family's transformer "
                              "learns a velocity with its own time sampling")
        groups, channels = self.model.norm_num_groups, self.model.unet_channels
        if self.family != "sd3" and any(c % groups for c in channels):
            raise ConfigError(f"toy_teacher.unet_channels: each level's channels must be a multiple of the "
                              f"UNet's {groups} norm groups, got {list(channels)}")
        if self.unet_batch % self.workers:  # each Ray Train worker draws batch / workers examples a step
            raise ConfigError(f"toy_teacher.unet_batch: {self.unet_batch} does not split evenly over "
                              f"toy_teacher.workers = {self.workers} (each worker draws the batch / workers examples a step)")


def from_run_config(cfg) -> tuple[ToyTeacherConfig, Path]:
    """The teacher to train and the folder it goes to, from a run config: the `toy_teacher` section's
    preset for `data.kind`, then the section's overrides (None keeps the preset's), `train.seed`. The one
    place these settings meet (`padistill toy-teacher` turns its flags into `toy_teacher.*` overrides)."""
    sec, kind = cfg.toy_teacher, cfg.data.kind
    if kind not in DEFAULT_OUTPUTS:
        raise ConfigError(f"data.kind: a toy teacher learns an embedded dataset ({', '.join(sorted(DEFAULT_OUTPUTS))}), "
                          f"not {kind!r}")
    tc = replace(ToyTeacherConfig.smoke(), dataset=kind) if sec.preset == "smoke" else ToyTeacherConfig.full(kind)
    over = {k: getattr(sec, k) for k in ("vae_steps", "unet_steps", "unet_batch", "unet_lr", "snr_gamma", "workers",
                                          "cpus_per_worker")
            if getattr(sec, k) is not None}
    family = sec.family or cfg.model.family or "sdxl"
    if family not in FAMILY_SUFFIX:
        raise ConfigError(f"toy_teacher.family: a toy teacher is built for {', '.join(FAMILY_SUFFIX)}, not {family!r}")
    sizes = {k: getattr(sec, k) for k in ("unet_channels", "unet_layers_per_block") if getattr(sec, k) is not None}
    if family == "sd3" and sizes:
        raise ConfigError(f"toy_teacher.{next(iter(sizes))}: sizes a UNet; the SD3 family's transformer has its own "
                          "sizes (pipeline.toy_teacher.fashion_model_config)")
    if "unet_channels" in sizes:
        sizes["unet_channels"] = tuple(sizes["unet_channels"])
    tc = replace(tc, seed=cfg.train.seed, family=family, model=replace(tc.model, **sizes), **over)
    tc.check()
    if sec.output:
        if "://" in sec.output:
            raise ConfigError(f"toy_teacher.output (--output): a local folder, got {sec.output}")
        return tc, Path(sec.output)
    if sec.preset == "full":
        full = DEFAULT_OUTPUTS[kind]
        return tc, full.with_name(full.name + FAMILY_SUFFIX[family])
    return tc, Path(cfg.run_root) / f"toy_teacher{FAMILY_SUFFIX[family]}"


# ---- driver -----------------------------------------------------------------------------------------------
def _run_phase(loop, config: dict, tc: ToyTeacherConfig, storage: Path, name: str):
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cluster.fast_train_polls()
    trainer = TorchTrainer(
        loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=tc.workers, use_gpu=False,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=name, storage_path=str(storage.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=cluster.train_logging_config()),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"toy-teacher {name}: the trainer returned no checkpoint")
    return result.checkpoint


def _plot_curves(vae_hist: list, unet_hist: list, path: Path, denoiser: str = "UNet epsilon MSE",
                 vae_note: str = "") -> None:
    """The two phases' losses; `denoiser` titles the second (SD3: the transformer's velocity MSE), `vae_note`
    stands in the first when the VAE was reused (no history of its own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def smooth(v, k=25):
        v = np.asarray(v, dtype=np.float64)
        if len(v) < k:
            return v
        return np.convolve(v, np.ones(k) / k, mode="valid")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, hist, key, title in ((axes[0], vae_hist, "mse", "VAE reconstruction MSE"),
                                 (axes[1], unet_hist, "loss", denoiser)):
        v = [h[key] for h in hist]
        if not v:
            ax.text(0.5, 0.5, vae_note or "no history", ha="center", va="center", wrap=True, transform=ax.transAxes)
            ax.set_title(title)
            ax.set_axis_off()
            continue
        ax.plot(range(1, len(v) + 1), v, alpha=0.3, lw=0.7, label="per step")
        s = smooth(v)
        ax.plot(np.arange(len(s)) + (len(v) - len(s)) + 1, s, lw=1.5, label="moving average")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_toy_teacher(output: str | os.PathLike = DEFAULT_OUTPUT, tc: ToyTeacherConfig | None = None,
                      work_dir: str | os.PathLike | None = None, resolution: int = 32, holdout_fraction: float = 0.1,
                      data_seed: int = 0, ray_address: Optional[str] = None, ray_num_cpus: Optional[int] = None,
                      vae_from: str | os.PathLike | None = None) -> dict:
    """Train VAE then UNet with Ray Train and export the pipeline folder to `output`.

    `work_dir` keeps the Ray Train storage (checkpoints) and the initial pipeline; by default a
    temporary folder next to `output` that is removed on success. `vae_from`: skip the VAE phase and
    reuse a trained one (a `<work_dir>/vae_state` folder of an earlier run, or an exported toy teacher's folder,
    with the same model sizes). Returns a summary dict (also
    written to `<output>/training.json`); loss curves go to `<output>/loss_curves.png`."""
    import ray

    from .zoo import build_components, make_pipeline, save_pipeline

    tc = tc or ToyTeacherConfig()
    tc.check()
    output = Path(output)
    own_work = work_dir is None
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix=".toy-teacher-work-",
                                                                    dir=output.parent if output.parent.exists() else None))
    work.mkdir(parents=True, exist_ok=True)
    started_ray = False
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, log_to_driver=True, runtime_env={"env_vars": dict(cluster.WORKER_ENV)})
        else:
            cluster.init_local(ray_num_cpus)
        started_ray = True
    try:
        t_start = time.time()
        comps = build_components(tc.model, seed=tc.seed, family=tc.family)
        init_dir = work / "init"
        if init_dir.exists():
            shutil.rmtree(init_dir)
        save_pipeline(make_pipeline(comps), init_dir)
        n_unet = sum(p.numel() for p in comps.get("unet", comps.get("transformer")).parameters())
        n_vae = sum(p.numel() for p in comps["vae"].parameters())
        print(f"[toy-teacher] {tc.family}: VAE {n_vae / 1e6:.2f} M params, {'transformer' if tc.family == 'sd3' else 'UNet'} "
              f"{n_unet / 1e6:.2f} M params; "
              f"{tc.workers} Ray Train worker(s) x {tc.cpus_per_worker} CPU", flush=True)
        base = {"tc": tc.to_dict(), "init_dir": str(init_dir.resolve()), "resolution": resolution,
                "holdout_fraction": holdout_fraction, "data_seed": data_seed}

        t0 = time.time()
        vae_dir = work / "vae_state"
        if vae_from is None and not own_work and (vae_dir / "final.json").exists():
            vae_from = vae_dir  # a rerun on the same work dir: the VAE phase finished, the UNet resumes
        if vae_from is not None:
            if Path(vae_from).resolve() != vae_dir.resolve():
                staging = work / "vae_state.staging"  # built aside: a bad --vae-from leaves vae_state as it was
                if staging.exists():
                    shutil.rmtree(staging)
                if (Path(vae_from) / "model_index.json").exists():
                    vae_state_from_teacher(Path(vae_from), staging)
                elif (Path(vae_from) / "final.json").exists() and (Path(vae_from) / "vae.pt").exists():
                    shutil.copytree(vae_from, staging)
                else:
                    raise ConfigError(f"--vae-from {vae_from}: neither a work dir's vae_state folder (vae.pt, "
                                      "final.json) nor a toy teacher folder (model_index.json)")
                if vae_dir.exists():
                    shutil.rmtree(vae_dir)
                staging.rename(vae_dir)
            print(f"[toy-teacher] reusing the VAE of {vae_from}", flush=True)
        else:
            if tc.vae_batch % tc.workers:
                raise ConfigError(f"toy_teacher.workers: {tc.workers} workers do not split the VAE batch of "
                                  f"{tc.vae_batch} evenly (or reuse a trained VAE with --vae-from)")
            vae_ckpt = _run_phase(vae_loop, base, tc, work / "ray", "vae")
            if vae_dir.exists():
                shutil.rmtree(vae_dir)
            vae_ckpt.to_directory(str(vae_dir))
        vae_final = json.loads((vae_dir / "final.json").read_text())
        vae_hist = json.loads((vae_dir / "history.json").read_text())
        vae_seconds = time.time() - t0

        t1 = time.time()
        unet_ckpt = _run_phase(unet_loop, {**base, "vae_dir": str(vae_dir.resolve()),
                                           "scaling_factor": vae_final["scaling_factor"]}, tc, work / "ray", "unet")
        unet_dir = work / "unet_state"
        if unet_dir.exists():
            shutil.rmtree(unet_dir)
        unet_ckpt.to_directory(str(unet_dir))
        unet_seconds = time.time() - t1
        summary = export_teacher(output, init_dir, vae_dir, unet_dir, vae_final["scaling_factor"], tc,
                                 extra={"vae": vae_final, "vae_reused_from": str(vae_from) if vae_from else None,
                                        "vae_seconds": round(vae_final["seconds"] if vae_from else vae_seconds, 1),
                                        "unet_seconds": round(unet_seconds, 1),
                                        "total_seconds": round(time.time() - t_start, 1),
                                        "unet_params": n_unet, "vae_params": n_vae},
                                 vae_hist=vae_hist)
        print(f"[toy-teacher] exported {output} (VAE {vae_seconds / 60:.1f} min, UNet {unet_seconds / 60:.1f} min)",
              flush=True)
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
        return summary
    finally:
        if started_ray:
            ray.shutdown()


def vae_state_from_teacher(folder: Path, vae_dir: Path) -> None:
    """A `vae_state` folder (what the VAE phase leaves: vae.pt, final.json, history.json) from an exported toy
    teacher's folder, so `--vae-from` can take a teacher as well as a work dir's vae_state."""
    from diffusers import AutoencoderKL

    training = folder / "training.json"
    record = json.loads(training.read_text()).get("vae") if training.exists() else None
    if not isinstance(record, dict) or not {"scaling_factor", "seconds"} <= set(record):
        raise ConfigError(f"--vae-from {folder}: this teacher folder has no training.json with a 'vae' record "
                          "(scaling_factor, seconds), as `padistill toy-teacher` writes")
    vae_dir.mkdir(parents=True, exist_ok=True)
    torch.save(AutoencoderKL.from_pretrained(folder / "vae").state_dict(), vae_dir / "vae.pt")
    (vae_dir / "final.json").write_text(json.dumps(record))
    (vae_dir / "history.json").write_text("[]")


def export_teacher(output: Path, init_dir: Path, vae_dir: Path, unet_dir: Path, scaling_factor: float,
                   tc: ToyTeacherConfig, extra: dict | None = None, vae_hist: list | None = None) -> dict:
    """Assemble the trained VAE and EMA UNet (SD3: transformer) with the fixed text encoders into a pipeline
    folder."""
    from diffusers import AutoencoderKL

    from .zoo import denoiser_of, load_pipeline, make_pipeline, save_pipeline, schedule_of

    pipe = load_pipeline(str(init_dir))
    vae_cfg = dict(pipe.vae.config)
    vae_cfg["scaling_factor"] = float(scaling_factor)
    vae = AutoencoderKL.from_config(vae_cfg)
    vae.load_state_dict(torch.load(Path(vae_dir) / "vae.pt", weights_only=True))
    denoiser_of(pipe).load_state_dict(torch.load(Path(unet_dir) / "unet_ema.pt", weights_only=True))
    comps = dict(pipe.components)
    comps["vae"] = vae.eval()
    comps.pop("image_encoder", None)
    comps.pop("feature_extractor", None)
    final = make_pipeline(comps)
    output = Path(output)
    staging = output.parent / f".{output.name}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    info = {"num_inference_steps": tc.num_inference_steps, "guidance_scale": tc.guidance_scale,
            "resolution": 32, "stage": "toy_teacher", "teacher": None, "source_run": "padistill toy-teacher",
            "prediction_type": schedule_of(pipe).prediction_type, "dataset": tc.dataset}
    save_pipeline(final, staging, info)
    unet_hist = json.loads((Path(unet_dir) / "history.json").read_text())
    summary = {"config": tc.to_dict(), "scaling_factor": scaling_factor,
               "final_unet_loss": json.loads((Path(unet_dir) / "final.json").read_text()).get("loss"),
               **(extra or {})}
    (staging / "training.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    reused = (extra or {}).get("vae_reused_from")
    _plot_curves(vae_hist or [], unet_hist, staging / "loss_curves.png",
                 "transformer velocity MSE" if tc.family == "sd3" else (
                     f"UNet epsilon MSE, min-SNR-{tc.snr_gamma:g} weighted" if tc.snr_gamma else "UNet epsilon MSE"),
                 f"VAE reused from {reused}" if reused else "")
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    return summary


def fashion_teacher_config() -> ToyTeacherConfig:
    """The shipped Fashion-MNIST teacher (`padistill toy-teacher --config toy_fashion`), sized to train
    in under 2 hours on 2 cores: 60,000 photos need a longer VAE phase than the digits' 1,617."""
    return ToyTeacherConfig(vae_steps=1500, vae_batch=32, unet_steps=2400, unet_batch=128, warmup_steps=100,
                            dataset="fashion_mnist", model=fashion_model_config())
