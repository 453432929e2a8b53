"""A stage's training data: its trajectories as Ray Datasets (train and held rows, split by source id) and
a worker's endless micro-batches of its shard."""

from __future__ import annotations

import zlib
from typing import Callable, Iterator

import numpy as np
import torch

from . import cluster
from .config import RunConfig
from .errors import MissingInputError
from .stage_loop import train_columns
from .storage import RunStorage


def micro_batches(shard, batch_size: int, epoch_hook: Callable[[int], None] | None = None,
                  seed: int = 0, cache_mb: float = 2048) -> Iterator[dict]:
    """Endless micro-batches of a worker's dataset shard (equal count per rank, drop_last). The first
    epoch is streamed in file order (trajectory files mix timesteps, `trajectories.compute_rows`);
    when the shard's tensors fit under `cache_mb` (`train.cache_mb`) it is kept in memory and every later
    epoch deals its rows into new micro-batches (a permutation from `seed` and the epoch), else every
    epoch streams again."""
    cache: list[dict] | None = []
    nbytes = 0
    epoch = 0
    for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=True):
        b = {k: b[k] for k in train_columns(b)}
        if cache is not None:
            nbytes += sum(v.numel() * v.element_size() for v in b.values())
            if nbytes <= cache_mb * 2 ** 20:
                cache.append(b)
            else:
                cache = None
        yield b
    if cache is not None and not cache:
        raise ValueError("a training worker got no full micro-batch: fewer trajectory rows than "
                         "train.micro_batch x train.workers")
    rows = None
    if cache is not None:
        rows = {k: torch.cat([b[k] for b in cache]) for k in cache[0]}
        cache = None
    while True:
        epoch += 1
        if epoch_hook:
            epoch_hook(epoch)
        if rows is not None:
            n = len(rows["t"])
            order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
            for i in range(0, n - batch_size + 1, batch_size):
                sel = order[i:i + batch_size]
                yield {k: v[sel] for k, v in rows.items()}
        else:
            for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=True):
                yield {k: b[k] for k in train_columns(b)}


def held_mask(ids, modulus: int) -> np.ndarray:
    """Which rows are held out: whole source ids (all their draws), picked by a hash of the id."""
    return np.array([zlib.crc32(str(i).encode()) % modulus == 0 for i in ids], dtype=bool)


def _held_filter(modulus: int, keep_held: bool):
    def fn(batch):
        import pyarrow as pa

        return batch.filter(pa.array(held_mask(batch.column("id").to_pylist(), modulus) == keep_held))

    return fn


def finished_trajectories(cfg: RunConfig, key, storage: RunStorage) -> dict:
    """The manifest of stage `key`'s trajectories, which training reads; a `MissingInputError` naming the
    command to run when they are not finished or of another schema. Reads one small object: callers check
    it before starting Ray."""
    from .trajectories import SCHEMA_VERSION, step_name as traj_step

    rel = f"{cfg.stage_dir(key)}/traj"
    idx, _ = cfg.stage(key)
    manifest = storage.read_manifest(traj_step(cfg, key))
    if manifest is None:
        raise MissingInputError(f"{storage.url(rel)}: no finished trajectories; run `padistill trajectories --stage "
                                f"{idx}` first")
    got = manifest["outputs"].get("schema_version")
    if got != SCHEMA_VERSION:
        raise MissingInputError(f"{storage.url(rel)}: trajectories of schema version {got}, this padistill reads "
                                f"{SCHEMA_VERSION}; run `padistill trajectories --stage {idx}` to recompute them")
    return manifest


def stage_datasets(cfg: RunConfig, key, storage: RunStorage | None = None, held_rows: int = 16,
                   data_cpus: float | None = None):
    """(train, held): Ray Datasets of a stage's trajectories. Held rows are about `held_rows` whole source
    ids (`held_mask`), never trained on; `held` is None when `held_rows` is 0 or the stage has fewer than
    4x that. `data_cpus`: CPUs per read/filter task (0 where the training workers take every CPU, else
    Ray Data would wait forever)."""
    import ray.data

    remote = {} if data_cpus is None else {"num_cpus": data_cpus}
    # the shards stream for the whole stage: Ray Data's progress bars would redraw under the training
    # log for minutes (the trainer prints its own progress); also where `padistill train-stage` reads them
    cluster.quiet_libraries()

    from . import shards

    storage = storage or RunStorage.from_config(cfg)
    rel = f"{cfg.stage_dir(key)}/traj"
    idx, _ = cfg.stage(key)
    manifest = finished_trajectories(cfg, key, storage)
    shards.check_committed(storage, rel, manifest["outputs"]["files"], cfg.storage.verify_reads,
                           f"`padistill trajectories --stage {idx}`")
    ds = ray.data.read_parquet(storage.path(rel), filesystem=storage.arrow_fs, file_extensions=["parquet"],
                               ray_remote_args=remote)
    n = int(manifest["outputs"]["rows"])  # committed and checked above (counting the Parquet took ~4 s a stage)
    columns = train_columns(manifest["outputs"]["columns"])
    if held_rows <= 0 or n < 4 * held_rows:
        return ds.select_columns(columns), None
    modulus = max(2, n // held_rows)
    train = ds.map_batches(_held_filter(modulus, False), batch_format="pyarrow", **remote).select_columns(columns)
    held = ds.map_batches(_held_filter(modulus, True), batch_format="pyarrow", **remote).select_columns(columns)
    return train, held
