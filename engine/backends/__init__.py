"""Forward engines behind one protocol. The repair's gradient loop always runs in PyTorch autograd; a backend runs
the forward-only passes: classifier logits, and the SSL losses the report and the gate read.

- ``torch``: the reference (engine/backends/torch_backend.py)
- ``onnxruntime``: the exported ONNX graphs (engine/backends/onnxruntime_backend.py)
- ``tensorrt``: TensorRT engines built from those graphs, on CUDA (engine/backends/tensorrt_backend.py)
"""
from __future__ import annotations

from typing import Protocol

import torch

BACKENDS = ("torch", "onnxruntime", "tensorrt")


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run here; the message says why."""


class ForwardBackend(Protocol):
    name: str

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Classifier logits N×C of images N×3×S×S in [0, 1]."""

    def task_losses(self, x: torch.Tensor, params: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Each task's per-image loss (Tensor[N]) with the given sampled parameters."""
