"""Every random choice of a repair, drawn by numpy: the random start, and each step's parameters of each task.

Numpy, not torch, so that the runtime without PyTorch (this package) and the PyTorch reference (engine/) draw the
very same numbers. Each (image, task) pair has a generator of its own, seeded from sha256(seed, the image's float32
bytes, the task's name) (docs/design.md, principle 3), so that

- an image gets the same repair alone or inside any batch, and on every run with the same seed;
- a task's draws do not depend on which other tasks are loaded, nor in which order;
- step k's draws do not depend on the number of steps (each step draws after the previous one).

SimCLR's augmentations (the contrastive and label-consistency views) are drawn here as the parameters of the linear
operators of engine/tasks/augment.py: bilinear crop matrices (flip folded in), brightness, contrast and one 3×3
colour matrix (saturation, hue and random grayscale composed).
"""
from __future__ import annotations

import hashlib
import math
import secrets

import numpy as np

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)          # torchvision's rgb_to_grayscale
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))

# SimCLR's CIFAR-10 settings (Chen et al., 2020, appendix B.9), crop scale as in Mao et al.'s code.
CROP_SCALE, CROP_RATIO = (0.2, 1.0), (3 / 4, 4 / 3)
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
P_JITTER, P_GRAY, P_FLIP = 0.8, 0.2, 0.5
SIZE = 32                                      # the default image side (CIFAR-10); draws take the images' own
START = "start"                                # the stream of the random start (no task has this name)


def deployed_seed(seed: int | None) -> int:
    """The seed a batch is repaired with: ``seed``, or where it is None (`--seed random`: a deployment whose draws are
    fresh on every request) a new one from the operating system for each batch, so that an image sent twice meets
    other draws — the defense `cli.py worst-case --deployment randomized` evaluates. With a fixed seed the repair is a
    deterministic function of the image (`--deployment fixed`, the default)."""
    return secrets.randbits(63) if seed is None else seed


def seed_record(seed: int | None) -> int | str:
    """How a report records the seed: the integer, or "random"."""
    return "random" if seed is None else seed


def image_rng(seed: int, image: np.ndarray, stream: str) -> np.random.Generator:
    """The generator of one image's ``stream`` (a task name, or START)."""
    pixels = np.ascontiguousarray(image, dtype=np.float32).tobytes()
    digest = hashlib.sha256(int(seed).to_bytes(8, "little", signed=True) + pixels + stream.encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def start_noise(images: np.ndarray, seed: int) -> np.ndarray:
    """U[0, 1) float32 shaped like ``images`` (B×3×H×W), image i's from its own START stream."""
    return np.stack([image_rng(seed, image, START).random(image.shape, dtype=np.float32) for image in images])


def crop_boxes(rng: np.random.Generator, n: int, size: int = SIZE, tries: int = 10) -> tuple[np.ndarray, ...]:
    """(top, left, height, width) of ``n`` integer crop boxes, drawn like torchvision's RandomResizedCrop: up to
    ``tries`` (area, aspect) candidates each, the first that fits wins, else the whole image."""
    area = size * size * rng.uniform(*CROP_SCALE, (n, tries))
    log_ratio = rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), (n, tries))
    w = np.round(np.sqrt(area * np.exp(log_ratio)))
    h = np.round(np.sqrt(area / np.exp(log_ratio)))
    fits = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first, any_fit, rows = fits.argmax(1), fits.any(1), np.arange(n)
    h = np.where(any_fit, h[rows, first], size).astype(np.int64)
    w = np.where(any_fit, w[rows, first], size).astype(np.int64)
    top = np.floor(rng.random(n) * (size - h + 1)).astype(np.int64)
    left = np.floor(rng.random(n) * (size - w + 1)).astype(np.int64)
    return top, left, h, w


def resize_matrix(start: np.ndarray, length: np.ndarray, in_size: int = SIZE, out_size: int = SIZE) -> np.ndarray:
    """N×out×in float32 bilinear weights that resize the span [start, start + length) to ``out_size`` samples,
    exactly as ``F.interpolate(crop, mode="bilinear", align_corners=False)`` does along one axis."""
    length = np.asarray(length, dtype=np.float64)[:, None]
    src = np.maximum((np.arange(out_size) + 0.5) * length / out_size - 0.5, 0)     # position inside the crop
    lo = np.minimum(np.floor(src), length - 1)
    hi = np.minimum(lo + 1, length - 1)
    frac = np.clip(src - lo, 0, 1)
    m = np.zeros((len(start), out_size, in_size))
    rows, cols = np.arange(len(start))[:, None], np.arange(out_size)[None, :]
    np.add.at(m, (rows, cols, (np.asarray(start)[:, None] + lo).astype(np.int64)), 1 - frac)
    np.add.at(m, (rows, cols, (np.asarray(start)[:, None] + hi).astype(np.int64)), frac)
    return m.astype(np.float32)


def hue_matrix(hue: np.ndarray) -> np.ndarray:
    """N×3×3 RGB matrices rotating the YIQ chroma plane by ``hue`` turns (luma and greys unchanged)."""
    to_yiq = np.array(RGB_TO_YIQ)
    rot = np.zeros((len(hue), 3, 3))
    cos, sin = np.cos(2 * math.pi * np.asarray(hue)), np.sin(2 * math.pi * np.asarray(hue))
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    return np.linalg.inv(to_yiq) @ rot @ to_yiq


def saturation_matrix(s: np.ndarray) -> np.ndarray:
    """N×3×3: blend with the grey image, ``s·x + (1 − s)·gray(x)`` (torchvision's adjust_saturation)."""
    s = np.asarray(s, dtype=np.float64)[:, None, None]
    return s * np.eye(3) + (1 - s) * np.broadcast_to(np.array(GRAY_WEIGHTS), (3, 3))


