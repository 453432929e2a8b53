"""The paper's metrics for non-toy runs (FID-Whole, FID-Patch, CLIP score through torchmetrics) with
tiny stand-in extractors built here (a TorchScript CNN for FID, a random tiny CLIP folder), and a
non-toy run's evaluation end to end: Parquet image/caption source -> stage 1 -> evaluate -> report."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import real_metrics
from pipeline.config import ConfigError, EvaluateConfig, load_config


class _Features(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)
        self.pool = torch.nn.AdaptiveAvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # uint8 [N, 3, H, W] -> [N, 64]
        return self.pool(torch.relu(self.conv(x.float() / 255.0))).flatten(1)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """(TorchScript FID extractor path, tiny CLIP folder): random weights, built from configs."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from pipeline.zoo import resolve_source

    d = tmp_path_factory.mktemp("stand_ins")
    torch.jit.script(_Features()).save(str(d / "features.pt"))
    tok = CLIPTokenizer.from_pretrained(str(resolve_source("builtin:toy_teacher") / "tokenizer"))
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16))
    model.save_pretrained(str(d / "clip"))
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(str(d / "clip"))
    return str(d / "features.pt"), str(d / "clip")


def _digits_uint8(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    from pipeline.data import load_digits

    d = load_digits("train", 32, 0.1, seed, n)
    return ((d.images + 1) * 127.5).round().to(torch.uint8), list(d.captions)


def test_real_metrics_with_stand_in_extractors(stand_ins):
    features, clip = stand_ins
    ev = EvaluateConfig(fid_extractor=features, clip_model=clip, patch_size=16)
    real, captions = _digits_uint8(64)
    other, _ = _digits_uint8(64, seed=1)  # other digits, same distribution
    noise = torch.randint(0, 256, real.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    same, close, far = (real_metrics.frechet(real, x, ev) for x in (real, other, noise))
    print(f"FID with the stand-in extractor: same images {same:.4f}, other digits {close:.4f}, noise {far:.4f}")
    assert abs(same) < 1e-3 and close < 0.2 * far
    assert real_metrics.centre_crop(real, 16).shape == (64, 3, 16, 16)
    s = real_metrics.score(real, captions, real, ev)
    assert abs(s["fid"]) < 1e-3 and abs(s["fid_patch"]) < 1e-3 and 0.0 <= s["clip_score"] <= 100.0
    flipped = real_metrics.clip_score(real, captions[::-1], ev)
    assert flipped != s["clip_score"]  # the prompts are read
    with pytest.raises(TypeError, match="uint8"):
        real_metrics.score(real.float(), captions, real, ev)


def test_real_metrics_config_errors_name_the_keys(stand_ins, tmp_path):
    features, clip = stand_ins
    with pytest.raises(ConfigError, match="fid_inception_weights / evaluate.fid_extractor"):
        real_metrics.check(EvaluateConfig(clip_model=clip, patch_size=16), 32)
    with pytest.raises(ConfigError, match="fid_inception_weights / evaluate.fid_extractor"):
        real_metrics.check(EvaluateConfig(fid_extractor=features, fid_inception_weights=features, clip_model=clip,
                                          patch_size=16), 32)
    with pytest.raises(ConfigError, match="evaluate.clip_model"):
        real_metrics.check(EvaluateConfig(fid_extractor=features, patch_size=16), 32)
    with pytest.raises(ConfigError, match="evaluate.fid_extractor: .* does not exist"):
        real_metrics.check(EvaluateConfig(fid_extractor=str(tmp_path / "nope.pt"), clip_model=clip, patch_size=16), 32)
    with pytest.raises(ConfigError, match="evaluate.patch_size"):
        real_metrics.check(EvaluateConfig(fid_extractor=features, clip_model=clip), 32)  # 299 px > 32 px
    inception = EvaluateConfig(fid_inception_weights=features, clip_model=clip, patch_size=16)  # any existing file
    if importlib.util.find_spec("torch_fidelity") is None:
        with pytest.raises(ConfigError, match="torch-fidelity"):
            real_metrics.check(inception, 32)
    else:
        real_metrics.check(inception, 32)
    # `distill` checks before it runs anything: not after hours of training
    from pipeline.dag import run_dag
    from pipeline.storage import RunStorage

    cfg = load_config("smoke", [f"run_root={tmp_path / 'run'}", "data.kind=parquet", f"data.path={tmp_path}/src",
                                "evaluate.patch_size=16"])
    with pytest.raises(ConfigError, match="evaluate.fid_inception_weights"):
        run_dag(cfg)
    assert RunStorage.from_config(cfg).read_manifest("encode") is None


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_non_toy_run_is_evaluated_with_fid_and_clip(ray_local, stand_ins, tmp_path, monkeypatch, request):
    """A Parquet image/caption source (one undecodable row), stage 1 trained and evaluated with the
    paper's metrics, and the report's table in those metrics. The run root is relative, as `make demo`'s:
    every output the manifests list is in it (Ray Train workers, which run elsewhere, once wrote them to
    their own cwd), and the DAG's end check sees a lost one."""
    from pipeline.dag import run_dag
    from pipeline.storage import RunStorage
    from reliability import record

    monkeypatch.chdir(tmp_path)

    features, clip = stand_ins
    real, captions = _digits_uint8(64)
    images = [_png(x.permute(1, 2, 0).numpy()) for x in real] + [b"not an image"]
    pq.write_table(pa.table({"image": images, "caption": captions + ["a handwritten digit one"]}),
                   str(tmp_path / "source.parquet"))
    cfg = load_config("smoke", ["run_root=run", "data.kind=parquet", f"data.path={tmp_path / 'source.parquet'}",
                                "evaluate.prompts=24", f"evaluate.fid_extractor={features}", f"evaluate.clip_model={clip}",
                                "evaluate.patch_size=16", "evaluate.unit_samples=10"])
    run_dag(cfg, until="1", log=lambda *_: None)
    storage = RunStorage.from_config(cfg)
    m = storage.read_json(f"{cfg.stage_dir(1)}/eval/metrics.json")
    for who in ("student", "teacher_same_steps", "teacher_32"):
        assert set(real_metrics.KEYS) <= set(m[who]) and m[who]["n"] == 24
        assert m[who]["fid"] > 0 and m[who]["fid_patch"] > 0 and 0 <= m[who]["clip_score"] <= 100
    assert m["student"]["fid"] != m["teacher_32"]["fid"]
    # the actor pool's units (24 prompts in 3 units, features extracted unit by unit and merged) give the
    # numbers one process gives for the same images
    from pipeline.evaluate import real_prompts, teacher_guidance
    from pipeline.images import to_uint8_nchw
    from pipeline.sampling import latent_shape, sample_captions
    from pipeline.zoo import load_pipeline, resolve_source

    teacher = load_pipeline(cfg.model.source)
    prompts = real_prompts(cfg, latent_shape(teacher))
    g = teacher_guidance(cfg, resolve_source(cfg.model.source))
    t32 = to_uint8_nchw(sample_captions(teacher, prompts.captions, prompts.noise, 32, g))
    one = real_metrics.score(t32, prompts.captions, prompts.real, cfg.evaluate)
    for k in real_metrics.KEYS:
        assert abs(one[k] - m["teacher_32"][k]) <= 1e-3 * max(1.0, abs(one[k])), (k, one[k], m["teacher_32"][k])
    report = (tmp_path / "run" / "report.md").read_text()
    assert "FID-Whole ↓" in report and "| **student 8step** | 8 |" in report
    assert (tmp_path / "run" / "report" / "grid.png").stat().st_size > 1000
    card = (tmp_path / "run" / cfg.stage_dir(1) / "model" / "README.md").read_text()
    assert "| clip_score |" in card and f"evaluation seed {cfg.evaluate.seed})" in card
    # the evaluation kept per seed, paired with the teacher's by benchmarks/eval_seeds.py (FID and CLIP on a
    # non-toy run)
    from benchmarks.eval_seeds import main as eval_seeds

    kept = storage.read_json(f"{cfg.stage_dir(1)}/eval/seeds/{cfg.evaluate.seed}.json")
    assert kept.pop("evaluation_key") and kept == m
    # a seed file left by an earlier student of the stage (another evaluation key) is not paired, and is named
    storage.write_json(f"{cfg.stage_dir(1)}/eval/seeds/7.json", {**m, "seed": 7, "evaluation_key": "earlier"})
    eval_seeds(["run", "--stage", "1", "--tolerance", "0.5", "--out", "seeds"])
    paired = json.loads((tmp_path / "seeds.json").read_text())
    assert paired["left_out"] == ["run: seed 7"]
    (row,) = paired["rows"]
    assert row["seed"] == cfg.evaluate.seed and row["fd_key"] == "fid" and row["acc_key"] == "clip_score"
    assert row["fd_margin"] == m["student"]["fid"] - m["teacher_same_steps"]["fid"]
    assert row["acc_margin"] == m["student"]["clip_score"] - (m["teacher_same_steps"]["clip_score"] - 0.5)
    # every output the stage's manifest lists is in the run root, named relative to it
    train_outputs = storage.read_manifest("train-1-8step")["outputs"]
    for name in ("history", "loss_curves", "tensorboard", "model", "checkpoint"):
        assert not Path(train_outputs[name]).is_absolute() and (tmp_path / "run" / train_outputs[name]).exists()
    # the DAG's own end check found every listed output (else run_dag raised); it does see a lost one
    assert storage.missing_outputs() == []
    lost = tmp_path / "run" / "report" / "grid.png"
    lost.rename(lost.with_suffix(".bak"))
    assert storage.missing_outputs() == ["report: report/grid.png"]
    lost.with_suffix(".bak").rename(lost)
    record(request, "an output a manifest lists is missing", "the DAG's end check raises, naming each missing "
           "output", injected=1, completed=1)
