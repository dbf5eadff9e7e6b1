"""The training loop every recipe shares: shuffled batches, the triangular learning rate, one optimizer step, a
checkpoint after every epoch (engine/models/checkpoint.py) so that a stopped run continues; and the small helpers of
the recipes (the CIFAR augmentation, the optimizers, batched evaluation)."""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.cifar10 import DataError
from ..models.checkpoint import Checkpoint


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
