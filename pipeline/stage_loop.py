"""The algorithm of one stage: `StageLoop` builds the student (LoRA or full, x0 conversion) and the
discriminator, and runs one micro-step of each phase (MSE, conversion, discriminator warm-up,
conditional and unconditional adversarial updates with re-noising); its `evaluate` scores the held rows.
No Ray, object storage or logging here: the Ray Train worker (`pipeline.train_worker`) and the bare benchmark
loop (benchmarks/train_step.py) drive it with their own engines (`pipeline.engines`)."""

from __future__ import annotations

import gc
from typing import Callable

import numpy as np
import torch

from . import student as student_mod
from .config import RunConfig
from .stage_config import StageConfig
from .discriminator import Discriminator, nonsaturating_d_loss, nonsaturating_g_loss
from .engines import all_reduce, checkpoint_activations, set_lr
from .guard import UpdateWatch, finite_everywhere
from .phases import Phase, disc_mode_at, phase_at, plan_phases, student_lr_scale, student_mode_at
from .schedule import Conditioning, FlowMatchSchedule, Schedule, unet_denoiser

# the trajectory columns a micro-batch carries (`pipeline.trajectories` writes them; pooled_embeds: SDXL and SD3)
TRAIN_COLUMNS = ["t", "t_next", "x_t", "target", "prompt_embeds", "pooled_embeds"]


def train_columns(names) -> list[str]:
    """`TRAIN_COLUMNS` present among `names` (a dataset's columns, a batch's keys)."""
    return [c for c in TRAIN_COLUMNS if c in names]


