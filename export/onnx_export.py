"""ONNX export of the classifier and the SSL loss graphs, with a manifest (`cli.py export`).

Graphs (opset 18, dynamic batch; opset 20 is avoided for TensorRT's known GridSample fault there):

- ``classifier``: x -> logits
- ``<task>_loss``: x + that task's sampled parameters -> per-image loss (randomness as inputs,
  docs/design.md principle 1; rotation has none)
- ``multitask_loss``: x + every task's parameters (named ``<task>_<param>``) + alpha[K] -> Σ α_k L_k

The export is deterministic (same weights, same torch: byte-identical files). In an existing folder, graphs that
match the manifest and come from the same weights are kept; a graph whose file no longer matches its manifest
sha256 (stale or corrupt) is re-exported with a note; anything else already there is replaced only with
``overwrite``.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch import nn

from engine.backends.tensorrt_engines import import_tensorrt
from engine.models.provenance import is_preview
from engine.pipeline import Pipeline, attach_backend, load_pipeline, resolve_backend
from runtime.files import atomic_write, sha256sum, write_json

from .repair_graphs import export_step_graph, write_loop_graph

OPSET = 18
MAX_BATCH = 4096
MANIFEST = "manifest.json"


class ExportError(RuntimeError):
    """An export that cannot go ahead; the message names the graph or file."""


class TaskLossGraph(nn.Module):
    """x, *params (in ``param_names`` order) -> one task's per-image loss."""

    def __init__(self, task: nn.Module, param_names: list[str]) -> None:
        super().__init__()
        self.task, self.param_names = task, param_names

    def forward(self, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return self.task.loss(x, **dict(zip(self.param_names, params)))


class MultiTaskLossGraph(nn.Module):
    """x, *params (``layout`` order: (task, param) pairs), alpha[K] -> Σ α_k L_k per image."""

    def __init__(self, objective: nn.Module, layout: list[tuple[str, str]]) -> None:
        super().__init__()
        self.objective, self.layout = objective, layout

    def forward(self, x: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        params: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.objective.tasks}
        for (task, key), value in zip(self.layout, inputs[:-1]):
            params[task][key] = value
        alpha = inputs[-1]
        losses = self.objective.per_task(x, params)
        return sum(alpha[i] * losses[name] for i, name in enumerate(self.objective.tasks))


@dataclass
class GraphSpec:
    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]        # example inputs, batch 2; "alpha" has no batch dimension
    outputs: list[str]
    sources: dict[str, object]             # what it is made from: weights sha256 per model, contrastive views
    build: Callable[[Path], None] | None = None     # writes the graph itself (else: export_graph of module)


def graph_specs(pipeline: Pipeline) -> list[GraphSpec]:
    """The graphs of a pipeline, with example inputs drawn the way the repair draws them."""
    size = pipeline.size
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(pipeline.device)
    objective = pipeline.objective
    params = objective.sample_params(x, 0)

    def sources(*names: str) -> dict[str, object]:
        made_of: dict[str, object] = {n: pipeline.manifests[n]["sha256"] for n in names}
        for n in names:                     # a contrastive loss's view axis is fixed in the graph
            if n in objective.tasks and hasattr(objective.tasks[n], "views"):
                made_of[f"{n}_views"] = objective.tasks[n].views
        return made_of

    specs = [GraphSpec("classifier", pipeline.classifier, {"x": x}, ["logits"], sources("classifier"))]
    for name, task in objective.tasks.items():
        specs.append(GraphSpec(f"{name}_loss", TaskLossGraph(task, list(params[name])), {"x": x, **params[name]},
                               ["loss"], sources(name)))
    layout = [(task, key) for task in objective.tasks for key in params[task]]
    alpha = torch.tensor([objective.alpha[t] for t in objective.tasks], device=x.device)
    inputs = {"x": x, **{f"{task}_{key}": params[task][key] for task, key in layout}, "alpha": alpha}
    specs.append(GraphSpec("multitask_loss", MultiTaskLossGraph(objective, layout), inputs, ["loss"],
                           sources(*objective.tasks)))
    # the whole repair (export/repair_graphs.py): valid for this objective only (its α, levels and views)
    repair_sources = {**sources(*objective.tasks), "objective": objective.signature()}
    specs.append(GraphSpec("repair_step", objective, {}, ["x_next", "loss"], repair_sources,
                           build=lambda path: export_step_graph(objective, path, size)))
    specs.append(GraphSpec("repair", objective, {}, ["repaired", "trace"], dict(repair_sources),
                           build=lambda path: write_loop_graph(path.parent / "repair_step.onnx", path)))
    return specs


