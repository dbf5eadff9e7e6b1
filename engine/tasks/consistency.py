"""Label consistency (SOAP, Shi et al., ICLR 2021): a classifier should give the same prediction for every
augmented view of one image. Adversarial perturbations are brittle under crops and colour changes, so an attacked
image's views disagree more than a clean image's; the repair pulls them back into agreement.

Per image: (1/V) Σ_v ‖p_v − p̄‖²₂, p_v = softmax(F(view_v(x))), p̄ their mean — the spread of the V predictions
(SOAP's pairwise ‖p_i − p_j‖² up to a constant factor, and one pass per view instead of one per pair). No label and
no network of its own: it reads the classifier's output, so it is tied to that classifier.
"""
from __future__ import annotations

import torch
from torch import nn

from . import augment


def prediction_spread(probs: torch.Tensor) -> torch.Tensor:
    """probs B×V×C -> B: mean squared distance of each view's prediction to the views' mean prediction."""
    return ((probs - probs.mean(1, keepdim=True)) ** 2).sum(2).mean(1)


class ConsistencyTask(nn.Module):
    """Shapes: x B×3×S×S in [0, 1], params: V views per image, as the contrastive task's (runtime/draws.py)
    -> loss B. ``net`` is the classifier (logits N×C)."""

    name = "consistency"

    def __init__(self, net: nn.Module, views: int = 4) -> None:
        super().__init__()
        if views < 2:
            raise ValueError("label consistency needs at least 2 views per image")
        self.net, self.views = net, views


    def loss(self, x: torch.Tensor, **params: torch.Tensor) -> torch.Tensor:
        views = augment.apply_views(x, **params)
        logits = self.net(views.flatten(0, 1)).unflatten(0, views.shape[:2])
        return prediction_spread(logits.softmax(-1))
