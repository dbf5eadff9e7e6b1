"""A model set at a working size of its own (S = 64) on a folder of real photos (the shared Imagenette sample):
`cli.py train-set` trains every model a few steps, calibrates and exports; a stopped training run resumes into the
very run that was never stopped; the torch reference and the runtime bundle repair 224×224 JPEGs at 64 alike; a
classifier of the user's own at 64×64 serves; and sizes that disagree are refused with both named."""
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import engine.train.trainer as train
from engine.train.profiles import PROFILES
from cli import main
from engine.foreign import ClassifierError
from engine.models.networks import build_model
from engine.pipeline import load_pipeline
from engine.models.weights import WeightsError, save_model
from tests.conftest import IMAGENETTE_SAMPLE
from tests.test_runtime import run_without_torch

pytestmark = pytest.mark.skipif(not IMAGENETTE_SAMPLE.exists(),
                                reason="the shared Imagenette sample is not beside the repository")
TINY = {"classifier": {"widths": (8, 16, 16), "stem_stride": 2}, "rotation": {"widths": (8, 16, 16), "stem_stride": 2},
        "contrastive": {"widths": (8, 16, 16), "proj_dim": 16, "bank_size": 64, "stem_stride": 2},
        "inpainting": {"width": 8}}
REPAIR = ["--steps", "3", "--seed", "1", "--batch-size", "4", "--quiet", "--threads", "1"]


def tiny_profile(monkeypatch, epochs: int = 1) -> None:
    for name, config in TINY.items():
        monkeypatch.setitem(PROFILES["folder-cpu"], name, {**PROFILES["folder-cpu"][name],
                                                                 "config": config, "batch": 32, "epochs": epochs})


