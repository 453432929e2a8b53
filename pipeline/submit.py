"""Cluster submission: the distill job through Ray's Job Submission API, with this project as the
working dir and the run root on shared storage (s3://…). No credentials travel with the job: the
cluster's nodes bring their own (instance role, Kubernetes Secret, or their environment)."""

from __future__ import annotations

import shlex
import time

from .config import CONFIG_DIR, ConfigError, find_config, load_config
from .errors import ClusterError

PROJECT = CONFIG_DIR.parent
# What the working dir upload leaves out (Ray caps working_dir packages at 500 MiB): what a job never runs,
# the tests among it (their fixtures' sentinel credentials would otherwise sit on every node).
EXCLUDES = [".venv/", ".git/", "runs/", "**/__pycache__/", ".pytest_cache/", "benchmarks/results/", "*.egg-info/",
            "tests/", "*.whl"]


def entrypoint_for(config: str | None, overrides: list[str], until: str | None = None) -> tuple[str, str]:
    """(entrypoint command, config path relative to the project). The config must lie inside the
    project (it travels in the working dir) or be the name of a shipped one."""
    path = find_config(config).resolve()
    try:
        rel = path.relative_to(PROJECT.resolve())
    except ValueError:
        raise ConfigError(f"config {str(path)!r} is outside the project folder {PROJECT}; put it under "
                          f"configs/ so it travels with the job's working dir") from None
    cmd = ["python", "-m", "jobs.distill", "--config", rel.as_posix()] + (["--until", until] if until else [])
    for o in overrides:
        cmd += ["--set", o]
    return " ".join(shlex.quote(c) for c in cmd), rel.as_posix()


def check_shared_root(cfg, allow_local: bool) -> None:
    if cfg.run_root.startswith("s3://") or allow_local:
        return
    raise ConfigError(f"run_root: {cfg.run_root!r} is a local path; on a cluster every node must reach the run "
                      "root, so use s3://bucket/prefix (or pass --allow-local-root for a one-node cluster)")


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({e}); check --address (the head's dashboard, "
                           "http://<head>:8265) and that the cluster is up") from None


def submit(address: str, config: str | None, overrides: list[str], *, until: str | None = None,
           allow_local_root: bool = False, submission_id: str | None = None, env_vars: dict | None = None,
           agent_wait_s: float = 120.0) -> str:
    cfg = load_config(config, overrides)  # validate here, before anything is uploaded
    check_shared_root(cfg, allow_local_root)
    if until is not None:
        cfg.stage(until)  # a bad --until fails here, not on the cluster
    if "://" not in cfg.run_root:  # a local root as the submitter resolved it, not under the job's working dir
        overrides = [*overrides, f"run_root={cfg.run_root}"]
    entrypoint, _ = entrypoint_for(config, overrides, until)
    runtime_env = {"working_dir": str(PROJECT), "excludes": EXCLUDES,
                   "env_vars": {"HF_HUB_OFFLINE": "1", **(env_vars or {})}}
    c = client(address)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                metadata={"padistill_run": cfg.name, "run_root": cfg.run_root})
        except RuntimeError as e:  # a head that just started answers before its job agent is up
            if "No available agent" not in str(e):
                raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head at {address} has no job agent after {agent_wait_s:.0f} s; "
                                   "check the head's dashboard_agent.log (a port already taken by another "
                                   "Ray on that host, e.g. 52365, stops the agent)") from e
            time.sleep(1.0)


def status(address: str, job_id: str) -> str:
    return str(client(address).get_job_status(job_id).value)


def logs(address: str, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


async def follow(address: str, job_id: str):
    async for chunk in client(address).tail_job_logs(job_id):
        yield chunk
