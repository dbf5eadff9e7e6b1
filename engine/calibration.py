"""Clean-image statistics of the SSL losses (`cli.py calibrate` -> weights/calibration.json): what the clean-level
repair objective aims at, and what the gate compares an input against.

The per-image loss of every task on n clean *training* images (the test set stays unseen), with augmentation
parameters drawn as the repair draws them. From those losses:

- ``level(k)``: a quantile of L_k (default the median), the hinge of the clean-level objective;
- ``scale(k)``: the interquartile range of L_k, the unit that makes tasks comparable (α from clean statistics);
- ``score``: mean_k (L_k − median_k) / scale_k, how far an input's losses sit above the clean ones, and
  ``threshold(tasks, fpr)``: the (1 − fpr) quantile of the clean images' scores, so that a stated fraction of clean
  inputs is flagged.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.model_sets import model_set_split
from .models.weights import DEFAULT_WEIGHTS, WeightsError
from runtime.files import write_json

CALIBRATION_FILE = "calibration.json"


@dataclass
class Calibration:
    losses: dict[str, torch.Tensor]      # task -> per-image clean losses, Tensor[n]
    views: int | None                    # contrastive views the losses were measured with (None: no such task)
    sources: dict[str, str]              # network name -> sha256 of the weights measured

    def level(self, task: str, quantile: float = 0.5) -> float:
        return torch.quantile(self.losses[task], quantile).item()

    def scale(self, task: str) -> float:
        q25, q75 = torch.quantile(self.losses[task], torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
        return max(q75 - q25, 1e-8)

    def score_weights(self, tasks: list[str]) -> dict[str, float]:
        """w_k = 1 / (K · clean IQR_k): the score is Σ_k w_k (L_k − clean median_k), a weighted sum of the losses plus
        a constant (which is what an attacker who keeps the score low minimizes)."""
        return {t: 1 / (len(tasks) * self.scale(t)) for t in tasks}

    def score(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per image: mean over the given tasks of (L_k − clean median_k) / clean IQR_k."""
        weights = self.score_weights(list(losses))
        return sum(weights[t] * (loss - self.level(t)) for t, loss in losses.items())

    def threshold(self, tasks: list[str], fpr: float) -> float:
        """The score above which a fraction ``fpr`` of the clean calibration images lies."""
        if not 0 < fpr < 1:
            raise ValueError(f"the gate's false-positive rate must be between 0 and 1, not {fpr}")
        clean = self.score({t: self.losses[t].double() for t in tasks})
        return torch.quantile(clean, 1 - fpr).item()


def calibrate(pipeline, n: int = 2000, seed: int = 0, data_root: str | None = None) -> Calibration:
    """Every pipeline task's loss on a seeded subset of n clean training images (CIFAR-10, or the folder
    ``data_root`` at the pipeline's size)."""
    x_all, _ = model_set_split(data_root, "train", pipeline.inputs)
    if not 1 <= n <= len(x_all):
        raise ValueError(f"--n must be between 1 and {len(x_all)}, not {n}")
    pick = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed))[:n]
    return measure(pipeline, x_all[pick].float() / 255, seed)


@torch.no_grad()
def measure(pipeline, x: torch.Tensor, seed: int = 0, batch: int = 250) -> Calibration:
    """Every pipeline task's loss on clean images x (float in [0, 1], N×3×S×S)."""
    chunks: dict[str, list[torch.Tensor]] = {t: [] for t in pipeline.tasks}
    for i in range(0, len(x), batch):
        for task, loss in pipeline.task_losses(x[i:i + batch], seed).items():
            chunks[task].append(loss.double().cpu())
    views = {v for v in pipeline.objective.views().values() if v is not None}
    return Calibration({t: torch.cat(c) for t, c in chunks.items()}, views.pop() if views else None,
                       {t: pipeline.manifests[t]["sha256"] for t in pipeline.tasks})


def save_calibration(calibration: Calibration, path: Path, command: str, *, overwrite: bool = False) -> None:
    if path.exists() and not overwrite:
        raise WeightsError(f"{path} already exists; pass --overwrite to replace it, or choose another --out")
    write_json(path, {
        "views": calibration.views, "sources": calibration.sources, "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "summary": {t: {"median": calibration.level(t), "iqr": calibration.scale(t),
                        "q90": calibration.level(t, 0.9)} for t in calibration.losses},
        "losses": {t: [round(v, 6) for v in loss.tolist()] for t, loss in calibration.losses.items()},
    })


def calibration_path(weights: str | os.PathLike | None = None, path: str | os.PathLike | None = None) -> Path:
    """``path`` if given, else calibration.json beside the weights (default: the shipped weights/)."""
    return Path(path) if path is not None else Path(weights or DEFAULT_WEIGHTS) / CALIBRATION_FILE


def load_calibration(path: str | os.PathLike, tasks: list[str], manifests: dict[str, dict],
                     views: int, required: list[str] | None = None) -> Calibration:
    """The calibration at ``path`` for those of ``tasks`` it holds, checked against the networks loaded: the same
    weights, the same contrastive views; ``required`` (default: all of ``tasks``) must be there. WeightsError with the
    fix otherwise."""
    import json

    path = Path(path)
    required = list(tasks) if required is None else required
    if not path.exists():
        raise WeightsError(f"the clean-level objective and the gate need clean-loss statistics: {path} is missing; "
                           f"run `{calibrate_command(required, views)}` (or use the plain objective, which needs "
                           'none: --objective plain, load_pipeline(objective="plain"), and no gate)')
    data = json.loads(path.read_text())
    # measuring again keeps every task the file holds, so that the fix for one task does not take another's away
    command = calibrate_command(list(dict.fromkeys([*data["losses"], *tasks])), views)
    fix = f"run `{command} --out {path} --overwrite` to measure it again"
    missing = [t for t in required if t not in data["losses"]]
    if missing:
        raise WeightsError(f"{path} has no statistics for {', '.join(missing)}; {fix}")
    tasks = [t for t in tasks if t in data["losses"]]
    stale = [t for t in tasks if data["sources"].get(t) != manifests[t]["sha256"]]
    if stale:
        raise WeightsError(f"{path} was measured on other weights of {', '.join(stale)}; {fix}")
    if any(depends_on_views(t) for t in tasks) and data["views"] != views:
        other = path.with_name(f"calibration_views{views}.json")
        raise WeightsError(f"{path} was measured with {data['views']} contrastive views, not {views}; run "
                           f"`{command} --out {other}` and pass --calibration {other}")
    return Calibration({t: torch.tensor(data["losses"][t], dtype=torch.float64) for t in tasks}, data["views"],
                       data["sources"])


def calibrate_command(tasks: list[str], views: int) -> str:
    return f"python cli.py calibrate --tasks {','.join(tasks)} --views {views}"


def depends_on_views(task: str) -> bool:
    """Whether a task's loss depends on the number of augmented views (contrastive, label consistency)."""
    from .tasks import TASKS, VIEW_TASKS

    return TASKS[task] in VIEW_TASKS
