"""CIFAR-10 loading: both layouts, and the md5 check naming the bad file."""
import pickle

import numpy as np
import pytest

from engine.data import cifar10 as data
from tests.conftest import cifar_root, needs_cifar


@needs_cifar
def test_real_test_split_loads_with_md5_check():
    x, y = data.load_cifar10("test", cifar_root())
    assert x.shape == (10000, 3, 32, 32) and x.dtype.is_floating_point is False
    assert y.shape == (10000,) and int(y.min()) == 0 and int(y.max()) == 9
    assert np.bincount(y.numpy()).tolist() == [1000] * 10


@needs_cifar
def test_corrupt_batch_is_named(tmp_path):
    src = data.find_layout(data.resolve_root(cifar_root()))[0]
    dst = tmp_path / "cifar-10-batches-bin"
    dst.mkdir()
    payload = bytearray((src / "test_batch.bin").read_bytes())
    payload[100] ^= 1
    (dst / "test_batch.bin").write_bytes(bytes(payload))
    with pytest.raises(data.DataError, match="test_batch.bin is corrupt"):
        data.load_cifar10("test", tmp_path)


def test_missing_file_and_missing_root_are_clear(tmp_path, monkeypatch):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(data.DataError, match="file missing: .*test_batch"):
        data.load_cifar10("test", tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataError, match="no CIFAR-10 batches"):
        data.load_cifar10("test", empty)
    monkeypatch.delenv("CIFAR10_ROOT", raising=False)
    with pytest.raises(data.DataError, match="CIFAR10_ROOT"):
        data.load_cifar10("test")


def test_python_layout_is_read_when_its_md5_matches(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": images, b"labels": [4, 7]}, f)
    monkeypatch.setitem(data.PYTHON_MD5, "test_batch", data.md5sum(folder / "test_batch"))
    x, y = data.load_cifar10("test", tmp_path)
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [4, 7]
    assert x[1, 2, 31, 31] == images[1, 3071]
