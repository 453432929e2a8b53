"""Stage trajectories for the trainer's tests, in the agreed `traj/` schema (Euler sigma space):

    id string · draw int32 · t int32 · t_next int32 (-1 = clean) · x_t [4,h,w] · target [4,h,w]
    prompt_embeds [L,D] · pooled_embeds [P]

made with a real (tiny) teacher pipeline and `pipeline.schedule` (forward diffusion, the teacher's n
Euler steps with CFG when the stage has it): what `padistill trajectories` writes, on random latents."""

from __future__ import annotations

import numpy as np
import torch

from pipeline import zoo
from pipeline.schedule import unet_denoiser


@torch.no_grad()
def make_trajectories(pipe, stage, n_ids: int = 32, draws: int = 1, seed: int = 0, resolution: int = 32,
                      latent_scale: float = 0.5) -> dict:
    sched = zoo.schedule_of(pipe)
    pairs = sched.stage_pairs(stage.student_steps, stage.multi_timestep)
    g = torch.Generator().manual_seed(seed)
    ids = [f"img{i:05d}" for i in range(n_ids) for _ in range(draws)]
    draw = [d for _ in range(n_ids) for d in range(draws)]
    captions = [f"a handwritten digit {zoo.DIGIT_WORDS[int(i[3:]) % 10]}" for i in ids]
    cond = zoo.encode_prompts(pipe, captions, resolution)
    n = len(ids)
    h = resolution // pipe.vae_scale_factor
    x0 = torch.randn(n, 4, h, h, generator=g) * latent_scale
    noise = torch.randn(n, 4, h, h, generator=g)
    pick = [pairs[(i * 7 + d) % len(pairs)] for i, d in zip(range(n), draw)]
    t = torch.tensor([p.t for p in pick])
    t_next = torch.tensor([p.t_next for p in pick])
    x_t = sched.forward_diffuse(x0, noise, t)
    target = torch.empty_like(x_t)
    for p in set(pick):
        rows = torch.tensor([i for i, q in enumerate(pick) if q == p])
        c = cond.select(rows)
        den = unet_denoiser(pipe.unet, c, stage.guidance_scale)
        path = sched.teacher_path(stage.teacher_steps, p.t, p.t_next)
        target[rows] = sched.rollout(den, x_t[rows], path, p.t_next)
    return {"id": np.array(ids, dtype=object), "draw": np.array(draw, dtype=np.int32),
            "t": t.numpy().astype(np.int32), "t_next": t_next.numpy().astype(np.int32),
            "x_t": x_t.numpy().astype(np.float32), "target": target.numpy().astype(np.float32),
            "prompt_embeds": cond.prompt_embeds.numpy().astype(np.float32),
            "pooled_embeds": cond.pooled.numpy().astype(np.float32)}


def commit_trajectories(storage, cfg, key, cols: dict) -> str:
    """Commit `cols` as stage `key`'s trajectories the way `padistill trajectories` does: one unit
    through `shards.ShardWriter` (its marker records size and SHA-256), then the step's manifest (the
    trainer reads only finished, verified trajectories). Returns the file's path."""
    from pipeline import shards
    from pipeline.storage import tensors_to_table
    from pipeline.trajectories import COLUMNS, SCHEMA_VERSION, out_rel, step_name

    out = out_rel(cfg, key)
    storage.rm(out)
    w = shards.ShardWriter(storage, out, 0)
    w.write(tensors_to_table({**cols, "id": [str(i) for i in cols["id"]]}))
    marker = w.commit(inputs_hash="traj_helpers")
    storage.commit_manifest(step_name(cfg, key), inputs={"rows_sha256": marker["sha256"]},
                            outputs={"path": out, **shards.summarize({0: marker}, 1), "schema_version": SCHEMA_VERSION,
                                     "columns": [c for c in COLUMNS if c in cols]})
    return storage.path(out, marker["file"])


def write_trajectories(storage, cfg, key, pipe, **kw) -> str:
    """Make and commit trajectories for stage `key` under the run root; returns the file's path."""
    _, stage = cfg.stage(key)
    cols = make_trajectories(pipe, stage, resolution=cfg.model.resolution, **kw)
    return commit_trajectories(storage, cfg, key, cols)
