"""Beyond one machine, simulated for real: a Ray cluster of three nodes on this machine (each with its
own CPU and a custom resource), the smoke distillation's first stage with the run root on S3 (moto) as
the only shared storage. Asserts that training workers and precompute actors ran on several nodes and
that every output is on S3, none on a local disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline.config import load_config
from pipeline.storage import RunStorage

DRIVER = textwrap.dedent('''
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from pipeline.config import load_config
    from pipeline.dag import run_dag

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node0": 1}})
    for i in (1, 2):
        cluster.add_node(num_cpus=1, resources={f"node{i}": 1})
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    cfg = load_config("smoke", sys.argv[1:])
    run_dag(cfg, until="8step")
    nodes = {}
    for a in list_actors(detail=True, limit=10000, raise_on_missing_output=False):
        if a.node_id:  # an actor that was never placed has none
            nodes.setdefault(a.class_name, set()).add(a.node_id)
    print("PADISTILL_NODES " + json.dumps({k: sorted(v) for k, v in nodes.items()}))
    print("PADISTILL_CLUSTER " + json.dumps([n["NodeID"] for n in ray.nodes()]))
    ray.shutdown()
    cluster.shutdown()
''')


def test_three_node_cluster_with_s3_as_only_shared_storage(s3_endpoint, tmp_path):
    root = "s3://padistill-test/multinode"
    overrides = [f"run_root={root}", f"storage.endpoint_url={s3_endpoint}", "encode.actors=2",
                 "encode.max_rows_per_file=32", "trajectories.actors=2", "trajectories.max_rows_per_file=32",
                 "train.workers=2", "evaluate.samples_per_prompt=1"]
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
           "PADISTILL_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, str(tmp_path / "driver.py"), *overrides], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("PADISTILL_NODES "))
    nodes = json.loads(line.split(" ", 1)[1])
    cluster = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("PADISTILL_CLUSTER ")).split(" ", 1)[1])
    assert len(cluster) == 3

    def ran_on(fragment):
        return set().union(*[set(v) for k, v in nodes.items() if fragment in k])

    assert len(ran_on("RayTrainWorker")) >= 2, nodes  # training workers on different nodes
    assert len(ran_on("EncodeWorker") | ran_on("TrajectoryWorker")) >= 2, nodes  # precompute spread too

    storage = RunStorage(root, load_config("smoke", overrides).storage)
    names = {n[:-5] for n in storage.ls("_manifest")}
    assert {"encode", "trajectories-1-8step", "train-1-8step", "eval-1-8step", "report"} <= names
    assert storage.exists("stages/1-8step/model/model_index.json")
    # nothing of the run on any local disk: only the driver script and the model cache are here
    local = {p.name for p in tmp_path.iterdir()}
    assert local <= {"driver.py", "cache"}, local
