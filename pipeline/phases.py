"""The phase plan of a stage (pure): which phase, student mode and discriminator mode at which step, and
the checkpoint steps; `padistill config` validates a stage's step counts with the same plan.

Phases of a stage (steps counted from 0, one step = `grad_accum` micro-batches per rank):

    conversion     (prediction_type "sample": `conversion_steps`) MSE of the student's x0 ("sample")
                   prediction against the x0 its initial epsilon weights (the teacher) imply, at
                   `conversion_lr` (default `lr`; the optimizer restarts at `lr` after it). A full
                   student first gets `conv_out` refitted by least squares on the first 4 micro-batches
                   of every rank (`StageLoop.fit_conversion_head`): the best linear read-out of the
                   UNet's last features, so the MSE starts near the target instead of at epsilon
    mse            (`mse_steps`) MSE of the student's one step vs the teacher's n steps: the whole of
                   a loss-mse stage, or an adversarial stage's warm-up at `mse_lr` (default `lr`; the
                   optimizer restarts at `lr` after it). Not in the paper, off by default
    disc_warmup    (adversarial: `disc_warmup_steps`) the conditional discriminator trains alone against
                   the student as it is, so that the student's first adversarial gradients come from a D
                   that already separates (not in the paper; docs/method.md has the measurements)
    conditional    (adversarial: `conditional_steps`) non-saturating GAN, alternating D / student
                   updates, conditional D(x_t, x_{t-ns}, t, c)
    unconditional  (adversarial: `unconditional_steps`) the same with D'(x_{t-ns}, c): the backbone
                   continues, the head is new

The student trains a peft LoRA for the first `lora.steps` steps of the stage (conversion included)
when `lora` is set, is then merged, and continues on the full UNet; `full_steps`, when given with a
LoRA, must be the remaining steps. For 1- and 2-step students both predictions are re-noised to
t* in `renoise_timesteps` (drawn with probabilities proportional to `renoise_weights`) before the
discriminator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .stage_config import StageConfig


@dataclass(frozen=True)
class Phase:
    name: str  # conversion | mse | disc_warmup | conditional | unconditional
    start: int
    end: int  # exclusive

    @property
    def adversarial(self) -> bool:
        """A phase with a discriminator (the D warm-up trains D only)."""
        return self.name in ("disc_warmup", "conditional", "unconditional")

    @property
    def against_d(self) -> bool:
        """A phase whose student updates are against the discriminator (the game itself)."""
        return self.name in ("conditional", "unconditional")


def plan_phases(stage: StageConfig) -> list[Phase]:
    """The stage's phases in order (and a check that its step counts make sense)."""
    where = f"stage {stage.name!r}: " if stage.name else ""  # config validation names the key itself
    phases: list[Phase] = []
    s = 0

    def add(name: str, n: int) -> None:
        nonlocal s
        if n > 0:
            phases.append(Phase(name, s, s + n))
            s += n

    if stage.prediction_type == "sample":
        add("conversion", stage.conversion_steps)
    elif stage.conversion_steps:
        raise ConfigError(f"{where}conversion_steps is for prediction_type 'sample' (the x0 conversion)")
    if stage.loss == "mse":
        if stage.conditional_steps or stage.unconditional_steps:
            raise ConfigError(f"{where}conditional_steps/unconditional_steps are for adversarial stages")
        add("mse", stage.mse_steps)
    else:
        add("mse", stage.mse_steps)  # the optional warm-up
        if stage.disc_warmup_steps and not stage.conditional_steps:
            raise ConfigError(f"{where}disc_warmup_steps trains the conditional discriminator before its phase; "
                              "set conditional_steps")
        add("disc_warmup", stage.disc_warmup_steps)
        add("conditional", stage.conditional_steps)
        add("unconditional", stage.unconditional_steps)
    if s == 0:
        raise ConfigError(f"{where}no training steps (set mse_steps, or conditional_steps/unconditional_steps)")
    if stage.lora is not None and stage.full_steps and stage.lora.steps + stage.full_steps != s:
        raise ConfigError(f"{where}lora.steps ({stage.lora.steps}) + full_steps ({stage.full_steps}) must equal "
                          f"the stage's {s} steps (conversion + loss phases)")
    if stage.lora is None and stage.full_steps and stage.full_steps != s:
        raise ConfigError(f"{where}full_steps ({stage.full_steps}) must equal the stage's {s} steps "
                          "(or be 0) when there is no LoRA phase")
    return phases


