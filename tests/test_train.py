"""`cli.py train` end to end on a small slice of data and tiny widths: it writes loadable weights and a manifest
with everything a shipped model records (architecture, command, data md5, epochs, seed, wall time, machine, metrics,
sha256)."""
import json

import pytest
import torch
from click.testing import CliRunner

import engine.data.model_sets as datasets
import engine.train.loop as loop
from engine.train.profiles import PROFILES
from cli import main
from engine.models.weights import load_model
from tests.conftest import patch_small_cifar

TINY_CONFIGS = {"classifier": {"widths": (8, 16, 16)}, "rotation": {"widths": (8, 16, 16)},
                "contrastive": {"widths": (8, 16, 16), "proj_dim": 16, "bank_size": 32},
                "inpainting": {"width": 8}, "rotation-head": {"widths": (8, 16, 16), "hidden": 16},
                "contrastive-head": {"widths": (8, 16, 16), "proj_dim": 16, "bank_size": 32},
                "inpainting-head": {"widths": (8, 16, 16), "width": 8}}
EXPECTED_METRICS = {"classifier": {"clean_accuracy", "pgd20_accuracy"}, "rotation": {"rotation_accuracy"},
                    "contrastive": {"knn_accuracy"}, "inpainting": {"inpainting_mse", "mean_colour_baseline_mse"}}
EXPECTED_METRICS.update({f"{task}-head": EXPECTED_METRICS[task] for task in ("rotation", "contrastive", "inpainting")})


@pytest.fixture
def small_data(monkeypatch):
    patch_small_cifar(monkeypatch, datasets, 128, 40)
    for name, config in TINY_CONFIGS.items():
        monkeypatch.setitem(PROFILES["cpu"], name,
                            {**PROFILES["cpu"][name], "config": config, "batch": 32, "epochs": 1})


@pytest.mark.parametrize("name", [n for n in TINY_CONFIGS if not n.endswith("-head")])
def test_train_writes_weights_and_manifest(small_data, tmp_path, name):
    result = CliRunner().invoke(main, ["train", name, "--out", str(tmp_path), "--seed", "3"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / f"{name}.json").read_text())
    for key in ("architecture", "config", "command", "data_md5", "epochs", "seed", "wall_seconds", "machine",
                "metrics", "sha256", "params"):
        assert key in manifest, key
    assert manifest["command"] == f"python cli.py train {name} --profile cpu --out {tmp_path} --seed 3"
    assert manifest["seed"] == 3 and manifest["epochs"] == 1
    assert EXPECTED_METRICS[name] <= set(manifest["metrics"])
    model, _ = load_model(name, tmp_path)
    assert not model.training
    again = CliRunner().invoke(main, ["train", name, "--out", str(tmp_path)])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_crop_flip_keeps_pixels_from_the_image():
    x = torch.rand(4, 3, 32, 32)
    y = loop.crop_flip(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    values = set(x.flatten().tolist())
    assert set(y.flatten().tolist()) <= values


def test_triangular_schedule():
    assert loop.triangular_lr(0, 100, 1.0) == 0
    assert loop.triangular_lr(20, 100, 1.0) == pytest.approx(1.0)
    assert loop.triangular_lr(60, 100, 1.0) == pytest.approx(0.5)
    assert loop.triangular_lr(100, 100, 1.0) == 0


@pytest.mark.parametrize("head", [n for n in TINY_CONFIGS if n.endswith("-head")])
def test_a_head_trains_on_the_frozen_backbone_of_the_classifier_beside_it(small_data, tmp_path, head):
    missing = CliRunner().invoke(main, ["train", head, "--out", str(tmp_path)])
    assert missing.exit_code == 2 and "classifier" in missing.output
    assert CliRunner().invoke(main, ["train", "classifier", "--out", str(tmp_path)]).exit_code == 0
    result = CliRunner().invoke(main, ["train", head, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / f"{head}.json").read_text())
    classifier, classifier_manifest = load_model("classifier", tmp_path)
    assert manifest["backbone"] == {"name": "classifier", "sha256": classifier_manifest["sha256"]}
    assert EXPECTED_METRICS[head] <= set(manifest["metrics"])
    model, _ = load_model(head, tmp_path)
    frozen, trained = classifier.backbone.state_dict(), model.backbone.state_dict()
    assert all(torch.equal(frozen[k], trained[k]) for k in frozen)     # BatchNorm statistics included
