"""The console script and every job's --help run; jobs also run as `python -m jobs.X`."""

import subprocess
import sys

import pytest

from jobs.cli import JOBS, main


def test_padistill_help_lists_every_job(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for job in JOBS:
        assert job in out


@pytest.mark.parametrize("job", sorted(JOBS))
def test_each_job_help(job, capsys):
    with pytest.raises(SystemExit) as e:
        main([job, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert ("--address" if job in ("status", "logs") else "--config") in out


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "jobs.show_config", "--config", "smoke", "--set", "train.workers=1"],
                         capture_output=True, text=True, check=True).stdout
    assert "workers: 1" in out and "name: smoke" in out


def test_console_script_installed():
    exe = __import__("shutil").which("padistill") or str(__import__("pathlib").Path(sys.executable).parent / "padistill")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train-stage" in r.stdout


def test_bad_config_exits_with_named_error(capsys):
    assert main(["config", "--config", "smoke", "--set", "stages.0.student_steps=5"]) == 2
    err = capsys.readouterr().err
    assert "stages.0.student_steps" in err and "does not divide" in err
