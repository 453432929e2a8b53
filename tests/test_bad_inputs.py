"""The bad-input corpus (tests/bad_inputs.py) through the Parquet source: every row is decoded to the
picture it shows or skipped under its reason, and a column that is missing or of the wrong type stops the
step before any work with one line naming the config key. The same corpus runs through the real encode
job (Ray actors) in test_encode.py."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bad_inputs import binary_caption_cases, cases, expected_skips, table
from pipeline import encode as enc
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.sources import make_source
from reliability import record


def _config(tmp_path, *extra):
    return load_config("smoke", [f"run_root={tmp_path}/run", "data.kind=parquet", f"data.path={tmp_path}/src",
                                 "data.image_column=jpg", "data.id_column=key", *extra])


def test_every_corpus_row_is_decoded_to_its_picture_or_skipped_under_its_reason(tmp_path, request):
    rows, brows = cases(), binary_caption_cases()
    (tmp_path / "src").mkdir()
    pq.write_table(table(rows), tmp_path / "src" / "a.parquet", row_group_size=4)
    pq.write_table(table(brows, pa.binary()), tmp_path / "src" / "b.parquet")
    src = make_source(_config(tmp_path))
    decoded, skipped, reasons, n_out = {}, {}, {}, 0
    for unit in src.units(7):
        d = src.load(unit)
        imgs = ((d.images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        n_out += len(d.ids)
        for rid, cap, im in zip(d.ids, d.captions, imgs):
            decoded[rid] = (cap, im.permute(1, 2, 0).numpy())
        for k, v in d.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
        reasons.update(dict(d.skipped_ids))
    every = rows + brows
    assert skipped == expected_skips(every)
    for c in every:
        if c.skip:
            assert reasons.get(c.id) == c.skip, (c.id, reasons.get(c.id))
            continue
        assert c.id in decoded, f"{c.id} was skipped as {reasons.get(c.id)}"
        cap, arr = decoded[c.id]
        assert arr.shape == (32, 32, 3)
        assert c.expect(arr), (c.id, arr[::8, ::8].tolist())
        want = c.caption.decode() if isinstance(c.caption, bytes) else c.caption
        assert cap == want.strip()
    bad = [c for c in every if c.skip]
    record(request, f"the bad-input corpus through the Parquet source: {len(bad)} bad rows ("
           + ", ".join(c.id for c in bad) + ")", "each skipped and counted under its reason: "
           + ", ".join(f"`{k}` {v}" for k, v in sorted(expected_skips(every).items())), injected=len(bad),
           completed=1, rows_lost=sum(c.id not in decoded for c in every if not c.skip),
           duplicates=n_out - len(decoded))
    odd = [c for c in every if not c.skip]
    record(request, f"awkward but valid inputs in the same corpus: {len(odd)} rows (" + ", ".join(c.id for c in odd)
           + ")", "decoded to the picture a viewer shows (EXIF rotation applied, transparency on white, 16-bit "
           "scaled, CMYK/palette/grey converted), checked pixel by pixel", injected=len(odd), completed=1)


@pytest.mark.parametrize("change, key, words", [
    ("data.caption_column=text", "data.caption_column", "'text' is not in"),
    ("data.id_column=uid", "data.id_column", "'uid' is not in"),
    ("data.image_column=key", "data.image_column", "is string, not image bytes"),
    ("data.caption_column=n", "data.caption_column", "is int64, not text"),
])
def test_a_missing_or_mistyped_column_is_one_line_naming_the_key_before_any_work(tmp_path, change, key, words,
                                                                                request):
    (tmp_path / "src").mkdir()
    t = table(cases()[:2]).append_column("n", pa.array([1, 2], pa.int64()))
    pq.write_table(t, tmp_path / "src" / "a.parquet")
    with pytest.raises(ConfigError) as e:
        enc.run_encode(_config(tmp_path, change), log=lambda *_: None)
    msg = str(e.value)
    assert msg.startswith(f"{key}: ") and words in msg and "a.parquet" in msg and "\n" not in msg
    assert not (tmp_path / "run" / "encoded").exists()  # stopped before it wrote anything
    record(request, "a missing caption or id column, string images, integer captions",
           "stops before any work with one line naming the `data.*_column` key, the file and its columns or type",
           injected=1, completed=0)


def test_the_pixel_limit_is_a_config_key(tmp_path):
    (tmp_path / "src").mkdir()
    pq.write_table(table(cases()[:1]), tmp_path / "src" / "a.parquet")  # a 32x32 picture: 1,024 pixels
    for limit, want in ((1024, {}), (1023, {"image_too_large": 1})):
        src = make_source(_config(tmp_path, f"data.max_image_pixels={limit}"))
        assert dict(src.load(src.units(8)[0]).skipped) == want