@pytest.fixture(scope="module")
def set64(tmp_path_factory):
    """A tiny model set trained by `cli.py train-set` at S = 64 on the sample (200 train, 100 val photos), exported
    with the plain objective: the clean-level one divides by the clean losses' IQRs, which one epoch on 200 images
    leaves so small that float32 rounding flips sign steps (tests/test_runtime.py says the same of random nets)."""
    monkeypatch = pytest.MonkeyPatch()
    tiny_profile(monkeypatch)
    monkeypatch.setenv("MSSL_REPAIR_CACHE", str(tmp_path_factory.mktemp("cache")))
    out = tmp_path_factory.mktemp("set64") / "photos"
    result = CliRunner().invoke(main, ["train-set", "--data", str(IMAGENETTE_SAMPLE), "--size", "64", "--out",
                                       str(out), "--calibration-n", "50", "--threads", "1", "--objective", "plain"])
    monkeypatch.undo()
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def photos(tmp_path):
    """Eight 224×224 val JPEGs, as they come, with their labels."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rows, classes = [], sorted(p.name for p in (IMAGENETTE_SAMPLE / "val").iterdir())
    for path in sorted((IMAGENETTE_SAMPLE / "val").glob("*/*.JPEG"))[::12][:8]:
        shutil.copy(path, folder / path.name)
        rows.append(f"{path.name},{classes.index(path.parent.name)}")
    (folder / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")
    return folder


def test_the_set_records_its_size_classes_and_statistics(set64):
    manifest = json.loads((set64 / "classifier.json").read_text())
    assert manifest["input"]["size"] == 64 and manifest["input"]["class_names"][0] == "tench"
    assert manifest["config"]["num_classes"] == 10 and len(manifest["config"]["mean"]) == 3
    assert manifest["command"].startswith("python cli.py train-set --data")
    for name in ("contrastive", "rotation", "inpainting"):
        assert json.loads((set64 / f"{name}.json").read_text())["input"]["size"] == 64
    exported = json.loads((set64 / "onnx" / "manifest.json").read_text())
    assert exported["input"] == {"size": 64, "resize": True} and exported["classes"][0] == "tench"
    assert exported["graphs"]["repair"]["outputs"][0]["shape"] == ["batch", 3, 64, 64]
    assert not (set64 / ".checkpoints").exists() or not any((set64 / ".checkpoints").iterdir())


def test_torch_and_the_runtime_repair_photos_alike(set64, photos, tmp_path):
    reference = CliRunner().invoke(main, ["repair", "--input", str(photos), "--output", str(tmp_path / "ref"),
                                          "--weights", str(set64), "--backend", "torch", "--objective", "plain",
                                          *REPAIR])
    assert reference.exit_code == 0, reference.output
    result = run_without_torch("repair", "--bundle", str(set64 / "onnx"), "--input", str(photos), "--output",
                               str(tmp_path / "rt"), *REPAIR)
    assert result.returncode == 0, result.stderr
    ref, rt = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("ref", "rt"))
    assert ref["config"]["size"] == rt["config"]["size"] == 64
    repaired = [[r for r in report["images"] if r["status"] == "repaired"] for report in (ref, rt)]
    assert len(repaired[0]) == len(repaired[1]) == 8
    for a, b in zip(*repaired):
        assert a["notes"] == b["notes"] == ["resized from 224×224 to 64×64"]
        assert (a["pred_before"], a["pred_after"], a["label_after"]) == (b["pred_before"], b["pred_after"],
                                                                         b["label_after"])
        pixels = [np.asarray(Image.open(tmp_path / d / a["output"]), dtype=np.int16) for d in ("ref", "rt")]
        assert pixels[0].shape == (64, 64, 3)
        assert (pixels[0] != pixels[1]).mean() <= 1e-3          # sign steps flip only where a gradient is ~0


def test_a_stopped_training_run_resumes_into_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("MSSL_REPAIR_CACHE", str(tmp_path / "cache"))
    tiny_profile(monkeypatch, epochs=3)
    args = ("rotation", "folder-cpu", str(IMAGENETTE_SAMPLE))
    train.train_model(*args, out_dir=str(tmp_path / "whole"), size=64)
    real_save = train.Checkpoint.save

    def killed_after_two(self, model, optimizer, generator, epochs_done):
        real_save(self, model, optimizer, generator, epochs_done)
        if epochs_done == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Checkpoint, "save", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        train.train_model(*args, out_dir=str(tmp_path / "stopped"), size=64)
    monkeypatch.undo()
    monkeypatch.setenv("MSSL_REPAIR_CACHE", str(tmp_path / "cache"))
    tiny_profile(monkeypatch, epochs=3)
    with pytest.raises(WeightsError, match="pass --resume"):
        train.train_model(*args, out_dir=str(tmp_path / "stopped"), size=64)
    train.train_model(*args, out_dir=str(tmp_path / "stopped"), size=64, resume=True)
    sums = [json.loads((tmp_path / d / "rotation.json").read_text())["sha256"] for d in ("whole", "stopped")]
    assert sums[0] == sums[1]
    assert not (tmp_path / "stopped" / ".checkpoints" / "rotation.json").exists()


class Resize64(nn.Module):
    """A user's own 10-class classifier on 64×64 images (a fixed random linear map: only the shapes matter here)."""

    def __init__(self, side: int = 64) -> None:
        super().__init__()
        self.side = side
        self.linear = nn.Linear(3 * side * side, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def test_a_classifier_of_ones_own_at_64(set64, photos, tmp_path):
    torch.manual_seed(0)
    p = load_pipeline(set64, tasks=["rotation", "inpainting"], objective="plain", classifier=Resize64().eval())
    assert p.size == 64 and p.class_names[0] == "tench"
    x = torch.rand(2, 3, 64, 64)
    assert p.repair(x, steps=1).shape == (2, 3, 64, 64)
    with pytest.raises(ClassifierError, match="2×3×64×64"):
        load_pipeline(set64, tasks=["rotation"], objective="plain", classifier=Resize64(32).eval())
    onnx32 = tmp_path / "c32.onnx"
    torch.onnx.export(Resize64(32).eval(), (torch.rand(1, 3, 32, 32),), str(onnx32), dynamo=True,
                      input_names=["x"], external_data=False)
    with pytest.raises(ClassifierError, match=r"N×3×64×64.*export your classifier at 64×64"):
        load_pipeline(set64, tasks=["rotation"], objective="plain", classifier=str(onnx32))


def test_sizes_that_disagree_are_refused_with_both_named(set64, photos, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(set64, mixed, ignore=shutil.ignore_patterns("onnx"))
    save_model(build_model("RotationNet", {"widths": [8, 16, 16]}), "rotation", mixed,
               {"architecture": "RotationNet", "config": {"widths": [8, 16, 16]}}, overwrite=True)   # a CIFAR (32) one
    with pytest.raises(WeightsError, match=r"classifier 64×64.*rotation 32×32"):
        load_pipeline(mixed, tasks=["rotation"], objective="plain")
    result = CliRunner().invoke(main, ["repair", "--input", str(photos), "--output", str(tmp_path / "out"),
                                       "--weights", str(set64), "--no-resize", *REPAIR])
    assert result.exit_code == 1
    rows = json.loads((tmp_path / "out" / "report.json").read_text())["images"]
    assert {r["error"] for r in rows if r["status"] == "error"} == {
        "image is 224×224, the models take 64×64 (pass --resize to scale it)"}
    with pytest.raises(ValueError, match="take 64×64 images, got 32×32"):
        load_pipeline(set64, tasks=["rotation"], objective="plain").repair(torch.rand(1, 3, 32, 32), steps=1)


def test_heads_and_a_joint_model_at_64(set64, tmp_path, monkeypatch):
    import engine.train.joint as joint

    monkeypatch.setenv("MSSL_REPAIR_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    shutil.copytree(set64, base, ignore=shutil.ignore_patterns("onnx"))
    heads = {"rotation-head": {"hidden": 16}, "inpainting-head": {"width": 8},
             "contrastive-head": {"proj_dim": 16, "bank_size": 64}}
    for name, config in heads.items():
        monkeypatch.setitem(PROFILES["folder-cpu"], name, {**PROFILES["folder-cpu"][name],
                                                                 "config": config, "batch": 32, "epochs": 1})
        result = CliRunner().invoke(main, ["train", name, "--profile", "folder-cpu", "--data", str(IMAGENETTE_SAMPLE),
                                           "--size", "64", "--out", str(base)])
        assert result.exit_code == 0, result.output
    p = load_pipeline(base, tasks=list(heads), objective="plain")
    assert p.size == 64 and p.repair(torch.rand(2, 3, 64, 64), steps=1).shape == (2, 3, 64, 64)
    monkeypatch.setattr(joint, "HEADS", {**joint.HEADS, "contrastive-head": ("ContrastiveNet",
                                                                             {"proj_dim": 16, "bank_size": 32})})
    monkeypatch.setitem(joint.JOINT_PROFILES["cpu"], "joint-robust",
                        {**joint.JOINT_PROFILES["cpu"]["joint-robust"], "batch": 32, "epochs": 1})
    result = CliRunner().invoke(main, ["train", "joint-robust", "--base", str(base), "--out", str(tmp_path / "joint"),
                                       "--data", str(IMAGENETTE_SAMPLE)])
    assert result.exit_code == 0, result.output
    p = load_pipeline(tmp_path / "joint", tasks=[*heads, "consistency"], objective="plain")
    assert p.size == 64 and p.class_names[0] == "tench"
    assert p.ssl_loss(torch.rand(2, 3, 64, 64)).shape == (2,)


def test_inpainting_with_random_patches_trains_and_repairs(set64, tmp_path, monkeypatch):
    monkeypatch.setenv("MSSL_REPAIR_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    shutil.copytree(set64, base, ignore=shutil.ignore_patterns("onnx"))
    monkeypatch.setitem(PROFILES["folder-cpu"], "inpainting-patches",
                        {**PROFILES["folder-cpu"]["inpainting-patches"], "config": {"width": 8}, "batch": 32,
                         "epochs": 1})
    result = CliRunner().invoke(main, ["train", "inpainting-patches", "--profile", "folder-cpu", "--data",
                                       str(IMAGENETTE_SAMPLE), "--size", "64", "--out", str(base)])
    assert result.exit_code == 0, result.output
    assert json.loads((base / "inpainting-patches.json").read_text())["recipe"]["mask"] == "patches"
    p = load_pipeline(base, tasks=["inpainting-patches", "rotation"], objective="plain")
    x = torch.rand(2, 3, 64, 64)
    assert not torch.equal(p.repair(x, steps=2), x)
