"""Each attack raises its loss and lowers accuracy on a tiny model, within ε and [0, 1]."""
import pytest
import torch
import torch.nn.functional as F

from engine.attacks import BPDAEOT, PGD, AutoAttackAPGD, DefenseAwarePGD, SquareEveryImage

EPS = 8 / 255


@pytest.fixture
def labelled(tiny_pipeline, images):
    """Images labelled with the tiny model's own clean predictions: clean accuracy is 100 % by construction."""
    return images, tiny_pipeline.predict(images)


def check_bounds(x, x_adv):
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_pgd_raises_the_loss_and_fools_the_model(tiny_pipeline, labelled):
    x, y = labelled
    model = tiny_pipeline.classifier
    x_adv = PGD(model, EPS, 2 / 255, steps=10, generator=torch.Generator().manual_seed(0))(x, y)
    check_bounds(x, x_adv)
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
        assert (model(x_adv).argmax(1) == y).float().mean() < 1.0


def test_pgd_restarts_keep_what_fooled(tiny_pipeline, labelled):
    x, y = labelled
    model = tiny_pipeline.classifier
    one = PGD(model, EPS, 2 / 255, steps=2, restarts=1, generator=torch.Generator().manual_seed(0))(x, y)
    three = PGD(model, EPS, 2 / 255, steps=2, restarts=3, generator=torch.Generator().manual_seed(0))(x, y)
    check_bounds(x, three)
    with torch.no_grad():
        assert (model(three).argmax(1) == y).sum() <= (model(one).argmax(1) == y).sum()


def test_defense_aware_pgd_trades_ce_against_the_ssl_loss(tiny_pipeline, labelled):
    x, y = labelled
    model, objective = tiny_pipeline.classifier, tiny_pipeline.objective
    plain = DefenseAwarePGD(model, objective, lam=0.0, steps=5)(x, y)
    aware = DefenseAwarePGD(model, objective, lam=100.0, steps=5)(x, y)
    check_bounds(x, aware)
    assert tiny_pipeline.ssl_loss(aware).mean() < tiny_pipeline.ssl_loss(plain).mean()
    with torch.no_grad():
        assert F.cross_entropy(model(plain), y) > F.cross_entropy(model(x), y)


def test_bpda_eot_fools_the_model_behind_the_repair(tiny_pipeline, labelled):
    x, y = labelled
    model = tiny_pipeline.classifier
    repair = lambda images, seed: tiny_pipeline.repair(images, steps=2, seed=seed)  # noqa: E731
    x_adv = BPDAEOT(model, repair, EPS, 2 / 255, steps=5, eot=2)(x, y)
    check_bounds(x, x_adv)
    defended = tiny_pipeline.predict(repair(x_adv, 123))
    assert (defended == y).float().mean() < (tiny_pipeline.predict(repair(x, 123)) == y).float().mean() + 1e-9


class WrongOnTheCleanImages(torch.nn.Module):
    """A randomized defense whose draw on the clean images happened to err, made deterministic: the classifier's
    logits, except that on exactly ``clean`` it puts every image in the class after its own."""

    def __init__(self, model, clean):
        super().__init__()
        self.model, self.clean = model, clean

    def forward(self, x):
        logits = self.model(x)
        return logits.roll(1, dims=1) if torch.equal(x, self.clean) else logits


def test_square_attacks_every_image_whatever_a_draw_said(tiny_pipeline, labelled):
    """AutoAttack's runner hands back the clean images where one draw on them erred, so that a later scoring could
    count an image that was never attacked as robust; SquareEveryImage attacks every image."""
    pytest.importorskip("pyautoattack", reason="Square comes from AutoAttack (the attacks extra: pyautoattack)")
    x, y = labelled
    model = WrongOnTheCleanImages(tiny_pipeline.classifier, x)
    assert torch.equal(AutoAttackAPGD(model, EPS, ("square",), square_queries=20)(x, y), x)   # nothing attacked
    x_adv = SquareEveryImage(model, EPS, queries=50)(x, y)
    check_bounds(x, x_adv)
    assert ((x_adv - x).abs().amax(dim=(1, 2, 3)) > EPS / 2).all()
    stripes = SquareEveryImage(model, EPS, queries=0)(x, y)        # Square's start alone: no square tried
    margin = lambda images: (lambda z: z.gather(1, y[:, None])[:, 0] - z.scatter(1, y[:, None], -1e9).amax(1))(
        model(images).detach())
    assert (margin(x_adv) <= margin(stripes) + 1e-6).all() and (margin(x_adv) < margin(stripes) - 1e-6).any()
