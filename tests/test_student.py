"""Student pieces without Ray: LoRA targets and merge, x0 target, phase plan of a stage."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeline import student
from pipeline.stage_config import StageConfig
from pipeline.schedule import unet_denoiser
from pipeline.phases import checkpoint_steps, disc_mode_at, phase_at, plan_phases, student_mode_at


def test_lora_targets_skip_io_convs_and_time_embeddings(tiny_pipeline):
    names = student.lora_target_modules(tiny_pipeline.unet)
    assert names and not any(n.split(".")[0] in ("conv_in", "conv_out", "time_embedding", "add_embedding")
                             for n in names)
    assert any(n.endswith("conv1") for n in names) and any(n.endswith("to_q") for n in names)


def test_lora_merge_keeps_the_function(tiny_pipeline):
    from pipeline import zoo

    unet = student.add_lora(copy.deepcopy(tiny_pipeline.unet), rank=4)
    assert all(("lora_" in n) == p.requires_grad for n, p in unet.named_parameters())
    for n, p in unet.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    cond = zoo.encode_prompts(tiny_pipeline, ["a handwritten digit five"], 32)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([499.0])
    with torch.no_grad():
        a = unet_denoiser(unet, cond)(x, t)
        merged = student.merge_lora(unet)
        b = unet_denoiser(merged, cond)(x, t)
    assert not student.has_lora(merged)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert set(merged.state_dict()) == set(tiny_pipeline.unet.state_dict())


def _stage(**kw):
    base = dict(teacher_steps=4, student_steps=1, loss="adversarial", prediction_type="sample",
                conversion_steps=3, conditional_steps=5, unconditional_steps=2)
    return StageConfig(**{**base, **kw})


def test_phase_plan():
    ph = plan_phases(_stage())
    assert [(p.name, p.start, p.end) for p in ph] == [("conversion", 0, 3), ("conditional", 3, 8),
                                                       ("unconditional", 8, 10)]
    st = _stage(lora={"rank": 4, "steps": 6}, full_steps=4)
    assert [student_mode_at(st, s) for s in (0, 5, 6, 9)] == ["lora", "lora", "full", "full"]
    assert checkpoint_steps(st, 100) == {3, 6, 8, 10}
    with pytest.raises(ValueError, match="lora.steps"):  # the plan's check, run when the config is read
        _stage(lora={"rank": 4, "steps": 6}, full_steps=5)
    warm = _stage(mse_steps=4, mse_lr=1e-3, lr=1e-6)  # an adversarial stage's MSE warm-up
    assert [(p.name, p.start, p.end) for p in plan_phases(warm)] == [
        ("conversion", 0, 3), ("mse", 3, 7), ("conditional", 7, 12), ("unconditional", 12, 14)]
    assert checkpoint_steps(warm, 100) == {3, 7, 12, 14}
    with pytest.raises(ValueError, match="mse_lr"):
        StageConfig(teacher_steps=8, student_steps=4, loss="mse", mse_steps=3, mse_lr=1e-3)
    with pytest.raises(ValueError, match="no training steps"):
        StageConfig(teacher_steps=8, student_steps=4, loss="mse")
    dw = _stage(disc_warmup_steps=2)  # D alone before the conditional phase, with the conditional D
    assert [(p.name, p.start, p.end) for p in plan_phases(dw)] == [
        ("conversion", 0, 3), ("disc_warmup", 3, 5), ("conditional", 5, 10), ("unconditional", 10, 12)]
    assert [disc_mode_at(phase_at(plan_phases(dw), s)) for s in (2, 3, 5, 10)] == \
        [None, "conditional", "conditional", "unconditional"]


def test_disc_warmup_trains_d_only(tiny_pipeline):
    """The discriminator's warm-up updates D and leaves the student's weights alone; the conditional
    phase after it keeps that D (no rebuild) and moves the student."""
    import sys
    from pathlib import Path

    import yaml

    from pipeline import zoo
    from pipeline.config import CONFIG_DIR, from_dict
    from pipeline.engines import PlainEngines
    from pipeline.stage_loop import TRAIN_COLUMNS, StageLoop

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from traj_helpers import make_trajectories

    data = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    data["stages"][1].update(disc_warmup_steps=1, lr=1e-4, disc_lr=1e-3)
    cfg = from_dict(data)
    _, stage = cfg.stage(2)
    loop = StageLoop(cfg, stage, zoo.schedule_of(tiny_pipeline), copy.deepcopy(tiny_pipeline.unet),
                     PlainEngines(cfg.train), "cpu")
    rows = make_trajectories(tiny_pipeline, stage, n_ids=8, seed=4)
    b = loop.batch_to({k: torch.as_tensor(rows[k]) for k in TRAIN_COLUMNS})

    def weights(m):
        return {k: v.clone() for k, v in m.state_dict().items()}

    loop.transition(0)
    s0, d0, disc = weights(loop.student.module), weights(loop.disc.module), loop.disc
    out = loop.micro_step(phase_at(loop.phases, 0), b)
    assert "d_loss" in out and "loss" not in out
    assert all(torch.equal(v, loop.student.module.state_dict()[k]) for k, v in s0.items())
    assert any(not torch.equal(v, loop.disc.module.state_dict()[k]) for k, v in d0.items())
    assert loop.transition(1) == [] and loop.disc is disc  # the same D goes on into the conditional phase
    loop.micro_step(phase_at(loop.phases, 1), b)
    assert any(not torch.equal(v, loop.student.module.state_dict()[k]) for k, v in s0.items())


def _smoke_stage(key: int, **changes):
    """The smoke config with `changes` to stage `key` (1-based), and that stage."""
    import yaml

    from pipeline.config import CONFIG_DIR, from_dict

    data = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    data["stages"][key - 1].update(changes)
    cfg = from_dict(data)
    return cfg, cfg.stage(key)[1]


def _plain_loop(cfg, stage, pipe):
    """A StageLoop on the plain-torch engines (no Ray, no DeepSpeed), the student a copy of `pipe`'s UNet."""
    from pipeline import zoo
    from pipeline.engines import PlainEngines
    from pipeline.stage_loop import StageLoop

    return StageLoop(cfg, stage, zoo.schedule_of(pipe), copy.deepcopy(pipe.unet), PlainEngines(cfg.train), "cpu", seed=0)


