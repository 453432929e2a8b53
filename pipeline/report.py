"""The run's report: `<root>/report.md` with the metrics table (teacher at each step count vs each
student), image grids (same prompts and seeds), each metric plotted against steps, the training loss
curves, and the wall time of every DAG step."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .config import RunConfig
from .layout import TIMINGS_DIR, manifest_step, teacher_cache_rel
from .metrics import REAL_METRICS, metrics_of
from .storage import RunStorage

def collect(cfg: RunConfig, storage: RunStorage) -> list[dict]:
    out = []
    for k in range(1, len(cfg.stages) + 1):
        rel = f"{cfg.stage_dir(k)}/eval/metrics.json"
        if storage.exists(rel):
            out.append(storage.read_json(rel))
    return out


def table(evals: list[dict]) -> str:
    cols = metrics_of(evals)
    head = "| model | steps | " + " | ".join(h for _, h in cols) + " | speedup vs teacher-32+CFG |"
    lines = [head, "|" + " --- |" * (len(cols) + 3)]

    def row(name, steps, m, speed=""):
        vals = " | ".join(f"{m[k]:.3f}" if k in m else "–" for k, _ in cols)
        lines.append(f"| {name} | {steps} | {vals} | {speed} |")

    if evals:
        row("teacher", 32, evals[0]["teacher_32"], "1.0x")
    for e in evals:
        n = e["student_steps"]
        row("teacher", n, e["teacher_same_steps"])
        if "student_start" in e:  # the stage's starting student at n steps: what training had to improve on
            row(f"start of {e['name']}", n, e["student_start"])
        sp = e["speed"]
        row(f"**student {e['name']}**", n, e["student"], f"{sp['speedup']:.1f}x (ideal {sp['ideal_speedup']:.0f}x)")
    return "\n".join(lines)


def plot_metrics(evals: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = metrics_of(evals)[:4]
    keys = [k for k, _ in cols]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, k in zip(axes, keys):
        t = sorted({(e["student_steps"], e["teacher_same_steps"][k]) for e in evals} |
                   {(32, evals[0]["teacher_32"][k])})
        ax.plot([a for a, _ in t], [b for _, b in t], "o--", label="teacher (Euler)")
        s = sorted((e["student_steps"], e["student"][k]) for e in evals)
        ax.plot([a for a, _ in s], [b for _, b in s], "o-", label="students")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("steps")
        ax.set_title(dict(cols)[k])
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grid(cfg: RunConfig, storage: RunStorage, evals: list[dict], path: str) -> None:
    """Rows: teacher at 32 steps, then each student at its steps; columns: digits 0-9 at seed index 0
    (the toy), or the first 10 evaluation prompts (a non-toy run, whose samples.npz keeps only those)."""
    import io

    import numpy as np
    import torch

    from .images import from_uint8, save_grid

    toy = cfg.data.toy
    K = cfg.evaluate.samples_per_prompt
    g = evals[0]["teacher_guidance_scale"]
    t32 = torch.from_numpy(np.load(io.BytesIO(storage.read_bytes(teacher_cache_rel(cfg, 32, g))))["images"])
    shown = torch.arange(10) * K if toy else torch.arange(min(10, len(t32)))
    rows, labels = [t32[shown] if toy else from_uint8(t32[shown])], ["teacher 32"]
    for e in evals:
        imgs = np.load(io.BytesIO(storage.read_bytes(f"{cfg.stage_dir(e['stage'])}/eval/samples.npz")))["images"]
        rows.append(torch.from_numpy(imgs)[shown] if toy else from_uint8(torch.from_numpy(imgs)))
        labels.append(f"student {e['student_steps']}")
    save_grid(rows, path, labels)


def timings(storage: RunStorage, step_order: list[str]) -> list[tuple[str, float]]:
    """(step, seconds) in `step_order` (the DAG's), for the steps that have run."""
    out = []
    for name in step_order:
        rel = f"{TIMINGS_DIR}/{name}.json"
        if storage.exists(rel):
            out.append((name, storage.read_json(rel)["seconds"]))
    return out


def write_report(cfg: RunConfig, step_order: list[str], log=print) -> dict:
    """Write `<root>/report.md`; `step_order`: the DAG's step names in order (for the wall-time table)."""
    storage = RunStorage.from_config(cfg)
    evals = collect(cfg, storage)
    work = Path(tempfile.mkdtemp(prefix="padistill-report-"))
    parts = [f"# padistill report: {cfg.name}\n", f"Run root: `{storage.url()}`. Base model: `{cfg.model.source}`. "
             f"Stages: " + " → ".join([str(cfg.model.teacher_steps)] + [str(s.student_steps) for s in cfg.stages])
             + " steps.\n"]
    images = {}
    if evals:
        if metrics_of(evals) is REAL_METRICS:
            legend = (f"FID-Whole: Fréchet distance between the {cfg.evaluate.prompts} evaluation prompts' real images "
                      f"and the samples; FID-Patch: the same on centre {cfg.evaluate.patch_size} px crops; CLIP "
                      "score: 100 × cosine of each sample's and its prompt's CLIP embeddings.\n")
        else:
            what = "digits" if cfg.data.kind == "toy_digits" else "Fashion-MNIST t10k images"
            legend = (f"FD: Fréchet distance to real {what} in a classifier's feature space (FID analogue); "
                      "FD-patch: on centre 16×16 patches; accuracy: the classifier agrees with the prompt (CLIP-score "
                      f"analogue); diversity: within-prompt spread relative to the real {what}; sharpness: "
                      "high-frequency energy (what a 1-pixel blur removes) relative to the real images (1 = as "
                      "sharp).\n")
        parts += ["## Metrics\n", "Every student against the teacher sampled with Euler at the student's own step "
                  "count (same prompts, same seeds). " + legend, table(evals), ""]
        plot_metrics(evals, str(work / "metrics.png"))
        grid(cfg, storage, evals, str(work / "grid.png"))
        images = {"metrics.png": "Metrics against steps", "grid.png": "Samples: teacher at 32 steps and each student"}
    else:
        parts.append("No stage has been evaluated yet.\n")
    curves = []
    for k in range(1, len(cfg.stages) + 1):
        m = storage.read_manifest(manifest_step(cfg, k, "train"))
        src = (m or {}).get("outputs", {}).get("loss_curves")
        if src:
            rel = src[len(storage.url()) + 1:] if src.startswith(storage.url()) else src
            if storage.exists(rel):
                name = f"loss-{k}.png"
                (work / name).write_bytes(storage.read_bytes(rel))
                curves.append(name)
                images[name] = f"Training losses, stage {k}"
    for name, title in images.items():
        storage.write_bytes(f"report/{name}", (work / name).read_bytes())
        parts.append(f"### {title}\n\n![{title}](report/{name})\n")
    tt = timings(storage, step_order)
    if tt:
        parts += ["## Wall time per DAG step\n", "| step | seconds |", "| --- | --- |"]
        parts += [f"| {n} | {s:.1f} |" for n, s in tt] + [f"| **total** | {sum(s for _, s in tt):.1f} |", ""]
    text = "\n".join(parts) + "\n"
    storage.write_text("report.md", text)
    log(f"padistill report: {storage.url('report.md')}")
    return storage.commit_manifest("report", inputs={"evals": [e.get("stage") for e in evals]},
                                   outputs={"report": "report.md", "images": [f"report/{n}" for n in sorted(images)]})
