"""One network of a model set trained from its profile: the data at its working size, the recipe fitted to it
(engine/train/profiles.py), the run (recipes.py, checkpointed every epoch so that ``--resume`` continues a stopped
run) and the weights with their manifest (engine/models/weights.py, with what they were trained on)."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from ..data.cifar10 import DataError
from ..data.model_sets import CIFAR, ImageSet, channel_stats, load_split, summary
from ..models.checkpoint import Checkpoint
from ..models.heads import attach_backbone, backbone_config
from ..models.networks import build_model, num_params
from ..models.provenance import differences, trained_on
from ..models.weights import WeightsError, load_model, model_input, save_model
from .loop import log
from .profiles import fit_to_data, recipe
from .recipes import train_recipe


CLASSIFIERS = ("classifier", "classifier-standard")


def load_data(data_root: str | None, size: int, labelled: bool) -> tuple[dict, ImageSet]:
    """The train and test splits as the recipes take them (uint8 images, int64 labels), and the train split."""
    train, test = (load_split(data_root, split, size, progress=True) for split in ("train", "test"))
    for split, images in (("train", train), ("test", test)):
        log(summary(images, split))
    if labelled:                  # a classifier learns from the images that have a class
        train, test = train.labelled(), test.labelled()
        if len(train.classes) < 2 or not len(train.images) or not len(test.images):
            raise DataError(f"a classifier needs class subfolders (at least 2) with images in both splits; "
                            f"{data_root} has {len(train.classes)} class(es), {len(train.images)} train and "
                            f"{len(test.images)} test images with a class")
    return {"train_x": train.images, "train_y": train.labels, "test_x": test.images, "test_y": test.labels}, train


def is_folder(images: ImageSet) -> bool:
    """Whether the images came from a folder of images (not CIFAR-10's batches)."""
    return "cifar10_md5" not in images.checksum


def input_entry(data_root: str | None, train: ImageSet) -> dict:
    """The manifest's ``input``: what images the network takes and where they came from."""
    dataset = Path(data_root).resolve().name if is_folder(train) else CIFAR
    return {"size": train.size, "dataset": dataset, "classes": train.classes, "class_names": train.class_names,
            "source": train.checksum}


def folder_config(name: str, cfg: dict, train: ImageSet) -> dict:
    """A network's config for the images of ``train``: a folder's normalized by its own statistics, and a
    classifier's output sized to its classes (CIFAR-10's are the recipe's)."""
    config = dict(cfg["config"])
    if is_folder(train):
        config["mean"], config["std"] = channel_stats(train.images)
        if name in CLASSIFIERS:
            config["num_classes"] = len(train.classes)
    return config


def train_model(name: str, profile: str = "cpu", data_root: str | None = None, out_dir: str = "weights",
                seed: int = 0, device: str | None = None, overwrite: bool = False,
                epochs: int | None = None, command: str | None = None, size: int = 32, resume: bool = False,
                on_step: Callable[[], None] | None = None) -> str:
    """Train ``name`` with ``profile``'s recipe on ``data_root`` (None or "cifar10": CIFAR-10; else a folder of
    images) at side ``size``, sized to the data where it is smaller than the recipe's (engine/train/plan.py),
    measure it on the test split, write weights + manifest (with what it was trained on: engine/models/provenance.py).
    Every epoch is checkpointed; ``resume`` continues a stopped run of the same settings and data. ``command`` is
    recorded in the manifest: the command line that reproduces this run; ``on_step`` is called after every step."""
    cfg = recipe(name, profile, epochs)
    final = Path(out_dir) / f"{name}.json"
    if final.exists() and not overwrite:            # before hours of training, not after
        raise WeightsError(f"{final} already exists; pass --overwrite to replace it, or choose another --out")
    provenance = trained_on(data_root, size, seed, profile)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data, train = load_data(data_root, size, labelled=name in CLASSIFIERS)
    cfg, sized = fit_to_data(cfg, len(data["train_x"]))
    extra = {"sized_from_data": sized} if sized else {}
    if cfg.get("backbone"):                # a head: the classifier beside it in out_dir lends its frozen backbone
        classifier, classifier_manifest = load_model(cfg["backbone"], out_dir)
        if model_input(classifier_manifest)["size"] != size:
            raise WeightsError(f"the classifier in {out_dir} takes {model_input(classifier_manifest)['size']}-pixel "
                               f"images; this head was asked for --size {size}")
        cfg["config"] = {**cfg["config"], **backbone_config(classifier_manifest["config"])}
        model = build_model(cfg["architecture"], cfg["config"])
        extra["backbone"] = attach_backbone(model, classifier, classifier_manifest)
    else:
        cfg["config"] = folder_config(name, cfg, train)
        model = build_model(cfg["architecture"], cfg["config"])
    inputs = input_entry(data_root, train)
    recipe_entry = {k: v for k, v in cfg.items() if k not in ("architecture", "config")}
    checkpoint = Checkpoint(out_dir, name, {"recipe": recipe_entry, "config": cfg["config"], "input": inputs,
                                            "seed": seed, "profile": profile, "trained_on": provenance})
    if checkpoint.exists() and not resume:
        if not overwrite:
            raise WeightsError(f"{checkpoint.meta} holds an unfinished run of {name}: pass --resume to continue it, "
                               "or --overwrite to start again")
        checkpoint.remove()
    if checkpoint.exists():
        changed = differences(checkpoint.recorded().get("trained_on"), provenance)
        if changed:
            raise WeightsError(f"{checkpoint.meta} is an unfinished run of {name} on other data or settings "
                               f"({'; '.join(changed)}): pass --overwrite to start it again")
    log(f"training {name} ({profile} profile, {cfg['epochs']} epochs, {size}×{size}) on {dev}")
    start = time.time()
    model, metrics = train_recipe(name, model.to(dev, memory_format=torch.channels_last), cfg, data, generator, dev,
                                  checkpoint, on_step)
    wall = time.time() - start
    log(f"{name} done in {wall / 60:.1f} min: {metrics}")
    source = {} if is_folder(train) else {"data_md5": train.checksum["cifar10_md5"]}
    manifest = {
        "architecture": cfg["architecture"], "config": cfg["config"], "params": num_params(model),
        "recipe": recipe_entry, "profile": profile, "command": command, "input": inputs, **source,
        "trained_on": provenance, "epochs": cfg["epochs"], "seed": seed, "wall_seconds": round(wall, 1),
        "metrics": metrics, **extra,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = save_model(model, name, out_dir, manifest, overwrite=overwrite)
    checkpoint.remove()
    return str(path)
