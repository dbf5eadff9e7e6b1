"""Inpainting with a context encoder (Pathak et al., 2016): L_i(x) = ‖M ⊙ (x − G((1 − M) ⊙ x))‖²₂, M = 1 on the
dropped region (the 16×16 centre of a 32×32 image)."""
from __future__ import annotations

import torch
from torch import nn


def centre_mask(batch: int, size: int = 32, hole: int = 16, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """B×1×size×size, 1 on the central hole×hole square (dropped), 0 on the context."""
    mask = torch.zeros(batch, 1, size, size, device=device, dtype=dtype)
    lo = (size - hole) // 2
    mask[:, :, lo:lo + hole, lo:lo + hole] = 1
    return mask


class InpaintingTask(nn.Module):
    """Per-image inpainting loss: the squared error summed over the dropped region's pixels and channels.

    The mask is a parameter, not a constant, so that the exported loss graph takes it as an input and other masks
    (random patches) can be drawn without touching the loss. Shapes: x B×3×32×32 in [0, 1], mask B×1×32×32 -> B.
    """

    name = "inpainting"

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def sample_params(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"mask": centre_mask(batch)}

    def loss(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return ((mask * (x - self.net(x, mask))) ** 2).sum((1, 2, 3))
