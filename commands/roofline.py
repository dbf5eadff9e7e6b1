"""How close each engine of `cli.py bench` runs to this machine's limit: the FLOPs of one repaired image, the GFLOP/s
an engine achieved with them, and the machine's measured fp32 peak at the same threads.

- one repair step of one image: the objective's forward and its gradient with respect to the image, counted by
  torch's own FLOP counter (``torch.utils.flop_counter``: convolutions and matrix products, the operations that cost;
  elementwise work is left out, so the counts are a floor);
- one repaired image: its steps (every step, or the mean steps the early exit ran) plus the forward passes of its row
  (the task losses before and after, the classifier before and after);
- the peak: a large fp32 matrix product (``torch.mm``, 2048², best of a few), at the threads the bench runs with.

A fraction of that peak says how much faster the same work could run on this machine; fewer FLOPs per image at
equal measured accuracy (e.g. fewer contrastive views, which cost most) is the other way to go faster.
"""
from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.pipeline import Pipeline


def _counted(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def image_flops(pipeline: Pipeline) -> dict:
    """FLOPs of one image (S×S, the pipeline's size): one repair step, per task and in all, and its row's forward
    passes."""
    x = torch.rand(1, 3, pipeline.size, pipeline.size, device=pipeline.device)
    objective = pipeline.objective
    params = objective.sample_params(x, 0)

    def step(tasks=None) -> None:
        with torch.enable_grad():
            x_a = x.clone().requires_grad_(True)
            loss = sum(objective.tasks[t].loss(x_a, **params[t]) for t in (tasks or objective.tasks))
            loss.sum().backward()          # (FlopCounterMode cannot count torch.autograd.grad on a leaf)

    def row() -> None:
        with torch.no_grad():
            objective.per_task(x, params)
            pipeline.classifier(x)

    return {"step": _counted(step), "per_task_step": {t: _counted(lambda t=t: step([t])) for t in objective.tasks},
            "row_forwards": 2 * _counted(row)}


def peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matrix-product rate at torch's current threads: the best of ``repeats`` n×n products."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.mm(a, b)                                           # warm-up
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return round(2 * n ** 3 / best / 1e9, 2)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def attach(result: dict, pipeline: Pipeline, steps: int) -> None:
    """Add the FLOPs, the peak and each available backend's achieved GFLOP/s and fraction of the peak to ``result``
    (run_bench's): the steps an image ran are every step without the exit, the reference's measured fraction with it
    (the engines agree on where images leave: the parity rows)."""
    flops = image_flops(pipeline)
    peak = peak_gflops()
    exit_fraction = next((b.get("steps_run") for b in result["backends"]
                          if b.get("available") and b["name"] == "torch+exit"), None)
    result["limit"] = {"step_mflops": round(flops["step"] / 1e6, 2),
                       "per_task_step_mflops": {t: round(f / 1e6, 2) for t, f in flops["per_task_step"].items()},
                       "row_forwards_mflops": round(flops["row_forwards"] / 1e6, 2), "peak_gflops": peak,
                       "peak": "fp32 torch.mm 2048², best of 5, at the bench's threads"}
    for entry in result["backends"]:
        if not entry.get("available"):
            continue
        fraction = exit_fraction if entry.get("early_exit") else 1.0
        if fraction is None:                 # +exit without torch+exit in the run: no measured exit rate
            continue
        per_image = steps * fraction * flops["step"] + flops["row_forwards"]
        achieved = entry["images_per_s"] * per_image / 1e9
        entry.update(mflops_per_image=round(per_image / 1e6, 1), gflops=round(achieved, 3),
                     fraction_of_peak=round(achieved / peak, 4))
