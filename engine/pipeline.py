"""The Python API: ``load_pipeline()`` -> classifier, SSL loss and repair on the shipped (or given) weights.

Example::

    from engine import load_pipeline
    p = load_pipeline()                      # weights/ in this repository, CPU
    logits = p.classifier(x)                 # x: float in [0, 1], N×3×S×S (S = p.size: 32 for the shipped set)
    losses = p.ssl_loss(x)                   # Tensor[N], Σ α_k L_k
    x_rep = p.repair(x)                      # the CLI's default repair (runtime/settings.py: ε 16/255, 40 steps)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from runtime.settings import DEFAULTS

from .backends import BACKENDS, BackendUnavailable, ForwardBackend
from .backends.torch_backend import TorchBackend
from .calibration import Calibration, calibration_path, load_calibration
from .models.heads import HEAD_TASKS, check_backbone
from .models.provenance import check_same_data
from .models.weights import WeightsError, load_model, model_input, read_manifest
from .repair import MultiTaskLoss, RepairResult, reverse_attack
from .tasks import CLASSIFIER_TASKS, TASKS, VIEW_TASKS

DEFAULT_TASKS = ("contrastive", "inpainting", "rotation")
OBJECTIVES = ("plain", "clean")


@dataclass
class Gate:
    """Repair only the inputs whose SSL losses sit above the clean ones: score > threshold, with the threshold set
    so that a fraction ``fpr`` of the clean calibration images is flagged (engine/calibration.py)."""
    calibration: Calibration
    tasks: list[str]
    fpr: float

    def __post_init__(self) -> None:
        self.threshold = self.calibration.threshold(self.tasks, self.fpr)

    def score(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.calibration.score({t: losses[t] for t in self.tasks})


@dataclass
class Pipeline:
    classifier: nn.Module
    objective: MultiTaskLoss
    manifests: dict[str, dict] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    backend: ForwardBackend | None = None          # forward-only passes; None: the torch reference
    gate: Gate | None = None                       # None: repair every input
    calibration: Calibration | None = None         # clean-loss statistics, where loaded
    inputs: dict = field(default_factory=lambda: model_input({}))   # the model set's images: size, classes, …

    def __post_init__(self) -> None:
        if self.backend is None:
            self.backend = TorchBackend(self.classifier, self.objective)

    @property
    def size(self) -> int:
        """The side S of the N×3×S×S images every network of this pipeline takes."""
        return int(self.inputs["size"])

    @property
    def class_names(self) -> list[str]:
        """A readable name per class of the classifier (its index where the model set does not name them)."""
        return list(self.inputs["class_names"])

    @property
    def tasks(self) -> list[str]:
        return list(self.objective.tasks)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images N×3×H×W, got shape {tuple(x.shape)}")
        if x.shape[2:] != (self.size, self.size):
            raise ValueError(f"these networks take {self.size}×{self.size} images, got {x.shape[2]}×{x.shape[3]} "
                             f"(resize them, e.g. `cli.py repair --resize`, or load the model set of that size)")
        if not x.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got {x.dtype}: pass x.float() / 255")
        low, high = (x.aminmax() if x.numel() else (x.new_zeros(()), x.new_zeros(())))
        if low < 0 or high > 1:
            hint = ": divide 0–255 images by 255" if high > 1.5 else ""
            raise ValueError(f"expected images in [0, 1], got values from {low.item():.3g} to {high.item():.3g}{hint}")
        return x.to(self.device, torch.float32)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's logits N×C (float32), from the forward backend."""
        return self.backend.logits(self._to_device(x)).float()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes N (int64), from the forward backend."""
        return self.logits(x).argmax(1).to(self.device)

    def task_losses(self, x: torch.Tensor, seed: int = 0, tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Each task's (or each of ``tasks``') per-image loss (forward backend), with parameters drawn from the
        images' own generators (seeded as in the repair, so the same image always gets the same augmentations)."""
        x = self._to_device(x)
        return self.backend.task_losses(x, self.objective.sample_params(x, seed, tasks))

    def ssl_loss(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """The repair objective L_m(x) (Σ_k α_k L_k, or its clean-level form), per image: Tensor[N]."""
        return self.objective.combine(self.task_losses(x, seed))

    def repair_with_trace(self, x: torch.Tensor, eps: float = DEFAULTS.eps, steps: int = DEFAULTS.steps,
                          step_size: float = DEFAULTS.step_size, seed: int = DEFAULTS.seed,
                          objective: MultiTaskLoss | None = None, gate: Gate | None = None,
                          losses: dict[str, torch.Tensor] | None = None, early_exit: bool = DEFAULTS.early_exit) -> RepairResult:
        """The repair (of ``objective``, default the pipeline's) with its trace; with a gate (default the
        pipeline's), only inputs scoring above its threshold are repaired and the rest come back unchanged.
        ``losses``: x's task losses at this ``seed`` where the caller has them already (the gate reuses them).
        ``early_exit``: an image leaves the loop once its objective is zero (engine.repair.reverse_attack)."""
        x, objective, gate = self._to_device(x), objective or self.objective, gate or self.gate
        if gate is None:
            return self._reverse_attack(objective, x, eps, steps, step_size, seed, early_exit)
        if losses is None:
            with torch.no_grad():          # the score is forward only: the fast backends' job
                losses = self.task_losses(x, seed, gate.tasks)
        score = gate.score(losses).to(x.device)
        flagged = score > gate.threshold
        images, trace = x.clone(), x.new_full((steps, len(x)), float("nan"))
        if flagged.any():                  # each image's repair is its own (principle 3): a subset changes nothing
            result = self._reverse_attack(objective, x[flagged], eps, steps, step_size, seed, early_exit)
            images[flagged], trace[:, flagged] = result.images, result.trace
        return RepairResult(images, trace, score, flagged)

    def _reverse_attack(self, objective: MultiTaskLoss, *args) -> RepairResult:
        """The repair loop: in the backend's exported repair graph where it has one for this objective (same draws,
        same result: tests/test_repair_graphs.py), else PyTorch autograd (the reference)."""
        can_repair = getattr(self.backend, "can_repair", None)
        if can_repair is not None and can_repair(objective):
            return self.backend.reverse_attack(objective, *args)
        return reverse_attack(objective, *args)

    def repair(self, x: torch.Tensor, eps: float = DEFAULTS.eps, steps: int = DEFAULTS.steps,
               step_size: float = DEFAULTS.step_size, seed: int = DEFAULTS.seed,
               early_exit: bool = DEFAULTS.early_exit) -> torch.Tensor:
        """x + r with ‖r‖∞ ≤ eps minimizing the multi-task SSL loss: N×3×H×W in [0, 1]."""
        return self.repair_with_trace(x, eps, steps, step_size, seed, early_exit=early_exit).images


def build_objective(nets: dict[str, nn.Module], alpha: dict[str, float] | None = None, views: int = 4,
                    calibration: Calibration | None = None, level: float | None = None) -> MultiTaskLoss:
    """The multi-task loss over the given task networks (name -> network). With a calibration and a ``level``
    (a quantile of the clean losses), the clean-level objective: each task's α divided by its clean IQR, hinged
    at that quantile of its clean losses."""
    tasks = {name: (TASKS[name](net, views=views) if TASKS[name] in VIEW_TASKS else TASKS[name](net))
             for name, net in nets.items()}
    alpha = {name: (alpha or {}).get(name, 1.0) for name in tasks}
    if level is None:
        return MultiTaskLoss(tasks, alpha)
    return MultiTaskLoss(tasks, {t: a / calibration.scale(t) for t, a in alpha.items()},
                         {t: calibration.level(t, level) for t in tasks})


def load_pipeline(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  tasks: tuple[str, ...] | list[str] = DEFAULT_TASKS, alpha: dict[str, float] | None = None,
                  views: int = 4, backend: str = "torch", onnx_dir: str | os.PathLike | None = None,
                  precision: str = "fp32", objective: str = "clean", level: float = 0.5,
                  gate_fpr: float | None = None, calibration: str | os.PathLike | None = None,
                  threads: int | None = None, classifier: nn.Module | str | os.PathLike | None = None) -> Pipeline:
    """The classifier and the named SSL tasks from ``weights`` (default: the shipped ``weights/``).

    ``objective`` "clean" (the default, as in ``cli.py repair``: the measured best) aims each task at the ``level``
    quantile of its clean losses, α divided by the clean IQR; "plain" is Σ α_k L_k (needs no calibration).
    ``gate_fpr`` repairs only inputs whose loss score exceeds the clean images' (1 − fpr)
    quantile. Both read the clean statistics at ``calibration`` (default: calibration.json beside the weights),
    which are also loaded whenever that path is given.

    ``backend`` runs the forward-only passes ("torch", "onnxruntime", "tensorrt" at ``precision``, or "auto": the
    fastest present) from the graphs exported to ``onnx_dir`` (``export.onnx_export.load_exported_pipeline``
    exports them into a cache first). With "onnxruntime", the whole repair runs in the exported Loop graph where it
    was exported for this objective, else the gradient loop is PyTorch's; ``threads`` sets onnxruntime's intra-op
    threads (torch's are the process's: ``torch.set_num_threads``).

    ``classifier``: your own classifier instead of the shipped one — an ``nn.Module`` in eval mode, on ``device``,
    taking N×3×S×S images in [0, 1] (S: the model set's size; normalize inside it), or the path of an ONNX file of
    such a classifier (``engine.foreign.OnnxClassifier``: predictions by onnxruntime, at ``threads``). The repair's
    tasks must then be ones that do not read the shipped classifier's features (not the heads); consistency and
    hedge need a PyTorch module; the backend is torch. Raises ``engine.foreign.ClassifierError`` otherwise.

    Raises ``engine.models.weights.WeightsError``
    (a clear message) where a file is missing or does not match its manifest, and ``BackendUnavailable`` where the
    backend cannot run here.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    device = torch.device(device)
    foreign = classifier is not None
    nets, manifests = {}, {}
    if not foreign:
        classifier, manifests["classifier"] = load_model("classifier", weights, device)
    for name in tasks:                     # the networks of their own; the classifier's readers come below
        if name not in CLASSIFIER_TASKS:
            nets[name], manifests[name] = load_model(name, weights, device)
    inputs = model_set_input(manifests, weights)
    if foreign:
        from .foreign import foreign_classifier

        classifier, manifest = foreign_classifier(classifier, list(tasks), backend, device, threads, inputs["size"])
        if len(inputs["classes"]) != manifest["num_classes"]:      # another label set: classes by their index
            inputs = {**inputs, "classes": list(map(str, range(manifest["num_classes"])))}
            inputs["class_names"] = inputs["classes"]
        manifests = {"classifier": manifest, **manifests}
        backend = "torch"
    manifest = manifests["classifier"]
    backend = resolve_backend(backend, device)
    if backend == "tensorrt":                  # fail before any export work where it cannot run
        from .backends.tensorrt_engines import import_tensorrt

        import_tensorrt()
    for name in tasks:
        if name in CLASSIFIER_TASKS:       # reads the classifier itself: its weights are the classifier's
            nets[name], manifests[name] = classifier, manifest
        if name in HEAD_TASKS:
            check_backbone(name, manifests[name], manifest)
    nets = {name: nets[name] for name in tasks}
    for net in (n for n in (classifier, *nets.values()) if not (foreign and n is classifier)):
        net.requires_grad_(False)      # the repair differentiates w.r.t. the input only (a user's module untouched)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    stats = None
    if objective == "clean" or gate_fpr is not None or calibration is not None:
        # the clean objective and the gate read every task's statistics; a calibration passed for a caller's own
        # :clean rows (eval) is loaded for the tasks it holds, and the caller checks those it needs
        needed = list(tasks) if objective == "clean" or gate_fpr is not None else []
        stats = load_calibration(calibration_path(weights, calibration), list(tasks), manifests, views, needed)
    pipeline = Pipeline(classifier, build_objective(nets, alpha, views, stats, level if objective == "clean" else None)
                        .to(device), manifests, device, calibration=stats, inputs=inputs)
    if gate_fpr is not None:
        pipeline.gate = Gate(stats, list(tasks), gate_fpr)
    if backend in ("onnxruntime", "tensorrt"):
        if onnx_dir is None:               # the engine reads exported graphs; exporting them is export/'s job
            raise BackendUnavailable(f"the {backend} backend runs exported graphs: pass onnx_dir (a folder written "
                                     "by `python cli.py export --out DIR`), or load with "
                                     "export.onnx_export.load_exported_pipeline(), which exports into a cache")
        attach_backend(pipeline, backend, onnx_dir, threads, precision)
    return pipeline


def model_set_input(manifests: dict[str, dict], weights: str | os.PathLike | None) -> dict:
    """What the networks loaded from ``weights`` take (engine.models.weights.model_input): one size for all of them,
    else WeightsError naming each. The class names are the model set's classifier's (where the folder has one)."""
    sizes = {name: model_input(m)["size"] for name, m in manifests.items()}      # networks loaded from files only
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {size}×{size}" for name, size in sizes.items())
        raise WeightsError(f"the networks in {weights or 'weights/'} take images of different sizes ({listed}): "
                           "a model set is trained at one size (`cli.py train … --size S`)")
    check_same_data(manifests, weights)
    if "classifier" in manifests:
        return model_input(manifests["classifier"])
    try:
        classifier = model_input(read_manifest("classifier", weights))
    except WeightsError:                   # SSL networks only: no class names to give
        classifier = None
    entry = model_input(next(iter(manifests.values()))) if manifests else model_input({})
    if classifier is not None and classifier["size"] == entry["size"]:
        entry = {**entry, "classes": classifier["classes"], "class_names": classifier["class_names"]}
    return entry


def attach_backend(pipeline: Pipeline, backend: str, onnx_dir: str | os.PathLike, threads: int | None = None,
                   precision: str = "fp32") -> None:
    """Run ``pipeline``'s forward passes (and, with onnxruntime, its repair loop where exported for its objective)
    in ``backend`` ("onnxruntime" or "tensorrt") from the graphs in ``onnx_dir``."""
    if backend == "onnxruntime":
        from .backends.onnxruntime_backend import OnnxRuntimeBackend

        pipeline.backend = OnnxRuntimeBackend(onnx_dir, pipeline.tasks, pipeline.device, threads)
    else:
        from .backends.tensorrt_backend import TensorRTBackend

        pipeline.backend = TensorRTBackend(onnx_dir, pipeline.tasks, pipeline.device, precision)


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend to use for ``name``. "auto": TensorRT where it can run (a CUDA device and the package),
    else the torch reference."""
    if name == "auto":
        import importlib.util

        usable = device.type == "cuda" and torch.cuda.is_available() and importlib.util.find_spec("tensorrt")
        return "tensorrt" if usable else "torch"
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    return name
