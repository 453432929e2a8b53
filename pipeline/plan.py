"""Capacity plan for a run: the real SDXL UNet and the discriminator built on the meta device (no
weights, no memory), their parameter counts, per-GPU memory under DeepSpeed ZeRO-2/3, trajectory
storage per stage, and GPU-hours from a throughput the user supplies.

Everything that can be measured is measured on the meta device:
- parameter counts: `sum(p.numel())` of the diffusers `UNet2DConditionModel` built from SDXL base's
  config (`SDXL_UNET_CONFIG`, written out here so nothing is downloaded) and of the discriminator;
- activations: one meta-device forward with autograd on, summing the bytes of every tensor autograd
  saves for backward (`torch.autograd.graph.saved_tensors_hooks`), attention counted as a fused
  (flash / memory-efficient) kernel saves it — q, k, v, output and log-sum-exp, no L×L matrix;
  with gradient checkpointing (diffusers checkpoints each ResnetBlock2D and BasicTransformerBlock):
  what is saved outside those units + each unit's input + the largest unit's own saved tensors;
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over the same forward.

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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .config import RunConfig, StageConfig

GiB = 1024 ** 3

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (diffusers UNet2DConditionModel).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
# SDXL's conditioning: CLIP ViT-L (768) + OpenCLIP bigG (1280) hidden states, 77 tokens; pooled bigG 1280.
SDXL_TEXT_TOKENS = 77
SDXL_TIME_IDS = 6
VAE_FACTOR = 8  # SDXL's VAE: 1024 px -> 128 latent
# LoRA (DESIGN): conv and linear layers except the input/output convs and the time embedding.
LORA_EXCLUDE = ("conv_in", "conv_out", "time_embedding")

_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


# ---- models on the meta device --------------------------------------------------------------------------
def build_unet(config: dict | None = None, device: str = "meta"):
    """The diffusers UNet2DConditionModel of `config` (SDXL base by default) on `device`."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**(config or SDXL_UNET_CONFIG))


def build_discriminator(conditional: bool = True, unet_config: dict | None = None, latent_size: int = 128,
                        device: str = "meta") -> nn.Module:
    """The training code's discriminator (`pipeline.discriminator`) on a UNet of `unet_config`
    (SDXL base by default), built on `device` (meta: no weights, no memory)."""
    from .discriminator import Discriminator

    cfg = {**(unet_config or SDXL_UNET_CONFIG), "sample_size": latent_size}  # D's head is sized for this
    unet = build_unet(cfg, device)
    with torch.device(device):
        return Discriminator(unet, conditional)


def discriminator_source() -> str:
    return "pipeline.discriminator (the training code's)"


def head_blocks(disc: nn.Module) -> int:
    return sum(1 for m in disc.head.modules() if isinstance(m, nn.GroupNorm))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_params(unet: nn.Module, rank: int, exclude=LORA_EXCLUDE) -> int:
    """Trainable parameters of a peft LoRA of `rank` on every Linear and Conv2d outside `exclude`
    (peft: Linear(i, o) -> A (r x i) + B (o x r); Conv2d(i, o, k) -> A conv(i, r, k) + B conv(r, o, 1))."""
    n = 0
    for name, m in unet.named_modules():
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        if isinstance(m, nn.Linear):
            n += rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            n += rank * m.in_channels * kh * kw + rank * m.out_channels
    return n


def largest_layer(module: nn.Module) -> int:
    """Parameters of the largest leaf module (what ZeRO-3 gathers at once)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)


# ---- activations and FLOPs, measured on meta --------------------------------------------------------------
class _FusedAttention(torch.autograd.Function):
    """Stands in for a fused attention kernel during measurement: output shaped like q, saves what
    flash / memory-efficient attention saves for backward (q, k, v, out, logsumexp)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):  # pragma: no cover - never run (measurement only)
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


@contextmanager
def _fused_attention():
    import torch.nn.functional as F

    orig = F.scaled_dot_product_attention
    calls = [0, 0]  # calls, FLOPs (q k^T and attn v: 2 matmuls, 2 FLOPs per multiply-add)

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        calls[0] += 1
        calls[1] += 2 * 2 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]
        return _FusedAttention.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = orig


def _unit_types():
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    return (ResnetBlock2D, BasicTransformerBlock)


