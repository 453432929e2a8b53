"""A corpus of bad and awkward inputs for `padistill encode` (issue 16, item 5).

Each row says what must become of it: decoded to a known 32x32 RGB picture (`expect` is a check on the
uint8 array the source produces), or skipped and counted under a reason. Files, not fixtures, so the
same corpus runs through the source alone (fast) and through the real encode job (Ray actors)."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pyarrow as pa

from pipeline.sources import (SKIP_EMPTY_CAPTION, SKIP_MISSING_IMAGE, SKIP_TOO_LARGE, SKIP_TOO_SMALL,
                              SKIP_UNDECODABLE, SKIP_UNDECODABLE_CAPTION)

RED, BLUE, GREEN = (220, 20, 20), (20, 20, 220), (20, 200, 20)
LONG_CAPTION = " ".join(["a very long caption about a striped shirt with a logo"] * 30)  # ~330 CLIP tokens


@dataclass
class Case:
    id: str
    image: Optional[bytes]
    caption: object  # str, bytes (a binary caption column) or None
    skip: Optional[str] = None  # the reason it is skipped under, or None: decoded
    expect: Optional[Callable[[np.ndarray], bool]] = None  # for decoded rows: a check on the HxWx3 uint8 array


def _save(im, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, mode: str = "RGB"):
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def _close(rgb, tol: int = 12) -> Callable[[np.ndarray], bool]:
    return lambda a: bool(np.abs(a.astype(int) - np.array(rgb)).max() <= tol)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int = 12_000) -> bytes:
    """A valid all-black 8-bit grey PNG of side x side pixels (144 M at 12,000): about 140 kB on disk,
    432 MB once decoded to RGB. Pillow only warns below 2 x Image.MAX_IMAGE_PIXELS; the source must
    refuse it from its header, before decoding."""
    comp, row, parts = zlib.compressobj(9), b"\0" * (side + 1), []
    for _ in range(side):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


def cases() -> list[Case]:
    from PIL import Image

    png = _save(_noise(64, 64), "PNG")
    jpeg = _save(_noise(64, 64), "JPEG", quality=90)
    # 16-bit grey: 40,000 of 65,535 is 155.6 of 255 (Pillow's convert("RGB") of mode I;16 clips it to 255)
    grey16 = _save(Image.fromarray(np.full((32, 32), 40_000, np.uint16)), "PNG")
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette(list(GREEN) + [0] * 765)
    # half transparent: the transparent half composites onto white, not onto its hidden RGB values
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = RED
    rgba[:, :16, 3] = 255
    la = Image.fromarray(np.stack([np.full((32, 32), 90, np.uint8), np.zeros((32, 32), np.uint8)], -1), "LA")
    pal_t = Image.new("P", (32, 32), 1)
    pal_t.putpalette(list(GREEN) + list(BLUE) + [0] * 762)
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): stored 64 wide x 32 high, left half red,
    # right half blue; displayed 32 x 64 with red on top, so its centre crop is red above blue
    rot = np.zeros((32, 64, 3), np.uint8)
    rot[:, :32], rot[:, 32:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _save(Image.fromarray(rot), "JPEG", quality=95, exif=exif.tobytes())

    def half_red_half_white(a):
        return _close(RED)(a[:, :15]) and _close((255, 255, 255))(a[:, 17:])

    def red_above_blue(a):
        return _close(RED, 30)(a[:14]) and _close(BLUE, 30)(a[18:])

    return [
        Case("good-png", _save(Image.new("RGB", (32, 32), RED), "PNG"), "a photo of a shirt", expect=_close(RED, 0)),
        Case("truncated-png", png[: len(png) // 2], "a photo of a bag", SKIP_UNDECODABLE),
        Case("truncated-jpeg", jpeg[: len(jpeg) // 2], "a photo of a bag", SKIP_UNDECODABLE),
        Case("zero-bytes", b"", "a photo of a bag", SKIP_MISSING_IMAGE),
        Case("no-image", None, "a photo of a bag", SKIP_MISSING_IMAGE),
        Case("cmyk-jpeg", _save(Image.new("RGB", (32, 32), BLUE).convert("CMYK"), "JPEG", quality=95),
             "a photo of a coat", expect=_close(BLUE)),
        Case("grey16-png", grey16, "a photo of a coat", expect=_close((156, 156, 156), 1)),
        Case("palette-png", _save(pal, "PNG"), "a photo of a dress", expect=_close(GREEN, 0)),
        Case("rgba-png", _save(Image.fromarray(rgba, "RGBA"), "PNG"), "a photo of a sandal",
             expect=half_red_half_white),
        Case("transparent-la-png", _save(la, "PNG"), "a photo of a sandal", expect=_close((255, 255, 255), 0)),
        Case("palette-transparency-png", _save(pal_t, "PNG", transparency=1), "a photo of a sandal",
             expect=_close((255, 255, 255), 0)),
        Case("grey-jpeg", _save(Image.new("L", (32, 32), 77), "JPEG", quality=95), "a photo of a sneaker",
             expect=_close((77, 77, 77), 2)),
        Case("exif-rotated-jpeg", rotated, "a photo of a sneaker", expect=red_above_blue),
        Case("one-by-one", _save(Image.new("RGB", (1, 1), RED), "PNG"), "a photo of a shirt", SKIP_TOO_SMALL),
        Case("decompression-bomb", bomb_png(), "a photo of a shirt", SKIP_TOO_LARGE),
        Case("html-named-jpg", b"<!DOCTYPE html><html><head><title>404 Not Found</title></head></html>",
             "a photo of a shirt", SKIP_UNDECODABLE),
        Case("empty-caption", _save(Image.new("RGB", (32, 32), RED), "PNG"), "", SKIP_EMPTY_CAPTION),
        Case("whitespace-caption", _save(Image.new("RGB", (32, 32), RED), "PNG"), " \t\n ", SKIP_EMPTY_CAPTION),
        Case("null-caption", _save(Image.new("RGB", (32, 32), RED), "PNG"), None, SKIP_EMPTY_CAPTION),
        Case("long-caption", _save(Image.new("RGB", (32, 32), GREEN), "PNG"), LONG_CAPTION, expect=_close(GREEN, 0)),
    ]


def binary_caption_cases() -> list[Case]:
    """A caption column stored as bytes (binary): UTF-8 decodes, anything else is skipped."""
    from PIL import Image

    img = _save(Image.new("RGB", (32, 32), BLUE), "PNG")
    return [
        Case("utf8-bytes-caption", img, "a photo of a bag \u2013 caf\u00e9".encode(), expect=_close(BLUE, 0)),
        Case("latin1-bytes-caption", img, "a photo of a caf\u00e9 bag".encode("latin-1"), SKIP_UNDECODABLE_CAPTION),
        Case("garbage-bytes-caption", img, b"\xff\xfe\x00\x81 not text", SKIP_UNDECODABLE_CAPTION),
    ]


def table(rows: list[Case], caption_type=pa.string()) -> pa.Table:
    schema = pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("caption", caption_type)])
    return pa.table({"key": [c.id for c in rows], "jpg": [c.image for c in rows],
                     "caption": [c.caption for c in rows]}, schema=schema)


def expected_skips(rows: list[Case]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in rows:
        if c.skip:
            out[c.skip] = out.get(c.skip, 0) + 1
    return out
