"""Model families (issue 17): Stable Diffusion 1.5 beside SDXL. Its prompts are encoded as the stock
`StableDiffusionPipeline` encodes them (no pooled embedding, the empty prompt as the unconditional
branch), padistill's sampler ends where the stock pipeline ends with classifier-free guidance on, and the
smoke DAG runs end to end on it: precompute, an MSE stage with a LoRA student and a guided teacher, an
adversarial x0 stage, evaluation, export and the report, every exported folder loading in the stock
pipeline and its LoRA in `load_lora_weights`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import family, zoo
from pipeline.config import from_dict, load_config
from pipeline.errors import ConfigError
from pipeline.schedule import unet_denoiser

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SD15 = "builtin:tiny_random_sd15"
SD3 = "builtin:tiny_random_sd3"


@pytest.fixture(scope="module")
def sd15_dir():
    return zoo.resolve_source(SD15)


@pytest.fixture(scope="module")
def sd15(sd15_dir):
    return zoo.load_pipeline(str(sd15_dir))


@torch.no_grad()
def test_sd15_prompts_and_unconditional_branch_are_the_pipelines(sd15, sd15_dir):
    """One text encoder's states, no pooled embedding or time ids; the unconditional embedding is what
    the stock pipeline encodes for guidance without a negative prompt (the empty prompt), also when read
    from the folder alone (as a guided stage's trajectories encode it, once per step); it is not zeros."""
    from diffusers import StableDiffusionPipeline

    assert type(sd15) is StableDiffusionPipeline and family.of_pipeline(sd15) is family.family_sd15
    cond = zoo.encode_prompts(sd15, ["a handwritten digit seven", "a handwritten digit one"])
    assert cond.prompt_embeds.shape == (2, 16, 96) and cond.pooled is None and cond.time_ids is None
    assert cond.added_cond_kwargs() is None
    _, negative = sd15.encode_prompt(["a handwritten digit seven"], device="cpu", num_images_per_prompt=1,
                                     do_classifier_free_guidance=True)
    assert cond.uncond.pooled is None
    torch.testing.assert_close(cond.uncond.prompt_embeds, negative, rtol=0, atol=0)
    torch.testing.assert_close(family.family_sd15.unconditional(sd15_dir).prompt_embeds, negative, rtol=0, atol=0)
    u = cond.unconditional()
    assert u.prompt_embeds.shape == (2, 16, 96) and u.prompt_embeds.abs().max() > 0.1
    # caption dropout (the toy teacher's): dropped rows get the empty prompt, kept rows their own
    d = cond.drop(torch.tensor([1.0, 0.0]))
    assert torch.equal(d.prompt_embeds[0], cond.prompt_embeds[0]) and torch.equal(d.prompt_embeds[1], negative[0])


@torch.no_grad()
@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_sd15_sampling_equals_the_stock_pipeline(sd15, guidance):
    """The stock StableDiffusionPipeline (Euler trailing, 4 steps) ends where padistill's 4-step sample
    ends, with classifier-free guidance off and on (where the unconditional branch is the family's)."""
    from pipeline.zoo import encode_prompts, schedule_of

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sd15("a handwritten digit seven", num_inference_steps=4, guidance_scale=guidance, height=32, width=32,
               latents=latents.clone(), output_type="latent").images
    cond = encode_prompts(sd15, ["a handwritten digit seven"])
    ours = schedule_of(sd15).sample(unet_denoiser(sd15.unet, cond, guidance), latents, 4)
    assert torch.allclose(out, ours, atol=1e-5), (out - ours).abs().max()


@torch.no_grad()
def test_sd15_teacher_rollout_with_guidance_from_s3_uses_the_empty_prompt(sd15, sd15_dir, s3_endpoint, tmp_path):
    """A guided SD1.5 teacher on S3, loaded with its unconditional branch encoded from the folder's text encoders
    (`Teacher.load`'s default; the trajectories step does the same once, in one task), rolls out exactly what the stock pipeline's own encodings
    give: the empty prompt as the unconditional branch (with zeros instead the targets differ)."""
    from pipeline.config import StorageConfig
    from pipeline.schedule import Conditioning
    from pipeline.storage import RunStorage
    from pipeline.trajectories import Teacher

    store = RunStorage("s3://padistill-test/families-teacher", StorageConfig(endpoint_url=s3_endpoint))
    store.put_dir(str(sd15_dir), "sd15")
    cfg = load_config("smoke", [f"model.source={store.url('sd15')}", f"storage.endpoint_url={s3_endpoint}",
                                f"run_root={tmp_path / 'run'}"])
    teacher = Teacher.load(cfg, 1)
    assert cfg.stages[0].guidance_scale == 2.0 and teacher.uncond is not None
    cond = zoo.encode_prompts(sd15, ["a handwritten digit seven", "a handwritten digit one"])
    pair = teacher.pairs[0]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x_t, target = teacher.rollout(latents, noise, pair, {"prompt_embeds": cond.prompt_embeds})
    path = teacher.schedule.teacher_path(teacher.stage.teacher_steps, pair.t, pair.t_next)
    ref = teacher.schedule.rollout(unet_denoiser(sd15.unet, cond, 2.0), x_t, path, pair.t_next)
    torch.testing.assert_close(target, ref, rtol=0, atol=1e-5)
    zeros = teacher.schedule.rollout(unet_denoiser(sd15.unet, Conditioning(cond.prompt_embeds), 2.0), x_t, path,
                                     pair.t_next)
    assert (zeros - ref).abs().max() > 1e-3


def test_export_gives_students_euler_whatever_scheduler_the_teacher_shipped(sd15_dir, tmp_path):
    """Stable Diffusion 1.5 ships PNDM, which cannot sample an x0 (`prediction_type="sample"`) model: an
    export's folder gets Euler with trailing timesteps on the teacher's betas, named in model_index.json,
    and the stock pipeline samples the 1-step student with it."""
    import shutil

    from diffusers import EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline

    from pipeline.student import student_scheduler

    folder = tmp_path / "student"
    shutil.copytree(sd15_dir, folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   skip_prk_steps=True, steps_offset=1)
    pipe.save_pretrained(folder)
    assert json.loads((folder / "model_index.json").read_text())["scheduler"][1] == "PNDMScheduler"
    student_scheduler(folder, "sample")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert type(pipe.scheduler) is EulerDiscreteScheduler
    c = pipe.scheduler.config
    assert (c.timestep_spacing, c.prediction_type, c.beta_start, c.beta_end) == ("trailing", "sample", 0.00085, 0.012)
    img = pipe("a handwritten digit seven", num_inference_steps=1, guidance_scale=0, output_type="np").images
    assert img.shape == (1, 32, 32, 3)


def test_model_family_stays_out_of_the_training_hash(tmp_path):
    """model.family is fixed by the source: a run root trained before the key existed (or with it unset)
    stays finished when the key is set to the source's family."""
    from pipeline.storage import RunStorage, hash_json
    from pipeline.train import train_inputs

    def h(sets):
        cfg = load_config("smoke", [f"run_root={tmp_path / 'run'}", *sets])
        return hash_json(train_inputs(cfg, 1, RunStorage.from_config(cfg)))

    assert h([]) == h(["model.family=sdxl"])


def test_model_family_is_read_from_the_source_and_checked(tmp_path):
    """model.family defaults to the source's family; set to another, the config fails naming both; a family
    padistill does not distil is refused by name, and so are stage settings the SD3 family does not support
    (the x0 conversion, the plain-CNN D, a guided stage on a folder with a T5 encoder)."""
    assert zoo.family_module(load_config("smoke", [f"model.source={SD15}"])) is family.family_sd15
    assert zoo.family_module(load_config("smoke", [])) is family.family_sdxl
    with pytest.raises(ConfigError, match=r"model.family: 'sdxl' but model.source builtin:tiny_random_sd15 is a "
                                          r"StableDiffusionPipeline \(family 'sd15'\)"):
        zoo.family_module(load_config("smoke", [f"model.source={SD15}", "model.family=sdxl"]))
    with pytest.raises(ConfigError, match="'flux' is not distilled by padistill today"):
        family.get("flux")
    velocity = ["stages.2.prediction_type=epsilon", "stages.2.conversion_steps=0"]  # the model's own prediction
    assert zoo.family_module(load_config("smoke", [f"model.source={SD3}", *velocity])) is family.family_sd3
    with pytest.raises(ConfigError, match=r"stages\[2\].prediction_type: 'sample' \(the x0 conversion\) is for UNet"):
        zoo.family_module(load_config("smoke", [f"model.source={SD3}"]))
    with pytest.raises(ConfigError, match=r"stages\[1\].disc_backbone: 'cnn' is for UNet families"):
        zoo.family_module(load_config("smoke", [f"model.source={SD3}", "stages.1.disc_backbone=cnn", *velocity]))
    # D's block count: checked against the source's transformer (the tiny one has 2 blocks), refused on a UNet
    assert zoo.family_module(load_config("smoke", [f"model.source={SD3}", "stages.1.disc_blocks=1", *velocity])) \
        is family.family_sd3
    with pytest.raises(ConfigError, match=r"stages\[1\].disc_blocks: 2, but the transformer has 2 blocks; D copies "
                                          r"1 to 1 of them"):
        zoo.family_module(load_config("smoke", [f"model.source={SD3}", "stages.1.disc_blocks=2", *velocity]))
    with pytest.raises(ConfigError, match=r"stages\[1\].disc_blocks: for transformer families \(sd3\); a sd15"):
        zoo.family_module(load_config("smoke", [f"model.source={SD15}", "stages.1.disc_blocks=1"]))


def save_tiny_sd3_with_t5(folder):
    """The tiny SD3 with a third text encoder: a tiny T5 encoder (as wide as the transformer's joint attention, as
    SD3's T5-XXL is) and a T5 tokenizer of a small unigram vocabulary, saved as a pipeline folder."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pipe = zoo.build_pipeline(family="sd3")
    width = pipe.transformer.config.joint_attention_dim
    words = ["a", "handwritten", "digit", "seven", "one", "photo", "of"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *[("\u2581" + w, -1.0) for w in words],
             *[(c, -5.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz"]]
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=width, d_kv=8, d_ff=2 * width, num_layers=1,
                                 num_heads=2))
    full = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": t5,
                                       "tokenizer_3": T5Tokenizer(vocab=vocab, extra_ids=0)})
    return zoo.save_pipeline(full, folder)


def test_sd3_with_a_t5_encoder_distils_guided_stages_its_unconditional_branch_holds_t5s_states(tmp_path):
    """An SD3 base model with a T5 encoder (SD3.5 as published): a guided stage is accepted, and the unconditional
    branch the trajectories build from the folder's text encoders (`unconditional`, the transformer on the meta
    device) is the stock pipeline's own encoding of the empty prompt, T5's states included (not zeros), the
    same as encode's unconditional branch; the tokens the prompts are encoded to hold T5's part too."""
    from diffusers import StableDiffusion3Pipeline

    folder = save_tiny_sd3_with_t5(tmp_path / "sd3_t5")
    velocity = ["stages.2.prediction_type=epsilon", "stages.2.conversion_steps=0"]
    cfg = load_config("smoke", [f"model.source={folder}", *velocity])
    assert cfg.stages[0].guidance_scale > 1 and zoo.family_module(cfg) is family.family_sd3
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)  # the stock pipeline, T5 loaded
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    with torch.no_grad():
        stock, _, stock_pooled, _ = pipe.encode_prompt("", None, None, do_classifier_free_guidance=False)
    ours = family.family_sd3.unconditional(folder)
    torch.testing.assert_close(ours.prompt_embeds, stock)
    torch.testing.assert_close(ours.pooled, stock_pooled)
    clip = pipe.tokenizer.model_max_length  # CLIP's tokens, then T5's 256
    assert stock.shape[1] == clip + 256 and stock[:, clip:].abs().sum() > 0  # T5's states for the empty prompt
    enc = family.family_sd3.encode_prompts(zoo.load_pipeline(str(folder)), ["a handwritten digit seven"], 32)
    torch.testing.assert_close(enc.uncond.prompt_embeds, ours.prompt_embeds)
    assert enc.prompt_embeds.shape == stock.shape and enc.prompt_embeds[:, clip:].abs().sum() > 0


def test_an_s3_teacher_is_fetched_with_its_text_encoders_only_to_encode_a_guided_stages_branch(s3_endpoint, tmp_path):
    """An SD3 teacher with a T5 encoder on S3 (SD3.5 as published, where T5-XXL alone is ~9.5 GB): the training
    workers, and an unguided stage's trajectory actors for their teacher (the previous stage's export), fetch
    only the transformer, scheduler and model_index.json; a guided stage's unconditional branch
    (`unconditional_branch`, encoded once per step) fetches the text encoders too, T5's included, and is the
    branch the local folder gives; once that copy is cached, a fetch without the text parts is served from it
    (no second download). A guided stage's teacher handed the branch, as each trajectory actor is, needs no
    text encoder: it loads from a copy of the teacher that has none."""
    from pipeline.stage_models import fetch_teacher
    from pipeline.storage import RunStorage
    from pipeline.trajectories import Teacher

    folder = save_tiny_sd3_with_t5(tmp_path / "sd3_t5")
    velocity = ["stages.2.prediction_type=epsilon", "stages.2.conversion_steps=0"]
    source = "s3://padistill-test/teachers/sd3_t5"
    cfg = load_config("smoke", [f"model.source={source}", f"storage.endpoint_url={s3_endpoint}",
                                "run_root=s3://padistill-test/fetch-run", *velocity])
    st = RunStorage.from_config(cfg)
    st.fs.put(str(folder) + "/", source[len("s3://"):], recursive=True)
    st.put_dir(str(folder), cfg.stage_dir(1) + "/model")  # stage 1's export: stage 2's (unguided) teacher

    bare = fetch_teacher(source, cfg)  # what a training worker fetches
    assert sorted(p.name for p in bare.iterdir()) == ["model_index.json", "scheduler", "transformer"]
    torch.testing.assert_close(zoo.load_denoiser(str(bare)).state_dict(), zoo.load_denoiser(str(folder)).state_dict())

    assert cfg.stages[0].guidance_scale > 1 and cfg.stages[1].guidance_scale <= 1
    unguided = Teacher.load(cfg, 2, st)  # its teacher: stage 1's export, fetched without its text encoders
    assert unguided.uncond is None
    export = fetch_teacher(st.url(cfg.stage_dir(1), "model"), cfg)  # the cached folder Teacher.load used
    assert sorted(p.name for p in export.iterdir()) == ["model_index.json", "scheduler", "transformer"]
    guided = Teacher.load(cfg, 1, st)
    with_text = fetch_teacher(source, cfg, text=True)  # the guided teacher's cached folder
    assert {"text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer_3"} <= {p.name for p in with_text.iterdir()}
    assert fetch_teacher(source, cfg) == with_text  # from now on it serves the training workers too: no 2nd copy
    ours = family.family_sd3.unconditional(folder)
    torch.testing.assert_close(guided.uncond.prompt_embeds, ours.prompt_embeds)
    torch.testing.assert_close(guided.uncond.pooled, ours.pooled)

    bare_source = "s3://padistill-test/teachers/sd3_t5_bare"  # the teacher without its text encoders
    for sub in ("transformer", "scheduler", "model_index.json"):
        st.fs.put(str(folder / sub) + ("/" if sub != "model_index.json" else ""),
                  f"{bare_source[len('s3://'):]}/{sub}", recursive=True)
    bare_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"source": bare_source})})
    handed = Teacher.load(bare_cfg, 1, st, uncond=guided.uncond)  # as `TrajectoryWorker` loads it
    assert handed.uncond is guided.uncond and handed.stage.guidance_scale > 1
    torch.testing.assert_close(handed.unet.state_dict(), guided.unet.state_dict())


def test_new_text_encoders_beside_the_same_transformer_invalidate_only_a_guided_stages_trajectories(s3_endpoint,
                                                                                                   tmp_path):
    """The unconditional branch of a guided SD3 stage is encoded from the teacher's text encoders, so their files
    are part of that stage's trajectory inputs (`teacher_files`) and of the cached copy's key: a base model on S3
    uploaded again with other text encoders and the same transformer is fetched again and gives another branch,
    the guided first stage's trajectories are no longer the finished ones, and the unguided second stage's (its
    teacher stage 1's export) are. A manifest from before the text encoders counted stays finished (the swap
    before the upgrade goes unnoticed: the alternative re-rolls every guided stage of an upgraded run)."""
    from transformers import CLIPTextModelWithProjection

    from pipeline.stage_models import fetch_teacher, teacher_fingerprint
    from pipeline.storage import RunStorage
    from pipeline.shards import inputs_hash
    from pipeline.trajectories import _legacy_finished, trajectory_inputs, unconditional_branch

    folder = zoo.save_pipeline(zoo.build_pipeline(family="sd3"), tmp_path / "sd3")
    source = "s3://padistill-test/teachers/sd3_text_swap"
    cfg = load_config("smoke", [f"model.source={source}", f"storage.endpoint_url={s3_endpoint}",
                                "run_root=s3://padistill-test/text-swap-run", "stages.2.prediction_type=epsilon",
                                "stages.2.conversion_steps=0"])
    st = RunStorage.from_config(cfg)
    st.fs.put(str(folder) + "/", source[len("s3://"):], recursive=True)
    st.put_dir(str(folder), cfg.stage_dir(1) + "/model")
    enc = {"inputs_hash": "encoded", "finished_at": "then"}
    assert cfg.stages[0].guidance_scale > 1 and cfg.stages[1].guidance_scale <= 1
    before = {k: trajectory_inputs(cfg, k, st, enc) for k in (1, 2)}
    assert any(f.startswith("text_encoder/") for f in before[1]["teacher_files"])
    assert not any(f.startswith("text_encoder") for f in before[2]["teacher_files"])
    uncond, copy = unconditional_branch(cfg, 1, st), fetch_teacher(source, cfg, text=True)

    te = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder")
    with torch.no_grad():
        for p in te.parameters():
            p.add_(0.05)
    te.save_pretrained(tmp_path / "te")
    st.fs.put(str(tmp_path / "te") + "/", f"{source[len('s3://'):]}/text_encoder", recursive=True)
    st.put_dir(str(tmp_path / "te"), cfg.stage_dir(1) + "/model/text_encoder")  # stage 2's (unguided) teacher too

    text = family.family_sd3.UNCOND_COMPONENTS
    bare = {f: v for f, v in before[1]["teacher_files"].items() if f.split("/", 1)[0] not in text}
    assert teacher_fingerprint(source, cfg) == bare
    after = {k: trajectory_inputs(cfg, k, st, enc) for k in (1, 2)}
    assert after[1] != before[1] and after[2] == before[2]
    # a manifest written before the text encoders counted (denoiser and scheduler files alone) stays finished
    # while those are today's; one that fingerprinted the text encoders does not once they change
    legacy = {**before[1], "teacher_files": bare}
    assert _legacy_finished({"inputs": legacy, "inputs_hash": inputs_hash(legacy)}, before[1])
    assert _legacy_finished({"inputs": legacy, "inputs_hash": inputs_hash(legacy)}, after[1])
    assert not _legacy_finished({"inputs": before[1], "inputs_hash": inputs_hash(before[1])}, after[1])
    assert fetch_teacher(source, cfg, text=True) != copy  # fetched again, not served stale
    assert fetch_teacher(source, cfg) == fetch_teacher(source, cfg, text=True)  # the new copy serves both
    assert not torch.allclose(unconditional_branch(cfg, 1, st).prompt_embeds, uncond.prompt_embeds)


def smoke_toy_teacher(tmp_path, family_name: str, pipeline_class: str):
    """The toy-teacher job's smoke preset for `family_name` (the CLI, as a user runs it), into tmp_path/teacher:
    the folder and its padistill.json, the folder checked to be of `pipeline_class`."""
    from jobs.cli import main

    teacher = tmp_path / "teacher"
    assert main(["toy-teacher", "--config", "smoke", "--output", str(teacher), "--set", f"run_root={tmp_path / 'tt'}",
                 "--set", f"toy_teacher.family={family_name}"]) == 0
    assert json.loads((teacher / "model_index.json").read_text())["_class_name"] == pipeline_class
    return teacher, json.loads((teacher / "padistill.json").read_text())


def test_sd15_toy_teacher_and_smoke_dag_end_to_end(ray_local, tmp_path):
    """The toy-teacher job trains a miniature SD1.5 (smoke size, on the digits: its Fashion-MNIST preset encodes
    the 60,000 train photos, minutes on 2 cores), and the smoke DAG distils
    it, shortened to two stages that cover what differs from SDXL: a 32 -> 8 MSE stage whose student is a
    LoRA and whose teacher runs with guidance (the empty prompt as its unconditional branch), and an 8 -> 1
    adversarial stage (x0 conversion, conditional then unconditional discriminator on the SD1.5 UNet's
    encoder, which has no added conditioning). Encode stores no pooled embedding; every exported folder loads
    in the stock StableDiffusionPipeline and generates; the LoRA file loads on the teacher with
    `load_lora_weights` and gives the merged student's output."""
    from diffusers import StableDiffusionPipeline

    from lora_checks import assert_lora_loads_like_merged
    from pipeline.dag import run_dag
    from pipeline.storage import RunStorage
    from pipeline.student import LORA_WEIGHT_NAME

    teacher, info = smoke_toy_teacher(tmp_path, "sd15", "StableDiffusionPipeline")
    assert info["dataset"] == "toy_digits" and info["guidance_scale"] == 2.0

    data = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    data["run_root"] = str(tmp_path / "run")
    data["model"].update(source=str(teacher), family="sd15")
    first, _, last = data["stages"]
    first.update(lora={"rank": 4, "steps": first["mse_steps"]})
    last.update(teacher_steps=8)
    data["stages"] = [first, last]
    cfg = from_dict(data)
    run_dag(cfg, log=lambda *_: None)
    storage = RunStorage.from_config(cfg)
    assert storage.read_manifest("encode")["outputs"]["columns"] == \
        ["id", "caption", "latent", "prompt_embeds", "schema_version"]
    assert "pooled_embeds" not in storage.read_manifest("trajectories-1-8step")["outputs"]["columns"]
    assert_guided_rows_use_the_empty_prompt(cfg, storage)
    report = storage.read_text("report.md")
    prompt = "a handwritten digit seven"
    for k, st in enumerate(cfg.stages, start=1):
        folder = Path(storage.path(cfg.stage_dir(k), "model"))
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
        assert "StableDiffusionPipeline.from_pretrained" in (folder / "README.md").read_text()
        assert f"**student {st.name}**" in report
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        assert pipe.scheduler.config.prediction_type == ("sample" if st.prediction_type == "sample" else "epsilon")
        img = pipe(prompt, num_inference_steps=st.student_steps, guidance_scale=0,
                   generator=torch.Generator().manual_seed(0)).images[0]
        assert img.size == (32, 32)
    lora_folder = Path(storage.path(cfg.stage_dir(1), "model"))
    assert (lora_folder / LORA_WEIGHT_NAME).exists()
    assert_lora_loads_like_merged(str(teacher), lora_folder, prompt, min_change=1e-4)