def _lr_per_step(cfg, stage, pipe) -> list[float]:
    """The lr the student's optimizer holds at each step of the stage."""
    loop, lrs = _plain_loop(cfg, stage, pipe), []
    for s in range(loop.total):
        loop.transition(s)
        lrs.append(loop.student.optimizer.param_groups[0]["lr"])
    return lrs


def _first_update_size(cfg, stage, pipe, step: int) -> float:
    """How far a fresh student's first update, at `step`, moves its weights (the largest change): with Adam's beta1
    0 the bias-corrected step is lr * g/|g|, so this is the lr in force."""
    import sys
    from pathlib import Path

    from pipeline.stage_loop import TRAIN_COLUMNS

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from traj_helpers import make_trajectories

    loop = _plain_loop(cfg, stage, pipe)
    rows = make_trajectories(pipe, stage, n_ids=8, seed=4)
    b = loop.batch_to({k: torch.as_tensor(rows[k]) for k in TRAIN_COLUMNS})
    loop.transition(step)
    before = {k: v.clone() for k, v in loop.student.module.state_dict().items()}
    loop.micro_step(phase_at(loop.phases, step), b)
    after = loop.student.module.state_dict()
    return max((after[k] - v).abs().max().item() for k, v in before.items())


def test_the_students_lr_warms_up_over_its_first_updates_against_d(tiny_pipeline):
    """`lr_warmup_steps` N: the student's lr is lr/N, 2lr/N, ... lr over its first N updates against D (after D's
    warm-up), and the optimizer uses it: Adam's first update moves every weight by at most the lr in force, lr/N
    (beta1 0: the bias-corrected step is lr * g/|g|), where without the warm-up it moves them by lr."""
    lr = 1e-4
    moved = {}
    for n in (0, 4):
        cfg, stage = _smoke_stage(2, disc_warmup_steps=1, conditional_steps=4, unconditional_steps=2, lr=lr,
                                  lr_warmup_steps=n)
        expect = [lr] + ([lr / 4, lr / 2, 3 * lr / 4, lr] if n else [lr] * 4) + [lr] * 2
        lrs = _lr_per_step(cfg, stage, tiny_pipeline)
        assert lrs == pytest.approx(expect, rel=1e-12), (n, lrs)
        moved[n] = _first_update_size(cfg, stage, tiny_pipeline, 1)  # the first student update against D
    assert moved[0] == pytest.approx(lr, rel=0.02) and moved[4] == pytest.approx(lr / 4, rel=0.02), moved


