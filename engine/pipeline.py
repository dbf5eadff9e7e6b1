"""The Python API: ``load_pipeline()`` -> classifier, SSL loss and repair on the shipped (or given) weights.

Example::

    from engine import load_pipeline
    p = load_pipeline()                      # weights/ in this repository, CPU
    logits = p.classifier(x)                 # x: float in [0, 1], N×3×32×32
    losses = p.ssl_loss(x)                   # Tensor[N], Σ α_k L_k
    x_rep = p.repair(x, eps=16/255, steps=40, step_size=2/255, seed=0)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .backends import BACKENDS, BackendUnavailable, ForwardBackend
from .backends.torch_backend import TorchBackend
from .repair import MultiTaskLoss, RepairResult, image_generators, reverse_attack
from .tasks import TASKS
from .weights import load_model

DEFAULT_TASKS = ("contrastive", "inpainting", "rotation")


@dataclass
class Pipeline:
    classifier: nn.Module
    objective: MultiTaskLoss
    manifests: dict[str, dict] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    backend: ForwardBackend | None = None          # forward-only passes; None: the torch reference

    def __post_init__(self) -> None:
        if self.backend is None:
            self.backend = TorchBackend(self.classifier, self.objective)

    @property
    def tasks(self) -> list[str]:
        return list(self.objective.tasks)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images N×3×H×W, got shape {tuple(x.shape)}")
        return x.to(self.device, torch.float32)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes N (int64), from the forward backend."""
        return self.backend.logits(self._to_device(x)).argmax(1).to(self.device)

    def task_losses(self, x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
        """Each task's per-image loss (forward backend), with parameters drawn from the images' own generators
        (seeded as in the repair, so the same image always gets the same augmentations)."""
        x = self._to_device(x)
        return self.backend.task_losses(x, self.objective.sample_params(image_generators(x, seed), x))

    def ssl_loss(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Σ_k α_k L_k(x), per image: Tensor[N]."""
        losses = self.task_losses(x, seed)
        return sum(self.objective.alpha[name] * loss for name, loss in losses.items())

    def repair_with_trace(self, x: torch.Tensor, eps: float = 16 / 255, steps: int = 40,
                          step_size: float = 2 / 255, seed: int = 0) -> RepairResult:
        return reverse_attack(self.objective, self._to_device(x), eps, steps, step_size, seed)

    def repair(self, x: torch.Tensor, eps: float = 16 / 255, steps: int = 40, step_size: float = 2 / 255,
               seed: int = 0) -> torch.Tensor:
        """x + r with ‖r‖∞ ≤ eps minimizing the multi-task SSL loss: N×3×H×W in [0, 1]."""
        return self.repair_with_trace(x, eps, steps, step_size, seed).images


def build_objective(nets: dict[str, nn.Module], alpha: dict[str, float] | None = None,
                    views: int = 4) -> MultiTaskLoss:
    """The multi-task loss over the given task networks (name -> network)."""
    tasks = {name: (TASKS[name](net, views=views) if name == "contrastive" else TASKS[name](net))
             for name, net in nets.items()}
    return MultiTaskLoss(tasks, alpha or {})


def load_pipeline(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  tasks: tuple[str, ...] | list[str] = DEFAULT_TASKS, alpha: dict[str, float] | None = None,
                  views: int = 4, backend: str = "torch", onnx_dir: str | os.PathLike | None = None,
                  precision: str = "fp32") -> Pipeline:
    """The classifier and the named SSL tasks from ``weights`` (default: the shipped ``weights/``).

    ``backend`` runs the forward-only passes ("torch", "onnxruntime", "tensorrt" at ``precision``, or "auto": the
    fastest present); the repair's gradient loop is PyTorch's in every case. Raises ``engine.weights.WeightsError`` (a clear message) where a file
    is missing or does not match its manifest, and ``BackendUnavailable`` where the backend cannot run here.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    device = torch.device(device)
    backend = resolve_backend(backend, device)
    if backend == "tensorrt":                  # fail before any export work where it cannot run
        from export.tensorrt import import_tensorrt

        import_tensorrt()
    classifier, manifest = load_model("classifier", weights, device)
    manifests, nets = {"classifier": manifest}, {}
    for name in tasks:
        nets[name], manifests[name] = load_model(name, weights, device)
    for net in (classifier, *nets.values()):
        net.requires_grad_(False)      # the repair differentiates w.r.t. the input only
    pipeline = Pipeline(classifier, build_objective(nets, alpha, views).to(device), manifests, device)
    if backend in ("onnxruntime", "tensorrt"):
        from export.onnx_export import ensure_exported

        onnx_dir = ensure_exported(pipeline, onnx_dir)
        if backend == "onnxruntime":
            from .backends.onnxruntime_backend import OnnxRuntimeBackend

            pipeline.backend = OnnxRuntimeBackend(onnx_dir, list(tasks), device)
        else:
            from .backends.tensorrt_backend import TensorRTBackend

            pipeline.backend = TensorRTBackend(onnx_dir, list(tasks), device, precision)
    return pipeline


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend to use for ``name``. "auto": TensorRT where it can run (a CUDA device and the package),
    else the torch reference."""
    if name == "auto":
        import importlib.util

        usable = device.type == "cuda" and torch.cuda.is_available() and importlib.util.find_spec("tensorrt")
        return "tensorrt" if usable else "torch"
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    return name
