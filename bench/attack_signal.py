"""How much signal an attack leaves for the repair: each task's SSL loss on clean, PGD-attacked and randomly perturbed
test images (the same seeded subset and PGD-20 attack as `cli.py eval`).

A repair can only reverse what the attack changed. Per task this reports the mean loss of each set, the shift from
clean in units of the clean interquartile range, the fraction of images whose loss the attack raised (paired), and the
AUC of the loss as a clean-vs-attacked detector (0.5: no signal). Uniform noise of the repair's ε_r is the reference:
an attack that moves a loss less than noise does leaves nothing for that loss to find. Where the weights folder has a
calibration, the gate's score (mean over the tasks of (L_k − clean median_k) / clean IQR_k) gets the same columns.

    python -m bench.attack_signal --n 1000 --json results/ablation/attack_signal.json
    python -m bench.attack_signal --n 1000 --weights weights/joint-robust \
        --tasks contrastive-head,inpainting-head,rotation-head,consistency,hedge --json results/joint/signal_robust.json
    python -m bench.attack_signal --n 3925 --weights weights/imagenette --tasks contrastive,inpainting,rotation \
        --data $IMAGENETTE_ROOT --attack-eps 4/255 --json results/imagenette/signal_eps4.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from engine.attacks import PGD
from engine.calibration import calibration_path, load_calibration
from engine.eval.evaluate import eval_subset
from engine.models.heads import HEAD_TASKS
from engine.pipeline import DEFAULT_TASKS, load_pipeline
from engine.models.weights import WeightsError
from runtime.cli import FRACTION
from runtime.files import write_json
from runtime.settings import DEFAULTS


GATE_FPR = 0.05      # the gate's stated false-positive rate on clean training images


def auc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """P(positive > negative) + ½ P(tie): the Mann–Whitney form of the ROC AUC."""
    greater = (positives[:, None] > negatives[None, :]).double().mean()
    ties = (positives[:, None] == negatives[None, :]).double().mean()
    return (greater + 0.5 * ties).item()


def measure(n: int, seed: int, eps_r: float, weights: Path | None = None, tasks: list[str] | None = None,
            threads: int | None = None, chunk: int = 100, data: str | None = None,
            attack_eps: float = 8 / 255) -> dict:
    """``data``: the test images' folder (None: CIFAR-10); PGD-20 at ``attack_eps``, step ``attack_eps``/4."""
    if threads:
        torch.set_num_threads(threads)
    tasks = tasks or [*DEFAULT_TASKS, *HEAD_TASKS]
    p = load_pipeline(weights, tasks=tasks, objective="plain")
    try:
        calibration, note = load_calibration(calibration_path(weights), tasks, p.manifests, 4), None
    except WeightsError as e:
        calibration, note = None, f"no gate score: {e}"
    x, y, _ = eval_subset(n, seed, data, p.inputs)
    losses: dict[str, dict[str, list[torch.Tensor]]] = {s: {t: [] for t in tasks} for s in ("clean", "pgd", "noise")}
    for start in range(0, n, chunk):
        xc, yc = x[start:start + chunk], y[start:start + chunk]
        # the attack of `cli.py eval` (same seeds for the same chunk size)
        pgd = PGD(p.classifier, attack_eps, attack_eps / 4, 20, generator=torch.Generator().manual_seed(seed + start))
        attacked = pgd(xc, yc)
        noise = torch.rand(xc.shape, generator=torch.Generator().manual_seed(seed + start))
        noisy = (xc + (2 * noise - 1) * eps_r).clamp(0, 1)
        for name, images in (("clean", xc), ("pgd", attacked), ("noise", noisy)):
            with torch.no_grad():
                for task, loss in p.task_losses(images, seed).items():
                    losses[name][task].append(loss.double())
    per_set = {s: {t: torch.cat(v) for t, v in by_task.items()} for s, by_task in losses.items()}
    scores = {t: {s: per_set[s][t] for s in per_set} for t in tasks}
    if calibration is not None:
        scores["gate score"] = {s: calibration.score(per_set[s]) for s in per_set}
    result = {"n": n, "seed": seed, "noise_eps": eps_r, "attack_eps": attack_eps, "data": data or "cifar10",
              "size": p.size, "threads": torch.get_num_threads(), "note": note,
              "weights": {k: m["sha256"] for k, m in p.manifests.items()}, "tasks": {}}
    for name, by_set in scores.items():
        clean, pgd, noisy = by_set["clean"], by_set["pgd"], by_set["noise"]
        q25, q75 = torch.quantile(clean, torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
        iqr = (q75 - q25) or float("nan")          # a constant loss has no spread to measure a shift in
        result["tasks"][name] = {
            "mean_clean": clean.mean().item(), "mean_pgd": pgd.mean().item(), "mean_noise": noisy.mean().item(),
            "shift_pgd_in_clean_iqr": (pgd - clean).mean().item() / iqr,
            "shift_noise_in_clean_iqr": (noisy - clean).mean().item() / iqr,
            "fraction_raised_by_pgd": (pgd > clean).double().mean().item(),
            "auc_clean_vs_pgd": auc(clean, pgd), "auc_clean_vs_noise": auc(clean, noisy)}
    if calibration is not None:            # the gate as it runs: threshold from the clean *training* images
        threshold = calibration.threshold(tasks, GATE_FPR)
        result["gate"] = {"fpr": GATE_FPR, "threshold": threshold,
                          **{f"flagged_{s}": (scores["gate score"][s] > threshold).double().mean().item()
                             for s in per_set}}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eps-r", type=float, default=DEFAULTS.eps)
    parser.add_argument("--weights", type=Path, default=None, help="weights folder (default: the shipped weights/)")
    parser.add_argument("--tasks", default=None, help="comma-separated (default: the six shipped networks)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data", default=None, help="test images: a folder (default: CIFAR-10)")
    parser.add_argument("--attack-eps", type=lambda v: FRACTION.convert(v, None, None), default=8 / 255,
                        help="PGD-20's ε, e.g. 4/255")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    tasks = args.tasks.split(",") if args.tasks else None
    result = measure(args.n, args.seed, args.eps_r, args.weights, tasks, args.threads, data=args.data,
                     attack_eps=args.attack_eps)
    for name, row in result["tasks"].items():
        print(f"{name:>18}: AUC clean vs PGD {row['auc_clean_vs_pgd']:.3f} (noise {row['auc_clean_vs_noise']:.3f}), "
              f"shift {row['shift_pgd_in_clean_iqr']:+.3f} clean IQR, raised for {row['fraction_raised_by_pgd']:.1%}")
    if "gate" in result:
        gate = result["gate"]
        print(f"gate at {gate['fpr']:.0%} false positives on clean training images: flags {gate['flagged_pgd']:.1%} "
              f"of PGD, {gate['flagged_noise']:.1%} of noise, {gate['flagged_clean']:.1%} of clean test images")
    if result["note"]:
        print(result["note"])
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