def test_sd3_toy_teacher_and_smoke_dag_end_to_end(ray_local, tmp_path):
    """The toy-teacher job trains a miniature Stable Diffusion 3 (SD3Transformer2DModel, two CLIP encoders and no
    T5, FlowMatchEulerDiscreteScheduler shift 3.0; smoke size, on the digits) on the rectified-flow velocity, and
    the smoke DAG distils it, shortened to two stages that cover what differs from the UNet families: a 32 -> 8 MSE stage whose student is a transformer LoRA and whose teacher runs with
    guidance (the empty prompt's encoding, pooled embedding included, as its unconditional branch), and an
    8 -> 1 adversarial stage at the 1-step student's four noise levels with re-noising, its discriminator
    the transformer's first blocks. The trajectories' noise levels are float sigmas on the stock grids;
    every exported folder keeps the flow-matching scheduler, loads in the stock StableDiffusion3Pipeline and
    generates; the LoRA file loads on the teacher with `load_lora_weights` and gives the merged student's
    output."""
    from diffusers import StableDiffusion3Pipeline

    from lora_checks import assert_lora_loads_like_merged
    from pipeline.dag import run_dag
    from pipeline.schedule import FlowMatchSchedule
    from pipeline.storage import RunStorage
    from pipeline.student import LORA_WEIGHT_NAME
    from pipeline.trajectories import read_trajectories

    teacher, info = smoke_toy_teacher(tmp_path, "sd3", "StableDiffusion3Pipeline")
    assert info["prediction_type"] == "flow" and info["guidance_scale"] == 2.0
    data = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    data["run_root"] = str(tmp_path / "run")
    data["model"].update(source=str(teacher))
    first, _, last = data["stages"]
    first.update(lora={"rank": 4, "steps": first["mse_steps"]})
    last.update(teacher_steps=8)
    for k in ("prediction_type", "conversion_steps", "conversion_lr"):
        last.pop(k)
    data["stages"] = [first, last]
    cfg = from_dict(data)
    run_dag(cfg, log=lambda *_: None)
    storage = RunStorage.from_config(cfg)
    fm = FlowMatchSchedule(shift=3.0)
    for k, st in enumerate(cfg.stages, start=1):
        rows = read_trajectories(storage, cfg, k, ["t", "t_next"]).to_pydict()
        pairs = {(p.t, p.t_next) for p in fm.stage_pairs(st.student_steps, st.multi_timestep)}
        assert {(a, b) for a, b in zip(rows["t"], rows["t_next"])} <= {tuple(np.float32(v) for v in p) for p in pairs}
        assert len(set(rows["t"])) > 1
    assert "pooled_embeds" in storage.read_manifest("trajectories-1-8step")["outputs"]["columns"]
    assert_guided_rows_use_the_empty_prompt(cfg, storage)
    report = storage.read_text("report.md")
    prompt = "a handwritten digit seven"
    for k, st in enumerate(cfg.stages, start=1):
        folder = Path(storage.path(cfg.stage_dir(k), "model"))
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
        assert f"**student {st.name}**" in report
        card = (folder / "README.md").read_text()  # no T5: the card says to pass it as None
        assert 'StableDiffusion3Pipeline.from_pretrained("<this folder>", text_encoder_3=None, tokenizer_3=None)' in card
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
        assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 3.0
        img = pipe(prompt, num_inference_steps=st.student_steps, guidance_scale=0, height=32, width=32,
                   generator=torch.Generator().manual_seed(0)).images[0]
        assert img.size == (32, 32)
    lora_folder = Path(storage.path(cfg.stage_dir(1), "model"))
    assert (lora_folder / LORA_WEIGHT_NAME).exists()
    assert_lora_loads_like_merged(str(teacher), lora_folder, prompt, min_change=1e-4)


