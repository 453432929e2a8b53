"""The DAG's shape and partial-run selection (no Ray needed)."""

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.dag import build_steps, select


def test_steps_chain_stages_and_put_eval_beside_next_precompute():
    cfg = load_config("smoke")
    steps = {s.name: s.deps for s in build_steps(cfg)}
    assert list(steps)[:4] == ["encode", "traj-1", "train-1", "eval-1"]
    assert steps["traj-1"] == ["encode"]
    assert steps["traj-2"] == ["encode", "train-1"]  # the teacher of stage 2 is stage 1's student
    assert steps["eval-1"] == ["train-1"]  # evaluation needs only the student: it runs beside traj-2
    assert "eval-1" not in steps["traj-2"]
    # evaluations chain: eval-1 caches the base teacher's samples that the later ones reuse
    assert steps["eval-2"] == ["train-2", "eval-1"] and steps["eval-3"] == ["train-3", "eval-2"]
    assert steps["report"] == ["eval-1", "eval-2", "eval-3"]


def test_skip_level_teacher_dependency():
    cfg = load_config("sdxl_lightning")
    steps = {s.name: s.deps for s in build_steps(cfg)}
    assert steps["traj-5"] == ["encode", "train-3"]  # 1-step stage taught by the 4-step student
    # ... and its student starts from the 2-step student (the paper): training waits for that one too
    assert cfg.student_init_of(5) == 4 and steps["train-5"] == ["traj-5", "train-4"]
    assert steps["train-4"] == ["traj-4"]  # an ordinary stage starts from its teacher


def test_until_and_only():
    cfg = load_config("smoke")
    names = [s.name for s in select(build_steps(cfg), cfg, until="4step")]
    assert names == ["encode", "traj-1", "train-1", "eval-1", "traj-2", "train-2", "eval-2", "report"]
    assert [s.name for s in select(build_steps(cfg), cfg, only="traj-2")] == ["traj-2"]
    with pytest.raises(ConfigError, match="no such step"):
        select(build_steps(cfg), cfg, only="train-9")
    with pytest.raises(ConfigError, match="no such stage"):
        select(build_steps(cfg), cfg, until="3step")


def test_only_refuses_a_step_whose_inputs_are_not_finished(tmp_path):
    """`--only STEP` on a run root where the steps upstream of STEP have not run: refused before anything is
    written or any Ray starts, naming every one of them in DAG order (an evaluation's own ordering input, the
    evaluation before it, is not among them)."""
    from pipeline.dag import run_dag
    from pipeline.errors import MissingInputError

    cfg = load_config("smoke", [f"run_root={tmp_path / 'run'}"])
    with pytest.raises(MissingInputError, match=r"^--only eval-2: encode, traj-1, train-1, traj-2, train-2 are not "
                                                r"finished with these settings"):
        run_dag(cfg, only="eval-2")
    with pytest.raises(MissingInputError, match=r"^--only traj-1: encode is not finished"):
        run_dag(cfg, only="traj-1")
    assert not (tmp_path / "run").exists()
