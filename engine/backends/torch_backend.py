"""The reference backend: the PyTorch modules themselves, without autograd."""
from __future__ import annotations

import torch
from torch import nn


class TorchBackend:
    name = "torch"

    def __init__(self, classifier: nn.Module, objective: nn.Module) -> None:
        self.classifier, self.objective = classifier, objective

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    @torch.no_grad()
    def task_losses(self, x: torch.Tensor, params: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {task: self.objective.tasks[task].loss(x, **p) for task, p in params.items()}