@torch.no_grad()
def assert_guided_rows_use_the_empty_prompt(cfg, storage):
    """The guided first stage's stored targets (rolled out by the actors, which load no text encoder: the step
    encodes the unconditional branch once and hands it to them) equal this process's rollout of the same
    rows with the empty prompt's encoding as the unconditional branch, and not with zeros."""
    from pipeline import trajectories as tj
    from pipeline.storage import table_to_tensors

    teacher = tj.Teacher.load(cfg, 1)  # encodes the branch here, from the teacher's text encoders
    assert teacher.uncond is not None and teacher.stage.guidance_scale > 1
    rows = table_to_tensors(tj.read_trajectories(storage, cfg, 1))
    enc = table_to_tensors(storage.read_table("encoded"))
    ids = list(enc["id"])
    pairs = {(np.float32(p.t), np.float32(p.t_next)): p for p in teacher.pairs}
    gaps, uncond = [], teacher.uncond
    for r in (0, 17, 40):
        e = ids.index(rows["id"][r])
        noise = tj.draw_noise(tj.draw_seed(rows["id"][r], int(rows["draw"][r]), cfg.trajectories.seed)[0],
                              enc["latent"][e].shape)[None]
        text = {c: torch.from_numpy(enc[c][e][None].astype(np.float32)) for c in tj.text_columns(enc)}
        latent = torch.from_numpy(enc["latent"][e][None].astype(np.float32))
        pair = pairs[(rows["t"][r], rows["t_next"][r])]
        _, target = teacher.rollout(latent, noise, pair, text)
        stored = torch.from_numpy(rows["target"][r].astype(np.float32))
        torch.testing.assert_close(stored, target[0], rtol=1e-3, atol=1e-3)  # fp16 storage
        teacher.uncond = None
        zeros = teacher.rollout(latent, noise, pair, text)[1]
        teacher.uncond = uncond
        gaps.append(float((zeros[0] - stored).abs().max()))
    assert max(gaps) > 2e-2, gaps  # zeros as the unconditional branch would give other targets


