"""The inputs of the exported repair graph (export/repair_graphs.py) for a batch: the images, the random start's
draws, ε_r, the step size, the number of steps and every step's task parameters, named as the graph names them."""
from __future__ import annotations

import numpy as np

from .draws import batch_draws, start_noise


def repair_inputs(x0: np.ndarray, seed: int, eps: float, steps: int, step_size: float,
                  views: dict[str, int | None]) -> dict[str, np.ndarray]:
    """Feeds of the ``repair`` graph for images x0 B×3×S×S (float32 in [0, 1]); ``views`` maps each task of the
    graph's objective, in its order, to its number of views (None where it draws none)."""
    x0 = np.ascontiguousarray(x0, dtype=np.float32)
    feeds = {"x0": x0, "noise": start_noise(x0, seed), "eps": np.array(eps, np.float32),
             "step_size": np.array(step_size, np.float32), "steps": np.array(steps, np.int64)}
    for task, params in batch_draws(x0, seed, views, steps).items():
        for key, value in params.items():
            feeds[f"{task}_{key}_all"] = np.ascontiguousarray(value, dtype=np.float32)
    return feeds
