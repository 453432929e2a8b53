"""The student of a stage: its UNet as a peft LoRA on the teacher or as the full UNet, the LoRA merge,
the epsilon -> x0 ("sample" prediction) conversion target, and export of a student's weights (from any
training checkpoint) as a diffusers pipeline folder plus the LoRA file `pipe.load_lora_weights` accepts.

Checkpoint layout this module reads (written by `pipeline.train_worker`):

    <checkpoint>/state.json                  step, student_mode ("lora" | "full"), prediction_type, lora
    <checkpoint>/student/lora.safetensors    peft LoRA state dict (student_mode = lora; base = teacher)
    <checkpoint>/student/unet.safetensors    full UNet state dict (student_mode = full)
    <checkpoint>/student/ds/, disc/ds/       each rank's DeepSpeed ZeRO shards (resume only)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .schedule import Schedule

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
STATE_JSON = "state.json"
# Modules LoRA leaves alone (DESIGN: "except the input/output convs and the time embedding"); the
# text_time `add_embedding` is SDXL's second (size/crop + pooled text) timestep-style embedding. An SD3
# transformer's counterparts: its patch embedding and output projection, its timestep + pooled-text embedding,
# its context projection and the final norm's modulation.
LORA_EXCLUDE = ("conv_in", "conv_out", "time_embedding", "add_embedding",
                "pos_embed", "proj_out", "time_text_embed", "context_embedder", "norm_out")


# ---- LoRA ----------------------------------------------------------------------------------------------
def lora_target_modules(unet) -> list[str]:
    """Full names of every nn.Linear / nn.Conv2d of the UNet (or SD3 transformer) except its input/output
    layers and time embeddings (`LORA_EXCLUDE`)."""
    names = []
    for name, mod in unet.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if name.split(".")[0] in LORA_EXCLUDE:
            continue
        names.append(name)
    return names


def lora_config(unet, rank: int, alpha: float | None = None):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                      target_modules=lora_target_modules(unet), init_lora_weights=True)


def add_lora(unet, rank: int, alpha: float | None = None):
    """Inject a peft LoRA (zero-initialised B: the output is unchanged) and make only it trainable."""
    unet.add_adapter(lora_config(unet, rank, alpha))
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_" in n)
    return unet


def has_lora(unet) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in unet.modules())


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The LoRA weights in peft's key format (what `save_lora_weights(unet_lora_layers=…)` takes)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state_dict(unet, sd: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    res = set_peft_model_state_dict(unet, sd)
    bad = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
    if bad:
        raise ValueError(f"LoRA state dict does not fit the UNet (unexpected: {bad[:3]} ...)")


def merge_lora(unet):
    """Merge every LoRA layer into its base layer and drop the adapters: a plain UNet again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, mod in list(unet.named_modules()):
        if isinstance(mod, BaseTunerLayer):
            mod.merge()
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, mod.get_base_layer())
    for attr in ("peft_config",):
        if hasattr(unet, attr):
            delattr(unet, attr)
    unet._hf_peft_config_loaded = False
    for p in unet.parameters():
        p.requires_grad_(True)
    return unet


# ---- x0 conversion ------------------------------------------------------------------------------------
@torch.no_grad()
def implied_x0(schedule: Schedule, denoise, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # UNets only
    """The x0 an epsilon model implies at (x_t, t): the conversion target of the 1-step student."""
    _, x0 = schedule.step(denoise, x_t, t, t, prediction_type="epsilon")
    return x0


# ---- checkpoints -> weights -----------------------------------------------------------------------------
def read_state(checkpoint_dir: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint_dir) / STATE_JSON).read_text())


