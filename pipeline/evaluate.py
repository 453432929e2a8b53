"""Evaluation of one stage: its student at its own step count, the base teacher at 32 steps and at the
student's step count (on the toy also the student the stage started from, at the student's step count
and without CFG: what the stage had to improve on), all with the same fixed prompts and seeds, scored by the toy metrics
(`pipeline.metrics`) on the toy, or on a non-toy run by the paper's FID-Whole, FID-Patch and CLIP
score (`pipeline.real_metrics`: the first `evaluate.prompts` captions of the data source, their real
images as the FID reference, weights from paths in `evaluate`), plus the wall-clock sampling speedup
against the teacher with CFG, image grids, and the stage's model card updated with the numbers.

Every image is drawn by the actor pool of `pipeline.eval_sampling` (restartable units; on a non-toy run
the actors also extract the metrics' features). Writes `<root>/stages/<k>-<name>/eval/metrics.json` (and a
copy under `eval/seeds/<evaluate.seed>.json`, which an evaluation at another seed leaves in place),
`eval/grid.png`, `eval/samples.npz`; teacher samples are cached per step count under
`<root>/eval/teacher/` so later stages reuse them (a non-toy run keeps there the features of every
sample and the grid's first 10 images, in `samples.npz` those 10), a non-toy run's real-image features
under `<root>/eval/real/`."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from . import family, real_metrics
from .config import RunConfig
from .errors import MissingInputError
from .layout import EVAL_SEEDS_DIR, REAL_DIR, manifest_step, teacher_cache_rel
from .storage import RunStorage, hash_json

# 2: toy evaluations also score the stage's starting student at the student's step count, without CFG
# ("student_start": what the stage had to improve on)
ROWS_VERSION = 2


def step_name(cfg: RunConfig, key) -> str:
    """The manifest step of stage `key`'s evaluation: "eval-<k>-<name>"."""
    return manifest_step(cfg, key, "eval")


def teacher_guidance(cfg: RunConfig, teacher_folder) -> float:
    from .zoo import read_info

    g = cfg.evaluate.teacher_guidance_scale
    return float(g if g is not None else read_info(teacher_folder).get("guidance_scale", 0.0))


