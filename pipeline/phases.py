"""The phase plan of a stage (pure): which phase, student mode and discriminator mode at which step, and
the checkpoint steps. The phases are described in `pipeline.train`'s docstring; `padistill config`
validates a stage's step counts with the same plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import StageConfig


@dataclass(frozen=True)
class Phase:
    name: str  # conversion | mse | disc_warmup | conditional | unconditional
    start: int
    end: int  # exclusive

    @property
    def adversarial(self) -> bool:
        """A phase with a discriminator (the D warm-up trains D only)."""
        return self.name in ("disc_warmup", "conditional", "unconditional")


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


def checkpoint_steps(stage: StageConfig, every: int) -> set[int]:
    """Steps (counted as completed steps) after which a checkpoint is taken: every `every`, at each
    phase end and at the end of the LoRA phase (before the merge, so the LoRA itself is exportable)."""
    phases = plan_phases(stage)
    total = phases[-1].end
    lora_end = {stage.lora.steps} if stage.lora is not None and 0 < stage.lora.steps < total else set()
    return {s for s in range(every, total + 1, every)} | {p.end for p in phases} | lora_end
