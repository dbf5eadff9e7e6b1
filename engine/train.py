"""Training recipes for the classifier and the three SSL networks, and the metrics their manifests report.

One table, ``PROFILES``, holds every hyperparameter: ``cpu`` is sized so that all four models train in well under
90 minutes on a 2-core machine; ``gpu`` is the larger variant for a CUDA GPU. Each recipe returns the trained network
and its test-set metrics; ``train_model`` writes them with a manifest (engine/weights.py).
"""
from __future__ import annotations

import os
import platform
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import PGD
from .data import dataset_md5, load_cifar10
from .models import build_model, num_params
from .tasks import augment
from .tasks.contrastive import nt_xent_pairs
from .tasks.inpainting import centre_mask
from .tasks.rotation import rotate_all
from .heads import HEAD_TASKS, attach_backbone, base_task
from .weights import load_model, save_model

PROFILES: dict[str, dict[str, dict]] = {
    "cpu": {
        # Fast adversarial training (FGSM with random start, Wong et al. 2020): step 10/255 = 1.25 ε is their
        # setting; the DESIGN probe reached 71.8 % clean / 42.8 % PGD-10 with this net in 12 epochs.
        "classifier": dict(architecture="Classifier", config=dict(widths=(32, 128, 128)), epochs=12, batch=256,
                           lr=0.1, weight_decay=5e-4, eps=8 / 255, fgsm_step=10 / 255),
        # SimCLR with in-batch negatives; τ = 0.2 as in the repair loss.
        "contrastive": dict(architecture="ContrastiveNet", config=dict(widths=(32, 128, 128), proj_dim=64,
                                                                       bank_size=4096),
                            epochs=7, batch=256, lr=2e-3, weight_decay=1e-4, tau=0.2),
        "rotation": dict(architecture="RotationNet", config=dict(widths=(16, 64, 64)), epochs=5, batch=128,
                         lr=0.2, weight_decay=5e-4),
        "inpainting": dict(architecture="ContextEncoder", config=dict(width=32), epochs=6, batch=256, lr=2e-3,
                           weight_decay=1e-4),
        # Heads on the classifier's frozen backbone (engine/heads.py): only the head trains, so an epoch costs about
        # one backbone forward per view (3 min for the contrastive head, 2.5 min for rotation's four).
        # 1 rotation epoch reached 65.2 % rotation accuracy (the independent net: 83.6 %), hence 3. A head's widths
        # are its classifier's (train_model reads them from the classifier it attaches to).
        "contrastive-head": dict(architecture="ContrastiveNet", config=dict(proj_dim=64, bank_size=4096),
                                 backbone="classifier", epochs=3, batch=256, lr=2e-3, weight_decay=1e-4, tau=0.2),
        "rotation-head": dict(architecture="RotationHead", config=dict(), backbone="classifier", epochs=3,
                              batch=128, lr=0.05, weight_decay=5e-4),
        "inpainting-head": dict(architecture="InpaintingHead", config=dict(width=64),
                                backbone="classifier", epochs=3, batch=256, lr=2e-3, weight_decay=1e-4),
    },
    "gpu": {
        "classifier": dict(architecture="Classifier", config=dict(widths=(64, 256, 256)), epochs=40, batch=512,
                           lr=0.2, weight_decay=5e-4, eps=8 / 255, fgsm_step=10 / 255),
        "contrastive": dict(architecture="ContrastiveNet", config=dict(widths=(64, 256, 256), proj_dim=128,
                                                                       bank_size=8192),
                            epochs=100, batch=512, lr=2e-3, weight_decay=1e-4, tau=0.2),
        "rotation": dict(architecture="RotationNet", config=dict(widths=(64, 256, 256)), epochs=30, batch=256,
                         lr=0.2, weight_decay=5e-4),
        "inpainting": dict(architecture="ContextEncoder", config=dict(width=64), epochs=40, batch=512, lr=2e-3,
                           weight_decay=1e-4),
        "contrastive-head": dict(architecture="ContrastiveNet", config=dict(proj_dim=128, bank_size=8192),
                                 backbone="classifier", epochs=20, batch=512, lr=2e-3, weight_decay=1e-4, tau=0.2),
        "rotation-head": dict(architecture="RotationHead", config=dict(), backbone="classifier", epochs=10,
                              batch=256, lr=0.05, weight_decay=5e-4),
        "inpainting-head": dict(architecture="InpaintingHead", config=dict(width=128),
                                backbone="classifier", epochs=20, batch=512, lr=2e-3, weight_decay=1e-4),
    },
}


