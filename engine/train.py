"""Training recipes for the classifier and the three SSL networks, and the metrics their manifests report.

Every hyperparameter is in one table, engine/profiles.py's ``PROFILES``. Each recipe returns the trained network and its test-set metrics; ``train_model`` writes them with a manifest
(engine/weights.py), checkpointing every epoch (engine/checkpoint.py) so that ``--resume`` continues a stopped run.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from runtime import draws

from .attacks import PGD
from .checkpoint import Checkpoint
from .data import DataError
from .datasets import CIFAR, ImageSet, channel_stats, load_split, summary
from .models import build_model, num_params
from .profiles import PROFILES
from .provenance import differences, trained_on
from .tasks import augment
from .train_plan import fit_to_data
from .tasks.contrastive import nt_xent_pairs
from .tasks.inpainting import centre_mask
from .tasks.rotation import rotate_all
from .heads import HEAD_TASKS, attach_backbone, backbone_config, base_task
from .weights import WeightsError, load_model, model_input, save_model

# ---------------------------------------------------------------------------------------------------------- helpers

def log(msg: str) -> None:
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {msg}")          # above a progress bar, where one is drawn
    sys.stdout.flush()


def shuffled_batches(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches over a fresh permutation; the last partial batch is dropped (BatchNorm dislikes tiny ones)."""
    order = torch.randperm(n, generator=generator)
    for i in range(0, n - batch + 1, batch):
        yield order[i:i + batch]


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int | None = None) -> torch.Tensor:
    """The standard CIFAR training augmentation: random translation by up to ``pad`` pixels (reflect padding;
    default an eighth of the side, CIFAR's 4 at 32) and a random horizontal flip, per image."""
    n, _, h, w = x.shape
    pad = max(1, w // 8) if pad is None else pad
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
               name: str, checkpoint: Checkpoint | None = None, on_step: Callable[[], None] | None = None) -> None:
    """The shared loop: shuffle, batch, ``step_loss(indices, x_batch)``, step with the triangular schedule; with a
    checkpoint, the state is saved after every epoch and a saved run continues from its last epoch. ``on_step`` is
    called after every step (a progress bar)."""
    steps_per_epoch = len(train_x) // cfg["batch"]
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_x)} training images are fewer than one batch of {cfg['batch']}")
    done = checkpoint.restore(model, optimizer, generator) if checkpoint else 0
    if done:
        log(f"{name}: resuming after epoch {done}/{cfg['epochs']} ({checkpoint.meta})")
    total, step, peak = cfg["epochs"] * steps_per_epoch, done * steps_per_epoch, cfg["lr"]
    for epoch in range(done, cfg["epochs"]):
        model.train()
        if cfg.get("backbone"):
            model.backbone.eval()      # a frozen backbone keeps the classifier's BatchNorm statistics
        start, running = time.time(), 0.0
        for idx in shuffled_batches(len(train_x), cfg["batch"], generator):
            for group in optimizer.param_groups:
                group["lr"] = triangular_lr(step, total, peak)
            x = train_x[idx].to(device, non_blocking=True).float().div_(255)
            running += take_step(step_loss, optimizer, idx, x)
            step += 1
            if on_step:
                on_step()
        log(f"{name} epoch {epoch + 1}/{cfg['epochs']}: loss {running / steps_per_epoch:.4f}, "
            f"{time.time() - start:.0f} s")
        if checkpoint:
            checkpoint.save(model, optimizer, generator, epoch + 1)


def take_step(step_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
              idx: torch.Tensor, x: torch.Tensor) -> float:
    """One optimizer step on the batch ``x`` (rows ``idx`` of the training split); returns its loss."""
    loss = step_loss(idx, x)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


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


CLASSIFIERS = ("classifier", "classifier-standard")


def load_data(data_root: str | None, size: int, labelled: bool) -> tuple[dict, ImageSet]:
    """The train and test splits as the recipes take them (uint8 images, int64 labels), and the train split."""
    train, test = (load_split(data_root, split, size, progress=True) for split in ("train", "test"))
    for split, images in (("train", train), ("test", test)):
        log(summary(images, split))
    if labelled:                  # a classifier learns from the images that have a class
        train, test = train.labelled(), test.labelled()
        if len(train.classes) < 2 or not len(train.images) or not len(test.images):
            raise DataError(f"a classifier needs class subfolders (at least 2) with images in both splits; "
                            f"{data_root} has {len(train.classes)} class(es), {len(train.images)} train and "
                            f"{len(test.images)} test images with a class")
    return {"train_x": train.images, "train_y": train.labels, "test_x": test.images, "test_y": test.labels}, train


def is_folder(images: ImageSet) -> bool:
    """Whether the images came from a folder of images (not CIFAR-10's batches)."""
    return "cifar10_md5" not in images.checksum


def input_entry(data_root: str | None, train: ImageSet) -> dict:
    """The manifest's ``input``: what images the network takes and where they came from."""
    dataset = Path(data_root).resolve().name if is_folder(train) else CIFAR
    return {"size": train.size, "dataset": dataset, "classes": train.classes, "class_names": train.class_names,
            "source": train.checksum}


