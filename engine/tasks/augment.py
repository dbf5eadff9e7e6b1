"""SimCLR's augmentations from exportable linear operators (docs/design.md, principle 2).

runtime/draws.py draws every random choice (numpy, so that the torch-free runtime draws the same); ``apply_views``
is deterministic and uses only MatMul/Mul/Add/ReduceMean/Clip, so it is differentiable, exports to ONNX with its
input gradient, and runs the same in training and in the repair.

- random resized crop + horizontal flip: per-view bilinear interpolation matrices, ``view = A_y @ x @ A_xᵀ``
  (``A_x``'s rows reversed for a flip). Crop boxes are drawn as torchvision's ``RandomResizedCrop`` draws them
  (integer boxes), and the weights are ``F.interpolate(mode="bilinear", align_corners=False)``'s.
- colour jitter (with probability 0.8): brightness (scale), contrast (blend with the mean grey level), then
  saturation, hue and random grayscale folded into one 3×3 matrix (hue = a rotation of the I/Q plane of YIQ;
  torchvision rotates in HSV instead). torchvision clamps between each colour op and picks a random order; here the
  order is fixed and the last three share one clamp.
"""
from __future__ import annotations

import numpy as np
import torch

from runtime.draws import GRAY_WEIGHTS
from runtime.draws import sample_views as draw_views


def sample_views(batch: int, views: int, generator: torch.Generator, size: int = 32) -> dict[str, torch.Tensor]:
    """Random parameters of ``views`` augmented views of each of ``batch`` images, for training (the repair draws per
    image: runtime/draws.py). Drawn by numpy from a seed taken from ``generator``, so a seeded run repeats.

    Returns crop_y B×V×S×S, crop_x B×V×S×S (S = ``size``, flip folded in), brightness B×V, contrast B×V and
    color B×V×3×3 (saturation, hue and grayscale composed).
    """
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
    return {key: torch.from_numpy(value.reshape(batch, views, *value.shape[1:]))
            for key, value in draw_views(rng, batch * views, size).items()}


def apply_views(x: torch.Tensor, crop_y: torch.Tensor, crop_x: torch.Tensor, brightness: torch.Tensor,
                contrast: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    """Augmented views B×V×3×size×size of images x B×3×H×W in [0, 1]; deterministic given the parameters."""
    v = crop_y[:, :, None] @ x[:, None] @ crop_x[:, :, None].transpose(-1, -2)
    v = (v * brightness[..., None, None, None]).clamp(0, 1)
    gray_weights = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device).view(3, 1, 1)
    grey_level = (v * gray_weights).sum(2, keepdim=True).mean((3, 4), keepdim=True)
    c = contrast[..., None, None, None]
    v = (c * v + (1 - c) * grey_level).clamp(0, 1)
    return (color @ v.flatten(3)).view_as(v).clamp(0, 1)
