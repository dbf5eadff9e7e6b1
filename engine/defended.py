"""The repair as a module that attack libraries can run: ``Purifier`` (x -> repaired x) and ``DefendedClassifier``
(x -> logits of the classifier on the repaired x), both on [0, 1] inputs N×3×S×S (S: the model set's size).

With ``bpda=True`` the backward pass treats the repair as the identity (BPDA, Athalye et al., ICML 2018): the
attacker's gradient is the classifier's gradient at the repaired image, the standard adaptive evaluation of a
purification defence. Without it no gradient reaches the input (a repair of sign steps has a zero gradient almost
everywhere): for forward-only use, such as scoring transfer attacks.

Each call draws the repair's randomness afresh (the seed advances with every forward), so that an attack which
averages gradients over calls (EOT) sees the randomized defence it faces; with ``fresh_draws=False`` every call runs
``seed`` itself: the function `cli.py repair --seed SEED` and `cli.py serve` deploy, whose draws depend only on the
seed and each image's pixels (runtime/draws.py). Both work under ``torch.no_grad()`` —
how torchattacks, AutoAttack and ART call a model — since the repair turns autograd on for its own loop.

Example::

    import torchattacks
    from engine import DefendedClassifier, load_pipeline

    model = DefendedClassifier(load_pipeline(), bpda=True, steps=10).eval()
    x_adv = torchattacks.PGD(model, eps=8/255, alpha=2/255, steps=20)(x, y)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from runtime.settings import DEFAULTS

RepairFn = Callable[[torch.Tensor, int], torch.Tensor]      # (images, seed) -> repaired images


class Purifier(nn.Module):
    """x N×3×H×W in [0, 1] -> the repaired x (``pipeline.repair`` at ``eps``, ``steps``, ``step_size``, or
    ``repair``: a callable (images, seed) -> repaired images, for a repair the pipeline's defaults do not name).
    ``fresh_draws``: each call with the next seed (a randomized defense), or always with ``seed`` (the deployed
    one)."""

    def __init__(self, pipeline, bpda: bool = True, eps: float = DEFAULTS.eps, steps: int = DEFAULTS.steps,
                 step_size: float = DEFAULTS.step_size, seed: int = DEFAULTS.seed, repair: RepairFn | None = None,
                 fresh_draws: bool = True) -> None:
        super().__init__()
        self.bpda, self.seed, self.calls, self.fresh_draws = bpda, seed, 0, fresh_draws
        self._repair = repair or (lambda x, s: pipeline.repair(x, eps, steps, step_size, s))

    def repair(self, x: torch.Tensor) -> torch.Tensor:
        """The repaired images, without a gradient."""
        self.calls += 1
        seed = self.seed + 1_000_003 * self.calls if self.fresh_draws else self.seed
        with torch.enable_grad():           # attack libraries call models under no_grad; the repair needs autograd
            return self._repair(x.detach(), seed).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        repaired = self.repair(x)
        return x + (repaired - x).detach() if self.bpda else repaired   # BPDA: the repair's value, identity's gradient


class DefendedClassifier(nn.Module):
    """x N×3×S×S in [0, 1] -> logits N×C of ``pipeline.classifier`` on the repaired x (a ``Purifier`` with the
    same arguments in front of it)."""

    def __init__(self, pipeline, bpda: bool = True, eps: float = DEFAULTS.eps, steps: int = DEFAULTS.steps,
                 step_size: float = DEFAULTS.step_size, seed: int = DEFAULTS.seed, repair: RepairFn | None = None,
                 fresh_draws: bool = True) -> None:
        super().__init__()
        self.purifier = Purifier(pipeline, bpda, eps, steps, step_size, seed, repair, fresh_draws)
        self.classifier = pipeline.classifier

    def repair(self, x: torch.Tensor) -> torch.Tensor:
        return self.purifier.repair(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purifier(x))