def export_graph(spec: GraphSpec, path: Path) -> None:
    """torch.onnx (dynamo) export of one graph to ``path`` (atomically), then the full ONNX checker."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # α's axis is static: {} rather than None, which torch.export's structure check misreads as a tuple of one None
    # (the multitask graph of a single task without draws, whose only extra input is α)
    axes = [{} if name == "alpha" else {0: batch} for name in spec.inputs]
    # torch.export sees forward(x, *params) as two arguments, x and a (non-empty) tuple: dynamic_shapes mirrors it
    takes_varargs = any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(spec.module.forward).parameters.values())
    dynamic = (axes[0], tuple(axes[1:])) if takes_varargs and len(axes) > 1 else tuple(axes)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(spec.module.eval(), tuple(spec.inputs.values()), str(tmp), dynamo=True,
                              opset_version=OPSET, dynamic_shapes=dynamic, input_names=list(spec.inputs),
                              output_names=spec.outputs, external_data=False)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"graph {spec.name} failed the ONNX checker: {e}") from None

    atomic_write(path, write)


def describe_io(path: Path) -> dict:
    """Names, shapes ("batch" for the dynamic axis) and dtypes of a graph's inputs and outputs."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def one(value) -> dict:
        tensor = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": value.name, "shape": shape, "dtype": dtype}

    return {"inputs": [one(v) for v in graph.input], "outputs": [one(v) for v in graph.output]}


def read_manifest(out_dir: Path) -> dict:
    path = out_dir / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def graph_status(out_dir: Path, spec: GraphSpec, manifest: dict) -> str:
    """'new', 'current' (kept), 'stale' (file differs from its manifest entry: re-export) or 'conflict'."""
    path = out_dir / f"{spec.name}.onnx"
    entry = manifest.get("graphs", {}).get(spec.name)
    if entry is None:
        return "conflict" if path.exists() else "new"
    if entry.get("sources") != spec.sources:
        return "conflict" if path.exists() else "new"
    if not path.exists() or sha256sum(path) != entry.get("sha256"):
        return "stale"
    return "current"


def gate_statistics(pipeline: Pipeline) -> dict | None:
    """What the gate needs beside the loss graphs (engine/calibration.py): score = Σ_k w_k (L_k − median_k) over the
    pipeline's tasks, and the clean calibration images' scores, whose (1 − fpr) quantile is the threshold for any
    false-positive rate. None where the pipeline was loaded without clean statistics."""
    stats = pipeline.calibration
    if stats is None:
        return None
    tasks = pipeline.tasks
    clean = stats.score({t: stats.losses[t].double() for t in tasks})
    return {"tasks": tasks, "weights": stats.score_weights(tasks), "median": {t: stats.level(t) for t in tasks},
            "clean_scores": sorted(clean.tolist()), "views": stats.views}


