"""The reverse attack: r = argmin_{‖r‖∞ ≤ ε_r} Σ_k α_k L_k(x + r), by projected sign-gradient descent.

Every random choice (the random start, each task's augmentation parameters at each step) comes from numpy
generators of the image's own, one per (image, task), seeded from the user's seed, the image's content and the
task's name (runtime/draws.py; docs/design.md, principle 3). So an image gets the same repair alone or inside any batch,
with any other tasks beside, and the same repair on every run with the same seed — in PyTorch and in the runtime
without it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from runtime.draws import StepDraws, batch_draws, start_noise
from runtime.settings import DEFAULTS

Params = dict[str, dict[str, torch.Tensor]]          # task -> parameter name -> tensor


def pixels(x: torch.Tensor) -> np.ndarray:
    """The images as the draws read them: float32 on the host."""
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


def as_tensors(params: dict[str, dict[str, np.ndarray]], like: torch.Tensor) -> Params:
    """Numpy draws as tensors on ``like``'s device and dtype."""
    return {task: {key: torch.from_numpy(value).to(like.device, like.dtype) for key, value in p.items()}
            for task, p in params.items()}


def at_step(params: Params, step: int) -> Params:
    """One step's parameters out of ``draw``'s steps-first tensors."""
    return {task: {key: value[step] for key, value in p.items()} for task, p in params.items()}


class MultiTaskLoss(nn.Module):
    """L_m(x) = Σ_k α_k L_k(x) over a set of SSL tasks (engine/tasks), or with ``levels`` the clean-level form
    Σ_k α_k max(0, L_k(x) − level_k): once a task's loss is down at its clean level it stops pulling, so the repair
    restores that level instead of driving the loss to zero (an adversarial example for the SSL net).
    Shapes: x B×3×S×S -> B."""

    def __init__(self, tasks: dict[str, nn.Module], alpha: dict[str, float],
                 levels: dict[str, float] | None = None) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("the multi-task loss needs at least one task")
        self.tasks = nn.ModuleDict(tasks)
        self.alpha = {name: float(alpha.get(name, 1.0)) for name in tasks}
        self.levels = levels

    def views(self) -> dict[str, int | None]:
        """Each task's number of augmented views (None where it draws none), in task order."""
        return {name: getattr(task, "views", None) for name, task in self.tasks.items()}

    def draw(self, x: torch.Tensor, seed: int, steps: int, names: list[str] | None = None) -> Params:
        """Each task's (or each of ``names``') parameters for ``steps`` steps of a repair of x: steps×B×… tensors on
        x's device, image i's from its own generators (runtime/draws.py)."""
        views = {name: v for name, v in self.views().items() if names is None or name in names}
        return as_tensors(batch_draws(pixels(x), seed, views, steps), x)

    def stepper(self, x: torch.Tensor, seed: int) -> StepDraws:
        """The same draws as ``draw``, one step at a time, for the images still being repaired."""
        return StepDraws(pixels(x), seed, self.views())

    def sample_params(self, x: torch.Tensor, seed: int, names: list[str] | None = None) -> Params:
        """One evaluation's parameters (the first step's draws) for each task, or each of ``names``: B×… tensors."""
        return at_step(self.draw(x, seed, 1, names), 0)

    def per_task(self, x: torch.Tensor, params: dict[str, dict]) -> dict[str, torch.Tensor]:
        return {name: task.loss(x, **params[name]) for name, task in self.tasks.items()}

    def combine(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective from per-task losses (each Tensor[B])."""
        if self.levels is None:
            return sum(self.alpha[name] * loss for name, loss in losses.items())
        return sum(self.alpha[name] * (loss - self.levels[name]).clamp(min=0) for name, loss in losses.items())

    def forward(self, x: torch.Tensor, params: dict[str, dict]) -> torch.Tensor:
        return self.combine(self.per_task(x, params))

    def signature(self) -> dict:
        """What fixes the objective beyond the networks: an exported repair graph is valid for this one only."""
        views = {name: v for name, v in self.views().items() if v is not None}
        return {"tasks": list(self.tasks), "alpha": [round(self.alpha[t], 8) for t in self.tasks],
                "levels": None if self.levels is None else [round(self.levels[t], 8) for t in self.tasks],
                "views": views}


@dataclass
class RepairResult:
    images: torch.Tensor                    # B×3×H×W, x + r in [0, 1]
    trace: torch.Tensor                     # steps×B: L_m at the start of each step (NaN: not repaired)
    score: torch.Tensor | None = None       # B: the gate's score (None without a gate)
    repaired: torch.Tensor | None = None    # B bool: inputs the gate sent to the repair


def uniform_start(x: torch.Tensor, seed: int) -> torch.Tensor:
    """U[0, 1) noise shaped like x, image i's from its own start stream: where the random start comes from."""
    return torch.from_numpy(start_noise(pixels(x), seed)).to(x.device, x.dtype)


def start_point(x: torch.Tensor, noise: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """The random start x + (2u − 1)·ε, in [0, 1]."""
    return (x + (2 * noise - 1) * eps).clamp(0, 1)


def sign_step(x_r: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, eps: float | torch.Tensor,
              step_size: float | torch.Tensor) -> torch.Tensor:
    """One projected sign-gradient descent step: down the gradient, back into the ε-ball around x and into [0, 1].
    The exported repair graphs trace this very function (export/repair_graphs.py), so engines agree bit for bit."""
    return (x + (x_r - step_size * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)


def reverse_attack(objective: MultiTaskLoss, x: torch.Tensor, eps: float = DEFAULTS.eps, steps: int = DEFAULTS.steps,
                   step_size: float = DEFAULTS.step_size, seed: int = DEFAULTS.seed,
                   early_exit: bool = False) -> RepairResult:
    """Minimize ``objective`` over r with ‖r‖∞ ≤ eps, from a uniform random start; x + r is kept in [0, 1].

    Mao et al.'s reference settings are the defaults. With ``steps`` = 0 it returns x + (random start): the
    ``noise`` control that every repair must beat. With ``early_exit``, an image leaves the loop at the first step
    where its objective is exactly zero — which only the clean-level objective reaches, when every task is at or
    below its clean level: there the step does not move it (the gradient is zero, but for a task exactly at its
    level, a measure-zero case); the exit spares it the later steps, whose fresh draws might have pulled it again
    (measured equal in accuracy: docs/repair-graphs.md). Its trace is NaN from then on. Works when called under
    ``torch.no_grad()`` or ``torch.inference_mode()`` (as attack libraries and most serving code call a model): it
    turns autograd on for its own loop.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _descend(objective, x.detach().clone(), eps, steps, step_size, seed, early_exit)


def _descend(objective: MultiTaskLoss, x: torch.Tensor, eps: float, steps: int, step_size: float,
             seed: int, early_exit: bool) -> RepairResult:
    x_r = start_point(x, uniform_start(x, seed), eps)
    draws = objective.stepper(x, seed)
    trace = x.new_full((steps, len(x)), float("nan"))
    active = torch.arange(len(x), device=x.device)          # the images still in the loop
    for step in range(steps):
        if not len(active):
            break
        params = as_tensors(draws.next(active.tolist()), x)
        x_a = x_r[active].requires_grad_(True)
        loss = objective(x_a, params)
        grad, = torch.autograd.grad(loss.sum(), x_a)
        loss = loss.detach()
        trace[step, active] = loss
        x_r[active] = sign_step(x_a.detach(), x[active], grad, eps, step_size)
        if early_exit:
            active = active[loss != 0]
    return RepairResult(x_r.detach(), trace)
