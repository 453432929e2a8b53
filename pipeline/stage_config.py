"""One distillation stage's typed config (`stages.<k>` of a run config): its step counts, loss and
phases, the student's optimiser, and the discriminator and re-noising of an adversarial stage. Checked
against the trainer's own phase plan (`pipeline.phases`), so a step count that makes no phases is
rejected by `padistill config`, not on the cluster."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .phases import main_lr_span, plan_phases


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Strict):
    rank: int = Field(64, gt=0)
    alpha: Optional[float] = None  # defaults to rank
    steps: int = Field(0, ge=0, description="LoRA steps before merging into the full UNet")


class StageConfig(_Strict):
    name: Optional[str] = None  # default "<student_steps>step"
    teacher_steps: int = Field(..., ge=1)
    student_steps: int = Field(..., ge=1)
    loss: Literal["mse", "adversarial"]
    teacher_stage: Optional[str] = None  # an earlier stage whose student teaches (skip-level); default previous
    guidance_scale: float = Field(0.0, ge=0.0, description="teacher CFG (>1 enables it); the first stage only")
    multi_timestep: bool = False  # train the 1/2-step student at {250, 500, 750, 1000}
    prediction_type: Literal["epsilon", "sample"] = "epsilon"  # "sample": x0 conversion (1-step)
    conversion_steps: int = Field(0, ge=0, description="MSE steps converting to x0 prediction first")
    lora: Optional[LoraConfig] = None
    full_steps: int = Field(0, ge=0, description="full-UNet steps (after any LoRA phase)")
    conditional_steps: int = Field(0, ge=0, description="adversarial phase 1: conditional discriminator")
    unconditional_steps: int = Field(0, ge=0, description="adversarial phase 2: unconditional discriminator")
    mse_steps: int = Field(0, ge=0, description="steps of an mse stage; in an adversarial stage, an MSE "
                           "warm-up before the adversarial phases (not in the paper; default 0)")
    mse_lr: Optional[float] = Field(None, gt=0, description="student lr of an adversarial stage's MSE "
                                    "warm-up (default lr)")
    lr: float = Field(1e-5, gt=0)
    disc_lr: Optional[float] = Field(None, gt=0)
    conversion_lr: Optional[float] = Field(None, gt=0, description="student lr of the x0 conversion (default lr)")
    lr_warmup_steps: int = Field(0, ge=0, description="the student's lr rises linearly to the lr in force (lr; "
                                 "full_lr after a LoRA merge) over its first lr_warmup_steps steps against the "
                                 "discriminator, so that D keeps up with the student's first moves (not in the "
                                 "paper; default 0: off)")
    lr_decay: Literal["none", "cosine"] = Field("none", description="cosine: the student's lr falls from the lr in "
                                                "force towards 0 by a half cosine over the stage's steps at its main "
                                                "lr (the mse phase of an MSE stage, after any x0 conversion; the "
                                                "conditional and unconditional phases of an adversarial one, across "
                                                "a LoRA merge), so that the last updates are small (not in the "
                                                "paper; default none: constant)")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    full_lr: Optional[float] = Field(None, gt=0, description="student lr on the full UNet after a LoRA phase is "
                                     "merged (paper: LoRA 1e-6, full 5e-7; default lr)")
    student_init: Optional[str] = Field(None, description="an earlier stage whose student the student starts from "
                                        "(default: the previous stage's, the base model for the first stage); with "
                                        "a skip-level teacher_stage the paper starts from the previous student")
    # -- the discriminator ----------------------------------------------------------------------------------
    disc_init: Literal["base", "teacher"] = Field("base", description="initialise D's backbone from the base model "
                                                  "(model.source, the paper) or from this stage's teacher")
    disc_backbone: Literal["trained", "frozen", "cnn"] = Field("trained", description=(
        "trained: the UNet encoder copy trains whole with its head (the paper); frozen: only the head trains "
        "(an ablation); cnn: a small plain CNN on the latents instead of the UNet encoder (an ablation)"))
    disc_blocks: Optional[int] = Field(None, ge=1, description="SD3: how many of the transformer's first blocks "
                                       "D's backbone copies (default half; 1 to its block count - 1); UNet families "
                                       "copy the encoder half and refuse the key")
    disc_warmup_steps: int = Field(0, ge=0, description="steps that train the conditional discriminator alone "
                                   "(the student frozen) before the conditional phase (not in the paper; default 0)")
    disc_steps: int = Field(1, ge=1, description="discriminator updates per student update in the adversarial "
                            "phases (each on its own micro-batch)")
    disc_betas: Optional[tuple[float, float]] = Field(None, description="D's Adam betas (default betas)")
    mse_weight: float = Field(0.0, ge=0.0, description="adds mse_weight x MSE(student, teacher) to the student's "
                              "adversarial loss (not in the paper; 0: pure adversarial)")
    renoise: Optional[bool] = Field(None, description="re-noise both predictions' x0 to t* before D (paper eqs. "
                                    "25-26); default: on for 1- and 2-step students")
    renoise_timesteps: list[int] = Field(default_factory=lambda: [10, 250, 500, 750])
    renoise_weights: list[float] = Field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    renoise_stable_weights: Optional[list[float]] = Field(None, description="t* weights once training is stable "
                                                          "(paper: 5:1:1:1 after 1:1:1:1)")
    renoise_stable_step: Optional[int] = Field(None, ge=0, description="the stage step from which "
                                               "renoise_stable_weights apply")

    @model_validator(mode="after")
    def _check(self):
        if self.student_steps >= self.teacher_steps:
            raise ValueError(f"student_steps: {self.student_steps} must be fewer than teacher_steps "
                             f"{self.teacher_steps}")
        if self.teacher_steps % self.student_steps:
            raise ValueError(f"student_steps: {self.teacher_steps} -> {self.student_steps} is impossible, "
                             f"{self.student_steps} does not divide {self.teacher_steps}")
        if self.multi_timestep and self.student_steps > 2:
            raise ValueError("multi_timestep: only for 1- and 2-step students")
        if self.multi_timestep and self.teacher_steps % 4:
            raise ValueError("multi_timestep: the teacher's grid must contain the 4-step grid "
                             "(teacher_steps a multiple of 4)")
        if self.prediction_type == "sample" and self.student_steps != 1:
            raise ValueError("prediction_type: 'sample' (x0) conversion is for the 1-step student")
        if self.mse_lr is not None and self.loss == "mse":
            raise ValueError("mse_lr: is for the MSE warm-up of an adversarial stage; an mse stage uses lr")
        if len(self.renoise_timesteps) != len(self.renoise_weights):
            raise ValueError("renoise_weights: needs one weight per renoise_timesteps entry")
        if (self.renoise_stable_weights is None) != (self.renoise_stable_step is None):
            raise ValueError("renoise_stable_weights: set it together with renoise_stable_step (the step from "
                             "which it applies)")
        if self.renoise_stable_weights is not None and len(self.renoise_stable_weights) != len(self.renoise_timesteps):
            raise ValueError("renoise_stable_weights: needs one weight per renoise_timesteps entry")
        if self.full_lr is not None and self.lora is None:
            raise ValueError("full_lr: is the lr after a LoRA phase is merged; without lora use lr")
        if self.loss == "mse":
            for k in ("disc_lr", "disc_betas", "renoise", "renoise_stable_weights"):
                if getattr(self, k) is not None:
                    raise ValueError(f"{k}: is for adversarial stages (this stage's loss is mse)")
            for k in ("mse_weight", "disc_warmup_steps", "lr_warmup_steps"):
                if getattr(self, k):
                    raise ValueError(f"{k}: is for adversarial stages (this stage's loss is mse)")
        if self.lr_warmup_steps > self.conditional_steps + self.unconditional_steps:  # (MSE stages refused above)
            raise ValueError(f"lr_warmup_steps: {self.lr_warmup_steps} is more than the stage's "
                             f"{self.conditional_steps + self.unconditional_steps} student steps against the "
                             "discriminator (conditional_steps + unconditional_steps)")
        phases = plan_phases(self)  # the trainer's own plan: step counts that make no phases are rejected here
        if self.lr_decay != "none" and main_lr_span(self, phases) is None:
            raise ValueError(f"lr_decay: {self.lr_decay} decays the lr of the stage's "
                             + ("steps against the discriminator (conditional_steps + unconditional_steps), and "
                                "it has none" if self.loss == "adversarial" else "mse phase, and it has no mse_steps"))
        if self.name is None:
            self.name = f"{self.student_steps}step"
        return self

    @property
    def uses_renoise(self) -> bool:
        """Whether D sees the predictions' x0 re-noised to t* (default: 1- and 2-step students)."""
        return self.student_steps <= 2 if self.renoise is None else self.renoise

    def renoise_weights_at(self, step: int) -> list[float]:
        if self.renoise_stable_weights is not None and step >= self.renoise_stable_step:
            return list(self.renoise_stable_weights)
        return list(self.renoise_weights)

    @property
    def jump(self) -> int:
        """n: teacher steps per student step."""
        return self.teacher_steps // self.student_steps
