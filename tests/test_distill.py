"""`padistill distill` end to end on the smoke config: a run on S3 (moto) killed mid-stage and resumed
by the same command, whose exported folders all load in stock diffusers, and a rerun that skips every
step; and a submission (run root on S3) to a three-node Ray cluster started on 127.0.0.1 that reaches
SUCCEEDED with its training spread over the nodes; neither S3 run leaves the AWS credentials it ran with
in anything it wrote."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from pipeline import shards
from pipeline.config import load_config
from pipeline.dag import build_steps
from pipeline.storage import RunStorage
from pipeline.student import LORA_WEIGHT_NAME, pipeline_components
from pipeline.phases import plan_phases
from pipeline.export import latest_checkpoint
from procs import kill_session, kill_when
from reliability import record

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def manifests(storage: RunStorage) -> set[str]:
    return {n[:-5] for n in storage.ls("_manifest") if n.endswith(".json")}


EXPECTED_SMOKE = {"encode", "report"} | {f"{p}-{k}" for p in ("trajectories", "train", "eval")
                                          for k in ("1-8step", "2-4step", "3-1step")}


# what a padistill process sets in its own environment (jobs/__init__.py, cluster.fast_train_polls): this
# test process has them from importing padistill; a child (a `ray start` node as on a user's machine, a CLI
# that sets them again itself) starts without them
PADISTILL_SET = ("RAY_DATA_LOGGING_CONFIG", "RAY_DEDUP_LOGS_SKIP_REGEX", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                 "TRANSFORMERS_VERBOSITY")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in PADISTILL_SET}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    env["PYTHONUNBUFFERED"] = "1"  # stdout and stderr share one log file: whole lines, in order
    return env


SKIPPED = r"padistill distill: (\S+) already finished, skipped"  # pipeline.dag's line for a skipped step


def _run_logged(cmd: list[str], cwd: Path, name: str, timeout: float = 1200) -> str:
    """Run a job to its end with its console in `cwd/name`; its text (the job must succeed)."""
    with open(cwd / name, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            kill_session(proc)  # the job's own Ray too, whether it ended or timed out
    text = (cwd / name).read_text()
    assert rc == 0, text[-3000:]
    return text


def test_smoke_dag_on_s3_killed_mid_stage_resumes_exports_load_and_rerun_skips(s3_endpoint, tmp_path, request, capsys):
    """The whole smoke DAG (three stages) with its run root on S3 (moto): `distill` SIGKILLed (its whole
    session) inside stage 1, once Ray Train has registered a checkpoint; `distill` again resumes that stage
    from exactly that checkpoint (every rank's ZeRO shard), skips the finished encode and trajectories, and
    runs the rest; every exported folder loads in stock diffusers (the export contract); a third run skips
    every finished step and writes the report again without starting a Ray. The run's AWS credentials are
    in nothing it wrote. (The same DAG on a local, relative run root: test_real_metrics's non-toy run.)"""
    from diffusers import StableDiffusionXLPipeline

    root = "s3://padistill-test/killed"
    # stage 1 long enough that the kill lands inside it, after its first checkpoint (step 4 of 12)
    sets = [f"run_root={root}", f"storage.endpoint_url={s3_endpoint}", "stages.0.mse_steps=12",
            "train.checkpoint_every=4"]
    over = [a for kv in sets for a in ("--set", kv)]
    distill = [sys.executable, "-m", "jobs.distill", "--config", "smoke", *over]
    cfg = load_config("smoke", sets)
    storage = RunStorage.from_config(cfg)
    started = time.time()
    # killed on the real signal: stage 1's first checkpoint registered by Ray Train on S3
    kill_when(distill, lambda: latest_checkpoint(cfg, 1, storage) is not None, tmp_path / "first.log", timeout=600,
              what="checkpoint", every=0.5, cwd=tmp_path, env=_env())
    killed_at = int(Path(latest_checkpoint(cfg, 1, storage)).name.split("_")[1])
    assert 0 < killed_at < 12 and storage.finished_manifest("train-1-8step") is None, \
        "the kill came after the stage ended; make it longer"
    encoded_at = storage.read_manifest("encode")["finished_at"]

    # the same command again: encode and trajectories are finished, stage 1 resumes, the rest runs
    second = _run_logged(distill, tmp_path, "second.log")
    assert f"resumed from checkpoint at step {killed_at}" in second
    assert "Started a local Ray instance" in second  # what the third run, with nothing to compute, must not print
    assert manifests(storage) == EXPECTED_SMOKE
    assert set(re.findall(SKIPPED, second)) == {"encode", "traj-1"}, second[-3000:]  # not run again
    assert storage.read_manifest("encode")["finished_at"] == encoded_at
    trained = storage.read_manifest("train-1-8step")
    assert trained["steps"] == 12 and trained["final_metrics"]["resumed_from"] == killed_at
    assert not (tmp_path / "runs").exists()  # nothing on a local disk: the run root is S3 only
    assert storage.read_manifest("trajectories-1-8step")["outputs"]["rows"] == 64
    # each stage keeps its latest `train.keep_checkpoints` (2) checkpoints: the killed run's first one, and those
    # beyond two in the later stages, deleted on S3 as newer ones registered (all of them stayed until 2026-12-06)
    kept = {k: sorted(n for n in storage.ls(cfg.stage_dir(k), "train") if n.startswith("checkpoint_0"))
            for k in range(1, len(cfg.stages) + 1)}
    assert kept[1] == ["checkpoint_0000008", "checkpoint_0000012"], kept
    assert all(len(v) == cfg.train.keep_checkpoints for v in kept.values()), kept
    traj = storage.read_table("stages/1-8step/traj", columns=["id", "draw"])
    keys = list(zip(traj.column("id").to_pylist(), traj.column("draw").to_pylist()))
    stamps = {m: storage.read_manifest(m)["finished_at"] for m in EXPECTED_SMOKE}

    for k, st in enumerate(cfg.stages, start=1):  # the export contract, on each folder as a user downloads it
        folder = Path(storage.get_dir(f"{cfg.stage_dir(k)}/model", str(tmp_path / f"model-{k}")))
        pipe = StableDiffusionXLPipeline.from_pretrained(folder)
        assert pipe.scheduler.config.timestep_spacing == "trailing"
        assert pipe.scheduler.config.prediction_type == ("sample" if st.prediction_type == "sample" else "epsilon")
        info = json.loads((folder / "padistill.json").read_text())
        # the pipeline's components and the student's own files, none of the teacher's (training.json, curves)
        lora = {LORA_WEIGHT_NAME} if info["student_mode"] == "lora" else set()
        assert {p.name for p in folder.iterdir()} == \
            {*pipeline_components(folder), "model_index.json", "padistill.json", "README.md", *lora}
        assert info["num_inference_steps"] == st.student_steps and info["guidance_scale"] == 0
        assert "## Evaluation" in (folder / "README.md").read_text()  # the model card carries the metrics
        img = pipe("a handwritten digit seven", num_inference_steps=st.student_steps, guidance_scale=0,
                   generator=torch.Generator().manual_seed(0)).images[0]
        assert img.size == (32, 32)
        metrics = storage.read_json(f"{cfg.stage_dir(k)}/eval/metrics.json")
        assert metrics["student_steps"] == st.student_steps and metrics["speed"]["speedup"] > 1
        # kept per evaluation seed as well (an evaluation at another seed replaces metrics.json, not this)
        kept = storage.read_json(f"{cfg.stage_dir(k)}/eval/seeds/{cfg.evaluate.seed}.json")
        assert kept.pop("evaluation_key") and kept == metrics
        # the student the stage started from, scored at the same step count: what training had to improve on
        assert set(metrics["student_start"]) == set(metrics["student"])
        train_outputs = storage.read_manifest(f"train-{cfg.stage_dir(k).split('/', 1)[1]}")["outputs"]
        for name in ("history", "loss_curves", "tensorboard", "model", "checkpoint"):  # relative to the root
            assert not train_outputs[name].startswith(("s3:", "/")) and storage.exists(train_outputs[name])
        history = storage.read_json(train_outputs["history"])
        assert history[-1]["step"] == plan_phases(st)[-1].end

    report = storage.read_text("report.md")
    assert "| **student 1step** | 1 |" in report and "Wall time per DAG step" in report
    for png in ("metrics.png", "grid.png", *(f"loss-{k}.png" for k in range(1, len(cfg.stages) + 1))):
        assert len(storage.read_bytes(f"report/{png}")) > 1000
    assert storage.missing_outputs() == []  # the DAG's own end check (a lost output: test_real_metrics)

    third = _run_logged(distill, tmp_path, "third.log")  # the same command a third time: every step is finished
    ran = re.findall(r"padistill distill: (\S+) done in", third)
    skipped = re.findall(SKIPPED, third)
    assert ran == ["report"] and set(skipped) == {s.name for s in build_steps(cfg)} - {"report"}, third[-3000:]
    assert "Started a local Ray instance" not in third  # nothing to compute: the report is written without Ray
    # the steps' own skip rules, which the third run asked before starting no Ray, as `padistill train-stage`
    # and `padistill evaluate` ask them
    from pipeline.evaluate import run_evaluate
    from pipeline.train import run_train_stage

    said = []
    assert run_train_stage(cfg, 1, log=said.append) == storage.read_manifest("train-1-8step")
    assert run_evaluate(cfg, 3, log=said.append) == storage.read_manifest("eval-3-1step")
    assert said == ["padistill train-stage: train-1-8step is up to date", "padistill evaluate: stage 3 is up to date"]
    from pipeline.train import finished as trained  # how many checkpoints stay is not an input of the stage

    assert trained(load_config("smoke", [*sets, "train.keep_checkpoints=5"]), 1, storage) is not None
    # `--only STEP` runs on finished inputs: here it skips, as the step is finished; under a stage 1 changed since,
    # evaluating stage 2 alone would score a student from the old chain, and is refused before anything runs
    from pipeline.dag import run_dag
    from pipeline.errors import MissingInputError

    said = []
    assert [r["ran"] for r in run_dag(cfg, only="eval-3", log=said.append)] == [False]
    assert said == ["padistill distill: eval-3 already finished, skipped in 0.0s"]
    written = storage.read_text("config.yaml")
    with pytest.raises(MissingInputError, match=r"^--only eval-2: train-1 is not finished with these settings"):
        run_dag(load_config("smoke", [*sets, "stages.0.lr=2.0e-5"]), only="eval-2")
    assert storage.read_text("config.yaml") == written  # the refused run wrote nothing
    from jobs.cli import main as padistill

    changed = ["--config", "smoke", *[a for kv in [*sets, "stages.0.lr=2.0e-5"] for a in ("--set", kv)]]
    assert padistill(["evaluate", *changed, "--stage", "2"]) == 2  # `padistill evaluate` asks the same
    err = capsys.readouterr().err
    assert "padistill evaluate: --stage 2: train-1 is not finished with these settings" in err, err
    assert padistill(["evaluate", *changed]) == 2  # every stage: each one's student is from the old stage 1
    err = capsys.readouterr().err
    assert all(f"stage {k} skipped: its student is not from these settings (train-1" in err for k in (1, 2, 3)), err
    # stage 1's student re-exported since stage 2's trajectories were made from it (a file of it rewritten): every
    # manifest downstream still matches its own inputs, but stage 2's trajectories are stale, so is what used them
    sched = f"{cfg.stage_dir(1)}/model/scheduler/scheduler_config.json"
    original = storage.read_bytes(sched)
    storage.write_bytes(sched, original + b"\n")
    with pytest.raises(MissingInputError, match=r"^--only eval-2: traj-2 is not finished with these settings"):
        run_dag(cfg, only="eval-2")
    storage.write_bytes(sched, original)
    assert [r["ran"] for r in run_dag(cfg, only="eval-2", log=said.append)] == [False]
    assert {m: storage.read_manifest(m)["finished_at"] for m in EXPECTED_SMOKE - {"report"}} == \
        {m: stamps[m] for m in EXPECTED_SMOKE - {"report"}}
    # a benchmark reads a finished run's figures only under the settings it ran with: the same root under
    # a changed stage (a config edited since) is not reported as that config's
    from benchmarks.distill import finished

    assert [e["student_steps"] for e in finished("smoke", root, sets[1:])["evals"]] == [8, 4, 1]
    assert finished("smoke", root, [*sets[1:], "stages.1.mse_weight=1.0"]) is None
    from benchmarks.seed_table import main as seed_table  # a variant experiment's table reads runs the same way

    # --benchmark digits: no benchmark-wide overrides (its set is empty); the run's own go in as --set
    table = ["--seeds", "0", "--benchmark", "digits", *[a for kv in sets[1:] for a in ("--set", kv)], "--steps", "1",
             "--out", str(tmp_path / "arms"), "--arm", "smoke", "smoke", root]
    assert seed_table(table) == 0
    rows = [r for r in (tmp_path / "arms.md").read_text().splitlines() if r.startswith("| ")]
    assert [r.split(" | ")[:2] for r in rows[2:]] == [["| teacher (CFG)", "32"], ["| teacher (CFG)", "1"],
                                                        ["| smoke: start of stage", "1"], ["| **smoke**", "1"]], rows
    with pytest.raises(SystemExit, match=f"not finished with these settings.*\n  changed: {root}$"):
        seed_table([*table[:-3], "changed", "smoke", root, "stages.1.mse_weight=1.0"])
    n = _no_credentials_in(storage, [tmp_path / f"{w}.log" for w in ("first", "second", "third")], "",
                           since=started)
    record(request, "`distill` killed mid-stage (SIGKILL), run root on S3",
           f"`distill` again resumes the stage from its latest checkpoint (step {killed_at} of 12, every rank's ZeRO "
           "shard), skips the finished precompute and ends with the manifests of an unbroken run; a third run "
           "skips every step", injected=1, completed=1, rows_lost=64 - len(set(keys)),
           duplicates=len(keys) - len(set(keys)))
    record(request, "the AWS credentials a run on S3 had (sentinel values)",
           f"in nothing it wrote: {n} files scanned (every object of the run root: configs, manifests, Parquet, "
           "checkpoints, model cards, report; its consoles; its Ray session logs)", injected=2, completed=1)


def _ray_sessions(since: float, temp_dirs=None) -> list[Path]:
    """The Ray session folders (logs, unpacked working dirs) under the given Ray temp dirs (by default
    this machine's, /tmp/ray) that were written since `since`."""
    dirs = temp_dirs or [Path(tempfile.gettempdir(), "ray")]
    return [d for t in dirs for d in Path(t).glob("session_2*") if d.stat().st_mtime >= since]


def _no_credentials_in(storage, local_files, console: str, since: float, ray_temp_dirs=None):
    """The AWS credentials the run had (the moto fixture's sentinels) appear in nothing it wrote: every
    object of the run root (configs, manifests, Parquet, checkpoints, model cards, report), its console,
    and the logs of the Ray sessions it ran in (under `ray_temp_dirs`, by default this machine's)."""
    from conftest import SENTINEL_KEY_ID, SENTINEL_SECRET

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SENTINEL_SECRET
    ray_logs = [p for d in _ray_sessions(since, ray_temp_dirs) for p in d.rglob("*")
                if p.is_file() and not p.is_symlink()]
    objects = storage.fs.find(storage.path(""))
    assert len(objects) > 50 and ray_logs, (len(objects), len(ray_logs))
    blobs = [(f"s3://{o}", storage.fs.cat_file(o)) for o in objects]
    blobs += [(str(p), p.read_bytes()) for p in [*local_files, *ray_logs]] + [("console", console.encode())]
    for name, data in blobs:
        for secret in (SENTINEL_KEY_ID, SENTINEL_SECRET):
            assert secret.encode() not in data, f"{name} holds the credential {secret[:8]}…"
    return len(blobs)


# Both ask the head's State API, which a busy dashboard sometimes answers by dropping the connection
# (seen once in a full suite: ServerUnavailable, RemoteDisconnected): such a refusal is asked again, until
# the deadline; it is not what the test is about.
WAIT_NODES = """import json, sys, time
from ray.util.state import list_nodes
from ray.util.state.exception import RayStateApiException
end, alive, last = time.monotonic() + 180, [], None
while len(alive) < int(sys.argv[2]):
    assert time.monotonic() < end, (alive, last)
    try:
        alive = [n.node_id for n in list_nodes(address=sys.argv[1]) if n.state == "ALIVE"]
    except RayStateApiException as e:
        last = e
    time.sleep(0.5)
print(json.dumps(alive))
"""
WATCH_ACTORS = """import json, sys, time
from ray.util.state import list_actors
from ray.util.state.exception import RayStateApiException
seen = set()
while True:  # every (class, node) an actor of the cluster had, one JSON line a poll
    try:
        seen |= {(a.class_name, a.node_id) for a in list_actors(address=sys.argv[1], detail=True, limit=10000,
                                                                raise_on_missing_output=False) if a.node_id}
    except RayStateApiException as e:
        print(f"asked again: {e!r}"[:300], file=sys.stderr, flush=True)
    print(json.dumps(sorted(seen)), flush=True)
    time.sleep(2)
"""


def test_submit_to_a_three_node_cluster_on_s3_leaks_no_credentials(s3_endpoint, tmp_path, monkeypatch, request):
    """`padistill submit` to a token-authenticated Ray cluster of three nodes on this machine (a head and
    two `ray start` workers, one CPU each, S3 the only storage they share) whose nodes hold AWS
    credentials (the moto fixture's sentinels, as an instance role or a Secret would give them), run root
    on S3 reached through a proxy that throttles (503) or resets every 15th request
    (tests/faultproxy.py): the job reaches SUCCEEDED with every row once; its training workers ran on
    two nodes, and each precompute unit names the cluster node that wrote it; no file it wrote, no job
    log, no record of the job on the head (its runtime env, entrypoint, metadata) and no log of the
    cluster's Ray session holds the credentials."""
    import secrets

    from faultproxy import FaultProxy

    # a head with Ray's token authentication on, as clusters should run: clients read RAY_AUTH_TOKEN
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
    port, dash = _free_port(), _free_port()
    started = time.time()  # the head's Ray session (its logs, the job's unpacked working dir) is newer

    # each node's own Ray temp dir, as each machine of a cluster has its own disk: on one shared session
    # folder, a node's runtime-env agent re-unpacks the job's working dir (Ray overwrites it on a node's
    # first use) under another node's running workers, deleting their cwd (torch's MKL then dies with
    # "Cannot load libtorch_cpu.so"). Short paths: Ray's sockets live there
    temp_root = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp"))
    temp_dirs = [temp_root / f"n{i}" for i in range(3)]
    passed = False

    def node(name: str, *args: str) -> subprocess.Popen:  # the session's Ray (ray_local) holds the default ports
        return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                 f"--temp-dir={temp_root / name.replace('node', 'n')}",
                                 f'--resources={{"{name}": 1}}', f"--dashboard-agent-listen-port={_free_port()}",
                                 f"--dashboard-agent-grpc-port={_free_port()}",
                                 f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
                                 *args], cwd=tmp_path, env=_env(), stdout=open(tmp_path / f"{name}.log", "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    nodes = [node("node0", "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                  "--include-dashboard=true", f"--ray-client-server-port={_free_port()}")]
    address = f"http://127.0.0.1:{dash}"
    proxy = None
    try:
        deadline = time.monotonic() + 180
        while True:  # the dashboard answers once the head is up
            import urllib.error
            import urllib.request

            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 where Ray's token auth is on): it is up
                break
            except Exception:
                assert nodes[0].poll() is None, (tmp_path / "node0.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "ray head did not come up"
                time.sleep(0.5)
        for i in (1, 2):  # one at a time: two raylets starting together on one IP raced for a port
            nodes.append(node(f"node{i}", f"--address=127.0.0.1:{port}", f"--node-manager-port={_free_port()}",
                              f"--object-manager-port={_free_port()}"))
            # the state API (as `ray list nodes` reads it), until this node is alive; prints the alive nodes' ids
            state = subprocess.run([sys.executable, "-c", WAIT_NODES, address, str(i + 1)], env=_env(),
                                   capture_output=True, text=True, timeout=300)
            assert state.returncode == 0, state.stderr[-2000:] + (tmp_path / f"node{i}.log").read_text()[-2000:]
        cluster_nodes = set(json.loads(state.stdout.strip().splitlines()[-1]))
        root = "s3://padistill-test/submitted"
        proxy = FaultProxy(s3_endpoint, every=15).start()
        # two precompute actors over two files, two training workers: each takes a node's one CPU
        sets = [f"run_root={root}", f"storage.endpoint_url={proxy.url}", "encode.actors=2",
                "encode.max_rows_per_file=32", "trajectories.actors=2", "trajectories.max_rows_per_file=32",
                "train.workers=2", "evaluate.samples_per_prompt=1"]
        # where the job's training workers run, from the head's State API while the job runs (a finished
        # actor's record does not always outlive the job)
        watcher = subprocess.Popen([sys.executable, "-c", WATCH_ACTORS, address], env=_env(), stderr=open(
            tmp_path / "actors.err", "w"), stdout=open(tmp_path / "actors.jsonl", "w"), start_new_session=True)
        nodes.append(watcher)  # killed with the cluster, whatever happens
        out = subprocess.run([str(BIN / "padistill"), "submit", "--address", address, "--config", "smoke",
                              "--until", "8step", *[a for kv in sets for a in ("--set", kv)]],
                             cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        job_id = re.search(r"submitted (\S+)", out.stdout).group(1)
        assert f"padistill logs --address {address} --follow {job_id}" in out.stdout
        # through the CLI, as a user would (each reads this head's token from the environment; in this process
        # Ray keeps the token of the session's own cluster, ray_local)
        def status():
            out = subprocess.run([str(BIN / "padistill"), "status", "--address", address, job_id],
                                 env=_env(), capture_output=True, text=True, timeout=120)
            assert out.stdout.strip(), out.stderr[-2000:]
            return out.stdout.strip().splitlines()[-1]

        # the command `submit` printed, which streams the logs and returns when the job ends (one process
        # waiting, not a status process every few seconds taking a core from the job); then its status
        followed = subprocess.run([str(BIN / "padistill"), "logs", "--address", address, "--follow", job_id],
                                  env=_env(), capture_output=True, text=True, timeout=1200)
        deadline = time.monotonic() + 600
        # Ray's log stream raises when a busy dashboard closes its websocket abnormally (a Ray hiccup, not
        # what this test is about): then the status is asked until the job ends
        while (st := status()) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            assert followed.returncode != 0, "the log stream ended before the job"
            assert time.monotonic() < deadline, "job did not finish in time"
            time.sleep(2)
        logs = subprocess.run([str(BIN / "padistill"), "logs", "--address", address, job_id],
                              env=_env(), capture_output=True, text=True).stdout
        assert st == "SUCCEEDED", (st, logs[-4000:])
        if followed.returncode == 0:  # followed to the job's end
            assert "report: " in followed.stdout and followed.stdout.strip() in logs
        proxy.stop()
        faults = dict(proxy.counts)
        assert proxy.faults >= 20 and any(k.startswith("reset") for k in faults) and \
            any(k.endswith(" PUT") for k in faults), faults  # writes were hit too
        # checked straight on the moto server, not through the proxy
        cfg = load_config("smoke", [f"run_root={root}", f"storage.endpoint_url={s3_endpoint}"])
        storage = RunStorage.from_config(cfg)
        assert manifests(storage) == {"encode", "trajectories-1-8step", "train-1-8step", "eval-1-8step", "report"}
        # the same rows as a clean run: each of the 64 source rows encoded once, rolled out once per draw
        enc_ids = storage.read_table("encoded", columns=["id"]).column("id").to_pylist()
        assert len(enc_ids) == len(set(enc_ids)) == cfg.data.limit == 64
        traj = storage.read_table("stages/1-8step/traj", columns=["id", "draw"])
        pairs = list(zip(traj.column("id").to_pylist(), traj.column("draw").to_pylist()))
        assert sorted(pairs) == sorted((i, d) for i in enc_ids for d in range(cfg.trajectories.draws))
        assert storage.read_manifest("train-1-8step")["steps"] == plan_phases(cfg.stages[0])[-1].end
        assert storage.exists("stages/1-8step/model/model_index.json")
        assert "| **student 8step** | 8 |" in storage.read_text("report.md")
        watcher.terminate()
        watcher.wait(timeout=60)
        seen = (tmp_path / "actors.jsonl").read_text().split("\n")[:-1]  # whole lines only
        assert seen, (tmp_path / "actors.err").read_text()[-2000:]

        def ran_on(fragment):
            return {node_id for name, node_id in json.loads(seen[-1]) if fragment in name}

        assert len(ran_on("RayTrainWorker")) >= 2, seen[-1]  # training workers on different nodes
        # each precompute unit's marker names the node that wrote it, a node of this cluster. (Where the units
        # ran is not asserted: a pool's two actors stand on two nodes, but the first ready may take both units,
        # and the State API's list missed one of the two in some runs.)
        wrote = [m["node"] for out in ("encoded", "stages/1-8step/traj")
                 for m in shards.read_markers(storage, out).values()]
        assert len(cluster_nodes) == 3 and len(wrote) == 4 and set(wrote) <= cluster_nodes, (wrote, cluster_nodes)
        # nothing of the run on a node's disk: the job's unpacked working dir holds no run root
        sessions = _ray_sessions(started, temp_dirs)
        assert len(sessions) == 3, sessions  # one a node, each in its own temp dir
        local = [p for d in sessions for p in (d / "runtime_resources").rglob("*")
                 if p.name in ("runs", "stages", "_manifest")]
        assert not local, local
        # what the head keeps of the job: a secret passed through the runtime env would sit here
        # (asked from a fresh process, which reads this head's token as `padistill status` does)
        info = subprocess.run([sys.executable, "-c", "import json, sys; from ray.job_submission import "
                               "JobSubmissionClient as C; print(json.dumps(C(sys.argv[1]).get_job_info(sys.argv[2])"
                               ".dict(), default=str))", address, job_id],
                              env=_env(), capture_output=True, text=True, timeout=120).stdout
        assert "padistill" in info and job_id in info
        n = _no_credentials_in(storage, [tmp_path / f"node{i}.log" for i in range(3)],
                               out.stdout + out.stderr + followed.stdout + followed.stderr + logs + info,
                               since=started, ray_temp_dirs=temp_dirs)
        print(f"fault proxy: {faults}")
        record(request, f"a submitted job's S3 traffic through a proxy: every 15th request throttled (503) or reset "
               f"({faults['requests']} requests)", "retried with backoff by both S3 clients (`storage.max_attempts`); "
               "the job succeeds with every row once", injected=proxy.faults, completed=1,
               rows_lost=64 - len(set(pairs)), duplicates=len(pairs) - len(set(pairs)))
        record(request, "the AWS credentials the nodes of a cluster hold, through `padistill submit`",
               f"in nothing the job wrote: {n} files scanned (the run root's objects, `padistill logs`, the head's "
               "record of the job with its runtime env, the three nodes' Ray session logs and unpacked working "
               "dirs)", injected=2, completed=1)
        passed = True
    finally:
        if proxy is not None:
            proxy.stop()
        for proc in nodes:
            kill_session(proc)
        if passed:  # a failure keeps the nodes' Ray logs for whoever reads it
            shutil.rmtree(temp_root, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
