"""Golden loss curves of the stage loop (torchtitan's reference-loss idea): the method's numbers, fast and
without Ray. Each case runs `StageLoop` with the plain torch engines on the tiny pipeline for ~20 steps
on fixed trajectories and compares every step's losses with `tests/assets/losses/<case>.json`.

A change to the method (a loss, a schedule, the discriminator's inputs, a phase boundary, an optimizer
setting) moves these curves; if it was meant to, regenerate them and say so in the commit:

    PADISTILL_UPDATE_LOSSES=1 .venv/bin/python -m pytest tests/test_loss_curves.py

The Ray Train tests (test_train.py, test_distill.py) then only need to check plumbing: the same loop
under DeepSpeed on two workers, resume steps, manifests, exports."""

from __future__ import annotations

import copy
import itertools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from traj_helpers import make_trajectories  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets" / "losses"
UPDATE = os.environ.get("PADISTILL_UPDATE_LOSSES") == "1"
KEYS = ("loss", "mse", "d_loss", "d_real", "d_fake")
# (stage of the smoke config, its changes): MSE with a LoRA phase merged into the full UNet; 8 -> 4 steps
# adversarial (conditional then unconditional D); the 1-step x0 student (least-squares conv_out, conversion,
# then adversarial with 5:1:1:1 re-noising)
CASES = {
    "mse": (1, {"mse_steps": 20, "lora": {"rank": 8, "steps": 6}, "full_steps": 14, "lr": 2e-4}),
    "adversarial": (2, {"conditional_steps": 10, "unconditional_steps": 10, "lr": 1e-5, "disc_lr": 1e-3}),
    "conversion": (3, {"conversion_steps": 8, "conditional_steps": 6, "unconditional_steps": 6,
                       "conversion_lr": 1e-4, "lr": 1e-5, "disc_lr": 1e-3}),
}


def run_curve(pipe, key: int, changes: dict) -> list[dict]:
    """Per step, the losses `micro_step` returned, for one stage run by the plain engines."""
    from pipeline import zoo
    from pipeline.config import CONFIG_DIR, from_dict
    from pipeline.engines import PlainEngines
    from pipeline.phases import phase_at
    from pipeline.stage_loop import TRAIN_COLUMNS, StageLoop

    data = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    data["stages"][key - 1].update(changes)
    cfg = from_dict(data)
    _, stage = cfg.stage(key)
    rows = make_trajectories(pipe, stage, n_ids=32, seed=key)
    batches = [{k: torch.as_tensor(rows[k][i:i + 8]) for k in TRAIN_COLUMNS} for i in range(0, 32, 8)]
    torch.manual_seed(0)  # LoRA and head initialisation
    loop = StageLoop(cfg, stage, zoo.schedule_of(pipe), copy.deepcopy(pipe.unet), PlainEngines(cfg.train), "cpu",
                     seed=key)
    drawn = itertools.count()  # micro-batches in turn, as the trainer's iterator deals them (here unshuffled)

    def next_batch():
        return loop.batch_to(batches[next(drawn) % len(batches)])

    curve = []
    for step in range(loop.total):
        loop.transition(step, next_batch)
        out = loop.micro_step(phase_at(loop.phases, step), next_batch())
        curve.append({k: round(float(out[k]), 7) for k in KEYS if k in out})
    return curve


@pytest.fixture
def one_thread():
    """One intra-op thread: the same reduction order on every machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("case", sorted(CASES))
def test_stage_loop_follows_its_reference_losses(tiny_pipeline, one_thread, case):
    key, changes = CASES[case]
    curve = run_curve(tiny_pipeline, key, changes)
    path = ASSETS / f"{case}.json"
    if UPDATE:
        ASSETS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"stage": key, "changes": changes, "steps": curve}, indent=1) + "\n")
    assert path.exists(), f"{path} is missing: run with PADISTILL_UPDATE_LOSSES=1 to write it"
    ref = json.loads(path.read_text())
    assert (ref["stage"], ref["changes"]) == (key, json.loads(json.dumps(changes))), "the case changed: regenerate"
    assert [sorted(s) for s in curve] == [sorted(s) for s in ref["steps"]], "other losses at some step"
    for i, (got, want) in enumerate(zip(curve, ref["steps"])):
        for k, v in want.items():  # the float noise of another CPU, not a change of method
            assert got[k] == pytest.approx(v, rel=1e-2, abs=1e-4), f"step {i} {k}: {got[k]} vs reference {v}"
    # and the curves say what the method should do on them (step i trains on micro-batch i % 4: the
    # conversion's least-squares fit draws 4 first)
    steps = ref["steps"]
    if case == "mse":  # after the LoRA merge (step 6; Adam restarts on the full UNet), the student follows its
        assert steps[18]["loss"] < 0.5 * steps[10]["loss"]  # teacher's targets: the same micro-batch's loss
    elif case == "adversarial":  # a D update and a student update every step
        assert all(set(s) == {"loss", "d_loss", "d_real", "d_fake"} for s in steps)
    else:  # conversion (the student alone, its x0 error falling on the same micro-batch), then adversarial
        conv = changes["conversion_steps"]
        assert all(set(s) == {"loss"} for s in steps[:conv]) and all("d_loss" in s for s in steps[conv:])
        assert steps[4]["loss"] < steps[0]["loss"]
