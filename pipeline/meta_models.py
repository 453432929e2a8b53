"""The real denoisers (SDXL's and SD1.5's UNets, SD3.5-Medium's and -Large's transformers) and the
discriminator built on the meta device (no weights, no memory) and what is measured on them for `pipeline.plan`:
- parameter counts: `sum(p.numel())` of the diffusers `UNet2DConditionModel` built from SDXL base's
  config (`SDXL_UNET_CONFIG`, written out here so nothing is downloaded; `BASES` for the others) and of the
  discriminator;
- activations: one meta-device forward with autograd on, summing the bytes of every tensor autograd
  saves for backward (`torch.autograd.graph.saved_tensors_hooks`), attention counted as a fused
  (flash / memory-efficient) kernel saves it — q, k, v, output and log-sum-exp, no L×L matrix;
  with gradient checkpointing (diffusers checkpoints each ResnetBlock2D and BasicTransformerBlock, an SD3
  transformer each JointTransformerBlock):
  what is saved outside those units + each unit's input + the largest unit's own saved tensors;
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over the same forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# The rest of an SDXL pipeline, for the evaluation plan (the models an evaluation actor holds): the VAE
# (diffusers AutoencoderKL, SDXL base's vae/config.json) and the two text encoders (transformers
# CLIPTextModel, CLIPTextModelWithProjection: SDXL base's text_encoder/ and text_encoder_2/ configs).
SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "sample_size": 1024, "scaling_factor": 0.13025,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SDXL_TEXT_ENCODER_CONFIGS: tuple[dict[str, Any], ...] = (
    {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
     "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768},
    {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
     "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280},
)


# ---- models on the meta device --------------------------------------------------------------------------
def is_transformer(config: dict) -> bool:
    """An SD3 transformer's config (joint attention), not a UNet's."""
    return "joint_attention_dim" in config


def build_unet(config: dict | None = None, device: str = "meta"):
    """The denoiser of `config` (SDXL base's UNet by default; an SD3 transformer for a transformer's config)
    on `device`."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    config = config or SDXL_UNET_CONFIG
    with torch.device(device):
        return (SD3Transformer2DModel if is_transformer(config) else UNet2DConditionModel)(**config)


# runwayml/stable-diffusion-v1-5, unet/config.json (the keys that differ from diffusers' defaults). Its text
# encoder is CLIP ViT-L, SDXL's first (`SDXL_TEXT_ENCODER_CONFIGS[0]`); its VAE has SDXL's architecture.
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=768, attention_head_dim=8)

# stabilityai/stable-diffusion-3.5-medium and -large, transformer/config.json (diffusers SD3Transformer2DModel).
SD35_MEDIUM_CONFIG: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=list(range(13)), qk_norm="rms_norm")
SD35_LARGE_CONFIG: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, dual_attention_layers=[], qk_norm="rms_norm")
# SD3's conditioning: CLIP-L and CLIP-G states (77 tokens) followed by T5-XXL's (the stock pipeline's 256
# tokens), all 4096 wide; pooled: both CLIPs' projections, 2048.
SD3_TEXT_TOKENS = 77 + 256

# Other base models, for sizing the model-family work (issue 17): their denoisers' published configs
# (diffusers' unet/ or transformer/config.json of runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-3.5-medium and -large), with the parameter counts their publishers state.
OTHER_BASES: dict[str, dict[str, Any]] = {
    "SD1.5 UNet": dict(cls="UNet2DConditionModel", published=0.86e9, config=SD15_UNET_CONFIG),
    "SD3.5-Medium MMDiT-X": dict(cls="SD3Transformer2DModel", published=2.5e9, config=SD35_MEDIUM_CONFIG),
    "SD3.5-Large MMDiT": dict(cls="SD3Transformer2DModel", published=8.1e9, config=SD35_LARGE_CONFIG),
}


def other_base_params() -> list[dict]:
    """Each of `OTHER_BASES` built on the meta device: its parameters, and its fixed positional-embedding
    table (a buffer in diffusers' SD3 transformer, a weight in the publisher's checkpoint and count)."""
    import diffusers

    rows = []
    for name, spec in OTHER_BASES.items():
        with torch.device("meta"):
            m = getattr(diffusers, spec["cls"])(**spec["config"])
        params = count_params(m)
        table = sum(b.numel() for n, b in m.named_buffers() if n.endswith("pos_embed.pos_embed"))
        rows.append(dict(model=name, parameters=params, pos_embed_table=table, total=params + table,
                         published=spec["published"]))
    return rows


# SD3.5's VAE (vae/config.json): SDXL's architecture with 16 latent channels and no quant convs.
SD3_VAE_CONFIG: dict[str, Any] = {**SDXL_VAE_CONFIG, "latent_channels": 16, "scaling_factor": 1.5305,
                                  "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}
# SD3.5's third text encoder: T5 v1.1 XXL's encoder (text_encoder_3/config.json, transformers T5EncoderModel).
SD3_T5_CONFIG: dict[str, Any] = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                     feed_forward_proj="gated-gelu", is_encoder_decoder=False)


def build_vae(config: dict | None = None, device: str = "meta"):
    """The diffusers AutoencoderKL of `config` (SDXL base's by default) on `device`."""
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**(config or SDXL_VAE_CONFIG))


