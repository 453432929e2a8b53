"""The discriminator (no Ray): teacher-initialised encoder copy, heads on small maps, conditioning."""

from __future__ import annotations

import pytest
import torch

from pipeline.discriminator import Discriminator, Head, nonsaturating_d_loss, nonsaturating_g_loss
from pipeline.schedule import Conditioning


@pytest.fixture(scope="module")
def unet(tiny_pipeline):
    return tiny_pipeline.unet


def _inputs(pipe, n=2, seed=0):
    from pipeline import zoo

    g = torch.Generator().manual_seed(seed)
    cond = zoo.encode_prompts(pipe, ["a handwritten digit one", "a handwritten digit two"][:n], 32)
    return cond, torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)


def test_backbone_is_a_copy_of_the_teachers_encoder(unet):
    d = Discriminator(unet, conditional=True)
    sd = unet.state_dict()
    for k, v in d.backbone.state_dict().items():
        assert torch.equal(v, sd[k]), k  # same names as in the UNet, same values
    assert not any(k.startswith("up_blocks") for k in d.state_dict())
    # a copy, not shared storage: training D leaves the teacher alone
    p = next(d.backbone.parameters())
    assert p.data_ptr() != unet.conv_in.weight.data_ptr() or p.shape != unet.conv_in.weight.shape


def test_head_handles_small_and_large_maps():
    for size in (1, 2, 4, 32):
        h = Head(16, 8, size)
        assert h(torch.randn(3, 16, size, size)).shape == (3,)
    convs = [m for m in Head(16, 8, 32).blocks if isinstance(m, torch.nn.Conv2d)]
    # 32 -> 16 -> 8 -> 4 -> 2 by 4x4 stride-2 convs (the logit averages the 2x2 map)
    assert len(convs) == 4 and all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    small = [m for m in Head(16, 8, 2).blocks if isinstance(m, torch.nn.Conv2d)]  # the toy's 2x2 mid block
    assert len(small) == 1 and small[0].kernel_size == (3, 3) and small[0].stride == (1, 1)


