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
    """Each image keeps the first restart that fooled the model: fooled after three restarts exactly where one of the
    three runs fooled it, which here is more than the last run alone (at ε 0.5/255 and one step the runs differ)."""
    x, y = labelled
    model = tiny_pipeline.classifier
    eps = 0.5 / 255
    runs = PGD(model, eps, eps / 4, steps=1, generator=torch.Generator().manual_seed(0))
    fooled = [model(runs._one_run(x, y)).argmax(1) != y for _ in range(3)]
    any_run = fooled[0] | fooled[1] | fooled[2]
    assert any_run.any() and not torch.equal(any_run, fooled[-1])       # the runs differ: the test can tell
    three = PGD(model, eps, eps / 4, steps=1, restarts=3, generator=torch.Generator().manual_seed(0))(x, y)
    check_bounds(x, three)
    with torch.no_grad():
        assert torch.equal(model(three).argmax(1) != y, any_run)


def test_defense_aware_pgd_trades_ce_against_the_ssl_loss(tiny_pipeline, labelled):
    x, y = labelled
    model, objective = tiny_pipeline.classifier, tiny_pipeline.objective
    plain = DefenseAwarePGD(model, objective, lam=0.0, steps=5)(x, y)
    aware = DefenseAwarePGD(model, objective, lam=100.0, steps=5)(x, y)
    check_bounds(x, aware)
    assert tiny_pipeline.ssl_loss(aware).mean() < tiny_pipeline.ssl_loss(plain).mean()
    with torch.no_grad():
        assert F.cross_entropy(model(plain), y) > F.cross_entropy(model(x), y)


@pytest.mark.parametrize("defense", ["identity", "repair"])
def test_bpda_eot_fools_the_model_behind_the_repair(tiny_pipeline, labelled, defense):
    """Behind the identity BPDA + EOT is PGD on the classifier, and behind the tiny repair it must still break images
    the repair left right: a strict drop either way."""
    x, y = labelled
    model = tiny_pipeline.classifier
    repair = {"identity": lambda images, seed: images,
              "repair": lambda images, seed: tiny_pipeline.repair(images, steps=2, seed=seed)}[defense]
    x_adv = BPDAEOT(model, repair, EPS, 2 / 255, steps=5, eot=2)(x, y)
    check_bounds(x, x_adv)
    right = lambda images: (tiny_pipeline.predict(repair(images, 123)) == y).float().mean()
    assert right(x_adv) < right(x)


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


def test_apgd_starts_from_its_seed_whatever_the_global_generator(tiny_pipeline, labelled):
    """pyautoattack seeds torch only without best_loss; APGDEveryImage seeds it itself: the same seed gives the same
    bytes after any other draw, another seed another start, and the caller's generator is left as it was."""
    pytest.importorskip("pyautoattack", reason="APGD comes from AutoAttack (the attacks extra: pyautoattack)")
    from engine.attacks import APGDEveryImage

    x, y = labelled
    apgd = lambda seed: APGDEveryImage(tiny_pipeline.classifier, EPS, iters=2, seed=seed)(x, y)
    torch.manual_seed(1)
    first = apgd(0)
    torch.rand(17)                                             # the global generator moved on
    before = torch.random.get_rng_state()
    assert torch.equal(apgd(0), first)
    assert torch.equal(torch.random.get_rng_state(), before)   # and is where it was
    assert not torch.equal(apgd(5), first)


def test_apgd_in_a_fresh_process_gives_the_same_bytes(tiny_weights, images, tmp_path):
    """A resumed run or a second process starts with another global generator: the same seed still gives the same
    points."""
    pytest.importorskip("pyautoattack", reason="APGD comes from AutoAttack (the attacks extra: pyautoattack)")
    import subprocess
    import sys

    from engine import load_pipeline
    from engine.attacks import APGDEveryImage
    from tests.conftest import ROOT

    script = (f"import sys, torch; sys.path.insert(0, {str(ROOT)!r}); from engine import load_pipeline; "
              "from engine.attacks import APGDEveryImage; "
              f"p = load_pipeline({str(tiny_weights)!r}, objective='plain'); x = torch.load({str(tmp_path / 'x.pt')!r}); "
              f"torch.save(APGDEveryImage(p.classifier, 8 / 255, iters=2, seed=4)(x, p.predict(x)), "
              f"{str(tmp_path / 'out.pt')!r})")
    torch.save(images, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    pipeline = load_pipeline(tiny_weights, objective="plain")
    here = APGDEveryImage(pipeline.classifier, 8 / 255, iters=2, seed=4)(images, pipeline.predict(images))
    assert torch.equal(torch.load(tmp_path / "out.pt"), here)


def test_the_deployed_function_keeps_the_first_point_it_misclassified_else_the_smallest_margin():
    from engine.attacks import KeptByDeployed

    x, y = torch.zeros(2, 1, 1, 1), torch.tensor([0, 0])
    # the deployed function's logits (class 0, class 1) are read off the point's one pixel: (1 − v, v) for image 0,
    # (1, v) for image 1 (right while v < 1)
    deployed = lambda z: torch.stack([torch.stack([1 - v, v]) if i == 0 else torch.stack([torch.ones(()), v])
                                      for i, v in enumerate(z.flatten())])
    asked = []
    judged = KeptByDeployed(lambda z: asked.append(z) or z.flatten(1), deployed, x, y)
    points = [torch.tensor([0.2, 0.3]), torch.tensor([0.7, 0.8]), torch.tensor([0.1, 0.9]), torch.tensor([0.9, 0.5])]
    for point in points:
        judged(point.view(2, 1, 1, 1))
        judged(point.view(2, 1, 1, 1))                        # EOT asks again about the same point: judged once
    assert judged.judged == 4 and len(asked) == 8            # the attack's model still runs every time
    # image 0: misclassified first at 0.7 (1 − v < v), kept though 0.1 came later; image 1: smallest margin at 0.9
    assert judged.kept.flatten().tolist() == pytest.approx([0.7, 0.9])
    assert judged.broken.tolist() == [True, False]
    with pytest.raises(ValueError, match="whole batches"):
        judged(torch.zeros(1, 1, 1, 1))
