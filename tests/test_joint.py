"""Joint training (engine/train/joint.py) end to end on a small slice of data and tiny widths: it fine-tunes the
classifier in --base with its heads, writes the classifier and three heads whose backbones are the classifier's, and the
pipeline loads them as heads; a missing base classifier and an --out equal to --base are refused."""
import json

import pytest
import torch
from click.testing import CliRunner

import engine.data.model_sets as datasets
import engine.train.joint as joint
from cli import main
from engine.pipeline import load_pipeline
from engine.models.weights import load_model
from tests.conftest import patch_small_cifar


@pytest.fixture
def small_data(monkeypatch):
    patch_small_cifar(monkeypatch, datasets, 64, 20)
    monkeypatch.setattr(joint, "HEADS", {**joint.HEADS, "contrastive-head": ("ContrastiveNet",
                                                                             {"proj_dim": 16, "bank_size": 32})})
    for name in joint.JOINT_MODELS:
        monkeypatch.setitem(joint.JOINT_PROFILES["cpu"], name,
                            {**joint.JOINT_PROFILES["cpu"][name], "batch": 16, "epochs": 1})


@pytest.mark.parametrize("name", ["joint-robust", "joint-standard"])
def test_joint_training_writes_a_classifier_and_heads_on_its_backbone(small_data, tiny_weights, tmp_path, name):
    out = tmp_path / name
    result = CliRunner().invoke(main, ["train", name, "--base", str(tiny_weights), "--out", str(out)])
    assert result.exit_code == 0, result.output
    classifier, manifest = load_model("classifier", out)
    assert manifest["joint"] == name and manifest["base"]["sha256"] == json.loads(
        (tiny_weights / "classifier.json").read_text())["sha256"]
    assert {"clean_accuracy", "pgd20_accuracy", "consistency_two_view_agreement"} <= set(manifest["metrics"])
    base, _ = load_model("classifier", tiny_weights)
    assert not torch.equal(base.head.weight, classifier.head.weight)          # it trained
    for head in ("contrastive-head", "inpainting-head", "rotation-head"):
        net, head_manifest = load_model(head, out)
        assert head_manifest["backbone"]["sha256"] == manifest["sha256"]
        shared = classifier.backbone.state_dict()
        assert all(torch.equal(shared[k], net.backbone.state_dict()[k]) for k in shared)
    p = load_pipeline(out, tasks=["contrastive-head", "inpainting-head", "rotation-head", "consistency", "hedge"],
                      objective="plain")
    assert p.ssl_loss(torch.rand(2, 3, 32, 32)).shape == (2,)
    again = CliRunner().invoke(main, ["train", name, "--base", str(tiny_weights), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_joint_training_refuses_a_missing_base_and_an_out_that_is_the_base(small_data, tiny_weights, tmp_path):
    missing = CliRunner().invoke(main, ["train", "joint-robust", "--base", str(tmp_path), "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and str(tmp_path / "classifier.json") in missing.output
    same = CliRunner().invoke(main, ["train", "joint-robust", "--base", str(tiny_weights), "--out",
                                     str(tiny_weights), "--overwrite"])
    assert same.exit_code == 2 and "base" in same.output


def test_one_rotation_rotates_each_image_by_its_own_index():
    x = torch.rand(6, 3, 8, 8)
    rotated, k = joint.one_rotation(x, torch.Generator().manual_seed(1))
    for i in range(6):
        assert torch.equal(rotated[i], torch.rot90(x[i], int(k[i]), dims=(1, 2)))


@pytest.mark.parametrize("name", ["joint-robust", "joint-standard"])
def test_shipped_joint_models_load_with_their_calibration(name):
    from tests.conftest import SHIPPED

    folder = SHIPPED / name
    if not (folder / "classifier.json").exists():
        pytest.skip(f"no {folder} (train it with `python cli.py train {name}`)")
    tasks = ["contrastive-head", "inpainting-head", "rotation-head", "consistency", "hedge"]
    p = load_pipeline(folder, tasks=tasks, objective="clean")          # calibration.json beside the weights
    assert p.manifests["classifier"]["joint"] == name
    assert {"clean_accuracy", "pgd20_accuracy"} <= set(p.manifests["classifier"]["metrics"])
    assert p.ssl_loss(torch.rand(2, 3, 32, 32)).shape == (2,)


def test_loss_scale_is_the_mean_of_the_warm_up_then_stays():
    scale = joint.LossScale(warmup=3)
    seen = [scale("c", torch.tensor(v)) for v in (1.0, 2.0, 3.0, 0.0001, 50.0)]
    assert seen == pytest.approx([1.0, 1.5, 2.0, 2.0, 2.0])
    running = joint.LossScale()                         # no warm-up: a moving average that follows the loss down
    assert [running("c", torch.tensor(v)) for v in (1.0, 0.0)][-1] == pytest.approx(0.98, abs=1e-4)


@pytest.mark.parametrize("steps", [1, 2])
def test_attacked_batch_stays_within_eps_and_raises_the_loss(steps):
    torch.manual_seed(0)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    x, y = torch.rand(16, 3, 8, 8) * 0.5 + 0.25, torch.randint(0, 10, (16,))
    cfg = {"eps": 8 / 255, "attack_steps": steps, "attack_step": 4 / 255, "noise_std": 0.0}
    adv = joint.attacked_batch(clf, x, y, cfg, torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6
    ce = torch.nn.functional.cross_entropy
    assert ce(clf(adv), y) > ce(clf(x), y)
    noisy = joint.attacked_batch(clf, x, y, {**cfg, "attack_steps": 0, "noise_std": 0.05},
                                 torch.Generator().manual_seed(0))
    assert 0.03 < (noisy - x).std() < 0.07


def test_the_standard_recipe_noises_the_ssl_inputs_but_not_the_inpainting_hole(tiny_weights):
    nets, _ = joint.load_base(tiny_weights)
    seen = []
    maps = nets.classifier.backbone.maps
    nets.classifier.backbone.maps = lambda t: seen.append(t.detach()) or maps(t)
    x, y = torch.rand(8, 3, 32, 32) * 0.6 + 0.2, torch.randint(0, 10, (8,))
    cfg = {**joint.CPU_PROFILE["joint-standard"], "ssl_fraction": 0.5}
    for ssl_noise in (False, True):            # same seed: the same draws up to the SSL inputs' noise
        joint.joint_step(nets, {**cfg, "ssl_noise": ssl_noise}, x, y, torch.Generator().manual_seed(0),
                         joint.LossScale())
    clean, noisy = seen
    n = len(x)
    assert torch.equal(clean[:n], noisy[:n])                   # the classification batch: noised alike in both
    diff = noisy[n:] - clean[n:]
    hole = diff[-4:, :, 8:24, 8:24]                             # the inpainting inputs' mean-colour fill
    assert hole.abs().max() == 0
    assert 0.07 < diff[:-4].std() < 0.11                        # σ 0.1, a little less where [0, 1] clips it
