"""Data sources for `padistill encode`: where images and captions come from.

A source is split into deterministic *units* (fixed row ranges, in a fixed order), so the encode step
can commit each unit on its own and a rerun redoes only the units that are missing. A unit loads as
`Decoded`: the rows that are usable, as float images in [-1, 1] at the run's resolution, plus the
rows that were skipped, counted by reason (nothing is dropped silently).

Two kinds (`data.kind` in the config):

- `toy_digits`, `fashion_mnist`: the embedded datasets exactly as `pipeline.data` defines them (their
  train split).
- `parquet`: a folder (or one file) of Parquet with an image-bytes column and a caption column, local
  or `s3://` (the usual layout of LAION / COYO subsets; an image cell may be raw bytes or a
  `{"bytes": …}` struct as Hugging Face datasets write it). Images are decoded with PIL, converted to
  RGB, resized so the shorter side equals the resolution (bicubic) and centre-cropped to a square.
"""

from __future__ import annotations

import io
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .config import DEFAULT_MAX_IMAGE_PIXELS, RunConfig
from .errors import ConfigError, MissingInputError

# Reasons a source row is skipped (the keys of the encode manifest's `skipped`).
SKIP_MISSING_IMAGE = "missing_image"
SKIP_UNDECODABLE = "undecodable_image"
SKIP_TOO_SMALL = "image_too_small"
SKIP_TOO_LARGE = "image_too_large"  # more pixels than data.max_image_pixels (a decompression bomb, or a scan)
SKIP_EMPTY_CAPTION = "empty_caption"
SKIP_UNDECODABLE_CAPTION = "undecodable_caption"  # a binary caption cell that is not UTF-8
SKIP_REASONS = (SKIP_MISSING_IMAGE, SKIP_UNDECODABLE, SKIP_TOO_SMALL, SKIP_TOO_LARGE, SKIP_EMPTY_CAPTION,
                SKIP_UNDECODABLE_CAPTION)


@dataclass
class Decoded:
    ids: list[str]
    captions: list[str]
    images: torch.Tensor  # [N, 3, R, R] float32 in [-1, 1]
    skipped: Counter = field(default_factory=Counter)
    skipped_ids: list[tuple[str, str]] = field(default_factory=list)  # (id, reason), for logs


