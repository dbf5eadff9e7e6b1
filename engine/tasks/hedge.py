"""The hedge defence (Wu et al., 2021, *Attacking Adversarial Attacks as a Defense*) as a repair loss.

An adversarial image sits just across a decision boundary; a clean one sits deep inside its class. Wu et al. move
the input to raise the cross-entropy of *every* class at once, Σ_c CE(F(x), c): near a boundary this pushes the
logits apart less than it pulls the wrongly-winning class down, and the true class tends to win again. As a loss to
minimize: L_h(x) = −(1/C) Σ_c CE(F(x), c) = (1/C) Σ_c log softmax(F(x))_c (the 1/C keeps it on a per-class scale).

Training-free and label-free; it reads only the classifier's logits, so it works in front of any classifier. No
randomness: it draws no parameters. Their setting is 20 steps of 4/255 within 8/255 from a random start.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HedgeTask(nn.Module):
    """Shapes: x B×3×S×S in [0, 1] -> loss B. ``net`` is the classifier (logits N×C)."""

    name = "hedge"

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.net(x), dim=1).mean(1)
