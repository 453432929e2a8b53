"""Image conversions (float [-1, 1] <-> uint8) and the PNG grids of a run's samples."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch


def to_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, 3, H, W] (what FID and CLIP score read)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float [N, 3, H, W] in [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> [N, H, W, 3] uint8 (images to save)."""
    return to_uint8_nchw(images).permute(0, 2, 3, 1).numpy()


LABEL_WIDTH = 16  # characters per line of a row's name in `save_grid`


def grid_figure(rows: list[torch.Tensor], row_labels: Optional[list[str]] = None,
                col_labels: Optional[list[str]] = None):
    """The matplotlib figure of `save_grid` and its axes ([row][column]): each entry of `rows` is
    [C, 3, H, W] (e.g. digits 0-9); columns titled by `col_labels` (default their index); rows named by
    `row_labels`, written level and wrapped at `LABEL_WIDTH` characters to the left of the row (a rotated
    name longer than its row ran into the next)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nr, nc = len(rows), max(len(r) for r in rows)
    names = ["\n".join(textwrap.fill(line, LABEL_WIDTH) for line in x.splitlines()) for x in row_labels] \
        if row_labels else None  # each of a name's own lines wrapped on its own
    label_in = 0.2 + 0.075 * max((len(line) for x in names for line in x.splitlines()), default=0) if names else 0.0
    fig, axes = plt.subplots(nr, nc, figsize=(nc * 0.9 + label_in, nr * 0.95), squeeze=False)
    for i, r in enumerate(rows):
        imgs = to_uint8(r)
        for j in range(nc):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(imgs):
                ax.imshow(imgs[j], interpolation="nearest")
            if i == 0:
                ax.set_title(col_labels[j] if col_labels else str(j), fontsize=9)
            if j == 0 and names:
                ax.set_ylabel(names[i], fontsize=9, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.2)
    return fig, axes


def save_grid(rows: list[torch.Tensor], path, row_labels: Optional[list[str]] = None, scale: int = 3,
              col_labels: Optional[list[str]] = None) -> None:
    """A PNG grid of `rows` (`grid_figure`), upscaled `scale`x."""
    fig, _ = grid_figure(rows, row_labels, col_labels)
    import matplotlib.pyplot as plt  # after grid_figure chose the Agg backend
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=40 * scale)
    plt.close(fig)
