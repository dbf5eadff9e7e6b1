"""Weights are data, never code (docs/design.md, principle 6): ``<name>.safetensors`` + ``<name>.json``.

The manifest holds the architecture and its config (so the network can be rebuilt), how it was trained (the exact
command, data md5, epochs, seed, wall time, machine), its measured metrics and the sha256 of the tensor file, which
``load_model`` checks before it reads a byte of it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from runtime.files import atomic_write, sha256sum, write_json

from ..data.cifar10 import CLASSES
from .networks import build_model

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"


class WeightsError(RuntimeError):
    """Weights missing, corrupt, or not matching their manifest; the message names the file."""


def save_model(model: nn.Module, name: str, out_dir: str | os.PathLike, manifest: dict,
               overwrite: bool = False) -> Path:
    """Write ``out_dir/name.safetensors`` and ``out_dir/name.json``; the manifest gains ``sha256`` and ``file``.

    ``manifest`` must hold ``architecture`` and ``config``. Existing weights are kept unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    tensor_path, manifest_path = out_dir / f"{name}.safetensors", out_dir / f"{name}.json"
    if not overwrite and (tensor_path.exists() or manifest_path.exists()):
        raise WeightsError(f"{tensor_path} already exists; pass --overwrite to replace it, or choose another --out")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(tensor_path, lambda tmp: save_file(tensors, str(tmp), metadata={"name": name}))
    manifest = {**manifest, "name": name, "file": tensor_path.name, "sha256": sha256sum(tensor_path)}
    write_json(manifest_path, manifest)
    return manifest_path


# What a manifest without an ``input`` entry takes: the shipped CIFAR-10 networks, trained before sizes were free.
CIFAR_INPUT = {"size": 32, "dataset": "cifar10", "classes": list(CLASSES)}


def model_input(manifest: dict) -> dict:
    """What a network takes: ``size`` (the side S of its N×3×S×S inputs), ``dataset``, for a classifier its
    ``classes`` (folder names) and readable ``class_names``, and ``resize``: whether inputs of another size are
    centre-cropped and resized by default (as a folder set's training images were; CIFAR-10's all are 32×32)."""
    entry = {**CIFAR_INPUT, **manifest.get("input", {})}
    entry.setdefault("class_names", entry["classes"])
    entry.setdefault("resize", entry["dataset"] != CIFAR_INPUT["dataset"])
    return entry


def read_manifest(name: str, weights_dir: str | os.PathLike | None = None) -> dict:
    weights_dir = Path(weights_dir) if weights_dir is not None else DEFAULT_WEIGHTS
    path = weights_dir / f"{name}.json"
    if not path.exists():
        raise WeightsError(f"no weights for {name!r}: {path} is missing "
                           f"(train it with `python cli.py train {name} --out {weights_dir}`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"manifest {path} is not valid JSON: {e}") from None


def load_model(name: str, weights_dir: str | os.PathLike | None = None,
               device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The network ``name`` in eval mode, with its manifest, after checking the tensor file's sha256."""
    weights_dir = Path(weights_dir) if weights_dir is not None else DEFAULT_WEIGHTS
    manifest = read_manifest(name, weights_dir)
    tensor_path = weights_dir / manifest.get("file", f"{name}.safetensors")
    if not tensor_path.exists():
        raise WeightsError(f"{tensor_path} is missing (its manifest {weights_dir / (name + '.json')} is there)")
    actual = sha256sum(tensor_path)
    if actual != manifest.get("sha256"):
        raise WeightsError(f"{tensor_path} does not match its manifest: sha256 {actual}, "
                           f"expected {manifest.get('sha256')} (corrupt or replaced file)")
    model = build_model(manifest["architecture"], manifest["config"])
    model.load_state_dict(load_file(str(tensor_path)), strict=True)
    return model.to(device).eval(), manifest