def preprocess_image(data: bytes, resolution: int,
                     max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[np.ndarray | None, str | None]:
    """Decode image bytes, resize (shorter side = resolution, bicubic) and centre-crop.
    Returns (HxWx3 uint8 array, None) or (None, skip reason). Images smaller than the resolution are
    skipped rather than upsampled; images of more than `max_pixels` pixels are skipped from their header,
    before anything is decoded. See `to_rgb` for the colour conversions."""
    import warnings

    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():  # Pillow's bomb warning: the limit below is ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            if im.size[0] * im.size[1] > max_pixels:
                return None, SKIP_TOO_LARGE
            im.load()
            im = to_rgb(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError:  # Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS), if it is lower
        return None, SKIP_TOO_LARGE
    except Exception:
        return None, SKIP_UNDECODABLE
    w, h = im.size
    if min(w, h) < resolution:
        return None, SKIP_TOO_SMALL
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    return np.asarray(im, dtype=np.uint8), None


def to_rgb(im):
    """An opened PIL image as 8-bit RGB: 16-bit grey (and 32-bit integer "I", read as 16-bit) scaled to
    8 bits (Pillow's convert clips it to white),
    transparency composited onto white (not onto the hidden colour of transparent pixels), CMYK, palette
    and grey converted by Pillow."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.clip(np.asarray(im).astype(np.float64), 0, 65535)  # "I": 16-bit PNGs in older Pillow
        return Image.fromarray(np.round(a / 257.0).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def caption_text(cell) -> tuple[str | None, str | None]:
    """(stripped caption, None) or (None, skip reason) for one caption cell: a string, or bytes from a
    binary column (UTF-8, else skipped)."""
    if isinstance(cell, (bytes, bytearray, memoryview)):
        try:
            cell = bytes(cell).decode("utf-8")
        except UnicodeDecodeError:
            return None, SKIP_UNDECODABLE_CAPTION
    if cell is None or not str(cell).strip():
        return None, SKIP_EMPTY_CAPTION
    return str(cell).strip(), None


def _to_model_range(arrays: list[np.ndarray], resolution: int) -> torch.Tensor:
    if not arrays:
        return torch.zeros(0, 3, resolution, resolution)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32)
    return x / 127.5 - 1.0


class Source:
    """A data source split into deterministic units of at most `rows_per_unit` source rows."""

    kind = "?"

    def describe(self) -> dict:  # what identifies the source's content (goes into the inputs hash)
        raise NotImplementedError

    def units(self, rows_per_unit: int) -> list[dict]:
        raise NotImplementedError

    def load(self, unit: dict) -> Decoded:
        raise NotImplementedError


class ToySource(Source):
    """The train split of an embedded dataset (`pipeline.data`)."""

    def __init__(self, cfg: RunConfig):
        self.kind = cfg.data.kind
        self.resolution = cfg.model.resolution
        self.data = cfg.data
        self._rows = None

    def _all(self):
        if self._rows is None:
            from .data import toy_dataset

            self._rows = toy_dataset(self.kind).load("train", self.resolution, self.data.holdout_fraction,
                                                       self.data.seed, self.data.limit, root=self.data.path)
        return self._rows

    def describe(self) -> dict:
        out = {"kind": self.kind, "split": "train", "holdout_fraction": self.data.holdout_fraction,
               "seed": self.data.seed, "limit": self.data.limit, "resolution": self.resolution}
        if self.kind != "toy_digits":  # the digits' description stays as before (it is in manifests' hashes)
            out.pop("holdout_fraction")
            out.pop("seed")
        return out


    def units(self, rows_per_unit: int) -> list[dict]:
        n = len(self._all())
        return [{"start": s, "stop": min(n, s + rows_per_unit)} for s in range(0, n, rows_per_unit)]

    def load(self, unit: dict) -> Decoded:
        d = self._all()
        s, e = unit["start"], unit["stop"]
        return Decoded(ids=d.ids[s:e], captions=d.captions[s:e], images=d.images[s:e].clone())


def check_columns(d, schema, path: str) -> None:
    """The configured columns exist in `schema` with usable types, else a ConfigError naming the key:
    images as bytes (binary, or a struct with a `bytes` field as Hugging Face datasets write it),
    captions as strings or bytes (UTF-8); ids of any type."""
    import pyarrow as pa

    def is_bytes(t):
        return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)

    def is_text(t):
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or is_bytes(t)

    for key, col in (("data.image_column", d.image_column), ("data.caption_column", d.caption_column),
                     ("data.id_column", d.id_column)):
        if col and col not in schema.names:
            raise ConfigError(f"{key}: column {col!r} is not in {path} (its columns: {', '.join(schema.names)})")
    img = schema.field(d.image_column).type
    if not (is_bytes(img) or (pa.types.is_struct(img) and img.get_field_index("bytes") >= 0
                              and is_bytes(img.field("bytes").type))):
        raise ConfigError(f"data.image_column: column {d.image_column!r} of {path} is {img}, not image bytes "
                          "(binary, or a struct with a 'bytes' field)")
    cap = schema.field(d.caption_column).type
    if not is_text(cap):
        raise ConfigError(f"data.caption_column: column {d.caption_column!r} of {path} is {cap}, not text "
                          "(string, or UTF-8 bytes)")


class ParquetImageSource(Source):
    """Parquet files with image bytes + captions (local or s3://, same endpoint as the run root)."""

    kind = "parquet"

    def __init__(self, cfg: RunConfig):
        from .storage import _split, arrow_filesystem_for, filesystem_for

        self.cfg = cfg
        self.uri = cfg.data.path
        self.fs = filesystem_for(self.uri, cfg.storage)
        self.arrow_fs = arrow_filesystem_for(self.uri, cfg.storage)
        self.base = _split(self.uri)[1]
        self.resolution = cfg.model.resolution
        self._files: list[tuple[str, int]] | None = None
        self._open: dict[str, Any] = {}

    def files(self) -> list[tuple[str, int]]:
        """(path, rows) of every Parquet file, sorted by path; `data.limit` keeps the first rows."""
        import pyarrow.parquet as pq

        if self._files is None:
            if self.fs.isdir(self.base):
                paths = sorted(p for p in self.fs.find(self.base) if p.endswith(".parquet")
                               and not posixpath.basename(p).startswith((".", "_")))
            elif self.fs.exists(self.base):
                paths = [self.base]
            else:
                raise MissingInputError(f"data.path: {self.uri} does not exist")
            if not paths:
                raise MissingInputError(f"data.path: no Parquet files under {self.uri}")
            out, left = [], self.cfg.data.limit
            for p in paths:
                pf = pq.ParquetFile(p, filesystem=self.arrow_fs)
                check_columns(self.cfg.data, pf.schema_arrow, p)
                n = pf.metadata.num_rows
                if left is not None:
                    n = min(n, left)
                    left -= n
                if n:
                    out.append((p, n))
                if left == 0:
                    break
            self._files = out
        return self._files

    def describe(self) -> dict:
        info = []
        for p, n in self.files():
            st = self.fs.info(p)
            info.append([posixpath.relpath(p, self.base) if p != self.base else posixpath.basename(p), n,
                         st.get("size"), str(st.get("ETag") or st.get("mtime") or "")])
        d = self.cfg.data
        return {"kind": self.kind, "path": self.uri, "files": info, "image_column": d.image_column,
                "caption_column": d.caption_column, "id_column": d.id_column, "limit": d.limit,
                "max_image_pixels": d.max_image_pixels, "resolution": self.resolution}

    def units(self, rows_per_unit: int) -> list[dict]:
        out = []
        for p, n in self.files():
            out += [{"file": p, "start": s, "stop": min(n, s + rows_per_unit)} for s in range(0, n, rows_per_unit)]
        return out

    def _read_rows(self, path: str, start: int, stop: int):
        """Rows [start, stop) of one file, reading only the row groups that hold them."""
        import pyarrow.parquet as pq

        pf = self._open.get(path)
        if pf is None:
            self._open = {path: pq.ParquetFile(path, filesystem=self.arrow_fs)}  # keep one file open
            pf = self._open[path]
        d = self.cfg.data
        cols = [d.image_column, d.caption_column] + ([d.id_column] if d.id_column else [])
        from .shards import read_rows

        return read_rows(pf, start, stop, cols)

    def load(self, unit: dict) -> Decoded:
        d = self.cfg.data
        path, start, stop = unit["file"], unit["start"], unit["stop"]
        table = self._read_rows(path, start, stop)
        rel = posixpath.relpath(path, self.base) if path != self.base else posixpath.basename(path)
        images = table.column(d.image_column).to_pylist()
        captions = table.column(d.caption_column).to_pylist()
        ids = (table.column(d.id_column).to_pylist() if d.id_column
               else [f"{rel}:{start + i}" for i in range(len(images))])
        out = Decoded(ids=[], captions=[], images=torch.zeros(0))
        arrays = []
        for rid, img, cap in zip(ids, images, captions):
            rid = str(rid)
            if isinstance(img, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
                img = img.get("bytes")
            cap, reason = caption_text(cap)
            if reason is None:
                if img is None or len(img) == 0:
                    reason = SKIP_MISSING_IMAGE
                else:
                    arr, reason = preprocess_image(img, self.resolution, d.max_image_pixels)
            if reason:
                out.skipped[reason] += 1
                out.skipped_ids.append((rid, reason))
                continue
            arrays.append(arr)
            out.ids.append(rid)
            out.captions.append(cap)
        out.images = _to_model_range(arrays, self.resolution)
        return out


def make_source(cfg: RunConfig) -> Source:
    if cfg.data.toy:
        return ToySource(cfg)
    if cfg.data.kind == "parquet":
        return ParquetImageSource(cfg)
    raise ValueError(f"data.kind: unknown source {cfg.data.kind!r}")
