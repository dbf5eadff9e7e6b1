"""Inpainting with a context encoder (Pathak et al., 2016): L_i(x) = ‖M ⊙ (x − G((1 − M) ⊙ x))‖²₂, M = 1 on the
dropped region (the S/2 × S/2 centre of an S×S image)."""
from __future__ import annotations

import torch
from torch import nn

from runtime import draws


def centre_mask(batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                size: int = draws.SIZE) -> torch.Tensor:
    """B×1×S×S, 1 on the central S/2 × S/2 square (dropped), 0 on the context: runtime/draws.py's mask, batched."""
    return torch.from_numpy(draws.centre_mask(size)).to(device, dtype).repeat(batch, 1, 1, 1)


class InpaintingTask(nn.Module):
    """Per-image inpainting loss: the squared error summed over the dropped region's pixels and channels.

    The mask is a parameter, not a constant, so that the exported loss graph takes it as an input and other masks
    (random patches) can be drawn without touching the loss. Shapes: x B×3×S×S in [0, 1], mask B×1×S×S -> B.
    """

    name = "inpainting"

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


    def loss(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return ((mask * (x - self.net(x, mask))) ** 2).sum((1, 2, 3))