@torch.no_grad()
@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_sd3_prompts_and_flow_matching_sampling_equal_the_stock_pipeline(guidance):
    """The SD3 family: a tiny StableDiffusion3Pipeline
    built by the zoo (SD3Transformer2DModel, two CLIP encoders, no T5, shift 3.0) is encoded through its own
    `encode_prompt` (the empty prompt's encoding, pooled embedding included, as the unconditional branch), and
    padistill's flow-matching schedule with the transformer's call ends where the stock pipeline ends, with
    classifier-free guidance off and on."""
    from diffusers import StableDiffusion3Pipeline

    from pipeline.schedule import FlowMatchSchedule

    pipe = zoo.build_pipeline(family="sd3")
    assert type(pipe) is StableDiffusion3Pipeline and family.of_pipeline(pipe) is family.family_sd3
    sched = zoo.schedule_of(pipe)
    assert isinstance(sched, FlowMatchSchedule) and sched.shift == 3.0
    cond = zoo.encode_prompts(pipe, ["a handwritten digit seven"])
    _, neg, _, neg_pooled = pipe.encode_prompt(["a handwritten digit seven"], None, None, device="cpu",
                                               do_classifier_free_guidance=True)
    torch.testing.assert_close(cond.uncond.prompt_embeds, neg, rtol=0, atol=0)
    torch.testing.assert_close(cond.uncond.pooled, neg_pooled, rtol=0, atol=0)
    assert cond.time_ids is None and cond.pooled.shape == (1, 64)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe("a handwritten digit seven", num_inference_steps=4, guidance_scale=guidance, height=32, width=32,
               latents=latents.clone(), output_type="latent").images
    ours = sched.sample(unet_denoiser(pipe.transformer, cond, guidance), latents, 4)
    assert torch.allclose(out, ours, atol=1e-5), (out - ours).abs().max()


