"""The update watch on its own: PlainEngine skips a step with a non-finite gradient (as DeepSpeed's ZeRO
optimizers do), the stop rule counts skipped updates in a row, and a saturated D is warned about once
per window. The real trainer's path is in test_train (NaN rows)."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import user_error
from pipeline.guard import DivergedError, UpdateWatch, saturated
from pipeline.engines import PlainEngine
from reliability import record


def test_plain_engine_skips_a_step_whose_gradient_is_not_finite(request):
    torch.manual_seed(0)
    eng = PlainEngine(torch.nn.Linear(3, 1), lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    before = eng.module.weight.detach().clone()
    handle = eng.module.weight.register_hook(lambda g: g * float("nan"))
    eng.backward(eng(torch.ones(2, 3)).sum())
    eng.step()
    assert not eng.was_step_applied() and torch.equal(eng.module.weight, before)
    assert eng.module.weight.grad is None  # the bad gradient does not leak into the next step
    handle.remove()
    eng.backward(eng(torch.ones(2, 3)).sum())
    eng.step()
    assert eng.was_step_applied() and not torch.equal(eng.module.weight, before)
    record(request, "a non-finite gradient with a finite loss",
           "the step is skipped and counted (DeepSpeed's ZeRO optimizers do it themselves, `was_step_applied`; "
           "`PlainEngine` the same); the next step applies", injected=1, completed=1)


def test_the_stop_rule_counts_skipped_updates_in_a_row_per_model(request):
    w = UpdateWatch("2-4step", max_nonfinite=3, saturation_window=2)
    for applied in (False, False, True, False, False):  # never 3 in a row
        w.update("student", applied, step=7)
    w.update("disc", False, step=7)
    assert w.metrics()["skipped_student_updates"] == 4 and w.metrics()["skipped_disc_updates"] == 1
    with pytest.raises(DivergedError, match="stage 2-4step: 3 student updates in a row skipped at step 9") as e:
        w.update("student", False, step=9, why="non-finite loss")
    assert user_error(e.value) is e.value  # the CLI prints it as one line
    record(request, "a diverging stage: `train.max_nonfinite` skipped updates in a row",
           "the stage stops with one line (`DivergedError`: what to check, which key to raise), counted per "
           "model", injected=8, completed=0)


def test_a_saturated_discriminator_is_counted_and_warned_about_once_per_run(request):
    assert saturated(5.0, -5.0) and saturated(-6.0, 7.0) and not saturated(5.0, -1.0)
    w = UpdateWatch("4-1step", max_nonfinite=3, saturation_window=2)
    for real, fake in [(5, -5), (1, -1), (5, -5), (6, -6), (7, -7), (0, 0), (5, -5), (5, -5)]:
        w.discriminator(real, fake, step=1)
    assert w.metrics()["d_saturated_steps"] == 6
    assert len(w.warnings) == 2 and "saturated for 2 micro-steps in a row" in w.warnings[0]
    w.resume({"skipped_student_updates": 2, "d_saturated_steps": 9})
    assert w.metrics() == {"skipped_student_updates": 2, "skipped_disc_updates": 0, "d_saturated_steps": 9}
    record(request, "a saturated discriminator (both sides' sigmoid beyond 0.99 / below 0.01)",
           "a warning once per `train.d_saturation_window` micro-steps in a row; counted (`d_saturated_steps`), "
           "kept across a resume", injected=6, completed=1)