def test_cosine_lr_decay_spans_the_steps_at_the_main_lr():
    """`lr_decay: cosine` lowers the student's lr by a half cosine over the steps at the stage's main lr: the whole
    of an MSE stage; in an adversarial one the steps against D only (not the x0 conversion, not D's warm-up), on
    top of the lr warm-up; `none` leaves it constant."""
    import math

    from pipeline.config import load_config
    from pipeline.phases import plan_phases, student_lr_scale

    def scales(stage):
        phases = plan_phases(stage)
        return [student_lr_scale(stage, phases, s) for s in range(phases[-1].end)]

    cos = [0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]  # 1, 0.854, 0.5, 0.146
    cfg = load_config("smoke", ["stages.0.lr_decay=cosine", "stages.1.lr_decay=cosine", "stages.1.disc_warmup_steps=2",
                                "stages.1.lr_warmup_steps=2", "stages.2.lr_decay=cosine"])
    assert scales(cfg.stages[0]) == pytest.approx(cos)  # MSE: 4 steps
    assert scales(cfg.stages[1]) == pytest.approx([1, 1] + [c * w for c, w in zip(cos, [0.5, 1, 1, 1])])
    assert scales(cfg.stages[2]) == pytest.approx([1, 1] + cos)  # after the 2 conversion steps
    assert scales(load_config("smoke").stages[0]) == [1.0] * 4
    # an MSE warm-up at mse_lr stays undecayed; the decay runs on across a LoRA merge
    lora = load_config("smoke", ["stages.1.mse_steps=2", "stages.1.lr_decay=cosine", "stages.1.lora={rank: 4, steps: 3}",
                                 "stages.1.full_lr=5.0e-5"]).stages[1]
    assert scales(lora) == pytest.approx([1, 1] + cos)


def test_the_optimizer_follows_the_cosine_decay_and_its_last_update_is_small(tiny_pipeline):
    """An MSE stage with `lr_decay: cosine` through StageLoop and the plain engines: the optimizer's lr at each
    step is lr x the half cosine, and Adam's update on the last step (lr x 0.146 of 4 steps, beta1 0) moves the
    weights by that lr, not by lr."""
    lr = 1e-4
    cfg, stage = _smoke_stage(1, lr=lr, lr_decay="cosine", betas=[0.0, 0.99])
    last = lr * 0.5 * (1 + math.cos(math.pi * 3 / 4))
    lrs = _lr_per_step(cfg, stage, tiny_pipeline)
    assert lrs == pytest.approx([lr, lr * 0.5 * (1 + math.cos(math.pi / 4)), lr / 2, last], rel=1e-12)
    moved = _first_update_size(cfg, stage, tiny_pipeline, 3)  # a fresh optimizer at the last step
    assert moved == pytest.approx(last, rel=0.02), (moved, last)