@dataclass
class Activations:
    """Bytes saved for backward per sample, and forward FLOPs per sample."""

    saved: int  # no gradient checkpointing
    saved_ckpt: int  # gradient checkpointing of every ResnetBlock2D / BasicTransformerBlock
    forward_flops: int


def measure(module: nn.Module, inputs: dict, dtype: torch.dtype) -> Activations:
    """One forward of `module` on meta tensors (batch 1) with autograd recording; see the module doc."""
    from torch.utils.flop_counter import FlopCounterMode

    params = {id(p) for p in module.parameters()}
    units = [m for m in module.modules() if isinstance(m, _unit_types())]
    stack: list[int] = []
    per_unit: dict[int, int] = {}
    unit_inputs = [0]
    outside = [0]
    keep: list[torch.Tensor] = []
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        if id(t) in params or (t._base is not None and id(t._base) in params) or id(t) in seen:
            return t
        seen.add(id(t))
        keep.append(t)
        b = t.numel() * t.element_size()
        if stack:
            per_unit[stack[0]] = per_unit.get(stack[0], 0) + b
        else:
            outside[0] += b
        return t

    def pre(m, args, kwargs):
        if not stack:
            x = args[0] if args else next(iter(kwargs.values()))
            unit_inputs[0] += x.numel() * x.element_size()
        stack.append(id(m))

    def post(m, args, kwargs, out):
        stack.pop()

    hooks = [u.register_forward_pre_hook(pre, with_kwargs=True) for u in units]
    hooks += [u.register_forward_hook(post, with_kwargs=True) for u in units]
    flops = FlopCounterMode(display=False)
    try:
        with torch.enable_grad(), _fused_attention() as calls, flops, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(**inputs)
    finally:
        for h in hooks:
            h.remove()
    if not calls[0] and any("attn" in n for n, _ in module.named_modules()):
        raise RuntimeError("measurement: attention did not go through F.scaled_dot_product_attention")
    saved = outside[0] + sum(per_unit.values())
    ckpt = outside[0] + unit_inputs[0] + max(per_unit.values(), default=0)
    return Activations(saved=saved, saved_ckpt=ckpt, forward_flops=int(flops.get_total_flops()) + calls[1])


def _cond_inputs(unet_config: dict, latent_size: int, dtype: torch.dtype) -> dict:
    m = dict(device="meta", dtype=dtype)
    text = unet_config["projection_class_embeddings_input_dim"] - SDXL_TIME_IDS * unet_config["addition_time_embed_dim"]
    return dict(
        timestep=torch.full((1,), 999.0, device="meta"),
        encoder_hidden_states=torch.empty(1, SDXL_TEXT_TOKENS, unet_config["cross_attention_dim"], **m),
        text_embeds=torch.empty(1, text, **m), time_ids=torch.empty(1, SDXL_TIME_IDS, **m),
        latent=torch.empty(1, unet_config["in_channels"], latent_size, latent_size, **m),
    )


