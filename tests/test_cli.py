"""The console script and every job's --help run; jobs also run as `python -m jobs.X`."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import JOBS, main
from reliability import record

REPO = Path(__file__).resolve().parent.parent


def test_padistill_help_lists_every_job(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for job in JOBS:
        assert job in out


@pytest.mark.parametrize("job", sorted(JOBS))
def test_each_job_help(job, capsys):
    with pytest.raises(SystemExit) as e:
        main([job, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert ("--address" if job in ("status", "logs") else "--config") in out


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "jobs.show_config", "--config", "smoke", "--set", "train.workers=1"],
                         capture_output=True, text=True, check=True).stdout
    assert "workers: 1" in out and "name: smoke" in out


def test_console_script_installed():
    exe = __import__("shutil").which("padistill") or str(__import__("pathlib").Path(sys.executable).parent / "padistill")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train-stage" in r.stdout


def test_bad_config_exits_with_named_error(capsys):
    assert main(["config", "--config", "smoke", "--set", "stages.0.student_steps=5"]) == 2
    err = capsys.readouterr().err
    assert "stages.0.student_steps" in err and "does not divide" in err


@pytest.mark.parametrize("argv, says", [
    (["export", "--stage", "2"], "run `padistill train-stage --stage 2` first"),
    (["evaluate", "--stage", "2"], "run `padistill train-stage --stage 2` first"),
    (["trajectories", "--stage", "2"], "run `padistill encode` first"),
    (["distill", "--set", "model.source=no/such/folder"], "is not a diffusers pipeline folder"),
    (["export", "--stage", "9"], "no such stage"),
    (["encode", "--set", "run_root=s3://padistill-none/x", "--set", "storage.endpoint_url=http://127.0.0.1:9"],
     "S3: no credentials found"),
    (["config", "--set", "data.kindd=parquet"], "invalid config: data.kindd: unknown key"),
    (["toy-teacher", "--set", "data.kind=parquet", "--set", "data.path=/no/such"],
     "data.kind: a toy teacher learns an embedded dataset"),
    (["logs", "--address", "http://127.0.0.1:9", "raysubmit_none"], "cannot reach the Ray cluster at http://127.0.0.1:9"),
    (["status", "--address", "http://127.0.0.1:9", "raysubmit_none"], "cannot reach the Ray cluster"),
])
def test_a_users_mistake_is_one_line_and_exit_2(argv, says, tmp_path, monkeypatch, capsys, request):
    """What a new user does wrong (a step before its inputs, a wrong path, a stage that does not exist, S3
    without credentials) prints one line naming what to do, exit status 2, no traceback."""
    monkeypatch.chdir(tmp_path)  # a fresh run root: runs/toy_digits under it
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    record(request, "a user's mistake: a bad config key, a step before its inputs, a wrong path or stage, S3 "
           "without credentials, an unreachable Ray cluster", "one line naming the key or what to run, exit "
           "status 2, no traceback (a bug keeps its traceback)", injected=1, completed=0)


def test_a_bug_keeps_its_traceback():
    """Only pipeline.errors (and S3 reachability) are user errors: anything else is raised."""
    from pipeline.errors import MissingInputError, user_error

    class Wrapped(Exception):  # like ray.exceptions.RayTaskError: the task's error under .cause
        def __init__(self, cause):
            super().__init__("remote traceback …")
            self.cause = cause

    assert user_error(KeyError("x")) is None and user_error(Wrapped(KeyError("x"))) is None
    inner = MissingInputError("run `padistill encode` first")
    assert user_error(Wrapped(inner)) is inner
    try:
        try:
            raise inner
        except MissingInputError as e:
            raise RuntimeError("while encoding") from e
    except RuntimeError as outer:
        assert user_error(outer) is inner


def test_train_stage_without_trajectories_stops_before_ray_starts(tmp_path):
    """`padistill train-stage` on a run root without the stage's trajectories prints its one line before
    starting a local Ray (which took ~7 s and printed Ray's own start-up lines first)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "jobs.train_stage", "--config", "smoke", "--stage", "1",
                        "--set", f"run_root={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"padistill train-stage: {tmp_path / 'run'}/stages/1-8step/traj: no finished trajectories; run "
        "`padistill trajectories --stage 1` first"], r.stderr


def test_a_step_run_alone_keeps_ray_datas_notices_off_the_console():
    """`padistill encode` (or trajectories, evaluate) run alone drives Ray Data from its own process: the
    console handler of Ray Data's logger is at WARNING once `jobs` is imported (its notices, execution plans
    and logged progress go to ray-data.log, its warnings stay), at Ray's INFO without it."""
    code = ("{}import logging, ray.data; print(max(h.level for h in logging.getLogger('ray.data').handlers "
            "if type(h).__name__ == 'PlainRayHandler'))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_LOGGING_CONFIG"}
    levels = [int(subprocess.run([sys.executable, "-c", code.format(pre)], env=env, capture_output=True,
                                 text=True, check=True, timeout=120).stdout) for pre in ("import jobs; ", "")]
    assert levels == [logging.WARNING, logging.INFO]


def save_tiny_flux(folder) -> None:
    """A FluxPipeline folder saved by diffusers from the real classes at toy sizes (random weights; a T5
    tokenizer over a three-word vocabulary): a family padistill does not distil."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from tokenizers import Tokenizer, models
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

    from pipeline.zoo import build_tokenizer

    tok = build_tokenizer()
    t5tok = T5TokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2},
                                                                        unk_token="<unk>")),
                            pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                        vocab_size=len(tok), max_position_embeddings=16))
    t5 = T5EncoderModel(T5Config(vocab_size=3, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16))
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,), norm_num_groups=16,
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=tok,
                 text_encoder_2=t5, tokenizer_2=t5tok, transformer=tr).save_pretrained(folder)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_source_of_another_model_family_is_one_line_naming_it(where, tmp_path, monkeypatch, capsys, request):
    """model.source at a real FLUX pipeline folder (tiny, saved by diffusers; a family padistill does not
    distil), on a local disk or on S3: `distill` says which family it is and which it distils,
    exit 2, before its first write to the run root (an S3 source is not downloaded for it: its
    model_index.json alone is read)."""
    from pipeline.family import FAMILIES

    save_tiny_flux(tmp_path / "flux")
    assert FAMILIES[json.loads((tmp_path / "flux" / "model_index.json").read_text())["_class_name"]] == "flux"
    source, sets = str(tmp_path / "flux"), []
    if where == "s3":
        from pipeline.config import StorageConfig
        from pipeline.storage import RunStorage

        endpoint = request.getfixturevalue("s3_endpoint")
        store = RunStorage("s3://padistill-test/families", StorageConfig(endpoint_url=endpoint))
        store.put_dir(source, "flux")
        source, sets = store.url("flux"), ["--set", f"storage.endpoint_url={endpoint}"]
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()  # diffusers' saving bar
    assert main(["distill", "--set", f"model.source={source}", "--set", "run_root=run", *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.source:" in err and "is a FluxPipeline (model family 'flux')" in err, err
    assert "distils the sdxl, sd15, sd3 families" in err, err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "config.yaml").exists()  # the DAG's first write: nothing ran
