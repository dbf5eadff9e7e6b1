"""A folder of the user's own images as training and evaluation data (engine/data/model_sets.py): every image mode that
photos come in is converted, what cannot be decoded is skipped and named, classes come from the first-level folders
(nested folders inside a class, non-ASCII names, empty class folders), splits from train/ and val/ or a fixed
held-out tenth, and the decoded images are cached under a key that changes with the files and the size."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import model_sets as datasets
from engine.data.cifar10 import DataError
from runtime.imageio import read_image
from tests.conftest import IMAGENETTE_SAMPLE


def photo(size=(48, 40), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_modes(folder):
    """One file per mode a photo folder holds; returns {file name: the note its reading must carry}."""
    folder.mkdir(parents=True, exist_ok=True)
    base = photo()
    base.convert("L").save(folder / "grey.png")
    base.convert("P").save(folder / "palette.png")
    base.convert("RGBA").save(folder / "alpha.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257)).save(folder / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6                                      # "rotate 90° clockwise to view"
    base.save(folder / "sideways.jpg", exif=exif)
    return {"grey.png": "greyscale converted", "palette.png": "palette image converted",
            "alpha.png": "alpha channel dropped", "cmyk.jpg": "CMYK converted", "sixteen.png": "16-bit greyscale",
            "sideways.jpg": "EXIF orientation"}


def test_every_mode_is_converted_with_a_note(tmp_path):
    expected = write_modes(tmp_path)
    for name, note in expected.items():
        image, notes = read_image(tmp_path / name, resize=True, size=32)
        assert image.shape == (3, 32, 32) and image.dtype == np.float32, name
        assert any(note in n for n in notes), (name, notes)


def test_exif_rotation_is_applied_before_the_crop(tmp_path):
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :32] = 255                                   # left half white: after turning, the top half is white
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(wide).save(tmp_path / "turned.png", exif=exif)
    image, _ = read_image(tmp_path / "turned.png", resize=True, size=32)
    assert image.shape == (3, 32, 32)
    assert image[:, :8].mean() > 0.9 and image[:, -8:].mean() < 0.1


@pytest.fixture
def photo_folder(tmp_path):
    """train/ and val/ with two classes, a nested folder, a non-ASCII name, an empty class folder, a truncated JPEG,
    a text file and a file named as an image that is not one."""
    root = tmp_path / "photos"
    for split, count in (("train", 6), ("val", 3)):
        for c, cls in enumerate(("cats", "dögs")):
            folder = root / split / cls / ("nested" if c else "")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                photo((40 + 8 * i, 56), seed=10 * c + i).save(folder / f"ïmage {i}.jpg")
        (root / split / "empty").mkdir()
    buffer = io.BytesIO()
    photo().save(buffer, "JPEG")
    (root / "train" / "cats" / "truncated.jpg").write_bytes(buffer.getvalue()[:200])
    (root / "train" / "cats" / "notes.txt").write_text("not an image")
    (root / "train" / "cats" / "fake.png").write_text("not a png either")
    return root


def test_a_folder_with_splits_and_classes(photo_folder, tmp_path):
    train = datasets.load_split(photo_folder, "train", 32, cache_dir=tmp_path / "cache")
    test = datasets.load_split(photo_folder, "test", 32, cache_dir=tmp_path / "cache")
    assert train.classes == test.classes == ["cats", "dögs"]            # the empty folder is no class
    assert train.images.shape == (12, 3, 32, 32) and train.images.dtype == torch.uint8
    assert sorted(train.labels.tolist()) == [0] * 6 + [1] * 6 and len(test.images) == 6
    assert "dögs/nested/ïmage 0.jpg" in train.files
    skipped = dict(train.skipped)
    assert set(skipped) == {"cats/truncated.jpg", "cats/fake.png"}        # the .txt is not an image: not listed
    assert all("cannot read image" in why for why in skipped.values())
    assert "2 file(s) skipped" in datasets.summary(train, "train") and "cats/fake.png" in datasets.summary(train, "x")


def test_decoded_once_then_read_from_the_cache(photo_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = datasets.load_split(photo_folder, "train", 32, cache_dir=cache)
    monkeypatch.setattr(datasets, "decode", lambda *a, **k: pytest.fail("decoded again"))
    again = datasets.load_split(photo_folder, "train", 32, cache_dir=cache)
    assert torch.equal(first.images, again.images) and again.skipped == first.skipped
    monkeypatch.undo()
    bigger = datasets.load_split(photo_folder, "train", 48, cache_dir=cache)          # the size is in the key
    assert bigger.images.shape[-1] == 48
    changed = photo_folder / "train" / "cats" / "ïmage 0.jpg"
    photo(seed=99).save(changed)
    os.utime(changed, ns=(1, 1))                                        # another mtime: another key
    assert not torch.equal(datasets.load_split(photo_folder, "train", 32, cache_dir=cache).images, first.images)
    assert len(list((cache / "folders").glob("*.npz"))) == 3


def test_a_folder_without_splits_holds_out_a_fixed_tenth(tmp_path):
    for i in range(40):
        (tmp_path / "all" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        photo(seed=i).save(tmp_path / "all" / f"c{i % 2}" / f"{i}.png")
    train = datasets.load_split(tmp_path / "all", "train", 32, cache_dir=tmp_path / "cache")
    test = datasets.load_split(tmp_path / "all", "test", 32, cache_dir=tmp_path / "cache")
    assert len(train.images) + len(test.images) == 40 and 0 < len(test.images) < 12
    assert not set(train.files) & set(test.files)


def test_unlabelled_images_and_bad_data_arguments(tmp_path):
    for i in range(3):
        photo(seed=i).save(tmp_path / f"{i}.png")
    images = datasets.load_split(tmp_path, "train", 32, cache_dir=tmp_path / "cache")
    assert images.classes == [] and (images.labels == -1).all()
    with pytest.raises(DataError, match="multiple of 16"):
        datasets.load_split(tmp_path, "train", 40)
    with pytest.raises(DataError, match="no such folder"):
        datasets.load_split(tmp_path / "missing", "train", 32)
    with pytest.raises(DataError, match="CIFAR-10 images are 32×32"):
        datasets.load_split("cifar10", "train", 64)
    with pytest.raises(DataError, match="pass --data DIR"):
        datasets.model_set_split(None, "test", {"size": 64, "dataset": "imagenette", "classes": []})


def test_scoring_maps_folder_classes_to_the_model_sets_by_name(photo_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("MSSL_REPAIR_CACHE", str(tmp_path / "cache"))
    inputs = {"size": 32, "dataset": "photos", "classes": ["dögs", "birds", "cats"]}
    x, y = datasets.model_set_split(photo_folder, "test", inputs, labelled=True)
    assert sorted(y.tolist()) == [0, 0, 0, 2, 2, 2]
    with pytest.raises(DataError, match="not among the classifier's"):
        datasets.model_set_split(photo_folder, "test", {**inputs, "classes": ["cats", "birds"]}, labelled=True)
    for labelled in (True, False):               # calibration reads no labels, but another domain's folder is refused
        with pytest.raises(DataError, match=r"class folders of .*photos \(cats, dögs\) is among the model set's "
                                            r"2 classes \(tench, church\)"):
            datasets.model_set_split(photo_folder, "train", {**inputs, "classes": ["tench", "church"]}, labelled)
    x, y = datasets.model_set_split(photo_folder, "train", inputs)        # an unlabelled read keeps its -1s
    assert len(x) == 12 and (y >= 0).all()


@pytest.mark.skipif(not IMAGENETTE_SAMPLE.exists(), reason="the shared Imagenette sample is not beside the repository")
def test_the_imagenette_sample(tmp_path):
    train = datasets.load_split(IMAGENETTE_SAMPLE, "train", 64, cache_dir=tmp_path)
    assert train.images.shape == (200, 3, 64, 64) and len(train.classes) == 10
    assert train.class_names[0] == "tench" and not train.skipped
    mean, std = datasets.channel_stats(train.images)
    assert all(0.3 < m < 0.6 for m in mean) and all(0.15 < s < 0.35 for s in std)