def measure_unet(unet, unet_config: dict, latent_size: int, dtype: torch.dtype) -> Activations:
    c = _cond_inputs(unet_config, latent_size, dtype)
    unet = nn.Module.to(unet, dtype)  # (diffusers' own .to() warns about from_pretrained)
    return measure(unet, dict(sample=c["latent"], timestep=c["timestep"],
                              encoder_hidden_states=c["encoder_hidden_states"],
                              added_cond_kwargs={"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]}), dtype)


def measure_discriminator(disc: nn.Module, unet_config: dict, latent_size: int, dtype: torch.dtype) -> Activations:
    """One conditional discriminator call: two backbone passes (x_t and x_{t-ns}) plus the head."""
    c = _cond_inputs(unet_config, latent_size, dtype)
    disc = nn.Module.to(disc, dtype)
    inputs = dict(x_hat=c["latent"], t_hat=c["timestep"], prompt_embeds=c["encoder_hidden_states"],
                  pooled=c["text_embeds"], time_ids=c["time_ids"], x_t=c["latent"], t=c["timestep"])
    return measure(disc, inputs, dtype)


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

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(cfg: RunConfig, gpus: int | None = None, micro_batch: int | None = None, samples: int | None = None,
              throughput: float | None = None, rollout_throughput: float | None = None,
              gpu_memory_gib: float = 80.0, peak_tflops: float = 312.0, mfu: float | None = None,
              unet_config: dict | None = None, config_name: str = "") -> Plan:
    ucfg = copy.deepcopy(unet_config or SDXL_UNET_CONFIG)
    gpus = gpus or cfg.train.workers
    mb = micro_batch or cfg.train.micro_batch
    precision = cfg.train.precision
    dtype = _DTYPE[precision]
    latent = cfg.model.resolution // VAE_FACTOR
    samples = samples or cfg.data.limit or 1_000_000
    rank = next((s.lora.rank for s in cfg.stages if s.lora), 64)

    unet = build_unet(ucfg)
    n_unet = count_params(unet)
    n_lora = lora_params(unet, rank)
    live_unet = largest_layer(unet)
    ua = measure_unet(unet, ucfg, latent, dtype)
    del unet
    d_cond = build_discriminator(True, ucfg, latent)
    d_unc = build_discriminator(False, ucfg, latent)
    n_dc, n_du = count_params(d_cond), count_params(d_unc)
    live_d = largest_layer(d_cond)
    da = measure_discriminator(d_cond, ucfg, latent, dtype)
    # `da` is one conditional D call: two backbone passes (x_t, x_{t-ns}) + the head.
    n_head_blocks = head_blocks(d_cond)
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

    # Storage: per trajectory row x_t + target latents, prompt embeddings and pooled embedding.
    tb = _BYTES[cfg.trajectories.dtype]
    eb = _BYTES[cfg.encode.dtype]
    lat = ucfg["in_channels"] * latent * latent
    text = ucfg["projection_class_embeddings_input_dim"] - SDXL_TIME_IDS * ucfg["addition_time_embed_dim"]
    emb = SDXL_TEXT_TOKENS * ucfg["cross_attention_dim"] + text
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

    return Plan(config=config_name or cfg.name, gpus=gpus, micro_batch=mb, grad_accum=cfg.train.grad_accum,
                precision=precision, samples=samples, latent_size=latent, gpu_memory_gib=gpu_memory_gib,
                unet_params=n_unet, disc_params_conditional=n_dc, disc_params_unconditional=n_du,
                disc_head_blocks=n_head_blocks, disc_source=discriminator_source(), lora_rank=rank, lora_params=n_lora,
                unet_act=asdict(ua), disc_act=asdict(da), memory=memory, storage=storage, compute=compute,
                throughput=throughput, throughput_source=source, rollout_throughput=rollout_throughput,
                encoded_bytes=encoded)


# ---- rendering --------------------------------------------------------------------------------------------
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
    L.append(f"{p.gpus} GPUs x {p.gpu_memory_gib:g} GiB, micro-batch {p.micro_batch}, grad-accum {p.grad_accum} "
             f"(global batch {p.gpus * p.micro_batch * p.grad_accum}), {p.precision}, latent 4x{p.latent_size}x"
             f"{p.latent_size}, {p.samples:,} samples.")
    L.append("")
    L.append("### Parameters (built on the meta device)")
    L.append("")
    L.append("| model | parameters |")
    L.append("|---|---:|")
    L.append(f"| SDXL UNet (student / teacher) | {p.unet_params:,} ({p.unet_params / 1e9:.3f} B) |")
    L.append(f"| discriminator, conditional (UNet encoder + {p.disc_head_blocks}-block head) | "
             f"{p.disc_params_conditional:,} ({p.disc_params_conditional / 1e9:.3f} B) |")
    L.append(f"| discriminator, unconditional | {p.disc_params_unconditional:,} "
             f"({p.disc_params_unconditional / 1e9:.3f} B) |")
    L.append(f"| LoRA rank {p.lora_rank} on the UNet | {p.lora_params:,} ({p.lora_params / 1e6:.1f} M) |")
    L.append("")
    L.append(f"Discriminator: {p.disc_source}.")
    L.append("")
    ua, da = p.unet_act, p.disc_act
    L.append("Activations saved for backward per sample (measured on meta, fused attention): "
             f"UNet {ua['saved'] / GiB:.2f} GiB ({ua['saved_ckpt'] / GiB:.2f} GiB with gradient checkpointing), "
             f"conditional discriminator call {da['saved'] / GiB:.2f} GiB ({da['saved_ckpt'] / GiB:.2f} GiB). "
             f"Forward FLOPs per sample: UNet {ua['forward_flops'] / 1e12:.2f} TFLOP, "
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
    L.append("Per row: x_t and target latents, prompt embeddings (77x2048) and pooled embedding (1280), fp16.")
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
    return "\n".join(L)


def to_json(p: Plan) -> str:
    return json.dumps(p.to_dict(), indent=2)
