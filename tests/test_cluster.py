"""cluster/ and infra/: every KubeRay manifest and cluster-launcher YAML parses, names a job entry point
that exists and a config that exists and validates, asks GPUs for training workers and holds no
secret; the launcher YAMLs pass Ray's own schema; the Dockerfile installs the package the way the
guide says; the local object store starts and serves S3."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config

REPO = Path(__file__).resolve().parent.parent
KUBERAY = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
LAUNCHER = sorted((REPO / "cluster" / "launcher").glob("*.yaml"))
GUIDE = REPO / "cluster" / "README.md"
DOCKERFILE = REPO / "infra" / "Dockerfile"
JOB_CMD = re.compile(r"python -m (jobs\.\w+)((?:\s+(?:--config|-c)\s+[^\s`'\"]+)?)")
SUBMIT_CMD = re.compile(r"padistill submit\b[^\n]*?--config\s+([^\s`'\"]+)")
# AWS access key ids, and anything that looks like a 40-char secret key assigned to a secret-ish name
KEY_ID = re.compile(r"\b(AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}\b")
SECRET_VALUE = re.compile(r"(?i)(secret|password|token)[\w-]*\s*[:=]\s*['\"]?([A-Za-z0-9/+]{30,})")


def _walk(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, path + (i,))
    else:
        yield path, node


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _check_job_command(cmd: str) -> str:
    """`python -m jobs.X --config configs/F.yaml`: the module exists, the config exists and validates."""
    m = JOB_CMD.search(cmd)
    assert m, f"no `python -m jobs.X` in {cmd!r}"
    assert importlib.util.find_spec(m.group(1)) is not None, f"{m.group(1)} is not a module"
    args = shlex.split(m.group(2))
    assert args, f"{cmd!r} names no --config"
    cfg = REPO / args[1]
    assert cfg.is_file() and cfg.parent.name == "configs", f"{args[1]} is not a config under configs/"
    load_config(str(cfg))
    return args[1]


def _image_from_guide() -> str:
    m = re.search(r"docker build -f infra/Dockerfile -t (\S+) \.", GUIDE.read_text())
    assert m, "the guide builds the image from infra/Dockerfile"
    return m.group(1)


def test_files_exist():
    assert {p.name for p in KUBERAY} >= {"raycluster.yaml", "rayjob.yaml"}
    assert {p.name for p in LAUNCHER} >= {"aws.yaml", "gcp.yaml"}
    assert GUIDE.is_file() and DOCKERFILE.is_file()


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    spec = _cluster_spec(doc)
    image = _image_from_guide()
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0"
    assert all(c["image"] == image for c in _containers(head["template"]))
    assert spec.get("enableInTreeAutoscaling") is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert "gpu-train" in groups
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        for c in _containers(g["template"]):
            assert c["image"] == image
            lim = c["resources"]["limits"]
            assert int(lim["nvidia.com/gpu"]) >= 1, f"{g['groupName']} asks no GPU"
            assert int(c["resources"]["requests"]["nvidia.com/gpu"]) == int(lim["nvidia.com/gpu"])
    # S3 credentials: every AWS_* key variable comes from a Secret, by reference
    pods = [head["template"]] + [g["template"] for g in groups.values()]
    for pod in pods:
        for c in _containers(pod):
            names = {e["name"]: e for e in c.get("env", [])}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "value" not in names[key], f"{key} inlined"
                assert names[key]["valueFrom"]["secretKeyRef"]["name"]
    if doc["kind"] == "RayJob":
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        assert _check_job_command(doc["spec"]["entrypoint"]).startswith("configs/")
        assert JOB_CMD.search(doc["spec"]["entrypoint"]).group(1) == "jobs.distill"
        assert all(c["image"] == image for c in _containers(doc["spec"]["submitterPodTemplate"]))


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_yaml(path):
    from ray.autoscaler._private.util import validate_config

    doc = yaml.safe_load(path.read_text())
    validate_config(doc)  # Ray's own schema (ray/autoscaler/ray-schema.json) and checks
    assert doc["docker"]["image"] == _image_from_guide()
    types = doc["available_node_types"]
    head = types[doc["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    train = [t for t in types.values() if "train" in t["resources"]]
    pre = [t for t in types.values() if "precompute" in t["resources"]]
    assert train and pre
    provider = doc["provider"]["type"]
    for t in train + pre:
        assert t["resources"]["GPU"] >= 1
    for t in train:  # training: on-demand
        nc = t["node_config"]
        if provider == "aws":
            assert "InstanceMarketOptions" not in nc
        else:
            assert nc["scheduling"]["provisioningModel"] == "STANDARD" and not nc["scheduling"].get("preemptible")
    for t in pre:  # precompute: spot / preemptible
        nc = t["node_config"]
        if provider == "aws":
            assert nc["InstanceMarketOptions"]["MarketType"] == "spot"
        else:
            assert nc["scheduling"]["provisioningModel"] == "SPOT" and nc["scheduling"]["preemptible"] is True
    # the submit command in its header names a config that validates
    for cfg in SUBMIT_CMD.findall(path.read_text()):
        load_config(str(REPO / cfg))


def test_no_secret_values():
    files = [p for d in ("cluster", "infra") for p in (REPO / d).rglob("*") if p.is_file()]
    assert files
    for p in files:
        text = p.read_text()
        assert not KEY_ID.search(text), f"{p}: an AWS access key id"
        hit = SECRET_VALUE.search(text)
        assert not hit, f"{p}: looks like a secret value: {hit.group(0)[:40]}"
        if p.suffix in (".yaml", ".yml"):
            for path, value in _walk(yaml.safe_load(text)):
                if path and str(path[-1]).lower() in ("aws_access_key_id", "aws_secret_access_key"):
                    pytest.fail(f"{p}: {'.'.join(map(str, path))} holds a value")
    for p in KUBERAY:
        assert "kind: Secret" not in p.read_text(), f"{p}: secrets are created by the user, not shipped"


def test_guide_commands_are_the_checked_ones():
    text = GUIDE.read_text()
    for path in KUBERAY + LAUNCHER:
        assert str(path.relative_to(REPO)) in text, f"the guide does not use {path.name}"
    cmds = JOB_CMD.findall(text)
    assert cmds, "the guide shows the job command"
    for m in JOB_CMD.finditer(text):
        if m.group(2):
            _check_job_command(m.group(0))
    submits = SUBMIT_CMD.findall(text)
    assert submits
    for cfg in submits:
        load_config(str(REPO / cfg))
    # the RayJob's entrypoint is literally in the guide
    rayjob = yaml.safe_load((REPO / "cluster/kuberay/rayjob.yaml").read_text())
    assert rayjob["spec"]["entrypoint"] in text
    assert "secretKeyRef" in text or "kubectl create secret generic padistill-s3" in text


def test_dockerfile_installs_the_package_like_the_guide():
    text = DOCKERFILE.read_text()
    lines = [l.strip() for l in text.splitlines() if not l.strip().startswith("#")]
    froms = [l for l in lines if l.startswith("FROM ")]
    arg = re.search(r"ARG RAY_IMAGE=(\S+)", text)
    assert froms and arg and arg.group(1).startswith("rayproject/ray:") and arg.group(1).endswith("-gpu")
    assert "WORKDIR /app" in lines
    assert re.search(r"pip install -e \.", text), "installs the project editable, as the guide says"
    for folder in ("pipeline/", "jobs/", "configs/"):
        assert any(l.startswith("COPY") and folder in l for l in lines), folder
    guide = GUIDE.read_text()
    assert "pip install -e ." in guide
    assert not re.search(r"(?im)^\s*(ENV|ARG)\s+AWS_", text), "no credentials baked in"
    ignore = (REPO / "infra" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".aws" in ignore


def test_policies_are_least_privilege():
    for name in ("iam-policy.json", "s3-bucket-policy.json"):
        doc = json.loads((REPO / "infra" / name).read_text())
        for st in doc["Statement"]:
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            if st["Effect"] == "Allow":
                assert all(a.startswith("s3:") and "*" not in a for a in actions), actions
                res = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
                assert all(r != "*" and r != "arn:aws:s3:::*" for r in res)
                if "s3:PutObject" in actions or "s3:DeleteObject" in actions:
                    assert all(r.endswith("/padistill/*") for r in res), res
                if actions == ["s3:ListBucket"] or "s3:ListBucket" in actions:
                    assert st["Condition"]["StringLike"]["s3:prefix"]


def test_local_object_store_script(tmp_path):
    """infra/local-s3.sh starts moto on 127.0.0.1, prints the endpoint and --set flags; the bucket works."""
    import socket

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["bash", str(REPO / "infra" / "local-s3.sh"), str(port), "dev-bucket"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        flags = None
        deadline = time.monotonic() + 90
        out = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            if line.startswith("S3 FLAGS:"):
                flags = line.split(":", 1)[1].strip()
                break
        assert flags, "".join(out)
        endpoint = f"http://127.0.0.1:{port}"
        assert f"--set storage.endpoint_url={endpoint}" in flags
        m = re.search(r"--set run_root=(s3://\S+)", flags)
        assert m and m.group(1).startswith("s3://dev-bucket/")
        overrides = [f.split("=", 1)[0] + "=" + f.split("=", 1)[1] for f in flags.split("--set") if f.strip()]
        cfg = load_config("toy_digits", [o.strip() for o in overrides])
        assert cfg.storage.endpoint_url == endpoint
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.put_object(Bucket="dev-bucket", Key="toy_digits/hello", Body=b"hi")
        assert s3.get_object(Bucket="dev-bucket", Key="toy_digits/hello")["Body"].read() == b"hi"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
