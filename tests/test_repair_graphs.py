"""The whole repair in ONNX Runtime (export/repair_graphs.py): the backward-op rewrites against autograd, and the
Loop graph's repair against the PyTorch reference with the same draws (tiny models)."""
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from engine.pipeline import load_pipeline
from engine.repair import reverse_attack
from export.grad_decompositions import (_convolution_backward, _max_pool2d_backward, _max_pool2d_with_indices,
                                        _upsample_bilinear2d_backward)
from tests.conftest import CLEAN_TASKS, tiny_clean_pipeline

TASKS = CLEAN_TASKS


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


@pytest.mark.parametrize("kernel", [2, 3])         # 2×2: the corner masks; 3×3 stride 2: the scatter at the indices
def test_max_pool_rewrites_match_autograd_ties_included(kernel):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    x[:, :, :4, :4] = 0.5                          # a flat region: ties, where autograd picks the first maximum
    pool = lambda t: F.max_pool2d(t, kernel, 2)
    out, indices = F.max_pool2d(x, kernel, 2, return_indices=True)
    values = _max_pool2d_with_indices(x, [kernel] * 2, [2, 2], [0, 0], [1, 1], False)
    assert values is NotImplemented if kernel == 3 else torch.equal(values[0], out)
    g = torch.randn_like(out)
    ours = _max_pool2d_backward(g, x, [kernel] * 2, [2, 2], [0, 0], [1, 1], False, indices)
    torch.testing.assert_close(ours, input_gradient(pool, x, g), rtol=0, atol=0)


def test_bilinear_backward_rewrite_matches_autograd():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)
    g = torch.randn(2, 3, 16, 16)
    ours = _upsample_bilinear2d_backward(g, [16, 16], [2, 3, 8, 8], False)
    torch.testing.assert_close(ours, input_gradient(up, x, g), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def exported_repair(tiny_weights, tiny_clean_bundle):
    manifest = json.loads((tiny_clean_bundle / "manifest.json").read_text())
    return tiny_clean_pipeline(tiny_weights), tiny_clean_bundle, manifest


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


def test_onnxruntime_early_exit_matches_the_torch_reference(exported_repair, images):
    pipeline, out, _ = exported_repair
    backend = OnnxRuntimeBackend(out, pipeline.tasks)
    ref = reverse_attack(pipeline.objective, images, 16 / 255, 6, 2 / 255, seed=3, early_exit=True)
    left = ref.trace.isnan()
    assert left.any() and (~left.any(0)).any()                       # some images leave, some stay to the end
    got = backend.reverse_attack(pipeline.objective, images, 16 / 255, 6, 2 / 255, seed=3, early_exit=True)
    assert torch.equal(got.trace.isnan(), left)                         # the same images leave at the same steps
    torch.testing.assert_close(got.trace, ref.trace, rtol=1e-4, atol=1e-5, equal_nan=True)
    stayed = ~left.any(0)
    # the images that stay run the Loop graph's steps exactly (same draws, same graph), those that leave stop where
    # PyTorch's do (the pixel rule above: a sign may flip where a gradient is ~0, as the Loop graph's can)
    loop = backend.reverse_attack(pipeline.objective, images, 16 / 255, 6, 2 / 255, seed=3)
    assert torch.equal(got.images[stayed], loop.images[stayed])
    assert (got.images[~stayed] != ref.images[~stayed]).float().mean() <= 1e-3


def test_the_pipeline_uses_the_graph_only_for_the_objective_it_was_exported_for(exported_repair, tiny_weights,
                                                                              images):
    pipeline, out, _ = exported_repair
    accelerated = tiny_clean_pipeline(tiny_weights, backend="onnxruntime", onnx_dir=out)
    assert accelerated.backend.can_repair(accelerated.objective)
    torch.testing.assert_close(accelerated.repair(images[:2], steps=2), pipeline.repair(images[:2], steps=2))
    other = load_pipeline(tiny_weights, tasks=TASKS, objective="clean")
    assert not accelerated.backend.can_repair(other.objective)      # α differs: the loop stays in PyTorch


def test_the_runtime_bundle_leaves_the_loop_as_the_engine_does(exported_repair, images):
    from runtime.bundle import Bundle

    pipeline, out, _ = exported_repair
    engine = OnnxRuntimeBackend(out, pipeline.tasks).reverse_attack(pipeline.objective, images, 16 / 255, 6,
                                                                     2 / 255, seed=3, early_exit=True)
    repaired, trace = Bundle(out).repair(images.numpy(), seed=3, steps=6)          # early_exit by default
    assert np.isnan(trace).any()
    np.testing.assert_array_equal(repaired, engine.images.numpy())
    np.testing.assert_array_equal(np.isnan(trace), engine.trace.isnan().numpy())