def test_sd3_discriminator_backbone_is_the_frozen_teachers_first_blocks_trained_whole():
    """The SD3 family's discriminator, built as the trainer builds D: from
    a frozen teacher. Its backbone is the transformer's first half: its features are the image tokens the
    teacher itself has after those blocks (laid out on the patch grid), its weights train although the
    teacher's are frozen, the logits depend on the prompt, every weight that trains gets a gradient (the last copied block's text-token
    outputs, which feed nothing, are frozen), and both D kinds score a batch."""
    from pipeline.discriminator import Discriminator, TransformerBackbone

    pipe = zoo.build_pipeline(family="sd3")
    teacher = pipe.transformer.requires_grad_(False).eval()
    d = Discriminator(teacher, conditional=True)
    assert isinstance(d.backbone, TransformerBackbone) and len(d.backbone.transformer_blocks) == 1
    trained = [p for p in d.backbone.parameters() if p.requires_grad]
    dead = ("attn.add_q_proj.", "attn.norm_added_q.", "attn.to_add_out.", "norm2_context.", "ff_context.")
    assert {n.split(".", 1)[1].startswith(dead) for n, p in d.backbone.transformer_blocks.named_parameters()
            if not p.requires_grad} == {True}  # only the last block's dead text outputs are frozen
    cond = zoo.encode_prompts(pipe, ["a handwritten digit seven", "a handwritten digit one"])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([750.0, 250.0])
    seen = {}
    hook = teacher.transformer_blocks[0].register_forward_hook(lambda m, a, out: seen.setdefault("h", out[1]))
    with torch.no_grad():
        teacher(hidden_states=x, timestep=t, encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled)
        feats = d.backbone(x, t, cond.prompt_embeds, cond.pooled)
    hook.remove()
    assert feats.shape == (2, 64, 4, 4)
    torch.testing.assert_close(feats, seen["h"].transpose(1, 2).reshape(2, 64, 4, 4))
    logits = d(x, t, cond.prompt_embeds, cond.pooled, None, x_t=x, t=t)
    assert logits.shape == (2,)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained if p.dim() > 1)
    with torch.no_grad():
        flipped = d(x, t, cond.prompt_embeds.flip(0), cond.pooled.flip(0), None, x_t=x, t=t)
        assert (flipped - logits).abs().max() > 1e-6
        assert d.with_mode(False)(x, t, cond.prompt_embeds, cond.pooled, None).shape == (2,)


