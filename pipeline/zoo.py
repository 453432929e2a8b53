"""The model zoo: build the toy benchmark's miniature SDXL (or SD1.5, SD3) from a config with the real classes,
save it as a pipeline folder, and load any folder of a family padistill distils (tiny or real, local or
on S3, or a built-in name) through one function. Nothing here reaches the Hugging Face hub."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import family as families
from .data import DIGIT_WORDS
from .errors import ConfigError, MissingInputError
from .schedule import Conditioning, FlowMatchSchedule, Schedule, sdxl_scheduler  # noqa: F401 (sdxl_scheduler: re-exported)

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN = {
    # The shipped, trained toy teachers (DESIGN: "The toy benchmark"): digits, and Fashion-MNIST.
    "builtin:toy_teacher": ASSETS / "toy_teacher",
    "builtin:toy_fashion_teacher": ASSETS / "toy_fashion_teacher",
    # the Fashion-MNIST teachers of the SD1.5 (not shipped yet: `REGENERATE` trains it) and SD3 families
    "builtin:toy_fashion_teacher_sd15": ASSETS / "toy_fashion_teacher_sd15",
    "builtin:toy_fashion_teacher_sd3": ASSETS / "toy_fashion_teacher_sd3",
}
REGENERATE = {"builtin:toy_teacher": "padistill toy-teacher",
              "builtin:toy_fashion_teacher": "padistill toy-teacher --config toy_fashion",
              "builtin:toy_fashion_teacher_sd15": "padistill toy-teacher --config toy_fashion_sd15",
              "builtin:toy_fashion_teacher_sd3": "padistill toy-teacher --config toy_fashion_sd3"}
# Tiny pipelines with random weights, built on demand (seed 0): for smoke tests of the plumbing.
TINY_RANDOM = "builtin:tiny_random"
TINY_RANDOM_FAMILIES = {TINY_RANDOM: "sdxl", "builtin:tiny_random_sd15": "sd15", "builtin:tiny_random_sd3": "sd3"}

CAPTION_WORDS = ("a", "handwritten", "digit") + DIGIT_WORDS
PADISTILL_JSON = "padistill.json"


@dataclass
class ToyModelConfig:
    """Sizes of the miniature SDXL (DESIGN: VAE 32x32x3 -> 8x8x4, UNet ~2.6 M params, x-attn dim 96)."""

    resolution: int = 32
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 64, 64)
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_layers_per_block: int = 1
    attention_head_dim: int = 8
    text_hidden: tuple[int, int] = (32, 64)  # text_encoder, text_encoder_2: concat = cross_attention_dim
    text_layers: int = 2
    projection_dim: int = 32  # text_encoder_2's projection = pooled embedding size
    addition_time_embed_dim: int = 8
    max_length: int = 16  # tokenizer model_max_length (captions are 4 words)
    norm_num_groups: int = 16
    extra_words: tuple[str, ...] = field(default_factory=tuple)
    # the SD3 family's transformer (patch 2 on the latents; joint attention as wide as the text states)
    transformer_layers: int = 2
    transformer_heads: int = 4
    transformer_head_dim: int = 16

    @property
    def cross_attention_dim(self) -> int:
        return sum(self.text_hidden)


# ---- tokenizer ----------------------------------------------------------------------------------------
def _byte_unicode() -> list[str]:
    """GPT-2/CLIP byte-level symbols, in their standard order (printable bytes map to themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tokenizer_vocab_merges(words=CAPTION_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary of all 256 byte symbols (so any text tokenizes) plus merges that keep
    every word in `words` whole (one token id each)."""
    symbols = _byte_unicode()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for w in dict.fromkeys(words):
        chars = list(w[:-1]) + [w[-1] + "</w>"]
        cur = chars[0]
        for nxt in chars[1:]:
            merged = cur + nxt
            merges.append((cur, nxt))
            if merged not in vocab_list:
                vocab_list.append(merged)
            cur = merged
    merges = list(dict.fromkeys(merges))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_tokenizer(max_length: int = 16, words=CAPTION_WORDS):
    """CLIPTokenizer from vocab/merges *contents* (transformers 5 ignores `vocab_file=` here)."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_vocab_merges(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


# ---- components -----------------------------------------------------------------------------------------
def build_components(cfg: ToyModelConfig | None = None, seed: int = 0, family: str = "sdxl") -> dict:
    """Random-weight miniature of `family`: every class its real pipeline uses."""
    from diffusers import AutoencoderKL

    fam = families.module(family)
    cfg = cfg or ToyModelConfig()
    torch.manual_seed(seed)
    tok = build_tokenizer(cfg.max_length, CAPTION_WORDS + tuple(cfg.extra_words))
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text_kw = dict(vocab_size=len(tok), num_hidden_layers=cfg.text_layers, max_position_embeddings=cfg.max_length,
                   hidden_act="gelu", **ids)
    text = fam.toy_text_encoders(cfg, tok, text_kw)
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        block_out_channels=cfg.vae_channels, layers_per_block=1,
                        norm_num_groups=cfg.norm_num_groups, sample_size=cfg.resolution, **fam.VAE_KW)
    latent = cfg.resolution // 2 ** (n - 1)
    m = len(cfg.unet_channels)
    denoiser = fam.toy_denoiser(cfg, dict(
        sample_size=latent, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (m - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (m - 1) + ("UpBlock2D",),
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers_per_block,
        attention_head_dim=cfg.attention_head_dim, cross_attention_dim=cfg.cross_attention_dim,
        norm_num_groups=cfg.norm_num_groups, use_linear_projection=True, transformer_layers_per_block=1))
    return dict(vae=vae, **text, **denoiser)


def make_pipeline(components: dict):
    """Assemble the pipeline of the components' family (a transformer: SD3; two text encoders: SDXL; one: SD1.5)."""
    name = "sd3" if "transformer" in components else "sdxl" if "text_encoder_2" in components else "sd15"
    return families.module(name).make_pipeline(components)


def build_pipeline(cfg: ToyModelConfig | None = None, seed: int = 0, family: str = "sdxl"):
    return make_pipeline(build_components(cfg, seed, family))


def save_pipeline(pipe, folder: str | os.PathLike, info: dict | None = None) -> Path:
    """Save a pipeline folder (safetensors) plus `padistill.json` with `info`."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    if info is not None:
        (folder / PADISTILL_JSON).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return folder


def read_info(folder: str | os.PathLike) -> dict:
    p = Path(folder) / PADISTILL_JSON
    return json.loads(p.read_text()) if p.exists() else {}


# ---- loading ----------------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    return Path(os.environ.get("PADISTILL_CACHE", Path(tempfile.gettempdir()) / "padistill-cache"))


def _staging_dir(parent: Path) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=".staging-"))


def _not_a_pipeline(source: str) -> MissingInputError:
    return MissingInputError(f"model source {source!r} is not a diffusers pipeline folder (no model_index.json)")


def check_family(source: str, index: dict, family: str | None = None) -> str:
    """The family of a model source (its model_index.json, `index`); one padistill does not distil, or one
    other than the config's `family`, is a user's mistake said in one line."""
    cls = index.get("_class_name", "?")
    fam = families.name_of_index(index)
    if fam not in families.SUPPORTED:
        raise ConfigError(f"model.source: {source} is a {cls} (model family '{fam}'); padistill distils "
                          f"the {', '.join(families.SUPPORTED)} families today")
    if family is not None and family != fam:
        raise ConfigError(f"model.family: {family!r} but model.source {source} is a {cls} (family '{fam}')")
    return fam


def source_index(source: str, storage=None) -> dict:
    """A model source's model_index.json (an s3:// source is not downloaded for it: that file alone is
    read; a local or built-in one is resolved, which checks its family)."""
    return source_json(source, "model_index.json", storage)


def source_json(source: str, rel: str, storage=None) -> dict:
    """A JSON file of a model source (e.g. "transformer/config.json"), read without loading the model (an
    s3:// source: that file alone)."""
    if not source.startswith("s3://"):
        return json.loads((resolve_source(source, storage) / rel).read_text())
    from .storage import filesystem_for

    try:
        return json.loads(filesystem_for(source, storage).cat(source.rstrip("/") + "/" + rel))
    except FileNotFoundError:
        if rel == "model_index.json":
            raise _not_a_pipeline(source) from None
        raise


def family_module(cfg):
    """The family module (`pipeline.family_*`) of a run config's model: a source that is no pipeline folder, of a
    family padistill does not distil or not of `model.family` fails in one line (`check_family`), its stages checked
    against what the family supports (`family.check_stages`, which reads the denoiser's config when a stage
    sets the discriminator's block count). Called before any step's work (the DAG, `encode`, `trajectories`,
    `train-stage`)."""
    index = source_index(cfg.model.source, cfg.storage)
    name = check_family(cfg.model.source, index, cfg.model.family)
    module = families.get(name)
    denoiser = None
    if name == "sd3" and any(st.disc_blocks is not None for st in cfg.stages):
        rel = f"{module.DENOISER[0]}/config.json"
        try:
            denoiser = source_json(cfg.model.source, rel, cfg.storage)
        except FileNotFoundError:
            raise ConfigError(f"model.source: {cfg.model.source} has no {rel} (needed to check stages' "
                              "disc_blocks)") from None
    families.check_stages(name, cfg.stages, denoiser)
    return module


def resolve_source(source: str, storage=None) -> Path:
    """Turn a model source into a local pipeline folder.

    `builtin:toy_teacher` (shipped), `builtin:tiny_random` (built on demand), a local path or
    `file://` URI, or `s3://bucket/prefix` (downloaded once into the cache through `storage`'s
    credentials and endpoint; see `pipeline.storage.filesystem_for`)."""
    if source in BUILTIN:
        path = BUILTIN[source]
        if not (path / "model_index.json").exists():
            raise MissingInputError(f"{source} is not in this checkout ({path} has no model_index.json); "
                                    f"run `{REGENERATE[source]}` to train it")
        return path
    if source in TINY_RANDOM_FAMILIES:
        path = _cache_dir() / source[len("builtin:"):]
        if not (path / "model_index.json").exists():
            tmp = _staging_dir(_cache_dir())
            save_pipeline(build_pipeline(family=TINY_RANDOM_FAMILIES[source]), tmp,
                          {"num_inference_steps": 32, "guidance_scale": 0.0, "resolution": 32,
                           "stage": source[len("builtin:"):]})
            try:
                tmp.rename(path)
            except OSError:  # another process won the race; theirs is identical
                pass
        return path
    if source.startswith("s3://"):
        from .storage import filesystem_for

        fs = filesystem_for(source, storage)
        root = source.rstrip("/")
        # cached by the URL and what is there now (each object's name, size and ETag, one listing): a model
        # uploaded again to the same URL is fetched again, not served stale from an earlier fetch
        now = sorted((str(name)[len(root[5:]):], info.get("size"), str(info.get("ETag")))
                     for name, info in fs.find(root, detail=True).items())
        key = hashlib.sha1(json.dumps([source, now]).encode()).hexdigest()[:16]
        path = _cache_dir() / "s3" / key
        if not (path / "model_index.json").exists():
            tmp = _staging_dir(_cache_dir() / "s3")
            fs.get(source.rstrip("/") + "/", str(tmp), recursive=True)
            if not (tmp / "model_index.json").exists():
                raise _not_a_pipeline(source)
            tmp.rename(path)
    else:
        path = Path(source[len("file://"):] if source.startswith("file://") else source).expanduser()
        if not (path / "model_index.json").exists():
            raise _not_a_pipeline(source)
    check_family(source, json.loads((path / "model_index.json").read_text()))
    return path


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # model.dtype


def load_pipeline(source: str, storage=None, dtype=torch.float32, device="cpu"):
    """Load a pipeline folder (tiny or real) of a family padistill distils with its stock diffusers class."""
    import diffusers

    path = resolve_source(source, storage)
    fam = families.of_folder(path)
    none = {k: None for k in absent_components(json.loads((path / "model_index.json").read_text()))}
    pipe = getattr(diffusers, fam.PIPELINE).from_pretrained(path, dtype=dtype, **{**none, **fam.LOAD_KWARGS})
    return pipe.to(device)


def absent_components(index: dict) -> list[str]:
    """The components a model_index.json says the folder has none of ([null, null]) and that its pipeline
    class does not take as optional: `from_pretrained` wants them passed as None (an SD3 without T5:
    text_encoder_3, tokenizer_3)."""
    import diffusers

    optional = getattr(getattr(diffusers, index.get("_class_name", ""), None), "_optional_components", [])
    return [k for k, v in index.items() if not k.startswith("_") and v == [None, None] and k not in optional]


def load_denoiser(source: str, storage=None, dtype=torch.float32):
    """A pipeline folder's denoiser alone, with its family's class: the UNet, or SD3's transformer."""
    import diffusers

    path = resolve_source(source, storage)
    sub, cls = families.of_folder(path).DENOISER
    return getattr(diffusers, cls).from_pretrained(path, subfolder=sub, dtype=dtype)



def schedule_of(pipe_or_folder) -> Schedule | FlowMatchSchedule:
    """The schedule of a pipeline (or folder), from its scheduler config: `FlowMatchSchedule` for a
    `FlowMatchEulerDiscreteScheduler` (the SD3 family), else `Schedule` (Euler on its betas)."""
    if isinstance(pipe_or_folder, (str, os.PathLike)):
        cfg = json.loads((Path(pipe_or_folder) / "scheduler" / "scheduler_config.json").read_text())
    else:
        cfg = {**pipe_or_folder.scheduler.config, "_class_name": type(pipe_or_folder.scheduler).__name__}
    return schedule_of_config(cfg)


def schedule_of_config(cfg: dict) -> Schedule | FlowMatchSchedule:
    """The schedule of a scheduler config (a `scheduler_config.json`'s contents)."""
    if cfg.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        return FlowMatchSchedule.from_scheduler_config(cfg)
    return Schedule.from_scheduler_config(cfg)


def encode_prompts(pipe, captions: list[str], resolution: int | None = None) -> Conditioning:
    """Text conditioning of captions through the pipeline's own `encode_prompt` (its family's kind, with
    the family's unconditional branch)."""
    res = resolution or denoiser_of(pipe).config.sample_size * pipe.vae_scale_factor
    return families.of_pipeline(pipe).encode_prompts(pipe, captions, res)


def denoiser_of(pipe):
    """A pipeline's denoiser: its UNet, or its transformer (the SD3 family)."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def config_dict(cfg: ToyModelConfig) -> dict:
    return asdict(cfg)
