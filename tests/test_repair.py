"""The reverse attack: bounded, seeded, independent of batch-mates, and it lowers the SSL loss."""
import re

import pytest
import torch

from engine.repair import reverse_attack

EPS, STEP = 16 / 255, 2 / 255


def test_repair_respects_eps_and_unit_range(tiny_pipeline, images):
    repaired = tiny_pipeline.repair(images, eps=EPS, steps=3, step_size=STEP, seed=0)
    assert repaired.shape == images.shape
    assert (repaired - images).abs().max() <= EPS + 1e-6
    assert repaired.min() >= 0 and repaired.max() <= 1


def test_same_seed_same_repair_and_other_seed_differs(tiny_pipeline, images):
    a = tiny_pipeline.repair(images[:2], steps=2, seed=7)
    b = tiny_pipeline.repair(images[:2], steps=2, seed=7)
    c = tiny_pipeline.repair(images[:2], steps=2, seed=8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_an_image_gets_the_same_repair_alone_and_in_a_batch(tiny_pipeline, images):
    # float64, so that batched and single-image kernels round alike and no gradient sign flips on a rounding error
    objective = tiny_pipeline.objective.double()
    try:
        x = images.double()
        batch = reverse_attack(objective, x, EPS, 4, STEP, seed=3)
        alone = reverse_attack(objective, x[5:6], EPS, 4, STEP, seed=3)
        reordered = reverse_attack(objective, x.flip(0), EPS, 4, STEP, seed=3)
    finally:
        objective.float()
    torch.testing.assert_close(alone.images, batch.images[5:6], rtol=0, atol=1e-9)
    torch.testing.assert_close(reordered.images.flip(0), batch.images, rtol=0, atol=1e-9)


def test_repair_lowers_the_ssl_loss_on_average(tiny_pipeline, images):
    result = tiny_pipeline.repair_with_trace(images, eps=EPS, steps=10, step_size=STEP, seed=0)
    assert result.trace.shape == (10, len(images))
    before = tiny_pipeline.ssl_loss(images, seed=0)
    after = tiny_pipeline.ssl_loss(result.images, seed=0)
    assert after.mean() < before.mean()
    assert result.trace[-1].mean() < result.trace[0].mean()


def test_zero_steps_is_the_uniform_noise_control(tiny_pipeline, images):
    result = tiny_pipeline.repair_with_trace(images, eps=EPS, steps=0, seed=0)
    delta = result.images - images
    assert result.trace.shape == (0, len(images))
    assert delta.abs().max() <= EPS + 1e-6 and delta.abs().mean() > EPS / 4


@pytest.mark.parametrize("tasks", [("rotation",), ("contrastive", "inpainting")])
def test_any_subset_of_tasks_repairs(tiny_weights, images, tasks):
    from engine.pipeline import load_pipeline

    p = load_pipeline(tiny_weights, tasks=tasks, alpha={tasks[0]: 2.0}, objective="plain")
    assert p.tasks == list(tasks) and p.objective.alpha[tasks[0]] == 2.0
    assert p.repair(images[:2], steps=1).shape == (2, 3, 32, 32)


def test_repair_works_under_no_grad_and_inference_mode(tiny_pipeline, images):
    expected = tiny_pipeline.repair(images[:2], steps=2, seed=4)
    with torch.no_grad():
        under_no_grad = tiny_pipeline.repair(images[:2], steps=2, seed=4)
    with torch.inference_mode():
        under_inference = tiny_pipeline.repair(images[:2], steps=2, seed=4)
    torch.testing.assert_close(under_no_grad, expected, rtol=0, atol=0)
    torch.testing.assert_close(under_inference, expected, rtol=0, atol=0)


@pytest.mark.parametrize("bad, message", [(lambda x: (x * 255).to(torch.uint8), "x.float() / 255"),
                                          (lambda x: x * 255, "divide 0–255 images by 255"),
                                          (lambda x: x - 0.5, "from -0.5")])
def test_the_api_refuses_images_that_are_not_floats_in_the_unit_range(tiny_pipeline, images, bad, message):
    for call in (tiny_pipeline.repair, tiny_pipeline.predict, tiny_pipeline.ssl_loss):
        with pytest.raises(ValueError, match=re.escape(message)):
            call(bad(images[:2]))


def test_early_exit_stops_each_image_where_its_objective_reaches_zero(tiny_weights, images):
    from engine.pipeline import load_pipeline

    # float64, as above: the rounding of a batch of 8 and of 1 must not tell the two runs apart
    objective = load_pipeline(tiny_weights, tasks=["inpainting", "rotation"], objective="clean").objective.double()
    images, steps = images.double(), 6
    exits = reverse_attack(objective, images, EPS, steps, STEP, seed=3, early_exit=True)
    ran = exits.trace.isfinite()
    assert (~ran).any() and ran.all(0).any()                     # some images leave early, some run every step
    for i in range(len(images)):
        k = int(ran[:, i].sum())                                  # steps it ran; it left after its zero at step k-1
        assert ran[:k, i].all() and (exits.trace[:k - 1, i] != 0).all()       # it left at its first zero
        assert exits.trace[k - 1, i] == 0 or k == steps
        # it stands where a k-step repair without the exit leaves it: a zero objective is a step that does not move
        alone = reverse_attack(objective, images[i:i + 1], EPS, k, STEP, seed=3)
        assert torch.equal(alone.images[0], exits.images[i])
        torch.testing.assert_close(alone.trace[:, 0], exits.trace[:k, i], rtol=1e-12, atol=1e-12)
