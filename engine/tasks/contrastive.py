"""Contrastive learning (SimCLR, Chen et al., 2020): NT-Xent with temperature τ over V augmented views.

At repair time the negatives are the network's fixed bank of clean training-image embeddings, never the other images
of the batch, so that an image's loss is its own (docs/design.md, principle 3). Training uses the usual in-batch
negatives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import augment

# Added to self-similarities before the log-sum-exp: exp(-1e4) is 0 in float32, and unlike -inf it exports cleanly.
SELF_MASK = -1e4


def nt_xent_pairs(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """The training loss: mean NT-Xent over 2N anchors; unit-norm z1, z2 N×D are two views of the same N images."""
    z = torch.cat([z1, z2])
    n = len(z1)
    sim = z @ z.T / tau + SELF_MASK * torch.eye(2 * n, device=z.device, dtype=z.dtype)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def nt_xent_bank(z: torch.Tensor, bank: torch.Tensor, tau: float) -> torch.Tensor:
    """The per-image loss B: z B×V×D are unit-norm projections of V views of each image; positives are the other
    views of the same image, negatives the K bank rows (K×D). Mean over the V(V−1) anchor–positive pairs."""
    views = z.shape[1]
    eye = torch.eye(views, device=z.device, dtype=z.dtype)
    sim_views = z @ z.transpose(1, 2) / tau                          # B×V×V
    sim_bank = z @ bank.T / tau                                      # B×V×K
    lse = torch.logsumexp(torch.cat([sim_views + SELF_MASK * eye, sim_bank], dim=2), dim=2)   # B×V
    positives = (sim_views * (1 - eye)).sum((1, 2)) / (views * (views - 1))
    return lse.mean(1) - positives


class ContrastiveTask(nn.Module):
    """Per-image contrastive loss over ``views`` augmented views (default 4, as in Mao et al.).

    Shapes: x B×3×S×S in [0, 1], params: V views per image (runtime/draws.py) -> loss B.
    """

    name = "contrastive"

    def __init__(self, net: nn.Module, views: int = 4, tau: float = 0.2) -> None:
        super().__init__()
        if views < 2:
            raise ValueError("the contrastive loss needs at least 2 views per image")
        self.net, self.views, self.tau = net, views, tau


    def loss(self, x: torch.Tensor, **params: torch.Tensor) -> torch.Tensor:
        views = augment.apply_views(x, **params)
        z = self.net(views.flatten(0, 1)).unflatten(0, views.shape[:2])
        return nt_xent_bank(z, self.net.bank, self.tau)
