"""Training and evaluation data at a working size S: CIFAR-10 (engine/data/cifar10.py) or a folder of the user's own
images.

``--data cifar10`` (or no ``--data``) reads CIFAR-10 from ``$CIFAR10_ROOT``, as always (S must be 32). Any other
``--data DIR`` is a folder of images, searched recursively:

- the first-level subfolders are the classes (sorted folder names; readable names where the data set gives them,
  as Imagenette's WordNet ids); images at the top level have no class (label -1: the SSL tasks take them, a
  classifier does not);
- splits: ``DIR/train`` and ``DIR/val`` (or ``DIR/test``) where both exist, else a fixed tenth of the files (by a
  hash of their path, so the split never changes when files are added) is held out as the test split;
- every image is read as the repair reads it (runtime.imageio.read_image: greyscale, palette, alpha, CMYK, 16-bit
  and EXIF-rotated images converted, centre-cropped to a square, resized bicubic to S), so a network sees in
  training what it sees in front of a user; a file that cannot be decoded is skipped and named in ``skipped``;
- decoded once, then cached as uint8 (``$MSSL_REPAIR_CACHE``, default ``~/.cache/mssl-repair``; the export cache's
  folder) under a key of the file list, their sizes and mtimes and S: an epoch, or the next command, never decodes a
  JPEG again.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from runtime.files import atomic_write
from runtime.imageio import METADATA_FILES, ImageError, is_image_name, list_files, read_image

from .cifar10 import CLASSES as CIFAR_CLASSES
from .cifar10 import DataError, dataset_md5, find_layout, load_cifar10

CIFAR = "cifar10"
CACHE_VERSION = 1                  # bump when the decoding changes, so that no stale cache is read
TEST_SPLITS = ("val", "test")
HOLDOUT = 10                       # 1 file in HOLDOUT is the test split of a folder without train/ and val/
# Readable names of the WordNet ids that name the class folders of Imagenette (fastai's imagenette2).
KNOWN_NAMES = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player", "n03000684": "chain saw",
    "n03028079": "church", "n03394916": "French horn", "n03417042": "garbage truck", "n03425413": "gas pump",
    "n03445777": "golf ball", "n03888257": "parachute",
}


@dataclass
class ImageSet:
    """One split at size S: ``images`` uint8 N×3×S×S, ``labels`` int64 N (-1: in no class folder)."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]                         # class folder names (CIFAR-10: its class names), label = index
    files: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)     # (file, why it was not read)
    conversions: dict[str, int] = field(default_factory=dict)         # note -> how many images had it
    checksum: dict = field(default_factory=dict)                      # for training manifests

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def class_names(self) -> list[str]:
        return [KNOWN_NAMES.get(c, c) for c in self.classes]

    def labelled(self) -> "ImageSet":
        """The images that have a class."""
        keep = self.labels >= 0
        return ImageSet(self.images[keep], self.labels[keep], self.classes,
                        [f for f, k in zip(self.files, keep.tolist()) if k], self.skipped, self.conversions,
                        self.checksum)


def check_size(size: int) -> int:
    if not 32 <= size <= 224 or size % 16:
        raise DataError(f"the working size must be a multiple of 16 from 32 to 224, not {size} (the networks halve "
                        "the image three times, and the inpainting hole is half of it)")
    return size


def load_split(data: str | os.PathLike | None, split: str, size: int = 32, cache_dir: str | os.PathLike | None = None,
               progress: bool = False) -> ImageSet:
    """``split`` ("train" or "test") of ``data`` (None or "cifar10": CIFAR-10; else a folder) at side ``size``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    check_size(size)
    root = None if data is None or str(data) == CIFAR else Path(data).expanduser()
    if root is not None and not root.is_dir():
        raise DataError(f"--data {root}: no such folder (give a folder of images, or 'cifar10')")
    if root is None or is_cifar_folder(root):
        if size != 32:
            raise DataError(f"CIFAR-10 images are 32×32: --size {size} needs a folder of images (--data DIR)")
        x, y = load_cifar10(split, root)
        return ImageSet(x, y, list(CIFAR_CLASSES), checksum={"cifar10_md5": dataset_md5(root)})
    folder, files, classes = split_files(root, split)
    if not files:
        raise DataError(f"no images under {folder} (searched recursively for .png, .jpg, …)")
    return cached_decode(folder, files, classes, size, cache_dir, progress)


def is_cifar_folder(root: Path) -> bool:
    """A folder holding CIFAR-10's batches (what --data named before folders of images were read)."""
    try:
        find_layout(root)
        return True
    except DataError:
        return False


def split_files(root: Path, split: str) -> tuple[Path, list[Path], list[str]]:
    """(the folder the split's classes are relative to, its image files, the classes of both splits: class folders
    that hold an image, so that a label means the same class in both)."""
    tests = [root / name for name in TEST_SPLITS if (root / name).is_dir()]
    if (root / "train").is_dir() and tests:
        folders = {"train": root / "train", "test": tests[0]}
        files = {name: image_files(folder) for name, folder in folders.items()}
        classes = {class_of(p.relative_to(folders[name])) for name in files for p in files[name]}
        return folders[split], files[split], sorted(c for c in classes if c is not None)
    files = image_files(root)
    held_out = lambda p: int(hashlib.sha256(p.relative_to(root).as_posix().encode()).hexdigest()[:8], 16) % HOLDOUT
    classes = sorted({c for c in (class_of(p.relative_to(root)) for p in files) if c is not None})
    return root, [p for p in files if (held_out(p) == 0) == (split == "test")], classes


