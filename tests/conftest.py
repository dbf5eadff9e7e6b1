"""Shared fixtures: tiny random-init networks saved as a weights folder (so every test also exercises the weights
code), the pipeline built from them, and paths to the shipped examples and weights."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.calibration import CALIBRATION_FILE, measure, save_calibration  # noqa: E402
from engine.models.heads import attach_backbone  # noqa: E402
from engine.imageio import read_image  # noqa: E402
from engine.models.networks import build_model  # noqa: E402
from engine.pipeline import load_pipeline  # noqa: E402
from engine.models.weights import save_model  # noqa: E402

TINY = {
    "classifier": ("Classifier", {"widths": [8, 16, 16]}),
    "contrastive": ("ContrastiveNet", {"widths": [8, 16, 16], "proj_dim": 16, "bank_size": 64}),
    "inpainting": ("ContextEncoder", {"width": 8}),
    "rotation": ("RotationNet", {"widths": [8, 16, 16]}),
}
# Heads on the tiny classifier's backbone (engine/models/heads.py)
TINY_HEADS = {
    "contrastive-head": ("ContrastiveNet", {"widths": [8, 16, 16], "proj_dim": 16, "bank_size": 64}),
    "inpainting-head": ("InpaintingHead", {"widths": [8, 16, 16], "width": 8}),
    "rotation-head": ("RotationHead", {"widths": [8, 16, 16], "hidden": 16}),
}
EXAMPLES = ROOT / "examples" / "clean"
SHIPPED = ROOT / "weights"
IMAGENETTE_SAMPLE = ROOT.parent / "shared" / "data" / "imagenette" / "sample"


def make_tiny_weights(out: Path) -> Path:
    torch.manual_seed(0)
    for name, (arch, config) in TINY.items():
        net = build_model(arch, config)
        if name == "classifier":
            torch.nn.init.normal_(net.head.weight, std=0.5)   # a zero head would predict one class for everything
        if name == "contrastive":
            net.bank.copy_(F.normalize(torch.randn_like(net.bank), dim=1))
        save_model(net, name, out, {"architecture": arch, "config": config, "metrics": {}})
        if name == "classifier":
            classifier, classifier_manifest = net, json.loads((out / "classifier.json").read_text())
    for name, (arch, config) in TINY_HEADS.items():
        net = build_model(arch, config)
        backbone = attach_backbone(net, classifier, classifier_manifest)
        if name == "contrastive-head":
            net.bank.copy_(F.normalize(torch.randn_like(net.bank), dim=1))
        save_model(net, name, out, {"architecture": arch, "config": config, "metrics": {}, "backbone": backbone})
    # clean-loss statistics of all six tasks, measured on the example images (the tests have no training set)
    pipeline = load_pipeline(out, tasks=[*TINY][1:] + [*TINY_HEADS], objective="plain")
    clean = torch.stack([read_image(p)[0] for p in sorted(EXAMPLES.glob("*.png"))])
    save_calibration(measure(pipeline, clean), out / CALIBRATION_FILE, "tests/conftest.py")
    return out


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("tiny_weights"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray (2 CPUs) for the whole session, shut down at its end: Ray started again in a process that had
    shut it down can leave threads of the first session pointing at freed memory (ray-project/ray#31145; the likely
    cause of the one crash at exit in docs/testing.md). Its workers import the tests' modules (Serve's replicas
    unpickle the test's stand-in engine), so the repository is on their path."""
    ray = pytest.importorskip("ray", reason="needs Ray (the ray or serve extra)")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    os.environ.setdefault("RAY_worker_niceness", "0")      # Ray's default 15 starves its workers beside a busy job
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_weights):
    return load_pipeline(tiny_weights, objective="plain")


