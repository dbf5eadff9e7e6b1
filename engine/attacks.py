"""L∞ attacks on a classifier, one small class each (torchattacks style). Inputs are float images in [0, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PGD(nn.Module):
    """Projected gradient descent, L∞ (Madry et al., *Towards Deep Learning Models Resistant to Adversarial
    Attacks*, ICLR 2018): from a uniform random start in the ε-ball, ``steps`` signed-gradient ascent steps on the
    cross-entropy, each projected back onto the ball and onto [0, 1]. With ``restarts`` > 1 each image keeps the
    first restart that fools the model (else the last).

    Shapes: x N×3×H×W in [0, 1], y N (int64) -> adversarial images N×3×H×W.

    Example::

        x_adv = PGD(model, eps=8/255, alpha=2/255, steps=20)(x, y)
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 20,
                 restarts: int = 1, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.model, self.eps, self.alpha, self.steps, self.restarts = model, eps, alpha, steps, restarts
        self.generator = generator

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        best = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            x_adv = self._one_run(x, y)
            with torch.no_grad():
                now_fooled = self.model(x_adv).argmax(1) != y
            take = ~fooled
            best[take] = x_adv[take]
            fooled |= now_fooled
        return best

    def _one_run(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        x_adv = (x + (2 * noise - 1) * self.eps).clamp(0, 1)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(self.model(x_adv), y)
            grad, = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + self.alpha * grad.sign()
            x_adv = (x + (x_adv - x).clamp(-self.eps, self.eps)).clamp(0, 1)
        return x_adv.detach()
