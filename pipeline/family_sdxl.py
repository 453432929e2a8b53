"""The SDXL family (`model.family: sdxl`): `StableDiffusionXLPipeline`. Two CLIP text encoders whose last
hidden states are concatenated; text_encoder_2's projected pooled output and the size/crop time ids are
the UNet's `text_time` added conditioning; the unconditional branch is zeros
(`force_zeros_for_empty_prompt`). Its toy is DESIGN's miniature SDXL."""

from __future__ import annotations

import torch

from .schedule import Conditioning, sdxl_scheduler

NAME = "sdxl"
PIPELINE = "StableDiffusionXLPipeline"
VAE_KW: dict = {}  # the miniature's VAE as the zoo builds it
DENOISER = ("unet", "UNet2DConditionModel")  # its pipeline folder's denoiser: subfolder, diffusers class
COND_COLUMNS = ("prompt_embeds", "pooled_embeds")  # what `pipeline.encode` stores per row
UNCOND_COMPONENTS: tuple[str, ...] = ()  # zeros: nothing of a teacher folder to read


def toy_text_encoders(cfg, tok, text_kw: dict) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=cfg.text_hidden[0], intermediate_size=2 * cfg.text_hidden[0],
                                       num_attention_heads=2, **text_kw))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=cfg.text_hidden[1],
                                                     intermediate_size=2 * cfg.text_hidden[1],
                                                     num_attention_heads=2, projection_dim=cfg.projection_dim,
                                                     **text_kw))
    return dict(text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok)


def toy_denoiser(cfg, unet_kw: dict) -> dict:
    """The miniature's UNet and its scheduler (Euler, trailing, SDXL's betas)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**unet_kw, addition_embed_type="text_time",
                                addition_time_embed_dim=cfg.addition_time_embed_dim,
                                projection_class_embeddings_input_dim=6 * cfg.addition_time_embed_dim
                                + cfg.projection_dim)
    return dict(unet=unet, scheduler=sdxl_scheduler())


def make_pipeline(components: dict):
    """Zeros for the empty prompt, no watermarker."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)


LOAD_KWARGS = {"add_watermarker": False}


@torch.no_grad()
def encode_prompts(pipe, captions: list[str], resolution: int) -> Conditioning:
    """Through the pipeline's own `encode_prompt`."""
    pe, _, pooled, _ = pipe.encode_prompt(list(captions), device=pipe.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
    return Conditioning(pe, pooled, Conditioning.sdxl_time_ids(len(captions), resolution, pe.dtype, pe.device))


def unconditional(folder, dtype=torch.float32) -> None:
    """SDXL's unconditional branch is zeros: nothing to encode."""
    return None
