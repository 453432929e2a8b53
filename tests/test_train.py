"""The stage trainer end to end on real Ray Train + DeepSpeed (2 CPU workers, gloo), on the smoke
config with a tiny random teacher and trajectories made by `traj_helpers` in the agreed schema.

Runs are shared between assertions (Ray/DeepSpeed start-up dominates on 2 busy cores):
- `mse_lora_run`: stage 1 (32 -> 8, MSE) with a LoRA phase then the full UNet, ZeRO-2;
- `x0_adv_run`:   stage 3 (-> 1 step, x0 conversion, conditional then unconditional D), ZeRO-3;
- a stage killed after a checkpoint and resumed (run root on S3) is in test_distill.py's smoke DAG,
  which kills a real `distill` and resumes it by running it again.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import zoo
from pipeline.config import CONFIG_DIR, from_dict
from pipeline.storage import RunStorage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability import record  # noqa: E402
from traj_helpers import make_trajectories, write_trajectories  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def smoke_cfg(root: Path, **changes):
    """The smoke config with its run root in `root` and per-test changes: `stage_<i>` dicts update
    stages, `train` updates the train section."""
    data = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    data["run_root"] = str(root)
    for k, v in changes.items():
        if k.startswith("stage_"):
            data["stages"][int(k[6:]) - 1].update(v)
        else:
            data.setdefault(k, {}).update(v)
    return data


def setup_teacher_of_stage3(cfg, storage, pipe_dir):
    """Stage 3's teacher is stage 2's exported student; here: the tiny pipeline itself."""
    shutil.copytree(pipe_dir, storage.path(cfg.stage_dir(2), "model"))


@pytest.fixture(scope="module")
def tiny_source(tiny_pipeline_dir):
    return str(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def mse_lora_run(ray_local, tiny_pipeline, tiny_source, tmp_path_factory):
    from pipeline.train import train_stage

    root = tmp_path_factory.mktemp("mse_lora")
    data = smoke_cfg(root, model={"source": tiny_source},
                     stage_1={"mse_steps": 60, "lora": {"rank": 8, "steps": 8}, "full_steps": 52, "lr": 2e-4},
                     train={"zero_stage": 2, "micro_batch": 8, "checkpoint_every": 20, "log_every": 4})
    cfg = from_dict(data)
    storage = RunStorage.from_config(cfg)
    write_trajectories(storage, cfg, 1, tiny_pipeline, n_ids=16, seed=1)
    summary = train_stage(cfg, 1, held_rows=0)
    return cfg, storage, summary


def test_mse_overfits_and_exports(mse_lora_run, tiny_source):
    cfg, storage, summary = mse_lora_run
    hist = storage.read_json(f"{cfg.stage_dir(1)}/train/history.json")
    losses = [h["loss"] for h in hist]
    assert hist[-1]["step"] == 60 and hist[-1]["student_mode"] == "full"
    assert losses[0] / losses[-1] >= 10, losses
    # observability: TensorBoard events, loss curves, manifest written last, model exported
    assert any(n.startswith("events.out.tfevents") for n in storage.ls(cfg.stage_dir(1), "train", "tensorboard"))
    assert storage.exists(cfg.stage_dir(1), "train", "loss_curves.png")
    from PIL import Image  # an MSE stage's curves: the losses panel alone, no empty discriminator panels
    assert Image.open(storage.path(cfg.stage_dir(1), "train", "loss_curves.png")).size[0] < 600
    m = storage.read_manifest("train-1-8step")
    assert m is not None and m["steps"] == 60
    model = storage.path(cfg.stage_dir(1), "model")
    assert json.loads(Path(model, "padistill.json").read_text())["num_inference_steps"] == 8


def test_lora_from_checkpoint_loads_on_teacher(mse_lora_run, tiny_source, tmp_path):
    """A checkpoint of the LoRA phase exports a LoRA file that `load_lora_weights` accepts on the
    teacher and that changes its output (the merged export gives the same output)."""
    from lora_checks import assert_lora_loads_like_merged
    from pipeline import student

    cfg, storage, _ = mse_lora_run
    # checkpoints at 8 (the LoRA's end), 20, 40, 60: the latest `keep_checkpoints` (2) stay, and the LoRA's own
    kept = sorted(n for n in storage.ls(cfg.stage_dir(1), "train") if n.startswith("checkpoint_0"))
    assert kept == ["checkpoint_0000008", "checkpoint_0000040", "checkpoint_0000060"], kept
    ckpt = storage.path(cfg.stage_dir(1), "train", "checkpoint_0000008")
    assert student.read_state(ckpt)["student_mode"] == "lora"
    out = student.export_checkpoint(ckpt, tiny_source, tmp_path / "exported")
    assert (out / student.LORA_WEIGHT_NAME).exists()
    assert_lora_loads_like_merged(tiny_source, out, "a handwritten digit three", min_change=1e-3)


X0_CONVERSION_STEPS = 8


@pytest.fixture(scope="module")
def x0_adv_run(ray_local, tiny_pipeline, tiny_source, tmp_path_factory):
    """Stage 3 of the smoke config (4 -> 1 step, multi-timestep, x0 conversion, conditional then
    unconditional discriminator with 5:1:1:1 re-noising) under ZeRO-3; ~16 held rows. The student's
    adversarial lr is 100x below D's (the paper's student lr is tiny too): measured single-process, a
    student at 1e-4 re-fools a 1e-3 D within a few steps (held AUC 0.3-0.5 after 12 steps), at 1e-5 D
    separates (AUC 0.96 after 6 conditional, 0.94 after 6 more unconditional) while the student moves."""
    from pipeline.train import train_stage

    root = tmp_path_factory.mktemp("x0_adv")
    data = smoke_cfg(root, model={"source": tiny_source},
                     stage_3={"conversion_steps": X0_CONVERSION_STEPS, "conditional_steps": 6,
                              "unconditional_steps": 6, "conversion_lr": 1e-3, "lr": 1e-5, "disc_lr": 1e-3},
                     train={"zero_stage": 3, "micro_batch": 8, "checkpoint_every": 1000, "log_every": 4,
                            "keep_checkpoints": 3,  # the x0 test reads the conversion's end (step 8 of 20)
                            "held_every": 4,  # the game on the held rows, as the benchmarks read it
                            "gradient_checkpointing": True})  # as SDXL at micro-batch 8 needs, under ZeRO-3
    cfg = from_dict(data)
    storage = RunStorage.from_config(cfg)
    setup_teacher_of_stage3(cfg, storage, tiny_source)
    write_trajectories(storage, cfg, 3, tiny_pipeline, n_ids=128, seed=3)
    summary = train_stage(cfg, 3, held_rows=32)
    return cfg, storage, summary


def test_adversarial_runs_both_phases_and_d_separates(x0_adv_run):
    cfg, storage, summary = x0_adv_run
    hist = storage.read_json(f"{cfg.stage_dir(3)}/train/history.json")
    assert [h["phase"] for h in hist][-1] == "unconditional"
    assert hist[0]["start_held_mse"] > 0  # the held MSE of the student before its first update
    assert {"conversion", "conditional", "unconditional"} <= {h["phase"] for h in hist}
    adv = [h for h in hist if h["phase"] != "conversion"]
    assert all(k in h for h in adv for k in ("d_loss", "d_real", "d_fake"))
    m = summary["metrics"]
    print(f"held rows after the run: D mean logit real {m['held_d_real']:.3f} fake {m['held_d_fake']:.3f}, "
          f"paired accuracy {m['held_d_pacc']:.3f}, AUC {m['held_d_auc']:.3f} (means over timestep strata)")
    # On held-out rows D ranks teacher (real) above student (fake) of the same x_t: the paired accuracy
    # P(D(real_i) > D(fake_i)), per timestep stratum (4 here), averaged. With ~32 held rows a D at chance
    # has a mean paired accuracy of 0.5 with a standard deviation of about 0.09, so 0.7 is two above it.
    assert m["held_d_real"] > m["held_d_fake"], m
    assert m["held_d_pacc"] > 0.7, m
    assert {f"held_d_pacc_t{t}" for t in (999, 749, 499, 249)} <= set(m), sorted(m)
    from PIL import Image  # the curves: losses, D's logits and its held paired accuracy, side by side
    assert Image.open(storage.path(cfg.stage_dir(3), "train", "loss_curves.png")).size[0] > 1200


def test_the_benchmark_reads_the_stages_game_from_the_history_the_trainer_wrote(x0_adv_run):
    """benchmarks/distill.py's `games` (issue 13: every adversarial stage trains), on a real trainer's history:
    the game starts where the student's adversarial updates do, after the x0 conversion; its conditional
    phase ends at the last held evaluation inside it; D's paired accuracy is read at those points (D is not
    scored during the conversion). Stages that did not train here (1 and 2) have no game."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from benchmarks.distill import game_table, games, stages_train
    from pipeline.phases import plan_phases

    cfg, storage, _ = x0_adv_run
    hist = storage.read_json(f"{cfg.stage_dir(3)}/train/history.json")
    conversion, conditional, _ = plan_phases(cfg.stage(3)[1])
    at = {h["step"]: h for h in hist if "held_mse" in h}
    cond = [s for s in at if conditional.start < s <= conditional.end]
    assert conversion.end in at and cond, sorted(at)  # held evaluations at those points (held_every 4)
    [g] = games(cfg, storage)
    assert (g["stage"], g["steps"], g["loss"]) == (3, 1, "adversarial")
    assert g["mse_start"] == at[conversion.end]["held_mse"] != hist[0]["start_held_mse"]  # after the conversion
    assert g["mse_cond_end"] == at[max(cond)]["held_mse"] and g["mse_end"] == at[max(at)]["held_mse"]
    assert g["pacc_start"] is at[conversion.end].get("held_d_pacc") is None  # D is not scored in the conversion
    assert g["pacc_cond_min"] == min(at[s]["held_d_pacc"] for s in cond) and 0 <= g["pacc_cond_min"] <= 1
    assert g["strata_resolved"] is None  # no D-only warm-up: the game is judged over all strata
    [row] = stages_train([{"games": [g]}])
    assert row["met"] == (g["mse_cond_end"] < g["mse_start"] and g["pacc_cond_min"] >= 0.6)
    assert row["value"] == g["pacc_cond_min"]
    assert f"{g['mse_start']:.4f} -> {g['mse_cond_end']:.4f}" in row["note"]
    assert "| adversarial | 1 |" in game_table({"adversarial": [{"games": [g]}]})


