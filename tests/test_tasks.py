"""Every SSL loss is finite, per image, deterministic given its parameters, and independent of batch-mates."""
import pytest
import torch

from engine.tasks.contrastive import nt_xent_bank, nt_xent_pairs

TASK_NAMES = ("contrastive", "inpainting", "rotation")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_loss_is_finite_and_per_image(tiny_pipeline, images, name):
    task = tiny_pipeline.objective.tasks[name]
    params = tiny_pipeline.objective.sample_params(images, 0)[name]
    loss = task.loss(images, **params)
    assert loss.shape == (len(images),)
    assert torch.isfinite(loss).all() and (loss >= 0).all()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_loss_is_deterministic_given_params(tiny_pipeline, images, name):
    task = tiny_pipeline.objective.tasks[name]
    params = tiny_pipeline.objective.sample_params(images, 5)[name]
    torch.testing.assert_close(task.loss(images, **params), task.loss(images, **params), rtol=0, atol=0)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_loss_of_an_image_ignores_its_batch_mates(tiny_pipeline, images, name):
    task = tiny_pipeline.objective.tasks[name]
    params = tiny_pipeline.objective.sample_params(images, 2)[name]
    batch = task.loss(images, **params)
    alone = task.loss(images[3:4], **{k: v[3:4] for k, v in params.items()})
    torch.testing.assert_close(alone, batch[3:4], rtol=1e-5, atol=1e-5)


def test_bank_loss_is_lowest_when_views_agree():
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(64, 16), dim=1)
    same = torch.nn.functional.normalize(torch.randn(1, 1, 16), dim=2).expand(1, 4, 16)
    scattered = torch.nn.functional.normalize(torch.randn(1, 4, 16), dim=2)
    assert nt_xent_bank(same, bank, 0.2) < nt_xent_bank(scattered, bank, 0.2)


def test_pair_loss_matches_a_textbook_loop():
    torch.manual_seed(0)
    z1, z2 = (torch.nn.functional.normalize(torch.randn(5, 8), dim=1) for _ in range(2))
    z, n, tau = torch.cat([z1, z2]), 5, 0.2
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        denom = sum(torch.exp(z[i] @ z[k] / tau) for k in range(2 * n) if k != i)
        total += -torch.log(torch.exp(z[i] @ z[pos] / tau) / denom)
    torch.testing.assert_close(nt_xent_pairs(z1, z2, tau), total / (2 * n), rtol=1e-5, atol=1e-5)
