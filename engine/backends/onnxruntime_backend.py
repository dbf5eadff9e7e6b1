"""ONNX Runtime backend: runs the exported graphs (export/onnx_export.py) on the tensors it is given.

Providers follow what is present: CUDA only when PyTorch sees a CUDA GPU (so CPU machines print no provider noise),
TensorRT's provider when onnxruntime offers it and the tensorrt package is installed. On CUDA, inputs and outputs are
bound to torch tensors' memory (IO binding): no copies through the host.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from runtime.repair_inputs import repair_inputs
from runtime.step_loop import repair_by_steps

from ..repair import RepairResult, pixels, start_point, uniform_start
from . import BackendUnavailable


def choose_providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = []
    if device.type == "cuda" and torch.cuda.is_available():
        if "TensorrtExecutionProvider" in available and importlib.util.find_spec("tensorrt"):
            chosen.append("TensorrtExecutionProvider")
        if "CUDAExecutionProvider" in available:
            chosen.append("CUDAExecutionProvider")
    return chosen + ["CPUExecutionProvider"]


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, onnx_dir: str | Path, tasks: list[str], device: torch.device | str = "cpu",
                 threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable(f"onnxruntime is not installed ({e}); pip install onnxruntime-gpu") from None
        self.device = torch.device(device)
        onnx_dir = Path(onnx_dir)
        manifest = json.loads((onnx_dir / "manifest.json").read_text())
        self.providers = choose_providers(self.device)
        self.sessions, self.input_names = {}, {}
        self.options = ort.SessionOptions()
        if threads:
            self.options.intra_op_num_threads = threads
        for graph in ["classifier", *(f"{t}_loss" for t in tasks)]:
            if graph not in manifest["graphs"]:
                raise BackendUnavailable(f"{onnx_dir} has no {graph} graph; run `python cli.py export`")
            self._open(graph, onnx_dir / manifest["graphs"][graph]["file"])
        # the whole repair in one graph, where exported for exactly this objective (export/repair_graphs.py)
        repair = manifest["graphs"].get("repair")
        self.repair_objective = repair["sources"].get("objective") if repair else None
        if repair:
            self._open("repair", onnx_dir / repair["file"])
            self._open("repair_step", onnx_dir / manifest["graphs"]["repair_step"]["file"])

    def _open(self, graph: str, path: Path) -> None:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), self.options, providers=self.providers)
        self.sessions[graph] = session
        self.input_names[graph] = [i.name for i in session.get_inputs()]

    def can_repair(self, objective) -> bool:
        """Whether the exported repair graph computes ``objective`` (same tasks, α, levels and views)."""
        return self.repair_objective is not None and self.repair_objective == objective.signature()

    def reverse_attack(self, objective, x: torch.Tensor, eps: float, steps: int, step_size: float,
                       seed: int, early_exit: bool = False) -> RepairResult:
        """engine.repair.reverse_attack in onnxruntime, with the same draws: in one call of the Loop graph, or with
        ``early_exit`` one call of the step graph per step on the images still in the loop."""
        x = x.detach().float()
        if steps == 0:
            return RepairResult(start_point(x, uniform_start(x, seed), eps), x.new_zeros(0, len(x)))
        if early_exit and objective.levels is not None:      # a plain objective never reaches zero: no exit
            step = lambda feeds: tuple(self.sessions["repair_step"].run(None, feeds))
            repaired, trace = repair_by_steps(step, pixels(x), seed, eps, steps, step_size, objective.views())
        elif x.is_cuda and "CUDAExecutionProvider" in self.sessions["repair"].get_providers():
            return self._repair_on_cuda(objective, x, eps, steps, step_size, seed)
        else:
            feeds = repair_inputs(pixels(x), seed, eps, steps, step_size, objective.views())
            repaired, trace = self.sessions["repair"].run(None, feeds)
        return RepairResult(torch.from_numpy(repaired).to(x.device), torch.from_numpy(trace).to(x.device))

    def _repair_on_cuda(self, objective, x: torch.Tensor, eps: float, steps: int, step_size: float,
                        seed: int) -> RepairResult:
        """The Loop graph with its outputs bound to CUDA tensors: the draws are numpy arrays, copied in once; the
        repaired images and the trace stay on the GPU. Not run on this project's machines (they have no GPU)."""
        session, index = self.sessions["repair"], x.device.index or 0
        binding = session.io_binding()
        for name, value in repair_inputs(pixels(x), seed, eps, steps, step_size, objective.views()).items():
            binding.bind_cpu_input(name, value)
        repaired = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        trace = torch.empty((steps, len(x)), device=x.device, dtype=torch.float32)
        for name, out in (("repaired", repaired), ("trace", trace)):
            binding.bind_output(name, "cuda", index, np.float32, list(out.shape), out.data_ptr())
        session.run_with_iobinding(binding)
        return RepairResult(repaired, trace)

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """The graph's single output for ``feeds`` (input name -> tensor), on the feeds' device."""
        session = self.sessions[graph]
        feeds = {name: feeds[name].detach().float().contiguous() for name in self.input_names[graph]}
        batch = len(next(iter(feeds.values())))
        if self.device.type != "cuda":
            out = session.run(None, {name: t.cpu().numpy() for name, t in feeds.items()})[0]
            return torch.from_numpy(out)
        binding = session.io_binding()
        index = self.device.index or 0
        for name, t in feeds.items():
            binding.bind_input(name, "cuda", index, np.float32, list(t.shape), t.data_ptr())
        meta = session.get_outputs()[0]
        out = torch.empty([batch, *meta.shape[1:]], device=self.device, dtype=torch.float32)
        binding.bind_output(meta.name, "cuda", index, np.float32, list(out.shape), out.data_ptr())
        session.run_with_iobinding(binding)
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.run("classifier", {"x": x})

    def task_losses(self, x: torch.Tensor, params: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {task: self.run(f"{task}_loss", {"x": x, **p}) for task, p in params.items()}
