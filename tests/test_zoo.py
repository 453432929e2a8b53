"""The model zoo: a miniature SDXL with the real classes, saved and loaded with stock diffusers."""

import json

import numpy as np
import pytest
import torch

from pipeline import zoo
from pipeline.config import StorageConfig
from pipeline.storage import RunStorage


def test_tokenizer_keeps_caption_words_whole(tiny_pipeline):
    for tok in (tiny_pipeline.tokenizer, tiny_pipeline.tokenizer_2):
        ids = tok("a handwritten digit seven").input_ids
        toks = tok.convert_ids_to_tokens(ids)
        assert toks == ["<|startoftext|>", "a</w>", "handwritten</w>", "digit</w>", "seven</w>", "<|endoftext|>"]
        # every digit word is a single, distinct token
        word_ids = [tok(f"a handwritten digit {w}").input_ids[4] for w in zoo.DIGIT_WORDS]
        assert len(set(word_ids)) == 10 and tok.unk_token_id not in word_ids


def test_text_encoders_carry_tokenizer_special_ids(tiny_pipeline):
    tok = tiny_pipeline.tokenizer
    for te in (tiny_pipeline.text_encoder, tiny_pipeline.text_encoder_2):
        assert te.config.eos_token_id == tok.eos_token_id
        assert te.config.bos_token_id == tok.bos_token_id
        assert te.config.pad_token_id == tok.pad_token_id


def test_unet_is_sdxl_class(tiny_pipeline):
    cfg = tiny_pipeline.unet.config
    assert cfg.addition_embed_type == "text_time"
    assert cfg.cross_attention_dim == tiny_pipeline.text_encoder.config.hidden_size + \
        tiny_pipeline.text_encoder_2.config.hidden_size
    assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + \
        tiny_pipeline.text_encoder_2.config.projection_dim
    sched = tiny_pipeline.scheduler
    assert type(sched).__name__ == "EulerDiscreteScheduler" and sched.config.timestep_spacing == "trailing"
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.beta_end == pytest.approx(0.012)


def test_saved_pipeline_generates_with_stock_diffusers(tiny_pipeline_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    assert pipe.config.force_zeros_for_empty_prompt is True or pipe.config["force_zeros_for_empty_prompt"]
    img = pipe("a handwritten digit seven", num_inference_steps=4, guidance_scale=0,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (32, 32)
    arr = np.asarray(img)
    assert arr.shape == (32, 32, 3) and arr.std() > 0
    assert zoo.read_info(tiny_pipeline_dir)["resolution"] == 32


def test_prompts_change_conditioning(tiny_pipeline):
    c = zoo.encode_prompts(tiny_pipeline, ["a handwritten digit one", "a handwritten digit two"], resolution=32)
    assert c.prompt_embeds.shape == (2, 16, 96) and c.pooled.shape == (2, 32) and c.time_ids.shape == (2, 6)
    assert not torch.allclose(c.prompt_embeds[0], c.prompt_embeds[1])
    assert not torch.allclose(c.pooled[0], c.pooled[1])


def test_builtin_tiny_random_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("PADISTILL_CACHE", str(tmp_path))
    path = zoo.resolve_source(zoo.TINY_RANDOM)
    assert (path / "model_index.json").exists()
    assert zoo.resolve_source(zoo.TINY_RANDOM) == path  # cached, not rebuilt
    a = zoo.load_denoiser(str(path))
    b = zoo.build_components(seed=0)["unet"]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        zoo.resolve_source(str(tmp_path))


def test_load_from_s3(tiny_pipeline_dir, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PADISTILL_CACHE", str(tmp_path / "cache"))
    cfg = StorageConfig(endpoint_url=s3_endpoint)
    store = RunStorage("s3://padistill-test/models", cfg)
    store.put_dir(str(tiny_pipeline_dir), "tiny")
    pipe = zoo.load_pipeline(store.url("tiny"), cfg)
    ref = zoo.load_denoiser(str(tiny_pipeline_dir))
    for (k, p), q in zip(pipe.unet.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), k
    assert json.loads((zoo.resolve_source(store.url("tiny"), cfg) / "padistill.json").read_text())["stage"] == "tiny"


def test_an_s3_source_uploaded_again_is_fetched_again(tiny_pipeline_dir, s3_endpoint, tmp_path, monkeypatch,
                                                      request):
    """model.source on S3 is cached locally; a model uploaded again to the same URL (same names, new
    contents) is what the next resolve gives, not the earlier fetch."""
    import shutil

    monkeypatch.setenv("PADISTILL_CACHE", str(tmp_path / "cache"))
    cfg = StorageConfig(endpoint_url=s3_endpoint)
    store = RunStorage("s3://padistill-test/models", cfg)
    store.put_dir(str(tiny_pipeline_dir), "again")
    first = zoo.resolve_source(store.url("again"), cfg)
    assert zoo.resolve_source(store.url("again"), cfg) == first  # unchanged: the cached copy
    changed = tmp_path / "changed"
    shutil.copytree(tiny_pipeline_dir, changed)
    info = json.loads((changed / "padistill.json").read_text())
    (changed / "padistill.json").write_text(json.dumps({**info, "stage": "uploaded again"}))
    store.put_dir(str(changed), "again")
    second = zoo.resolve_source(store.url("again"), cfg)
    assert json.loads((second / "padistill.json").read_text())["stage"] == "uploaded again"
    from reliability import record

    record(request, "a base model uploaded again to the same S3 URL (model.source)", "fetched again: the local "
           "cache is keyed by the URL and each object's name, size and ETag (one listing a resolve), never "
           "served stale", injected=1, completed=1)
