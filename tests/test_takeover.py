"""benchmarks/takeover.py: the teacher taking over a student's steps walks the same schedule code as sampling
(no second Euler loop): taking every step is the guided teacher's own sampling at its step count, taking none
is the student's own, and bad step ranges are named."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.takeover import default_takeovers, steps_of, takeover_sampler  # noqa: E402


def _student_of(teacher, seed: int = 0):
    """A student that differs from its teacher: the teacher's weights, each nudged."""
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_taking_no_step_is_the_students_sampling_and_every_step_the_teachers(family, tiny_pipeline):
    from pipeline import zoo
    from pipeline.schedule import unet_denoiser

    pipe = tiny_pipeline if family == "sdxl" else zoo.load_pipeline("builtin:tiny_random_sd3")
    sched, teacher = zoo.schedule_of(pipe), zoo.denoiser_of(pipe)
    student = _student_of(teacher)
    cond = zoo.encode_prompts(pipe, ["a photo of a coat", "a photo of a bag"])
    noise = torch.randn((2, *((teacher.config.in_channels,) + (teacher.config.sample_size,) * 2)),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = takeover_sampler(sched, teacher, student, 32, 2.0, 8, set())(cond, noise)
        own = sched.sample(unet_denoiser(student, cond, 0.0), noise, 8)
        torch.testing.assert_close(alone, own, atol=1e-5, rtol=0)
        first = takeover_sampler(sched, teacher, student, 32, 2.0, 8, {0})(cond, noise)
        assert (first - own).abs().max() > 1e-3  # the teacher's first step changed the sample
        every = takeover_sampler(sched, teacher, student, 32, 2.0, 8, set(range(8)))(cond, noise)
        guided = unet_denoiser(teacher, cond, 2.0)
        if family == "sdxl":  # trailing grids nest: the 8-step grid's points are the 32-step grid's
            torch.testing.assert_close(every, sched.sample(guided, noise, 32), atol=1e-5, rtol=0)
        else:  # a flow model's grids do not nest: the teacher walks the union of both grids' sigmas
            union = sorted(set(sched.sigmas(8).tolist()) | set(sched.sigmas(32).tolist()), reverse=True)
            assert len(union) > 32
            torch.testing.assert_close(every, sched.rollout(guided, sched.start(noise), union, sched.clean),
                                       atol=1e-5, rtol=0)


def test_step_ranges_are_one_based_inclusive_and_bad_ones_are_named():
    assert steps_of("1", 8) == {0} and steps_of("5-8", 8) == {4, 5, 6, 7}
    with pytest.raises(ValueError, match="'0-2' is outside the student's steps 1..8"):
        steps_of("0-2", 8)
    with pytest.raises(ValueError, match="'9' is outside"):
        steps_of("9", 8)
    with pytest.raises(ValueError, match="'a-b' is not a step or a range"):
        steps_of("a-b", 8)
    with pytest.raises(ValueError, match="'3-' is not a step or a range"):
        steps_of("3-", 8)
    with pytest.raises(ValueError, match="'4-2' runs backwards"):
        steps_of("4-2", 8)
    assert default_takeovers(8) == ["1", "1-4", "5-8", "3-8"] and default_takeovers(1) == ["1"]
    assert all(steps_of(s, 4) for s in default_takeovers(4))