def text_encoder_params(family: str = "sdxl") -> int:
    """Parameters of a family's text encoders (SDXL: two, SD1.5: the first of them, CLIP ViT-L; SD3: both
    CLIPs with projections and T5-XXL's encoder), built on the meta device from their configs."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    n = 0
    configs = SDXL_TEXT_ENCODER_CONFIGS[:1] if family == "sd15" else SDXL_TEXT_ENCODER_CONFIGS
    classes = (CLIPTextModelWithProjection,) * 2 if family == "sd3" else (CLIPTextModel, CLIPTextModelWithProjection)
    for cls, c in zip(classes, configs):
        with torch.device("meta"):
            n += count_params(cls(CLIPTextConfig(**c)))
    if family == "sd3":
        with torch.device("meta"):
            n += count_params(T5EncoderModel(T5Config(**SD3_T5_CONFIG)))
    return n


# the published base models `padistill plan` sizes (`model.base`): family, display name, denoiser config
BASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "sdxl-base-1.0": ("sdxl", "SDXL", SDXL_UNET_CONFIG),
    "sd-1.5": ("sd15", "SD1.5", SD15_UNET_CONFIG),
    "sd3.5-medium": ("sd3", "SD3.5-Medium", SD35_MEDIUM_CONFIG),
    "sd3.5-large": ("sd3", "SD3.5-Large", SD35_LARGE_CONFIG),
}
FAMILY_BASES = {"sdxl": "sdxl-base-1.0", "sd15": "sd-1.5", "sd3": "sd3.5-medium"}  # a family's default
FAMILY_VAES = {"sdxl": SDXL_VAE_CONFIG, "sd15": SDXL_VAE_CONFIG, "sd3": SD3_VAE_CONFIG}


def text_shape(config: dict) -> tuple[int, int]:
    """(tokens, width) of a denoiser's prompt embeddings: SDXL / SD1.5 77 x cross-attention width, SD3 77 CLIP
    + 256 T5 tokens x the joint-attention width."""
    if is_transformer(config):
        return SD3_TEXT_TOKENS, config["joint_attention_dim"]
    return SDXL_TEXT_TOKENS, config["cross_attention_dim"]


def pooled_dim(unet_config: dict) -> int:
    """The pooled text embedding a denoiser takes (SDXL's `text_time`, SD3's `pooled_projections`), 0 for one
    without (SD1.5)."""
    if is_transformer(unet_config):
        return unet_config["pooled_projection_dim"]
    if unet_config.get("addition_embed_type") != "text_time":
        return 0
    return unet_config["projection_class_embeddings_input_dim"] - SDXL_TIME_IDS * unet_config["addition_time_embed_dim"]


def measure_vae_decode(vae, latent_size: int, dtype: torch.dtype) -> Activations:
    """One VAE decode (post-quant conv and decoder) of a latent of `latent_size`, batch 1, on meta."""
    vae = nn.Module.to(vae, dtype)
    z = torch.zeros(1, vae.config.latent_channels, latent_size, latent_size, device="meta", dtype=dtype)
    return measure(_Decode(vae), {"z": z}, dtype)


class _Decode(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


def build_discriminator(conditional: bool = True, unet_config: dict | None = None, latent_size: int = 128,
                        device: str = "meta", blocks: int | None = None) -> nn.Module:
    """The training code's discriminator (`pipeline.discriminator`) on a denoiser of `unet_config` (SDXL
    base's UNet by default; an SD3 transformer's first `blocks`, default half), built on `device` (meta: no
    weights, no memory)."""
    from .discriminator import Discriminator

    cfg = {**(unet_config or SDXL_UNET_CONFIG), "sample_size": latent_size}  # D's head is sized for this
    unet = build_unet(cfg, device)
    with torch.device(device):
        return Discriminator(unet, conditional, blocks=blocks)


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
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    return (ResnetBlock2D, BasicTransformerBlock, JointTransformerBlock)


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
    """One sample's inputs; the pooled text for SDXL's `text_time` UNet and SD3's transformer, SDXL's time ids
    (else None)."""
    m = dict(device="meta", dtype=dtype)
    pooled = pooled_dim(unet_config) > 0
    text_time = pooled and not is_transformer(unet_config)
    return dict(
        timestep=torch.full((1,), 999.0, device="meta"),
        encoder_hidden_states=torch.empty(1, *text_shape(unet_config), **m),
        text_embeds=torch.empty(1, pooled_dim(unet_config), **m) if pooled else None,
        time_ids=torch.empty(1, SDXL_TIME_IDS, **m) if text_time else None,
        latent=torch.empty(1, unet_config["in_channels"], latent_size, latent_size, **m),
    )


def measure_unet(unet, unet_config: dict, latent_size: int, dtype: torch.dtype) -> Activations:
    """One denoiser forward (a UNet, or an SD3 transformer) of one sample."""
    c = _cond_inputs(unet_config, latent_size, dtype)
    unet = nn.Module.to(unet, dtype)  # (diffusers' own .to() warns about from_pretrained)
    if is_transformer(unet_config):
        return measure(unet, dict(hidden_states=c["latent"], timestep=c["timestep"],
                                  encoder_hidden_states=c["encoder_hidden_states"],
                                  pooled_projections=c["text_embeds"]), dtype)
    added = {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]} if c["text_embeds"] is not None else None
    return measure(unet, dict(sample=c["latent"], timestep=c["timestep"],
                              encoder_hidden_states=c["encoder_hidden_states"], added_cond_kwargs=added), dtype)


def measure_discriminator(disc: nn.Module, unet_config: dict, latent_size: int, dtype: torch.dtype) -> Activations:
    """One conditional discriminator call: two backbone passes (x_t and x_{t-ns}) plus the head."""
    c = _cond_inputs(unet_config, latent_size, dtype)
    disc = nn.Module.to(disc, dtype)
    inputs = dict(x_hat=c["latent"], t_hat=c["timestep"], prompt_embeds=c["encoder_hidden_states"],
                  pooled=c["text_embeds"], time_ids=c["time_ids"], x_t=c["latent"], t=c["timestep"])
    return measure(disc, inputs, dtype)