class StageLoop:
    """Student (and discriminator) of one stage, their phase transitions and one micro-step of each
    loss. `engines` is DeepSpeedEngines (training) or PlainEngines (the bare reference loop).

    `init_unet`: the UNet the student starts from (the previous stage's student, which is the stage's
    teacher unless the teacher is skip-level), kept frozen as the x0 conversion's reference.
    `disc_unet`: the UNet whose encoder initialises the discriminator (the base model, `disc_init`;
    default `init_unet`). The trajectories' targets are the teacher's: the teacher itself is not needed."""

    def __init__(self, cfg: RunConfig, stage: StageConfig, schedule: Schedule | FlowMatchSchedule, init_unet, engines,
                 device, seed: int = 0, disc_unet=None):
        self.cfg, self.stage, self.schedule, self.engines = cfg, stage, schedule, engines
        self.init_unet = init_unet.requires_grad_(False).eval()
        self.disc_unet = disc_unet if disc_unet is not None else self.init_unet
        self.step = 0  # the stage step the models were last brought to (`transition`)
        self.device = torch.device(device)
        self.phases = plan_phases(stage)
        self.total = self.phases[-1].end
        self.student = None  # engine
        self.student_mode: str | None = None
        self.student_lr: float | None = None
        self.disc = None  # engine
        self.disc_mode: str | None = None
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.renoise_t = schedule.level_of_timestep(stage.renoise_timesteps)  # t* as noise levels
        self.student_ptype = "sample" if stage.prediction_type == "sample" else schedule.prediction_type
        self.disc_lr = stage.disc_lr or stage.lr
        self.disc_betas = stage.disc_betas or stage.betas
        self.conversion_init_batches = 4  # micro-batches per rank for the least-squares conv_out fit
        self.conversion_init: dict[str, float] | None = None
        self._pending_student = None
        self.watch = UpdateWatch(stage.name, cfg.train.max_nonfinite, cfg.train.d_saturation_window)

    # -- building -----------------------------------------------------------------------------------------
    def _student_module(self, mode: str):
        import copy

        unet = copy.deepcopy(self.init_unet).requires_grad_(True).train()
        if mode == "lora":
            student_mod.add_lora(unet, self.stage.lora.rank, self.stage.lora.alpha)
        return unet

    def student_lr_at(self, step: int) -> float:
        """The student's learning rate at `step`: `conversion_lr` in the x0 conversion, `mse_lr` in an
        adversarial stage's MSE warm-up, `full_lr` on the full UNet after a LoRA phase, `lr` otherwise."""
        name = phase_at(self.phases, step).name
        if name == "conversion" and self.stage.conversion_lr:
            return self.stage.conversion_lr
        if name == "mse" and self.stage.mse_lr:
            return self.stage.mse_lr
        if self.stage.full_lr and student_mode_at(self.stage, step) == "full":
            return self.stage.full_lr
        return self.stage.lr

    def student_lr_scale_at(self, step: int) -> float:
        """The factor on the student's lr at `step` (its warm-up and decay: `phases.student_lr_scale`)."""
        return student_lr_scale(self.stage, self.phases, step)

    def build_student(self, mode: str, state_dict: dict | None = None,
                      init_batches: list[dict] | None = None, lr: float | None = None) -> None:
        if self.student is not None:
            self.engines.destroy(self.student)
            self.student = None
            gc.collect()
        unet = self._student_module(mode)
        if state_dict is not None:
            unet.load_state_dict(state_dict)
        if self.cfg.train.gradient_checkpointing:
            checkpoint_activations(unet)
        if init_batches is not None and mode == "full":
            self._pending_student = unet
            try:
                self.conversion_init = self.fit_conversion_head(init_batches)
            finally:
                self._pending_student = None
        self.student_lr = lr if lr is not None else self.stage.lr
        self.student = self.engines.make(unet, self.student_lr, self.stage.betas, self.stage.weight_decay)
        self.student_mode = mode

    @torch.no_grad()
    def fit_conversion_head(self, batches: list[dict], ridge: float = 1e-3) -> dict[str, float]:
        """Start the x0 conversion from the best linear read-out: refit the student's `conv_out` (a
        linear map of the UNet's last features) by ridge least squares so that its direct ("sample")
        output approximates the x0 the epsilon weights imply on `batches`. The normal equations are
        summed over ranks (every rank solves the same system: identical weights, as ZeRO needs).
        Called on the plain module before its engine exists (full student at the conversion start).
        Returns the relative RMS error of the sample output before and after on these batches."""

        unet = self._pending_student
        conv = unet.conv_out
        feats: list[torch.Tensor] = []
        hook = conv.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
        gram = rhs = None
        err = torch.zeros(2, dtype=torch.float64)  # [sum sq err before, sum sq target]
        conds = [self.cond(b) for b in batches]
        targets = [student_mod.implied_x0(self.schedule, unet_denoiser(self.init_unet, c), b["x_t"], b["t"])
                   for b, c in zip(batches, conds)]
        try:
            for b, cond, target in zip(batches, conds, targets):
                feats.clear()
                _, x0 = self.schedule.step(unet_denoiser(unet, cond), b["x_t"], b["t"], b["t"], "sample")
                err += torch.tensor([(x0 - target).double().pow(2).sum().item(),
                                     target.double().pow(2).sum().item()])
                for f_i, y_i in zip(feats[0], target):  # one sample at a time: SDXL's maps are large
                    cols = torch.nn.functional.unfold(f_i[None].float(), conv.kernel_size, dilation=conv.dilation,
                                                      padding=conv.padding, stride=conv.stride)[0]
                    x = torch.cat([cols.T, torch.ones(cols.shape[1], 1, dtype=cols.dtype, device=cols.device)], 1)
                    y = y_i.reshape(y_i.shape[0], -1).T.float()
                    g, r = (x.T @ x).double().cpu(), (x.T @ y).double().cpu()
                    gram, rhs = (g, r) if gram is None else (gram + g, rhs + r)
        finally:
            hook.remove()

        gram, rhs, err = all_reduce(gram), all_reduce(rhs), all_reduce(err)
        lam = ridge * gram.diagonal().mean()
        w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), rhs)
        conv.weight.copy_(w[:-1].T.reshape(conv.weight.shape).to(conv.weight))
        conv.bias.copy_(w[-1].to(conv.bias))
        err_after = torch.zeros(1, dtype=torch.float64)
        for b, cond, target in zip(batches, conds, targets):
            _, x0 = self.schedule.step(unet_denoiser(unet, cond), b["x_t"], b["t"], b["t"], "sample")
            err_after += (x0 - target).double().pow(2).sum().item()
        err_after = all_reduce(err_after)
        return {"rel_before": float((err[0] / err[1]).sqrt()), "rel_after": float((err_after[0] / err[1]).sqrt())}

    def build_disc(self, mode: str, backbone_state: dict | None = None) -> None:
        if self.disc is not None:
            self.engines.destroy(self.disc)
            self.disc = None
            gc.collect()
        d = Discriminator(self.disc_unet, conditional=(mode == "conditional"), backbone_kind=self.stage.disc_backbone,
                          blocks=self.stage.disc_blocks)
        if backbone_state is not None:
            d.backbone.load_state_dict(backbone_state)
        d = d.to(self.device)
        if self.cfg.train.gradient_checkpointing and self.stage.disc_backbone != "cnn":
            checkpoint_activations(d)
        d.train()
        self.disc = self.engines.make(d, self.disc_lr, self.disc_betas, self.stage.weight_decay)
        self.disc_mode = mode

    @property
    def disc_counts(self) -> tuple[int, int] | None:
        """(parameters in D's optimizer, D's parameters), or None without a discriminator."""
        return None if self.disc is None else self.disc.padistill_counts

    def transition(self, step: int, next_batch: Callable[[], dict] | None = None) -> list[str]:
        """Bring the models to what step `step` needs (merge the LoRA, start or switch the
        discriminator, set the student's lr with its warm-up and decay). Collective under ZeRO-3: every rank calls it at the same steps. A fresh
        student whose first phase is the x0 conversion starts from the least-squares `conv_out`
        (`fit_conversion_head`, on `conversion_init_batches` micro-batches drawn with `next_batch`)."""
        events = []
        self.step = step
        want_s = student_mode_at(self.stage, step)
        if self.student is None:
            init = None
            if (step == 0 and self.phases[0].name == "conversion" and want_s == "full" and next_batch is not None
                    and self.conversion_init_batches > 0):
                init = [next_batch() for _ in range(self.conversion_init_batches)]
            self.build_student(want_s, init_batches=init, lr=self.student_lr_at(step))
            if self.conversion_init is not None:
                events.append("x0 conversion: conv_out fitted by least squares, relative RMS error of the sample "
                              f"output {self.conversion_init['rel_before']:.3f} -> "
                              f"{self.conversion_init['rel_after']:.3f} on {len(init)} micro-batch(es) per rank")
        elif self.student_mode == "lora" and want_s == "full":
            sd = self.engines.full_state_dict(self.student)
            unet = self._student_module("lora")
            unet.load_state_dict(sd)
            merged = student_mod.merge_lora(unet).state_dict()
            self.build_student("full", merged, lr=self.student_lr_at(step))
            events.append(f"merged the LoRA into the full UNet at step {step}")
        elif self.student_lr != self.student_lr_at(step):  # conversion_lr/mse_lr -> lr: a fresh optimizer
            self.build_student(self.student_mode, self.engines.full_state_dict(self.student),
                               lr=self.student_lr_at(step))
            events.append(f"student optimizer restarted at lr {self.student_lr:g} at step {step}")
        set_lr(self.student, self.student_lr * self.student_lr_scale_at(step))  # its warm-up and decay, if any
        want_d = disc_mode_at(phase_at(self.phases, step))
        if want_d is not None and self.disc is None:
            self.build_disc(want_d)
            whose = f"the {'base model' if self.stage.disc_init == 'base' else 'teacher'}'s"
            blocks = getattr(self.disc.module.backbone, "transformer_blocks", None)
            if self.stage.disc_backbone == "cnn":
                src = "a plain CNN"
            elif blocks is not None:
                src = (f"{whose} first {len(blocks)} of {len(self.disc_unet.transformer_blocks)} transformer "
                       f"blocks ({self.stage.disc_backbone})")
            else:
                src = f"{whose} encoder ({self.stage.disc_backbone})"
            opt, total = self.disc_counts
            events.append(f"discriminator ({want_d}) built from {src} at step {step}: {opt:,} of {total:,} "
                          "parameters train")
        elif want_d is not None and want_d != self.disc_mode:
            sd = self.engines.full_state_dict(self.disc)
            bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
            self.build_disc(want_d, bb)
            events.append(f"discriminator switched to {want_d} (backbone kept, new head) at step {step}")
        return events

    # -- pieces ---------------------------------------------------------------------------------------------
    def batch_to(self, b: dict) -> dict:
        out = {}
        for k in train_columns(b):
            v = torch.as_tensor(b[k])
            out[k] = v.to(self.device, self.schedule.level_dtype if k in ("t", "t_next") else torch.float32)
        return out

    def cond(self, b: dict) -> Conditioning:
        return Conditioning.from_columns(b, self.cfg.model.resolution, self.device)

    def student_step(self, b: dict, cond: Conditioning, prediction_type: str | None = None):
        den = unet_denoiser(self.student, cond)
        return self.schedule.step(den, b["x_t"], b["t"], b["t_next"], prediction_type or self.student_ptype)

    def d_inputs(self, b: dict, x_next: torch.Tensor, gen: torch.Generator | None = None, paired: bool = False):
        """What the discriminator sees of one micro-batch, in one place for training and evaluation:
        (real input, fake input, their timesteps, x_t's scaled input). Real is the teacher's rollout
        target, fake the student's step (`x_next`). With re-noising (`StageConfig.uses_renoise`) both
        become the x0 of their jump (`Schedule.jump_x0`), re-noised to t* drawn from `renoise_timesteps`
        with the weights in force at this step (SDXL-Lightning eqs. 25-26); else D sees them at t_next.
        `paired`: real and fake of a row share t* and noise (the held paired accuracy)."""
        t, t_next = b["t"], b["t_next"]
        xt_in = self.schedule.scale_input(b["x_t"], self.schedule.sigma(t.cpu()))
        if not self.stage.uses_renoise:
            sigma = self.schedule.sigma(t_next.cpu())
            t_hat = self.schedule.model_timestep(t_next).to(self.device)
            return (self.schedule.scale_input(b["target"], sigma), self.schedule.scale_input(x_next, sigma),
                    t_hat, xt_in)
        g = gen or self.gen
        n = x_next.shape[0]
        w = torch.tensor(self.stage.renoise_weights_at(self.step), dtype=torch.float64)
        t_star = self.renoise_t[torch.multinomial(w / w.sum(), n, replacement=True, generator=g)]
        shape = (n,) + tuple(x_next.shape[1:])
        n_real = torch.randn(shape, generator=g).to(self.device)
        n_fake = n_real if paired else torch.randn(shape, generator=g).to(self.device)
        sigma = self.schedule.sigma(t_star)
        x0_real = self.schedule.jump_x0(b["x_t"], b["target"], t, t_next)
        x0_fake = self.schedule.jump_x0(b["x_t"], x_next, t, t_next)
        real = self.schedule.scale_input(self.schedule.renoise(x0_real, n_real, t_star), sigma)
        fake = self.schedule.scale_input(self.schedule.renoise(x0_fake, n_fake, t_star), sigma)
        return real, fake, self.schedule.model_timestep(t_star).to(self.device), xt_in

    def _dcall(self, x_hat, t_hat, cond: Conditioning, xt_in, t, k: int = 1, frozen: bool = False):
        """D's logits. `frozen` (the student's update) calls the module, not the engine: the engine's
        forward arms its own gradient reduction for the backward, which belongs to the student."""
        c = cond.repeat(k) if k > 1 else cond
        pe, po, ti = c.prompt_embeds, c.pooled, c.time_ids
        d = self.disc.module if frozen else self.disc
        if self.disc_mode == "conditional":
            return d(x_hat, t_hat, pe, po, ti, x_t=xt_in, t=self.schedule.model_timestep(t))
        return d(x_hat, t_hat, pe, po, ti)

    # -- one micro-step of each kind ---------------------------------------------------------------------------
    def micro_step(self, phase: Phase, b: dict, d_batches: list[dict] | None = None) -> dict[str, float]:
        """One micro-batch of `phase`. Adversarial: `disc_steps` D updates (on `d_batches`, the extra
        micro-batches beyond `b`, then on `b`), then the student against the updated D."""
        cond = self.cond(b)
        if phase.name == "conversion":
            target = student_mod.implied_x0(self.schedule, unet_denoiser(self.init_unet, cond), b["x_t"], b["t"])
            _, x0 = self.student_step(b, cond, "sample")
            loss = torch.nn.functional.mse_loss(x0, target)
            self._apply("student", self.student, loss)
            return {"loss": loss.item()}
        if phase.name == "mse":
            x_next, _ = self.student_step(b, cond)
            loss = torch.nn.functional.mse_loss(x_next, b["target"])
            self._apply("student", self.student, loss)
            return {"loss": loss.item()}
        out: dict[str, float] = {}
        for db in d_batches or []:
            db_cond = self.cond(db)
            with torch.no_grad():
                x_db, _ = self.student_step(db, db_cond)
            self._d_update(db, db_cond, x_db)
        if phase.name == "disc_warmup":  # D only, against the student as it is
            with torch.no_grad():
                x_next, _ = self.student_step(b, cond)
            self._d_update(b, cond, x_next, out)
            return out
        x_next, _ = self.student_step(b, cond)
        fake_in, fake_t, xt_in = self._d_update(b, cond, x_next, out)
        # the student against the updated D (D's parameters frozen for this backward)
        d_params = [p for p in self.disc.module.parameters() if p.requires_grad]
        for p in d_params:
            p.requires_grad_(False)
        try:
            g_logits = self._dcall(fake_in, fake_t, cond, xt_in, b["t"], frozen=True)
            g_loss = nonsaturating_g_loss(g_logits)
            loss = g_loss
            if self.stage.mse_weight:
                mse = torch.nn.functional.mse_loss(x_next, b["target"])
                loss = g_loss + self.stage.mse_weight * mse
                out["mse"] = mse.item()
            self._apply("student", self.student, loss)
        finally:
            for p in d_params:
                p.requires_grad_(True)
        out["loss"] = g_loss.item()
        return out

    def _apply(self, who: str, engine, loss: torch.Tensor) -> None:
        """`engine`'s backward and step on `loss`, unless it is non-finite on some rank (then neither, on
        every rank); a step DeepSpeed (or PlainEngine) skipped for a non-finite gradient is counted too."""
        if not finite_everywhere(loss):
            self.watch.update(who, False, self.step + 1, "non-finite loss")
            return
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(loss)
        engine.step()
        if boundary:
            self.watch.update(who, engine.was_step_applied(), self.step + 1, "non-finite gradient")

    def _d_update(self, b: dict, cond: Conditioning, x_next: torch.Tensor, out: dict | None = None):
        """One discriminator update on a detached fake; returns the fake's D inputs (not detached)."""
        real_in, fake_in, t_hat, xt_in = self.d_inputs(b, x_next)
        n = x_next.shape[0]
        logits = self._dcall(torch.cat([real_in, fake_in.detach()]), torch.cat([t_hat, t_hat]), cond, xt_in,
                             b["t"], k=2)
        d_real, d_fake = logits[:n], logits[n:]
        d_loss = nonsaturating_d_loss(d_real, d_fake)
        self._apply("disc", self.disc, d_loss)
        real_mean, fake_mean = d_real.mean().item(), d_fake.mean().item()
        self.watch.discriminator(real_mean, fake_mean, self.step + 1)
        if out is not None:
            out.update(d_loss=d_loss.item(), d_real=real_mean, d_fake=fake_mean)
        return fake_in, t_hat, xt_in

    @torch.no_grad()
    def evaluate(self, held: dict, seed: int = 1234, chunk: int = 64) -> dict[str, float]:
        """Held-row metrics (rows never trained on), in chunks of `chunk` rows: the student's MSE to the
        teacher (`held_mse`) and, with a discriminator, its **paired accuracy** P(D(real_i) > D(fake_i))
        (the same x_t, caption, t* and re-noising noise for both of a pair) and ROC AUC, each per
        timestep stratum (`held_d_pacc_t<t>`: logit offsets between strata would pull a pooled AUC
        toward 0.5) and averaged over strata (`held_d_pacc`, `held_d_auc`), plus D's mean logits."""
        g = torch.Generator().manual_seed(seed)
        n = held["x_t"].shape[0]
        sq, real, fake, ts = [], [], [], []
        for i in range(0, n, chunk):
            b = {k: v[i:i + chunk] for k, v in held.items()}
            cond = self.cond(b)
            x_next, _ = self.student_step(b, cond)
            sq.append((x_next - b["target"]).pow(2).flatten(1).mean(1))
            if self.disc is None:
                continue
            real_in, fake_in, t_hat, xt_in = self.d_inputs(b, x_next, g, paired=True)
            m = x_next.shape[0]
            logits = self._dcall(torch.cat([real_in, fake_in]), torch.cat([t_hat, t_hat]), cond, xt_in, b["t"],
                                 k=2, frozen=True)
            real.append(logits[:m].flatten().cpu())
            fake.append(logits[m:].flatten().cpu())
            ts.append(self.schedule.model_timestep(b["t"]).cpu())  # strata in the model's timestep units
        out = {"held_mse": torch.cat(sq).mean().item()}
        if self.disc is None:
            return out
        r, f, t = torch.cat(real), torch.cat(fake), torch.cat(ts)
        out.update(discriminator_scores(r, f, t))
        return out


def discriminator_scores(real: torch.Tensor, fake: torch.Tensor, strata: torch.Tensor) -> dict[str, float]:
    """Paired accuracy P(real_i > fake_i) and ROC AUC (ties count half) per stratum and their means
    over strata, and the mean logits. `real`, `fake`: logits of the same rows; `strata`: a row's
    timestep. Shared by the trainer's held evaluation and `benchmarks/discriminator.py`."""
    out: dict[str, float] = {"held_d_real": real.mean().item(), "held_d_fake": fake.mean().item()}
    paccs, aucs = [], []
    for s in sorted(set(strata.tolist())):
        sel = strata == s
        r, f = real[sel], fake[sel]
        pacc = ((r > f).float().mean() + 0.5 * (r == f).float().mean()).item()
        diff = r[:, None] - f[None, :]
        auc = ((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()).item()
        out[f"held_d_pacc_t{int(s)}"], out[f"held_d_auc_t{int(s)}"] = pacc, auc
        paccs.append(pacc)
        aucs.append(auc)
    out["held_d_pacc"], out["held_d_auc"] = float(np.mean(paccs)), float(np.mean(aucs))
    return out
