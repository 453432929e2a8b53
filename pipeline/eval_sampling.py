"""Evaluation sampling as batch inference: every image an evaluation scores (the base teacher at 32 and at
the student's steps, the student, the stage's starting student) is drawn by a Ray Data actor pool, in
restartable units, the same way precompute runs (`pipeline.shards`).

A *sample set* is one model at one step count and guidance, over fixed captions and one fixed noise
latent each (`pipeline.sampling`). It is cut into units of `evaluate.unit_samples` samples; each unit is
one Parquet file of images (float32 in [-1, 1] for the toy metrics, uint8 for a real run's FID and CLIP)
with its marker, committed atomically in the set's folder. A set's noise is written once to the run root
(`eval/noise/<hash>.f32`); a unit names its rows and the actor reads just those. A killed evaluation reruns only the units
without a marker; a set whose inputs changed (model, steps, guidance, captions, noise, dtype) starts its
folder over. The pool has `evaluate.actors` actors (auto: one per GPU with `evaluate.gpus_per_actor`,
else one per CPU); each loads the base pipeline ("teacher") once, in `model.dtype` on its device, and of
every other model (a stage's student) only its UNet: students sample with the base's VAE, text encoders
and schedule, as they were trained and exported.

A unit samples exactly what `sampling.sample_captions` does in one process for the same captions and
noise, so the images, and the metrics on them, equal the single-process path's within float tolerance
(tests/test_eval_sampling.py)."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from . import cluster, shards
from .config import RunConfig
from .storage import RunStorage, table_to_tensors, tensors_to_table

VERSION = 1  # the unit protocol; in every set's inputs
NOISE_DIR = "eval/noise"  # every set's noise, one raw float32 file per distinct noise (rows in sample order)


@dataclass
class SampleSet:
    """One model's fixed-seed samples: `model` names an entry of the pool's models (see `sample_sets`);
    `identity` says which weights those are (their manifest hash, a source path), so that a set of other
    weights never reuses these units."""
    name: str
    out_rel: str
    model: str
    identity: dict
    steps: int
    guidance: float
    captions: list[str]
    noise: torch.Tensor
    prediction_type: Optional[str] = None
    uint8: bool = False
    features: bool = False  # a real run's: the units also hold the real metrics' features (`real_metrics.Extractor`)


def _noise(s: SampleSet) -> tuple[np.ndarray, str]:
    noise = np.ascontiguousarray(s.noise.numpy(), dtype=np.float32)
    return noise, hashlib.sha256(noise.tobytes()).hexdigest()[:16]


def set_inputs(cfg: RunConfig, s: SampleSet, noise: np.ndarray, digest: str) -> dict:
    """What a set's units depend on; `noise`, `digest`: the set's `_noise`."""
    from .real_metrics import settings

    return {"version": VERSION, "model": s.identity, "steps": s.steps, "guidance": s.guidance,
            "prediction_type": s.prediction_type, "uint8": s.uint8, "dtype": cfg.model.dtype,
            "features": settings(cfg.evaluate) if s.features else None,
            "unit_samples": cfg.evaluate.unit_samples, "batch_size": cfg.evaluate.batch_size,
            "captions": hashlib.sha256(json.dumps(s.captions).encode()).hexdigest()[:16],
            "noise": digest, "noise_shape": list(noise.shape)}


class SampleWorker:
    """A Ray Data actor: loads each model it is asked for once; each call samples and commits one unit."""

    def __init__(self, cfg_json: str, models: dict, threads: int = 1):
        torch.set_num_threads(threads)
        cluster.quiet_libraries()
        from .encode import device_for

        self.cfg = RunConfig.model_validate_json(cfg_json)
        self.storage = RunStorage.from_config(self.cfg)
        self.models, self.loaded, self.extractor = models, {}, None
        self.device = device_for(self.cfg.evaluate.gpus_per_actor)
        self.work = tempfile.mkdtemp(prefix="padistill-evalw-")

    def _model(self, key: str):
        """The base pipeline for "teacher"; for any other model its denoiser (only that is downloaded)."""
        from . import family
        from .zoo import DTYPES, load_pipeline

        if key not in self.loaded:
            spec, dtype = self.models[key], DTYPES[self.cfg.model.dtype]
            if key == "teacher":
                m = load_pipeline(spec["source"], self.cfg.storage, dtype=dtype, device=self.device)
                m.set_progress_bar_config(disable=True)
            else:
                import diffusers

                sub, cls = family.get(family.name_of_index(self.storage.read_json(f"{spec['rel']}/model_index.json"))).DENOISER
                local = self.storage.get_dir(f"{spec['rel']}/{sub}", posixpath.join(self.work, key, sub))
                m = getattr(diffusers, cls).from_pretrained(local, dtype=dtype).to(self.device).eval()
            self.loaded[key] = m
        return self.loaded[key]

    def _read_noise(self, u: dict) -> torch.Tensor:
        shape = u["noise_row_shape"]
        row = 4 * int(np.prod(shape))
        with self.storage.fs.open(self.storage.path(u["noise_rel"]), "rb") as f:
            f.seek(u["start"] * row)
            buf = f.read(len(u["captions"]) * row)
        return torch.from_numpy(np.frombuffer(buf, np.float32).reshape(-1, *shape).copy())

    def process(self, u: dict) -> dict:
        from .images import to_uint8_nchw
        from .sampling import sample_captions, sampling_speed

        base = self._model("teacher")
        if u.get("kind") == "speed":  # the wall-clock speedup, timed on this actor's device
            return {"index": u["index"], "kind": "speed", "pid": os.getpid(),
                    "speed": sampling_speed(base, self._model("student"), u["student_steps"],
                                            u["teacher_guidance"], batch=u["batch"], repeats=u["repeats"],
                                            prediction_type=u["prediction_type"])}

        unet = None if u["model"] == "teacher" else self._model(u["model"])
        x = sample_captions(base, u["captions"], self._read_noise(u).to(base.device), u["steps"], u["guidance"],
                            unet=unet, batch_size=self.cfg.evaluate.batch_size, prediction_type=u["prediction_type"])
        x = to_uint8_nchw(x).cpu() if u["uint8"] else x.float().cpu()
        cols, extra = {"sample": np.arange(u["start"], u["start"] + len(x), dtype=np.int64), "image": x.numpy()}, {}
        if u["features"]:
            if self.extractor is None:
                from .real_metrics import Extractor

                self.extractor = Extractor(self.cfg.evaluate, self.device)
            f = self.extractor(x, u["captions"])
            cols.update(fid=f["fid"].numpy(), fid_patch=f["fid_patch"].numpy())
            extra = {"clip_sum": f["clip_sum"], "clip_n": f["clip_n"]}
        writer = shards.ShardWriter(self.storage, u["out"], u["index"])
        try:
            writer.write(tensors_to_table(cols))
        except BaseException:
            writer.abort()
            raise
        return writer.commit(inputs_hash=u["inputs_hash"], set=u["set"], pid=os.getpid(), **extra)

    def __call__(self, batch: dict) -> dict:
        return {"marker": [json.dumps(self.process(json.loads(u))) for u in batch["unit"]]}

    def __del__(self):
        shutil.rmtree(getattr(self, "work", ""), ignore_errors=True)


def sample_sets(cfg: RunConfig, storage: RunStorage, sets: list[SampleSet], models: dict,
                log: Callable[[str], None] = print, speed: Optional[dict] = None, what: str = "") -> dict[str, dict]:
    """Draw every set's images through the actor pool (only the units not yet committed) and return
    them by set name, in sample order (`read_set`); one console line says what is drawn (`what`, the
    caller's description, then the units). `models`: {key: {"source": a model source} or
    {"rel": a model folder in the run root}}; "teacher" (the base pipeline) is always one. `speed` (`sampling.sampling_speed`'s arguments): one more
    unit, queued last, times the "student" model against the "teacher" on an actor; its result is
    returned as "speed"."""
    ec = cfg.evaluate
    units, hashes, n_units = [], {}, {}
    for s in sets:
        noise, digest = _noise(s)
        ih = hashes[s.name] = shards.inputs_hash(set_inputs(cfg, s, noise, digest))
        done = shards.prepare_output(storage, s.out_rel, ih, cfg.storage.verify_reads, log)
        noise_rel = f"{NOISE_DIR}/{digest}.f32"
        if len(done) < -(-len(s.captions) // ec.unit_samples) and not storage.exists(noise_rel):
            storage.write_bytes(noise_rel, noise.tobytes())
        n = len(s.captions)
        starts = range(0, n, ec.unit_samples)
        n_units[s.name] = len(starts)
        for i, a in enumerate(starts):
            if i in done:
                continue
            b = min(a + ec.unit_samples, n)
            units.append({"index": i, "set": s.name, "out": s.out_rel, "inputs_hash": ih, "model": s.model,
                          "steps": s.steps, "guidance": s.guidance, "prediction_type": s.prediction_type,
                          "uint8": s.uint8, "features": s.features, "start": a, "captions": list(s.captions[a:b]),
                          "noise_rel": noise_rel, "noise_row_shape": list(noise.shape[1:])})
    total = sum(n_units.values())
    log(f"padistill evaluate: {what + '; ' if what else ''}{total} sampling units ({total - len(units)} already "
        f"committed, {len(units)} to run) of {', '.join(s.name for s in sets)}")
    if speed is not None:
        units.append({"index": -1, "kind": "speed", **speed})
    timed = {}
    if units:
        cluster.ensure_ray(cfg)
        out = shards.run_units(units, SampleWorker, {"cfg_json": cfg.model_dump_json(), "models": models},
                               actors=ec.actors, gpus_per_actor=ec.gpus_per_actor, on_marker=_progress(len(units), log))
        timed = {"speed": m["speed"] for m in out if m.get("kind") == "speed"}
    return {**timed, **{s.name: read_set(storage, s.out_rel, hashes[s.name], n_units[s.name], len(s.captions),
                             keep_images=KEEP_IMAGES if s.features else None) for s in sets}}


def _progress(n: int, log: Callable[[str], None], lines: int = 5) -> Callable[[dict], None]:
    """An `on_marker` that logs about `lines` progress lines over `n` units: units done, the set of the last,
    time since the start."""
    t0, done, every = time.perf_counter(), [0], max(1, -(-n // lines))

    def on_marker(m: dict) -> None:
        done[0] += 1
        if done[0] % every == 0 or done[0] == n:
            log(f"  {done[0]}/{n} units drawn (last: {m.get('set', 'the speed timing')}), "
                f"{time.perf_counter() - t0:.0f} s")
    return on_marker


KEEP_IMAGES = 10  # images a set with features returns (the grid's): 10,000 SDXL images are 30 GB


def read_set(storage: RunStorage, out_rel: str, inputs_hash: str, n_units: int, n: int,
             keep_images: Optional[int] = None) -> dict:
    """A set's committed units in sample order (an error when any is missing): {"image": [n, 3, H, W]} (only
    the first `keep_images` when given), and for a set with features the `real_metrics.Extractor` output of
    all its images (units merged)."""
    markers = {i: m for i, m in shards.read_markers(storage, out_rel).items() if m.get("inputs_hash") == inputs_hash}
    summary = shards.summarize(markers, n_units)
    parts, held = [], 0
    for f in summary["files"]:
        want_images = keep_images is None or held < keep_images
        cols = None if want_images else ["sample", "fid", "fid_patch"]
        parts.append(table_to_tensors(storage.read_table(posixpath.join(out_rel, f["file"]), columns=cols)))
        held += len(parts[-1]["sample"]) if want_images else 0
    order = np.concatenate([p["sample"] for p in parts])
    if not np.array_equal(order, np.arange(n)):
        raise RuntimeError(f"{storage.url(out_rel)}: the units hold samples {order[:5]}…, not 0..{n - 1}")
    out = {k: torch.from_numpy(np.concatenate([p[k] for p in parts if k in p])) for k in parts[0] if k != "sample"}
    if keep_images is not None:
        out["image"] = out["image"][:keep_images]
    if "fid" in out:
        out.update(clip_sum=sum(m["clip_sum"] for m in markers.values()), clip_n=sum(m["clip_n"] for m in markers.values()))
    return out