@pytest.mark.parametrize("blocks", [None, 3])
def test_sd3_discriminator_copies_the_stages_disc_blocks_as_the_trainer_builds_it(blocks):
    """A stage's `disc_blocks` reaches D as the trainer builds it (`StageLoop`, from a frozen 4-block
    transformer): that many first blocks (default half), copied with their weights, and D's optimizer holds
    every backbone weight that trains; the training log says how many blocks D has."""
    import copy

    from pipeline.config import CONFIG_DIR
    from pipeline.engines import PlainEngines
    from pipeline.stage_loop import StageLoop

    pipe = zoo.build_pipeline(zoo.ToyModelConfig(transformer_layers=4), family="sd3")
    data = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    data["stages"][1]["disc_blocks"] = blocks
    cfg = from_dict(data)
    _, stage = cfg.stage(2)
    base = copy.deepcopy(pipe.transformer).requires_grad_(False)  # as the worker loads it
    loop = StageLoop(cfg, stage, zoo.schedule_of(pipe), copy.deepcopy(pipe.transformer), PlainEngines(cfg.train),
                     "cpu", seed=0, disc_unet=base)
    events = loop.transition(0)
    bb = loop.disc.module.backbone
    k = 2 if blocks is None else blocks
    assert len(bb.transformer_blocks) == k and f"first {k} of 4 transformer blocks" in events[-1]
    assert all(torch.equal(p, base.get_parameter(f"transformer_blocks.{n}"))
               for n, p in bb.transformer_blocks.named_parameters())
    in_opt = {id(p) for g in loop.disc.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in bb.parameters() if p.requires_grad} <= in_opt


def test_disc_blocks_left_at_its_default_keeps_the_train_hash_of_runs_trained_before_it(tmp_path):
    """`disc_blocks` came after runs were trained: unset, a stage's training inputs are the stage as it was dumped
    before the key existed (so those runs stay finished); set, it is part of them (a changed D retrains)."""
    from pipeline.storage import RunStorage
    from pipeline.train import train_inputs

    cfg = load_config("smoke", [f"run_root={tmp_path}"])
    storage = RunStorage.from_config(cfg)
    before = {k: v for k, v in cfg.stages[1].model_dump(mode="json").items()
              if k not in ("disc_blocks", "lr_warmup_steps", "lr_decay")}  # the keys added since (at their defaults)
    assert train_inputs(cfg, 2, storage)["stage"] == before
    deeper = load_config("smoke", [f"run_root={tmp_path}", "stages.1.disc_blocks=1"])
    assert train_inputs(deeper, 2, storage)["stage"] == {**before, "disc_blocks": 1}
