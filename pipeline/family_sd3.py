"""The Stable Diffusion 3 family (`model.family: sd3`): `StableDiffusion3Pipeline`. An `SD3Transformer2DModel` predicting the rectified-flow velocity
(`pipeline.schedule.FlowMatchSchedule`); two CLIP text encoders whose states, padded to the transformer's
joint-attention width, are followed by the T5 encoder's (zeros without one, as the pipeline allows) as the
prompt embeddings, and whose projected pooled outputs, concatenated, are `pooled_projections`; the
unconditional branch is the empty prompt's encoding, pooled embedding included. Its toy is the miniature's
VAE (with a latent shift of 0) and text encoders with a small transformer."""

from __future__ import annotations

import torch

from .schedule import Conditioning

NAME = "sd3"
PIPELINE = "StableDiffusion3Pipeline"
DENOISER = ("transformer", "SD3Transformer2DModel")  # its pipeline folder's denoiser: subfolder, diffusers class
COND_COLUMNS = ("prompt_embeds", "pooled_embeds")  # what `pipeline.encode` stores per row
# what `unconditional` reads (T5's parts when the folder has them: [null, null] in model_index.json when not)
UNCOND_COMPONENTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3")
VAE_KW = {"shift_factor": 0.0}  # the pipeline decodes latents / scaling_factor + shift_factor


def toy_text_encoders(cfg, tok, text_kw: dict) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    te = [CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=h, intermediate_size=2 * h, num_attention_heads=2,
                                                     projection_dim=cfg.projection_dim, **text_kw))
          for h in cfg.text_hidden]
    return dict(text_encoder=te[0], text_encoder_2=te[1], tokenizer=tok, tokenizer_2=tok,
                text_encoder_3=None, tokenizer_3=None)


def toy_denoiser(cfg, unet_kw: dict) -> dict:
    """An SD3 transformer on the miniature's latents (patch 2, joint attention as wide as the concatenated
    CLIP states; `transformer_layers` blocks of `transformer_heads` x `transformer_head_dim`), with SD3's
    rectified-flow scheduler (shift 3.0, SD3's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    side = unet_kw["sample_size"]
    tr = SD3Transformer2DModel(sample_size=side, patch_size=2, in_channels=cfg.latent_channels,
                               out_channels=cfg.latent_channels, num_layers=cfg.transformer_layers,
                               attention_head_dim=cfg.transformer_head_dim, num_attention_heads=cfg.transformer_heads,
                               joint_attention_dim=cfg.cross_attention_dim,
                               caption_projection_dim=cfg.transformer_heads * cfg.transformer_head_dim, pooled_projection_dim=2 * cfg.projection_dim,
                               pos_embed_max_size=side)
    return dict(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def make_pipeline(components: dict):
    from diffusers import StableDiffusion3Pipeline

    parts = {k: v for k, v in components.items() if k not in ("image_encoder", "feature_extractor")}
    return StableDiffusion3Pipeline(**{"text_encoder_3": None, "tokenizer_3": None, **parts})


LOAD_KWARGS: dict = {}


@torch.no_grad()
def _encode(pipe, captions: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    pe, _, pooled, _ = pipe.encode_prompt(list(captions), None, None, device=device or pipe.device,
                                          num_images_per_prompt=1, do_classifier_free_guidance=False)
    return pe, pooled


def encode_prompts(pipe, captions: list[str], resolution: int) -> Conditioning:
    """Through the pipeline's own `encode_prompt` (its default T5 length, zeros without a T5 encoder);
    the unconditional branch is the empty prompt's encoding, as the pipeline's without a negative prompt."""
    pe, pooled = _encode(pipe, captions)
    return Conditioning(pe, pooled, uncond=Conditioning(*_encode(pipe, [""])))



def unconditional(folder, dtype=torch.float32) -> Conditioning:
    """The empty prompt's encoding (prompt embeddings [1, L, D], pooled [1, P]) from a pipeline folder's text
    encoders and its transformer's config (the transformer on the meta device: no weights read): the two CLIP
    encoders, and T5 when the folder has one (its states for the empty prompt; without it the pipeline fills
    T5's part with zeros as wide as the transformer's joint attention). They load and encode on the CPU, once
    per guided stage's trajectories, in one Ray task (T5-XXL: ~9.5 GB of host memory in bf16 while it
    encodes), and are freed on return."""
    import json
    from pathlib import Path

    import transformers
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    index = json.loads((Path(folder) / "model_index.json").read_text())

    def part(name):  # a text encoder or tokenizer of the folder, by the class its model_index.json names
        cls = getattr(transformers, index[name][1])
        if name.startswith("tokenizer"):
            return cls.from_pretrained(folder, subfolder=name)
        return cls.from_pretrained(folder, subfolder=name, dtype=dtype)

    names = [n for n in UNCOND_COMPONENTS if (index.get(n) or [None])[0]]
    if "text_encoder" not in names or "text_encoder_2" not in names:
        raise ValueError(f"{folder}: an SD3 pipeline folder names text_encoder and text_encoder_2 in its "
                         "model_index.json (the unconditional branch is encoded with them)")
    parts = {n: part(n) for n in names}
    with torch.device("meta"):  # its config only: no weights are read
        tr = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(folder, subfolder="transformer"))
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=None, vae=None,
                                    **{"text_encoder_3": None, "tokenizer_3": None, **parts})
    return Conditioning(*_encode(pipe, [""], parts["text_encoder"].device))
