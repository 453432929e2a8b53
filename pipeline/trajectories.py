"""`padistill trajectories --stage K`: teacher rollouts of one stage, precomputed offline with Ray Data
into `<root>/stages/<K>-<name>/traj/` Parquet.

For every encoded row and each of `trajectories.draws` draws:

- the student step (t, t_next) is picked from `Schedule.stage_pairs(student_steps, multi_timestep)`,
  and the noise is drawn, both deterministically from (row id, draw, `trajectories.seed`)
  (`draw_seed`: a SHA-256 of the three; the noise is `torch.randn` on the CPU in fp32 from a
  generator seeded with it, so any process on any device regenerates it exactly);
- x_t = `Schedule.forward_diffuse(latent, noise, t)` (pure noise at t = T, the schedule fix);
- target = the teacher's n Euler steps from x_t along `Schedule.teacher_path` (the teacher grid's points
  between t and t_next) through `Schedule.rollout`, with classifier-free guidance when the stage's
  `guidance_scale` > 1 (the family's unconditional branch: zeros for SDXL, the empty prompt's encoding for
  SD1.5 and SD3, encoded once per step in one Ray task and handed to every actor, so no actor loads a text
  encoder). The SD3 family does the same on `FlowMatchSchedule`, its noise levels sigmas.

The teacher of stage K is the exported student of stage `teacher_of(K)` (`<root>/<stage_dir>/model/`,
a diffusers pipeline folder), or `model.source` for the first stage.

Output schema (Euler sigma space, x = x0 + sigma * eps; tensors in `trajectories.dtype`):

    id string · draw int32 · t int32 · t_next int32 (−1 = clean) · x_t [4,h,w] · target [4,h,w]
    prompt_embeds [L,D] · pooled_embeds [P] (SDXL and SD3)

For the SD3 family, t and t_next are float32 sigmas (0 = clean) and x = (1 - sigma) x0 + sigma eps.

The text embeddings are copied from `encoded/` into every stage's rows, so that training streams one
dataset with no join. Their byte cost per row is recorded in the manifest (`embedding_bytes_per_row`
next to `raw_tensor_bytes_per_row`); for the toy model they are ~3/4 of a row, for SDXL at 1024 px
(77×2048 prompt embeddings vs two 4×128×128 latents) a little more than half.
Files hold at most `trajectories.max_rows_per_file` rows; the step is restartable (see `pipeline.shards`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict

import numpy as np
import torch

from . import encode as encode_mod
from . import cluster, shards
from .config import RunConfig
from .stage_config import StageConfig
from .layout import manifest_step
from .errors import MissingInputError
from .schedule import Conditioning, FlowMatchSchedule, Schedule, StagePair, unet_denoiser
from .stage_models import fetch_teacher, files_under, teacher_fingerprint, teacher_source
from .storage import RunStorage, table_to_tensors, tensors_to_table

SCHEMA_VERSION = 2  # 2: rows in item order (mixed timesteps), not grouped by timestep
COLUMNS = ["id", "draw", "t", "t_next", "x_t", "target", "prompt_embeds", "pooled_embeds"]
TENSOR_COLUMNS = ["x_t", "target", "prompt_embeds", "pooled_embeds"]


def step_name(cfg: RunConfig, key) -> str:
    """The manifest step of stage `key`'s trajectories: "trajectories-<k>-<name>"."""
    return manifest_step(cfg, key, "trajectories")


def out_rel(cfg: RunConfig, key) -> str:
    return f"{cfg.stage_dir(key)}/traj"


