"""Task heads on the classifier's own backbone (Mao et al., ICCV 2021).

A head network (``contrastive-head``, ``rotation-head``, ``inpainting-head``) holds a frozen copy of the classifier's
backbone and a small trained head: its SSL loss reads the very features the attack perturbed. The copy keeps export,
parity and loading the same as for the independent networks; the manifest names the classifier it was copied from,
and loading refuses a head whose classifier has since changed (its features would no longer be the classifier's).
"""
from __future__ import annotations

from torch import nn

from .weights import WeightsError

HEAD_TASKS = ("contrastive-head", "inpainting-head", "rotation-head")


# The config keys that make a backbone: a head's copy of the classifier's backbone must be built with the same.
BACKBONE_KEYS = ("widths", "mean", "std", "stem_stride")


def backbone_config(classifier_config: dict) -> dict:
    """The part of a classifier's config that its backbone is built from (a head's config takes it over)."""
    return {k: v for k, v in classifier_config.items() if k in BACKBONE_KEYS}


def base_task(name: str) -> str:
    """The task a network name computes: ``rotation-head`` -> ``rotation``."""
    return name.removesuffix("-head")


def attach_backbone(model: nn.Module, classifier: nn.Module, classifier_manifest: dict) -> dict:
    """Copy the classifier's backbone into ``model`` and freeze it; returns the manifest's ``backbone`` entry."""
    model.backbone.load_state_dict(classifier.backbone.state_dict())
    model.backbone.requires_grad_(False)
    return {"name": classifier_manifest["name"], "sha256": classifier_manifest["sha256"]}


def check_backbone(name: str, manifest: dict, classifier_manifest: dict) -> None:
    """Raise WeightsError where head ``name`` was trained on another classifier than the one loaded."""
    expected = manifest.get("backbone", {}).get("sha256")
    if expected != classifier_manifest["sha256"]:
        raise WeightsError(f"{name} was trained on the backbone of classifier sha256 {expected}, but the classifier "
                           f"here is {classifier_manifest['sha256']}; retrain it with "
                           f"`python cli.py train {name}` beside this classifier")
