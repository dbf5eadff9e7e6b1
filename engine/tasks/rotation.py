"""Rotation prediction (Gidaris et al., 2018): L_r(x) = −(1/4) Σ_k log F_k(rot_k(x)), k = 0°, 90°, 180°, 270°."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rotate_all(x: torch.Tensor) -> torch.Tensor:
    """4N×C×H×W: the batch rotated by 0, 90, 180 and 270 degrees, one block of N per rotation."""
    return torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])


class RotationTask(nn.Module):
    """Per-image rotation loss. It has no randomness: ``sample_params`` returns no parameters.

    Shapes: x B×3×32×32 in [0, 1] -> loss B.
    """

    name = "rotation"

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def sample_params(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(rotate_all(x)).view(4, len(x), 4)
        targets = torch.arange(4, device=x.device)[:, None].expand(4, len(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(4, -1).mean(0)
