"""The adversarial discriminator of a stage (DESIGN, "The method"; SDXL-Lightning section 3).

Backbone: a copy of the diffusion UNet's encoder (time and text-time embeddings, conv_in, down blocks,
mid block) initialised from the base model (or the stage's teacher: `disc_init`) and trained whole,
whatever `requires_grad` the UNet it was copied from had, text-conditioned through its
cross-attention and (SDXL) its pooled-text/size embedding. Each input goes through the shared backbone on
its own (its own timestep); the mid-block features feed a head of (4x4 conv stride 2 -> GroupNorm ->
SiLU) blocks and a 1-logit projection (one 3x3 block on maps smaller than 4x4). Ablations (`disc_backbone`):
the same copy frozen, or a small plain CNN.

- conditional D(x_t, x_{t-ns}, t, c): features of x_t (at t) and of x_{t-ns} (at its timestep) are
  concatenated on channels before the head;
- unconditional D'(x_{t-ns}, c): the head sees the features of x_{t-ns} only.

A new Discriminator is built at every stage (re-initialised), and the unconditional
phase continues from the conditional phase's backbone with a fresh head (`with_mode`).

Inputs are *scaled* model inputs (`Schedule.scale_input`) with integer timesteps, exactly what the
UNet itself sees; the trainer does the scaling and the re-noising through `pipeline.schedule`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _groups(channels: int, positions: int = 1, max_groups: int = 32, min_values: int = 16) -> int:
    """The most GroupNorm groups (<= 32) that divide `channels` with at least `min_values` values per
    group (channels per group x `positions` of the map). On a 1x1 map that is one group over all
    channels (a layer norm); 4-value groups on a 1x1 map would remove most of what the head saw."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0 and (channels // g) * positions >= min(min_values, channels * positions):
            return g
    return 1


class Head(nn.Module):
    """(4x4 conv stride 2 -> GroupNorm -> SiLU) blocks while the map is at least 4x4 (the paper's head),
    then a 1x1 conv to one logit per position, averaged. A map smaller than 4x4 (the toy's 2x2 mid block)
    gets one 3x3 stride-1 block instead, which keeps its positions so the GroupNorm still has
    something to normalise (groups of >= 16 values: channels x positions)."""

    def __init__(self, in_channels: int, channels: int, size: int):
        super().__init__()
        layers: list[nn.Module] = []
        c, s = in_channels, max(int(size), 1)
        while True:
            if s >= 4:
                layers.append(nn.Conv2d(c, channels, kernel_size=4, stride=2, padding=1))
                s = s // 2
            else:
                layers.append(nn.Conv2d(c, channels, kernel_size=3, padding=1))
            layers += [nn.GroupNorm(_groups(channels, s * s), channels), nn.SiLU()]
            c = channels
            if s < 4:
                break
        self.blocks = nn.Sequential(*layers)
        self.proj = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.blocks(h)).mean(dim=(1, 2, 3))


def latent_size(unet_config) -> int:
    """The UNet's latent side (its config's `sample_size`, an int or a pair)."""
    s = unet_config.sample_size
    return s if isinstance(s, int) else int(s[0])


class Backbone(nn.Module):
    """The UNet's encoder half, copied from a UNet2DConditionModel (weights included)."""

    def __init__(self, unet):
        super().__init__()
        cfg = unet.config
        if getattr(unet, "class_embedding", None) is not None or getattr(unet, "encoder_hid_proj", None) is not None:
            raise ValueError("discriminator: UNets with class embeddings or encoder_hid_proj are not supported")
        if cfg.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"discriminator: addition_embed_type {cfg.addition_embed_type!r} is not supported "
                             "(SDXL's 'text_time' or none)")
        self.addition_embed_type = cfg.addition_embed_type
        self.time_proj = copy.deepcopy(unet.time_proj)
        self.time_embedding = copy.deepcopy(unet.time_embedding)
        self.time_embed_act = copy.deepcopy(unet.time_embed_act)
        if self.addition_embed_type == "text_time":
            self.add_time_proj = copy.deepcopy(unet.add_time_proj)
            self.add_embedding = copy.deepcopy(unet.add_embedding)
        self.conv_in = copy.deepcopy(unet.conv_in)
        self.down_blocks = copy.deepcopy(unet.down_blocks)
        self.mid_block = copy.deepcopy(unet.mid_block)
        # a copy that trains whatever `requires_grad` the UNet it came from had (the trainer's teacher is
        # frozen: copying it froze the whole backbone, and only the head trained)
        self.requires_grad_(True)
        self.out_channels = int(cfg.block_out_channels[-1])
        n_down = sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None))
        self.feature_size = max(latent_size(cfg) // 2 ** n_down, 1)

    def forward(self, x, t, prompt_embeds, pooled, time_ids):
        dtype = self.conv_in.weight.dtype
        x = x.to(dtype)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(dtype))
        if self.addition_embed_type == "text_time":
            tid = self.add_time_proj(time_ids.flatten()).reshape(pooled.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([pooled, tid], dim=-1).to(dtype))
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        ehs = prompt_embeds.to(dtype)
        h = self.conv_in(x)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        if getattr(self.mid_block, "has_cross_attention", False):
            h = self.mid_block(h, emb, encoder_hidden_states=ehs)
        else:
            h = self.mid_block(h, emb)
        return h


