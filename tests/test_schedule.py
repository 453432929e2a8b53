"""The schedule module's math against diffusers' EulerDiscreteScheduler stepping the same tiny UNet."""

import pytest
import torch

from pipeline.schedule import CLEAN, Conditioning, Schedule, trailing_timesteps, unet_denoiser
from pipeline.zoo import encode_prompts, schedule_of, sdxl_scheduler


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 128])
def test_trailing_grid_matches_diffusers(n):
    sched = sdxl_scheduler()
    sched.set_timesteps(n)
    assert trailing_timesteps(n).tolist() == sched.timesteps.long().tolist()
    s = Schedule.from_scheduler_config(sched.config)
    assert torch.equal(s.sigma(s.timesteps(n)), sched.sigmas[:-1])
    assert s.init_noise_sigma() == pytest.approx(float(sched.init_noise_sigma))


def test_paper_grid_and_student_grids():
    assert trailing_timesteps(4).tolist() == [999, 749, 499, 249]
    s = Schedule.from_scheduler_config(sdxl_scheduler().config)
    assert [(p.t, p.t_next) for p in s.stage_pairs(4)] == [(999, 749), (749, 499), (499, 249), (249, CLEAN)]
    assert [(p.t, p.t_next) for p in s.stage_pairs(1, multi_timestep=True)] == [
        (999, CLEAN), (749, CLEAN), (499, CLEAN), (249, CLEAN)]
    assert [(p.t, p.t_next) for p in s.stage_pairs(2, multi_timestep=True)] == [
        (999, 499), (749, 249), (499, CLEAN), (249, CLEAN)]
    # a 32 -> 8 stage: each student step is 4 teacher steps along the 32-step grid
    path = s.teacher_path(32, 999, 874)
    assert len(path) == 4 and path[0] == 999 and all(t in trailing_timesteps(32) for t in path)
    assert s.teacher_path(32, 124, CLEAN) == [t for t in trailing_timesteps(32) if t <= 124]
    with pytest.raises(ValueError):
        s.teacher_path(32, 998, CLEAN)
    with pytest.raises(ValueError):
        s.stage_pairs(4, multi_timestep=True)


def test_forward_diffusion_is_pure_noise_at_T():
    s = Schedule.from_scheduler_config(sdxl_scheduler().config)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([999, 500, 0])
    x = s.forward_diffuse(x0, eps, t)
    assert torch.allclose(x[0], s.sigma(999) * eps[0])  # no signal left at T (the paper's fix)
    assert torch.allclose(x[1], x0[1] + s.sigma(500) * eps[1])
    # and the UNet input at T has unit variance like inference's first step
    assert torch.allclose(s.scale_input(x[:1], s.sigma(999)), eps[:1] * s.sigma(999) / (s.sigma(999) ** 2 + 1) ** 0.5)


def test_jump_x0_inverts_the_euler_step():
    """The x0 the discriminator re-noises (SDXL-Lightning eqs. 25-26): the x0 of the one Euler step from
    x_t to x_next. A student's Euler step gives back its own x0; at t_next = CLEAN it is x_next."""
    s = Schedule.from_scheduler_config(sdxl_scheduler().config)
    x0, x = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8) * 5
    t, t_next = torch.tensor([999, 749, 499]), torch.tensor([499, 249, CLEAN])
    x_next = s.euler_step(x, x0, s.sigma(t), s.sigma(t_next))
    torch.testing.assert_close(s.jump_x0(x, x_next, t, t_next), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.jump_x0(x, x_next, t, t_next)[2], x_next[2])
    # ... and D sees that x0 forward-diffused to t*: variances add, no pure-noise special case at T
    n = torch.randn(3, 4, 8, 8)
    t_star = torch.tensor([10, 500, 999])
    torch.testing.assert_close(s.renoise(x0, n, t_star), x0 + s.sigma(t_star).view(-1, 1, 1, 1) * n)


