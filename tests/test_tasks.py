"""Every SSL loss is finite, per image, what an independent computation of its formula gives, and independent of
batch-mates."""
import pytest
import torch
import torch.nn.functional as F

from engine.tasks import augment

from engine.tasks.contrastive import nt_xent_bank, nt_xent_pairs

TASK_NAMES = ("contrastive", "inpainting", "rotation")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_loss_is_finite_and_per_image(tiny_pipeline, images, name):
    task = tiny_pipeline.objective.tasks[name]
    params = tiny_pipeline.objective.sample_params(images, 0)[name]
    loss = task.loss(images, **params)
    assert loss.shape == (len(images),)
    assert torch.isfinite(loss).all() and (loss >= 0).all()


def rotation_by_hand(net, x):
    """−(1/4) Σ_k log p_k(rot_k(x)), one image and one rotation at a time, as a cross-entropy with label k."""
    return torch.stack([sum(F.cross_entropy(net(torch.rot90(image, k, dims=(1, 2))[None]),
                                            torch.tensor([k])) for k in range(4)) / 4 for image in x])


def inpainting_by_hand(net, x, mask):
    """The squared error of the network's output on the centre S/2 × S/2 square, cut out by slicing."""
    size = x.shape[-1]
    centre = slice(size // 4, size - size // 4)
    assert torch.equal(mask[:, :, centre, centre], torch.ones_like(mask[:, :, centre, centre]))
    assert mask.sum() == len(x) * (size // 2) ** 2                 # the mask is that square and nothing else
    return torch.stack([((image - net(image[None], m[None])[0])[:, centre, centre] ** 2).sum()
                        for image, m in zip(x, mask)])


def contrastive_by_hand(task, x, params):
    """NT-Xent of each anchor view against each other view of its image, the bank rows the only negatives: mean over
    the V(V − 1) (anchor, positive) pairs of −log(exp(s_ap) / Σ_{k ≠ a} exp(s_ak)), k over the other views and the
    bank, s = z·z'/τ."""
    views = augment.apply_views(x, **params)
    out = []
    for image_views in views:
        z = task.net(image_views)
        bank, n = task.net.bank, len(z)
        pairs = []
        for a in range(n):
            others = torch.cat([torch.stack([z[a] @ z[k] for k in range(n) if k != a]), bank @ z[a]]) / task.tau
            pairs += [torch.logsumexp(others, 0) - z[a] @ z[p] / task.tau for p in range(n) if p != a]
        out.append(torch.stack(pairs).mean())
    return torch.stack(out)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_loss_matches_an_independent_computation(tiny_pipeline, images, name):
    task = tiny_pipeline.objective.tasks[name]
    params = tiny_pipeline.objective.sample_params(images, 5)[name]
    by_hand = {"rotation": lambda: rotation_by_hand(task.net, images),
               "inpainting": lambda: inpainting_by_hand(task.net, images, params["mask"]),
               "contrastive": lambda: contrastive_by_hand(task, images, params)}[name]
    with torch.no_grad():
        torch.testing.assert_close(task.loss(images, **params), by_hand(), rtol=1e-4, atol=1e-4)


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
