"""How much signal an attack leaves for the repair: each task's SSL loss on clean, PGD-attacked and randomly perturbed
test images (the same seeded subset as `cli.py eval`).

A repair can only reverse what the attack changed. Per task this reports the mean loss of each set, the shift from
clean in units of the clean interquartile range, the fraction of images whose loss the attack raised (paired), and the
AUC of the loss as a clean-vs-attacked detector (0.5: no signal). Uniform noise of the repair's ε_r is the reference:
an attack that moves a loss less than noise does leaves nothing for that loss to find.

    python -m bench.attack_signal --n 1000 --json results/ablation/attack_signal.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from engine.attacks import PGD
from engine.evaluate import eval_subset
from engine.heads import HEAD_TASKS
from engine.pipeline import DEFAULT_TASKS, load_pipeline
from engine.weights import write_json


def auc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """P(positive > negative) + ½ P(tie): the Mann–Whitney form of the ROC AUC."""
    greater = (positives[:, None] > negatives[None, :]).double().mean()
    ties = (positives[:, None] == negatives[None, :]).double().mean()
    return (greater + 0.5 * ties).item()


def measure(n: int, seed: int, eps_r: float, chunk: int = 100) -> dict:
    tasks = [*DEFAULT_TASKS, *HEAD_TASKS]
    p = load_pipeline(tasks=tasks)
    x, y, _ = eval_subset(n, seed)
    losses: dict[str, dict[str, list[torch.Tensor]]] = {s: {t: [] for t in tasks} for s in ("clean", "pgd", "noise")}
    for start in range(0, n, chunk):
        xc, yc = x[start:start + chunk], y[start:start + chunk]
        # the attack of `cli.py eval` (same seeds for the same chunk size)
        pgd = PGD(p.classifier, 8 / 255, 2 / 255, 20, generator=torch.Generator().manual_seed(seed + start))
        attacked = pgd(xc, yc)
        noise = torch.rand(xc.shape, generator=torch.Generator().manual_seed(seed + start))
        noisy = (xc + (2 * noise - 1) * eps_r).clamp(0, 1)
        for name, images in (("clean", xc), ("pgd", attacked), ("noise", noisy)):
            with torch.no_grad():
                for task, loss in p.task_losses(images, seed).items():
                    losses[name][task].append(loss.double())
    result = {"n": n, "seed": seed, "noise_eps": eps_r, "tasks": {}}
    for task in tasks:
        clean, pgd, noisy = (torch.cat(losses[s][task]) for s in ("clean", "pgd", "noise"))
        q25, q75 = torch.quantile(clean, torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
        iqr = q75 - q25
        result["tasks"][task] = {
            "mean_clean": clean.mean().item(), "mean_pgd": pgd.mean().item(), "mean_noise": noisy.mean().item(),
            "shift_pgd_in_clean_iqr": (pgd - clean).mean().item() / iqr,
            "shift_noise_in_clean_iqr": (noisy - clean).mean().item() / iqr,
            "fraction_raised_by_pgd": (pgd > clean).double().mean().item(),
            "auc_clean_vs_pgd": auc(clean, pgd), "auc_clean_vs_noise": auc(clean, noisy)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eps-r", type=float, default=16 / 255)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = measure(args.n, args.seed, args.eps_r)
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