def test_lr_warmup_is_for_adversarial_stages_and_leaves_older_runs_finished(tmp_path):
    """An MSE stage refuses `lr_warmup_steps` by name, an adversarial one a warm-up longer than its steps against D; left at 0 the key stays out of a stage's training inputs (a
    stage trained before it existed stays finished), set it is part of them (the stage retrains)."""
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.storage import RunStorage
    from pipeline.train import train_inputs

    with pytest.raises(ConfigError, match="lr_warmup_steps: is for adversarial stages"):
        load_config("smoke", [f"run_root={tmp_path}", "stages.0.lr_warmup_steps=5"])
    with pytest.raises(ConfigError, match="lr_warmup_steps: 5 is more than the stage's 4 student steps against"):
        load_config("smoke", [f"run_root={tmp_path}", "stages.1.lr_warmup_steps=5"])
    cfg = load_config("smoke", [f"run_root={tmp_path}"])
    storage = RunStorage.from_config(cfg)
    assert "lr_warmup_steps" not in train_inputs(cfg, 2, storage)["stage"]
    warm = load_config("smoke", [f"run_root={tmp_path}", "stages.1.lr_warmup_steps=3"])
    assert train_inputs(warm, 2, storage)["stage"]["lr_warmup_steps"] == 3
    assert "lr_decay" not in train_inputs(cfg, 1, storage)["stage"]  # lr_decay likewise
    decay = load_config("smoke", [f"run_root={tmp_path}", "stages.0.lr_decay=cosine"])
    assert train_inputs(decay, 1, storage)["stage"]["lr_decay"] == "cosine"
    with pytest.raises(ConfigError, match="lr_decay"):
        load_config("smoke", [f"run_root={tmp_path}", "stages.0.lr_decay=linear"])
    # a decay with no steps to decay over is refused by name (an adversarial stage of MSE warm-up alone)
    with pytest.raises(ConfigError, match="lr_decay: cosine decays .* against the discriminator .* it has none"):
        load_config("smoke", [f"run_root={tmp_path}", "stages.1.mse_steps=4", "stages.1.conditional_steps=0",
                              "stages.1.unconditional_steps=0", "stages.1.lr_decay=cosine"])


def test_conversion_starts_from_least_squares_conv_out(tiny_pipeline):
    """The x0 conversion's start (no Ray: the plain-torch engines of the benchmark): conv_out alone is
    refitted by least squares and the sample output gets closer to the implied x0 on rows it never
    saw; after the conversion the optimizer restarts at mse_lr for the MSE warm-up, then at the
    stage's lr for the adversarial phases, with the same weights throughout."""
    import sys
    from pathlib import Path

    import yaml

    from pipeline import zoo
    from pipeline.config import CONFIG_DIR, from_dict
    from pipeline.schedule import Conditioning
    from pipeline.engines import PlainEngines
    from pipeline.stage_loop import TRAIN_COLUMNS, StageLoop

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from traj_helpers import make_trajectories

    data = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    data["stages"][2].update(conversion_steps=2, conversion_lr=1e-3, mse_steps=2, mse_lr=5e-4, lr=1e-4)
    cfg = from_dict(data)
    _, stage = cfg.stage(3)
    sched = zoo.schedule_of(tiny_pipeline)
    loop = StageLoop(cfg, stage, sched, copy.deepcopy(tiny_pipeline.unet), PlainEngines(cfg.train), "cpu")
    fit = make_trajectories(tiny_pipeline, stage, n_ids=64, seed=1)  # 4 micro-batches of 16
    batches = iter([{k: torch.as_tensor(fit[k][i:i + 16]) for k in TRAIN_COLUMNS} for i in range(0, 64, 16)])
    held = make_trajectories(tiny_pipeline, stage, n_ids=16, seed=2)
    x_t, t = torch.as_tensor(held["x_t"]), torch.as_tensor(held["t"]).long()
    cond = Conditioning(torch.as_tensor(held["prompt_embeds"]), torch.as_tensor(held["pooled_embeds"]),
                        Conditioning.sdxl_time_ids(len(t), 32))

    def held_rel(unet):
        with torch.no_grad():
            target = student.implied_x0(sched, unet_denoiser(tiny_pipeline.unet, cond), x_t, t)
            _, x0 = sched.step(unet_denoiser(unet, cond), x_t, t, t, prediction_type="sample")
        return ((x0 - target).pow(2).mean() / target.pow(2).mean()).sqrt().item()

    before = held_rel(tiny_pipeline.unet)
    events = loop.transition(0, lambda: loop.batch_to(next(batches)))
    assert loop.student_lr == 1e-3 and any("least squares" in e for e in events)
    after = held_rel(loop.student.module)
    print(f"least-squares conv_out: held relative RMS error {before:.3f} -> {after:.3f} "
          f"(fit batch {loop.conversion_init['rel_before']:.3f} -> {loop.conversion_init['rel_after']:.3f})")
    assert after < 0.9 * before and loop.conversion_init["rel_after"] < 0.8 * loop.conversion_init["rel_before"]
    changed = {n for n, p in loop.student.module.named_parameters()
               if not torch.equal(p, tiny_pipeline.unet.get_parameter(n))}
    assert changed == {"conv_out.weight", "conv_out.bias"}
    weights = copy.deepcopy(loop.student.module.state_dict())
    events = loop.transition(2)  # the MSE warm-up: its own lr, no discriminator yet
    assert loop.student_lr == 5e-4 and loop.student.optimizer.param_groups[0]["lr"] == 5e-4
    assert any("optimizer restarted" in e for e in events) and loop.disc is None
    events = loop.transition(4)
    assert loop.student_lr == 1e-4 and loop.student.optimizer.param_groups[0]["lr"] == 1e-4
    assert any("optimizer restarted" in e for e in events) and loop.disc_mode == "conditional"
    assert all(torch.equal(v, loop.student.module.state_dict()[k]) for k, v in weights.items())


