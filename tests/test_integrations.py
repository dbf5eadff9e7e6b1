"""The repair in front of a classifier inside the attack libraries people use: torchattacks and the Adversarial
Robustness Toolbox run their own attacks against it (each test skips where its optional extra is missing)."""
import numpy as np
import pytest
import torch

from engine import DefendedClassifier, load_pipeline


@pytest.fixture
def pipeline(tiny_weights):
    return load_pipeline(tiny_weights, tasks=["rotation"], objective="plain")


def test_torchattacks_pgd_runs_against_the_defended_classifier(pipeline, images):
    torchattacks = pytest.importorskip("torchattacks", reason="needs torchattacks (the attacks extra)")
    model = DefendedClassifier(pipeline, bpda=True, steps=2).eval()
    y = pipeline.predict(images)
    x_adv = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=3, random_start=True)(images, y)
    assert x_adv.shape == images.shape
    assert (x_adv - images).abs().max() <= 8 / 255 + 1e-6
    assert (x_adv - images).abs().max() > 1 / 255          # BPDA gradients reached the input and moved it
    assert model.purifier.calls >= 3                       # every attack step ran the repair


def test_art_pgd_runs_through_the_repair_preprocessor(pipeline, images):
    pytest.importorskip("art", reason="needs the Adversarial Robustness Toolbox (the art extra)")
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    from engine.art_defence import RepairPreprocessor

    defence = RepairPreprocessor(pipeline, steps=2)
    clf = PyTorchClassifier(pipeline.classifier, loss=torch.nn.CrossEntropyLoss(), input_shape=(3, 32, 32),
                            nb_classes=10, clip_values=(0.0, 1.0), preprocessing_defences=[defence],
                            device_type="cpu")
    x = images[:4].numpy()
    # predictions run the repair (ART calls it under no_grad): they are the classifier's on the repaired images
    repaired = defence.purifier.repair(torch.from_numpy(x))
    calls = defence.purifier.calls
    logits = clf.predict(x)
    assert defence.purifier.calls == calls + 1
    assert logits.shape == (4, 10)
    attack = ProjectedGradientDescent(clf, eps=8 / 255, eps_step=2 / 255, max_iter=3, num_random_init=1,
                                      verbose=False)
    x_adv = attack.generate(x)
    assert np.abs(x_adv - x).max() <= 8 / 255 + 1e-6
    assert np.abs(x_adv - x).max() > 1 / 255               # the loss gradient reached the input through BPDA
    assert not torch.equal(repaired, torch.from_numpy(x))


def test_the_art_preprocessor_passes_gradients_as_the_identity(pipeline, images):
    pytest.importorskip("art", reason="needs the Adversarial Robustness Toolbox (the art extra)")
    from engine.art_defence import RepairPreprocessor

    defence = RepairPreprocessor(pipeline, steps=1)
    x = images[:2].clone().requires_grad_(True)
    out, _ = defence.forward(x)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert not torch.equal(out.detach(), x.detach())       # but the value is the repair's
