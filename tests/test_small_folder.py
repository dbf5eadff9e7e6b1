"""A user's own small folder, first hour (#40): `cli.py train-set --profile quick` on 3 classes of 8 training and 2
val photos at S = 32 checks the data and prints its plan before the first model trains, sizes every stage from the
data (bank, batch, calibration), records in each manifest what the model was trained on, ends with what the user got
and what to run next; a resume after the folder changed stops before training and says what changed; a set whose
networks disagree on their data is refused at load; and a repair of a folder of class subfolders reports accuracy."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import main
from engine.data.cifar10 import DataError
from engine.pipeline import load_pipeline
from engine.train.profiles import PROFILES
from engine.train.profiles import MIN_TRAIN_IMAGES, fit_to_data
from engine.models.weights import WeightsError
from tests.test_runtime import run_without_torch

SET = ["--size", "32", "--profile", "quick", "--threads", "1"]


def photo_folder(root: Path, train: int = 8, val: int = 2, classes: int = 3) -> Path:
    """``classes`` class folders of noisy flat-colour photos (40×40 PNGs) in train/ and val/."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"breed{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, 3) + rng.normal(0, 40, (40, 40, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.relative_to(folder).as_posix().encode() + p.read_bytes() for p in files)).hexdigest()


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """(the photo folder, the model set trained on it, the command's output)."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("MSSL_REPAIR_CACHE", str(tmp_path_factory.mktemp("cache")))
    data = photo_folder(tmp_path_factory.mktemp("photos"))
    out = tmp_path_factory.mktemp("sets") / "mine"
    result = CliRunner().invoke(main, ["train-set", "--data", str(data), "--out", str(out), *SET])
    monkeypatch.undo()
    assert result.exit_code == 0, result.output
    return data, out, result.output


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MSSL_REPAIR_CACHE", str(tmp_path / "cache"))


def test_the_plan_comes_before_the_first_model_and_sizes_each_stage_from_the_data(small_set):
    _, _, output = small_set
    assert output.index("plan:") < output.index("training classifier")
    plan = output[output.index("plan:"):output.index("training classifier")]
    assert "train: 24 images at 32×32 (breed0 8, breed1 8, breed2 8)" in plan
    assert "test: 6 images at 32×32 (breed0 2, breed1 2, breed2 2)" in plan
    assert "batch 128 -> 24: the training split has 24 images" in plan
    assert "bank of negatives 4096 -> 24: one view of each training image" in plan
    assert "2000 -> 24 images: the training split has 24" in plan
    assert "then PGD-20 on 6 test images" in plan and "in all" in plan


def test_every_model_records_the_data_it_was_trained_on(small_set):
    data, out, _ = small_set
    for name in ("classifier", "contrastive", "rotation", "inpainting"):
        record = json.loads((out / f"{name}.json").read_text())["trained_on"]
        assert record["data"] == str(data.resolve()) and record["size"] == 32
        assert record["splits"]["train"]["files"] == 24 and record["splits"]["test"]["files"] == 6
        assert len(record["splits"]["train"]["fingerprint"]) == 16
        assert (record["seed"], record["profile"], record["preview"]) == (0, "quick", True)
    contrastive = json.loads((out / "contrastive.json").read_text())
    assert contrastive["config"]["bank_size"] == 24 and contrastive["recipe"]["batch"] == 24
    assert any("bank of negatives" in note for note in contrastive["sized_from_data"])
    assert json.loads((out / "onnx" / "manifest.json").read_text())["preview"] is True
    assert all(len(v) == 24 for v in json.loads((out / "calibration.json").read_text())["losses"].values())


def test_the_last_lines_say_what_the_user_got_and_what_to_run_next(small_set):
    data, out, output = small_set
    tail = output[output.index(f"model set in {out} (a preview: --profile quick)"):]
    assert "classifier: clean accuracy" in tail and "on 6 test images, PGD-20 (ε 4/255)" in tail
    assert "contrastive: kNN accuracy of its features" in tail and "(bank of 24 negatives)" in tail
    assert "rotation: rotation accuracy" in tail and "inpainting: squared error in the hole" in tail
    assert "calibration: 24 clean training images; median losses contrastive" in tail
    for command in (f"python cli.py repair --weights {out}", f"python cli.py eval --weights {out} --data {data}",
                    f"python cli.py serve --weights {out}"):
        assert command in tail


@pytest.mark.parametrize("change, said", [
    ("add", "classifier: the train split: 24 files then, 25 now"),
    ("replace", "the train split: as many files, but other names or sizes"),
    ("seed", "seed 0 then, 1 now")])
def test_a_resume_on_changed_data_or_settings_stops_before_training(small_set, tmp_path, cache, change, said):
    data, out = shutil.copytree(small_set[0], tmp_path / "photos"), shutil.copytree(small_set[1], tmp_path / "mine")
    extra = []
    if change == "add":
        shutil.copy(data / "train" / "breed0" / "0.png", data / "train" / "breed0" / "new.png")
    elif change == "replace":
        (data / "train" / "breed1" / "3.png").rename(data / "train" / "breed1" / "3b.png")
    else:
        extra = ["--seed", "1"]
    before = digest(out)
    result = CliRunner().invoke(main, ["train-set", "--data", str(data), "--out", str(out), *SET, "--resume", *extra])
    assert result.exit_code == 2 and said in result.output and "--overwrite" in result.output
    assert "training" not in result.output and digest(out) == before


def test_an_unfinished_model_of_other_data_is_not_continued(small_set, tmp_path, cache):
    data, out = small_set[0], tmp_path / "mine"
    record = json.loads((small_set[1] / "classifier.json").read_text())["trained_on"]
    record["splits"]["train"]["files"] = 1500
    (out / ".checkpoints").mkdir(parents=True)
    (out / ".checkpoints" / "classifier.json").write_text(json.dumps({"signature": {"trained_on": record}}))
    result = CliRunner().invoke(main, ["train-set", "--data", str(data), "--out", str(out), *SET, "--resume"])
    assert result.exit_code == 2 and "classifier: the train split: 1500 files then, 24 now" in result.output


def test_a_set_whose_networks_were_trained_on_different_data_is_refused_at_load(small_set, tmp_path):
    out = shutil.copytree(small_set[1], tmp_path / "mine")
    manifest = json.loads((out / "rotation.json").read_text())
    manifest["trained_on"]["splits"]["train"]["files"] = 4200
    (out / "rotation.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="trained on different data: classifier and rotation differ in the train "
                                           "split: 24 files then, 4200 now"):
        load_pipeline(out, objective="plain")


def test_too_few_photos_are_refused_before_training_with_the_stated_minimum(tmp_path, cache):
    data = photo_folder(tmp_path / "photos", train=4)
    result = CliRunner().invoke(main, ["train-set", "--data", str(data), "--out", str(tmp_path / "mine"), *SET])
    assert result.exit_code == 2 and f"12 training images are too few: a model set needs at least " \
                                     f"{MIN_TRAIN_IMAGES}" in result.output
    assert not (tmp_path / "mine").exists() or not list((tmp_path / "mine").glob("*.json"))


def test_a_recipe_is_fitted_to_a_small_training_split_and_left_alone_on_a_large_one():
    recipe = PROFILES["folder-cpu"]["contrastive"]
    fitted, notes = fit_to_data(recipe, 100)
    assert (fitted["batch"], fitted["config"]["bank_size"], len(notes)) == (100, 100, 2)
    assert recipe["config"]["bank_size"] == 4096                    # the table itself is not changed
    assert fit_to_data(recipe, 10_000) == (recipe, [])
    with pytest.raises(DataError, match=f"at least {MIN_TRAIN_IMAGES}"):
        fit_to_data(recipe, MIN_TRAIN_IMAGES - 1)


def test_a_repair_of_class_subfolders_reports_accuracy_from_them(small_set, tmp_path):
    data, out, _ = small_set
    options = ["--steps", "2", "--batch-size", "6", "--quiet", "--threads", "1"]
    result = CliRunner().invoke(main, ["repair", "--weights", str(out), "--input", str(data / "val"), "--output",
                                       str(tmp_path / "torch"), *options])
    assert result.exit_code == 0, result.output
    assert "accuracy on the 6 labelled image(s) (class folders):" in result.output
    assert "the model set is a preview (train-set --profile quick)" in result.output
    report = json.loads((tmp_path / "torch" / "report.json").read_text())
    assert report["summary"]["labels"] == "class folders" and report["config"]["preview"] is True
    assert sorted(r["true_label"] for r in report["images"]) == [0, 0, 1, 1, 2, 2]
    runtime = run_without_torch("repair", "--bundle", str(out / "onnx"), "--input", str(data / "val"), "--output",
                                str(tmp_path / "runtime"), *options)
    assert runtime.returncode == 0, runtime.stderr
    assert "accuracy on the 6 labelled image(s) (class folders):" in runtime.stdout
    # a folder with a subfolder that is no class of the set: no labels guessed
    mixed = shutil.copytree(data / "val", tmp_path / "mixed")
    shutil.copytree(mixed / "breed0", mixed / "holiday")
    result = CliRunner().invoke(main, ["repair", "--weights", str(out), "--input", str(mixed), "--output",
                                       str(tmp_path / "mixed-out"), *options])
    assert result.exit_code == 0 and "accuracy" not in result.output


def test_the_pgd_measurement_on_part_of_a_class_sorted_test_split_draws_from_every_class():
    # a folder's test split is sorted by class: its first half would be class 0 alone, on which this classifier
    # (class 0 whatever the input, so PGD cannot move it) is always right
    from torch import nn

    from engine.train.recipes import classifier_metrics

    class AlwaysZero(nn.Module):
        def forward(self, x):
            return torch.tensor([[1.0, 0.0]]).expand(len(x), 2) + 0 * x.mean()

    labels = torch.tensor([0] * 20 + [1] * 20)
    data = {"test_x": torch.zeros(40, 3, 32, 32, dtype=torch.uint8), "test_y": labels}
    metrics = classifier_metrics(AlwaysZero(), data, torch.device("cpu"), n_pgd=20)
    pick = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:20]
    assert metrics["n_pgd"] == 20 and metrics["pgd20_accuracy"] == (labels[pick] == 0).sum().item() / 20 < 1
    assert metrics["clean_accuracy"] == 0.5 and metrics["n_test"] == 40
