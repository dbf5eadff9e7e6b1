"""The tasks that read the classifier itself (label consistency, hedge), the defended model for attack libraries,
and AutoAttack (the pyautoattack package) in the evaluation."""
import pytest
import torch
import torch.nn.functional as F

import engine.eval.evaluate as ev
from engine.attacks import PGD
from engine.defended import DefendedClassifier
from engine.pipeline import load_pipeline
from engine.tasks.consistency import prediction_spread
from tests.conftest import needs_shipped

CLASSIFIER_TASKS = ("consistency", "hedge")


@pytest.fixture(scope="module")
def classifier_pipeline(tiny_weights):
    return load_pipeline(tiny_weights, tasks=list(CLASSIFIER_TASKS), objective="plain")


@pytest.mark.parametrize("name", CLASSIFIER_TASKS)
def test_loss_is_per_image_deterministic_and_ignores_batch_mates(classifier_pipeline, images, name):
    task = classifier_pipeline.objective.tasks[name]
    assert task.net is classifier_pipeline.classifier
    params = classifier_pipeline.objective.sample_params(images, 0)[name]
    loss = task.loss(images, **params)
    assert loss.shape == (len(images),) and torch.isfinite(loss).all()
    torch.testing.assert_close(task.loss(images, **params), loss, rtol=0, atol=0)
    alone = task.loss(images[2:3], **{k: v[2:3] for k, v in params.items()})
    torch.testing.assert_close(alone, loss[2:3], rtol=1e-5, atol=1e-6)


def test_prediction_spread_is_zero_for_agreeing_views_and_grows_with_disagreement():
    agree = torch.tensor([0.7, 0.2, 0.1]).expand(1, 4, 3)
    assert prediction_spread(agree).item() == pytest.approx(0.0, abs=1e-7)
    split = torch.eye(3)[[0, 0, 1, 1]][None]                       # two views say class 0, two say class 1
    assert prediction_spread(split).item() == pytest.approx(0.5)   # each view is √0.5 from the mean (½, ½, 0)


def test_hedge_is_the_negated_mean_cross_entropy_over_all_classes(classifier_pipeline, images):
    task = classifier_pipeline.objective.tasks["hedge"]
    logits = classifier_pipeline.classifier(images)
    expected = -torch.stack([F.cross_entropy(logits, torch.full((len(images),), c), reduction="none")
                             for c in range(10)]).mean(0)
    torch.testing.assert_close(task.loss(images), expected, rtol=1e-5, atol=1e-6)


def test_classifier_tasks_record_the_classifier_weights(classifier_pipeline):
    for name in CLASSIFIER_TASKS:
        assert classifier_pipeline.manifests[name]["sha256"] == classifier_pipeline.manifests["classifier"]["sha256"]


@needs_shipped
def test_the_hedge_repair_stays_in_the_ball_and_lowers_its_loss(images):
    p = load_pipeline(tasks=["hedge"], objective="plain")   # the shipped classifier (the tiny one: uniform logits)
    result = p.repair_with_trace(images, eps=8 / 255, steps=5, step_size=2 / 255)
    assert (result.images - images).abs().max() <= 8 / 255 + 1e-6
    assert result.trace[-1].mean() < result.trace[0].mean()


def test_defended_classifier_works_under_no_grad_and_passes_gradients_with_bpda(tiny_weights, images):
    p = load_pipeline(tiny_weights, tasks=["rotation"], objective="plain")
    model = DefendedClassifier(p, bpda=True, steps=2)
    with torch.no_grad():                                  # how attack libraries call a model
        logits = model(images)
    assert logits.shape == (len(images), 10)
    x = images.clone().requires_grad_(True)
    label = torch.zeros(len(x), dtype=torch.long)
    grad, = torch.autograd.grad(F.cross_entropy(model(x), label), x)
    # BPDA: the gradient is the classifier's at the repaired image (the second call's draws: seed 0 + 1_000_003 · 2)
    repaired = p.repair(images, 16 / 255, 2, 2 / 255, 2 * 1_000_003).detach().requires_grad_(True)
    expected, = torch.autograd.grad(F.cross_entropy(p.classifier(repaired), label), repaired)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    y = p.predict(images)
    x_adv = PGD(model, eps=8 / 255, alpha=2 / 255, steps=2, generator=torch.Generator().manual_seed(0))(images, y)
    assert (x_adv - images).abs().max() <= 8 / 255 + 1e-6


def test_defended_classifier_draws_fresh_repair_randomness_each_call(tiny_weights, images):
    # steps 0: the random start only
    model = DefendedClassifier(load_pipeline(tiny_weights, tasks=["rotation"], objective="plain"), steps=0)
    first, second = model.repair(images), model.repair(images)
    assert not torch.equal(first, second)


def test_eval_runs_autoattack_transfer_and_through_the_repair(tiny_pipeline, fake_test_set, tmp_path):
    pytest.importorskip("pyautoattack", reason="AutoAttack needs the attacks extra (pyautoattack)")
    config = ev.EvalConfig(n=4, chunk=4, attacks=["none", "autoattack", "autoattack-bpda"],
                           repairs=["none", "rotation"], defense="rotation", repair_steps=1, bpda_repair_steps=1,
                           autoattack_iters=2, autoattack_targets=1)
    result = ev.run_eval(tiny_pipeline, config, tmp_path / "aa.json", progress=False)
    cell = {(r["attack"], r["repair"]): r["accuracy"] for r in result["rows"]}
    assert cell["autoattack", "none"] < cell["none", "none"]      # AutoAttack breaks the tiny classifier
    assert {("autoattack-bpda", "rotation"), ("autoattack", "rotation")} <= set(cell)
