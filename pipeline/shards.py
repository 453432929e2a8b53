"""Restartable, sharded precompute steps on Ray Data (used by `encode` and `trajectories`).

A step's work is split into deterministic *units* (fixed row ranges). Each unit becomes exactly one
Parquet file `part-<unit>.parquet` of at most `max_rows_per_file` rows in the step's output folder:

1. the actor writes the file's row groups to a local temporary file, then moves it into place
   atomically (a rename on a local root; a single object upload on S3, which appears only complete);
2. then writes the unit's marker `_shards/<unit>.json` (rows, bytes, the file's SHA-256, the inputs
   hash): the commit;
3. when every unit has a marker, the driver writes the step's manifest `_manifest/<step>.json` last.

Committed files are verified before use (`verify_files`, `storage.verify_reads`): a rerun recomputes a
unit whose file is missing, of another size or checksum than its marker says (a truncated upload, a
bit flip, a deleted object); a reader of a finished step's files (trajectories reading `encoded/`, a
stage's training reading its trajectories) stops with an error naming the object instead.

A killed run leaves at most some uncommitted units; the rerun reads the markers, runs only the units
without one (overwriting any file the kill left without its marker) and so ends with exactly the
planned rows, no duplicates, no gaps. A rerun with different inputs (`_plan.json` keeps their hash)
starts the folder over. Files starting with `_` or `.` are ignored by Parquet readers (pyarrow
datasets and Ray Data's `read_parquet`, which only reads `*.parquet`).

Execution is a Ray Data pipeline: `from_items(units)` → `map_batches(<Worker class>, batch_size=1,
compute=ActorPoolStrategy(size=…), num_gpus=…)`, so models load once per actor and a unit is the
unit of retry. (Ray Data's `write_parquet(max_rows_per_file=…)` is not used for the outputs: it names
files itself and writes them in place, so a killed write cannot be told apart from a finished one and
a rerun could not know which rows exist without reading them all back.)
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from typing import Any, Callable

from .errors import MissingInputError
from .storage import RunStorage, hash_json

MARKER_DIR = "_shards"
PLAN_FILE = "_plan.json"


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def marker_rel(out_rel: str, index: int) -> str:
    return posixpath.join(out_rel, MARKER_DIR, f"{index:05d}.json")


def pool_layout(actors, gpus_per_actor: float, n_units: int) -> tuple[int, int]:
    """(actor pool size, CPUs = torch threads per actor) for `n_units` units.

    `actors="auto"`: one actor per GPU of the cluster for GPU actors; on CPU, one single-threaded actor
    per CPU, because torch's intra-op threads scale poorly on small convolutions (the toy teacher's
    rollouts: 2 threads are 1.36x one thread, two 1-thread processes are 2x). Never more actors than
    units; CPU actors split the cluster's CPUs between them (no more than the largest node has)."""
    import ray

    res = ray.cluster_resources()
    total = max(1, int(res.get("CPU", 1)))
    if actors == "auto":
        actors = max(1, int(res.get("GPU", 0) // gpus_per_actor)) if gpus_per_actor > 0 else total
    size = max(1, min(int(actors), n_units))
    if gpus_per_actor > 0:
        return size, 1
    largest = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=total)
    return size, max(1, min(total // size, largest))


# ---- output folder ------------------------------------------------------------------------------------
def prepare_output(storage: RunStorage, out_rel: str, inputs_hash: str, verify: str = "checksum",
                   log: Callable[[str], None] = print) -> dict[int, dict]:
    """Make the output folder ready for a (re)run with `inputs_hash`; return the committed markers whose
    files verify (the others are logged and run again)."""
    plan_rel = posixpath.join(out_rel, PLAN_FILE)
    plan = storage.read_json(plan_rel) if storage.exists(plan_rel) else None
    if plan is None or plan.get("inputs_hash") != inputs_hash:
        storage.rm(out_rel)  # outputs of other inputs (or none): start over
        storage.write_json(plan_rel, {"inputs_hash": inputs_hash})
        return {}
    markers = read_markers(storage, out_rel)
    done = {i: m for i, m in markers.items() if m.get("inputs_hash") == inputs_hash}
    for i, problem in verify_files(storage, out_rel, [dict(m, index=i) for i, m in done.items()], verify).items():
        log(f"  unit {i}: {problem}: recomputing it")
        del done[i]
    # temporaries a killed run left behind
    for p in storage.fs.find(storage.path(out_rel)):
        if ".tmp-" in posixpath.basename(p):
            storage.fs.rm(p)
    return done


def _ray_node() -> str | None:
    """The Ray node this process runs on (a marker's provenance: which node wrote the unit), if any."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def read_markers(storage: RunStorage, out_rel: str) -> dict[int, dict]:
    mdir = storage.path(out_rel, MARKER_DIR)
    if not storage.fs.exists(mdir):
        return {}
    paths = sorted(p for p in storage.fs.ls(mdir, detail=False) if p.endswith(".json"))
    if not paths:
        return {}
    blobs = storage.fs.cat(paths)  # one concurrent fetch on S3
    out = {}
    for p in paths:
        m = json.loads(blobs[p])
        out[int(m["index"])] = m
    return out


# ---- verified reads ---------------------------------------------------------------------------------------
def sha256_of(f, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    while True:
        b = f.read(chunk)
        if not b:
            return h.hexdigest()
        h.update(b)


def verify_files(storage: RunStorage, out_rel: str, files: list[dict], verify: str = "checksum"
                 ) -> dict[Any, str]:
    """Check committed files (`{"file", "bytes", "sha256"?, "index"?}`, as markers and manifests list
    them) against what is stored: present, the recorded size, and (verify = "checksum") the recorded
    SHA-256. Returns {index or file name: what is wrong} for the files that fail; one listing of the
    folder, then one read per file when checksumming."""
    files = [f for f in files if f.get("file")]
    if not files:
        return {}
    base = storage.path(out_rel)
    try:
        listing = {posixpath.basename(e["name"]): e for e in storage.fs.ls(base, detail=True)}
    except FileNotFoundError:
        listing = {}
    bad: dict[Any, str] = {}
    for f in files:
        key, url = f.get("index", f["file"]), storage.url(out_rel, f["file"])
        entry = listing.get(f["file"])
        if entry is None:
            bad[key] = f"{url} is missing"
            continue
        size = int(entry.get("size") or 0)
        if size != int(f["bytes"]):
            bad[key] = f"{url} is {size} bytes, {int(f['bytes'])} when committed"
            continue
        if verify == "checksum" and f.get("sha256"):
            with storage.fs.open(posixpath.join(base, f["file"]), "rb") as fh:
                if sha256_of(fh) != f["sha256"]:
                    bad[key] = f"{url} does not match its checksum (sha256) when committed"
    return bad


def intact(storage: RunStorage, out_rel: str, files: list[dict], verify: str, log: Callable[[str], None],
           step: str) -> bool:
    """Whether a finished step's files all verify; when not, say which (its rerun recomputes them)."""
    bad = verify_files(storage, out_rel, files, verify)
    if bad:
        log(f"padistill {step}: {len(bad)} committed file(s) damaged ({'; '.join(bad.values())}): recomputing them")
    return not bad


def check_committed(storage: RunStorage, out_rel: str, files: list[dict], verify: str, fix: str) -> None:
    """Stop with an error naming every damaged file of a finished step before it is read; `fix` says
    what to run (the step that made them recomputes just the damaged units)."""
    bad = verify_files(storage, out_rel, files, verify)
    if bad:
        raise MissingInputError(f"{len(bad)} damaged file(s) in {storage.url(out_rel)}: "
                                + "; ".join(list(bad.values())[:3]) + ("; …" if len(bad) > 3 else "")
                                + f"; run {fix} (it recomputes the damaged units)")


class ShardWriter:
    """Row groups of one unit's Parquet file, written locally and committed atomically. Tables are
    buffered into row groups of about `row_group_bytes` (few, large row groups keep the per-row
    overhead of Parquet's metadata small)."""

    def __init__(self, storage: RunStorage, out_rel: str, index: int, row_group_bytes: int = 64 << 20,
                 **parquet_kw):
        self.storage, self.out_rel, self.index = storage, out_rel, index
        self.parquet_kw = {"compression": "snappy", **parquet_kw}
        self.row_group_bytes = row_group_bytes
        fd, self.local = tempfile.mkstemp(prefix="padistill-", suffix=".parquet")
        os.close(fd)
        self.writer = None
        self.rows = 0
        self._buf: list = []
        self._buf_bytes = 0

    def write(self, table) -> None:
        if table.num_rows == 0:
            return
        self._buf.append(table)
        self._buf_bytes += table.nbytes
        self.rows += table.num_rows
        if self._buf_bytes >= self.row_group_bytes:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._buf:
            return
        table = pa.concat_tables(self._buf)
        self._buf, self._buf_bytes = [], 0
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.local, table.schema, **self.parquet_kw)
        self.writer.write_table(table, row_group_size=table.num_rows)

    def commit(self, **extra) -> dict:
        """Move the file into place (if any rows), then write the unit's marker. Returns the marker."""
        nbytes, name, digest = 0, None, None
        try:
            self._flush()
            if self.writer is not None:
                self.writer.close()
                nbytes = os.path.getsize(self.local)
                with open(self.local, "rb") as fh:
                    digest = sha256_of(fh)
                name = part_name(self.index)
                final = self.storage.path(self.out_rel, name)
                if self.storage.scheme == "file":
                    os.makedirs(os.path.dirname(final), exist_ok=True)
                    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
                    shutil.copyfile(self.local, tmp)
                    os.replace(tmp, final)
                else:  # one PUT (or multipart upload): the object appears only when complete
                    self.storage.fs.put_file(self.local, final)
        finally:
            if os.path.exists(self.local):
                os.remove(self.local)
        marker = {"index": self.index, "file": name, "rows": self.rows, "bytes": nbytes, "sha256": digest,
                  "node": _ray_node(), **extra}
        self.storage.write_json(marker_rel(self.out_rel, self.index), marker)
        return marker

    def abort(self) -> None:
        self._buf = []
        if self.writer is not None:
            self.writer.close()
        if os.path.exists(self.local):
            os.remove(self.local)


def read_rows(pf, start: int, stop: int, columns: list[str] | None = None):
    """Rows [start, stop) of an open `pyarrow.parquet.ParquetFile`, reading only the row groups
    that hold them."""
    import pyarrow as pa

    groups, offset, first = [], 0, None
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    if not groups:
        return pa.table({c: [] for c in (columns or pf.schema_arrow.names)})
    return pf.read_row_groups(groups, columns=columns).slice(start - first, stop - start)


# ---- Ray Data driver ----------------------------------------------------------------------------------
def run_units(units: list[dict], worker_cls: type, ctor_kwargs: dict, *, actors: int | str, gpus_per_actor: float,
              on_marker: Callable[[dict], None] | None = None) -> list[dict]:
    """Process `units` (JSON-able dicts with an `index`) through a Ray Data actor pool of
    `worker_cls(**ctor_kwargs, threads=…)` laid out by `pool_layout`; each call handles one unit and
    returns its marker; `on_marker(marker)` as each unit finishes, when there are several."""
    import ray.data

    if not units:
        return []
    size, ncpu = pool_layout(actors, gpus_per_actor, len(units))
    ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units))
    # One call at a time per actor, on the actor's main thread: by default Ray Data runs an actor's UDF
    # in a helper thread, where torch's CPU intra-op parallelism used 1.3 of 2 cores (1.9 on the main
    # thread; measured on the toy teacher's rollouts), making each row ~1.5x slower.
    compute = ray.data.ActorPoolStrategy(size=size, enable_true_multi_threading=True, max_concurrent_calls_per_actor=1)
    ds = ds.map_batches(worker_cls, batch_size=1, compute=compute,
                        num_cpus=ncpu, num_gpus=gpus_per_actor or None,
                        fn_constructor_kwargs={**ctor_kwargs, "threads": ncpu})
    out = []
    for row in ds.iter_rows():
        m = json.loads(row["marker"])
        out.append(m)
        if on_marker and len(units) > 1:  # one unit's line would repeat the step's own summary
            on_marker(m)
    return out


def summarize(markers: dict[int, dict], n_units: int) -> dict:
    missing = sorted(set(range(n_units)) - set(markers))
    if missing:
        raise RuntimeError(f"{len(missing)} of {n_units} units are not committed (e.g. {missing[:5]})")
    files = [{"file": markers[i]["file"], "rows": markers[i]["rows"], "bytes": markers[i]["bytes"],
              **({"sha256": markers[i]["sha256"]} if markers[i].get("sha256") else {})}
             for i in range(n_units) if markers[i]["file"]]
    rows = sum(f["rows"] for f in files)
    nbytes = sum(f["bytes"] for f in files)
    return {"files": files, "rows": rows, "bytes": nbytes, "bytes_per_row": (nbytes / rows) if rows else 0.0,
            "max_rows_per_file": max((f["rows"] for f in files), default=0)}


def inputs_hash(inputs: dict) -> str:
    return hash_json(inputs)
