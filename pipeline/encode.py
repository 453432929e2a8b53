"""`padistill encode`: images + captions → VAE latents + text embeddings, as Parquet under
`<root>/encoded/`, with Ray Data (a stateful actor pool: the pipeline is loaded once per actor).

Output schema (one row per usable source row; `SCHEMA_VERSION`):

    id            string   the source row's id (toy digits: "digits-<i>"; Parquet: id column or "<file>:<row>")
    caption       string
    latent        tensor [4, R/8, R/8]   vae.encode(image).latent_dist.mean, then (− shift_factor) × scaling_factor
    prompt_embeds tensor [L, D]          the pipeline's `encode_prompt`: SDXL's two text encoders' penultimate
                                         states, concatenated; SD1.5's text encoder's last state; SD3's
                                         two CLIP states padded to the joint-attention width, then T5's
    pooled_embeds tensor [P]             SDXL: text_encoder_2's projected pooled output; SD3: both CLIPs'
    schema_version int32

Tensors are stored in `encode.dtype` (fp16 by default). The latent is the posterior *mean*, not a
sample: the stored dataset is then a deterministic function of the images (reruns and restarts
reproduce it bit for bit), and the VAE posterior's std is negligible next to the diffusion noise
that every trajectory adds anyway. Rows skipped by the source (undecodable or missing images, images
smaller than the resolution, empty captions) are counted by reason in the manifest's `skipped`.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter

import numpy as np
import torch

from . import cluster, shards
from .config import RunConfig
from .sources import make_source
from .storage import RunStorage, tensors_to_table

STEP = "encode"
OUT = "encoded"
SCHEMA_VERSION = 1



def device_for(gpus_per_actor: float) -> str:
    return "cuda" if gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Latents of images in [-1, 1]: posterior mean, shifted and scaled as the UNet expects."""
    p = next(vae.parameters())
    mean = vae.encode(images.to(p.device, p.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (mean.float() - shift) * vae.config.scaling_factor


def encode_batch(pipe, images: torch.Tensor, captions: list[str], resolution: int) -> dict[str, torch.Tensor]:
    """The latent and the family's text columns (`COND_COLUMNS`) of a batch."""
    from .zoo import encode_prompts

    cond = encode_prompts(pipe, list(captions), resolution)
    out = {"latent": encode_images(pipe.vae, images), "prompt_embeds": cond.prompt_embeds.float()}
    if cond.pooled is not None:
        out["pooled_embeds"] = cond.pooled.float()
    return out


class EncodeWorker:
    """A Ray Data actor: the pipeline is loaded once; each call encodes and commits one unit."""

    def __init__(self, cfg_json: str, inputs_hash: str, threads: int = 1):
        torch.set_num_threads(threads)
        cluster.quiet_libraries()
        from .zoo import DTYPES, load_pipeline

        self.cfg = RunConfig.model_validate_json(cfg_json)
        self.inputs_hash = inputs_hash
        self.storage = RunStorage.from_config(self.cfg)
        self.device = device_for(self.cfg.encode.gpus_per_actor)
        self.pipe = load_pipeline(self.cfg.model.source, self.cfg.storage, dtype=DTYPES[self.cfg.model.dtype],
                                  device=self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.source = make_source(self.cfg)
        self.out_dtype = np.float16 if self.cfg.encode.dtype == "float16" else np.float32

    def process(self, unit: dict) -> dict:
        dec = self.source.load(unit)
        bs = self.cfg.encode.batch_size
        writer = shards.ShardWriter(self.storage, OUT, unit["index"], use_dictionary=["caption"],
                                    write_statistics=["id", "caption", "schema_version"])
        try:
            for s in range(0, len(dec.ids), bs):
                out = encode_batch(self.pipe, dec.images[s:s + bs], dec.captions[s:s + bs], self.cfg.model.resolution)
                n = out["latent"].shape[0]
                writer.write(tensors_to_table({
                    "id": dec.ids[s:s + bs], "caption": dec.captions[s:s + bs],
                    **{k: v.cpu().numpy().astype(self.out_dtype) for k, v in out.items()},
                    "schema_version": np.full(n, SCHEMA_VERSION, np.int32),
                }))
        except BaseException:
            writer.abort()
            raise
        for rid, reason in dec.skipped_ids:
            print(f"padistill encode: skipped {rid!r}: {reason}", file=sys.stderr)
        return writer.commit(inputs_hash=self.inputs_hash, unit=unit, skipped=dict(dec.skipped))

    def __call__(self, batch: dict) -> dict:
        markers = [self.process(json.loads(u)) for u in batch["unit"]]
        return {"marker": [json.dumps(m) for m in markers]}


def encode_inputs(cfg: RunConfig, source=None) -> dict:
    source = source or make_source(cfg)
    return {"source": source.describe(), "model": cfg.model.source, "model_dtype": cfg.model.dtype,
            "resolution": cfg.model.resolution, "dtype": cfg.encode.dtype,
            "max_rows_per_file": cfg.encode.max_rows_per_file, "schema_version": SCHEMA_VERSION}


def finished(cfg: RunConfig, storage: RunStorage | None = None, inputs: dict | None = None) -> dict | None:
    """The encode step's manifest when it finished with today's inputs, else None; its files are `intact`'s
    to check. No Ray (`distill` asks before it starts one), and no look at the source without a manifest."""
    storage = storage or RunStorage.from_config(cfg)
    return storage.finished_manifest(STEP, inputs or (lambda: encode_inputs(cfg)))


def intact(cfg: RunConfig, manifest: dict, storage: RunStorage | None = None, log=print) -> bool:
    """Whether the finished step's files verify (`storage.verify_reads`); says which do not."""
    storage = storage or RunStorage.from_config(cfg)
    return shards.intact(storage, OUT, manifest["outputs"]["files"], cfg.storage.verify_reads, log, "encode")


def run_encode(cfg: RunConfig, *, force: bool = False, log=print) -> dict:
    """Run (or resume, or skip when finished) the encode step; returns its manifest."""
    storage = RunStorage.from_config(cfg)
    source = make_source(cfg)
    inputs = encode_inputs(cfg, source)
    ih = shards.inputs_hash(inputs)
    verify = cfg.storage.verify_reads
    if not force and (manifest := finished(cfg, storage, inputs)) is not None and intact(cfg, manifest, storage, log):
        log(f"padistill encode: {storage.url(OUT)} is up to date (manifest {storage.manifest_path(STEP)})")
        return manifest
    storage.invalidate(STEP)
    units = [{"index": i, **u} for i, u in enumerate(source.units(cfg.encode.max_rows_per_file))]
    if force:
        storage.rm(OUT)
    done = shards.prepare_output(storage, OUT, ih, verify, log)
    todo = [u for u in units if u["index"] not in done]
    log(f"padistill encode: {len(units)} units, {len(done)} already committed, {len(todo)} to run "
        f"-> {storage.url(OUT)}")
    t0 = time.perf_counter()
    from .zoo import family_module

    tensor_columns = ["latent", *family_module(cfg).COND_COLUMNS]
    cluster.ensure_ray(cfg)
    shards.run_units(todo, EncodeWorker, {"cfg_json": cfg.model_dump_json(), "inputs_hash": ih},
                     actors=cfg.encode.actors, gpus_per_actor=cfg.encode.gpus_per_actor,
                     on_marker=lambda m: log(f"  unit {m['index']}: {m['rows']} rows, skipped {m['skipped']}"))
    elapsed = time.perf_counter() - t0
    markers = shards.read_markers(storage, OUT)
    markers = {i: m for i, m in markers.items() if m.get("inputs_hash") == ih}
    summary = shards.summarize(markers, len(units))
    skipped = Counter()
    for m in markers.values():
        skipped.update(m.get("skipped", {}))
    raw = _raw_bytes_per_row(storage, summary, tensor_columns)  # tensor bytes of one row at the stored dtype
    outputs = {"path": OUT, **summary, "raw_tensor_bytes_per_row": raw, "schema_version": SCHEMA_VERSION,
               "columns": ["id", "caption", *tensor_columns, "schema_version"]}
    manifest = storage.commit_manifest(STEP, inputs=inputs, outputs=outputs, skipped=dict(skipped),
                                       source_rows=summary["rows"] + sum(skipped.values()),
                                       seconds_this_run=round(elapsed, 3), units_run=len(todo))
    log(f"padistill encode: {summary['rows']} rows in {len(summary['files'])} files, "
        f"{summary['bytes_per_row']:.0f} B/row stored ({raw} B/row raw tensors), skipped {dict(skipped)}")
    return manifest


def _raw_bytes_per_row(storage: RunStorage, summary: dict, columns: list[str]) -> int:
    if not summary["files"]:
        return 0
    import pyarrow.parquet as pq

    from .storage import table_to_tensors

    f = storage.path(OUT, summary["files"][0]["file"])
    t = pq.ParquetFile(f, filesystem=storage.arrow_fs).read_row_group(0).slice(0, 1)
    arr = table_to_tensors(t, columns)
    return int(sum(a.nbytes for a in arr.values()))
