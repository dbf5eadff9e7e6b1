"""The repair driven one exported step at a time (the ``repair_step`` graph of export/repair_graphs.py), so that an
image can leave the loop early and the rest run as a smaller batch.

The ``repair`` graph runs every step for every image inside one ONNX ``Loop``; its loop-carried batch cannot
shrink. With the clean-level objective most images reach a zero objective (every task at or below its clean
level) within a few steps — measured on the shipped models, 85 % of the image-steps of a 40-step repair come after
that point (docs/repair-graphs.md) — and from there a step cannot move them. This loop calls the step graph once per
step on the images still in it, drawing each step's parameters only for them (runtime/draws.py's ``StepDraws``: the
same numbers as the Loop graph's inputs), which is what engine/repair.py's ``early_exit`` does in PyTorch.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .draws import StepDraws, start_noise

# feeds (input name -> array) -> (next x, the objective at x per image)
RunStep = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]


def step_feeds(x: np.ndarray, x0: np.ndarray, params: dict[str, dict[str, np.ndarray]], eps: float,
               step_size: float) -> dict[str, np.ndarray]:
    """The ``repair_step`` graph's inputs for one step of the images ``x`` (started from ``x0``), named as the graph
    names them."""
    return {"x": np.ascontiguousarray(x, dtype=np.float32), "x0": np.ascontiguousarray(x0, dtype=np.float32),
            "eps": np.array(eps, np.float32), "step_size": np.array(step_size, np.float32),
            **{f"{task}_{key}": value for task, p in params.items() for key, value in p.items()}}


def start_point(x0: np.ndarray, seed: int, eps: float) -> np.ndarray:
    """The random start x0 + (2u − 1)·ε in [0, 1], as engine/repair.py's ``start_point`` (same float32 ops)."""
    return np.clip(x0 + (2 * start_noise(x0, seed) - 1) * np.float32(eps), 0, 1)


def repair_by_steps(run_step: RunStep, x0: np.ndarray, seed: int, eps: float, steps: int, step_size: float,
                    views: dict[str, int | None]) -> tuple[np.ndarray, np.ndarray]:
    """(repaired images B×3×S×S, trace steps×B: the objective at the start of each step, NaN after an image left).

    ``views`` maps each task of the step graph's objective, in its order, to its number of views (None where it
    draws none). An image leaves at the first step where its objective is exactly zero."""
    x0 = np.ascontiguousarray(x0, dtype=np.float32)
    x = start_point(x0, seed, eps)
    draws = StepDraws(x0, seed, views)
    trace = np.full((steps, len(x0)), np.nan, dtype=np.float32)
    active = np.arange(len(x0))
    for step in range(steps):
        if not active.size:
            break
        x_next, loss = run_step(step_feeds(x[active], x0[active], draws.next(active), eps, step_size))
        trace[step, active] = loss
        x[active] = x_next
        active = active[loss != 0]
    return x, trace
