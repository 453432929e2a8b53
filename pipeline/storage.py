"""Run storage: one run root URI (local path, file://… or s3://bucket/prefix with an optional endpoint)
reached through fsspec and pyarrow filesystems; Parquet with tensor columns; DAG-step manifests.

A step is finished only when its manifest exists: writers put their outputs first and the
manifest last (`RunStorage.commit_manifest`). Credentials come from the AWS environment variables
or a named profile and are never written into configs, manifests or logs."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import posixpath
import uuid
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import StorageConfig

MANIFEST_DIR = "_manifest"


def _split(uri: str) -> tuple[str, str]:
    """('s3', 'bucket/prefix') or ('file', '/abs/path')."""
    if uri.startswith("s3://"):
        return "s3", uri[len("s3://"):].strip("/")
    import os

    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return "file", os.path.abspath(os.path.expanduser(path))


def _credentials(cfg: StorageConfig | None) -> dict:
    """Explicit keys only when a profile is named (pyarrow cannot read profiles); otherwise both
    libraries read the AWS environment themselves."""
    if cfg is None or not cfg.profile:
        return {}
    import botocore.session

    creds = botocore.session.Session(profile=cfg.profile).get_credentials()
    if creds is None:
        raise ValueError(f"storage.profile: AWS profile {cfg.profile!r} has no credentials")
    c = creds.get_frozen_credentials()
    return {"access_key": c.access_key, "secret_key": c.secret_key, "session_token": c.token}


def filesystem_for(uri: str, cfg: StorageConfig | None = None):
    """An fsspec filesystem for `uri` (s3fs with the configured endpoint, or local)."""
    import fsspec

    scheme, _ = _split(uri)
    if scheme == "file":
        return fsspec.filesystem("file")
    cfg = cfg or StorageConfig()
    kw: dict[str, Any] = {}
    client: dict[str, Any] = {}
    if cfg.endpoint_url:
        kw["endpoint_url"] = cfg.endpoint_url
    if cfg.region:
        client["region_name"] = cfg.region
    if cfg.profile:
        kw["profile"] = cfg.profile
    # botocore's standard retry mode: exponential backoff with jitter on throttling, 5xx and connection errors
    retries = {"retries": {"max_attempts": cfg.max_attempts, "mode": "standard"}}
    return fsspec.filesystem("s3", client_kwargs=client, config_kwargs=retries, use_listings_cache=False, **kw)


def arrow_filesystem_for(uri: str, cfg: StorageConfig | None = None):
    """A pyarrow filesystem for `uri`; S3 gets the endpoint explicitly (pyarrow ignores AWS_ENDPOINT_URL)."""
    from pyarrow import fs as pafs

    scheme, _ = _split(uri)
    if scheme == "file":
        return pafs.LocalFileSystem()
    cfg = cfg or StorageConfig()
    kw: dict[str, Any] = dict(_credentials(cfg))
    if cfg.endpoint_url:
        kw["endpoint_override"] = cfg.endpoint_url
        if cfg.endpoint_url.startswith("http://"):
            kw["scheme"] = "http"
    kw["region"] = cfg.region or "us-east-1"
    kw["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.max_attempts)
    return pafs.S3FileSystem(**kw)


# ---- tensor columns ----------------------------------------------------------------------------------
def tensors_to_table(columns: dict[str, Any]) -> pa.Table:
    """A table from numpy arrays / lists; arrays with ndim > 1 become Ray Data tensor columns that keep
    their per-row shape and dtype (fp16 included) through Parquet."""
    from ray.data.extensions import ArrowTensorArray

    out = {}
    for name, value in columns.items():
        if hasattr(value, "detach"):  # torch tensor
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray) and value.ndim > 1:
            out[name] = ArrowTensorArray.from_numpy(np.ascontiguousarray(value))
        else:
            out[name] = pa.array(value)
    return pa.table(out)


def table_to_tensors(table: pa.Table, columns: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Inverse of `tensors_to_table`: stacked numpy arrays (tensor columns keep shape and dtype)."""
    import ray.data.extensions  # noqa: F401  registers the tensor extension type for reading

    out = {}
    for name in columns or table.column_names:
        col = table.column(name)
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        out[name] = col.to_numpy() if hasattr(col.type, "shape") else col.to_numpy(zero_copy_only=False)
    return out


def hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunStorage:
    """The run root: paths, bytes, Parquet tables and manifests, local or on S3."""

    def __init__(self, uri: str, cfg: StorageConfig | None = None):
        self.cfg = cfg or StorageConfig()
        self.scheme, self.base = _split(uri)
        self.uri = f"s3://{self.base}" if self.scheme == "s3" else self.base
        self.fs = filesystem_for(self.uri, self.cfg)
        self._arrow = None

    @classmethod
    def from_config(cls, cfg) -> "RunStorage":
        return cls(cfg.run_root, cfg.storage)

    def __repr__(self) -> str:  # never shows credentials
        ep = f", endpoint={self.cfg.endpoint_url}" if self.cfg.endpoint_url else ""
        return f"RunStorage({self.uri}{ep})"

    @property
    def arrow_fs(self):
        if self._arrow is None:
            self._arrow = arrow_filesystem_for(self.uri, self.cfg)
        return self._arrow

    # ---- paths -----------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Path for both filesystems (no scheme): 'bucket/prefix/a/b' or '/abs/root/a/b'."""
        return posixpath.join(self.base, *[p.strip("/") for p in parts if p])

    def url(self, *parts: str) -> str:
        p = self.path(*parts)
        return f"s3://{p}" if self.scheme == "s3" else p

    def rel(self, url: str) -> str:
        """`url` (a URL or a bare path) relative to the run root when it lies under it, else unchanged:
        what manifests record, so a moved or copied run root still finds its outputs."""
        p = url[len("s3://"):] if url.startswith("s3://") else url
        base = self.base.rstrip("/") + "/"
        return p[len(base):] if p.startswith(base) else url

    def _located(self, out: str) -> str:
        """A manifest's output path (relative to the run root, or a URL or absolute path) for `fs`."""
        if out.startswith("s3://"):
            return out[len("s3://"):]
        return out if out.startswith("/") else self.path(out)

    def missing_outputs(self) -> list[str]:
        """Every output that a finished step's manifest lists and that does not exist (the DAG checks this
        at the end): a relative path is under the run root; `files` entries are under their `path`."""
        missing = []
        for name in self.ls(MANIFEST_DIR):
            m = self.read_json(f"{MANIFEST_DIR}/{name}") if name.endswith(".json") else {}
            outs = m.get("outputs") or {}
            wanted = []
            for key, v in outs.items():
                if key == "columns":
                    continue
                if isinstance(v, str):
                    wanted.append(v)
                elif isinstance(v, list):
                    wanted += [x for x in v if isinstance(x, str)]
                    wanted += [posixpath.join(outs.get("path", ""), x["file"]) for x in v
                               if isinstance(x, dict) and x.get("file")]
            missing += [f"{name[:-5]}: {w}" for w in wanted if not self.fs.exists(self._located(w))]
        return missing

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def ls(self, *parts: str) -> list[str]:
        p = self.path(*parts)
        if not self.fs.exists(p):
            return []
        # the children's names (relpath would resolve s3's bucket/key paths against the process's working dir)
        return sorted(posixpath.basename(x.rstrip("/")) for x in self.fs.ls(p, detail=False))

    def rm(self, *parts: str) -> None:
        p = self.path(*parts)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def makedirs(self, *parts: str) -> None:
        if self.scheme == "file":
            self.fs.makedirs(self.path(*parts), exist_ok=True)

    # ---- bytes ------------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write atomically: to a temporary name, then move into place."""
        final = self.path(rel)
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        if self.scheme == "s3":  # S3 PUTs are atomic already
            with self.fs.open(final, "wb") as f:
                f.write(data)
            return
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, final)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as f:
            return f.read()

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_text(rel, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def put_dir(self, local_dir: str, rel: str) -> None:
        """Upload (or copy) a local folder to `rel` under the root."""
        dst = self.path(rel)
        if self.scheme == "file":
            import shutil

            shutil.copytree(local_dir, dst, dirs_exist_ok=True)
        else:
            self.fs.put(local_dir.rstrip("/") + "/", dst, recursive=True)

    def get_dir(self, rel: str, local_dir: str) -> str:
        """A local copy of folder `rel` (the folder itself on a local root)."""
        if self.scheme == "file":
            return self.path(rel)
        self.fs.get(self.path(rel).rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)
        return local_dir

    # ---- parquet ---------------------------------------------------------------------------------
    def write_table(self, rel: str, table: pa.Table | dict, **kw) -> str:
        """Write one Parquet file (a dict of arrays becomes a table with tensor columns)."""
        if isinstance(table, dict):
            table = tensors_to_table(table)
        final = self.path(rel)
        if self.scheme == "file":
            self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
            tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
            pq.write_table(table, tmp, filesystem=self.arrow_fs, **kw)
            self.fs.mv(tmp, final)
        else:
            pq.write_table(table, final, filesystem=self.arrow_fs, **kw)
        return final

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        """Read a Parquet file or a folder of Parquet files (temporary files are ignored)."""
        import ray.data.extensions  # noqa: F401

        p = self.path(rel)
        if self.fs.isdir(p):
            files = sorted(f for f in self.fs.find(p) if f.endswith(".parquet"))
            if not files:
                raise FileNotFoundError(f"{self.url(rel)}: no Parquet files")
            return pa.concat_tables([pq.read_table(f, columns=columns, filesystem=self.arrow_fs) for f in files])
        return pq.read_table(p, columns=columns, filesystem=self.arrow_fs)

    # ---- manifests ---------------------------------------------------------------------------------
    def manifest_path(self, step: str) -> str:
        return f"{MANIFEST_DIR}/{step}.json"

    def commit_manifest(self, step: str, *, inputs: dict | None = None, outputs: dict | None = None,
                        **extra: Any) -> dict:
        """Mark `step` finished. Call it last, after every output is written."""
        manifest = {
            "step": step,
            "inputs": inputs or {},
            "inputs_hash": hash_json(inputs or {}),
            "outputs": outputs or {},
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            **extra,
        }
        self.write_json(self.manifest_path(step), manifest)
        return manifest

    def read_manifest(self, step: str) -> dict | None:
        rel = self.manifest_path(step)
        return self.read_json(rel) if self.exists(rel) else None

    def finished_manifest(self, step: str, inputs: dict | Callable[[], dict] | None = None) -> dict | None:
        """The step's manifest when it is finished, else None: one read. A step is finished when its manifest
        exists (and, given `inputs`, their hash matches). `inputs` may be a function, called only when a
        manifest exists (inputs that are costly to describe, a data source)."""
        m = self.read_manifest(step)
        if m is None or inputs is None:
            return m
        return m if m.get("inputs_hash") == hash_json(inputs() if callable(inputs) else inputs) else None

    def invalidate(self, step: str) -> None:
        self.rm(self.manifest_path(step))