def transformer_block_count(n: int, blocks: int | None = None) -> int:
    """How many of a transformer's `n` blocks D copies: `blocks` (a stage's `disc_blocks`), default half; 1 to
    n - 1, since the last block only updates the image tokens (context_pre_only)."""
    k = n // 2 if blocks is None else int(blocks)
    if not 1 <= k <= n - 1:
        raise ValueError(f"{k}, but the transformer has {n} blocks; D copies 1 to {n - 1} of them (its last block "
                         "updates the image tokens only)")
    return k


class TransformerBackbone(nn.Module):
    """The SD3 family's discriminator backbone: an `SD3Transformer2DModel`'s
    patch and positional embedding, timestep + pooled-text embedding, context projection and its first
    `blocks` joint-attention blocks, copied with their weights and trained whole; the image tokens of the
    last copied block are laid back out as a 2-D map ([B, inner_dim, H/patch, W/patch]) for `Head`.

    This departs from the paper's design (a copy of the UNet's encoder half, whose mid-block features are
    the most downsampled and the most semantic): a transformer has no encoder half and no downsampling, so
    "the encoder" is read as its first blocks, at the patch grid's resolution; how many is a choice (a stage's
    `disc_blocks`; default half of them, as a UNet's encoder is about half its blocks)."""

    def __init__(self, transformer, blocks: int | None = None):
        super().__init__()
        cfg = transformer.config
        k = transformer_block_count(len(transformer.transformer_blocks), blocks)
        self.pos_embed = copy.deepcopy(transformer.pos_embed)
        self.time_text_embed = copy.deepcopy(transformer.time_text_embed)
        self.context_embedder = copy.deepcopy(transformer.context_embedder)
        self.transformer_blocks = copy.deepcopy(transformer.transformer_blocks[:k])
        self.requires_grad_(True)
        # the last copied block's text-token outputs feed nothing (D reads the image tokens): their weights
        # would get no gradient, so they are frozen rather than given optimizer state
        last = self.transformer_blocks[-1]
        for dead in (last.attn.add_q_proj, last.attn.norm_added_q, last.attn.to_add_out, last.norm2_context,
                     last.ff_context):
            if dead is not None:
                dead.requires_grad_(False)
        self.patch = int(cfg.patch_size)
        self.out_channels = int(cfg.num_attention_heads * cfg.attention_head_dim)
        self.feature_size = max(int(cfg.sample_size) // self.patch, 1)

    def forward(self, x, t, prompt_embeds, pooled, time_ids=None):
        dtype = self.context_embedder.weight.dtype
        x = x.to(dtype)
        b, _, height, width = x.shape
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
        h = self.pos_embed(x).contiguous()
        temb = self.time_text_embed(t.to(dtype), pooled.to(dtype))
        ehs = self.context_embedder(prompt_embeds.to(dtype))
        for block in self.transformer_blocks:
            ehs, h = block(hidden_states=h, encoder_hidden_states=ehs, temb=temb)
        return h.transpose(1, 2).reshape(b, self.out_channels, height // self.patch, width // self.patch)


class PlainCNN(nn.Module):
    """A small plain CNN on the latents, for the ablation against the UNet-encoder backbone: 3x3 convs
    (stride 2 while the map is larger than 4x4) with GroupNorm and SiLU, conditioned on the timestep
    (sinusoidal embedding) and the pooled text embedding by a per-channel shift after every conv (a family
    without one, SD1.5: the mean of the prompt's token embeddings). Same interface as `Backbone`."""

    def __init__(self, in_channels: int, sample_size: int, pooled_dim: int, channels: int = 64, depth: int = 4):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.time_proj = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.embed = TimestepEmbedding(channels, channels)
        self.text = nn.Linear(pooled_dim, channels)
        self.convs, self.norms, self.shifts = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c, s = in_channels, sample_size
        for _ in range(depth):
            stride = 2 if s > 4 else 1
            self.convs.append(nn.Conv2d(c, channels, 3, stride=stride, padding=1))
            s = (s + stride - 1) // stride
            self.norms.append(nn.GroupNorm(_groups(channels, s * s), channels))
            self.shifts.append(nn.Linear(channels, channels))
            c = channels
        self.out_channels, self.feature_size = channels, s

    def forward(self, x, t, prompt_embeds, pooled, time_ids):
        dtype = self.convs[0].weight.dtype
        x = x.to(dtype)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        text = pooled if pooled is not None else prompt_embeds.mean(dim=1)
        emb = nn.functional.silu(self.embed(self.time_proj(t).to(dtype)) + self.text(text.to(dtype)))
        h = x
        for conv, norm, shift in zip(self.convs, self.norms, self.shifts):
            h = nn.functional.silu(norm(conv(h)) + shift(emb)[:, :, None, None])
        return h


def make_backbone(unet, kind: str = "trained", blocks: int | None = None) -> nn.Module:
    """D's backbone: 'trained' (the UNet encoder copy, trained whole: the paper; for an SD3 transformer its
    first `blocks`, `TransformerBackbone`), 'frozen' (the same copy with its weights frozen: only the head
    trains) or 'cnn' (a small plain CNN, UNets only)."""
    cfg = unet.config
    if hasattr(cfg, "joint_attention_dim") and kind in ("trained", "frozen"):
        bb = TransformerBackbone(unet, blocks)
        return bb if kind == "trained" else bb.requires_grad_(False)
    if kind == "cnn":
        pooled = int(cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim) \
            if cfg.addition_embed_type == "text_time" else int(cfg.cross_attention_dim)
        return PlainCNN(int(cfg.in_channels), latent_size(cfg), pooled)
    bb = Backbone(unet)
    if kind == "frozen":
        bb.requires_grad_(False)
    elif kind != "trained":
        raise ValueError(f"discriminator backbone {kind!r}: expected 'trained', 'frozen' or 'cnn'")
    return bb


class Discriminator(nn.Module):
    """D(x_t, x_hat, t, c) when `conditional`, else D'(x_hat, c). Returns one logit per sample."""

    def __init__(self, unet=None, conditional: bool = True, *, backbone: nn.Module | None = None,
                 backbone_kind: str = "trained", blocks: int | None = None):
        super().__init__()
        self.backbone = backbone if backbone is not None else make_backbone(unet, backbone_kind, blocks)
        self.conditional = bool(conditional)
        c = self.backbone.out_channels
        self.head = Head(2 * c if self.conditional else c, c, self.backbone.feature_size)

    @property
    def mode(self) -> str:
        return "conditional" if self.conditional else "unconditional"

    def with_mode(self, conditional: bool, backbone_state: dict | None = None) -> "Discriminator":
        """A discriminator of the other kind that keeps this backbone (a fresh head)."""
        bb = copy.deepcopy(self.backbone)  # keeps each parameter's requires_grad (a frozen backbone stays frozen)
        if backbone_state is not None:
            bb.load_state_dict(backbone_state)
        return Discriminator(conditional=conditional, backbone=bb)

    def forward(self, x_hat, t_hat, prompt_embeds, pooled, time_ids, x_t=None, t=None):
        """x_hat (scaled) at timesteps t_hat; for the conditional D also x_t (scaled) at t. A batch of
        x_hat may be a multiple k of the x_t batch (e.g. real and fake stacked): x_t's features are
        computed once and repeated, the text conditioning must match x_hat's batch."""
        f_hat = self.backbone(x_hat, t_hat, prompt_embeds, pooled, time_ids)
        if not self.conditional:
            return self.head(f_hat).float()
        if x_t is None or t is None:
            raise ValueError("the conditional discriminator needs x_t and t")
        k = x_hat.shape[0] // x_t.shape[0]
        b = x_t.shape[0]
        f_t = self.backbone(x_t, t, *(None if v is None else v[:b] for v in (prompt_embeds, pooled, time_ids)))
        if k > 1:
            f_t = f_t.repeat(k, 1, 1, 1)
        return self.head(torch.cat([f_t, f_hat], dim=1)).float()


def nonsaturating_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(real) - log(1 - D(fake)) with D = sigmoid(logit)."""
    return nn.functional.softplus(-real_logits).mean() + nn.functional.softplus(fake_logits).mean()


def nonsaturating_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(fake): the non-saturating generator loss."""
    return nn.functional.softplus(-fake_logits).mean()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

