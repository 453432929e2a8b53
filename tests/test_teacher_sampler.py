"""benchmarks/teacher_sampler.py: the shipped teacher through the stock diffusers pipeline with named schedulers."""
from __future__ import annotations

import json
import math

import pytest


def test_teacher_sampler_scores_each_scheduler_and_refuses_an_unknown_one(tmp_path):
    from benchmarks.teacher_sampler import main

    out = tmp_path / "sampler"
    result = main(["--source", "builtin:toy_fashion_teacher", "--per-class", "2", "--out", str(out),
                   "--schedulers", "EulerDiscreteScheduler,EulerAncestralDiscreteScheduler"])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["scheduler"] for r in rows] == ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"]
    assert all(r["n"] == 20 and math.isfinite(r["sharpness"]) and r["sharpness"] > 0 for r in rows)
    # the ancestral sampler injects fresh noise every step: the same seeds give other images than Euler's
    assert rows[0]["sharpness"] != rows[1]["sharpness"]
    assert result["steps"] == 32 and result["guidance_scale"] == 2.0
    assert "| EulerAncestralDiscreteScheduler |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="'NotAScheduler' is not a diffusers scheduler class"):
        main(["--source", "builtin:toy_fashion_teacher", "--per-class", "1", "--schedulers", "NotAScheduler",
              "--out", str(tmp_path / "bad")])
