"""runtime/scheduler.py's ``StepKernel`` over a PyTorch pipeline, so that continuous batching drives the reference
engine too: the forward passes in the pipeline's backend, as engine/folder.py's ``repair_batch`` runs them, and each
step as that repair runs it — the backend's exported step graph where it has one for this objective (the
onnxruntime backend with the early exit), else PyTorch autograd (engine/repair.py's ``sign_step``)."""
from __future__ import annotations

import numpy as np
import torch

from runtime.step_loop import RunStep, step_feeds

from .pipeline import Pipeline
from .repair import as_tensors, sign_step


class TorchStepKernel:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline, self.objective = pipeline, pipeline.objective
        self.classes = pipeline.class_names
        self.views = self.objective.views()
        self.levels = self.objective.levels
        backend = pipeline.backend
        can_repair = getattr(backend, "can_repair", None)
        self.graph_step: RunStep | None = None
        if can_repair is not None and can_repair(self.objective) and "repair_step" in backend.sessions:
            session = backend.sessions["repair_step"]
            self.graph_step = lambda feeds: tuple(session.run(None, feeds))

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.pipeline.device)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.pipeline.logits(self._tensor(x)).cpu().numpy()

    @torch.no_grad()
    def task_losses(self, x: np.ndarray, params) -> dict[str, np.ndarray]:
        x = self._tensor(x)
        losses = self.pipeline.backend.task_losses(x, as_tensors(params, x))
        return {t: v.cpu().numpy() for t, v in losses.items()}

    def combine(self, losses: dict[str, np.ndarray]) -> np.ndarray:
        return self.objective.combine({t: self._tensor(v) for t, v in losses.items()}).cpu().numpy()

    def gate_score(self, losses: dict[str, np.ndarray]) -> np.ndarray:
        return self.pipeline.gate.score({t: self._tensor(v) for t, v in losses.items()}).cpu().numpy()

    def gate_threshold(self, fpr: float) -> float:
        gate = self.pipeline.gate
        if gate is None or gate.fpr != fpr:
            raise ValueError(f"the pipeline was loaded with gate {None if gate is None else gate.fpr}, not {fpr}: "
                             "load it with gate_fpr as the settings ask")
        return gate.threshold

    def step(self, x: np.ndarray, x0: np.ndarray, params, eps: float, step_size: float):
        if self.graph_step is not None:
            return self.graph_step(step_feeds(x, x0, params, eps, step_size))
        with torch.inference_mode(False), torch.enable_grad():
            x_a = self._tensor(x).requires_grad_(True)
            loss = self.objective(x_a, as_tensors(params, x_a))
            grad, = torch.autograd.grad(loss.sum(), x_a)
            x_next = sign_step(x_a.detach(), self._tensor(x0), grad, eps, step_size)
        return x_next.cpu().numpy(), loss.detach().cpu().numpy()
