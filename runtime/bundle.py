"""An exported folder (``cli.py export``) opened in onnxruntime: the classifier, each task's loss and the whole
repair (export/repair_graphs.py), with the draws of runtime/draws.py — the PyTorch reference's repair, without it.

Example::

    bundle = Bundle("onnx")                         # python cli.py export --out onnx
    repaired, trace = bundle.repair(x, seed=0)      # x: float32 N×3×S×S in [0, 1] (S: bundle.size); early exit on
    labels = bundle.logits(repaired).argmax(1)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .draws import batch_draws
from .files import sha256sum
from .folder import BatchRepair, image_rows
from .imageio import quantize
from .repair_inputs import repair_inputs
from .settings import DEFAULTS, RepairSettings
from .step_loop import repair_by_steps, start_point, step_feeds


class BundleError(ValueError):
    """The folder cannot be used as a bundle; the message says why and what to run."""


class Bundle:
    """The graphs of ``folder`` in onnxruntime sessions (CPU; ``threads``: intra-op threads, None: onnxruntime's
    default). The repair objective (tasks, α, clean levels, views) is the one the repair graph was exported for."""

    name = "runtime"

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BundleError(f"onnxruntime is not installed ({e}): pip install -r runtime/requirements.txt") from None
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.exists():
            raise BundleError(f"{folder} is not an exported bundle (no manifest.json): make one with "
                              f"`python cli.py export --out {folder}`")
        self.manifest = json.loads(manifest_path.read_text())
        graphs = self.manifest.get("graphs", {})
        if "repair" not in graphs or "classes" not in self.manifest:
            raise BundleError(f"{folder} holds no repair graph (or predates the runtime): export it again with "
                              f"`python cli.py export --out {folder} --overwrite`")
        objective = graphs["repair"]["sources"]["objective"]
        self.tasks: list[str] = objective["tasks"]
        self.alpha = dict(zip(self.tasks, objective["alpha"]))
        self.levels = None if objective["levels"] is None else dict(zip(self.tasks, objective["levels"]))
        self.views = {task: objective["views"].get(task) for task in self.tasks}
        self.classes: list[str] = self.manifest["classes"]
        inputs = self.manifest.get("input", {"size": 32, "resize": False})     # bundles before sizes were free
        self.size, self.resize = int(inputs["size"]), bool(inputs["resize"])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions, self.input_names = {}, {}
        for graph in ["classifier", *(f"{t}_loss" for t in self.tasks), "repair", "repair_step"]:
            entry = graphs.get(graph)
            if entry is None:
                raise BundleError(f"{folder} has no {graph} graph: export it again with `python cli.py export`")
            path = folder / entry["file"]
            if not path.exists() or sha256sum(path) != entry["sha256"]:
                raise BundleError(f"{path} is missing or does not match its manifest sha256: export it again")
            self.sessions[graph] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.input_names[graph] = [i.name for i in self.sessions[graph].get_inputs()]

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[graph].run(None, {name: feeds[name] for name in self.input_names[graph]})

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self._run("classifier", {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]

    def draws(self, x: np.ndarray, seed: int) -> dict[str, dict[str, np.ndarray]]:
        """One evaluation's task parameters (the first step's draws), as the reference's ``sample_params``."""
        return {task: {key: value[0] for key, value in p.items()}
                for task, p in batch_draws(x, seed, self.views, 1).items()}

    def task_losses(self, x: np.ndarray, params: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return {task: self._run(f"{task}_loss", {"x": x, **params[task]})[0] for task in self.tasks}

    def combine(self, losses: dict[str, np.ndarray]) -> np.ndarray:
        """The objective from per-task losses: Σ α_k L_k, or with clean levels Σ α_k max(0, L_k − level_k)."""
        if self.levels is None:
            return sum(self.alpha[t] * losses[t] for t in self.tasks)
        return sum(self.alpha[t] * np.maximum(losses[t] - self.levels[t], 0) for t in self.tasks)

    def repair(self, x: np.ndarray, seed: int = DEFAULTS.seed, eps: float = DEFAULTS.eps, steps: int = DEFAULTS.steps,
               step_size: float = DEFAULTS.step_size,
               early_exit: bool = DEFAULTS.early_exit) -> tuple[np.ndarray, np.ndarray]:
        """(repaired images N×3×S×S, trace steps×N: the objective at the start of each step). With
        ``early_exit`` an image leaves at the first step where its objective is zero (runtime/step_loop.py; NaN in
        the trace from then on), run step by step; without, all steps run for every image in the Loop graph."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if steps == 0:                     # the random start alone: the noise control
            return start_point(x, seed, eps), np.zeros((0, len(x)))
        if early_exit and self.levels is not None:         # a plain objective never reaches zero: no exit
            step = lambda feeds: tuple(self._run("repair_step", feeds))
            return repair_by_steps(step, x, seed, eps, steps, step_size, self.views)
        repaired, trace = self._run("repair", repair_inputs(x, seed, eps, steps, step_size, self.views))
        return repaired, trace

    def step(self, x: np.ndarray, x0: np.ndarray, params: dict[str, dict[str, np.ndarray]], eps: float,
             step_size: float) -> tuple[np.ndarray, np.ndarray]:
        """One step of the repair in the step graph: (x after it, the objective at x), for runtime/scheduler.py."""
        return self._run("repair_step", step_feeds(x, x0, params, eps, step_size))

    def gate_threshold(self, fpr: float) -> float:
        """The gate's threshold: the score above which a fraction ``fpr`` of the clean calibration images lies
        (engine/calibration.py's rule, from the clean scores the export stored)."""
        gate = self.manifest.get("gate")
        if gate is None:
            raise BundleError("this bundle has no gate statistics: export it from a pipeline with a calibration "
                              "(`python cli.py export --objective clean`, the default)")
        if not 0 < fpr < 1:
            raise BundleError(f"the gate's false-positive rate must be between 0 and 1, not {fpr}")
        return float(np.quantile(np.array(gate["clean_scores"]), 1 - fpr))

    def gate_score(self, losses: dict[str, np.ndarray]) -> np.ndarray:
        """Per image: Σ_k w_k (L_k − clean median_k), w_k = 1 / (K · clean IQR_k)."""
        gate = self.manifest["gate"]
        return sum(gate["weights"][t] * (losses[t] - gate["median"][t]) for t in gate["tasks"])

    def repair_batch(self, x: np.ndarray, settings: RepairSettings) -> list[dict]:
        """runtime/folder.py's rows for one batch: the 8-bit repaired image and the report fields, losses before and
        after with the same draws (as engine/folder.py's ``repair_batch``). With ``settings.gate_fpr``, only inputs
        whose gate score exceeds the threshold are repaired; the rest come back unchanged."""
        seed, steps, gate_fpr = settings.batch_seed(), settings.steps, settings.gate_fpr
        params = self.draws(x, seed)
        before = self.task_losses(x, params)
        repaired, gate = x.copy(), None
        trace = np.full((steps, len(x)), np.nan)
        flagged = np.ones(len(x), dtype=bool)
        if gate_fpr is not None:
            score = self.gate_score(before)
            flagged = score > self.gate_threshold(gate_fpr)
            gate = {"gate_score": [round(float(v), 6) for v in score], "gated_out": (~flagged).tolist()}
        if flagged.any():                  # an image's repair is its own: repairing a subset changes nothing
            repaired[flagged], trace[:, flagged] = self.repair(x[flagged], seed, settings.eps, steps,
                                                               settings.step_size, settings.early_exit)
        repaired = quantize(repaired)
        after = self.task_losses(repaired, params)
        return image_rows(repaired, x, self.logits(x), self.logits(repaired), before, after, self.combine(before),
                          self.combine(after), self.classes, gate, trace)


@dataclass
class BundleRepair:
    """A bundle's batch repair with fixed settings, built where it runs (a Ray Serve replica): picklable, and it
    opens the bundle (onnxruntime sessions, ``threads`` intra-op threads) only when called."""
    folder: str
    threads: int | None
    settings: RepairSettings = DEFAULTS

    def __call__(self) -> BatchRepair:
        return self.on(Bundle(self.folder, self.threads))

    def kernel(self) -> Bundle:
        """The bundle itself, opened here: the engine runtime/scheduler.py steps (continuous batching)."""
        return Bundle(self.folder, self.threads)

    def on(self, bundle: Bundle) -> BatchRepair:
        return lambda x: bundle.repair_batch(x, self.settings)

    def config(self, bundle: Bundle) -> dict:
        """The repair's settings as a report records them (runtime/folder.py), for ``bundle`` (this folder's)."""
        fpr = self.settings.gate_fpr
        gate = None if fpr is None else {"fpr": fpr, "tasks": bundle.tasks, "threshold": bundle.gate_threshold(fpr)}
        return {**self.settings.record(), "size": bundle.size, "backend": bundle.name,
                "tasks": bundle.tasks, "alpha": [bundle.alpha[t] for t in bundle.tasks], "device": "cpu",
                "objective": "plain" if bundle.levels is None else "clean", "levels": bundle.levels, "gate": gate,
                "weights": bundle.manifest["weights"], "threads": self.threads,
                **({"preview": True} if bundle.manifest.get("preview") else {})}      # a --profile quick set