def export_all(pipeline: Pipeline, out_dir: str | os.PathLike, *, overwrite: bool = False,
               command: str | None = None, precision: str = "fp32",
               repair_graphs: bool = True) -> tuple[dict, list[str]]:
    """Export every graph of ``pipeline`` into ``out_dir``; returns (manifest, notes). ``precision`` "fp16" converts
    each graph to FP16 with FP32 inputs and outputs kept (engine/backends/tensorrt_engines.py, ``fp16_graph``); the
    repair graphs (export/repair_graphs.py, about a minute to trace) are FP32 only, and left out with
    ``repair_graphs=False``."""
    if precision not in ("fp32", "fp16"):
        raise ExportError(f"precision must be fp32 or fp16, not {precision!r}")
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    weights = {name: m["sha256"] for name, m in pipeline.manifests.items()}
    specs = [s for s in graph_specs(pipeline) if repair_graphs or s.build is None]
    for spec in specs:
        spec.sources["precision"] = precision
    status = {s.name: graph_status(out_dir, s, manifest) for s in specs}
    conflicts = [f"{name}.onnx" for name, st in status.items() if st == "conflict"]
    if conflicts and not overwrite:
        raise ExportError(f"{out_dir} already holds {', '.join(conflicts)} from other weights or another tool: "
                          "choose another --out, or pass --overwrite")
    notes, graphs = [], dict(manifest.get("graphs", {}))
    for spec in specs:
        path = out_dir / f"{spec.name}.onnx"
        if status[spec.name] == "current" and not overwrite:
            notes.append(f"{path.name}: up to date, kept")
            continue
        if status[spec.name] == "stale":
            notes.append(f"{path.name}: did not match its manifest sha256 (stale or corrupt), re-exported")
        if spec.build is not None:
            if precision == "fp16":        # Loop bodies are left to a later FP16 pass; the forward graphs convert
                notes.append(f"{path.name}: left out (the repair graphs are FP32 only; the runtime bundle and "
                             "--backend onnxruntime's whole repair need an FP32 export)")
                continue
            atomic_write(path, spec.build)
        else:
            export_graph(spec, path)
        if precision == "fp16":
            from engine.backends.tensorrt_engines import fp16_graph

            fp16_graph(path, path)
        graphs[spec.name] = {"file": path.name, "sha256": sha256sum(path), "sources": spec.sources,
                             "opset": OPSET, "precision": precision, **describe_io(path)}
    manifest = {"opset": OPSET, "torch": torch.__version__, "onnx": onnx.__version__, "command": command,
                "max_batch": MAX_BATCH, "weights": weights, "classes": pipeline.class_names,
                "class_folders": pipeline.inputs["classes"],           # what labels a folder of photos by class
                **({"preview": True} if is_preview(pipeline.manifests) else {}),     # a --profile quick set
                "input": {"size": pipeline.size, "resize": pipeline.inputs["resize"]}, "graphs": graphs,
                "gate": gate_statistics(pipeline)}
    write_json(out_dir / MANIFEST, manifest)
    return manifest, notes


def default_cache_dir() -> Path:
    return Path(os.environ.get("MSSL_REPAIR_CACHE", Path.home() / ".cache" / "mssl-repair"))


def load_exported_pipeline(**kwargs) -> Pipeline:
    """``engine.pipeline.load_pipeline(**kwargs)`` for any backend: where the backend runs exported graphs, this
    pipeline's graphs are brought up to date first (``ensure_exported``: in ``onnx_dir``, or a cache folder)."""
    backend = resolve_backend(kwargs.get("backend", "torch"), torch.device(kwargs.get("device", "cpu")))
    if backend not in ("onnxruntime", "tensorrt"):
        return load_pipeline(**kwargs)
    if backend == "tensorrt":               # say so before a minute of export work
        import_tensorrt()
    pipeline = load_pipeline(**{**kwargs, "backend": "torch", "onnx_dir": None})
    attach_backend(pipeline, backend, ensure_exported(pipeline, kwargs.get("onnx_dir")), kwargs.get("threads"),
                   kwargs.get("precision", "fp32"))
    return pipeline


def ensure_exported(pipeline: Pipeline, onnx_dir: str | os.PathLike | None = None) -> Path:
    """A folder with this pipeline's graphs up to date: ``onnx_dir`` if given, else a cache folder keyed by the
    weights' sha256 (exported there on first use, about a minute on 2 cores)."""
    if onnx_dir is None:
        key = "-".join(m["sha256"][:8] for _, m in sorted(pipeline.manifests.items()))
        views = {v for v in pipeline.objective.views().values() if v is not None}
        key += "".join(f"-v{v}" for v in sorted(views))
        # the repair graphs hold the objective (α, clean levels): another objective gets a folder of its own
        key += "-" + hashlib.sha256(json.dumps(pipeline.objective.signature()).encode()).hexdigest()[:8]
        onnx_dir = default_cache_dir() / "onnx" / key
    try:
        export_all(pipeline, onnx_dir)
    except ExportError:
        # a folder of the user's with repair graphs of another objective: keep them, and the repair loop runs in
        # PyTorch (the backend's can_repair is False); a conflict in the forward graphs still raises
        export_all(pipeline, onnx_dir, repair_graphs=False)
    return Path(onnx_dir)

