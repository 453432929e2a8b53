"""The GPU path end to end, in one short script for a GPU machine.

    .venv/bin/python benchmarks/gpu_check.py [--size auto|sdxl|tiny] [--steps 6] [--rows 8] [--images 4]

On the GPUs it finds (`--size auto`: sdxl when torch sees a GPU), with a real-size SDXL pipeline built from
its published configs with random weights (nothing downloads; UNet 2.57 B, VAE 84 M, text encoders 0.72 B:
CLIP's with padistill's small built tokenizer's vocabulary, not 49,408 tokens; saved in bf16 under the work
folder), through padistill's own steps:

1. `encode` and the stage's trajectory rollout of `--rows` rows (Ray Data, one actor per GPU, bf16);
2. one adversarial stage (32 -> 8 steps, the full UNet and a discriminator trained from step 0, its
   heaviest phase) for `--steps` steps under Ray Train + DeepSpeed ZeRO-2 in bf16 at 1024 px (128 x 128
   latents), gradient checkpointing on, micro-batch 1 per GPU;
3. the evaluation's sampling (`pipeline.eval_sampling`, one actor per GPU) of `--images` images by the student.

It prints samples/s of each, the training's peak memory per GPU (the largest rank's) against `padistill
plan`'s prediction for the same config (ZeRO-2, checkpointed activations), and the model FLOPs utilisation
of the training step.
FLOPs are counted as `padistill plan` counts them: a UNet and a discriminator forward measured on the meta
device (every matmul and convolution, 2 FLOPs a multiply-add), an adversarial sample costing 3 UNet forwards
+ 9 discriminator forwards (student forward and backward with one D call; D's update on a real and a fake
pair); gradient checkpointing's recomputed forward is not counted, as MFU conventionally does not. MFU = those
FLOPs x training samples/s / (GPUs x the GPU's dense bf16 peak; A100 312, H100/H200 989 TFLOP/s).

Without a GPU it runs the same path at tiny size on CPU (the smoke config's random pipeline, 32 px, fp32,
two workers) and says so: that is how `make test` keeps it working (tests/test_gpu_check.py). Writes JSON
to `--out` (default benchmarks/results/gpu_check.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.cluster import quiet_driver  # noqa: E402

quiet_driver()  # before Ray is imported; Ray Data's notices to its log file, as in a run's workers

from pipeline.config import CONFIG_DIR, from_dict  # noqa: E402

# dense bf16 peak TFLOP/s by device name (NVIDIA data sheets, SXM parts)
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "B200": 2250.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build_sdxl_random(folder: Path) -> dict:
    """A real-size SDXL pipeline from its configs with random weights, saved in bf16; returns the UNet config."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipeline import zoo
    from pipeline.meta_models import SDXL_TEXT_ENCODER_CONFIGS, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG

    if (folder / "model_index.json").exists():
        return dict(SDXL_UNET_CONFIG)
    tok = zoo.build_tokenizer(77)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):  # random init on the GPU: minutes faster than on the CPU
        te1 = CLIPTextModel(CLIPTextConfig(**{**SDXL_TEXT_ENCODER_CONFIGS[0], **ids}))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**SDXL_TEXT_ENCODER_CONFIGS[1], **ids}))
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    pipe = zoo.make_pipeline(dict(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                  unet=unet, scheduler=zoo.sdxl_scheduler())).to(torch.bfloat16)
    zoo.save_pipeline(pipe, folder, {"num_inference_steps": 32, "guidance_scale": 6.0, "resolution": 1024,
                                     "stage": "random-sdxl"})
    return dict(SDXL_UNET_CONFIG)