def test_discriminator_trains_whole_under_zero3(x0_adv_run, tiny_source):
    """The discriminator as the real trainer builds it (Ray Train worker, DeepSpeed ZeRO-3, D copied from
    the frozen base model's UNet): every parameter is in D's optimizer, and the backbone's weights in
    its last checkpoint differ from the base model's encoder everywhere (before the fix the backbone
    came from the frozen teacher: 0 of its tensors trained)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg, storage, summary = x0_adv_run
    hist = storage.read_json(f"{cfg.stage_dir(3)}/train/history.json")
    adv = [h for h in hist if h["phase"] in ("conditional", "unconditional")]
    assert adv and all(h["d_params_optimised"] == h["d_params_total"] > 0 for h in adv)
    from pipeline.phases import plan_phases

    last = plan_phases(cfg.stage(3)[1])[-1].end  # the end of the unconditional phase
    ckpt = storage.path(cfg.stage_dir(3), "train", f"checkpoint_{last:07d}")
    sd = get_fp32_state_dict_from_zero_checkpoint(os.path.join(ckpt, "disc", "ds"), tag="ds")
    base = zoo.load_denoiser(tiny_source).state_dict()
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    assert backbone and set(backbone) <= set(base)
    same = [k for k, v in backbone.items() if torch.equal(v, base[k])]
    assert same == [], f"{len(same)} of {len(backbone)} backbone tensors never trained: {same[:5]}"
    # the exported 1-step folder samples x0 ("sample" prediction) with trailing Euler
    sched = json.loads(Path(storage.path(cfg.stage_dir(3), "model", "scheduler", "scheduler_config.json")).read_text())
    assert sched["prediction_type"] == "sample" and sched["timestep_spacing"] == "trailing"


def test_x0_conversion_tracks_eps_students_x0(x0_adv_run, tiny_pipeline, tiny_source, tmp_path):
    """The checkpoint at the end of the conversion phase (before any adversarial step), a plain UNet
    read with prediction_type "sample", predicts the x0 its epsilon initialisation implies on rows
    it never saw. The conversion starts from a least-squares fit of conv_out (the trainer logs its
    error), then MSE; the relative RMS errors are printed."""
    from pipeline import student
    from pipeline.schedule import Conditioning, unet_denoiser

    cfg, storage, _ = x0_adv_run
    hist = storage.read_json(f"{cfg.stage_dir(3)}/train/history.json")
    init = [h for h in hist if "conversion_init_rel_after" in h][0]
    ckpt = storage.path(cfg.stage_dir(3), "train", f"checkpoint_{X0_CONVERSION_STEPS:07d}")
    state = student.read_state(ckpt)
    assert state["phase"] == "conversion" and state["prediction_type"] == "sample"
    converted, _ = student.student_unet_from_checkpoint(ckpt, tiny_source)
    eps = zoo.load_denoiser(tiny_source)
    sched = zoo.schedule_of(tiny_source)
    _, stage = cfg.stage(3)
    cols = make_trajectories(tiny_pipeline, stage, n_ids=16, seed=99)  # fresh latents, noise, prompts order
    x_t, t = torch.as_tensor(cols["x_t"]), torch.as_tensor(cols["t"]).long()
    cond = Conditioning(torch.as_tensor(cols["prompt_embeds"]), torch.as_tensor(cols["pooled_embeds"]),
                        Conditioning.sdxl_time_ids(len(t), 32))
    with torch.no_grad():
        target = student.implied_x0(sched, unet_denoiser(eps, cond), x_t, t)
        _, x0_conv = sched.step(unet_denoiser(converted, cond), x_t, t, t, prediction_type="sample")
        _, x0_raw = sched.step(unet_denoiser(eps, cond), x_t, t, t, prediction_type="sample")

    def rel(a):
        return ((a - target).pow(2).mean() / target.pow(2).mean()).sqrt().item()

    print(f"x0 conversion, relative RMS error of the sample output: training batch "
          f"{init['conversion_init_rel_before']:.3f} -> {init['conversion_init_rel_after']:.3f} by the "
          f"least-squares conv_out; held rows {rel(x0_raw):.3f} unconverted -> {rel(x0_conv):.3f} "
          f"after {X0_CONVERSION_STEPS} steps")
    assert init["conversion_init_rel_after"] < 0.8 * init["conversion_init_rel_before"]
    # measured: 1.01 -> 0.78 on held rows (a random tiny teacher's implied x0 is an arbitrary function of
    # x_t; the fit batch reaches 0.74 by least squares alone). A small tolerance needs ~50+ steps.
    assert rel(x0_conv) < 0.85 * rel(x0_raw)


def test_changed_inputs_start_the_stage_over_instead_of_resuming(mse_lora_run, tmp_path, request):
    """Checkpoints made from other inputs (here: another lr), or any with `--force` (restart), are
    discarded by `claim_train_dir`, which `train_stage` calls first, so the stage starts over; the same
    inputs keep them. The claims act on a copy of a real fit's run root (`mse_lora_run`'s). (That a rerun
    then resumes from the kept checkpoint is shown once, by test_distill's killed run: `distill` resumes a
    real `distill` killed mid-stage.)"""
    from pipeline.export import latest_checkpoint
    from pipeline.train import claim_train_dir

    done, _, _ = mse_lora_run
    shutil.copytree(done.run_root, tmp_path / "run")
    data = done.model_dump(mode="json")
    data["run_root"] = str(tmp_path / "run")
    cfg = from_dict(data)
    storage = RunStorage.from_config(cfg)
    kept = latest_checkpoint(cfg, 1, storage)
    assert kept is not None and kept.endswith("checkpoint_0000060") and kept.startswith(str(tmp_path))

    said = []
    claim_train_dir(cfg, 1, storage, log=said.append)  # same inputs: nothing discarded
    assert latest_checkpoint(cfg, 1, storage) == kept and said == []
    data["stages"][0]["lr"] = 5e-5
    changed = from_dict(data)
    claim_train_dir(changed, 1, storage, log=said.append)
    assert latest_checkpoint(changed, 1, storage) is None and not storage.exists(cfg.stage_dir(1), "train")
    assert "settings changed" in said[-1]
    storage.write_text(f"{cfg.stage_dir(1)}/train/marker", "a checkpoint folder of the changed inputs")
    claim_train_dir(changed, 1, storage, log=said.append)  # the changed inputs are now this folder's own
    assert storage.exists(cfg.stage_dir(1), "train", "marker")
    claim_train_dir(changed, 1, storage, restart=True, log=said.append)  # --force: discarded all the same
    assert not storage.exists(cfg.stage_dir(1), "train") and "--force" in said[-1]
    record(request, "a rerun with changed inputs (lr), and one with `--force`",
           "the claim that starts every stage discards the old checkpoints: the stage starts over, never resuming "
           "them as this run's (the same inputs keep them: test_distill's killed run resumes from them)", injected=2,
           completed=0)


def test_micro_batches_deal_rows_anew_every_epoch(ray_local):
    """A worker's micro-batches from a real Ray Dataset: every epoch covers each row exactly once, and
    every later epoch deals them into new micro-batches (not the first epoch's batches reordered)."""
    import numpy as np
    import ray.data

    from pipeline.stage_loop import TRAIN_COLUMNS
    from pipeline.train_data import micro_batches

    n, bs = 40, 8
    ds = ray.data.from_items([{"t": i, "t_next": -1, **{k: np.full((2,), float(i), np.float32)
                                                       for k in TRAIN_COLUMNS if k not in ("t", "t_next")}}
                              for i in range(n)])
    it = micro_batches(ds, bs, seed=3)
    epochs = [[next(it) for _ in range(n // bs)] for _ in range(3)]
    first = [b["t"].tolist() for b in epochs[0]]
    assert sorted(sum(first, [])) == list(range(n))
    for e in epochs[1:]:
        rows = sum((b["t"].tolist() for b in e), [])
        assert sorted(rows) == list(range(n))  # every row once per epoch
        assert all(torch.equal(b["target"][:, 0], b["t"].float()) for b in e)  # columns stay together
        assert {frozenset(b["t"].tolist()) for b in e} != {frozenset(b) for b in first}
    assert [b["t"].tolist() for b in epochs[1]] != [b["t"].tolist() for b in epochs[2]]
    # a shard over train.cache_mb is not kept: every epoch streams the dataset again, each row still once
    class Counted:  # the real dataset, counting its passes
        passes = 0

        def iter_torch_batches(self, **kw):
            Counted.passes += 1
            return ds.iter_torch_batches(**kw)

    for cache_mb, passes in ((0, 4), (2048, 1)):  # 3 epochs and the start of a 4th: 4 passes, or 1
        Counted.passes = 0
        it = micro_batches(Counted(), bs, seed=3, cache_mb=cache_mb)
        epochs = [sum((next(it)["t"].tolist() for _ in range(n // bs)), []) for _ in range(3)]
        next(it)  # into a fourth epoch: the third's pass has ended
        assert all(sorted(e) == list(range(n)) for e in epochs) and Counted.passes == passes


def test_nonfinite_rows_skip_their_updates_and_a_streak_stops_the_stage(ray_local, tiny_pipeline, tiny_source,
                                                                        tmp_path, request):
    """One trajectory row with a NaN target, in the real trainer (Ray Train, 2 workers, ZeRO-2). 32 rows,
    micro-batch 8 on each worker: an epoch is 2 steps and the NaN row is in exactly one, so half the
    updates are skipped (on both workers: their gradient reductions stay matched) and the stage still
    finishes with finite weights. With `max_nonfinite: 1` the first such update stops the stage with a
    user error that says what to do, and its latest checkpoint holds finite weights."""
    from safetensors.torch import load_file

    from pipeline.errors import user_error
    from pipeline.guard import DivergedError
    from pipeline.train import train_stage
    from traj_helpers import commit_trajectories, make_trajectories

    data = smoke_cfg(tmp_path, model={"source": tiny_source}, stage_1={"mse_steps": 6, "lr": 1e-3},
                     train={"micro_batch": 8, "checkpoint_every": 1000, "log_every": 1, "max_failures": 0})
    cfg = from_dict(data)
    storage = RunStorage.from_config(cfg)
    cols = make_trajectories(tiny_pipeline, cfg.stage(1)[1], n_ids=32, seed=1, resolution=cfg.model.resolution)
    cols["id"] = list(cols["id"])
    cols["target"][5, 0, 0, 0] = float("nan")
    commit_trajectories(storage, cfg, 1, cols)

    summary = train_stage(cfg, 1, held_rows=0, export=False)
    hist = storage.read_json(f"{cfg.stage_dir(1)}/train/history.json")
    assert summary["metrics"]["step"] == 6 and hist[-1]["skipped_student_updates"] == 3, hist[-1]
    # a skipped step's loss was NaN (history says so); the other steps trained on finite losses
    assert sum(not torch.isfinite(torch.tensor(h["loss"])) for h in hist) == 3
    weights = load_file(Path(summary["checkpoint"]) / "student" / "unet.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())

    data["train"]["max_nonfinite"] = 1
    with pytest.raises(Exception) as err:
        train_stage(from_dict(data), 1, held_rows=0, export=False)
    e = user_error(err.value)
    assert isinstance(e, DivergedError) and "1 student updates in a row skipped" in str(e), repr(err.value)[-2000:]
    assert "trajectories for NaNs" in str(e)
    record(request, "NaN in a trajectory row's target (the real trainer, 2 workers, ZeRO-2)",
           f"the {hist[-1]['skipped_student_updates']} updates holding it are skipped on every rank and counted; "
           "the stage finishes with finite weights; with `train.max_nonfinite: 1` it stops with one line "
           "(`DivergedError`), its latest checkpoint finite", injected=2, completed=1)
