"""A stage's DeepSpeed checkpoint lives in the run root, often a shared bucket: resuming from it must not
run code from it. DeepSpeed's own checkpoint engine unpickles with `weights_only=False`; padistill's
engines load with `weights_only=True`. The real DeepSpeed engine (ZeRO-2 and 3, one gloo process, its
own interpreter so its process group stays out of the test session) saves, resumes bit-exact, and
refuses a checkpoint whose optimizer file was replaced by one that runs a command; an lr set on it (`set_lr`,
the student's warm-up) is the one its next step uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from reliability import record

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import glob, json, os, socket, sys
import torch, torch.distributed as dist
from types import SimpleNamespace
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
from pipeline.engines import DeepSpeedEngines, set_lr
work, marker = sys.argv[1], sys.argv[2]

class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {marker}",))

out = {}
for stage in (2, 3):
    engines = DeepSpeedEngines(SimpleNamespace(zero_stage=stage, offload=False, micro_batch=2, grad_accum=1,
                                               precision="fp32"), 1)
    def fresh():
        torch.manual_seed(stage)
        return engines.make(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), 1e-3, (0.9, 0.99), 0.01)
    eng = fresh()
    for _ in range(3):
        eng.backward(eng(torch.randn(2, 4)).sum()); eng.step()
    folder = os.path.join(work, f"zero{stage}")
    engines.save(eng, folder)
    want = engines.full_state_dict(eng)
    back = fresh()
    engines.load(back, folder)
    got = engines.full_state_dict(back)
    res = {"resumed_exact": all(torch.equal(want[k], got[k]) for k in want)}
    optim = sorted(glob.glob(os.path.join(folder, "ds", "*optim_states.pt")))
    res["optim_files"] = len(optim)
    state = torch.load(optim[0], map_location="cpu", weights_only=False)  # our own file, to tamper with
    state["extra"] = Payload()
    torch.save(state, optim[0])
    try:
        engines.load(fresh(), folder)
        res["tampered"] = "loaded"
    except Exception as e:
        res["tampered"] = type(e).__name__ + ": " + str(e)
    eng = fresh()  # a learning rate set on the engine (the student's warm-up) is the one its next step uses
    set_lr(eng, 1e-5)
    before = engines.full_state_dict(eng)
    eng.backward(eng(torch.randn(2, 4)).sum()); eng.step()
    after = engines.full_state_dict(eng)
    res["get_lr"] = eng.get_lr()
    res["first_step"] = max((after[k] - before[k]).abs().max().item() for k in before)
    out[stage] = res
print("RESULT " + json.dumps(out))
"""


def test_a_deepspeed_checkpoint_resumes_exactly_and_one_that_runs_code_is_refused(tmp_path, request):
    marker = tmp_path / "ran"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(marker)], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads(line[0][7:])
    for stage in ("2", "3"):
        assert out[stage]["resumed_exact"] and out[stage]["optim_files"] == 1, out
        msg = out[stage]["tampered"]
        assert msg.startswith("UnsafeCheckpointError: ") and "optim_states.pt: not loaded" in msg, msg
        assert "GLOBAL posix.system" in msg and "weights_only=False" not in msg, msg
        # Adam's first step moves a weight by about the lr in force: 1e-5 as set, not the 1e-3 it was built with
        assert out[stage]["get_lr"] == [1e-5] and 0.9e-5 < out[stage]["first_step"] < 1.1e-5, out
    assert not marker.exists()  # the payload never ran
    record(request, "a stage checkpoint in the run root altered to run code when unpickled (ZeRO-2 and 3)",
           "refused with one line (`UnsafeCheckpointError`, naming the file and the object): DeepSpeed's "
           "checkpoints load with `weights_only=True` (DeepSpeed's own engine unpickles anything); untouched "
           "ones resume bit-exact", injected=2, completed=2)