def test_prediction_conversions_roundtrip():
    s = Schedule.from_scheduler_config(sdxl_scheduler().config)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sig = s.sigma(torch.tensor([300, 800]))
    x = x0 + sig.view(-1, 1, 1, 1) * eps
    assert torch.allclose(s.to_x0(eps, x, sig, "epsilon"), x0, atol=1e-5)
    assert torch.allclose(s.to_eps(x0, x, sig), eps, atol=1e-4)
    assert torch.equal(s.to_x0(x0, x, sig, "sample"), x0)
    # v = alpha*eps - sigma_vp*x0 in VP space
    a = 1 / (sig**2 + 1) ** 0.5
    v = (a * eps.transpose(0, -1) - (sig * a) * x0.transpose(0, -1)).transpose(0, -1)
    assert torch.allclose(s.to_x0(v, x, sig, "v_prediction"), x0, atol=1e-4)


def _diffusers_rollout(pipe, cond, noise, n, guidance):
    sched = sdxl_scheduler()
    sched.set_timesteps(n)
    x = noise * sched.init_noise_sigma
    unet = pipe.unet
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x, x]) if guidance > 1 else x, t)
        if guidance > 1:
            pe = torch.cat([torch.zeros_like(cond.prompt_embeds), cond.prompt_embeds])
            po = torch.cat([torch.zeros_like(cond.pooled), cond.pooled])
            ti = torch.cat([cond.time_ids, cond.time_ids])
        else:
            pe, po, ti = cond.prompt_embeds, cond.pooled, cond.time_ids
        out = unet(inp, t, encoder_hidden_states=pe, added_cond_kwargs={"text_embeds": po, "time_ids": ti}).sample
        if guidance > 1:
            u, c = out.chunk(2)
            out = u + guidance * (c - u)
        x = sched.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("guidance", [0.0, 3.0])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 32])
@torch.no_grad()
def test_rollout_equals_diffusers_euler(tiny_pipeline, n, guidance):
    pipe = tiny_pipeline
    cond = encode_prompts(pipe, ["a handwritten digit seven", "a handwritten digit two"], resolution=32)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(n))
    ref = _diffusers_rollout(pipe, cond, noise, n, guidance)
    ours = schedule_of(pipe).sample(unet_denoiser(pipe.unet, cond, guidance), noise, n)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0), (ours - ref).abs().max()
    assert not torch.allclose(ours, noise * schedule_of(pipe).init_noise_sigma(), atol=1e-3)


@torch.no_grad()
def test_rollout_equals_stock_pipeline_latents(tiny_pipeline):
    """The stock StableDiffusionXLPipeline (guidance 0) ends where our 4-step sample ends."""
    pipe = tiny_pipeline
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    out = pipe("a handwritten digit seven", num_inference_steps=4, guidance_scale=0, height=32, width=32,
               latents=latents.clone(), output_type="latent").images
    cond = encode_prompts(pipe, ["a handwritten digit seven"], resolution=32)
    ours = schedule_of(pipe).sample(unet_denoiser(pipe.unet, cond), latents, 4)
    assert torch.allclose(out, ours, atol=1e-5), (out - ours).abs().max()


def test_conditioning_time_ids():
    ids = Conditioning.sdxl_time_ids(2, 32)
    assert ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2