def folder_config(name: str, cfg: dict, train: ImageSet) -> dict:
    """A network's config for the images of ``train``: a folder's normalized by its own statistics, and a
    classifier's output sized to its classes (CIFAR-10's are the recipe's)."""
    config = dict(cfg["config"])
    if is_folder(train):
        config["mean"], config["std"] = channel_stats(train.images)
        if name in CLASSIFIERS:
            config["num_classes"] = len(train.classes)
    return config


def recipe(name: str, profile: str, epochs: int | None = None) -> dict:
    """``profile``'s recipe for ``name`` (a copy), with ``epochs`` where given."""
    if profile not in PROFILES or name not in PROFILES[profile]:
        raise ValueError(f"no {name!r} recipe in profile {profile!r}")
    cfg = {**PROFILES[profile][name], "config": dict(PROFILES[profile][name]["config"])}
    return cfg if epochs is None else {**cfg, "epochs": epochs}


def train_model(name: str, profile: str = "cpu", data_root: str | None = None, out_dir: str = "weights",
                seed: int = 0, device: str | None = None, overwrite: bool = False,
                epochs: int | None = None, command: str | None = None, size: int = 32, resume: bool = False,
                on_step: Callable[[], None] | None = None) -> str:
    """Train ``name`` with ``profile``'s recipe on ``data_root`` (None or "cifar10": CIFAR-10; else a folder of
    images) at side ``size``, sized to the data where it is smaller than the recipe's (engine/train_plan.py),
    measure it on the test split, write weights + manifest (with what it was trained on: engine/provenance.py).
    Every epoch is checkpointed; ``resume`` continues a stopped run of the same settings and data. ``command`` is
    recorded in the manifest: the command line that reproduces this run; ``on_step`` is called after every step."""
    cfg = recipe(name, profile, epochs)
    final = Path(out_dir) / f"{name}.json"
    if final.exists() and not overwrite:            # before hours of training, not after
        raise WeightsError(f"{final} already exists; pass --overwrite to replace it, or choose another --out")
    provenance = trained_on(data_root, size, seed, profile)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data, train = load_data(data_root, size, labelled=name in CLASSIFIERS)
    cfg, sized = fit_to_data(cfg, len(data["train_x"]))
    extra = {"sized_from_data": sized} if sized else {}
    if cfg.get("backbone"):                # a head: the classifier beside it in out_dir lends its frozen backbone
        classifier, classifier_manifest = load_model(cfg["backbone"], out_dir)
        if model_input(classifier_manifest)["size"] != size:
            raise WeightsError(f"the classifier in {out_dir} takes {model_input(classifier_manifest)['size']}-pixel "
                               f"images; this head was asked for --size {size}")
        cfg["config"] = {**cfg["config"], **backbone_config(classifier_manifest["config"])}
        model = build_model(cfg["architecture"], cfg["config"])
        extra["backbone"] = attach_backbone(model, classifier, classifier_manifest)
    else:
        cfg["config"] = folder_config(name, cfg, train)
        model = build_model(cfg["architecture"], cfg["config"])
    inputs = input_entry(data_root, train)
    recipe_entry = {k: v for k, v in cfg.items() if k not in ("architecture", "config")}
    checkpoint = Checkpoint(out_dir, name, {"recipe": recipe_entry, "config": cfg["config"], "input": inputs,
                                            "seed": seed, "profile": profile, "trained_on": provenance})
    if checkpoint.exists() and not resume:
        if not overwrite:
            raise WeightsError(f"{checkpoint.meta} holds an unfinished run of {name}: pass --resume to continue it, "
                               "or --overwrite to start again")
        checkpoint.remove()
    if checkpoint.exists():
        changed = differences(checkpoint.recorded().get("trained_on"), provenance)
        if changed:
            raise WeightsError(f"{checkpoint.meta} is an unfinished run of {name} on other data or settings "
                               f"({'; '.join(changed)}): pass --overwrite to start it again")
    log(f"training {name} ({profile} profile, {cfg['epochs']} epochs, {size}×{size}) on {dev}")
    start = time.time()
    model, metrics = train_recipe(name, model.to(dev, memory_format=torch.channels_last), cfg, data, generator, dev,
                                  checkpoint, on_step)
    wall = time.time() - start
    log(f"{name} done in {wall / 60:.1f} min: {metrics}")
    source = {} if is_folder(train) else {"data_md5": train.checksum["cifar10_md5"]}
    manifest = {
        "architecture": cfg["architecture"], "config": cfg["config"], "params": num_params(model),
        "recipe": recipe_entry, "profile": profile, "command": command, "input": inputs, **source,
        "trained_on": provenance, "epochs": cfg["epochs"], "seed": seed, "wall_seconds": round(wall, 1),
        "metrics": metrics, **extra,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = save_model(model, name, out_dir, manifest, overwrite=overwrite)
    checkpoint.remove()
    return str(path)
