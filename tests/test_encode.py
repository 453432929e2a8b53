"""`padistill encode`: Ray Data actors turn images + captions into latents and embeddings, on a local
root and on S3 (moto), skipping bad rows by reason, restartable per unit."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import encode as enc
from pipeline.config import load_config
from pipeline.sources import SKIP_EMPTY_CAPTION, SKIP_MISSING_IMAGE, SKIP_TOO_SMALL, SKIP_UNDECODABLE, preprocess_image
from pipeline.storage import RunStorage, table_to_tensors


def _png(w: int, h: int, rgb=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), rgb).save(buf, format="PNG")
    return buf.getvalue()


def bad_rows_source_tables() -> tuple[list[pa.Table], set[str], dict[str, int]]:
    """Two Parquet tables in the LAION/COYO layout (key, jpg bytes, caption) with bad rows.
    Returns (tables, good ids, expected skip counts)."""
    rows = [
        ("good-0", _png(32, 32), "a handwritten digit one"),
        ("good-1", _png(48, 40), "a handwritten digit two"),  # resized + centre-cropped
        ("corrupt", b"\x89PNG\r\n\x1a\n this is not an image", "a handwritten digit three"),
        ("empty-caption", _png(32, 32), "   "),
        ("good-2", _png(64, 32, (10, 10, 240)), "a handwritten digit four"),
        ("too-small", _png(16, 16), "a handwritten digit five"),
        ("no-caption", _png(32, 32), None),
        ("no-image", None, "a handwritten digit six"),
        ("good-3", _png(33, 70), "a handwritten digit seven"),
        ("good-4", _png(32, 32, (0, 255, 0)), "a handwritten digit eight"),
    ]
    cols = list(zip(*rows))
    schema = pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("caption", pa.string())])
    t = pa.table({"key": cols[0], "jpg": cols[1], "caption": cols[2]}, schema=schema)
    expected = {SKIP_UNDECODABLE: 1, SKIP_EMPTY_CAPTION: 2, SKIP_TOO_SMALL: 1, SKIP_MISSING_IMAGE: 1}
    return [t.slice(0, 6), t.slice(6)], {"good-0", "good-1", "good-2", "good-3", "good-4"}, expected


def write_source(tables, fs_path: str, filesystem=None) -> None:
    for i, t in enumerate(tables):
        pq.write_table(t, f"{fs_path}/part-{i}.parquet", filesystem=filesystem, row_group_size=3)


def test_preprocess_resizes_and_centre_crops():
    from PIL import Image

    im = Image.new("RGB", (128, 64), (255, 0, 0))  # red sides, blue centre half
    im.paste((0, 0, 255), (32, 0, 96, 64))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    arr, reason = preprocess_image(buf.getvalue(), 32)
    assert reason is None and arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    # shorter side 64 -> 32 (128x64 -> 64x32), the centre 32 columns are the blue half
    assert arr[:, 2:-2, 2].min() > 200 and arr[:, 2:-2, 0].max() < 60
    assert preprocess_image(b"garbage", 32) == (None, SKIP_UNDECODABLE)
    small = io.BytesIO()
    Image.new("RGB", (40, 31)).save(small, format="PNG")
    assert preprocess_image(small.getvalue(), 32) == (None, SKIP_TOO_SMALL)


def test_encode_digits_local(ray_local, tmp_path):
    from pipeline.data import load_digits
    from pipeline.zoo import load_pipeline

    cfg = load_config("smoke", [f"run_root={tmp_path}/run", "encode.max_rows_per_file=24"])
    m = enc.run_encode(cfg)
    st = RunStorage.from_config(cfg)
    out = m["outputs"]
    assert out["rows"] == 64 and [f["rows"] for f in out["files"]] == [24, 24, 16]
    assert m["skipped"] == {} and m["source_rows"] == 64 and out["bytes_per_row"] > 0
    table = st.read_table("encoded")
    assert table.column_names == ["id", "caption", "latent", "prompt_embeds", "pooled_embeds", "schema_version"]
    assert table.schema.field("id").type == pa.string() and table.schema.field("schema_version").type == pa.int32()
    cols = table_to_tensors(table)
    assert cols["latent"].shape == (64, 4, 8, 8) and cols["latent"].dtype == np.float16
    assert cols["prompt_embeds"].shape == (64, 16, 96) and cols["pooled_embeds"].shape == (64, 32)
    assert set(cols["schema_version"]) == {enc.SCHEMA_VERSION}
    digits = load_digits("train", 32, limit=64)
    assert sorted(cols["id"]) == sorted(digits.ids)
    assert out["raw_tensor_bytes_per_row"] == (4 * 8 * 8 + 16 * 96 + 32) * 2

    # the stored latent / embeddings are the pipeline's (posterior mean * scaling factor), to fp16
    pipe = load_pipeline("builtin:tiny_random")
    i = list(cols["id"]).index(digits.ids[5])
    ref = enc.encode_batch(pipe, digits.images[5:6], digits.captions[5:6], 32)
    np.testing.assert_allclose(cols["latent"][i].astype(np.float32), ref["latent"][0].numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(cols["prompt_embeds"][i].astype(np.float32), ref["prompt_embeds"][0].numpy(),
                               atol=2e-3, rtol=2e-3)
    assert cols["caption"][i] == digits.captions[5]

    # finished: a rerun is skipped
    assert enc.run_encode(cfg)["finished_at"] == m["finished_at"]
    # a lost unit (file + marker) and a lost manifest: the rerun redoes only that unit
    st.rm("encoded/part-00001.parquet")
    st.rm("encoded/_shards/00001.json")
    st.invalidate(enc.STEP)
    m2 = enc.run_encode(cfg)
    assert m2["units_run"] == 1 and m2["outputs"]["rows"] == 64
    t2 = st.read_table("encoded")
    assert sorted(t2.column("id").to_pylist()) == sorted(digits.ids)


def test_encode_parquet_bad_input_corpus_decoded_or_counted_by_reason(ray_local, tmp_path, request):
    """The whole bad-input corpus (tests/bad_inputs.py) through the real job: no actor crashes, each bad
    row is counted under its reason, each awkward one (16-bit, CMYK, alpha, EXIF-rotated, a caption
    past CLIP's 77 tokens, UTF-8 bytes) is encoded."""
    import torch

    from bad_inputs import LONG_CAPTION, binary_caption_cases, cases, expected_skips, table

    rows, brows = cases(), binary_caption_cases()
    (tmp_path / "src").mkdir()
    t = table(rows)
    write_source([t.slice(0, 12), t.slice(12)], str(tmp_path / "src"))
    pq.write_table(table(brows, pa.binary()), tmp_path / "src" / "part-2.parquet")
    cfg = load_config("smoke", [f"run_root={tmp_path}/run", "data.kind=parquet", f"data.path={tmp_path}/src",
                                "data.image_column=jpg", "data.id_column=key", "encode.max_rows_per_file=8"])
    m = enc.run_encode(cfg)
    good = {c.id for c in rows + brows if not c.skip}
    assert m["skipped"] == expected_skips(rows + brows)
    assert m["outputs"]["rows"] == len(good) and m["source_rows"] == len(rows) + len(brows)
    # units never span files: 12 rows -> 8 + 4, 8 rows -> 8, 3 rows -> 3
    assert len(m["outputs"]["files"]) == 4
    out = RunStorage.from_config(cfg).read_table("encoded")
    ids = out.column("id").to_pylist()
    assert set(ids) == good
    emb = table_to_tensors(out, ["prompt_embeds", "latent"])
    assert emb["latent"].shape == (len(good), 4, 8, 8) and np.isfinite(emb["latent"]).all()
    # the long caption is kept whole in the row and encoded as CLIP reads it: its first tokens only
    i = ids.index("long-caption")
    assert out.column("caption")[i].as_py() == LONG_CAPTION
    from pipeline.zoo import load_pipeline

    pipe = load_pipeline(cfg.model.source)
    assert len(pipe.tokenizer(LONG_CAPTION).input_ids) > 2 * pipe.tokenizer.model_max_length
    other_tail = LONG_CAPTION + " and then a completely different ending about trousers"
    ref = enc.encode_batch(pipe, torch.zeros(1, 3, 32, 32), [other_tail], 32)["prompt_embeds"][0]
    np.testing.assert_allclose(emb["prompt_embeds"][i].astype(np.float32), ref.float().numpy(), atol=2e-3, rtol=2e-3)
    from reliability import record

    record(request, f"the bad-input corpus through the real `encode` job (Ray Data actors): "
           f"{sum(1 for c in rows + brows if c.skip)} bad rows, {len(good)} decodable ones",
           "no actor crashes; the manifest counts " + ", ".join(f"`{k}` {v}" for k, v in sorted(m["skipped"].items()))
           + "; the long caption is kept whole and encoded as "
           "CLIP reads it", injected=len(rows) + len(brows), completed=1,
           rows_lost=len(good - set(ids)), duplicates=len(ids) - len(set(ids)))


def test_encode_on_s3(ray_local, s3_endpoint, tmp_path):
    """Source and run root on S3 (moto), through the `padistill encode` entry point on the session's Ray
    (whose workers hold the session's AWS credentials, as a cluster's nodes would)."""
    from jobs.cli import main

    import s3fs

    tables, good, expected = bad_rows_source_tables()
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    for i, t in enumerate(tables):
        with fs.open(f"padistill-test/src-enc/part-{i}.parquet", "wb") as f:
            pq.write_table(t, f, row_group_size=3)
    assert main(["encode", "--config", "smoke", "--set", "run_root=s3://padistill-test/enc-run",
                 "--set", f"storage.endpoint_url={s3_endpoint}", "--set", "data.kind=parquet",
                 "--set", "data.path=s3://padistill-test/src-enc", "--set", "data.image_column=jpg",
                 "--set", "data.id_column=key"]) == 0
    cfg = load_config("smoke", ["run_root=s3://padistill-test/enc-run", f"storage.endpoint_url={s3_endpoint}"])
    st = RunStorage.from_config(cfg)
    m = st.read_manifest(enc.STEP)
    assert m["skipped"] == expected and m["outputs"]["rows"] == len(good)
    assert set(st.read_table("encoded").column("id").to_pylist()) == good
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(m)  # no credentials in the manifest