@pytest.mark.parametrize("shift", [1.0, 2.5, 3.0])
def test_flow_matching_grids_and_sampling_match_diffusers(shift):
    """The SD3 family's schedule (issue 17): for N = 1 ... 32 the sigmas and timesteps equal
    `FlowMatchEulerDiscreteScheduler`'s (SD3.5's shift 3.0, the unshifted 1.0, and 2.5, whose float32
    bounds a float64 computation misses by one ulp), and N steps of
    `FlowMatchSchedule.sample` equal the scheduler's own `step` loop on the same velocity model,
    within 1e-5."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipeline.schedule import FlowMatchSchedule

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    fm = FlowMatchSchedule.from_scheduler_config(dict(sched.config))
    w = torch.randn(4, 4) * 0.3

    def velocity(x, t):  # a fixed nonlinear velocity field that depends on the timestep it is given
        return torch.einsum("ij,bjhw->bihw", w, x) + torch.sin(t / 1000 * 3).reshape(-1, 1, 1, 1)

    assert (fm.sigma_max, fm.sigma_min) == (sched.sigma_max, sched.sigma_min)  # its bounds, to the bit
    for n in range(1, 33):
        sched.set_timesteps(n)
        torch.testing.assert_close(fm.sigmas(n), sched.sigmas[:-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(fm.timesteps(n) / 1000, sched.timesteps / 1000, atol=1e-5, rtol=0)
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(n))
        x = noise.clone()
        for t in sched.timesteps:
            x = sched.step(velocity(x, t.expand(2)), t, x).prev_sample
        torch.testing.assert_close(fm.sample(velocity, noise, n), x, atol=1e-5, rtol=1e-5)


def test_flow_matching_conversions_and_teacher_path():
    """x_sigma from x0 and noise; the true velocity gives x0 back and one Euler step lands on the same
    line; a teacher's path starts at the step's sigma and then walks the teacher's own grid points inside
    the step; scheduler options that bend the grid are refused by name."""
    from pipeline.schedule import FlowMatchSchedule

    fm = FlowMatchSchedule(shift=3.0)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    s = torch.tensor([1.0, 0.6, 0.1])
    x = fm.forward_diffuse(x0, eps, s)
    torch.testing.assert_close(x[0], eps[0])  # sigma 1: pure noise, as sampling starts
    torch.testing.assert_close(fm.to_x0(eps - x0, x, s), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fm.to_velocity(x0, x, s), eps - x0, atol=1e-4, rtol=1e-4)
    x_next, got_x0 = fm.step(lambda x_, t_: eps - x0, x, s, torch.tensor([0.5, 0.2, 0.0]))
    torch.testing.assert_close(x_next, fm.forward_diffuse(x0, eps, torch.tensor([0.5, 0.2, 0.0])), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_x0, x0, atol=1e-5, rtol=1e-5)
    grid8 = fm.sigmas(8).tolist()
    assert fm.teacher_path(8, 1.0, float(fm.shifted(0.5))) == grid8[:4]  # u = 1, 0.857, 0.714, 0.572 > 0.5
    off = float(fm.shifted(0.9))  # a start off the teacher's grid: there first, then the grid's points
    assert fm.teacher_path(8, off, 0.0) == [off] + grid8[1:]
    with pytest.raises(ValueError, match="toward clean"):
        fm.teacher_path(2, 0.3, 0.5)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        FlowMatchSchedule.from_scheduler_config({"shift": 3.0, "use_dynamic_shifting": True})
    with pytest.raises(ValueError, match="stochastic_sampling"):
        FlowMatchSchedule.from_scheduler_config({"shift": 3.0, "stochastic_sampling": True})
    with pytest.raises(ValueError, match=">= 1"):
        fm.teacher_path(0, 1.0, 0.5)


def test_flow_matching_stage_pairs_paths_and_discriminator_levels():
    """What the steps read of the SD3 schedule: a stage's student steps are the stock N-step sigmas in order,
    the last to clean (0); the 1- and 2-step students' four starting sigmas are the 4-step grid's, each
    jumping 1/N toward clean in unshifted time, plus their own stock steps those jumps miss; a teacher's
    rollout over a student step starts at the step's sigma and walks the teacher's own grid inside it; `jump_x0` inverts a step, an
    x0 ("sample") prediction steps to the same place as the velocity it implies, and the discriminator's
    timesteps are sigma x 1000 (the re-noising t* as sigmas t* / 1000)."""
    from pipeline.schedule import FlowMatchSchedule

    fm = FlowMatchSchedule(shift=3.0)
    grid = fm.sigmas(4).tolist()
    assert [(p.t, p.t_next) for p in fm.stage_pairs(4)] == list(zip(grid, grid[1:] + [0.0]))
    assert all(isinstance(p.t, float) for p in fm.stage_pairs(4))
    one = fm.stage_pairs(1, multi_timestep=True)
    assert [p.t for p in one] == grid and {p.t_next for p in one} == {fm.clean}
    two = fm.stage_pairs(2, multi_timestep=True)
    assert [p.t for p in two[:4]] == grid
    assert two[0].t_next == pytest.approx(float(fm.shifted(torch.tensor(0.5))))
    assert float(fm.unshifted(torch.tensor(two[1].t_next))) == pytest.approx(float(fm.unshifted(torch.tensor(grid[1]))) - 0.5)
    assert [p.t_next for p in two[2:4]] == [0.0, 0.0]
    # the stock 2-step grid is 1 -> the smallest sigma -> 0: its first step, which no 1/2 jump takes, is trained too
    two_grid = fm.sigmas(2).tolist()
    assert two_grid[1] == grid[-1] < 0.01 and [(p.t, p.t_next) for p in two[4:]] == [(1.0, two_grid[1])]
    with pytest.raises(ValueError, match="1- and 2-step"):
        fm.stage_pairs(4, multi_timestep=True)
    grid8, grid32 = fm.sigmas(8).tolist(), fm.sigmas(32).tolist()
    assert fm.teacher_path(32, grid8[0], grid8[1]) == grid32[:5]  # u = 1, 0.968, 0.936, 0.904, 0.871 > 0.857
    assert fm.teacher_path(4, grid[1], 0.0) == grid[1:]  # the 1-step stage's 4-step teacher: on its own grid
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    s, sn = torch.tensor([0.9, 0.4]), torch.tensor([0.5, 0.0])
    x = fm.forward_diffuse(x0, eps, s)
    v = torch.randn(2, 4, 8, 8)
    x_next, pred_x0 = fm.step(lambda x_, t_: v, x, s, sn)
    torch.testing.assert_close(fm.jump_x0(x, x_next, s, sn), pred_x0, atol=1e-5, rtol=1e-5)
    x_next_s, got = fm.step(lambda x_, t_: pred_x0, x, s, sn, "sample")
    torch.testing.assert_close(x_next_s, x_next, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, pred_x0)
    with pytest.raises(ValueError, match="'flow'"):
        fm.step(lambda x_, t_: v, x, s, sn, "epsilon")
    torch.testing.assert_close(fm.model_timestep(torch.tensor([0.25, 0.0])), torch.tensor([250.0, 0.0]))
    torch.testing.assert_close(fm.level_of_timestep([10, 750]), torch.tensor([0.01, 0.75]))
    assert fm.scale_input(x, s) is x and fm.sigma(0.3).item() == pytest.approx(0.3)


def test_training_draws_are_each_schedules_objective():
    """The toy teacher's training example: for SDXL/SD1.5 (epsilon) the scaled x_t at a uniform integer timestep
    with eps as the target, drawn as the loop drew it before (timesteps, then nothing else from the
    generator); for SD3 x_sigma unscaled at timestep sigma x 1000, sigma shifted logit-normal in (0, 1), with
    the velocity eps - x0 as the target."""
    from diffusers import EulerDiscreteScheduler

    from pipeline.schedule import FlowMatchSchedule, Schedule

    x0, eps = torch.randn(256, 4, 2, 2), torch.randn(256, 4, 2, 2)
    s = Schedule(EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod)
    x_in, t, target = s.training_draw(x0, eps, torch.Generator().manual_seed(3))
    t_ref = torch.randint(0, 1000, (256,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, t_ref.float()) and target is eps
    torch.testing.assert_close(x_in, s.scale_input(s.forward_diffuse(x0, eps, t_ref), s.sigma(t_ref)))
    fm = FlowMatchSchedule(shift=3.0)
    x_in, t, target = fm.training_draw(x0, eps, torch.Generator().manual_seed(3))
    sigma = t / 1000
    assert ((sigma > 0) & (sigma < 1)).all() and sigma.median() > 0.5  # shift 3 leans toward noise
    torch.testing.assert_close(x_in, fm.forward_diffuse(x0, eps, sigma))
    torch.testing.assert_close(target, eps - x0)
