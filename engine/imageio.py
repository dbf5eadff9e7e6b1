"""Image IO for the PyTorch engine: runtime/imageio.py's reading, validation and atomic PNG writing, with tensors."""
from __future__ import annotations

from pathlib import Path

import torch

from runtime import imageio


def read_image(path: Path, resize: bool = False, size: int = imageio.SIZE) -> tuple[torch.Tensor, list[str]]:
    """(3×size×size float32 tensor in [0, 1], notes) or ImageError."""
    image, notes = imageio.read_image(path, resize, size)
    return torch.from_numpy(image), notes


def quantize(x: torch.Tensor) -> torch.Tensor:
    """What an 8-bit PNG holds: x rounded to the nearest k/255."""
    return (x.clamp(0, 1) * 255).round() / 255


def write_png(path: Path, image: torch.Tensor) -> None:
    """Lossless 8-bit PNG of a 3×H×W image in [0, 1], written atomically."""
    imageio.write_png(path, image.detach().cpu().float().numpy())