def sample_views(rng: np.random.Generator, n: int, size: int = SIZE) -> dict[str, np.ndarray]:
    """Parameters of ``n`` augmented views (float32): crop_y n×size×size, crop_x n×size×size (flip folded in),
    brightness n, contrast n, color n×3×3."""
    top, left, h, w = crop_boxes(rng, n, size)
    crop_y, crop_x = resize_matrix(top, h, size, size), resize_matrix(left, w, size, size)
    flip = rng.random(n) < P_FLIP
    crop_x = np.where(flip[:, None, None], crop_x[:, ::-1], crop_x)

    def factor(spread: float, centre: float = 1.0) -> np.ndarray:
        return rng.uniform(centre - spread, centre + spread, n)

    b, c, s, hue = (factor(JITTER["brightness"]), factor(JITTER["contrast"]), factor(JITTER["saturation"]),
                    factor(JITTER["hue"], 0.0))
    jitter = rng.random(n) < P_JITTER
    b, c, s = (np.where(jitter, t, 1.0) for t in (b, c, s))
    hue = np.where(jitter, hue, 0.0)
    gray = rng.random(n) < P_GRAY
    to_gray = np.where(gray[:, None, None], np.broadcast_to(np.array(GRAY_WEIGHTS), (3, 3)), np.eye(3))
    color = to_gray @ hue_matrix(hue) @ saturation_matrix(s)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
    return {"crop_y": f32(crop_y), "crop_x": f32(crop_x), "brightness": f32(b), "contrast": f32(c), "color": f32(color)}


def centre_mask(size: int = SIZE, hole: int | None = None) -> np.ndarray:
    """1×size×size float32, 1 on the central hole×hole square (the inpainting task's dropped region; default
    size/2, a quarter of the image, as Pathak et al. drop)."""
    hole = size // 2 if hole is None else hole
    mask = np.zeros((1, size, size), dtype=np.float32)
    lo = (size - hole) // 2
    mask[:, lo:lo + hole, lo:lo + hole] = 1
    return mask


def patch_mask(rng: np.random.Generator, size: int = SIZE, patches: int = 4) -> np.ndarray:
    """1×size×size float32, 1 on ``patches`` random squares of side size/4 (they may overlap: at most a quarter of the
    image dropped, as the centre hole drops): the random-region masks Pathak et al. found to learn more general
    features than one central hole, which Lawhon & Ducrest suggest for the repair's inpainting task."""
    side = size // 4
    mask = np.zeros((1, size, size), dtype=np.float32)
    tops, lefts = rng.integers(0, size - side + 1, (2, patches))
    for top, left in zip(tops, lefts):
        mask[:, top:top + side, left:left + side] = 1
    return mask


def _views(rng: np.random.Generator, views: int | None, size: int) -> dict[str, np.ndarray]:
    params = sample_views(rng, views, size)
    return {key: value.reshape(views, *value.shape[1:]) for key, value in params.items()}


# One step's parameters of one image of side ``size``, by task (a "-head" task draws as its plain namesake).
STEP_DRAWS = {
    "contrastive": _views,
    "consistency": _views,
    "inpainting": lambda rng, views, size: {"mask": centre_mask(size)},
    "inpainting-patches": lambda rng, views, size: {"mask": patch_mask(rng, size)},
    "rotation": lambda rng, views, size: {},
    "hedge": lambda rng, views, size: {},
}


class StepDraws:
    """A batch's draws one step at a time, for the images still in a repair: ``next(rows)`` draws the coming step's
    parameters of the images at ``rows`` (all by default) from their own generators. An image's step-k draws are the
    same whichever images were drawn beside it, so a loop whose images leave early (engine/repair.py's early exit)
    draws nothing for them and the rest get exactly the numbers of ``batch_draws``."""

    def __init__(self, images: np.ndarray, seed: int, tasks: dict[str, int | None]) -> None:
        for task in tasks:
            if task.removesuffix("-head") not in STEP_DRAWS:
                raise ValueError(f"no draws known for task {task!r}; known: {', '.join(STEP_DRAWS)}")
        if images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise ValueError(f"draws take square images B×3×S×S, not {images.shape}")
        self.tasks = dict(tasks)
        self.rngs = {task: [image_rng(seed, image, task) for image in images] for task in tasks}
        self.size, self.side = len(images), images.shape[-1]

    def next(self, rows: np.ndarray | list[int] | None = None) -> dict[str, dict[str, np.ndarray]]:
        """task -> key -> len(rows)×… : one step's parameters of the images at ``rows``."""
        rows = range(self.size) if rows is None else rows
        out: dict[str, dict[str, np.ndarray]] = {}
        for task, views in self.tasks.items():
            draw = STEP_DRAWS[task.removesuffix("-head")]
            per_image = [draw(self.rngs[task][i], views, self.side) for i in rows]
            out[task] = {key: np.stack([p[key] for p in per_image]) for key in per_image[0]} if per_image else {}
        return out


def batch_draws(images: np.ndarray, seed: int, tasks: dict[str, int | None],
                steps: int) -> dict[str, dict[str, np.ndarray]]:
    """Every task's parameters for ``steps`` steps of a batch B×3×H×W: task -> key -> steps×B×…; ``tasks`` maps each
    task to its number of views (None where it draws none)."""
    draws = StepDraws(images, seed, tasks)
    per_step = [draws.next() for _ in range(steps)]
    keys = {task: per_step[0][task] if per_step else {} for task in tasks}
    return {task: {key: np.stack([p[task][key] for p in per_step]) for key in keys[task]} for task in tasks}
