"""A model set's plan, made before its first model trains: what the data holds, how each stage is sized from it, and
how long each stage will take, estimated from a measured first batch.

A recipe (engine/train/profiles.py) is written for a folder of ~10,000 photos. A smaller folder is fitted, not
refused: a batch larger than the training split becomes the split (one step per epoch takes every image), the
contrastive bank of negatives becomes the training split (it is filled with one view of each), and the calibration
takes at most every training image. Below ``MIN_TRAIN_IMAGES`` no stage is sized down any further: a network whose
BatchNorm statistics come from fewer images than that learns noise, so the set is refused with that reason.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..data.cifar10 import DataError
from ..models.networks import build_model
from ..tasks.rotation import rotate_all

MIN_CLASSES = 2


@dataclass
class Stage:
    """One stage of a model set: its images, steps and, where measured, the seconds it is expected to take."""
    name: str
    detail: str
    seconds: float | None = None
    step_seconds: float | None = None           # a training step's, measured (the progress bar advances by it)
    steps: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class SetPlan:
    data: list[str]                 # what the data holds, in lines
    stages: list[Stage]
    calibration_n: int

    @property
    def seconds(self) -> float:
        return sum(s.seconds or 0 for s in self.stages)

    def lines(self) -> list[str]:
        width = max(len(s.name) for s in self.stages)
        out = ["plan:", *(f"  {line}" for line in self.data)]
        for stage in self.stages:
            when = "" if stage.seconds is None else f"~{minutes(stage.seconds)}"
            out.append(f"  {stage.name:<{width}}  {when:>14}  {stage.detail}")
            out += [f"  {'':<{width}}  {'':>14}  sized from the data: {note}" for note in stage.notes]
        out.append(f"  {'in all':<{width}}  {'~' + minutes(self.seconds):>14}  (estimates from a measured first "
                   "batch of each stage, on this machine as busy as it is now)")
        return out


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def data_lines(splits: dict[str, "object"]) -> list[str]:
    """Images per split, per class and in all (``splits``: split -> engine.data.model_sets.ImageSet)."""
    lines = []
    for split, images in splits.items():
        counts = Counter(images.labels.tolist())
        per_class = ", ".join(f"{name} {counts.get(i, 0)}" for i, name in enumerate(images.class_names))
        unlabelled = f", {counts[-1]} without a class" if counts.get(-1) else ""
        lines.append(f"{split}: {len(images.images)} images at {images.size}×{images.size}{unlabelled}"
                     + (f" ({per_class})" if per_class else ""))
    return lines


def check_classes(train, test) -> None:
    """DataError unless the classifier has at least ``MIN_CLASSES`` classes with images in both splits."""
    have = lambda images: {i for i in images.labels.tolist() if i >= 0}
    both = have(train) & have(test)
    if len(both) < MIN_CLASSES:
        raise DataError(f"a classifier needs at least {MIN_CLASSES} class subfolders with images in both the train "
                        f"and the test split; this data has {len(both)} (classes: {', '.join(train.class_names) or 'none'})")


def training_stage(name: str, cfg: dict, data: dict, device: torch.device, notes: list[str]) -> Stage:
    """A training stage, its time estimated from one measured step (after a warm-up step) on the first batch."""
    from .loop import take_step
    from .recipes import RECIPES

    steps = cfg["epochs"] * (len(data["train_x"]) // cfg["batch"])
    with torch.random.fork_rng():               # the run itself draws as if this never happened
        model = build_model(cfg["architecture"], cfg["config"]).to(device, memory_format=torch.channels_last)
        step_loss, optimizer = RECIPES[name].step(model, cfg, data, torch.Generator().manual_seed(0), device)
        model.train()
        idx = torch.arange(cfg["batch"])
        x = data["train_x"][idx].to(device).float().div_(255)
        for _ in range(2):
            start = time.perf_counter()
            take_step(step_loss, optimizer, idx, x)
        step_seconds = time.perf_counter() - start
        seconds = steps * step_seconds
        per_epoch = steps // cfg["epochs"]
        detail = f"{len(data['train_x'])} images, {cfg['epochs']} epochs of {per_epoch} step" \
                 f"{'s' if per_epoch > 1 else ''} of {cfg['batch']}"
        if cfg.get("eps") is not None:          # a classifier: its PGD-20 measurement costs 21 passes per image
            n_pgd = min(cfg.get("pgd_n") or len(data["test_x"]), len(data["test_x"]))
            seconds += 21 * n_pgd * input_gradient_seconds(model, data["test_x"][:64].to(device))
            detail += f"; then PGD-20 on {n_pgd} test images"
    return Stage(name, detail, seconds, step_seconds, steps, notes)


def input_gradient_seconds(model: torch.nn.Module, x_uint8: torch.Tensor) -> float:
    """Seconds per image of one forward and backward pass to the input (a PGD step), measured after a warm-up."""
    model.eval()
    x = x_uint8.float().div(255).requires_grad_(True)
    for _ in range(2):
        start = time.perf_counter()
        model(x).logsumexp(1).sum().backward()
    return (time.perf_counter() - start) / len(x)


@torch.no_grad()
def calibration_seconds(configs: dict[str, dict], x_uint8: torch.Tensor, n: int, views: int,
                        device: torch.device) -> float:
    """The calibration's time: each SSL network's forward passes (contrastive: ``views`` views, rotation: four
    rotations, inpainting: one) on ``n`` images, from one measured batch of untrained networks of the same shape."""
    x = x_uint8[:64].to(device).float().div(255)
    per_image = 0.0
    for name, cfg in configs.items():
        model = build_model(cfg["architecture"], cfg["config"]).to(device).eval()
        if name == "rotation":
            run = lambda: model(rotate_all(x))
        elif name == "inpainting":
            mask = torch.zeros_like(x[:, :1])
            run = lambda: model(x, mask)
        else:
            run = lambda: model(x.repeat(views, 1, 1, 1))
        for _ in range(2):
            start = time.perf_counter()
            run()
        per_image += (time.perf_counter() - start) / len(x)
    return per_image * n


class SetProgress:
    """One bar over a whole model set, in estimated seconds: each training step advances it by its stage's measured
    step time, each finished stage brings it to where the plan puts that stage's end. An estimate that falls short
    grows the bar's total rather than running past it."""

    def __init__(self, plan: SetPlan) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=max(1, round(plan.seconds)), unit="s", desc="model set", dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} of ~{total} s estimated")
        self.done = 0.0

    def step(self, seconds: float) -> None:
        self.reach(self.bar.n + seconds)

    def finished(self, stage: Stage) -> None:
        self.done += stage.seconds or 0
        self.reach(self.done)

    def reach(self, seconds: float) -> None:
        if seconds > self.bar.total:
            self.bar.total = round(seconds) + 1
        self.bar.update(seconds - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def plan_set(models: list[str], profile: str, data_root: str | None, size: int, calibration_n: int,
             device: torch.device, kept: set[str] = frozenset(), views: int = 4) -> SetPlan:
    """The plan of a model set of ``models`` (those in ``kept`` were trained before and stay): the data checked, each
    stage sized from it, and each stage's time estimated from a measured first batch."""
    from ..data.model_sets import load_split
    from .profiles import fit_to_data, recipe
    from .trainer import CLASSIFIERS, folder_config

    train, test = (load_split(data_root, split, size, progress=True) for split in ("train", "test"))
    splits = {"train": train, "test": test}
    lines = data_lines(splits) + [f"  skipped {name}: {why}" for images in splits.values()
                                  for name, why in images.skipped]
    if any(m in CLASSIFIERS for m in models):
        check_classes(train, test)
    as_data = lambda a, b: {"train_x": a.images, "train_y": a.labels, "test_x": b.images, "test_y": b.labels}
    everything, labelled = as_data(train, test), as_data(train.labelled(), test.labelled())
    stages, configs = [], {}
    for name in models:
        data = labelled if name in CLASSIFIERS else everything
        cfg, notes = fit_to_data(recipe(name, profile), len(data["train_x"]))
        cfg["config"] = folder_config(name, cfg, train)
        configs[name] = cfg
        stages.append(Stage(name, "trained before on the same data and settings: kept", 0.0) if name in kept
                      else training_stage(name, cfg, data, device, notes))
    n = min(calibration_n, len(train.images))
    ssl = {name: cfg for name, cfg in configs.items() if name not in CLASSIFIERS}
    stages.append(Stage("calibration", f"the SSL losses of {n} clean training images",
                        calibration_seconds(ssl, train.images, n, views, device),
                        notes=[f"{calibration_n} -> {n} images: the training split has {n}"] if n < calibration_n
                        else []))
    stages.append(Stage("export", "the ONNX graphs and their parity checks (OUT/onnx): not estimated, it does not "
                                  "grow with the data"))
    return SetPlan(lines, stages, n)


def summary_lines(out_dir, manifests: dict[str, dict], calibration: dict, data_root: str) -> list[str]:
    """What a finished model set gives: each network's measured quality, the calibration, and the next commands."""
    percent = lambda v: f"{100 * v:.1f} %"
    lines = []
    for name, m in manifests.items():
        metrics = m["metrics"]
        if "clean_accuracy" in metrics:
            n_pgd = metrics.get("n_pgd", metrics["n_test"])
            lines.append(f"{name}: clean accuracy {percent(metrics['clean_accuracy'])} on {metrics['n_test']} test "
                         f"images, PGD-20 (ε {metrics['pgd20_eps'] * 255:.0f}/255) {percent(metrics['pgd20_accuracy'])}"
                         f" on {n_pgd}")
        elif "knn_accuracy" in metrics:
            lines.append(f"{name}: kNN accuracy of its features {percent(metrics['knn_accuracy'])} "
                         f"(bank of {metrics['bank_size']} negatives)")
        elif "bank_size" in metrics:
            lines.append(f"{name}: bank of {metrics['bank_size']} negatives (no kNN accuracy: some images have no "
                         "class)")
        elif "rotation_accuracy" in metrics:
            lines.append(f"{name}: rotation accuracy {percent(metrics['rotation_accuracy'])} (chance 25 %)")
        elif "reduction_vs_baseline" in metrics:
            lines.append(f"{name}: squared error in the hole {metrics['inpainting_mse']:.4f}, against "
                         f"{metrics['mean_colour_baseline_mse']:.4f} for filling it with the mean colour")
    medians = ", ".join(f"{t} {v['median']:.4g}" for t, v in calibration["summary"].items())
    n = len(next(iter(calibration["losses"].values())))
    lines.append(f"calibration: {n} clean training images; median losses {medians}")
    lines += ["next:", f"  python cli.py repair --weights {out_dir} --input PHOTOS --output REPAIRED",
              f"  python cli.py eval --weights {out_dir} --data {data_root} --n 200",
              f"  python cli.py serve --weights {out_dir}"]
    return lines
