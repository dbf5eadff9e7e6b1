"""TensorRT backend: engines built from the exported graphs (tensorrt_engines.py), run on torch CUDA tensors.

Inputs and outputs are torch tensors' memory (``set_tensor_address`` with ``data_ptr()``), work goes on torch's
current stream (``execute_async_v3``): no pycuda, no host copies. Batches above the profile's maximum run in slices.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .tensorrt_engines import PROFILE, import_tensorrt, load_engine


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, onnx_dir: str | Path, tasks: list[str], device: torch.device | str = "cuda",
                 precision: str = "fp32", cache_dir: str | Path | None = None,
                 profile: tuple[int, int, int] = PROFILE) -> None:
        self.trt = import_tensorrt()
        self.device, self.precision = torch.device(device), precision
        if self.device.type != "cuda":
            from .tensorrt_engines import TensorRTUnavailable

            raise TensorRTUnavailable("the tensorrt backend runs on CUDA: pass --device cuda")
        onnx_dir = Path(onnx_dir)
        manifest = json.loads((onnx_dir / "manifest.json").read_text())
        cache_dir = Path(cache_dir) if cache_dir else onnx_dir / "tensorrt"
        self.max_batch = profile[2]
        self.engines, self.contexts = {}, {}
        for graph in ["classifier", *(f"{t}_loss" for t in tasks)]:
            engine = load_engine(onnx_dir / manifest["graphs"][graph]["file"], cache_dir, precision, profile)
            self.engines[graph], self.contexts[graph] = engine, engine.create_execution_context()

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = len(feeds["x"])
        if batch > self.max_batch:
            return torch.cat([self.run(graph, {k: v[i:i + self.max_batch] for k, v in feeds.items()})
                              for i in range(0, batch, self.max_batch)])
        engine, context, trt = self.engines[graph], self.contexts[graph], self.trt
        keep, output = [], None
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                tensor = feeds[name].to(self.device, torch.float32).contiguous()
                keep.append(tensor)                       # alive until the stream has run
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
            else:
                output = name
        out = torch.empty(tuple(context.get_tensor_shape(output)), dtype=torch.float32, device=self.device)
        context.set_tensor_address(output, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {graph}")
        stream.synchronize()
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.run("classifier", {"x": x})

    def task_losses(self, x: torch.Tensor, params: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {task: self.run(f"{task}_loss", {"x": x, **p}) for task, p in params.items()}
