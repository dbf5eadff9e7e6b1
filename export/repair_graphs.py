"""The whole repair as ONNX graphs: the gradient step, and all steps inside one ONNX ``Loop``.

``torch.export`` cannot trace ``torch.autograd.grad`` and onnxruntime-training is frozen, so the gradient is traced
first: ``make_fx`` runs one repair step (objective, ∂/∂x by autograd, the sign step of engine/repair.py) and records
every aten op, forward and backward, with the rewrites of export/grad_decompositions.py for the backward ops ONNX
lacks; ``functionalize`` removes the in-place ops autograd leaves; the dynamo exporter turns that graph into ONNX.

Two traps, both silent: make_fx's symbolic tracing gives one symbol to equal sizes ("duck sizing"), so a trace batch
equal to another axis (3 channels, 4 views) would fix the batch to that number — the trace batch is one no other axis
has; and the trace must get distinct tensors for x and x₀ (one object passed twice becomes one graph input).

Graphs (dynamic batch, opset 18):

- ``repair_step``: x, x0, eps, step_size, this step's parameters (``<task>_<param>``) -> x_next, loss (the
  objective at x, per image);
- ``repair``: x0, noise (the random start's U[0, 1) draws), eps, step_size, steps (int64), every step's parameters
  stacked on a leading steps axis -> repaired, trace (steps × batch): ``repair_step`` as the body of a ``Loop``.

Randomness stays an input (docs/design.md, principle 1): the caller draws the start and every step's parameters from the
images' own generators, in the order the PyTorch reference draws them, so both engines repair with the same draws.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from engine.repair import MultiTaskLoss, sign_step
from runtime.settings import DEFAULTS

from .grad_decompositions import gradient_decompositions

OPSET = 18
TRACE_BATCH = 11         # no other axis is 11 long: see the module docstring (duck sizing)
FIXED_INPUTS = ("x", "x0", "eps", "step_size")


class RepairStep(nn.Module):
    """x, x0, eps, step_size, *params (``layout`` order) -> (next x, objective at x per image)."""

    def __init__(self, objective: MultiTaskLoss, layout: list[tuple[str, str]]) -> None:
        super().__init__()
        self.objective, self.layout = objective, layout

    def forward(self, x, x0, eps, step_size, *flat):
        params: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.objective.tasks}
        for (task, key), value in zip(self.layout, flat):
            params[task][key] = value
        with torch.enable_grad():
            x_r = x.detach().requires_grad_(True)
            loss = self.objective(x_r, params)
            grad, = torch.autograd.grad(loss.sum(), x_r)
        return sign_step(x, x0, grad, eps, step_size), loss.detach()


def step_inputs(objective: MultiTaskLoss, batch: int = TRACE_BATCH, device: torch.device | str = "cpu",
                size: int = 32) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor]]:
    """The step graph's (task, param) layout and example inputs (images ``size``×``size``), parameters drawn as the
    repair draws them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=gen).to(device)
    x0 = torch.rand(batch, 3, size, size, generator=gen).to(device)        # distinct from x: see the docstring
    params = objective.sample_params(x, 0)
    layout = [(task, key) for task in objective.tasks for key in params[task]]
    inputs = {"x": x, "x0": x0, "eps": torch.tensor(DEFAULTS.eps, device=device),
              "step_size": torch.tensor(DEFAULTS.step_size, device=device),
              **{f"{task}_{key}": params[task][key] for task, key in layout}}
    return layout, inputs


def export_step_graph(objective: MultiTaskLoss, path: Path, size: int = 32) -> None:
    """Trace one repair step of ``objective`` on ``size``×``size`` images with its gradient and write it as ONNX to
    ``path``."""
    layout, inputs = step_inputs(objective, size=size)
    step = RepairStep(objective.eval(), layout)
    args = tuple(inputs.values())
    trace = dict(tracing_mode="symbolic", _allow_non_fake_inputs=True)      # the networks' buffers are real tensors
    graph = make_fx(step, decomposition_table=gradient_decompositions(), **trace)(*args)
    graph = make_fx(torch.func.functionalize(graph, remove="mutations"), **trace)(*args)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = [None if name in ("eps", "step_size") else {0: batch} for name in inputs]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, args, str(path), dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic,
                          input_names=list(inputs), output_names=["x_next", "loss"], external_data=False)
    onnx.checker.check_model(str(path), full_check=True)