def image_files(folder: Path) -> list[Path]:
    return [p for p in list_files(folder) if is_image_name(p) and p.name not in METADATA_FILES]


def class_of(rel: Path) -> str | None:
    """The class folder of a file at ``rel`` (relative to its split's folder); None at the top level."""
    return rel.parts[0] if len(rel.parts) > 1 else None


def cache_key(folder: Path, files: list[Path], classes: list[str], size: int) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION} size {size} classes {json.dumps(classes)}\n".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get("MSSL_REPAIR_CACHE") or Path.home() / ".cache" / "mssl-repair").expanduser()


def cached_decode(folder: Path, files: list[Path], classes: list[str], size: int,
                  cache_dir: str | os.PathLike | None, progress: bool) -> ImageSet:
    path = cache_root(cache_dir) / "folders" / f"{cache_key(folder, files, classes, size)}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return ImageSet(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]), meta["classes"],
                            meta["files"], [tuple(s) for s in meta["skipped"]], meta["conversions"],
                            meta["checksum"])
    images = decode(folder, files, classes, size, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"classes": images.classes, "files": images.files, "skipped": images.skipped,
                       "conversions": images.conversions, "checksum": images.checksum})

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, images=images.images.numpy(), labels=images.labels.numpy(), meta=np.array(meta))

    atomic_write(path, write)
    return images


def decode(folder: Path, files: list[Path], classes: list[str], size: int, progress: bool = False) -> ImageSet:
    """Read every file (runtime.imageio.read_image, resized to ``size``); undecodable ones are skipped."""
    from tqdm import tqdm

    rels = [p.relative_to(folder) for p in files]
    index = {c: i for i, c in enumerate(classes)}
    images, labels, kept, skipped, conversions = [], [], [], [], Counter()
    content = hashlib.sha256()
    for path, rel in tqdm(list(zip(files, rels)), desc=f"decoding {folder.name}/ at {size}×{size}", unit="image",
                          disable=not progress):
        try:
            image, notes = read_image(path, resize=True, size=size)
        except ImageError as e:
            skipped.append((rel.as_posix(), str(e)))
            continue
        content.update(rel.as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        images.append(np.round(image * 255).astype(np.uint8))
        labels.append(index.get(class_of(rel), -1))
        kept.append(rel.as_posix())
        conversions.update(n.split(" from ")[0] if n.startswith(("resized", "centre-cropped")) else n for n in notes)
    if not images:
        raise DataError(f"none of the {len(files)} image files under {folder} could be read "
                        f"(first: {skipped[0][0]}: {skipped[0][1]})")
    return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), classes, kept,
                    skipped, dict(conversions), {"folder": str(folder), "files": len(kept),
                                                 "content_sha256": content.hexdigest()})


def channel_stats(images: torch.Tensor, batch: int = 1000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images N×3×S×S, in [0, 1] units (a model's normalization)."""
    total, total_sq, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    for i in range(0, len(images), batch):
        x = images[i:i + batch].double() / 255
        total += x.sum((0, 2, 3))
        total_sq += (x ** 2).sum((0, 2, 3))
        count += x[:, 0].numel()
    mean = total / count
    std = (total_sq / count - mean ** 2).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def summary(images: ImageSet, split: str) -> str:
    """One line (and a line per skipped file) on what a split holds."""
    lines = [f"{split}: {len(images.images)} images at {images.size}×{images.size}, {len(images.classes)} classes"
             + (f", {int((images.labels < 0).sum())} without a class" if (images.labels < 0).any() else "")
             + (f"; {len(images.skipped)} file(s) skipped" if images.skipped else "")]
    lines += [f"  skipped {name}: {why}" for name, why in images.skipped]
    return "\n".join(lines)


def model_set_split(data: str | os.PathLike | None, split: str, inputs: dict,
                    labelled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images N×3×S×S, labels N) of ``split`` of ``data`` at a model set's size (``inputs``:
    engine.models.weights.model_input), for commands that measure a model set. With ``labelled``, only images with a
    class, their labels the indices of the model set's classes (matched by folder name, so that a folder with fewer
    classes, or sorted otherwise, is scored right); else labels are -1 where an image has no class."""
    size = int(inputs["size"])
    if data is None and inputs["dataset"] != CIFAR:
        raise DataError(f"this model set was trained on {inputs['dataset']} at {size}×{size}: pass --data DIR, "
                        "a folder of such images (class subfolders; train/ and val/ where it has them)")
    images = load_split(data, split, size, progress=True)
    if images.classes and inputs.get("classes") and not set(images.classes) & set(inputs["classes"]):
        # the SSL losses read no labels, but a folder none of whose classes the model set knows is another domain
        # (a calibration measured there would set the repair's levels on images it never sees)
        listed = lambda names: ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
        raise DataError(f"none of the class folders of {data} ({listed(images.classes)}) is among the model set's "
                        f"{len(inputs['classes'])} classes ({listed(inputs['classes'])}): pass the folder of images "
                        "it was trained on")
    if not labelled:
        return images.images, images.labels
    images = images.labelled()
    if not len(images.images):
        raise DataError(f"no image of {data} is in a class folder: scoring needs class subfolders")
    index = {c: i for i, c in enumerate(inputs["classes"])}
    unknown = [c for c in images.classes if c not in index]
    if unknown:
        raise DataError(f"class folder(s) {', '.join(unknown[:5])} of {data} are not among the classifier's "
                        f"{len(index)} classes ({', '.join(inputs['classes'][:5])}, …)")
    remap = torch.tensor([index[c] for c in images.classes], dtype=torch.int64)
    return images.images, remap[images.labels]