def _save_npz(storage: RunStorage, rel: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    storage.write_bytes(rel, buf.getvalue())


def _load_npz(storage: RunStorage, rel: str) -> dict:
    return dict(np.load(io.BytesIO(storage.read_bytes(rel))))


@dataclass
class RealPrompts:
    """A non-toy run's evaluation set: the first `evaluate.prompts` captions of the data source, their
    real images (uint8, the FID reference) and one fixed noise latent each."""
    captions: list[str]
    real: torch.Tensor
    noise: torch.Tensor
    skipped: dict


def real_prompts(cfg: RunConfig, latent_shape) -> RealPrompts:
    from collections import Counter

    from .images import to_uint8_nchw
    from .sources import make_source

    want = cfg.evaluate.prompts
    source = make_source(cfg)
    captions, images, skipped = [], [], Counter()
    for unit in source.units(max(want, 64)):
        d = source.load(unit)
        skipped.update(d.skipped)
        captions += d.captions
        images.append(to_uint8_nchw(d.images))  # 1 byte a value: 1000 SDXL images are 3 GB, not 12
        if len(captions) >= want:
            break
    if len(captions) < 2:
        raise ValueError(f"evaluate: the data source gave {len(captions)} usable image(s) with captions; "
                         "the FID needs at least 2")
    real = torch.cat(images)[:want]
    noise = torch.randn((len(real), *latent_shape), generator=torch.Generator().manual_seed(cfg.evaluate.seed))
    return RealPrompts(captions[:want], real, noise, dict(skipped))


def real_features(cfg: RunConfig, storage: RunStorage, prompts: RealPrompts) -> dict:
    """The real images' FID features (whole and centre crop) of a non-toy run's evaluation prompts,
    extracted in this process once and cached in the run root for every stage."""
    ev = cfg.evaluate
    key = hash_json({"data": cfg.data.model_dump(mode="json"), "prompts": ev.prompts, "res": cfg.model.resolution,
                     **real_metrics.settings(ev, real_metrics.FID_SETTINGS)})
    rel = f"{REAL_DIR}/features-{key}.npz"
    if storage.exists(rel):
        return {k: torch.from_numpy(v) for k, v in _load_npz(storage, rel).items()}
    f = real_metrics.Extractor(ev)(prompts.real, prompts.captions, clip=False)
    _save_npz(storage, rel, **{k: v.numpy() for k, v in f.items()})
    return f


def _model_card(cfg: RunConfig, key, metrics: dict, pipeline_class: str, absent: list[str]) -> str:
    """The stage folder's README.md; `absent`: the components its model_index.json has none of, which
    `from_pretrained` wants passed as None."""
    idx, stage = cfg.stage(key)
    load_args = "".join(f", {k}=None" for k in absent)
    s, t = metrics["student"], metrics["teacher_same_steps"]
    from .metrics import metrics_of

    keys = [k for k, _ in metrics_of([metrics])[:4]]
    rows = "\n".join(f"| {m} | {s[m]:.4g} | {t[m]:.4g} | {metrics['teacher_32'][m]:.4g} |" for m in keys)
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [padistill, sdxl-lightning, progressive-adversarial-distillation]
---
# {cfg.name}: {stage.student_steps}-step student (stage {idx}, {stage.name})

Distilled with padistill (progressive adversarial diffusion distillation,
SDXL-Lightning, arXiv 2402.13929) from a {stage.teacher_steps}-step teacher with a `{stage.loss}` loss.

```python
from diffusers import {pipeline_class}
pipe = {pipeline_class}.from_pretrained("<this folder>"{load_args})
image = pipe(prompt, num_inference_steps={stage.student_steps}, guidance_scale=0).images[0]
```

## Evaluation (fixed prompts and seeds, {s['n']} samples, evaluation seed {metrics['seed']})

| metric | this student ({stage.student_steps} steps) | teacher at {stage.student_steps} steps | teacher at 32 steps |
| --- | --- | --- | --- |
{rows}

Sampling speedup vs the 32-step teacher with CFG (64 UNet evaluations): {metrics['speed']['speedup']:.1f}x
(ideal {metrics['speed']['ideal_speedup']:.0f}x).
"""


def _prediction_type(storage: RunStorage, model_rel: str) -> str:
    from .zoo import schedule_of_config

    return schedule_of_config(storage.read_json(f"{model_rel}/scheduler/scheduler_config.json")).prediction_type


def eval_inputs(cfg: RunConfig, key, storage: RunStorage) -> dict | None:
    """What stage `key`'s evaluation depends on (its manifest's inputs); None while the stage has no
    finished, exported student."""
    from .sampling import NOISE_VERSION

    train_manifest = storage.read_manifest(manifest_step(cfg, key, "train"))
    if train_manifest is None or not storage.exists(f"{cfg.stage_dir(key)}/model/model_index.json"):
        return None
    return {"model": train_manifest["inputs_hash"], "model_finished_at": train_manifest["finished_at"],
            "evaluate": cfg.evaluate.model_dump(mode="json"), "teacher": cfg.model.source,
            "noise_version": NOISE_VERSION, "data": cfg.data.model_dump(mode="json"), "rows": ROWS_VERSION}


def evaluation_key(inputs: dict) -> str:
    """A hash of what an evaluation depends on but its seed (`eval_inputs` less `evaluate.seed`): the same
    student, teacher, data and evaluation settings. Kept in each `eval/seeds/<seed>.json`, so that evaluations
    at several seeds are paired only when they scored the same student the same way."""
    return hash_json({**inputs, "evaluate": {k: v for k, v in inputs["evaluate"].items() if k != "seed"}})


def keep_per_seed(storage: RunStorage, sd: str, metrics: dict, inputs: dict) -> None:
    """`<sd>/eval/seeds/<seed>.json`: the metrics of this evaluation's seed, beside `metrics.json` (which an
    evaluation at another seed replaces), with its `evaluation_key`."""
    storage.write_json(f"{sd}/{EVAL_SEEDS_DIR}/{metrics['seed']}.json",
                       {**metrics, "evaluation_key": evaluation_key(inputs)})


def finished(cfg: RunConfig, key, storage: RunStorage | None = None) -> dict | None:
    """Stage `key`'s evaluation manifest when it finished with today's inputs; else None (no Ray)."""
    storage = storage or RunStorage.from_config(cfg)
    inputs = eval_inputs(cfg, key, storage)
    return None if inputs is None else storage.finished_manifest(step_name(cfg, key), inputs)


def run_evaluate(cfg: RunConfig, key, *, force: bool = False, log=print) -> dict:
    """Evaluate stage `key` (skipped when its manifest matches); returns the manifest."""
    from .eval_sampling import SampleSet, sample_sets
    from .images import from_uint8, save_grid
    from .zoo import absent_components, resolve_source, schedule_of

    toy = cfg.data.toy
    if not toy:
        real_metrics.check(cfg.evaluate, cfg.model.resolution)
    storage = RunStorage.from_config(cfg)
    idx, stage = cfg.stage(key)
    sd = cfg.stage_dir(key)
    inputs = eval_inputs(cfg, key, storage)
    if inputs is None:
        raise MissingInputError(f"{storage.url(sd, 'model')}: stage {idx} has no exported student yet; "
                                f"run `padistill train-stage --stage {idx}` first")
    step = step_name(cfg, key)
    if not force and (manifest := storage.finished_manifest(step, inputs)) is not None:
        seed_rel = f"{sd}/{EVAL_SEEDS_DIR}/{cfg.evaluate.seed}.json"
        if not storage.exists(seed_rel):  # evaluated before the per-seed files were kept: kept now
            keep_per_seed(storage, sd, {**storage.read_json(f"{sd}/eval/metrics.json"), "seed": cfg.evaluate.seed},
                          inputs)
        log(f"padistill evaluate: stage {idx} is up to date")
        return manifest
    storage.invalidate(step)
    work = tempfile.mkdtemp(prefix="padistill-eval-")
    try:
        # the models are loaded by the pool's actors (on their devices, in model.dtype), not here
        teacher_dir = resolve_source(cfg.model.source, cfg.storage)
        g = teacher_guidance(cfg, teacher_dir)
        pred = _prediction_type(storage, f"{sd}/model")
        unet_cfg = json.loads((teacher_dir / family.denoiser_dir(teacher_dir) / "config.json").read_text())
        shape = (unet_cfg["in_channels"], unet_cfg["sample_size"], unet_cfg["sample_size"])
        N, K, seed = stage.student_steps, cfg.evaluate.samples_per_prompt, cfg.evaluate.seed
        prompts = None if toy else real_prompts(cfg, shape)
        j = cfg.student_init_of(key)  # the student this stage started from: its run-root folder, or the base model
        start_rel = f"{cfg.stage_dir(j)}/model" if j is not None else None
        n = 10 * K if toy else len(prompts.captions)
        what = f"stage {idx} ({stage.name}): student at {N} steps, teacher at 32 and {N} steps (guidance {g:g}), " \
            f"{n} samples each"
        # every image this evaluation scores, drawn by the actor pool (pipeline/eval_sampling.py); the base
        # teacher's are cached in the run root per step count and reused by later stages
        if toy:
            from .data import toy_dataset
            from .sampling import fixed_noise

            labels = np.repeat(np.arange(10), K)
            captions = [toy_dataset(cfg.data.kind).caption_for(int(y)) for y in labels]
            noise = fixed_noise(K, seed, shape)  # class-major
        else:
            captions, noise, labels = prompts.captions, prompts.noise, np.asarray(prompts.captions)
        models = {"teacher": {"source": cfg.model.source}, "student": {"rel": f"{sd}/model"}}
        cached, teacher_sets = {}, {}
        for steps in dict.fromkeys((32, N)):
            rel = teacher_cache_rel(cfg, steps, g)
            if storage.exists(rel):
                cached[steps] = {("image" if k == "images" else k): (v.item() if k.startswith("clip") else torch.from_numpy(v))
                                 for k, v in _load_npz(storage, rel).items() if k != "labels"}
            else:
                teacher_sets[steps] = SampleSet(f"teacher-{steps}", rel[:-len(".npz")] + "-units", "teacher",
                                                {"source": cfg.model.source}, steps, g, captions, noise,
                                                uint8=not toy, features=not toy)
        sets = list(teacher_sets.values())
        student_id = {"train": inputs["model"], "finished_at": inputs["model_finished_at"]}
        sets.append(SampleSet("student", f"{sd}/eval/units/student", "student", student_id, N, 0.0, captions,
                              noise, pred, uint8=not toy, features=not toy))
        if toy:  # the student this stage started from, at the student's steps without CFG
            if start_rel:
                models["start"] = {"rel": start_rel}
                start_id = {"folder": start_rel, **(storage.read_manifest(manifest_step(cfg, j, "train")) or {})}
                start_pred = _prediction_type(storage, start_rel)
            else:
                start_id, start_pred = {"source": cfg.model.source}, schedule_of(teacher_dir).prediction_type
            sets.append(SampleSet("student_start", f"{sd}/eval/units/student_start", "start" if start_rel else "teacher",
                                  start_id, N, 0.0, captions, noise, start_pred))
        # the sampling speed, timed by one actor after the samples: one small batch (evaluate.speed_batch_size),
        # not all the samples (at the Fashion-MNIST toy's batch of 100 it cost ~75 s a stage)
        speed = {"student_steps": N, "teacher_guidance": g, "batch": min(cfg.evaluate.speed_batch_size, n),
                 "repeats": cfg.evaluate.speed_repeats, "prediction_type": pred}
        drawn = sample_sets(cfg, storage, sets, models, log, speed=speed, what=what)
        for steps, s_ in teacher_sets.items():
            cached[steps] = drawn[s_.name]
            _save_npz(storage, teacher_cache_rel(cfg, steps, g), labels=labels,
                      **{("images" if k == "image" else k): np.asarray(v) for k, v in drawn[s_.name].items()})
            storage.rm(s_.out_rel)
        t32, tN = cached[32]["image"], cached[N]["image"]  # a non-toy run's: the first KEEP_IMAGES
        if toy:
            from .metrics import score  # the toy metrics: a real run never imports them

            kind = cfg.data.kind
            images = drawn["student"]["image"]
            scores = {"student": score(images, labels, reference_images=t32, dataset=kind),
                      "student_start": score(drawn["student_start"]["image"], labels, reference_images=t32,
                                             dataset=kind),
                      "teacher_same_steps": score(tN, labels, reference_images=t32, dataset=kind),
                      "teacher_32": score(t32, labels, reference_images=t32, dataset=kind)}
            shown = torch.arange(10) * K  # digits 0-9 at seed index 0
            rows = [t32[shown], tN[shown], images[shown]]
            _save_npz(storage, f"{sd}/eval/samples.npz", images=images.numpy(), labels=labels)
        else:
            images = drawn["student"]["image"]  # the first KEEP_IMAGES; the features are of all of them
            real_f = real_features(cfg, storage, prompts)
            scores = {name: {**real_metrics.score_features(f, real_f), "n": n}
                      for name, f in (("student", drawn["student"]), ("teacher_same_steps", cached[N]),
                                      ("teacher_32", cached[32]))}
            shown = torch.arange(min(10, n))  # the first prompts
            _save_npz(storage, f"{sd}/eval/samples.npz", images=images[shown].numpy(),
                      labels=np.asarray(prompts.captions[:len(shown)]))
            rows = [from_uint8(x[shown]) for x in (t32, tN, images)]
        metrics = {
            "stage": idx, "name": stage.name, "student_steps": N, "teacher_guidance_scale": g, "seed": seed, **scores,
            "speed": drawn["speed"],
        }
        if not toy:
            metrics["skipped"] = prompts.skipped
        grid = f"{work}/grid.png"
        save_grid(rows, grid, [f"teacher {32}", f"teacher {N}", f"student {N}"])
        storage.write_bytes(f"{sd}/eval/grid.png", open(grid, "rb").read())
        storage.write_json(f"{sd}/eval/metrics.json", metrics)
        keep_per_seed(storage, sd, metrics, inputs)  # benchmarks/eval_seeds.py pairs them across seeds and runs
        card = _model_card(cfg, key, metrics, family.of_folder(teacher_dir).PIPELINE,
                           absent_components(json.loads((teacher_dir / "model_index.json").read_text())))
        storage.write_text(f"{sd}/model/README.md", card)
        storage.rm(f"{sd}/eval/units")  # the samples are in samples.npz (and their metrics in metrics.json)
        st, fd = metrics["student"], ("fd" if toy else "fid")
        log(f"padistill evaluate: stage {idx}: student {fd} {st[fd]:.3g} "
            + (f"acc {st['prompt_accuracy']:.3f}" if toy else f"clip {st['clip_score']:.3g}")
            + f" | teacher@{N} {fd} {metrics['teacher_same_steps'][fd]:.3g} | speedup {metrics['speed']['speedup']:.1f}x")
        return storage.commit_manifest(step, inputs=inputs, outputs={"metrics": f"{sd}/eval/metrics.json",
                                                                     "grid": f"{sd}/eval/grid.png"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
