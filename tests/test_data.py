"""The embedded datasets as DESIGN fixes them: Fashion-MNIST from the Debian package (the digits are
checked in test_toy_teacher.py)."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch

from pipeline.config import RunConfig
from pipeline.data import FASHION, FASHION_MNIST_DIR, FASHION_NAMES, fashion_arrays, toy_dataset
from pipeline.errors import MissingInputError
from pipeline.sources import make_source


def _raw(part):
    with gzip.open(f"{FASHION_MNIST_DIR}/{part}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(f"{FASHION_MNIST_DIR}/{part}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return x, y


def test_fashion_images_are_the_photos_padded_to_32_with_their_class_captions():
    x, y = _raw("train")
    d = FASHION.load("train", limit=300)
    assert len(d) == 300 and d.images.shape == (300, 3, 32, 32)
    # 2 px of black (-1) on each side, the photo inside, the same in all three channels
    assert torch.all(d.images[:, :, :2] == -1) and torch.all(d.images[:, :, :, -2:] == -1)
    inner = (d.images[:, 0, 2:30, 2:30] + 1) * 127.5
    assert torch.allclose(inner, torch.from_numpy(x[:300].astype(np.float32)), atol=1e-3)
    assert torch.equal(d.images[:, 0], d.images[:, 2])
    assert list(d.labels) == list(y[:300])
    assert d.captions[0] == f"a photo of a {FASHION_NAMES[y[0]]}" and d.captions[0] == FASHION.caption_for(9)
    assert FASHION.caption_for(0) == "a photo of a t-shirt"


def test_fashion_splits_are_the_dataset_own_and_the_metrics_compare_with_t10k():
    train, held = fashion_arrays("train"), fashion_arrays("t10k")
    assert len(train[0]) == 60000 and len(held[0]) == 10000
    assert toy_dataset("fashion_mnist").reference_split == "heldout"
    h = FASHION.load("heldout", limit=5)
    assert torch.allclose((h.images[:, 0, 2:30, 2:30] + 1) * 127.5,
                          torch.from_numpy(_raw("t10k")[0][:5].astype(np.float32)), atol=1e-3)


def test_the_encode_source_reads_the_train_split_only(tmp_path):
    cfg = RunConfig.model_validate({"run_root": str(tmp_path / "r"), "data": {"kind": "fashion_mnist", "limit": 130}})
    assert cfg.data.toy
    src = make_source(cfg)
    units = src.units(64)
    assert [(u["start"], u["stop"]) for u in units] == [(0, 64), (64, 128), (128, 130)]
    dec = src.load(units[2])
    assert dec.ids == ["fashion-128", "fashion-129"] and dec.images.shape == (2, 3, 32, 32)
    assert src.describe()["split"] == "train" and src.describe()["kind"] == "fashion_mnist"


def test_a_missing_or_truncated_fashion_folder_is_one_clear_error(tmp_path):
    with pytest.raises(MissingInputError, match="apt-get install -y dataset-fashion-mnist"):
        FASHION.load("train", root=str(tmp_path))
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        shutil.copy(f"{FASHION_MNIST_DIR}/{name}", tmp_path / name)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz") as f:
        data = f.read()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:  # level 9: ~10 s
        f.write(data[:-100])
    with pytest.raises(MissingInputError, match="truncated"):
        FASHION.load("train", root=str(tmp_path))
    with pytest.raises(ValueError, match="model.resolution"):
        FASHION.load("heldout", resolution=64, limit=2)
