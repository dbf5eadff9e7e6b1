"""SimCLR's augmentations from exportable linear operators (DESIGN.md, principle 2).

``sample_views`` draws every random choice and turns it into tensors; ``apply_views`` is deterministic and uses only
MatMul/Mul/Add/ReduceMean/Clip, so it is differentiable, exports to ONNX with its input gradient, and runs the same in
training and in the repair.

- random resized crop + horizontal flip: per-view bilinear interpolation matrices, ``view = A_y @ x @ A_xᵀ``
  (``A_x``'s rows reversed for a flip). Crop boxes are drawn as torchvision's ``RandomResizedCrop`` draws them
  (integer boxes), and the weights are ``F.interpolate(mode="bilinear", align_corners=False)``'s.
- colour jitter (with probability 0.8): brightness (scale), contrast (blend with the mean grey level), then
  saturation, hue and random grayscale folded into one 3×3 matrix (hue = a rotation of the I/Q plane of YIQ;
  torchvision rotates in HSV instead). torchvision clamps between each colour op and picks a random order; here the
  order is fixed and the last three share one clamp.
"""
from __future__ import annotations

import math

import torch

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)          # torchvision's rgb_to_grayscale
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))

# SimCLR's CIFAR-10 settings (Chen et al., 2020, appendix B.9), crop scale as in Mao et al.'s code.
CROP_SCALE, CROP_RATIO = (0.2, 1.0), (3 / 4, 4 / 3)
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
P_JITTER, P_GRAY, P_FLIP = 0.8, 0.2, 0.5


def crop_boxes(n: int, size: int, generator: torch.Generator, tries: int = 10) -> tuple[torch.Tensor, ...]:
    """(top, left, height, width) of ``n`` integer crop boxes, drawn like torchvision's RandomResizedCrop:
    up to ``tries`` (area, aspect) candidates each, the first that fits wins, else the whole image."""
    area = size * size * torch.empty(n, tries).uniform_(*CROP_SCALE, generator=generator)
    log_ratio = torch.empty(n, tries).uniform_(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=generator)
    w = (area * log_ratio.exp()).sqrt().round()
    h = (area / log_ratio.exp()).sqrt().round()
    fits = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = fits.float().argmax(1)
    any_fit = fits.any(1)
    pick = lambda t: torch.where(any_fit, t.gather(1, first[:, None])[:, 0], torch.full_like(t[:, 0], size))
    h, w = pick(h).long(), pick(w).long()
    top = (torch.rand(n, generator=generator) * (size - h + 1)).floor().long()
    left = (torch.rand(n, generator=generator) * (size - w + 1)).floor().long()
    return top, left, h, w


def resize_matrix(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """N×out×in bilinear weights that resize the span [start, start + length) to ``out_size`` samples, exactly as
    ``F.interpolate(crop, mode="bilinear", align_corners=False)`` does along one axis."""
    i = torch.arange(out_size, dtype=torch.float64)
    scale = length.double()[:, None] / out_size
    src = ((i + 0.5) * scale - 0.5).clamp(min=0)                       # position inside the crop
    lo = src.floor().clamp(max=length[:, None] - 1)
    hi = (lo + 1).clamp(max=length[:, None] - 1)
    frac = (src - lo).clamp(0, 1)
    m = torch.zeros(len(start), out_size, in_size, dtype=torch.float64)
    m.scatter_add_(2, (start[:, None] + lo).long()[..., None], (1 - frac)[..., None])
    m.scatter_add_(2, (start[:, None] + hi).long()[..., None], frac[..., None])
    return m.float()


def hue_matrix(hue: torch.Tensor) -> torch.Tensor:
    """N×3×3 RGB matrices rotating the YIQ chroma plane by ``hue`` turns (luma and greys unchanged)."""
    to_yiq = torch.tensor(RGB_TO_YIQ)
    cos, sin = torch.cos(2 * math.pi * hue), torch.sin(2 * math.pi * hue)
    rot = torch.zeros(len(hue), 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    return torch.linalg.inv(to_yiq) @ rot @ to_yiq


def saturation_matrix(s: torch.Tensor) -> torch.Tensor:
    """N×3×3: blend with the grey image, ``s·x + (1 − s)·gray(x)`` (torchvision's adjust_saturation)."""
    gray = torch.tensor(GRAY_WEIGHTS).expand(3, 3)
    return s[:, None, None] * torch.eye(3) + (1 - s)[:, None, None] * gray


def sample_views(batch: int, views: int, generator: torch.Generator, size: int = 32) -> dict[str, torch.Tensor]:
    """Random parameters of ``views`` augmented views of each of ``batch`` images.

    Returns crop_y B×V×size×size, crop_x B×V×size×size (flip folded in), brightness B×V, contrast B×V and
    color B×V×3×3 (saturation, hue and grayscale composed).
    """
    n = batch * views
    top, left, h, w = crop_boxes(n, size, generator)
    crop_y = resize_matrix(top, h, size, size)
    crop_x = resize_matrix(left, w, size, size)
    flip = torch.rand(n, generator=generator) < P_FLIP
    crop_x = torch.where(flip[:, None, None], crop_x.flip(1), crop_x)

    def factor(spread: float, centre: float = 1.0) -> torch.Tensor:
        return torch.empty(n).uniform_(centre - spread, centre + spread, generator=generator)

    b, c, s, hue = factor(JITTER["brightness"]), factor(JITTER["contrast"]), factor(JITTER["saturation"]), \
        factor(JITTER["hue"], 0.0)
    jitter = torch.rand(n, generator=generator) < P_JITTER
    b, c, s = (torch.where(jitter, t, torch.ones_like(t)) for t in (b, c, s))
    hue = torch.where(jitter, hue, torch.zeros_like(hue))
    gray = torch.rand(n, generator=generator) < P_GRAY
    to_gray = torch.where(gray[:, None, None], torch.tensor(GRAY_WEIGHTS).expand(3, 3), torch.eye(3))
    color = to_gray @ hue_matrix(hue) @ saturation_matrix(s)
    shape = (batch, views)
    return {"crop_y": crop_y.view(*shape, size, size), "crop_x": crop_x.view(*shape, size, size),
            "brightness": b.view(shape), "contrast": c.view(shape), "color": color.view(*shape, 3, 3)}


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
