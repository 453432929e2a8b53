"""The Stable Diffusion 1.5 family (`model.family: sd15`): `StableDiffusionPipeline`. One CLIP text encoder
whose last hidden state is the UNet's cross-attention input; no pooled embedding, no added conditioning;
the unconditional branch is the empty prompt's embedding (what the pipeline encodes for classifier-free
guidance without a negative prompt). Its toy is the miniature SDXL's VAE and UNet blocks with one text
encoder as wide as SDXL's two together."""

from __future__ import annotations

import torch

from .schedule import Conditioning, sdxl_scheduler

NAME = "sd15"
PIPELINE = "StableDiffusionPipeline"
VAE_KW: dict = {}  # the miniature's VAE as the zoo builds it
DENOISER = ("unet", "UNet2DConditionModel")  # its pipeline folder's denoiser: subfolder, diffusers class
COND_COLUMNS = ("prompt_embeds",)  # what `pipeline.encode` stores per row
UNCOND_COMPONENTS = ("tokenizer", "text_encoder")  # what `unconditional` reads of a teacher folder


def toy_text_encoders(cfg, tok, text_kw: dict) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel

    d = cfg.cross_attention_dim
    return dict(text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=d, intermediate_size=2 * d,
                                                          num_attention_heads=2, **text_kw)),
                tokenizer=tok)


def toy_denoiser(cfg, unet_kw: dict) -> dict:
    """The miniature's UNet and its scheduler (Euler, trailing, SDXL's betas)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**unet_kw)
    return dict(unet=unet, scheduler=sdxl_scheduler())


def make_pipeline(components: dict):
    """No safety checker (nothing to download; a distilled student is checked as its users choose): one
    in `components` (a loaded pipeline's) is dropped."""
    from diffusers import StableDiffusionPipeline

    parts = {k: v for k, v in components.items() if k not in ("safety_checker", "feature_extractor", "image_encoder")}
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


LOAD_KWARGS = {"safety_checker": None, "requires_safety_checker": False}


@torch.no_grad()
def _encode(pipe, captions: list[str]) -> torch.Tensor:
    pe, _ = pipe.encode_prompt(list(captions), device=pipe.device, num_images_per_prompt=1,
                               do_classifier_free_guidance=False)
    return pe


def encode_prompts(pipe, captions: list[str], resolution: int) -> Conditioning:
    """Through the pipeline's own `encode_prompt`; the unconditional embedding is the empty prompt's."""
    return Conditioning(_encode(pipe, captions), uncond=Conditioning(_encode(pipe, [""])))


def unconditional(folder, dtype=torch.float32) -> Conditioning:
    """The empty prompt's encoding (prompt embeddings [1, L, D]) from a pipeline folder's tokenizer and
    text encoder alone."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=te, tokenizer=tok, unet=None, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return Conditioning(_encode(pipe, [""]))
