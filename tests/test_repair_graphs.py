"""The whole repair in ONNX Runtime (export/repair_graphs.py): the backward-op rewrites against autograd, and the
Loop graph's repair against the PyTorch reference with the same draws (tiny models)."""
import onnx
import pytest
import torch
import torch.nn.functional as F

from engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from engine.pipeline import load_pipeline
from engine.repair import reverse_attack
from export.grad_decompositions import (_convolution_backward, _max_pool2d_backward,
                                        _upsample_bilinear2d_backward)
from export.onnx_export import export_all

TASKS = ["inpainting", "rotation"]       # a transposed convolution, max-pooling, both sign paths; quick to trace


def input_gradient(fn, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(fn(x), x, grad_out)[0]


@pytest.mark.parametrize("transposed", [False, True])
def test_convolution_backward_rewrite_matches_autograd(transposed):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    if transposed:
        w = torch.randn(4, 3, 4, 4)
        fn = lambda t: F.conv_transpose2d(t, w, stride=2, padding=1)
    else:
        w = torch.randn(3, 4, 3, 3)
        fn = lambda t: F.conv2d(t, w, stride=2, padding=1)
    g = torch.randn_like(fn(x))
    ours, _, _ = _convolution_backward(g, x, w, None, [2, 2], [1, 1], [1, 1], transposed, [0, 0], 1,
                                       [True, False, False])
    torch.testing.assert_close(ours, input_gradient(fn, x, g), rtol=1e-5, atol=1e-5)


def test_max_pool_and_bilinear_backward_rewrites_match_autograd():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    out, indices = F.max_pool2d(x, 2, return_indices=True)
    g = torch.randn_like(out)
    ours = _max_pool2d_backward(g, x, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)
    torch.testing.assert_close(ours, input_gradient(lambda t: F.max_pool2d(t, 2), x, g), rtol=0, atol=0)
    up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)
    g = torch.randn(2, 3, 16, 16)
    ours = _upsample_bilinear2d_backward(g, [16, 16], [2, 3, 8, 8], False)
    torch.testing.assert_close(ours, input_gradient(up, x, g), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def exported_repair(tiny_weights, tmp_path_factory):
    pipeline = load_pipeline(tiny_weights, tasks=TASKS)
    out = tmp_path_factory.mktemp("repair_onnx")
    manifest, _ = export_all(pipeline, out)
    return pipeline, out, manifest


def test_repair_graphs_are_checked_and_have_a_dynamic_batch(exported_repair):
    _, out, manifest = exported_repair
    for name in ("repair_step", "repair"):
        entry = manifest["graphs"][name]
        onnx.checker.check_model(str(out / entry["file"]), full_check=True)
        assert entry["sources"]["objective"]["tasks"] == TASKS
    repair = manifest["graphs"]["repair"]
    assert [i["name"] for i in repair["inputs"]][:5] == ["x0", "noise", "eps", "step_size", "steps"]
    assert repair["inputs"][-1] == {"name": "inpainting_mask_all", "shape": ["steps", "batch", 1, 32, 32],
                                    "dtype": "float32"}
    assert [o["shape"] for o in repair["outputs"]] == [["batch", 3, 32, 32], ["steps", "batch"]]


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_repair_matches_the_torch_reference(exported_repair, images, batch):
    pipeline, out, _ = exported_repair
    backend = OnnxRuntimeBackend(out, pipeline.tasks)
    assert backend.can_repair(pipeline.objective)
    x = images[:batch]
    ref = reverse_attack(pipeline.objective, x, 16 / 255, 4, 2 / 255, seed=3)
    got = backend.reverse_attack(pipeline.objective, x, 16 / 255, 4, 2 / 255, seed=3)
    # same draws, same sign steps: the images agree exactly (a sign could flip only where a gradient is ~0)
    assert (got.images != ref.images).float().mean() <= 1e-3
    assert (got.images - ref.images).abs().max() <= 4 * 2 / 255 + 1e-6
    torch.testing.assert_close(got.trace, ref.trace, rtol=1e-4, atol=1e-5)
    noise_only = backend.reverse_attack(pipeline.objective, x, 16 / 255, 0, 2 / 255, seed=3)
    torch.testing.assert_close(noise_only.images, reverse_attack(pipeline.objective, x, 16 / 255, 0,
                                                                 2 / 255, seed=3).images)


def test_the_pipeline_uses_the_graph_only_for_the_objective_it_was_exported_for(exported_repair, tiny_weights,
                                                                              images):
    pipeline, out, _ = exported_repair
    accelerated = load_pipeline(tiny_weights, tasks=TASKS, backend="onnxruntime", onnx_dir=out)
    assert accelerated.backend.can_repair(accelerated.objective)
    torch.testing.assert_close(accelerated.repair(images[:2], steps=2), pipeline.repair(images[:2], steps=2))
    other = load_pipeline(tiny_weights, tasks=TASKS, alpha={"inpainting": 2.0})
    assert not accelerated.backend.can_repair(other.objective)      # α differs: the loop stays in PyTorch