# The clean-level objective (the CLI's default, the one whose images can leave the loop early) for the tests of the
# repair graphs and the bench: two tasks (a transposed convolution, max-pooling, both sign paths; quick to trace).
# The tiny rotation net's clean losses hardly spread (IQR ≈ 2e-5), so its 1/IQR weight would multiply float rounding
# by 60,000: α 1e-4 brings that weight to ≈ 6. (With the contrastive net too, whose IQR is ≈ 7e-6, losses sit within
# float noise of their clean levels and the engines' early exits part ways: the plain objective is used there.)
CLEAN_TASKS = ["inpainting", "rotation"]
CLEAN_ALPHA = {"rotation": 1e-4}
CLEAN_OPTIONS = ["--tasks", "inpainting,rotation", "--objective", "clean", "--alpha", "1,1e-4"]   # the same, for the CLI


def tiny_clean_pipeline(weights: Path, **kwargs):
    return load_pipeline(weights, tasks=CLEAN_TASKS, objective="clean", alpha=CLEAN_ALPHA, **kwargs)


def export_once(pipeline, out: Path) -> Path:
    from export.onnx_export import export_all

    export_all(pipeline, out, command="tests/conftest.py")
    return out


# Tracing the repair graphs is most of a minute, so the tests share two exports, each made once per session and read
# only: a test that exports, repairs with --onnx-dir or damages files works on a copy.
@pytest.fixture(scope="session")
def tiny_bundle(tiny_weights, tmp_path_factory) -> Path:
    """The tiny networks' graphs for the plain objective of the three tasks (views, a mask and no draws: every kind
    of parameter), with the gate's clean statistics: test_onnx, test_runtime, test_tensorrt. The plain objective
    because the clean-level one divides by the clean losses' IQRs, ~1e-5 for these random networks (see above)."""
    pipeline = load_pipeline(tiny_weights, objective="plain", calibration=tiny_weights / CALIBRATION_FILE)
    return export_once(pipeline, tmp_path_factory.mktemp("tiny_bundle"))


@pytest.fixture(scope="session")
def tiny_clean_bundle(tiny_weights, tmp_path_factory) -> Path:
    """tiny_clean_pipeline's graphs: test_repair_graphs, test_bench."""
    return export_once(tiny_clean_pipeline(tiny_weights), tmp_path_factory.mktemp("tiny_clean_bundle"))


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A copy of the session's tiny bundle that a test may change."""
    import shutil

    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    """8 real CIFAR-10 test images from examples/, float in [0, 1]."""
    return torch.stack([read_image(p)[0] for p in sorted(EXAMPLES.glob("*.png"))[:8]])


def cifar_root() -> str | None:
    root = os.environ.get("CIFAR10_ROOT")
    return root if root and Path(root).is_dir() else None


needs_cifar = pytest.mark.skipif(cifar_root() is None, reason="CIFAR10_ROOT is not set to a CIFAR-10 folder")
needs_shipped = pytest.mark.skipif(not (SHIPPED / "classifier.json").exists(),
                                   reason="no shipped weights in weights/ (train them with cli.py train)")


@pytest.fixture
def fake_test_set(monkeypatch):
    """load_cifar10("test") -> the 64 example images (uint8) and their labels, for eval and attack tests."""
    import csv

    import engine.data.model_sets
    from engine.imageio import read_image

    with open(EXAMPLES / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    x = torch.stack([(read_image(EXAMPLES / r["file"])[0] * 255).round().to(torch.uint8) for r in rows])
    y = torch.tensor([int(r["label"]) for r in rows])
    monkeypatch.setattr(engine.data.model_sets, "load_cifar10", lambda split="test", root=None: (x, y))
    monkeypatch.setattr(engine.data.model_sets, "dataset_md5", lambda root=None: {"test_batch.bin": "0" * 32})
    return x, y


def patch_small_cifar(monkeypatch, module, n_train: int, n_test: int) -> None:
    """``module``'s load_cifar10 -> random uint8 images (n_train or n_test) with labels 0..9 in turn, and its
    dataset_md5 -> a fixed table: training recipes then run end to end in seconds."""
    gen = torch.Generator().manual_seed(0)

    def fake_load(split, root=None):
        n = n_train if split == "train" else n_test
        return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen), torch.arange(n) % 10

    monkeypatch.setattr(module, "load_cifar10", fake_load)
    monkeypatch.setattr(module, "dataset_md5", lambda root=None: {"test_batch.bin": "0" * 32})