def loop_graph(step: onnx.ModelProto) -> onnx.ModelProto:
    """The repair graph: ``step`` as the body of a Loop over the steps, from the random start."""
    graph = step.graph
    params = [i for i in graph.input if i.name not in FIXED_INPUTS]
    float_input = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    body_nodes = [helper.make_node("Gather", [f"{p.name}_all", "loop_iteration"], [p.name], axis=0)
                  for p in params]
    body_nodes.append(helper.make_node("Identity", ["loop_x"], ["x"]))
    body_nodes.extend(graph.node)
    body_nodes.append(helper.make_node("Identity", ["loop_condition"], ["loop_condition_out"]))
    body = helper.make_graph(
        body_nodes, "repair_step",
        [helper.make_tensor_value_info("loop_iteration", TensorProto.INT64, []),
         helper.make_tensor_value_info("loop_condition", TensorProto.BOOL, []), float_input("loop_x", None)],
        [helper.make_tensor_value_info("loop_condition_out", TensorProto.BOOL, []), float_input("x_next", None),
         float_input("loss", None)],
        value_info=list(graph.value_info))

    constants = [helper.make_tensor("repair_two", TensorProto.FLOAT, [], [2.0]),
                 helper.make_tensor("repair_one", TensorProto.FLOAT, [], [1.0]),
                 helper.make_tensor("repair_zero", TensorProto.FLOAT, [], [0.0]),
                 helper.make_tensor("repair_true", TensorProto.BOOL, [], [True])]
    side = next(i for i in graph.input if i.name == "x").type.tensor_type.shape.dim[-1].dim_value
    image = ["batch", 3, side, side]
    nodes = [  # the random start, as engine/repair.py's start_point: (x0 + (2u − 1)·eps) clipped to [0, 1]
        helper.make_node("Mul", ["noise", "repair_two"], ["repair_2u"]),
        helper.make_node("Sub", ["repair_2u", "repair_one"], ["repair_signed"]),
        helper.make_node("Mul", ["repair_signed", "eps"], ["repair_offset"]),
        helper.make_node("Add", ["x0", "repair_offset"], ["repair_shifted"]),
        helper.make_node("Clip", ["repair_shifted", "repair_zero", "repair_one"], ["repair_start"]),
        helper.make_node("Loop", ["steps", "repair_true", "repair_start"], ["repaired", "trace"], body=body),
    ]
    inputs = [float_input("x0", image), float_input("noise", image), float_input("eps", []),
              float_input("step_size", []), helper.make_tensor_value_info("steps", TensorProto.INT64, [])]
    for p in params:
        dims = [d.dim_param or d.dim_value for d in p.type.tensor_type.shape.dim]
        inputs.append(float_input(f"{p.name}_all", ["steps", "batch", *dims[1:]]))
    main = helper.make_graph(nodes, "repair", inputs,
                             [float_input("repaired", image), float_input("trace", ["steps", "batch"])],
                             initializer=[*graph.initializer, *constants])
    model = helper.make_model(main, opset_imports=step.opset_import, ir_version=step.ir_version,
                              producer_name="mssl-repair")
    model.functions.extend(step.functions)
    return model


def write_loop_graph(step_path: Path, path: Path) -> None:
    """The Loop graph built from the step graph at ``step_path``, fully checked, to ``path``."""
    repair = loop_graph(onnx.load(str(step_path)))
    onnx.checker.check_model(repair, full_check=True)
    onnx.save(repair, str(path))
