"""A recipe per network: the loss of one training batch with its optimizer (``step``), and the test-split metrics its
manifest reports (``done``); ``train_recipe`` runs the shared loop (loop.py) between them. Every hyperparameter is in
engine/train/profiles.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime import draws

from ..attacks import PGD
from ..data.cifar10 import DataError
from ..models.checkpoint import Checkpoint
from ..models.heads import HEAD_TASKS, base_task
from ..tasks import augment
from ..tasks.contrastive import nt_xent_pairs
from ..tasks.inpainting import centre_mask
from ..tasks.rotation import rotate_all
from .loop import adamw, batched, crop_flip, log, run_epochs, sgd


# A recipe's step: the loss of one batch (its indices into the training split, its images in [0, 1]) and the
# optimizer that steps on it.
Step = tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.optim.Optimizer]


def classifier_step(model: nn.Module, cfg: dict, data: dict, generator: torch.Generator,
                    device: torch.device) -> Step:
    """Fast adversarial training (FGSM from a random start); a ``fgsm_step`` of 0 is clean training."""
    eps, step_size = cfg["eps"], cfg["fgsm_step"]

    def fgsm_rs_loss(idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x, y = crop_flip(x, generator), data["train_y"][idx].to(device)
        if step_size == 0:
            return F.cross_entropy(model(x), y)
        delta = ((torch.rand(x.shape, generator=generator) * 2 - 1) * eps).to(device).requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model((x + delta).clamp(0, 1)), y), delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
        return F.cross_entropy(model((x + delta).clamp(0, 1)), y)

    return fgsm_rs_loss, sgd(model, cfg)


def classifier_done(model: nn.Module, cfg: dict, data: dict, generator: torch.Generator,
                    device: torch.device) -> dict:
    model.requires_grad_(False)
    return classifier_metrics(model, data, device, n_pgd=cfg.get("pgd_n"), eps=cfg["eps"])


def classifier_metrics(model: nn.Module, data: dict, device: torch.device, n_pgd: int | None = None,
                       eps: float = 8 / 255) -> dict:
    """Clean accuracy on the test set, and PGD-20 (ε, step ε/4) accuracy on ``n_pgd`` of its images (all of them, or
    a seeded random subset: a folder's test split is sorted by class, so its first images would be a class or two)."""
    test_x, test_y = data["test_x"], data["test_y"]
    n_test = len(test_x)
    n_pgd = n_test if n_pgd is None else min(n_pgd, n_test)
    clean = (batched(model, test_x, device).argmax(1) == test_y).float().mean().item()
    log(f"classifier clean accuracy {clean:.4f}; running PGD-20 on {n_pgd} test images")
    attack = PGD(model, eps=eps, alpha=eps / 4, steps=20, generator=torch.Generator().manual_seed(0))
    if n_pgd < n_test:
        pick = torch.randperm(n_test, generator=torch.Generator().manual_seed(0))[:n_pgd]
        test_x, test_y = test_x[pick], test_y[pick]
    correct = 0
    for i in range(0, n_pgd, 500):
        end = min(n_pgd, i + 500)
        x, y = test_x[i:end].to(device).float().div_(255), test_y[i:end].to(device)
        correct += (model(attack(x, y)).argmax(1) == y).sum().item()
    return {"clean_accuracy": clean, "pgd20_accuracy": correct / n_pgd, "pgd20_eps": eps, "pgd20_step": eps / 4,
            "n_test": n_test, "n_pgd": n_pgd}


def rotation_step(model: nn.Module, cfg: dict, data: dict, generator: torch.Generator,
                  device: torch.device) -> Step:
    labels = torch.arange(4, device=device)

    def rotation_loss(idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        rotated = rotate_all(crop_flip(x, generator))          # 4 blocks of N, rotation k in block k
        return F.cross_entropy(model(rotated), labels.repeat_interleave(len(x)))

    return rotation_loss, sgd(model, cfg)


def rotation_done(model: nn.Module, cfg: dict, data: dict, generator: torch.Generator, device: torch.device) -> dict:
    labels = torch.arange(4, device=device)
    correct = batched(lambda x: (model(rotate_all(x)).argmax(1).view(4, -1) == labels[:, None]).float().sum(0),
                      data["test_x"], device)
    return {"rotation_accuracy": correct.sum().item() / (4 * len(data["test_x"]))}


def contrastive_step(model: nn.Module, cfg: dict, data: dict, generator: torch.Generator,
                     device: torch.device) -> Step:

    def simclr_loss(idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = {k: v.to(device) for k, v in augment.sample_views(len(x), 2, generator, x.shape[-1]).items()}
        views = augment.apply_views(x, **params)                 # N×2×3×S×S
        z = model(views.flatten(0, 1)).view(len(x), 2, -1)
        return nt_xent_pairs(z[:, 0], z[:, 1], cfg["tau"])

    return simclr_loss, adamw(model, cfg)


def contrastive_done(model: nn.Module, cfg: dict, data: dict, generator: torch.Generator,
                     device: torch.device) -> dict:
    fill_bank(model, data, generator, device)
    if (data["train_y"] < 0).any() or (data["test_y"] < 0).any():      # kNN accuracy needs every image's class
        return {"bank_size": model.bank.shape[0]}
    return {"knn_accuracy": knn_accuracy(model, data, device, k=20), "knn_k": 20, "bank_size": model.bank.shape[0]}


@torch.no_grad()
def fill_bank(model: nn.Module, data: dict, generator: torch.Generator, device: torch.device) -> None:
    """The negative bank: one augmented view of each of bank-size training images, like training's negatives."""
    pick = torch.randperm(len(data["train_x"]), generator=generator)[:model.bank.shape[0]]
    bank_x = data["train_x"][pick]
    if len(bank_x) < model.bank.shape[0]:
        raise DataError(f"the contrastive bank takes {model.bank.shape[0]} training images; there are {len(bank_x)}")
    params = augment.sample_views(len(bank_x), 1, generator, bank_x.shape[-1])
    views = augment.apply_views(bank_x.float().div(255), **params)[:, 0]
    model.bank.copy_(torch.cat([model(views[i:i + 500].to(device)) for i in range(0, len(views), 500)]))


def knn_accuracy(model: nn.Module, data: dict, device: torch.device, k: int = 20, temperature: float = 0.07) -> float:
    """Weighted kNN (Wu et al., 2018) on unit-norm backbone features: train set as memory, test set as queries."""
    train_f = F.normalize(batched(model.embed, data["train_x"], device), dim=1)
    test_f = F.normalize(batched(model.embed, data["test_x"], device), dim=1)
    train_y, correct = data["train_y"], 0
    for i in range(0, len(test_f), 1000):
        sim, nn_idx = (test_f[i:i + 1000] @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), int(train_y.max()) + 1)
        votes.scatter_add_(1, train_y[nn_idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == data["test_y"][i:i + 1000]).sum().item()
    return correct / len(test_f)


def inpainting_step(model: nn.Module, cfg: dict, data: dict, generator: torch.Generator,
                    device: torch.device) -> Step:

    def masked_mse(idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = crop_flip(x, generator)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        mask = inpainting_masks(cfg.get("mask", "centre"), len(x), x.shape[-1], seed).to(device)
        return ((model(x, mask) - x) ** 2 * mask).sum() / (mask.sum() * 3)

    return masked_mse, adamw(model, cfg)


def inpainting_done(model: nn.Module, cfg: dict, data: dict, generator: torch.Generator,
                    device: torch.device) -> dict:
    return inpainting_metrics(model, data, device, cfg.get("mask", "centre"))


def inpainting_masks(kind: str, n: int, size: int, seed: int) -> torch.Tensor:
    """n×1×size×size: the centre hole, or (``kind`` "patches") each image's random patches drawn as the repair draws
    them (runtime/draws.py)."""
    if kind == "patches":
        rng = np.random.default_rng(seed)
        return torch.from_numpy(np.stack([draws.patch_mask(rng, size) for _ in range(n)]))
    return centre_mask(n, size=size)


def inpainting_metrics(model: nn.Module, data: dict, device: torch.device, kind: str = "centre") -> dict:
    """Test-set squared error in the dropped region (the centre, or random patches drawn from a fixed seed), against
    filling it with the image's mean context colour."""

    def errors(x: torch.Tensor) -> torch.Tensor:
        mask = inpainting_masks(kind, len(x), x.shape[-1], seed=0).to(x.device)
        per_pixel = 3 * mask.sum((1, 2, 3))
        context_mean = (x * (1 - mask)).sum((2, 3), keepdim=True) / (1 - mask).sum((2, 3), keepdim=True)
        model_err = ((model(x, mask) - x) ** 2 * mask).sum((1, 2, 3)) / per_pixel
        baseline_err = ((context_mean - x) ** 2 * mask).sum((1, 2, 3)) / per_pixel
        return torch.stack([model_err, baseline_err], 1)

    mse, baseline = batched(errors, data["test_x"], device).mean(0).tolist()
    return {"inpainting_mse": mse, "mean_colour_baseline_mse": baseline, "reduction_vs_baseline": 1 - mse / baseline}


@dataclass(frozen=True)
class Recipe:
    """How a network trains: ``step`` builds the loss of one batch and the optimizer, ``done`` measures the trained
    network (in eval mode) on the test split; ``train_recipe`` runs the epochs between them."""
    step: Callable[[nn.Module, dict, dict, torch.Generator, torch.device], Step]
    done: Callable[[nn.Module, dict, dict, torch.Generator, torch.device], dict]


RECIPES = {"classifier": Recipe(classifier_step, classifier_done), "contrastive": Recipe(contrastive_step,
                                                                                          contrastive_done),
           "rotation": Recipe(rotation_step, rotation_done), "inpainting": Recipe(inpainting_step, inpainting_done)}
RECIPES.update({"classifier-standard": RECIPES["classifier"], "inpainting-patches": RECIPES["inpainting"]})
RECIPES.update({head: RECIPES[base_task(head)] for head in HEAD_TASKS})


def train_recipe(name: str, model: nn.Module, cfg: dict, data: dict, generator: torch.Generator,
                 device: torch.device, checkpoint: Checkpoint | None = None,
                 on_step: Callable[[], None] | None = None) -> tuple[nn.Module, dict]:
    """Train ``model`` by ``name``'s recipe for ``cfg["epochs"]`` and measure it: (the network in eval mode, its
    test-split metrics)."""
    recipe = RECIPES[name]
    step_loss, optimizer = recipe.step(model, cfg, data, generator, device)
    run_epochs(model, cfg, data["train_x"], generator, device, step_loss, optimizer, name, checkpoint, on_step)
    model.eval()
    return model, recipe.done(model, cfg, data, generator, device)