def test_conditional_sees_x_t_unconditional_does_not(unet, tiny_pipeline):
    cond, x_t, x_hat = _inputs(tiny_pipeline)
    t = torch.tensor([999.0, 999.0])
    th = torch.tensor([0.0, 0.0])
    args = (cond.prompt_embeds, cond.pooled, cond.time_ids)
    torch.manual_seed(0)
    dc = Discriminator(unet, conditional=True).eval()
    du = dc.with_mode(conditional=False).eval()
    with torch.no_grad():
        a = dc(x_hat, th, *args, x_t=x_t, t=t)
        b = dc(x_hat, th, *args, x_t=x_t + 1.0, t=t)
        assert (a - b).abs().max() > 1e-4
        assert du(x_hat, th, *args).shape == (2,)
        # the unconditional D ignores x_t: its output is a function of x_hat and c only
        alone = du(x_hat, th, *args)
        torch.testing.assert_close(du(x_hat, th, *args, x_t=x_t, t=t), alone, rtol=0, atol=0)
        torch.testing.assert_close(du(x_hat, th, *args, x_t=x_t + 1.0, t=t), alone, rtol=0, atol=0)
        assert (du(x_hat, th, *args) - du(x_hat + 1.0, th, *args)).abs().max() > 1e-4
        # text conditioning reaches both
        z = Conditioning(cond.prompt_embeds.flip(0), cond.pooled.flip(0), cond.time_ids)
        assert (du(x_hat, th, *args) - du(x_hat, th, z.prompt_embeds, z.pooled, z.time_ids)).abs().max() > 1e-5
    # the unconditional D keeps the conditional one's backbone and gets a new, smaller head
    for (k, v), (k2, v2) in zip(dc.backbone.state_dict().items(), du.backbone.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert du.head.blocks[0].in_channels * 2 == dc.head.blocks[0].in_channels


def test_conditional_stacked_batches_match_separate(unet, tiny_pipeline):
    cond, x_t, x_hat = _inputs(tiny_pipeline)
    t, th = torch.tensor([749.0, 749.0]), torch.tensor([249.0, 249.0])
    d = Discriminator(unet, conditional=True).eval()
    a = (cond.prompt_embeds, cond.pooled, cond.time_ids)
    rep = (cond.prompt_embeds.repeat(2, 1, 1), cond.pooled.repeat(2, 1), cond.time_ids.repeat(2, 1))
    with torch.no_grad():
        both = d(torch.cat([x_hat, -x_hat]), torch.cat([th, th]), *rep, x_t=x_t, t=t)
        one = d(x_hat, th, *a, x_t=x_t, t=t)
        two = d(-x_hat, th, *a, x_t=x_t, t=t)
    torch.testing.assert_close(both, torch.cat([one, two]), atol=1e-5, rtol=1e-5)


def test_nonsaturating_losses():
    r, f = torch.tensor([3.0, 2.0]), torch.tensor([-3.0, -2.0])
    assert nonsaturating_d_loss(r, f) < nonsaturating_d_loss(f, r)
    assert nonsaturating_g_loss(r) < nonsaturating_g_loss(f)


def _smoke_adversarial_loop(tiny_pipeline, **stage_changes):
    """Stage 2 of the smoke config (8 -> 4, adversarial) as the trainer builds it: `StageLoop` with a
    frozen UNet (the trainer freezes its init UNet and builds D from the base model's), plain engines."""
    import copy
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
    data["stages"][1].update(stage_changes)
    cfg = from_dict(data)
    _, stage = cfg.stage(2)
    base = copy.deepcopy(tiny_pipeline.unet).requires_grad_(False)  # as the worker loads it
    loop = StageLoop(cfg, stage, zoo.schedule_of(tiny_pipeline), copy.deepcopy(tiny_pipeline.unet),
                     PlainEngines(cfg.train), "cpu", seed=0, disc_unet=base)
    rows = make_trajectories(tiny_pipeline, stage, n_ids=8, seed=3)
    return loop, loop.batch_to({k: torch.as_tensor(rows[k]) for k in TRAIN_COLUMNS}), base


@pytest.mark.parametrize("kind", ["trained", "frozen", "cnn"])
def test_discriminator_as_the_trainer_builds_it_trains_what_it_should(tiny_pipeline, kind):
    """Built through `StageLoop` from a frozen UNet, exactly as in training: with the paper's trained
    backbone every D parameter is in D's optimizer and one D step moves the backbone's weights away
    from the base model's (a copy of a frozen teacher had left all 226 backbone tensors frozen: only
    the head trained). The 'frozen' ablation trains the head only; 'cnn' trains all of a plain CNN."""
    from pipeline.phases import phase_at

    loop, b, base = _smoke_adversarial_loop(tiny_pipeline, disc_backbone=kind)
    events = loop.transition(0)
    d = loop.disc.module
    in_opt = {id(p) for g in loop.disc.optimizer.param_groups for p in g["params"]}
    head = {id(p) for p in d.head.parameters()}
    backbone = list(d.backbone.named_parameters())
    if kind == "frozen":
        assert in_opt == head
    else:
        assert in_opt == {id(p) for p in d.parameters()}
    opt, total = loop.disc_counts
    assert (opt == total) == (kind != "frozen") and f"{opt:,} of {total:,} parameters train" in events[-1]
    before = {n: p.detach().clone() for n, p in backbone}
    if kind != "cnn":  # the backbone starts as the base model's encoder
        assert all(torch.equal(v, base.get_parameter(n)) for n, v in before.items())
    loop.micro_step(phase_at(loop.phases, 0), b)
    moved = [n for n, p in backbone if not torch.equal(p, before[n])]
    if kind == "frozen":
        assert moved == []
    else:
        assert len(moved) == len(backbone), sorted(set(before) - set(moved))[:5]
    assert all(not p.requires_grad for p in base.parameters())  # the base model itself is untouched
    assert all(torch.equal(p, tiny_pipeline.unet.get_parameter(n)) for n, p in base.named_parameters())


def test_head_on_a_2x2_map_keeps_what_the_features_carry():
    """The toy's mid block is 2x2: the head keeps the positions (3x3 conv) so GroupNorm groups hold
    >= 16 values; a feature's mean over a group must still reach the logit (a GroupNorm over 4 values
    of a 1x1 map erased each group's mean and scale)."""
    torch.manual_seed(0)
    h = Head(128, 64, 2)
    norms = [m for m in h.blocks if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 1 and 64 // norms[0].num_groups * 4 >= 16
    x = torch.randn(4, 128, 2, 2)
    assert (h(x) - h(x + 1.0)).abs().max() > 1e-4  # a shift of every feature changes the logit
    one = Head(64, 64, 1)
    assert [m for m in one.blocks if isinstance(m, torch.nn.GroupNorm)][0].num_groups == 4


def test_paired_accuracy_reads_through_per_row_offsets():
    """A conditional D's logit moves with x_t, caption and t* far more than with real vs fake: the paired
    accuracy (same row) sees a small consistent margin that the unpaired AUC cannot, per stratum."""
    from pipeline.stage_loop import discriminator_scores

    g = torch.Generator().manual_seed(0)
    offset = 10 * torch.randn(400, generator=g)
    strata = torch.tensor([249, 499, 749, 999]).repeat(100)
    real, fake = offset + 0.1, offset.clone()
    fake[strata == 999] += 0.2  # in one stratum D is fooled on every pair
    s = discriminator_scores(real, fake, strata)
    assert s["held_d_pacc_t249"] == s["held_d_pacc_t749"] == 1.0 and s["held_d_pacc_t999"] == 0.0
    assert s["held_d_pacc"] == pytest.approx(0.75)
    assert all(abs(s[f"held_d_auc_t{t}"] - 0.5) < 0.1 for t in (249, 499, 749, 999))