def check_config(root: Path, size: str, gpus: int, steps: int, rows: int, images: int, source: str):
    data = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    # a new run folder each time (a reused one would skip finished steps and time nothing); the model stays
    data.update(name=f"gpu_check_{size}", run_root=str(root / f"run-{time.strftime('%Y%m%d-%H%M%S')}"))
    data["data"] = {"kind": "toy_digits", "limit": rows}
    stage = {"teacher_steps": 32, "student_steps": 8, "loss": "adversarial", "guidance_scale": 6.0,
             "conditional_steps": steps, "lr": 1.0e-6, "betas": [0.0, 0.99]}
    data["stages"] = [stage]
    data["train"] = {"workers": gpus or 2, "zero_stage": 2, "micro_batch": 1 if size == "sdxl" else 2,
                     "checkpoint_every": steps, "log_every": 1, "held_rows": 0}
    data["evaluate"] = {"samples_per_prompt": max(1, images // 10), "unit_samples": max(1, images // max(gpus, 1)),
                        "batch_size": 1 if size == "sdxl" else 10}
    if size == "sdxl":
        data["model"] = {"source": source, "resolution": 1024, "teacher_steps": 32, "dtype": "bfloat16"}
        data["encode"] = {"batch_size": 1, "gpus_per_actor": 1, "dtype": "float16"}
        data["trajectories"] = {"batch_size": 2, "gpus_per_actor": 1, "dtype": "float16"}
        data["train"].update(use_gpu=True, precision="bf16", gradient_checkpointing=True)
        data["evaluate"]["gpus_per_actor"] = 1
        data.pop("ray", None)
    else:
        data["trajectories"] = {"batch_size": 8, "dtype": "float32"}
        data["train"]["gradient_checkpointing"] = True
    return from_dict(data)


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["auto", "sdxl", "tiny"], default="auto")
    ap.add_argument("--steps", type=int, default=6, help="training steps of the adversarial stage")
    ap.add_argument("--rows", type=int, default=8, help="trajectory rows rolled out (and trained on)")
    ap.add_argument("--images", type=int, default=10, help="images the evaluation sampling draws (whole tens, at least 10)")
    ap.add_argument("--root", default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check.json"))
    args = ap.parse_args(argv)

    from pipeline import zoo
    from pipeline.encode import run_encode
    from pipeline.eval_sampling import SampleSet, sample_sets
    from pipeline.meta_models import SDXL_UNET_CONFIG
    from pipeline.plan import make_plan
    from pipeline.sampling import fixed_noise
    from pipeline.data import toy_dataset
    from pipeline.storage import RunStorage
    from pipeline.train import train_stage
    from pipeline.trajectories import run_trajectories

    gpus = torch.cuda.device_count()
    size = args.size if args.size != "auto" else ("sdxl" if gpus else "tiny")
    device = torch.cuda.get_device_name(0) if gpus else f"CPU ({os.cpu_count()} cores)"
    root = Path(args.root or tempfile.mkdtemp(prefix="padistill-gpu-check-"))
    if not gpus:
        print(f"gpu_check: no GPU: the same path at {size} size on CPU ({os.cpu_count()} cores)")
    else:
        print(f"gpu_check: {gpus} x {device}, {size} size, work folder {root}")
    if size == "sdxl":
        print("gpu_check: building a random-weight SDXL pipeline from its configs (bf16, ~7 GB on disk)")
        (ucfg, t_build) = timed(build_sdxl_random, root / "sdxl-random")
        source = str(root / "sdxl-random")
    else:
        source, t_build = "builtin:tiny_random", 0.0
        ucfg = dict(zoo.load_denoiser(source).config)
    cfg = check_config(root, size, gpus, args.steps, args.rows, args.images, source)
    storage = RunStorage.from_config(cfg)
    quiet = lambda line: None  # noqa: E731  the figures are printed at the end

    _, t_enc = timed(run_encode, cfg, log=quiet)
    traj, t_traj = timed(run_trajectories, cfg, 1, log=quiet)
    summary, t_train = timed(train_stage, cfg, 1, log=print)
    m = summary["metrics"]
    # the evaluation's sampling of the student (the stage's export) at its 8 steps
    K = cfg.evaluate.samples_per_prompt
    pipe_shape = (ucfg["in_channels"], ucfg["sample_size"], ucfg["sample_size"])
    labels = [toy_dataset("toy_digits").caption_for(c) for c in range(10) for _ in range(K)]
    sset = SampleSet("student", "gpu_check/units", "student", {"train": summary.get("model")}, 8, 0.0, labels,
                     fixed_noise(K, 0, pipe_shape), uint8=True)
    models = {"teacher": {"source": source}, "student": {"rel": f"{cfg.stage_dir(1)}/model"}}
    _, t_eval = timed(sample_sets, cfg, storage, [sset], models, log=quiet)

    plan = make_plan(cfg, gpus=cfg.train.workers, micro_batch=cfg.train.micro_batch,
                     unet_config=SDXL_UNET_CONFIG if size == "sdxl" else ucfg, latent_size=ucfg["sample_size"])
    row = next(r for r in plan.memory if r["phase"] == "adversarial: full UNet + D" and r["zero"] == "ZeRO-2")
    f_u, f_d = plan.unet_act["forward_flops"], plan.disc_act["forward_flops"]
    sps = m.get("steady_samples_per_s") or m.get("samples_per_s", 0.0)
    achieved = sps * (3 * f_u + 9 * f_d)
    peak = peak_tflops(device) if gpus else None
    result = {
        "device": device, "gpus": gpus, "size": size, "resolution": cfg.model.resolution,
        "precision": cfg.train.precision, "zero_stage": cfg.train.zero_stage, "workers": cfg.train.workers,
        "micro_batch": cfg.train.micro_batch, "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "build_s": t_build, "encode_s": t_enc,
        "rollout_rows": traj["outputs"]["rows"], "rollout_s": t_traj,
        "rollout_rows_per_s": traj["outputs"]["rows"] / t_traj,
        "train_steps": m.get("step"), "train_s": t_train, "train_samples_per_s": sps,
        "eval_images": 10 * K, "eval_s": t_eval, "eval_images_per_s": 10 * K / t_eval,
        "peak_memory_gib": m.get("peak_memory_gib"),
        "peak_memory_kind": "torch.cuda.max_memory_allocated, max over ranks" if gpus
        else "peak resident set of a training worker process, max over ranks",
        "plan_memory_gib": row["total_ckpt"], "plan_row": f"{row['phase']}, {row['zero']}, checkpointed activations",
        "flops_per_sample": 3 * f_u + 9 * f_d, "achieved_tflops": achieved / 1e12,
        "peak_tflops_per_gpu": peak, "mfu": achieved / (gpus * peak * 1e12) if peak else None,
    }
    print(render(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"gpu_check: wrote {args.out}")
    return 0


def render(r: dict) -> str:
    mfu = (f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None
           else "n/a (CPU)" if not r["gpus"] else f"n/a (no bf16 peak known for {r['device']})")
    lines = [
        f"| {r['device']}" + (f" x {r['gpus']}" if r["gpus"] else "") + f" | {r['size']} at {r['resolution']} px, {r['precision']}, "
        f"ZeRO-{r['zero_stage']}, {r['workers']} workers x micro-batch {r['micro_batch']} | |",
        "| --- | --- | --- |",
        f"| trajectory rollout | {r['rollout_rows_per_s']:.2f} rows/s | {r['rollout_rows']} rows in {r['rollout_s']:.1f} s (Ray Data; actor start and model load included) |",
        f"| adversarial training | {r['train_samples_per_s']:.2f} samples/s | {r['train_steps']} steps in "
        f"{r['train_s']:.1f} s (Ray Train start-up included in the time, not in the rate) |",
        f"| evaluation sampling | {r['eval_images_per_s']:.2f} images/s | {r['eval_images']} images at 8 steps in {r['eval_s']:.1f} s (actor start and model load included) |",
        f"| peak memory per GPU | {r['peak_memory_gib']:.2f} GiB | {r['peak_memory_kind']} |",
        f"| plan's prediction | {r['plan_memory_gib']:.2f} GiB | {r['plan_row']} |",
        f"| model FLOPs | {r['achieved_tflops']:.3g} TFLOP/s | {r['flops_per_sample'] / 1e12:.3g} TFLOP a sample |",
        f"| MFU | {mfu} | |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
