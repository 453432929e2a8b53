"""Capacity plan for a run: parameter counts and activations of the real denoiser of the run's published
base model (`model.base`, by default the family's: SDXL base's or SD1.5's UNet, SD3.5-Medium's transformer;
SD3.5-Large's on request) and the discriminator (measured on the meta device,
`pipeline.meta_models`), per-GPU memory under DeepSpeed ZeRO-2/3,
trajectory storage per stage, and GPU-hours from a throughput the user supplies.

The memory model (bytes per parameter, mixed precision with an fp32 master copy) is the ZeRO paper's:
bf16/fp16 weights 2 + grads 2 + fp32 master 4 + Adam m, v 8 = 16 bytes per trainable parameter;
ZeRO-2 partitions grads and optimizer states over the GPUs and replicates the weights; ZeRO-3
partitions all three and gathers layers on the fly (counted as two of the largest layer: the one in
use and the prefetched one); offload (ZeRO-Offload) moves the optimizer states and the fp32 master
copy to CPU memory. Communication buckets, the CUDA context and allocator fragmentation are not
counted: keep some GiB of headroom.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

from .config import RunConfig
from .stage_config import StageConfig
from .meta_models import (BASES, DTYPES, FAMILY_BASES, FAMILY_VAES, VAE_FACTOR, build_discriminator, build_unet,
                          build_vae, count_params, discriminator_source, head_blocks, is_transformer, largest_layer,
                          lora_params, measure_discriminator, measure_unet, measure_vae_decode, other_base_params,
                          pooled_dim, text_encoder_params, text_shape)

from .student import LORA_EXCLUDE as TRAINING_LORA_EXCLUDE

GiB = 1024 ** 3
_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


# ---- memory model -----------------------------------------------------------------------------------------
@dataclass
class Memory:
    """Per-GPU bytes (and per-GPU share of CPU memory under offload)."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    activations_ckpt: float
    cpu: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    @property
    def total_ckpt(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations_ckpt


def zero_memory(trainable: int, frozen: int, gpus: int, zero_stage: int, offload: bool, precision: str,
                activations: float, activations_ckpt: float, live_params: int = 0) -> Memory:
    """Per-GPU memory of a DeepSpeed ZeRO-`zero_stage` engine group (trainable + frozen parameters)."""
    wb = 4 if precision == "fp32" else 2
    opt_b = 8 if precision == "fp32" else 12  # Adam m, v (+ fp32 master copy in mixed precision)
    if zero_stage == 2:
        weights = (trainable + frozen) * wb
    else:
        weights = (trainable + frozen) * wb / gpus + 2 * live_params * wb
    grads = trainable * wb / gpus
    opt = trainable * opt_b / gpus
    if offload:
        return Memory(weights, grads, 0.0, activations, activations_ckpt, cpu=opt)
    return Memory(weights, grads, opt, activations, activations_ckpt)


# ---- the plan ---------------------------------------------------------------------------------------------
def stage_steps(st: StageConfig) -> int:
    """Optimizer steps of a stage: the end of the trainer's phase plan."""
    from .phases import plan_phases

    return plan_phases(st)[-1].end


@dataclass
class Plan:
    config: str
    family: str
    family_from: str
    base: str  # the published base model sized (`model.base`, meta_models.BASES)
    denoiser: str  # "UNet" or "transformer"
    latent_channels: int
    text_tokens: int
    text_dim: int
    pooled_dim: int
    gpus: int
    micro_batch: int
    grad_accum: int
    precision: str
    samples: int
    latent_size: int
    gpu_memory_gib: float
    unet_params: int
    disc_params_conditional: int
    disc_params_unconditional: int
    disc_head_blocks: int
    disc_source: str
    lora_rank: int
    lora_params: int
    unet_act: dict
    disc_act: dict
    memory: list[dict] = field(default_factory=list)  # phase, zero, GiB columns
    storage: list[dict] = field(default_factory=list)  # per stage
    compute: list[dict] = field(default_factory=list)  # per stage
    throughput: Optional[float] = None
    throughput_source: str = ""
    rollout_throughput: Optional[float] = None
    encoded_bytes: int = 0
    evaluation: dict = field(default_factory=dict)  # the DAG's evaluation steps: UNet passes, decodes, GPU-h, memory
    other_bases: list[dict] = field(default_factory=list)  # --other-bases: SD1.5 / SD3.5 denoisers counted on meta
    disc_blocks: Optional[int] = None  # a transformer D's copied blocks (the stages' largest `disc_blocks`, default half)

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(cfg: RunConfig, gpus: int | None = None, micro_batch: int | None = None, samples: int | None = None,
              throughput: float | None = None, rollout_throughput: float | None = None,
              gpu_memory_gib: float = 80.0, peak_tflops: float = 312.0, mfu: float | None = None,
              unet_config: dict | None = None, config_name: str = "", eval_prompts: int | None = None,
              other_bases: bool = False, latent_size: int | None = None) -> Plan:
    family, family_from = plan_family(cfg)
    base = cfg.model.base or FAMILY_BASES[family]
    ucfg = copy.deepcopy(unet_config or BASES[base][2])
    gpus = gpus or cfg.train.workers
    mb = micro_batch or cfg.train.micro_batch
    precision = cfg.train.precision
    dtype = DTYPES[precision]
    latent = latent_size or cfg.model.resolution // VAE_FACTOR  # SDXL's VAE: 8x
    samples = samples or cfg.data.limit or 1_000_000
    rank = next((s.lora.rank for s in cfg.stages if s.lora), 64)

    unet = build_unet(ucfg)
    n_unet = count_params(unet)
    # an SD3 transformer's LoRA as the trainer places it (`student.LORA_EXCLUDE`)
    n_lora = lora_params(unet, rank, *((TRAINING_LORA_EXCLUDE,) if is_transformer(ucfg) else ()))
    live_unet = largest_layer(unet)
    ua = measure_unet(unet, ucfg, latent, dtype)
    del unet
    # a transformer D as deep as the deepest any adversarial stage asks for (`disc_blocks`; unset: its default)
    blocks = max((st.disc_blocks for st in cfg.stages if st.loss == "adversarial" and st.disc_blocks), default=None)
    d_cond = build_discriminator(True, ucfg, latent, blocks=blocks)
    d_unc = build_discriminator(False, ucfg, latent, blocks=blocks)
    n_dc, n_du = count_params(d_cond), count_params(d_unc)
    live_d = largest_layer(d_cond)
    da = measure_discriminator(d_cond, ucfg, latent, dtype)
    # `da` is one conditional D call: two backbone passes (x_t, x_{t-ns}) + the head.
    n_head_blocks = head_blocks(d_cond)
    n_disc_blocks = len(d_cond.backbone.transformer_blocks) if is_transformer(ucfg) else None
    del d_cond, d_unc

    # Activations per micro-batch. Adversarial step (alternating): generator update = student
    # forward/backward + one conditional D call (gradients flow through D into the student output);
    # discriminator update = two conditional D calls (real and fake pairs). Peak = the larger.
    def adv(a_u, a_d):
        return max(a_u + a_d, 2 * a_d)

    phases = [
        ("mse: full UNet", n_unet, 0, live_unet, ua.saved, ua.saved_ckpt),
        ("adversarial: LoRA + D", n_lora + n_dc, n_unet, max(live_unet, live_d),
         adv(ua.saved, da.saved), adv(ua.saved_ckpt, da.saved_ckpt)),
        ("adversarial: full UNet + D", n_unet + n_dc, 0, max(live_unet, live_d),
         adv(ua.saved, da.saved), adv(ua.saved_ckpt, da.saved_ckpt)),
    ]
    memory = []
    for phase, trainable, frozen, live, act, act_ck in phases:
        for zero, offload in ((2, False), (3, False), (3, True)):
            m = zero_memory(trainable, frozen, gpus, zero, offload, precision, act * mb, act_ck * mb, live)
            memory.append(dict(phase=phase, zero=f"ZeRO-{zero}" + (" + offload" if offload else ""),
                               trainable_params=trainable, weights=m.weights / GiB, grads=m.grads / GiB,
                               optimizer=m.optimizer / GiB, activations=m.activations / GiB,
                               activations_ckpt=m.activations_ckpt / GiB, total=m.total / GiB,
                               total_ckpt=m.total_ckpt / GiB, cpu=m.cpu / GiB,
                               fits=m.total / GiB <= gpu_memory_gib, fits_ckpt=m.total_ckpt / GiB <= gpu_memory_gib))

    # Storage: per trajectory row x_t + target latents, prompt embeddings and (SDXL) the pooled embedding.
    tb = _BYTES[cfg.trajectories.dtype]
    eb = _BYTES[cfg.encode.dtype]
    lat = ucfg["in_channels"] * latent * latent
    tokens, width = text_shape(ucfg)
    emb = tokens * width + pooled_dim(ucfg)
    row = 2 * lat * tb + emb * tb + 3 * 8  # + id, t, t_next
    encoded = samples * (lat * eb + emb * eb)
    storage, compute = [], []
    global_batch = gpus * mb * cfg.train.grad_accum

    # FLOPs per training sample (forward+backward = 3x forward for trained weights).
    f_u, f_d = ua.forward_flops, da.forward_flops
    if throughput is not None:
        source = "given (--throughput)"
    else:
        m = mfu if mfu is not None else 0.35
        # heaviest phase (adversarial full) sets the pace: G step 3 f_u + 3 f_d, D step 2 x 3 f_d
        throughput = peak_tflops * 1e12 * m / (3 * f_u + 9 * f_d)
        source = f"derived: {peak_tflops:g} TFLOP/s peak x MFU {m:g} / FLOPs per adversarial sample"
    for i, st in enumerate(cfg.stages, start=1):
        rows = samples * cfg.trajectories.draws
        evals = st.jump * (2 if st.guidance_scale > 1.0 else 1)
        storage.append(dict(stage=f"{i}-{st.name}", teacher=st.teacher_steps, student=st.student_steps, rows=rows,
                            bytes_per_row=row, bytes=rows * row, teacher_evals_per_row=evals))
        steps = stage_steps(st)
        seen = steps * global_batch
        gpu_h = seen / throughput / 3600.0
        roll_h = rows * evals / rollout_throughput / 3600.0 if rollout_throughput else None
        compute.append(dict(stage=f"{i}-{st.name}", loss=st.loss, steps=steps, samples_seen=seen,
                            epochs=seen / rows if rows else 0.0, train_gpu_hours=gpu_h,
                            train_wall_hours=gpu_h / gpus, rollout_gpu_hours=roll_h))

    evaluation = eval_plan(cfg, n_unet, f_u, latent, dtype, peak_tflops * 1e12 * (mfu if mfu is not None else 0.35),
                           eval_prompts, family)
    return Plan(config=config_name or cfg.name, family=family, family_from=family_from, base=base,
                denoiser="transformer" if is_transformer(ucfg) else "UNet", latent_channels=ucfg["in_channels"],
                text_tokens=tokens, text_dim=width, pooled_dim=pooled_dim(ucfg),
                gpus=gpus, micro_batch=mb, grad_accum=cfg.train.grad_accum,
                precision=precision, samples=samples, latent_size=latent, gpu_memory_gib=gpu_memory_gib,
                unet_params=n_unet, disc_params_conditional=n_dc, disc_params_unconditional=n_du,
                disc_head_blocks=n_head_blocks, disc_source=discriminator_source(), lora_rank=rank, lora_params=n_lora,
                unet_act=asdict(ua), disc_act=asdict(da), memory=memory, storage=storage, compute=compute,
                throughput=throughput, throughput_source=source, rollout_throughput=rollout_throughput,
                encoded_bytes=encoded, evaluation=evaluation, other_bases=other_base_params() if other_bases else [],
                disc_blocks=n_disc_blocks)


def plan_family(cfg: RunConfig) -> tuple[str, str]:
    """The run's model family and where it was read: `model.family`, else `model.base`'s, else the source
    folder's model_index.json when the folder is on this machine (a plan downloads nothing), else SDXL, said so."""
    from pathlib import Path

    from . import family
    from .zoo import BUILTIN, TINY_RANDOM_FAMILIES

    if cfg.model.family is not None:
        family.get(cfg.model.family)  # one line for a family padistill does not distil
        return cfg.model.family, "model.family"
    if cfg.model.base is not None:
        return BASES[cfg.model.base][0], "model.base"
    src = cfg.model.source
    if src in TINY_RANDOM_FAMILIES:
        return TINY_RANDOM_FAMILIES[src], src
    folder = BUILTIN.get(src) or (Path(src.removeprefix("file://")) if "://" not in src.removeprefix("file://") else None)
    if folder is not None and (Path(folder) / "model_index.json").is_file():
        return family.of_folder(folder).NAME, "the source's model_index.json"
    return "sdxl", f"{src} is not on this machine: planned as SDXL (set model.family)"


def eval_plan(cfg: RunConfig, n_unet: int, unet_flops: float, latent: int, dtype, flops_per_s: float,
              prompts: int | None = None, family: str = "sdxl") -> dict:
    """What the DAG's evaluation steps sample (`pipeline.evaluate`): per stage the student at its steps
    without CFG and the teacher at the student's steps (cached by step count, so stages with the same
    count share it) and, once for the run, the teacher at 32 steps; the teacher at its evaluation
    guidance (`teacher_guidance`: 2 UNet passes a step above 1); the toy runs also sample the stage's
    starting student. Every image is one VAE decode; the speed check adds `speed_repeats` x batch x (64
    teacher + the student's round(64 / steps) x steps) passes. `prompts`: images per model (default
    `evaluate.prompts`, the toy's 10 x `samples_per_prompt`). Feature extraction (Inception, CLIP) and
    text encoding are not counted (each well under a UNet pass per image)."""
    ev = cfg.evaluate
    n = prompts or (10 * ev.samples_per_prompt if cfg.data.toy else ev.prompts)
    vae = build_vae(FAMILY_VAES[family])  # SD1.5's VAE has SDXL's architecture, SD3's 16 latent channels
    f_vae = measure_vae_decode(vae, latent, dtype).forward_flops
    n_vae, n_text = count_params(vae), text_encoder_params(family)
    del vae
    g, g_from = teacher_guidance(cfg)
    cfg_passes = 2 if g > 1.0 else 1
    speed_batch = ev.speed_repeats * min(ev.speed_batch_size, n)  # as `sampling.sampling_speed` is called
    teacher_at = {32}
    rows = [dict(stage="teacher @ 32 (once)", unet_passes=n * 32 * cfg_passes, decodes=n)]
    for i, st in enumerate(cfg.stages, start=1):
        N = st.student_steps
        passes = n * N * (2 if cfg.data.toy else 1)  # the student (and the toy's starting student)
        passes += speed_batch * (64 + max(1, round(64 / N)) * N)  # the speed check (CFG always on there)
        decodes = n * (2 if cfg.data.toy else 1)
        if N not in teacher_at:
            teacher_at.add(N)
            passes += n * N * cfg_passes
            decodes += n
        rows.append(dict(stage=f"{i}-{st.name}", unet_passes=passes, decodes=decodes))
    for r in rows:
        r["tflop"] = (r["unet_passes"] * unet_flops + r["decodes"] * f_vae) / 1e12
        r["gpu_hours"] = r["tflop"] * 1e12 / flops_per_s / 3600.0
    b = _BYTES[str(dtype).split(".")[-1]]
    # an actor holds the teacher's and the student's UNets, the VAE and the text encoders
    weights = (2 * n_unet + n_vae + n_text) * b
    return dict(images_per_model=n, teacher_guidance=g, teacher_guidance_from=g_from, unet_forward_tflop=unet_flops / 1e12, vae_decode_tflop=f_vae / 1e12,
                vae_params=n_vae, text_encoder_params=n_text, weights_gib=weights / GiB, batch_size=ev.batch_size,
                flops_per_s=flops_per_s, stages=rows,
                gpu_hours=sum(r["gpu_hours"] for r in rows))


# ---- rendering --------------------------------------------------------------------------------------------
def teacher_guidance(cfg: RunConfig) -> tuple[float, str]:
    """The teacher's evaluation guidance as `evaluate.teacher_guidance` will read it, and where from:
    `evaluate.teacher_guidance_scale`, else the teacher folder's padistill.json when it is on this machine
    (a plan downloads nothing), else 0 (what the evaluation uses for a folder without one)."""
    from pathlib import Path

    from .zoo import BUILTIN, read_info

    if cfg.evaluate.teacher_guidance_scale is not None:
        return cfg.evaluate.teacher_guidance_scale, "evaluate.teacher_guidance_scale"
    src = cfg.model.source
    folder = BUILTIN.get(src) or (Path(src.removeprefix("file://")) if "://" not in src.removeprefix("file://") else None)
    if folder is not None and Path(folder).is_dir():
        return float(read_info(folder).get("guidance_scale", 0.0)), "the teacher's padistill.json"
    return 0.0, f"{src} is not on this machine: counted without CFG (set evaluate.teacher_guidance_scale)"


def _b(n: float) -> str:
    for unit, div in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def render(p: Plan) -> str:
    """The plan as Markdown (pipe tables), readable in a terminal."""
    L = []
    L.append(f"## Capacity plan: `{p.config}`")
    L.append("")
    L.append(f"Model family: {p.family} ({p.family_from}); sized as {BASES[p.base][1]} (`model.base`: {p.base}).")
    L.append("")
    L.append(f"{p.gpus} GPUs x {p.gpu_memory_gib:g} GiB, micro-batch {p.micro_batch}, grad-accum {p.grad_accum} "
             f"(global batch {p.gpus * p.micro_batch * p.grad_accum}), {p.precision}, latent {p.latent_channels}x{p.latent_size}x"
             f"{p.latent_size}, {p.samples:,} samples.")
    L.append("")
    L.append("### Parameters (built on the meta device)")
    L.append("")
    L.append("| model | parameters |")
    L.append("|---|---:|")
    L.append(f"| {BASES[p.base][1]} {p.denoiser} (student / teacher) | {p.unet_params:,} ({p.unet_params / 1e9:.3f} B) |")
    enc = f"the transformer's first {p.disc_blocks} blocks" if p.denoiser == "transformer" else "UNet encoder"
    L.append(f"| discriminator, conditional ({enc} + {p.disc_head_blocks}-block head) | "
             f"{p.disc_params_conditional:,} ({p.disc_params_conditional / 1e9:.3f} B) |")
    L.append(f"| discriminator, unconditional | {p.disc_params_unconditional:,} "
             f"({p.disc_params_unconditional / 1e9:.3f} B) |")
    L.append(f"| LoRA rank {p.lora_rank} on the {p.denoiser} | {p.lora_params:,} ({p.lora_params / 1e6:.1f} M) |")
    L.append("")
    L.append(f"Discriminator: {p.disc_source}.")
    L.append("")
    ua, da = p.unet_act, p.disc_act
    L.append("Activations saved for backward per sample (measured on meta, fused attention): "
             f"{p.denoiser} {ua['saved'] / GiB:.2f} GiB ({ua['saved_ckpt'] / GiB:.2f} GiB with gradient checkpointing), "
             f"conditional discriminator call {da['saved'] / GiB:.2f} GiB ({da['saved_ckpt'] / GiB:.2f} GiB). "
             f"Forward FLOPs per sample: {p.denoiser} {ua['forward_flops'] / 1e12:.2f} TFLOP, "
             f"discriminator {da['forward_flops'] / 1e12:.2f} TFLOP.")
    L.append("")
    L.append(f"### Per-GPU memory (GiB) on {p.gpus} GPUs, micro-batch {p.micro_batch}")
    L.append("")
    L.append("| phase | ZeRO | weights | grads | Adam states | activations | total | fits | "
             "act. (ckpt) | total (ckpt) | fits (ckpt) | CPU (offload) |")
    L.append("|---|---|---:|---:|---:|---:|---:|:-:|---:|---:|:-:|---:|")
    for m in p.memory:
        L.append(f"| {m['phase']} | {m['zero']} | {m['weights']:.1f} | {m['grads']:.2f} | {m['optimizer']:.2f} | "
                 f"{m['activations']:.1f} | {m['total']:.1f} | {'yes' if m['fits'] else 'NO'} | "
                 f"{m['activations_ckpt']:.1f} | {m['total_ckpt']:.1f} | {'yes' if m['fits_ckpt'] else 'NO'} | "
                 f"{m['cpu']:.2f} |")
    L.append("")
    L.append("Adam states include the fp32 master weights in mixed precision. Not counted: the CUDA context, "
             "communication buckets and fragmentation (keep a few GiB of headroom).")
    L.append("")
    L.append(f"### Trajectory storage for {p.samples:,} samples")
    L.append("")
    L.append("| stage | teacher -> student | rows | per row | total | teacher UNet evals / row |")
    L.append("|---|---|---:|---:|---:|---:|")
    for s in p.storage:
        L.append(f"| {s['stage']} | {s['teacher']} -> {s['student']} | {s['rows']:,} | {_b(s['bytes_per_row'])} | "
                 f"{_b(s['bytes'])} | {s['teacher_evals_per_row']} |")
    total = sum(s["bytes"] for s in p.storage)
    L.append(f"| all stages | | | | {_b(total)} | |")
    L.append(f"| encoded/ (latents + embeddings) | | {p.samples:,} | | {_b(p.encoded_bytes)} | |")
    L.append("")
    pooled = f" and pooled embedding ({p.pooled_dim})" if p.pooled_dim else " (no pooled embedding)"
    L.append(f"Per row: x_t and target latents, prompt embeddings ({p.text_tokens}x{p.text_dim}){pooled}, fp16.")
    L.append("")
    L.append(f"### GPU-hours at {p.throughput:.3g} training samples/s/GPU ({p.throughput_source})")
    L.append("")
    L.append("| stage | loss | steps | samples seen | epochs | train GPU-h | train wall-h | rollout GPU-h |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for c in p.compute:
        roll = f"{c['rollout_gpu_hours']:.1f}" if c["rollout_gpu_hours"] is not None else "(--rollout-throughput)"
        L.append(f"| {c['stage']} | {c['loss']} | {c['steps']:,} | {c['samples_seen']:,} | {c['epochs']:.2f} | "
                 f"{c['train_gpu_hours']:.1f} | {c['train_wall_hours']:.2f} | {roll} |")
    tg = sum(c["train_gpu_hours"] for c in p.compute)
    rolls = [c["rollout_gpu_hours"] for c in p.compute]
    rt = f"{sum(rolls):.1f}" if rolls and all(r is not None for r in rolls) else ""
    L.append(f"| all | | {sum(c['steps'] for c in p.compute):,} | | | {tg:.1f} | {tg / p.gpus:.2f} | {rt} |")
    L.append("")
    e = p.evaluation
    if e:
        L.append(f"### Evaluation: {e['images_per_model']:,} images per model, at {e['flops_per_s'] / 1e12:.3g} "
                 "TFLOP/s per GPU")
        L.append("")
        L.append("| step | UNet passes | VAE decodes | TFLOP | GPU-h |")
        L.append("|---|---:|---:|---:|---:|")
        for r in e["stages"]:
            L.append(f"| {r['stage']} | {r['unet_passes']:,} | {r['decodes']:,} | {r['tflop']:,.0f} | "
                     f"{r['gpu_hours']:.2f} |")
        L.append(f"| all | {sum(r['unet_passes'] for r in e['stages']):,} | "
                 f"{sum(r['decodes'] for r in e['stages']):,} | {sum(r['tflop'] for r in e['stages']):,.0f} | "
                 f"{e['gpu_hours']:.2f} |")
        L.append("")
        L.append(f"Per image: a UNet pass {e['unet_forward_tflop']:.2f} TFLOP, a VAE decode {e['vae_decode_tflop']:.2f} "
                 f"TFLOP (measured on meta); the teacher at guidance {e['teacher_guidance']:g} "
                 f"({e['teacher_guidance_from']}; 2 passes a step above 1), students without. Not counted: "
                 "feature extraction and text encoding. Per GPU, an evaluation actor holds the teacher's and the "
                 f"student's UNets, the VAE ({e['vae_params'] / 1e6:.1f} M) and the text encoders "
                 f"({e['text_encoder_params'] / 1e6:.1f} M): {e['weights_gib']:.1f} GiB of weights in "
                 f"{p.precision}, plus one batch's activations (batch {e['batch_size']}; not measured).")
        L.append("")
    if p.other_bases:
        L.append("### Other base models (denoisers built on the meta device from their published configs)")
        L.append("")
        L.append("| model | parameters | + positional-embedding table | total | publisher's figure |")
        L.append("|---|---:|---:|---:|---:|")
        for b in p.other_bases:
            L.append(f"| {b['model']} | {b['parameters']:,} | {b['pos_embed_table']:,} | {b['total']:,} "
                     f"({b['total'] / 1e9:.3f} B) | {b['published'] / 1e9:g} B |")
        L.append("")
        L.append("The SD3 transformers' fixed positional-embedding table is a buffer in diffusers and a weight in "
                 "the publisher's checkpoint (and count). The memory and GPU-hours above are the "
                 f"{BASES[p.base][1]} {p.denoiser}'s (`model.base` sizes another).")
        L.append("")
    return "\n".join(L)


def to_json(p: Plan) -> str:
    return json.dumps(p.to_dict(), indent=2)