def student_unet_from_checkpoint(checkpoint_dir: str | os.PathLike, teacher_folder: str | os.PathLike,
                                 merge: bool = True):
    """The student denoiser (UNet, or SD3 transformer) of a checkpoint on the teacher's architecture (LoRA
    merged unless merge=False)."""
    from safetensors.torch import load_file

    from .zoo import load_denoiser

    ckpt = Path(checkpoint_dir)
    state = read_state(ckpt)
    unet = load_denoiser(str(teacher_folder), dtype=torch.float32)
    if state["student_mode"] == "lora":
        add_lora(unet, state["lora"]["rank"], state["lora"]["alpha"])
        load_lora_state_dict(unet, load_file(str(ckpt / "student" / "lora.safetensors")))
        if merge:
            merge_lora(unet)
    else:
        missing, unexpected = unet.load_state_dict(load_file(str(ckpt / "student" / "unet.safetensors")),
                                                   strict=False)
        if missing or unexpected:
            raise ValueError(f"{ckpt}: student weights do not fit the teacher UNet "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return unet, state


def save_lora_file(lora_sd: dict[str, torch.Tensor], folder: str | os.PathLike, rank: int,
                   alpha: float | None, family, unet=None) -> Path:
    """Write the LoRA file (`pytorch_lora_weights.safetensors`, diffusers' UNet or SD3-transformer LoRA format
    with its rank/alpha metadata) that the family's pipeline (`family`: its module, `pipeline.family_*`) accepts
    in `load_lora_weights(folder)`."""
    import diffusers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = None
    if unet is not None:
        cfg = lora_config(unet, rank, alpha)
        meta = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules)}
    part = family.DENOISER[0]  # unet_lora_layers, or an SD3 pipeline's transformer_lora_layers
    getattr(diffusers, family.PIPELINE).save_lora_weights(folder, weight_name=LORA_WEIGHT_NAME,
                                                         **{f"{part}_lora_layers": lora_sd,
                                                            f"{part}_lora_adapter_metadata": meta})
    return folder / LORA_WEIGHT_NAME


def pipeline_components(folder: str | os.PathLike) -> list[str]:
    """The component folders a diffusers pipeline folder's `model_index.json` lists."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]


def copy_pipeline_components(src: str | os.PathLike, dst: str | os.PathLike, skip: tuple[str, ...] = ()) -> None:
    """Copy a pipeline folder's `model_index.json` and its components, nothing else: the teacher's own
    files (its training record, loss curves, model card, LoRA) are not the student's."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    shutil.copy2(src / "model_index.json", dst / "model_index.json")
    for name in pipeline_components(src):
        if name not in skip:
            shutil.copytree(src / name, dst / name)


def student_scheduler(folder: str | os.PathLike, prediction_type: str) -> dict:
    """Give an exported pipeline folder the students' scheduler: Euler with trailing timesteps on the
    teacher's betas, `prediction_type` ("sample" for the x0 1-step student), whatever scheduler the teacher
    shipped (SD1.5 ships PNDM, which cannot sample an x0 model); `model_index.json` names it. Returns its
    config. A flow-matching teacher's scheduler (SD3) is the student's as it stands."""
    from diffusers import EulerDiscreteScheduler

    folder = Path(folder)
    teacher = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if teacher.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        if prediction_type != "flow":
            raise ValueError(f"a flow-matching student predicts the velocity ('flow'), not {prediction_type!r}")
        return {**teacher, "prediction_type": "flow"}
    sched = EulerDiscreteScheduler.from_config(teacher, timestep_spacing="trailing", prediction_type=prediction_type)
    shutil.rmtree(folder / "scheduler")
    sched.save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return dict(sched.config)


def export_checkpoint(checkpoint_dir: str | os.PathLike, teacher_folder: str | os.PathLike,
                      out_folder: str | os.PathLike, info: dict | None = None) -> Path:
    """Export a training checkpoint's student as a diffusers pipeline folder: the teacher's folder with
    the student UNet (or SD3 transformer) swapped in (LoRA merged), the scheduler set to the student's prediction type
    ("sample" for the x0-converted 1-step student), `padistill.json`, and, for a LoRA student, the
    LoRA file that `pipe.load_lora_weights(out_folder)` accepts on the teacher."""
    from safetensors.torch import load_file

    from . import family
    from .zoo import PADISTILL_JSON, read_info

    out = Path(out_folder)
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    sub = family.denoiser_dir(teacher_folder)
    copy_pipeline_components(teacher_folder, tmp, skip=(sub,))
    unet, state = student_unet_from_checkpoint(checkpoint_dir, teacher_folder, merge=True)
    unet.save_pretrained(tmp / sub, safe_serialization=True)
    sched_cfg = student_scheduler(tmp, state.get("prediction_type", "epsilon"))
    if state["student_mode"] == "lora":
        save_lora_file(load_file(str(Path(checkpoint_dir) / "student" / "lora.safetensors")), tmp,
                       state["lora"]["rank"], state["lora"]["alpha"], unet=unet,
                       family=family.of_folder(teacher_folder))
    meta = {**read_info(teacher_folder), **(info or {}), "train_step": state["step"],
            "prediction_type": sched_cfg["prediction_type"], "student_mode": state["student_mode"]}
    (tmp / PADISTILL_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