def test_stale_extension_lock_is_removed_and_fresh_one_kept(tmp_path, monkeypatch):
    """A JIT build killed mid-way leaves torch's FileBaton `lock`; later runs would wait forever."""
    import os
    import time

    from torch.utils.file_baton import FileBaton

    from pipeline.engines import clear_stale_extension_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, fresh = tmp_path / "py311_cpu" / "deepspeed_shm_comm", tmp_path / "py311_cpu" / "other_op"
    stale.mkdir(parents=True)
    fresh.mkdir(parents=True)
    assert FileBaton(str(stale / "lock")).try_acquire() and FileBaton(str(fresh / "lock")).try_acquire()
    old = time.time() - 3600
    os.utime(stale / "lock", (old, old))
    removed = clear_stale_extension_locks(max_age_s=900, log=lambda *a: None)
    assert removed == [str(stale / "lock")]
    assert FileBaton(str(stale / "lock")).try_acquire()  # a new build can take the lock again
    assert not FileBaton(str(fresh / "lock")).try_acquire()  # a build in progress keeps its lock


def test_gradient_checkpointing_gives_the_same_updates(tiny_pipeline):
    """`train.gradient_checkpointing` (for SDXL at micro-batch 8 on 80 GiB) turns on the diffusers
    blocks' checkpointing in the student and the discriminator and changes no update: one adversarial
    micro-step from the same start gives the same student and discriminator weights."""
    import sys
    from pathlib import Path

    import yaml

    from pipeline import zoo
    from pipeline.config import CONFIG_DIR, from_dict
    from pipeline.engines import PlainEngines
    from pipeline.phases import phase_at
    from pipeline.stage_loop import TRAIN_COLUMNS, StageLoop

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from traj_helpers import make_trajectories

    data = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    _, stage = from_dict(data).stage(2)
    rows = make_trajectories(tiny_pipeline, stage, n_ids=8, seed=3)
    results = {}
    for ckpt in (False, True):
        data["train"]["gradient_checkpointing"] = ckpt
        cfg = from_dict(data)
        torch.manual_seed(0)
        loop = StageLoop(cfg, stage, zoo.schedule_of(tiny_pipeline), copy.deepcopy(tiny_pipeline.unet),
                         PlainEngines(cfg.train), "cpu", seed=0)
        loop.transition(0)
        on = [m for m in list(loop.student.module.modules()) + list(loop.disc.module.modules())
              if getattr(m, "gradient_checkpointing", False)]
        assert bool(on) == ckpt
        b = loop.batch_to({k: torch.as_tensor(rows[k]) for k in TRAIN_COLUMNS})
        resnet = loop.student.module.down_blocks[0].resnets[0]
        calls, forward = [], resnet.forward  # counted in forward itself: recomputation runs no hooks
        resnet.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
        losses = loop.micro_step(phase_at(loop.phases, 0), b)
        del resnet.forward
        results[ckpt] = (len(calls), losses, {k: v.clone() for k, v in loop.student.module.state_dict().items()},
                         {k: v.clone() for k, v in loop.disc.module.state_dict().items()})
    (c0, l0, s0, d0), (c1, l1, s1, d1) = results[False], results[True]
    assert c1 > c0  # the backward ran the student's blocks again
    assert l0 == pytest.approx(l1, rel=1e-5)
    changed = [k for k in s0 if not torch.equal(s0[k], tiny_pipeline.unet.state_dict()[k])]
    assert changed  # the step did update the student
    for a, b in ((s0, s1), (d0, d1)):
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
