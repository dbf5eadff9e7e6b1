"""A classifier that is not the shipped one: any ``nn.Module`` on [0, 1] NCHW inputs, or an ONNX file run by
onnxruntime (predictions only).

The independent SSL networks (contrastive, inpainting, rotation) never read the classifier, so their repair works in
front of any classifier; label consistency and hedge read its predictions, so they need one that autograd can
differentiate (a PyTorch module). The heads and joint tasks read the shipped classifier's *features* and cannot
serve another one.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtime.files import sha256sum

from .models.heads import HEAD_TASKS
from .tasks import CLASSIFIER_TASKS


class ClassifierError(ValueError):
    """This classifier cannot be used as given; the message says why and what to do."""


def check_tasks(tasks: list[str], differentiable: bool) -> None:
    """ClassifierError where a task cannot run in front of a classifier other than the shipped one."""
    heads = [t for t in tasks if t in HEAD_TASKS]
    if heads:
        raise ClassifierError(f"{', '.join(heads)} read the shipped classifier's own features (heads on its "
                              "backbone), so they cannot repair for another classifier: use the independent "
                              "networks contrastive,inpainting,rotation")
    readers = [t for t in tasks if t in CLASSIFIER_TASKS]
    if readers and not differentiable:
        raise ClassifierError(f"{', '.join(readers)} differentiate the classifier's predictions, which an ONNX "
                              "classifier run by onnxruntime cannot give: pass a PyTorch module "
                              "(load_pipeline(classifier=...)), or use contrastive,inpainting,rotation")


def probe(classifier: nn.Module, device: torch.device, size: int = 32) -> int:
    """The class count C; ClassifierError unless ``classifier`` maps a 2×3×S×S batch (S = ``size``, the model set's)
    to 2×C logits (C ≥ 2), in eval mode."""
    if classifier.training:
        raise ClassifierError("the classifier is in training mode (BatchNorm and dropout would make every repair "
                              "depend on its batch): call .eval() on it first")
    try:
        with torch.no_grad():
            out = classifier(torch.full((2, 3, size, size), 0.5, device=device))
    except Exception as e:                       # noqa: BLE001  (any failure of a foreign model is the user's to see)
        raise ClassifierError(f"the classifier failed on a 2×3×{size}×{size} batch of [0, 1] images (the model "
                              f"set's size): {type(e).__name__}: {e}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2 or out.shape[1] < 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ClassifierError(f"the classifier should return logits N×C for N×3×{size}×{size} inputs; "
                              f"it returned {shape}")
    return int(out.shape[1])


def module_manifest(classifier: nn.Module) -> dict:
    """What the report records of a user's module: its class (there is no file to hash)."""
    return {"name": "classifier", "sha256": None, "source": f"module {type(classifier).__qualname__}"}


def foreign_classifier(classifier: nn.Module | str | os.PathLike, tasks: list[str], backend: str,
                       device: torch.device, threads: int | None = None, size: int = 32) -> tuple[nn.Module, dict]:
    """(the classifier, its manifest) for ``load_pipeline(classifier=...)``: a module, or the path of an ONNX file
    (run by onnxruntime at ``threads``), checked against the tasks, the backend and the model set's image ``size``;
    ClassifierError otherwise. The manifest's ``num_classes`` is what the probe returned."""
    onnx = not isinstance(classifier, nn.Module)
    if onnx:
        classifier = OnnxClassifier(classifier, threads, size)
    if backend not in ("torch", "auto"):
        raise ClassifierError(f"a classifier of your own runs with the torch backend: the {backend} backend "
                              "runs graphs exported from the shipped classifier")
    check_tasks(tasks, differentiable=not onnx)
    classes = probe(classifier, device, size)
    return classifier, {**(classifier.manifest if onnx else module_manifest(classifier)), "num_classes": classes}


class OnnxClassifier(nn.Module):
    """An ONNX classifier (N×3×S×S float in [0, 1] -> N×C logits) run by onnxruntime on the CPU; forward only."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, size: int = 32) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise ClassifierError(f"classifier file {path} does not exist")
        if path.suffix.lower() != ".onnx":
            raise ClassifierError(f"--classifier takes an ONNX file (.onnx), not {path.name}: export a PyTorch "
                                  "model with torch.onnx.export, or pass the module to load_pipeline(classifier=)")
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:                   # noqa: BLE001  (onnxruntime raises its own exception types)
            raise ClassifierError(f"onnxruntime cannot load {path}: {e}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ClassifierError(f"{path} should take one N×3×{size}×{size} input; it takes "
                                  f"{[(i.name, i.shape) for i in inputs]}")
        expected = (3, size, size)
        if any(isinstance(d, int) and d != e for d, e in zip(inputs[0].shape[1:], expected)):
            raise ClassifierError(f"{path} takes inputs of shape {inputs[0].shape}, but the model set's images are "
                                  f"N×3×{size}×{size}: export your classifier at {size}×{size}, or use a model set "
                                  "trained at your classifier's size")
        self.input_name, self.path = inputs[0].name, path
        self.one_at_a_time = inputs[0].shape[0] == 1      # exported with a fixed batch of one
        self.manifest = {"name": "classifier", "sha256": sha256sum(path), "source": path.name}
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().cpu().numpy().astype(np.float32)
        batches = np.split(images, len(images)) if self.one_at_a_time and len(images) > 1 else [images]
        logits = [self.session.run(None, {self.input_name: batch})[0] for batch in batches]
        return torch.from_numpy(np.concatenate(logits).astype(np.float32)).to(x.device)