# ---- determinism -------------------------------------------------------------------------------------
def draw_seed(row_id: str, draw: int, seed: int) -> tuple[int, int]:
    """(noise seed, pair choice) for one (row, draw), from SHA-256 of (seed, id, draw)."""
    h = hashlib.sha256(f"{int(seed)}\x00{row_id}\x00{int(draw)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1), int.from_bytes(h[8:16], "little")


def draw_noise(noise_seed: int, shape) -> torch.Tensor:
    """The noise of a draw: fp32 standard normal on the CPU from a generator seeded with `noise_seed`."""
    g = torch.Generator(device="cpu").manual_seed(int(noise_seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def pick_pair(row_id: str, draw: int, seed: int, pairs: list[StagePair]) -> StagePair:
    return pairs[draw_seed(row_id, draw, seed)[1] % len(pairs)]


def unconditional_branch(cfg: RunConfig, key, storage: RunStorage | None = None,
                         dtype: torch.dtype | None = None) -> Conditioning | None:
    """The unconditional branch of stage `key`'s guided rollouts: the empty prompt's encoding by the teacher's
    text encoders (SD1.5, SD3; T5-XXL included where the teacher has it), at the model's dtype as encode's
    prompts were; None for an unguided stage and for SDXL (zeros). The only use of text encoders in a stage's
    rollouts: `run_trajectories` encodes it once, in one Ray task, and hands it to every actor."""
    from . import family
    from .zoo import DTYPES

    if not _has_unconditional(cfg, key):
        return None
    folder = fetch_teacher(teacher_source(cfg, key, storage), cfg, text=True)
    return family.of_folder(folder).unconditional(folder, dtype or DTYPES[cfg.model.dtype])


def _has_unconditional(cfg: RunConfig, key) -> bool:
    """Whether stage `key`'s rollouts need an encoded unconditional branch: guided, in a family whose branch
    is not zeros."""
    from .zoo import family_module

    return cfg.stage(key)[1].guidance_scale > 1 and bool(family_module(cfg).UNCOND_COMPONENTS)


class Teacher:
    """A stage's teacher denoiser (UNet or SD3 transformer), schedule and guidance, for rollouts."""

    def __init__(self, unet, schedule: Schedule | FlowMatchSchedule, stage: StageConfig, resolution: int, device="cpu",
                 uncond: Conditioning | None = None):
        self.unet, self.schedule, self.stage = unet.eval(), schedule, stage
        self.resolution, self.device = resolution, device
        self.uncond = uncond  # the family's unconditional branch (None: zeros)
        self.pairs = schedule.stage_pairs(stage.student_steps, stage.multi_timestep)

    @classmethod
    def load(cls, cfg: RunConfig, key, storage: RunStorage | None = None, device="cpu",
             dtype: torch.dtype | None = None, uncond: "Conditioning | None | str" = "encode") -> "Teacher":
        """The teacher's denoiser and schedule and the stage's unconditional branch: `uncond` as
        `unconditional_branch` gave it (what the step's actors get: their teacher folder is fetched without text
        encoders), or "encode" to encode it here (a guided SD1.5 or SD3 stage then fetches them too)."""
        from .zoo import DTYPES, load_denoiser, schedule_of

        _, stage = cfg.stage(key)
        dtype = dtype or DTYPES[cfg.model.dtype]
        if isinstance(uncond, str):
            if uncond != "encode":
                raise ValueError(f"Teacher.load: uncond={uncond!r} (a Conditioning, None or 'encode')")
            uncond = unconditional_branch(cfg, key, storage, dtype)
        folder = fetch_teacher(teacher_source(cfg, key, storage), cfg)
        unet = load_denoiser(str(folder), dtype=dtype).to(device)
        return cls(unet, schedule_of(folder), stage, cfg.model.resolution, device, uncond)

    @torch.no_grad()
    def rollout(self, latents: torch.Tensor, noise: torch.Tensor, pair: StagePair,
                text: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target) for a batch sharing one (t, t_next), conditioned on the rows' text columns
        (`text`: prompt_embeds, and pooled_embeds where the family has them); everything fp32 on `device`."""
        dev = self.device
        x0 = latents.to(dev, torch.float32)
        b = x0.shape[0]
        t = torch.full((b,), pair.t, dtype=self.schedule.level_dtype)
        x_t = self.schedule.forward_diffuse(x0, noise.to(dev, torch.float32), t)
        cond = Conditioning.from_columns(text, self.resolution, dev, self.uncond)
        denoise = unet_denoiser(self.unet, cond, self.stage.guidance_scale)
        path = self.schedule.teacher_path(self.stage.teacher_steps, pair.t, pair.t_next)
        target = self.schedule.rollout(denoise, x_t, path, pair.t_next)
        return x_t, target


def compute_rows(teacher: Teacher, rows: dict[str, np.ndarray], items: list[tuple[int, int]], seed: int,
                 batch_size: int, out_dtype=np.float16):
    """Yield trajectory tables for `items` = [(row index into `rows`, draw)], in the order of `items`.
    `rows` holds the encoded columns id, latent and the text columns (`text_columns`).

    The teacher runs on batches that share one student step (one teacher path), but the rows are
    written back in item order, window by window (`batch_size` x the number of student steps items at
    a time, so memory stays bounded): each item's step is drawn from a hash, so every stretch of a
    file mixes all timesteps. Rows sorted by timestep would stream into training as batches of a
    single timestep, in timestep order."""
    shape = rows["latent"].shape[1:]
    text = text_columns(rows)
    window = batch_size * len(teacher.pairs)
    for w0 in range(0, len(items), window):
        win = items[w0:w0 + window]
        groups: dict[StagePair, list[int]] = defaultdict(list)  # pair -> positions in `win`
        seeds = []
        for pos, (r, d) in enumerate(win):
            noise_seed, choice = draw_seed(str(rows["id"][r]), d, seed)
            seeds.append(noise_seed)
            groups[teacher.pairs[choice % len(teacher.pairs)]].append(pos)
        n = len(win)
        x_t = np.empty((n, *shape), out_dtype)
        target = np.empty((n, *shape), out_dtype)
        level = np.int32 if teacher.schedule.level_dtype == torch.long else np.float32  # sigmas: float
        t = np.empty(n, level)
        t_next = np.empty(n, level)
        for pair, members in groups.items():
            for s in range(0, len(members), batch_size):
                pos = np.array(members[s:s + batch_size])
                idx = np.array([win[p][0] for p in pos])
                noise = torch.stack([draw_noise(seeds[p], shape) for p in pos])
                xt_b, tg_b = teacher.rollout(torch.from_numpy(rows["latent"][idx].astype(np.float32)), noise, pair,
                                             {k: torch.from_numpy(rows[k][idx].astype(np.float32)) for k in text})
                x_t[pos] = xt_b.cpu().numpy().astype(out_dtype)
                target[pos] = tg_b.cpu().numpy().astype(out_dtype)
                t[pos], t_next[pos] = pair.t, pair.t_next
        idx = np.array([r for r, _ in win])
        yield tensors_to_table({
            "id": [str(rows["id"][i]) for i in idx],
            "draw": np.array([d for _, d in win], np.int32),
            "t": t,
            "t_next": t_next,
            "x_t": x_t,
            "target": target,
            **{k: rows[k][idx].astype(out_dtype) for k in text},
        })


ENCODED_COLUMNS = ["id", "latent", "prompt_embeds", "pooled_embeds"]
TEXT_COLUMNS = ("prompt_embeds", "pooled_embeds")  # pooled_embeds: SDXL and SD3


def text_columns(names) -> list[str]:
    """The text columns among `names` (a table's columns, a dict's keys): SDXL rows have both, SD1.5 rows
    prompt_embeds only."""
    return [c for c in TEXT_COLUMNS if c in names]


class TrajectoryWorker:
    """A Ray Data actor: the teacher is loaded once; each call rolls out and commits one unit."""

    def __init__(self, cfg_json: str, stage_key: str, inputs_hash: str, uncond: Conditioning | None,
                 threads: int = 1):
        torch.set_num_threads(threads)
        cluster.quiet_libraries()
        self.cfg = RunConfig.model_validate_json(cfg_json)
        self.key, self.inputs_hash = stage_key, inputs_hash
        self.storage = RunStorage.from_config(self.cfg)
        tc = self.cfg.trajectories
        device = encode_mod.device_for(tc.gpus_per_actor)
        # the unconditional branch comes encoded (`unconditional_branch`): no actor loads a text encoder
        self.teacher = Teacher.load(self.cfg, stage_key, self.storage, device, uncond=uncond)
        self.out = out_rel(self.cfg, stage_key)
        self.out_dtype = np.float16 if tc.dtype == "float16" else np.float32
        self._pf = None

    def _file(self, rel: str):
        import pyarrow.parquet as pq

        if self._pf is None or self._pf[0] != rel:
            self._pf = (rel, pq.ParquetFile(self.storage.path(encode_mod.OUT, rel), filesystem=self.storage.arrow_fs))
        return self._pf[1]

    def process(self, unit: dict) -> dict:
        tc = self.cfg.trajectories
        R = tc.draws
        r0, r1 = unit["start"] // R, (unit["stop"] - 1) // R + 1
        pf = self._file(unit["file"])
        table = shards.read_rows(pf, r0, r1, [c for c in ENCODED_COLUMNS if c in pf.schema_arrow.names])
        rows = table_to_tensors(table)
        items = [(i // R - r0, i % R) for i in range(unit["start"], unit["stop"])]
        writer = shards.ShardWriter(self.storage, self.out, unit["index"], use_dictionary=False,
                                    write_statistics=["id", "draw", "t", "t_next"])
        try:
            for t in compute_rows(self.teacher, rows, items, tc.seed, tc.batch_size, self.out_dtype):
                writer.write(t)
        except BaseException:
            writer.abort()
            raise
        return writer.commit(inputs_hash=self.inputs_hash, unit=unit)

    def __call__(self, batch: dict) -> dict:
        return {"marker": [json.dumps(self.process(json.loads(u))) for u in batch["unit"]]}


# ---- the step -----------------------------------------------------------------------------------------
def plan_units(encoded_files: list[dict], draws: int, max_rows_per_file: int) -> list[dict]:
    """Units over (encoded file, item range), item = row * draws + draw; never spanning two encoded
    files. A file's items are split into the fewest units of at most `max_rows_per_file` items, of
    equal size (±1), so that an actor pool's units take equal time."""
    units = []
    for f in encoded_files:
        n = f["rows"] * draws
        k = -(-n // max_rows_per_file)  # 0 for an empty file: no units
        bounds = [n * i // k for i in range(k + 1)] if k else []
        for s, e in zip(bounds, bounds[1:]):
            units.append({"index": len(units), "file": f["file"], "start": s, "stop": e})
    return units


def teacher_identity(cfg: RunConfig, key) -> str:
    """The teacher as the trajectory manifest names it: the base model's source, or an earlier stage's
    student *relative to the run root* (with its files' sizes and versions beside it), so a run root that
    is moved or copied, files and mtimes kept, keeps its trajectories."""
    j = cfg.teacher_of(key)
    return cfg.model.source if j is None else f"{cfg.stage_dir(j)}/model"


# what a stage's rollouts read of its settings; the others say how the stage trains (its loss, lr, updates,
# discriminator), so changing them retrains the stage on the same trajectories instead of rolling them out
# again (on SDXL, hours of teacher passes)
ROLLOUT_KEYS = ("teacher_steps", "student_steps", "teacher_stage", "guidance_scale", "multi_timestep")


def rollout_settings(stage: StageConfig | dict) -> dict:
    """The stage's settings its trajectories depend on (`ROLLOUT_KEYS`), as their manifest records them;
    from a stage, or from the whole stage an earlier manifest recorded."""
    d = stage if isinstance(stage, dict) else stage.model_dump(mode="json")
    return {k: d.get(k) for k in ROLLOUT_KEYS}


def trajectory_inputs(cfg: RunConfig, key, storage: RunStorage, enc_manifest: dict) -> dict:
    k, stage = cfg.stage(key)
    src = teacher_source(cfg, key, storage)
    tc = cfg.trajectories
    return {"encoded": {"inputs_hash": enc_manifest["inputs_hash"], "finished_at": enc_manifest["finished_at"]},
            "stage_index": k, "stage": rollout_settings(stage), "teacher": teacher_identity(cfg, k),
            "teacher_files": teacher_fingerprint(src, cfg, text=_has_unconditional(cfg, k)), "model_dtype": cfg.model.dtype,
            "resolution": cfg.model.resolution, "draws": tc.draws, "seed": tc.seed, "dtype": tc.dtype,
            "max_rows_per_file": tc.max_rows_per_file, "schema_version": SCHEMA_VERSION}


def _legacy_finished(manifest: dict | None, inputs: dict) -> bool:
    """A manifest an earlier padistill wrote whose inputs are otherwise today's: one naming the teacher by
    its full URL (<= 0.1.0, before `teacher_identity`), or holding the whole stage, training keys too
    (before `rollout_settings`), compared on the rollouts' keys, or, for a guided SD1.5 or SD3 stage, fingerprinting
    the teacher's denoiser and scheduler alone (before its text encoders counted), compared on those files (a
    text-encoder swap made before that goes unnoticed; one made after it re-rolls the stage). It is kept as
    written: the later steps' manifests hash its `inputs_hash`, so rewriting it would retrain every stage after it."""
    if not manifest:
        return False
    old = dict(manifest.get("inputs") or {})
    url = str(old.get("teacher", ""))
    named = url == inputs["teacher"] or url.rstrip("/").endswith("/" + inputs["teacher"])
    if not named or shards.inputs_hash(old) != manifest.get("inputs_hash"):
        return False
    if isinstance(old.get("stage"), dict):
        old["stage"] = rollout_settings(old["stage"])
    files, old_files = inputs["teacher_files"], old.get("teacher_files") or {}
    if old_files and old_files == files_under(files, {f.split("/", 1)[0] for f in old_files}):
        old["teacher_files"] = files  # compared on the subfolders it fingerprinted (the text encoders did not count)
    return {**old, "teacher": inputs["teacher"]} == inputs


def finished(cfg: RunConfig, key, storage: RunStorage | None = None) -> dict | None:
    """Stage `key`'s trajectories' manifest when they finished with today's inputs (its teacher's files
    included), else None; their files are `intact`'s to check. No Ray: `distill` asks before it starts one."""
    storage = storage or RunStorage.from_config(cfg)
    enc = storage.read_manifest(encode_mod.STEP)
    step = step_name(cfg, key)
    prev = storage.read_manifest(step)
    if enc is None or prev is None:
        return None
    try:
        inputs = trajectory_inputs(cfg, key, storage, enc)
    except MissingInputError:  # its teacher (an earlier stage's student) is not exported
        return None
    return storage.finished_manifest(step, inputs) or (prev if _legacy_finished(prev, inputs) else None)


def intact(cfg: RunConfig, key, manifest: dict, storage: RunStorage | None = None, log=print) -> bool:
    """Whether the finished step's files verify (`storage.verify_reads`); says which do not."""
    storage = storage or RunStorage.from_config(cfg)
    return shards.intact(storage, out_rel(cfg, key), manifest["outputs"]["files"], cfg.storage.verify_reads, log,
                         "trajectories")


def run_trajectories(cfg: RunConfig, key, *, force: bool = False, log=print) -> dict:
    """Run (or resume, or skip when finished) stage `key`'s trajectories; returns the manifest."""
    from .zoo import family_module

    family_module(cfg)  # settings the model's family does not support fail here in one line, not in an actor
    storage = RunStorage.from_config(cfg)
    k, stage = cfg.stage(key)
    enc = storage.read_manifest(encode_mod.STEP)
    if enc is None:
        raise MissingInputError(f"{storage.url(encode_mod.OUT)} is not finished (no manifest "
                                f"{storage.manifest_path(encode_mod.STEP)}): run `padistill encode` first")
    step, out = step_name(cfg, k), out_rel(cfg, k)
    if not force and (prev := finished(cfg, k, storage)) is not None and intact(cfg, k, prev, storage, log):
        log(f"padistill trajectories: {storage.url(out)} is up to date (manifest {storage.manifest_path(step)})")
        return prev
    inputs = trajectory_inputs(cfg, k, storage, enc)
    ih = shards.inputs_hash(inputs)
    verify = cfg.storage.verify_reads
    # the encoded rows the units read, before anything here is touched
    shards.check_committed(storage, encode_mod.OUT, enc["outputs"]["files"], verify, "`padistill encode`")
    storage.invalidate(step)
    tc = cfg.trajectories
    units = plan_units(enc["outputs"]["files"], tc.draws, tc.max_rows_per_file)
    if force:
        storage.rm(out)
    done = shards.prepare_output(storage, out, ih, verify, log)
    todo = [u for u in units if u["index"] not in done]
    log(f"padistill trajectories: stage {k} ({stage.name}, teacher {inputs['teacher']}, "
        f"{stage.teacher_steps}->{stage.student_steps} steps, guidance {stage.guidance_scale}): {len(units)} units, "
        f"{len(done)} already committed, {len(todo)} to run -> {storage.url(out)}")
    t0 = time.perf_counter()
    cluster.ensure_ray(cfg)
    uncond = _encode_unconditional(cfg, k) if todo else None
    shards.run_units(todo, TrajectoryWorker,
                     {"cfg_json": cfg.model_dump_json(), "stage_key": str(k), "inputs_hash": ih, "uncond": uncond},
                     actors=tc.actors, gpus_per_actor=tc.gpus_per_actor,
                     on_marker=lambda m: log(f"  unit {m['index']}: {m['rows']} rows, {m['bytes']} B"))
    elapsed = time.perf_counter() - t0
    markers = {i: m for i, m in shards.read_markers(storage, out).items() if m.get("inputs_hash") == ih}
    summary = shards.summarize(markers, len(units))
    raw, emb = row_tensor_bytes(storage, out, summary)
    rows_run = sum(u["stop"] - u["start"] for u in todo)
    outputs = {"path": out, **summary, "raw_tensor_bytes_per_row": raw, "embedding_bytes_per_row": emb,
               "stored_over_raw": (summary["bytes_per_row"] / raw) if raw else None,
               "columns": [c for c in COLUMNS if c not in TEXT_COLUMNS or c in enc["outputs"]["columns"]],
               "schema_version": SCHEMA_VERSION,
               "expected_rows": enc["outputs"]["rows"] * tc.draws}
    if summary["rows"] != outputs["expected_rows"]:
        raise RuntimeError(f"{out}: {summary['rows']} rows committed, expected {outputs['expected_rows']}")
    manifest = storage.commit_manifest(step, inputs=inputs, outputs=outputs, stage=k, units_run=len(todo),
                                       rows_run=rows_run, seconds_this_run=round(elapsed, 3),
                                       rows_per_second_this_run=round(rows_run / elapsed, 3) if elapsed else None)
    log(f"padistill trajectories: {summary['rows']} rows in {len(summary['files'])} files, "
        f"{summary['bytes_per_row']:.0f} B/row stored vs {raw} B/row raw tensors "
        f"({emb} B/row of them embeddings copied from encoded/)")
    return manifest


def _encode_unconditional(cfg: RunConfig, k: int) -> Conditioning | None:
    """`unconditional_branch` in one Ray task (1 CPU, any node: SD3.5's T5-XXL is loaded there once, not in
    every actor; its node fetches the teacher's text encoders, the actors' nodes do not)."""
    import ray

    if not _has_unconditional(cfg, k):
        return None
    task = ray.remote(num_cpus=1)(_unconditional_task).options(name=f"padistill:uncond-{k}")
    return ray.get(task.remote(cfg.model_dump_json(), k))


def _unconditional_task(cfg_json: str, k: int) -> Conditioning | None:
    cluster.quiet_libraries()
    return unconditional_branch(RunConfig.model_validate_json(cfg_json), k)


def row_tensor_bytes(storage: RunStorage, out: str, summary: dict) -> tuple[int, int]:
    """(tensor bytes of one row at the stored dtype, of which text embeddings)."""
    if not summary["files"]:
        return 0, 0
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(storage.path(out, summary["files"][0]["file"]), filesystem=storage.arrow_fs)
    arr = table_to_tensors(pf.read_row_group(0).slice(0, 1),
                           [c for c in TENSOR_COLUMNS if c in pf.schema_arrow.names])
    return int(sum(a.nbytes for a in arr.values())), int(sum(arr[c].nbytes for c in text_columns(arr)))


def read_trajectories(storage: RunStorage, cfg: RunConfig, key, columns: list[str] | None = None):
    """The committed trajectory table of a stage (one process; tests and small runs)."""
    step = step_name(cfg, key)
    m = storage.read_manifest(step)
    if m is None:
        raise MissingInputError(f"{step} is not finished")
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data.extensions  # noqa: F401  registers the tensor type

    out = m["outputs"]["path"]
    return pa.concat_tables([pq.read_table(storage.path(out, f["file"]), columns=columns,
                                           filesystem=storage.arrow_fs) for f in m["outputs"]["files"]])