def main_phase(stage: StageConfig, phases: list[Phase]) -> Phase | None:
    """The first phase in which the student trains at the stage's main lr on the stage's own loss: the mse phase of
    an MSE stage (after any x0 conversion), the first phase against the discriminator of an adversarial one (after
    any MSE or D-only warm-up); None when the stage has none."""
    return next((p for p in phases if (p.against_d if stage.loss == "adversarial" else p.name == "mse")), None)


def main_lr_span(stage: StageConfig, phases: list[Phase]) -> tuple[int, int] | None:
    """The steps [start, end) at the stage's main lr: from its `main_phase` to the stage's end; None without one."""
    first = main_phase(stage, phases)
    return None if first is None else (first.start, phases[-1].end)


def student_lr_scale(stage: StageConfig, phases: list[Phase], step: int) -> float:
    """The factor on the student's lr at `step`: `lr_warmup_steps` N lifts it linearly, 1/N, 2/N, ... 1, over the
    student's first N updates against D; `lr_decay` cosine lowers it by a half cosine over the steps at the main lr
    (`main_lr_span`), from 1 at its first step towards 0 (which it would reach just after its last); both multiply.
    1 outside them. The decay runs on across a LoRA merge: the full UNet starts at full_lr times the factor then."""
    scale = 1.0
    game = next((p for p in phases if p.against_d), None)
    n = stage.lr_warmup_steps
    if n and game is not None and step >= game.start:
        scale = min(1.0, (step - game.start + 1) / n)
    span = main_lr_span(stage, phases) if stage.lr_decay == "cosine" else None
    if span is not None:  # (a cosine decay without a span is refused by the config)
        start, end = span
        if step >= start:
            scale *= 0.5 * (1.0 + math.cos(math.pi * (step - start) / (end - start)))
    return scale


def phase_at(phases: list[Phase], step: int) -> Phase:
    for p in phases:
        if p.start <= step < p.end:
            return p
    return phases[-1]


def student_mode_at(stage: StageConfig, step: int) -> str:
    return "lora" if stage.lora is not None and step < stage.lora.steps else "full"


def disc_mode_at(phase: Phase) -> str | None:
    if phase.name == "disc_warmup":
        return "conditional"
    return phase.name if phase.adversarial else None


def lora_export_step(stage: StageConfig) -> int | None:
    """The step that ends a LoRA phase the full UNet continues from (its checkpoint holds the LoRA itself,
    exportable as one: the paper's LoRA variant), or None."""
    total = plan_phases(stage)[-1].end
    return stage.lora.steps if stage.lora is not None and 0 < stage.lora.steps < total else None


def checkpoint_rank(stage: StageConfig, step: int) -> float:
    """How Ray Train ranks a stage's checkpoint for keeping (`train.keep_checkpoints`; higher is kept): the later
    the better, and the LoRA phase's last above all, so the LoRA outlives the checkpoints after it."""
    return step + (1e12 if step == lora_export_step(stage) else 0)


def checkpoint_steps(stage: StageConfig, every: int) -> set[int]:
    """Steps (counted as completed steps) after which a checkpoint is taken: every `every`, at each
    phase end and at the end of the LoRA phase (before the merge, so the LoRA itself is exportable)."""
    phases = plan_phases(stage)
    total = phases[-1].end
    lora_end = set() if (s := lora_export_step(stage)) is None else {s}
    return {s for s in range(every, total + 1, every)} | {p.end for p in phases} | lora_end
