"""Model families (DESIGN, "Model families"): which one a pipeline folder is, and the module that says how
that family builds its toy, encodes prompts, forms its unconditional branch and where its denoiser lives
(`family_sdxl`, `family_sd15`, `family_sd3`). The schedule, the denoiser call (`pipeline.schedule`) and the
discriminator read the rest from the models themselves."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType

from . import family_sd3, family_sd15, family_sdxl
from .errors import ConfigError

# a pipeline folder's class (model_index.json) -> its family; the families padistill distils have a module
FAMILIES = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusionPipeline": "sd15",
            "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
MODULES: dict[str, ModuleType] = {"sdxl": family_sdxl, "sd15": family_sd15, "sd3": family_sd3}
# the families a run distils
SUPPORTED = ("sdxl", "sd15", "sd3")


def module(name: str) -> ModuleType:
    """The module of any family padistill has one for; a run asks `get`, which refuses a family it does not
    distil."""
    return MODULES[name] if name in MODULES else get(name)


def get(name: str) -> ModuleType:
    """The module of a family padistill distils (a one-line error for another)."""
    if name not in SUPPORTED:
        raise ConfigError(f"model.family: {name!r} is not distilled by padistill today (it distils "
                          f"{', '.join(SUPPORTED)})")
    return MODULES[name]


def name_of_index(index: dict) -> str:
    """The family of a model_index.json; a class padistill does not know is taken for an SDXL variant (an
    img2img pipeline saved from SDXL base loads as the SDXL pipeline)."""
    return FAMILIES.get(index.get("_class_name", ""), "sdxl")


def of_folder(folder: str | os.PathLike) -> ModuleType:
    return get(name_of_index(json.loads((Path(folder) / "model_index.json").read_text())))


def of_pipeline(pipe) -> ModuleType:
    """The module of a loaded pipeline's family."""
    return module(FAMILIES.get(type(pipe).__name__, "sdxl"))


def denoiser_dir(folder: str | os.PathLike) -> str:
    """The subfolder of a pipeline folder that holds its denoiser ("unet", or "transformer" for SD3)."""
    return of_folder(folder).DENOISER[0]


def check_stages(name: str, stages, denoiser: dict | None = None) -> None:
    """Stage settings a family does not support, said in one line: an SD3 student keeps predicting the
    velocity (no x0 conversion: `prediction_type: sample` refits a UNet's conv_out), its discriminator is
    the transformer's first blocks (no plain-CNN ablation; `disc_blocks` of them, 1 to its block count - 1:
    `denoiser` is its config), and a UNet's is its encoder half (no `disc_blocks`)."""
    if name != "sd3":
        for i, st in enumerate(stages):
            if st.disc_blocks is not None:
                raise ConfigError(f"stages[{i}].disc_blocks: for transformer families (sd3); a {name} discriminator "
                                  "copies the UNet's encoder half (remove the key)")
        return
    for i, st in enumerate(stages):
        if st.prediction_type == "sample":
            raise ConfigError(f"stages[{i}].prediction_type: 'sample' (the x0 conversion) is for UNet families; an "
                              "SD3 student predicts the velocity at every step count (remove the key)")
        if st.loss == "adversarial" and st.disc_backbone == "cnn":
            raise ConfigError(f"stages[{i}].disc_backbone: 'cnn' is for UNet families; an SD3 discriminator is "
                              "the transformer's first blocks ('trained' or 'frozen')")
        if st.disc_blocks is not None and denoiser is not None:
            from .discriminator import transformer_block_count

            try:
                transformer_block_count(int(denoiser["num_layers"]), st.disc_blocks)
            except ValueError as e:
                raise ConfigError(f"stages[{i}].disc_blocks: {e}") from None
