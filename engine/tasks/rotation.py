"""Rotation prediction (Gidaris et al., 2018): L_r(x) = −(1/4) Σ_k log F_k(rot_k(x)), k = 0°, 90°, 180°, 270°."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rotate_all(x: torch.Tensor) -> torch.Tensor:
    """4N×C×H×W: the batch rotated by 0, 90, 180 and 270 degrees, one block of N per rotation."""
    return torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])


class RotationTask(nn.Module):
    """Per-image rotation loss. It has no randomness: it draws no parameters.

    Shapes: x B×3×S×S in [0, 1] -> loss B.
    """

    name = "rotation"

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


    def loss(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(self.net(rotate_all(x)), dim=1).view(4, -1, 4)     # rotation k, image, class
        # log F_k(rot_k(x)) is the (k, ·, k) diagonal, picked by a 4×4 identity mask: no label tensor, so the graph
        # keeps a free batch, and no diagonal op, whose gradient (a diagonal scatter) does not export functionally
        pick = torch.eye(4, dtype=log_probs.dtype, device=log_probs.device)[:, None, :]
        return -(log_probs * pick).sum((0, 2)) / 4
