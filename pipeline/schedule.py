"""Schedule math, in one place: trailing timestep grids, sigmas, the Euler step, prediction
conversions, classifier-free guidance, forward diffusion and the grids of a distillation stage; and the
flow-matching (rectified-flow) schedule of the SD3 family (`FlowMatchSchedule`).

`Schedule` works in diffusers' Euler ("sigma") space, the space `EulerDiscreteScheduler` and the
SDXL pipeline sample in:  x = x0 + sigma_t * eps,  the UNet sees x / sqrt(sigma_t**2 + 1).
A timestep of -1 stands for "clean" (sigma = 0), the end of every trajectory. `FlowMatchSchedule`
is the SD3 family's (its docstring): its noise levels are float sigmas, 0 for clean.

Both schedules speak one interface to the steps, in their own noise levels (`Schedule`: integer
timesteps, `FlowMatchSchedule`: sigmas): `clean` and `level_dtype`, `stage_pairs`, `teacher_path` (what
a teacher's rollout over one student step evaluates), `forward_diffuse`, `step` / `rollout` / `sample`,
`sigma` and `scale_input` (what the model sees), `jump_x0` and `renoise` (the discriminator's inputs),
`model_timestep` (the timestep the model is called with) and `level_of_timestep` (a stage's re-noising
timesteps t* in the model's 0..1000 units as noise levels).

Precompute (teacher rollouts), training (student steps, re-noising) and evaluation (sampling) all
call this module; there is no sampling loop outside it, and one in it (`walk`), for both schedules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

CLEAN = -1  # the timestep index of a clean sample (sigma = 0)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

# A denoiser maps (model input, timesteps as a float tensor of shape [B]) to the model's raw output: for
# `Schedule` the scaled input and integer timesteps, for `FlowMatchSchedule` x unscaled and sigma * 1000.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """diffusers' "trailing" spacing: N=4 -> [999, 749, 499, 249]. Same arithmetic as
    `EulerDiscreteScheduler.set_timesteps` so grids agree to the integer."""
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    ratio = num_train_timesteps / num_steps
    return (np.arange(num_train_timesteps, 0, -ratio).round().astype(np.int64) - 1)


def is_subgrid(student_steps: int, teacher_steps: int, num_train_timesteps: int = 1000) -> bool:
    """True when every student timestep is also a teacher timestep (needed for exact rollouts)."""
    return set(trailing_timesteps(student_steps, num_train_timesteps)) <= set(
        trailing_timesteps(teacher_steps, num_train_timesteps)
    )


def walk(step: Callable, denoise: Denoiser, x: torch.Tensor, path: Sequence, end) -> torch.Tensor:
    """The one sampling loop of both schedules: `step(denoise, x, a, b) -> (x_next, x0)` from each noise
    level of `path` (descending) to the next, the last to `end` (clean)."""
    points = [*path, end]
    for a, b in zip(points[:-1], points[1:]):
        x, _ = step(denoise, x, a, b)
    return x


@dataclass(frozen=True)
class StagePair:
    """One student step of a stage: from noise level `t` to `t_next` (integer timesteps, CLEAN = -1 for x0;
    sigmas for `FlowMatchSchedule`, 0 for x0)."""

    t: int | float
    t_next: int | float


class Schedule:
    """The noise schedule of a diffusion model (its `alphas_cumprod`) and its prediction type."""

    clean = CLEAN
    level_dtype = torch.long  # noise levels are integer timesteps

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.to(torch.float32)
        self.num_train_timesteps = int(alphas_cumprod.shape[0])
        self.prediction_type = prediction_type
        # Exactly diffusers' Euler sigmas (float32 arithmetic), indexed by integer timestep.
        self._sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    @classmethod
    def from_scheduler_config(cls, config: dict, prediction_type: str | None = None) -> "Schedule":
        """Build from a diffusers scheduler config (betas and prediction type read from it)."""
        from diffusers import EulerDiscreteScheduler

        sched = EulerDiscreteScheduler.from_config(dict(config))
        return cls(sched.alphas_cumprod, prediction_type or sched.config.prediction_type)

    # ---- grids -------------------------------------------------------------------------------
    def timesteps(self, num_steps: int) -> np.ndarray:
        return trailing_timesteps(num_steps, self.num_train_timesteps)

    def sigma(self, t) -> torch.Tensor:
        """Sigma for integer timesteps (tensor, array, list or int); CLEAN (-1) gives 0."""
        t = torch.as_tensor(t, dtype=torch.long)
        out = self._sigmas[t.clamp(min=0)]
        return torch.where(t < 0, torch.zeros_like(out), out)

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) = 1 / sigma^2 at integer timesteps."""
        return self.sigma(t) ** -2

    def init_noise_sigma(self) -> float:
        """Scale of the initial noise for trailing spacing (diffusers: the largest sigma)."""
        return float(self._sigmas[self.num_train_timesteps - 1])

    def stage_pairs(self, student_steps: int, multi_timestep: bool = False) -> list[StagePair]:
        """The student steps a stage trains on.

        Plain: the student's own trailing grid, each step to the next grid point (last to CLEAN).
        multi_timestep (SDXL-Lightning, 1- and 2-step students): the student is trained at
        timesteps {250, 500, 750, 1000} (the 4-step grid), each jumping 1000/N toward clean."""
        if not multi_timestep:
            grid = list(self.timesteps(student_steps)) + [CLEAN]
            return [StagePair(int(a), int(b)) for a, b in zip(grid[:-1], grid[1:])]
        if student_steps not in (1, 2):
            raise ValueError("multi_timestep applies to 1- and 2-step students only")
        jump = self.num_train_timesteps // student_steps
        pairs = []
        for t in self.timesteps(4):
            t_next = int(t) - jump
            pairs.append(StagePair(int(t), t_next if t_next >= 0 else CLEAN))
        return pairs

    def teacher_path(self, teacher_steps: int, t: int, t_next: int) -> list[int]:
        """The teacher-grid timesteps a rollout from `t` to `t_next` evaluates the teacher at."""
        grid = [int(x) for x in self.timesteps(teacher_steps)]
        if t not in grid or (t_next != CLEAN and t_next not in grid) or (t_next != CLEAN and t_next >= t):
            raise ValueError(f"({t} -> {t_next}) is not a path on the {teacher_steps}-step trailing grid")
        return [s for s in grid if s <= t and (t_next == CLEAN or s > t_next)]

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the model is called with at noise level(s) `t` (clean as 0), float."""
        return torch.as_tensor(t).clamp(min=0).to(torch.float32)

    def level_of_timestep(self, timesteps: Sequence[int]) -> torch.Tensor:
        """Integer timesteps (the re-noising t*) as noise levels: themselves."""
        return torch.as_tensor(timesteps, dtype=torch.long)

    # ---- conversions ---------------------------------------------------------------------------
    @staticmethod
    def _b(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(s, dtype=torch.float32, device=x.device)
        return s.reshape(-1, *([1] * (x.ndim - 1))) if s.ndim else s

    def scale_input(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return x / (self._b(sigma, x) ** 2 + 1) ** 0.5

    def to_x0(self, output: torch.Tensor, x: torch.Tensor, sigma, prediction_type: str | None = None) -> torch.Tensor:
        p = prediction_type or self.prediction_type
        s = self._b(sigma, x)
        if p == "epsilon":
            return x - s * output
        if p == "sample":
            return output
        if p == "v_prediction":
            return output * (-s / (s**2 + 1) ** 0.5) + x / (s**2 + 1)
        raise ValueError(f"unknown prediction_type {p!r}")

    def to_eps(self, x0: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
        """The epsilon implied by an x0 estimate at noise level sigma (> 0)."""
        return (x - x0) / self._b(sigma, x)

    def jump_x0(self, x: torch.Tensor, x_next: torch.Tensor, t, t_next) -> torch.Tensor:
        """The x0 of the one Euler step that goes from `x` at `t` to `x_next` at `t_next` (`euler_step`
        inverted): a teacher's n-step rollout and a student's step both become an x0 prediction, which
        the discriminator sees re-noised (SDXL-Lightning eqs. 25-26). At t_next = CLEAN it is x_next."""
        s = self._b(self.sigma(torch.as_tensor(t, dtype=torch.long).cpu()).to(x.device), x)
        sn = self._b(self.sigma(torch.as_tensor(t_next, dtype=torch.long).cpu()).to(x.device), x)
        return x - s * (x - x_next) / (s - sn)

    def euler_step(self, x: torch.Tensor, x0: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
        """One Euler step of the probability-flow ODE, as `EulerDiscreteScheduler.step` takes it."""
        s, sn = self._b(sigma, x), self._b(sigma_next, x)
        return x + (x - x0) / s * (sn - s)

    def forward_diffuse(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t = x0 + sigma_t * noise; at t = T-1 the input is pure noise (sigma_T * noise), the
        SDXL-Lightning schedule fix, matching what inference starts from."""
        t = torch.as_tensor(t, dtype=torch.long, device=x0.device)
        s = self._b(self.sigma(t.cpu()).to(x0.device), x0)
        pure = self._b((t == self.num_train_timesteps - 1).to(x0.dtype), x0)
        return x0 * (1 - pure) + s * noise

    def renoise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Plain forward diffusion (no pure-noise special case), for re-noising predictions before a
        discriminator."""
        t = torch.as_tensor(t, dtype=torch.long)
        return x0 + self._b(self.sigma(t).to(x0.device), x0) * noise

    def training_draw(self, x0: torch.Tensor, eps: torch.Tensor, g: torch.Generator):
        """One denoising-training example per row (the toy teacher's objective): a timestep uniform over
        the T training timesteps, x_t = `forward_diffuse` (pure noise at t = T-1). Returns (model input,
        its timesteps, the target: eps, or x0 for a "sample" model)."""
        if self.prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"training_draw: an {self.prediction_type!r} target is not implemented")
        t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), generator=g)
        x_t = self.forward_diffuse(x0, eps, t)
        return self.scale_input(x_t, self.sigma(t)), t.float(), eps if self.prediction_type == "epsilon" else x0

    # ---- sampling ----------------------------------------------------------------------------------
    def step(self, denoise: Denoiser, x: torch.Tensor, t, t_next, prediction_type: str | None = None):
        """Evaluate the model at timestep(s) t and take one Euler step to t_next. Returns (x_next, x0)."""
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        sigma, sigma_next = self.sigma(t), self.sigma(torch.as_tensor(t_next, dtype=torch.long))
        out = denoise(self.scale_input(x, sigma), t.to(torch.float32).to(x.device))
        x0 = self.to_x0(out.to(torch.float32), x.to(torch.float32), sigma, prediction_type)
        return self.euler_step(x.to(torch.float32), x0, sigma, sigma_next), x0

    def rollout(self, denoise: Denoiser, x: torch.Tensor, path: Sequence[int], t_end: int,
                prediction_type: str | None = None) -> torch.Tensor:
        """Euler steps through `path` (descending timesteps) ending at `t_end` (CLEAN for x0)."""
        return walk(lambda d, x_, a, b: self.step(d, x_, a, b, prediction_type), denoise, x,
                    [int(s) for s in path], int(t_end))

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        """The latents sampling starts from, given unit noise (scaled to the largest sigma, as diffusers does)."""
        return noise * self.init_noise_sigma()

    def sample(self, denoise: Denoiser, noise: torch.Tensor, num_steps: int,
               prediction_type: str | None = None) -> torch.Tensor:
        """Full N-step trailing Euler sampling from unit noise, as the stock pipeline does."""
        return self.rollout(denoise, self.start(noise), self.timesteps(num_steps), CLEAN, prediction_type)


class FlowMatchSchedule:
    """The rectified-flow schedule of the SD3 family (diffusers' `FlowMatchEulerDiscreteScheduler`, static
    `shift`): x_sigma = (1 - sigma) * x0 + sigma * eps for sigma in [0, 1]; the transformer sees x_sigma
    unscaled at timestep sigma * 1000 and predicts the velocity v = eps - x0; an Euler step is
    x + (sigma_next - sigma) * v. Noise levels are floats (sigmas), not integer indices as in `Schedule`:
    a flow model's N-step grid is the scheduler's own (N points evenly spaced in unshifted time, then
    shifted), and those grids are not nested across N, so a teacher's rollout over one student step starts
    at the step's sigma and then walks the teacher's own grid points inside the step (`teacher_path`). The student's own grid stays exactly the stock pipeline's, so an exported student
    samples right with `num_inference_steps=N` and nothing else."""

    clean = 0.0
    level_dtype = torch.float32  # noise levels are sigmas
    prediction_type = "flow"  # the velocity eps - x0; a converted student may predict x0 ("sample")

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.shift, self.num_train_timesteps = float(shift), int(num_train_timesteps)
        # the scheduler's own bounds, in its float32 arithmetic: its training sigmas are the shifted t / T
        # for t = T ... 1
        ends = torch.tensor([float(self.num_train_timesteps), 1.0]) / self.num_train_timesteps
        self.sigma_max, self.sigma_min = self.shifted(ends).tolist()

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "FlowMatchSchedule":
        """From a `FlowMatchEulerDiscreteScheduler` config; the options that bend its grid further
        (resolution-dependent shifting, a terminal stretch, Karras/exponential/beta sigmas) are refused
        by name rather than ignored."""
        bent = [k for k in ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                            "use_beta_sigmas", "invert_sigmas", "stochastic_sampling") if config.get(k)]
        if bent:
            raise ValueError(f"scheduler config: {', '.join(bent)} is not supported by padistill's flow-matching "
                             "schedule (a static shift, deterministic Euler steps)")
        return cls(config.get("shift", 1.0), config.get("num_train_timesteps", 1000))

    # ---- grids -------------------------------------------------------------------------------
    def shifted(self, u):
        """The scheduler's static shift of unshifted time u in [0, 1]."""
        return self.shift * u / (1 + (self.shift - 1) * u)

    def unshifted(self, sigma):
        return sigma / (self.shift - (self.shift - 1) * sigma)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The N sigmas the stock pipeline samples at (the terminal 0 not included), float32."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        T = self.num_train_timesteps
        u = np.linspace(self.sigma_max * T, self.sigma_min * T, num_steps) / T
        return torch.from_numpy(self.shifted(u)).to(torch.float32)

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """What the transformer is called with at each of those sigmas."""
        return self.sigmas(num_steps) * self.num_train_timesteps

    def stage_pairs(self, student_steps: int, multi_timestep: bool = False) -> list[StagePair]:
        """The student steps a stage trains on, as sigmas (0: clean). Plain: the student's own stock grid,
        each step to the next (the last to clean). multi_timestep (1- and 2-step students): from each sigma
        of the 4-step grid, a jump of 1/N in unshifted time toward clean (clean once it would pass it), as
        `Schedule.stage_pairs` jumps 1000/N timesteps, and the student's own stock steps where those jumps
        miss them (the stock 2-step grid is 1 -> the smallest sigma -> 0, which no 1/2 jump takes)."""
        own = [StagePair(a, b) for a, b in zip(self.sigmas(student_steps).tolist(),
                                               self.sigmas(student_steps).tolist()[1:] + [self.clean])]
        if not multi_timestep:
            return own
        if student_steps not in (1, 2):
            raise ValueError("multi_timestep applies to 1- and 2-step students only")
        pairs = []
        for s in self.sigmas(4).tolist():
            u_next = float(self.unshifted(torch.tensor(s))) - 1.0 / student_steps
            nxt = float(self.shifted(torch.tensor(u_next))) if u_next > 1e-6 else self.clean
            pairs.append(StagePair(s, nxt))
        return pairs + [p for p in own if p not in pairs]

    def teacher_path(self, teacher_steps: int, sigma: float, sigma_next: float) -> list[float]:
        """The sigmas a teacher's rollout from `sigma` to `sigma_next` evaluates at: `sigma` (where x_t is),
        then the points of the teacher's own stock `teacher_steps` grid between the two; the rollout's last
        step ends at `sigma_next` on the teacher's own Euler line (a distilled teacher is evaluated where it
        was trained, except at a `sigma` off its grid: the stock grids are not nested across N)."""
        if not 0 <= sigma_next < sigma <= 1:
            raise ValueError(f"({sigma} -> {sigma_next}) is not a step toward clean")
        if teacher_steps < 1:
            raise ValueError(f"teacher_steps must be >= 1, got {teacher_steps}")
        eps = 1e-6  # float32 grid points that equal `sigma` are `sigma` itself
        return [float(sigma)] + [p for p in self.sigmas(teacher_steps).tolist() if sigma_next + eps < p < sigma - eps]

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep the transformer is called with at sigma(s): sigma * 1000."""
        return torch.as_tensor(sigma, dtype=torch.float32) * self.num_train_timesteps

    def level_of_timestep(self, timesteps: Sequence[int]) -> torch.Tensor:
        """Timesteps in the model's units (the re-noising t*) as sigmas: t / 1000."""
        return torch.as_tensor(timesteps, dtype=torch.float32) / self.num_train_timesteps

    def sigma(self, sigma) -> torch.Tensor:
        """A flow model's noise level is its sigma."""
        return torch.as_tensor(sigma, dtype=torch.float32)

    # ---- conversions ---------------------------------------------------------------------------
    _b = staticmethod(Schedule._b)

    def scale_input(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The transformer sees x_sigma unscaled."""
        return x

    def jump_x0(self, x: torch.Tensor, x_next: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
        """The x0 of the one Euler step from `x` at sigma to `x_next` at sigma_next (`step` inverted; at
        sigma_next = 0 it is x_next), as `Schedule.jump_x0`."""
        s, sn = self._b(self.sigma(sigma).to(x.device), x), self._b(self.sigma(sigma_next).to(x.device), x)
        return x - s * (x - x_next) / (s - sn)

    def forward_diffuse(self, x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
        """x_sigma = (1 - sigma) x0 + sigma noise (sigma = 1: pure noise, as sampling starts)."""
        s = self._b(sigma, x0)
        return (1 - s) * x0 + s * noise

    renoise = forward_diffuse

    def to_x0(self, velocity: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
        return x - self._b(sigma, x) * velocity

    def to_velocity(self, x0: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
        """The velocity implied by an x0 estimate at noise level sigma (> 0)."""
        return (x - x0) / self._b(sigma, x)

    def training_draw(self, x0: torch.Tensor, eps: torch.Tensor, g: torch.Generator):
        """One rectified-flow training example per row (the toy teacher's objective, SD3's recipe): unshifted
        time logit-normal (sigmoid of a standard normal), shifted to sigma, x_sigma = `forward_diffuse`.
        Returns (model input, its timesteps sigma * 1000, the target velocity eps - x0)."""
        sigma = self.shifted(torch.sigmoid(torch.randn(x0.shape[0], generator=g)))
        return self.forward_diffuse(x0, eps, sigma), sigma * self.num_train_timesteps, eps - x0

    # ---- sampling ----------------------------------------------------------------------------------
    def step(self, denoise: Denoiser, x: torch.Tensor, sigma, sigma_next, prediction_type: str | None = None):
        """Evaluate the model at `sigma` and take one Euler step to `sigma_next`, as
        `FlowMatchEulerDiscreteScheduler.step` does (the model's output is the velocity, or x0 for
        `prediction_type="sample"`). Returns (x_next, x0)."""
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).to(x.device)
        if s.numel() == 1:
            s = s.expand(x.shape[0])
        out = denoise(x, s * self.num_train_timesteps).to(torch.float32)
        x = x.to(torch.float32)
        p = prediction_type or self.prediction_type
        if p not in ("flow", "sample"):
            raise ValueError(f"a flow-matching model predicts 'flow' (the velocity) or 'sample', not {p!r}")
        v = out if p == "flow" else self.to_velocity(out, x, s)
        sn = torch.as_tensor(sigma_next, dtype=torch.float32).to(x.device)
        return x + (self._b(sn, x) - self._b(s, x)) * v, (self.to_x0(v, x, s) if p == "flow" else out)

    def rollout(self, denoise: Denoiser, x: torch.Tensor, path: Sequence[float], sigma_end: float,
                prediction_type: str | None = None) -> torch.Tensor:
        """Euler steps through `path` (descending sigmas) ending at `sigma_end` (0 for x0)."""
        return walk(lambda d, x_, a, b: self.step(d, x_, a, b, prediction_type), denoise, x,
                    [float(s) for s in path], float(sigma_end))

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        """The latents sampling starts from, given unit noise (at sigma 1 they are the noise)."""
        return noise

    def sample(self, denoise: Denoiser, noise: torch.Tensor, num_steps: int,
               prediction_type: str | None = None) -> torch.Tensor:
        """Full N-step sampling from unit noise, as the stock SD3 pipeline does."""
        return self.rollout(denoise, self.start(noise), self.sigmas(num_steps).tolist(), self.clean, prediction_type)


def cfg(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance."""
    return uncond + guidance_scale * (cond - uncond)


@dataclass
class Conditioning:
    """Text conditioning for a batch. Every family: prompt embeddings [B, L, D]. SDXL and SD3 add a pooled
    embedding [B, P]; SDXL also the size/crop time ids [B, 6] (`text_time`); SD1.5 has neither (None).
    `uncond` is the family's unconditional branch for classifier-free guidance, one row (prompt embeddings
    [1, L, D], pooled [1, P] where the family has one): the empty prompt's encoding (SD1.5, SD3); None
    means zeros (SDXL's force_zeros_for_empty_prompt)."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    uncond: "Conditioning | None" = None

    @staticmethod
    def sdxl_time_ids(batch: int, resolution: int, dtype=torch.float32, device=None) -> torch.Tensor:
        """(orig_h, orig_w, crop_top, crop_left, target_h, target_w), what the pipeline passes."""
        ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype, device=device)
        return ids.expand(batch, 6).clone()

    @staticmethod
    def from_columns(cols: dict, resolution: int, device=None, uncond: "Conditioning | None" = None) -> "Conditioning":
        """The conditioning of stored rows (`pipeline.encode`'s columns): SDXL and SD3 rows carry
        `pooled_embeds` and get the run's resolution as time ids (an SD3 transformer's call and its
        discriminator do not read them), SD1.5 rows `prompt_embeds` only."""
        pe = torch.as_tensor(cols["prompt_embeds"]).to(device, torch.float32)
        if "pooled_embeds" not in cols:
            return Conditioning(pe, uncond=uncond)
        return Conditioning(pe, torch.as_tensor(cols["pooled_embeds"]).to(device, torch.float32),
                            Conditioning.sdxl_time_ids(pe.shape[0], resolution, torch.float32, device), uncond)

    def _map(self, f) -> "Conditioning":
        return Conditioning(f(self.prompt_embeds), *(None if v is None else f(v) for v in (self.pooled, self.time_ids)),
                            self.uncond)

    def select(self, idx) -> "Conditioning":
        """Rows `idx` (an index tensor or a slice)."""
        return self._map(lambda v: v[idx])

    def repeat(self, k: int) -> "Conditioning":
        """The batch stacked k times."""
        return self._map(lambda v: v.repeat(k, *([1] * (v.dim() - 1))))

    def unconditional(self) -> "Conditioning":
        """The unconditional branch of the family's pipeline for this batch: `uncond`'s row for every row
        where the family has one, zeros otherwise (SDXL pipelines, force_zeros_for_empty_prompt=True);
        the time ids are kept."""
        def like(u, v):
            return torch.zeros_like(v) if u is None else u.to(v).expand_as(v)

        u = self.uncond
        return Conditioning(like(u and u.prompt_embeds, self.prompt_embeds),
                            None if self.pooled is None else like(u and u.pooled, self.pooled), self.time_ids, u)

    def drop(self, keep: torch.Tensor) -> "Conditioning":
        """Caption dropout: row i stays conditional where keep[i] is 1, becomes unconditional where 0."""
        u = self.unconditional()
        k = keep.to(self.prompt_embeds.dtype)
        return Conditioning(torch.lerp(u.prompt_embeds, self.prompt_embeds, k[:, None, None]),
                            None if self.pooled is None else torch.lerp(u.pooled, self.pooled, k[:, None]),
                            self.time_ids, self.uncond)

    def cat(self, other: "Conditioning") -> "Conditioning":
        return Conditioning(torch.cat([self.prompt_embeds, other.prompt_embeds]),
                            *(None if a is None else torch.cat([a, b])
                              for a, b in ((self.pooled, other.pooled), (self.time_ids, other.time_ids))),
                            self.uncond)

    def to(self, device=None, dtype=None) -> "Conditioning":
        c = self._map(lambda v: v.to(device, dtype))
        c.uncond = None if self.uncond is None else self.uncond.to(device, dtype)
        return c

    def added_cond_kwargs(self, dtype=None) -> dict | None:
        """A UNet's `added_cond_kwargs`: SDXL's pooled text and time ids, None for SD1.5."""
        if self.time_ids is None:
            return None
        return {"text_embeds": self.pooled.to(dtype), "time_ids": self.time_ids.to(dtype)}


def model_call(model) -> Callable:
    """How a denoiser is called on (x, t, Conditioning): a diffusers UNet2DConditionModel (SDXL, SD1.5:
    cross-attention on the prompt embeddings, SDXL's `added_cond_kwargs`) or an SD3Transformer2DModel (joint
    attention on the prompt embeddings, the pooled embedding as `pooled_projections`)."""
    dtype = next(model.parameters()).dtype
    if hasattr(getattr(model, "module", model).config, "joint_attention_dim"):  # a training engine wraps the model
        return lambda x, t, c: model(hidden_states=x.to(dtype), timestep=t,
                                     encoder_hidden_states=c.prompt_embeds.to(dtype),
                                     pooled_projections=c.pooled.to(dtype), return_dict=False)[0]
    return lambda x, t, c: model(x.to(dtype), t, encoder_hidden_states=c.prompt_embeds.to(dtype),
                                 added_cond_kwargs=c.added_cond_kwargs(dtype), return_dict=False)[0]


def unet_denoiser(unet, cond: Conditioning, guidance_scale: float = 0.0,
                  uncond: Conditioning | None = None) -> Denoiser:
    """Wrap a denoiser (a UNet, or an SD3 transformer: `model_call`) as a Denoiser; guidance_scale > 1 runs
    classifier-free guidance with `uncond` (by default the family's unconditional branch,
    `Conditioning.unconditional`)."""
    call = model_call(unet)
    if guidance_scale <= 1.0:
        return lambda x, t: call(x, t, cond)
    both = (uncond if uncond is not None else cond.unconditional()).cat(cond)

    def guided(x, t):
        out_u, out_c = call(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return cfg(out_u, out_c, guidance_scale)

    return guided


def sdxl_scheduler(prediction_type: str = "epsilon"):
    """SDXL's betas with Euler and trailing spacing: what every padistill student samples with."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", timestep_spacing="trailing",
                                  prediction_type=prediction_type, steps_offset=1)
