"""Model families (DESIGN, "Model families"): which one a pipeline folder is, and the module that says how
that family builds its toy, encodes prompts and forms its unconditional branch (`family_sdxl`,
`family_sd15`). The schedule, the denoiser call (`pipeline.schedule`) and the discriminator read the
rest from the models themselves."""

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
# the families a run distils; the SD3 module builds its toy and encodes prompts, its steps are not wired yet
SUPPORTED = ("sdxl", "sd15")


def module(name: str) -> ModuleType:
    """The module of any family padistill knows (it builds the SD3 toy and encodes its prompts too); a run
    asks `get`, which refuses a family it does not distil."""
    return MODULES[name] if name in MODULES else get(name)


def get(name: str) -> ModuleType:
    """The module of a family padistill distils (a one-line error for another)."""
    if name not in SUPPORTED:
        raise ConfigError(f"model.family: {name!r} is not distilled by padistill today (it distils "
                          f"{', '.join(SUPPORTED)}; the SD3 family is planned, issue 17)")
    return MODULES[name]


def name_of_index(index: dict) -> str:
    """The family of a model_index.json; a class padistill does not know is taken for an SDXL variant (an
    img2img pipeline saved from SDXL base loads as the SDXL pipeline)."""
    return FAMILIES.get(index.get("_class_name", ""), "sdxl")


def of_folder(folder: str | os.PathLike) -> ModuleType:
    return get(name_of_index(json.loads((Path(folder) / "model_index.json").read_text())))


def of_pipeline(pipe) -> ModuleType:
    """The module of a loaded pipeline's family (the SD3 one too: its prompts are encoded and sampled)."""
    return module(FAMILIES.get(type(pipe).__name__, "sdxl"))
