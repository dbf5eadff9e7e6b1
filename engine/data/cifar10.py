"""CIFAR-10 in its official layouts, md5-checked.

Two layouts are read: the official binary version (``cifar-10-batches-bin``, what ``../shared/data/cifar10`` holds)
and the python version that ``torchvision.datasets.CIFAR10(download=True)`` fetches (``cifar-10-batches-py``).
Images come back as uint8 tensors N×3×32×32 and labels as int64 tensors N; callers scale to [0, 1] themselves so
that a whole split stays 150 MB rather than 600 MB.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import torch

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The sums published with the official archives (binary: cifar-10-binary.tar.gz; python: the torchvision list).
BINARY_MD5 = {
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}
PYTHON_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
LAYOUTS = {"cifar-10-batches-bin": BINARY_MD5, "cifar-10-batches-py": PYTHON_MD5}


class DataError(RuntimeError):
    """The data set is missing, incomplete or corrupt; the message names what and where."""


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding one of the CIFAR-10 layouts: ``root``, else ``$CIFAR10_ROOT``."""
    if root is None:
        root = os.environ.get("CIFAR10_ROOT")
    if not root:
        raise DataError("no CIFAR-10 location: pass --data DIR or set CIFAR10_ROOT "
                        "(a folder holding cifar-10-batches-bin or cifar-10-batches-py)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"CIFAR-10 folder {root} does not exist")
    return root


def find_layout(root: Path) -> tuple[Path, dict[str, str]]:
    """The batch folder inside ``root`` (or ``root`` itself) and the md5 table of its layout."""
    for name, sums in LAYOUTS.items():
        for folder in (root / name, root):
            if folder.name == name and folder.is_dir():
                return folder, sums
    raise DataError(f"no CIFAR-10 batches under {root}: expected {' or '.join(LAYOUTS)} "
                    "with data_batch_1..5 and test_batch")


_verified: dict[tuple[str, int, float], str] = {}


def md5sum(path: Path) -> str:
    """md5 of a file, remembered per (path, size, mtime) so one process hashes each file once."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime)
    if key not in _verified:
        digest = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _verified[key] = digest.hexdigest()
    return _verified[key]


def check_md5(path: Path, expected: str) -> None:
    if not path.exists():
        raise DataError(f"CIFAR-10 file missing: {path}")
    actual = md5sum(path)
    if actual != expected:
        raise DataError(f"CIFAR-10 file {path} is corrupt or not the official one: md5 {actual}, expected {expected}")


def _read_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    records = np.fromfile(path, np.uint8).reshape(-1, 3073)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def _read_python(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # The official python batches are pickles; md5 was checked before this runs, so the file is the published one.
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    return np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"], np.int64)


def load_cifar10(split: str = "train", root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 ``split`` ("train": 50,000 images, "test": 10,000) as (uint8 N×3×32×32, int64 N), md5-checked."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    folder, sums = find_layout(resolve_root(root))
    names = [n for n in sums if n.startswith("test" if split == "test" else "data")]
    reader = _read_binary if sums is BINARY_MD5 else _read_python
    images, labels = [], []
    for name in sorted(names):
        check_md5(folder / name, sums[name])
        x, y = reader(folder / name)
        images.append(x)
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def dataset_md5(root: str | os.PathLike | None = None) -> dict[str, str]:
    """The md5 of each batch file, for training manifests."""
    folder, sums = find_layout(resolve_root(root))
    return {name: md5sum(folder / name) for name in sorted(sums)}
