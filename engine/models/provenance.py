"""What a model was trained on, recorded in its manifest as ``trained_on``, so that a resumed model set never mixes
models of different data and a loaded one says when its networks disagree.

The record is cheap to take (file names and sizes, no decoding): the data's folder, per split the number of files and
a fingerprint of their sorted relative names and sizes (CIFAR-10: its batches' md5s), the working size S, the seed and
the profile. Two records describe the same run where everything but the folder's path agrees: a folder moved with
its files unchanged is the same data.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..data import model_sets
from ..data.model_sets import CIFAR, is_cifar_folder, split_files
from .weights import WeightsError

PREVIEW_PROFILES = ("quick",)      # profiles whose models are a first try, labelled so in manifests and reports


def data_record(data_root: str | os.PathLike | None, size: int) -> dict:
    """The data a model trains on at side ``size``: {"data": its folder (or "cifar10"), "splits": {split: {"files",
    "fingerprint"}}, "size"}."""
    root = None if data_root is None or str(data_root) == CIFAR else Path(data_root).expanduser().resolve()
    if root is None or is_cifar_folder(root):
        sums = model_sets.dataset_md5(root)          # the table load_split records of CIFAR-10
        splits = {split: {"files": len(names), "fingerprint": fingerprint(f"{n}\t{sums[n]}" for n in names)}
                  for split, names in (("train", [n for n in sums if n.startswith("data")]),
                                       ("test", [n for n in sums if n.startswith("test")]))}
        return {"data": CIFAR, "splits": splits, "size": size}
    splits = {}
    for split in ("train", "test"):
        folder, files, _ = split_files(root, split)
        entries = sorted(f"{p.relative_to(folder).as_posix()}\t{p.stat().st_size}" for p in files)
        splits[split] = {"files": len(entries), "fingerprint": fingerprint(entries)}
    return {"data": str(root), "splits": splits, "size": size}


def fingerprint(lines) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()[:16]


def trained_on(data_root: str | os.PathLike | None, size: int, seed: int, profile: str) -> dict:
    """A model's ``trained_on`` record: its data (``data_record``), seed and profile, and whether it is a preview."""
    return {**data_record(data_root, size), "seed": seed, "profile": profile, "preview": profile in PREVIEW_PROFILES}


def differences(recorded: dict | None, current: dict, data_only: bool = False) -> list[str]:
    """What differs between a recorded ``trained_on`` and ``current`` (in words; [] where they agree). With
    ``data_only`` the seed and profile are not compared."""
    if not recorded:
        return ["it records no data it was trained on (trained before models recorded it)"]
    found = []
    for split in ("train", "test"):
        then, now = recorded["splits"].get(split, {}), current["splits"].get(split, {})
        if then.get("files") != now.get("files"):
            found.append(f"the {split} split: {then.get('files')} files then, {now.get('files')} now")
        elif then.get("fingerprint") != now.get("fingerprint"):
            found.append(f"the {split} split: as many files, but other names or sizes")
    if recorded.get("data") == CIFAR or current.get("data") == CIFAR:
        if recorded.get("data") != current.get("data"):
            found.insert(0, f"the data: {recorded.get('data')} then, {current.get('data')} now")
    keys = ("size",) if data_only else ("size", "seed", "profile")
    found += [f"{key} {recorded.get(key)} then, {current.get(key)} now" for key in keys
              if recorded.get(key) != current.get(key)]
    return found


def check_same_data(manifests: dict[str, dict], weights: str | os.PathLike | None) -> None:
    """WeightsError where networks loaded together were trained on different data (those that record it)."""
    records = {name: m["trained_on"] for name, m in manifests.items() if m.get("trained_on")}
    if len(records) < 2:
        return
    first, reference = next(iter(records.items()))
    for name, record in records.items():
        found = differences(reference, record, data_only=True)
        if found:
            raise WeightsError(f"the networks in {weights or 'weights/'} were trained on different data: {first} "
                               f"and {name} differ in {'; '.join(found)} (as {first}, then {name}). Train the set "
                               "again on one folder: `python cli.py train-set … --overwrite`")


def is_preview(manifests: dict[str, dict]) -> bool:
    """Whether any of a model set's networks was trained with a preview profile (``--profile quick``)."""
    return any(m.get("trained_on", {}).get("preview") for m in manifests.values())


def resume_conflicts(out_dir: str | os.PathLike, models: list[str], current: dict) -> dict[str, list[str]]:
    """Per model of a set in ``out_dir`` that was trained (or began training) on other data or settings than
    ``current``: what differs. A resumed set continues only models of the same run."""
    from .checkpoint import Checkpoint

    conflicts = {}
    for name in models:
        manifest = Path(out_dir) / f"{name}.json"
        if manifest.exists():
            recorded = json.loads(manifest.read_text()).get("trained_on")
        else:
            checkpoint = Checkpoint(out_dir, name, {})
            if not checkpoint.exists():
                continue
            recorded = checkpoint.recorded().get("trained_on")
        found = differences(recorded, current)
        if found:
            conflicts[name] = found
    return conflicts
