"""The repair in front of the classifier as one ``nn.Module``, for attack libraries (torchattacks, AutoAttack, ART).

``forward(x) = classifier(repair(x))`` on [0, 1] inputs. With ``bpda=True`` the backward pass treats the repair as
the identity (BPDA, Athalye et al., ICML 2018): the attacker's gradient is the classifier's gradient at the repaired
image, the standard adaptive evaluation of a purification defence. Without it, the gradient is whatever autograd
gets through the repair's last step (the sign steps have zero gradient), which understates an attacker.

Each call draws the repair's randomness afresh (``seed`` advances with every forward), so that an attack which
averages gradients over calls (EOT) sees the randomized defence it faces.

Example::

    model = DefendedClassifier(load_pipeline(), bpda=True, steps=10)
    x_adv = PGD(model, eps=8/255)(x, y)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class DefendedClassifier(nn.Module):
    """x N×3×32×32 in [0, 1] -> logits N×C of ``pipeline.classifier`` on the repaired x.

    ``repair``: a callable (images, seed) -> repaired images to use instead of ``pipeline.repair`` with the given
    ε_r, steps and step size (the evaluation passes the repair under test this way)."""

    def __init__(self, pipeline, bpda: bool = True, eps: float = 16 / 255, steps: int = 40,
                 step_size: float = 2 / 255, seed: int = 0,
                 repair: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.classifier, self.bpda, self.seed, self.calls = pipeline.classifier, bpda, seed, 0
        self._repair = repair or (lambda x, s: pipeline.repair(x, eps, steps, step_size, s))

    def repair(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        with torch.enable_grad():           # attack libraries call models under no_grad; the repair needs autograd
            return self._repair(x.detach(), self.seed + 1_000_003 * self.calls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        repaired = self.repair(x)
        if self.bpda:
            repaired = x + (repaired - x).detach()     # value of the repair, gradient of the identity
        return self.classifier(repaired)