# ---------------------------------------------------------------------------------------------------------- helpers

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def shuffled_batches(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches over a fresh permutation; the last partial batch is dropped (BatchNorm dislikes tiny ones)."""
    order = torch.randperm(n, generator=generator)
    for i in range(0, n - batch + 1, batch):
        yield order[i:i + batch]


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The standard CIFAR training augmentation: random translation by up to ``pad`` pixels (reflect padding)
    and a random horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    dy, dx = (torch.randint(0, 2 * pad + 1, (2, n), generator=generator))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, 3, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, 3, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def triangular_lr(step: int, total: int, peak: float, warmup: float = 0.2) -> float:
    """Linear warm-up to ``peak`` over the first ``warmup`` fraction, then linear decay to 0 (airbench's shape)."""
    t = step / max(total, 1)
    return peak * (t / warmup if t < warmup else max(0.0, (1 - t) / (1 - warmup)))


def run_epochs(model: nn.Module, cfg: dict, train_x: torch.Tensor, generator: torch.Generator, device: torch.device,
               step_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
               name: str) -> None:
    """The shared loop: shuffle, batch, ``step_loss(indices, x_batch)``, step with the triangular schedule."""
    steps_per_epoch = len(train_x) // cfg["batch"]
    total, step, peak = cfg["epochs"] * steps_per_epoch, 0, cfg["lr"]
    for epoch in range(cfg["epochs"]):
        model.train()
        if cfg.get("backbone"):
            model.backbone.eval()      # a frozen backbone keeps the classifier's BatchNorm statistics
        start, running = time.time(), 0.0
        for idx in shuffled_batches(len(train_x), cfg["batch"], generator):
            for group in optimizer.param_groups:
                group["lr"] = triangular_lr(step, total, peak)
            x = train_x[idx].to(device, non_blocking=True).float().div_(255)
            loss = step_loss(idx, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item()
            step += 1
        log(f"{name} epoch {epoch + 1}/{cfg['epochs']}: loss {running / steps_per_epoch:.4f}, "
            f"{time.time() - start:.0f} s")


def sgd(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9, nesterov=True,
                           weight_decay=cfg["weight_decay"])


def adamw(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x_uint8: torch.Tensor, device: torch.device,
            batch: int = 500) -> torch.Tensor:
    """``fn`` over uint8 images in batches, scaled to [0, 1]; outputs concatenated on the CPU."""
    return torch.cat([fn(x_uint8[i:i + batch].to(device).float().div_(255)).cpu()
                      for i in range(0, len(x_uint8), batch)])


# ---------------------------------------------------------------------------------------------------------- recipes

def train_classifier(model: nn.Module, cfg: dict, data: dict, generator: torch.Generator, device: torch.device):
    optimizer, eps, step_size = sgd(model, cfg), cfg["eps"], cfg["fgsm_step"]

    def fgsm_rs_loss(idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x, y = crop_flip(x, generator), data["train_y"][idx].to(device)
        delta = ((torch.rand(x.shape, generator=generator) * 2 - 1) * eps).to(device).requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model((x + delta).clamp(0, 1)), y), delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
        return F.cross_entropy(model((x + delta).clamp(0, 1)), y)

    run_epochs(model, cfg, data["train_x"], generator, device, fgsm_rs_loss, optimizer, "classifier")
    model.eval().requires_grad_(False)
    return model, classifier_metrics(model, data, device)


def classifier_metrics(model: nn.Module, data: dict, device: torch.device, n_pgd: int | None = None) -> dict:
    """Clean accuracy on the test set, and PGD-20 (ε 8/255, step 2/255) accuracy on its first ``n_pgd`` images."""
    test_x, test_y = data["test_x"], data["test_y"]
    n_pgd = len(test_x) if n_pgd is None else min(n_pgd, len(test_x))
    clean = (batched(model, test_x, device).argmax(1) == test_y).float().mean().item()
    log(f"classifier clean accuracy {clean:.4f}; running PGD-20 on {n_pgd} test images")
    attack = PGD(model, eps=8 / 255, alpha=2 / 255, steps=20, generator=torch.Generator().manual_seed(0))
    correct = 0
    for i in range(0, n_pgd, 500):
        end = min(n_pgd, i + 500)
        x, y = test_x[i:end].to(device).float().div_(255), test_y[i:end].to(device)
        correct += (model(attack(x, y)).argmax(1) == y).sum().item()
    return {"clean_accuracy": clean, "pgd20_accuracy": correct / n_pgd, "pgd20_eps": 8 / 255, "pgd20_step": 2 / 255,
            "n_test": len(test_x)}


def train_rotation(model: nn.Module, cfg: dict, data: dict, generator: torch.Generator, device: torch.device):
    labels = torch.arange(4, device=device)

    def rotation_loss(idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        rotated = rotate_all(crop_flip(x, generator))          # 4 blocks of N, rotation k in block k
        return F.cross_entropy(model(rotated), labels.repeat_interleave(len(x)))

    run_epochs(model, cfg, data["train_x"], generator, device, rotation_loss, sgd(model, cfg), "rotation")
    model.eval()
    correct = batched(lambda x: (model(rotate_all(x)).argmax(1).view(4, -1) == labels[:, None]).float().sum(0),
                      data["test_x"], device)
    return model, {"rotation_accuracy": correct.sum().item() / (4 * len(data["test_x"]))}


def train_contrastive(model: nn.Module, cfg: dict, data: dict, generator: torch.Generator, device: torch.device):

    def simclr_loss(idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = {k: v.to(device) for k, v in augment.sample_views(len(x), 2, generator).items()}
        views = augment.apply_views(x, **params)                 # N×2×3×32×32
        z = model(views.flatten(0, 1)).view(len(x), 2, -1)
        return nt_xent_pairs(z[:, 0], z[:, 1], cfg["tau"])

    run_epochs(model, cfg, data["train_x"], generator, device, simclr_loss, adamw(model, cfg), "contrastive")
    model.eval()
    fill_bank(model, data, generator, device)
    knn = knn_accuracy(model, data, device, k=20)
    return model, {"knn_accuracy": knn, "knn_k": 20, "bank_size": model.bank.shape[0]}


@torch.no_grad()
def fill_bank(model: nn.Module, data: dict, generator: torch.Generator, device: torch.device) -> None:
    """The negative bank: one augmented view of each of bank-size training images, like training's negatives."""
    pick = torch.randperm(len(data["train_x"]), generator=generator)[:model.bank.shape[0]]
    bank_x = data["train_x"][pick]
    params = augment.sample_views(len(bank_x), 1, generator)
    views = augment.apply_views(bank_x.float().div(255), **params)[:, 0]
    model.bank.copy_(torch.cat([model(views[i:i + 500].to(device)) for i in range(0, len(views), 500)]))


def knn_accuracy(model: nn.Module, data: dict, device: torch.device, k: int = 20, temperature: float = 0.07) -> float:
    """Weighted kNN (Wu et al., 2018) on unit-norm backbone features: train set as memory, test set as queries."""
    train_f = F.normalize(batched(model.embed, data["train_x"], device), dim=1)
    test_f = F.normalize(batched(model.embed, data["test_x"], device), dim=1)
    train_y, correct = data["train_y"], 0
    for i in range(0, len(test_f), 1000):
        sim, nn_idx = (test_f[i:i + 1000] @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), 10).scatter_add_(1, train_y[nn_idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == data["test_y"][i:i + 1000]).sum().item()
    return correct / len(test_f)


def train_inpainting(model: nn.Module, cfg: dict, data: dict, generator: torch.Generator, device: torch.device):

    def masked_mse(idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = crop_flip(x, generator)
        mask = centre_mask(len(x), device=device)
        return ((model(x, mask) - x) ** 2 * mask).sum() / (mask.sum() * 3)

    run_epochs(model, cfg, data["train_x"], generator, device, masked_mse, adamw(model, cfg), "inpainting")
    model.eval()
    return model, inpainting_metrics(model, data, device)


def inpainting_metrics(model: nn.Module, data: dict, device: torch.device) -> dict:
    """Test-set squared error in the dropped centre, against filling it with the image's mean context colour."""

    def errors(x: torch.Tensor) -> torch.Tensor:
        mask = centre_mask(len(x), device=x.device)
        per_pixel = 3 * mask.sum((1, 2, 3))
        context_mean = (x * (1 - mask)).sum((2, 3), keepdim=True) / (1 - mask).sum((2, 3), keepdim=True)
        model_err = ((model(x, mask) - x) ** 2 * mask).sum((1, 2, 3)) / per_pixel
        baseline_err = ((context_mean - x) ** 2 * mask).sum((1, 2, 3)) / per_pixel
        return torch.stack([model_err, baseline_err], 1)

    mse, baseline = batched(errors, data["test_x"], device).mean(0).tolist()
    return {"inpainting_mse": mse, "mean_colour_baseline_mse": baseline, "reduction_vs_baseline": 1 - mse / baseline}


RECIPES = {"classifier": train_classifier, "contrastive": train_contrastive, "rotation": train_rotation,
           "inpainting": train_inpainting}
RECIPES.update({head: RECIPES[base_task(head)] for head in HEAD_TASKS})


def train_model(name: str, profile: str = "cpu", data_root: str | None = None, out_dir: str = "weights",
                seed: int = 0, device: str | None = None, overwrite: bool = False,
                epochs: int | None = None, command: str | None = None) -> str:
    """Train ``name`` with ``profile``'s recipe, measure it on the test set, write weights + manifest.
    ``command`` is recorded in the manifest: the command line that reproduces this run."""
    cfg = dict(PROFILES[profile][name])
    if epochs is not None:
        cfg["epochs"] = epochs
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = load_cifar10("train", data_root)
    test_x, test_y = load_cifar10("test", data_root)
    data = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    log(f"training {name} ({profile} profile, {cfg['epochs']} epochs) on {dev}")
    start = time.time()
    extra = {}
    if cfg.get("backbone"):                # a head: the classifier beside it in out_dir lends its frozen backbone
        classifier, classifier_manifest = load_model(cfg["backbone"], out_dir)
        cfg["config"] = {**cfg["config"], "widths": classifier_manifest["config"]["widths"]}
        model = build_model(cfg["architecture"], cfg["config"])
        extra["backbone"] = attach_backbone(model, classifier, classifier_manifest)
    else:
        model = build_model(cfg["architecture"], cfg["config"])
    model, metrics = RECIPES[name](model.to(dev, memory_format=torch.channels_last), cfg, data, generator, dev)
    wall = time.time() - start
    log(f"{name} done in {wall / 60:.1f} min: {metrics}")
    manifest = {
        "architecture": cfg["architecture"], "config": cfg["config"], "params": num_params(model),
        "recipe": {k: v for k, v in cfg.items() if k not in ("architecture", "config")}, "profile": profile,
        "command": command,
        "data_md5": dataset_md5(data_root), "epochs": cfg["epochs"], "seed": seed,
        "wall_seconds": round(wall, 1), "metrics": metrics, **extra,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return str(save_model(model, name, out_dir, manifest, overwrite=overwrite))

