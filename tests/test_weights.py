"""Weights round trip through safetensors + manifest, with the sha256 check."""
import json

import pytest
import torch

from engine.models.networks import build_model
from engine.models.weights import WeightsError, load_model, save_model


def test_round_trip_keeps_every_tensor(tmp_path):
    net = build_model("RotationNet", {"widths": [8, 16, 16]})
    torch.nn.init.normal_(net.head.weight)
    save_model(net, "rotation", tmp_path, {"architecture": "RotationNet", "config": {"widths": [8, 16, 16]}})
    loaded, manifest = load_model("rotation", tmp_path)
    assert manifest["name"] == "rotation" and len(manifest["sha256"]) == 64
    for key, value in net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_corrupt_tensor_file_is_refused_with_its_name(tiny_weights, tmp_path):
    for f in tiny_weights.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    data = bytearray((tmp_path / "rotation.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "rotation.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="rotation.safetensors does not match its manifest"):
        load_model("rotation", tmp_path)


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(WeightsError, match="cli.py train classifier"):
        load_model("classifier", tmp_path)


def test_existing_weights_are_not_overwritten(tmp_path):
    net = build_model("RotationNet", {"widths": [8, 16, 16]})
    manifest = {"architecture": "RotationNet", "config": {"widths": [8, 16, 16]}}
    save_model(net, "rotation", tmp_path, manifest)
    before = (tmp_path / "rotation.json").read_text()
    with pytest.raises(WeightsError, match="--overwrite"):
        save_model(net, "rotation", tmp_path, manifest)
    assert (tmp_path / "rotation.json").read_text() == before
    save_model(net, "rotation", tmp_path, {**manifest, "seed": 1}, overwrite=True)
    assert json.loads((tmp_path / "rotation.json").read_text())["seed"] == 1


def test_written_files_get_the_usual_mode(tmp_path):
    import os

    from runtime.files import write_json

    write_json(tmp_path / "a.json", {"x": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask
