"""Evaluation sampling as batch inference (`pipeline.eval_sampling`): a pool of 2 actors draws what one
process draws (images and the toy metrics on them), and a real kill of a sampling job is resumed by a
rerun that samples only the units without a commit marker."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import numpy as np
import torch

from pipeline import eval_sampling as es
from pipeline import shards
from pipeline.config import load_config
from pipeline.data import toy_dataset
from pipeline.metrics import score
from pipeline.sampling import fixed_noise, latent_shape, sample_classes
from pipeline.storage import RunStorage
from procs import kill_at_first_commit
from reliability import record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def teacher_set(cfg, pipe, steps: int, guidance: float, uint8: bool = False) -> es.SampleSet:
    """The base teacher's fixed-seed class samples, as `run_evaluate` asks for them."""
    K = cfg.evaluate.samples_per_prompt
    labels = np.repeat(np.arange(10), K)
    captions = [toy_dataset(cfg.data.kind).caption_for(int(y)) for y in labels]
    noise = fixed_noise(K, cfg.evaluate.seed, latent_shape(pipe))
    return es.SampleSet(f"teacher-{steps}", f"eval/units/teacher-{steps}", "teacher",
                        {"source": cfg.model.source}, steps, guidance, captions, noise, uint8=uint8)


def test_two_actors_draw_what_one_process_draws(ray_local, tiny_pipeline_dir, tiny_pipeline, tmp_path):
    cfg = load_config("smoke", [f"run_root={tmp_path / 'run'}", f"model.source={tiny_pipeline_dir}",
                                "evaluate.actors=2", "evaluate.unit_samples=6", "evaluate.samples_per_prompt=3"])
    st = RunStorage.from_config(cfg)
    sets = [teacher_set(cfg, tiny_pipeline, 4, 2.0), teacher_set(cfg, tiny_pipeline, 2, 0.0, uint8=True)]
    lines = []
    got = es.sample_sets(cfg, st, sets, {"teacher": {"source": cfg.model.source}}, log=lines.append)
    assert "10 sampling units (0 already committed, 10 to run)" in lines[0], lines
    # progress: about five lines over the ten units, the last one when all are drawn
    assert [ln.split(" units")[0].strip() for ln in lines[1:]] == ["2/10", "4/10", "6/10", "8/10", "10/10"], lines
    # 30 samples in units of 6 (batches of 100 in one process): the same images, and the same metrics
    want = sample_classes(tiny_pipeline, 4, 2.0, 3, cfg.evaluate.seed)
    assert got["teacher-4"]["image"].dtype == torch.float32 and got["teacher-4"]["image"].shape == want.images.shape
    torch.testing.assert_close(got["teacher-4"]["image"], want.images, atol=1e-5, rtol=0)
    a, b = score(got["teacher-4"]["image"], want.labels), score(want.images, want.labels)
    for k in ("fd", "prompt_accuracy"):
        assert abs(a[k] - b[k]) < 1e-4, (k, a[k], b[k])
    from pipeline.images import to_uint8_nchw

    want2 = to_uint8_nchw(sample_classes(tiny_pipeline, 2, 0.0, 3, cfg.evaluate.seed).images)
    assert got["teacher-2"]["image"].dtype == torch.uint8
    assert (got["teacher-2"]["image"].int() - want2.int()).abs().max() <= 1  # a rounding boundary at most
    # the pool had two actors (two processes committed units)
    pids = {m["pid"] for s in sets for m in shards.read_markers(st, s.out_rel).values()}
    assert len(pids) == 2, pids
    # finished: a rerun samples nothing
    lines.clear()
    again = es.sample_sets(cfg, st, sets, {"teacher": {"source": cfg.model.source}}, log=lines.append)
    assert "(10 already committed, 0 to run)" in lines[0] and torch.equal(again["teacher-4"]["image"], got["teacher-4"]["image"])


KILLED = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from pipeline.config import load_config
    from pipeline.eval_sampling import sample_sets
    from pipeline.storage import RunStorage
    from pipeline.zoo import load_pipeline
    from test_eval_sampling import teacher_set
    cfg = load_config("smoke", sys.argv[1:])
    pipe = load_pipeline(cfg.model.source)
    sample_sets(cfg, RunStorage.from_config(cfg), [teacher_set(cfg, pipe, 32, 2.0)],
                {{"teacher": {{"source": cfg.model.source}}}})
""")


def test_killed_evaluation_sampling_reruns_only_the_missing_units(ray_local, tiny_pipeline_dir, tiny_pipeline,
                                                                  tmp_path, request):
    """A real SIGKILL of a sampling job (and the Ray it started) once a unit is committed: the rerun
    keeps the committed units as they are, samples the others, and gives the uninterrupted images."""
    ov = [f"run_root={tmp_path / 'run'}", f"model.source={tiny_pipeline_dir}", "evaluate.actors=2",
          "evaluate.unit_samples=2", "evaluate.samples_per_prompt=4"]  # 40 samples, 20 units
    cfg = load_config("smoke", ov)
    marker_dir = tmp_path / "run" / "eval" / "units" / "teacher-32" / "_shards"
    kill_at_first_commit([sys.executable, "-c", KILLED.format(tests=os.path.join(REPO, "tests"))] + ov, marker_dir,
                         tmp_path / "killed.log", cwd=REPO)
    st = RunStorage.from_config(cfg)
    s = teacher_set(cfg, tiny_pipeline, 32, 2.0)
    before = shards.read_markers(st, s.out_rel)
    assert 0 < len(before) < 20, f"{len(before)} of 20 units committed at the kill: not halfway"

    lines = []
    got = es.sample_sets(cfg, st, [s], {"teacher": {"source": cfg.model.source}}, log=lines.append)
    assert any(f"({len(before)} already committed, {20 - len(before)} to run)" in ln for ln in lines), lines
    after = shards.read_markers(st, s.out_rel)
    assert len(after) == 20 and all(json.dumps(after[i]) == json.dumps(m) for i, m in before.items())
    want = sample_classes(tiny_pipeline, 32, 2.0, 4, cfg.evaluate.seed)
    torch.testing.assert_close(got["teacher-32"]["image"], want.images, atol=1e-5, rtol=0)
    names = sorted(p.name for p in marker_dir.parent.iterdir())
    assert names == sorted([f"part-{i:05d}.parquet" for i in range(20)] + ["_plan.json", "_shards"])
    record(request, "evaluation sampling killed mid-run (SIGKILL of the job and its Ray)",
           f"the rerun samples only the {20 - len(before)} units without a commit marker; the images equal "
           "one process's", injected=1, completed=1, rows_lost=40 - len(got["teacher-32"]["image"]), duplicates=0)


def test_the_teachers_cached_samples_are_named_by_what_they_depend_on():
    """The base teacher's evaluation samples are cached in the run root and reused by every stage: a run whose
    teacher, its dtype or its prompts' source changed must not read the old ones (the evaluation's manifest
    reruns the step, but the cache name alone decides the reuse)."""
    from pipeline.layout import teacher_cache_rel

    rel = teacher_cache_rel(load_config("smoke", []), 32, 2.0)
    for changed in ("model.dtype=bfloat16", "model.source=/elsewhere/teacher", "data.kind=fashion_mnist"):
        assert teacher_cache_rel(load_config("smoke", [changed]), 32, 2.0) != rel, changed
    assert teacher_cache_rel(load_config("smoke", ["data.limit=32"]), 32, 2.0) == rel  # not a sampling input
