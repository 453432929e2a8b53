"""Watching a stage's updates: a non-finite loss or gradient skips its update (on every rank alike) and
is counted; `train.max_nonfinite` skipped updates of one model in a row stop the stage; a discriminator
whose logits saturate (both sides' sigmoid beyond 0.99 or below 0.01) for `train.d_saturation_window`
micro-steps in a row is warned about and counted.

A skipped update leaves the weights as they were, so every checkpoint holds finite weights and the
latest one stays the last good one when the stage stops. Gradients: DeepSpeed's ZeRO optimizers (stage
2 and 3, the only ones padistill configures) skip a step whose gradient norm is not finite and say so in
`engine.was_step_applied()`; `engines.PlainEngine` does the same check itself."""

from __future__ import annotations

import math

import torch

from .errors import PadistillError

SATURATED = 0.99  # sigmoid of a logit beyond which D's loss gives (almost) no gradient


class DivergedError(PadistillError):
    """A stage stopped because its losses or gradients stayed non-finite."""


def finite_everywhere(loss: torch.Tensor) -> bool:
    """Whether `loss` is finite on every rank: one rank's NaN skips the update on all of them, so their
    collectives (ZeRO's gradient reduction in the backward) stay matched."""
    bad = (~torch.isfinite(loss.detach())).any().to(torch.float32).reshape(1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bool(bad.item())


def saturated(d_real: float, d_fake: float) -> bool:
    """Both of D's mean logits so far out that their sigmoids are beyond 0.99 or below 0.01."""
    edge = math.log(SATURATED / (1 - SATURATED))
    return abs(d_real) > edge and abs(d_fake) > edge


class UpdateWatch:
    """Counts of one stage's skipped updates and saturated D steps, and the stop rule."""

    def __init__(self, stage_name: str, max_nonfinite: int, saturation_window: int):
        self.stage_name, self.max_nonfinite, self.window = stage_name, max_nonfinite, saturation_window
        self.skipped = {"student": 0, "disc": 0}
        self.in_a_row = {"student": 0, "disc": 0}
        self.saturated_steps, self._sat_run = 0, 0
        self.warnings: list[str] = []  # drained by the worker's log

    def resume(self, last: dict) -> None:
        """Continue the counts of the history's last entry (a resumed stage)."""
        self.skipped = {"student": int(last.get("skipped_student_updates", 0)),
                        "disc": int(last.get("skipped_disc_updates", 0))}
        self.saturated_steps = int(last.get("d_saturated_steps", 0))

    def update(self, who: str, applied: bool, step: int, why: str = "") -> None:
        """Record one update of `who` ("student" or "disc"); raises DivergedError on the
        `max_nonfinite`-th skipped update in a row."""
        if applied:
            self.in_a_row[who] = 0
            return
        self.skipped[who] += 1
        self.in_a_row[who] += 1
        if self.in_a_row[who] >= self.max_nonfinite:
            raise DivergedError(
                f"stage {self.stage_name}: {self.in_a_row[who]} {who} updates in a row skipped at step {step} "
                f"({why or 'non-finite loss or gradient'}); the latest checkpoint holds the last finite weights. "
                "Check the trajectories for NaNs, lower the stage's lr, or raise train.max_nonfinite")

    def discriminator(self, d_real: float, d_fake: float, step: int) -> None:
        """Record one D update's mean logits; warns once per saturated run of `window` micro-steps."""
        if not saturated(d_real, d_fake):
            self._sat_run = 0
            return
        self.saturated_steps += 1
        self._sat_run += 1
        if self._sat_run == self.window:
            self.warnings.append(
                f"WARNING stage {self.stage_name}: the discriminator saturated for {self.window} micro-steps in a "
                f"row (step {step}: mean logits real {d_real:.2f}, fake {d_fake:.2f}): its loss gives the "
                "student almost no gradient; consider a lower disc_lr or fewer disc_steps")

    def metrics(self) -> dict[str, int]:
        return {"skipped_student_updates": self.skipped["student"], "skipped_disc_updates": self.skipped["disc"],
                "d_saturated_steps": self.saturated_steps}
