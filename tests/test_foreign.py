"""A classifier of the user's own in front of the repair: a PyTorch module through the API, an ONNX file through
`cli.py repair --classifier`, and the tasks that cannot serve a foreign classifier refused with the reason."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from cli import main
from engine import load_pipeline
from engine.foreign import ClassifierError
from tests.conftest import EXAMPLES


def small_classifier(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 15 * 15, 10)).eval()


def test_a_module_classifier_predicts_and_is_left_as_it_was(tiny_weights, images):
    mine = small_classifier()
    p = load_pipeline(tiny_weights, tasks=["rotation", "hedge"], classifier=mine, objective="plain")
    assert torch.equal(p.predict(images), mine(images).argmax(1))
    repaired = p.repair(images[:2], steps=2)
    assert (repaired - images[:2]).abs().max() <= 16 / 255 + 1e-6
    assert all(q.requires_grad for q in mine.parameters())          # not frozen behind the user's back
    assert p.manifests["classifier"]["source"] == "module Sequential"


@pytest.mark.parametrize("tasks, classifier, message", [
    (["rotation-head"], small_classifier(), "shipped classifier's own features"),
    (["rotation"], small_classifier().train(), "training mode"),
    (["rotation"], nn.Identity().eval(), "logits N×C"),
    (["rotation"], nn.Linear(5, 10).eval(), "failed on a 2×3×32×32 batch"),
])
def test_unusable_classifiers_are_refused_with_the_reason(tiny_weights, tasks, classifier, message):
    with pytest.raises(ClassifierError, match=message):
        load_pipeline(tiny_weights, tasks=tasks, classifier=classifier, objective="plain")


def export_onnx(model: nn.Module, path, batch_dim: bool = True):
    x = torch.rand(2, 3, 32, 32)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=1024)},) if batch_dim else None
    torch.onnx.export(model, (x if batch_dim else x[:1],), str(path), dynamo=True, input_names=["x"],
                      output_names=["logits"], dynamic_shapes=dynamic, external_data=False)
    return path


def test_cli_repair_reports_an_onnx_classifiers_predictions(tiny_weights, tmp_path):
    mine = small_classifier()
    model_file = export_onnx(mine, tmp_path / "mine.onnx")
    src = tmp_path / "in"
    src.mkdir()
    pngs = sorted(EXAMPLES.glob("*.png"))[:3]
    for png in pngs:
        shutil.copy(png, src / png.name)
    result = CliRunner().invoke(main, ["repair", "--input", str(src), "--output", str(tmp_path / "out"),
                                       "--weights", str(tiny_weights), "--classifier", str(model_file),
                                       "--steps", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["classifier"] == "mine.onnx"
    from engine.imageio import read_image

    for row in report["images"]:
        before = mine(read_image(src / row["file"])[0][None]).argmax(1).item()
        after = mine(read_image(tmp_path / "out" / row["output"])[0][None]).argmax(1).item()
        assert (row["pred_before"], row["pred_after"]) == (before, after)


def test_an_onnx_classifier_with_a_batch_of_one_still_predicts_batches(tiny_weights, tmp_path, images):
    mine = small_classifier()
    one = export_onnx(mine, tmp_path / "one.onnx", False)
    p = load_pipeline(tiny_weights, tasks=["rotation"], classifier=one, objective="plain")
    assert torch.equal(p.predict(images), mine(images).argmax(1))


@pytest.mark.parametrize("tasks, message", [("hedge", "ONNX classifier"), ("rotation-head", "own features")])
def test_cli_refuses_tasks_an_onnx_classifier_cannot_serve(tiny_weights, tmp_path, tasks, message):
    model_file = export_onnx(small_classifier(), tmp_path / "mine.onnx")
    result = CliRunner().invoke(main, ["repair", "--input", str(EXAMPLES), "--output", str(tmp_path / "out"),
                                       "--weights", str(tiny_weights), "--classifier", str(model_file),
                                       "--tasks", tasks, "--objective", "plain"])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, content, message", [("missing.onnx", None, "does not exist"),
                                                   ("model.pt", b"x", "ONNX file"),
                                                   ("junk.onnx", b"not onnx", "cannot load")])
def test_cli_refuses_a_bad_classifier_file(tiny_weights, tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    result = CliRunner().invoke(main, ["repair", "--input", str(EXAMPLES), "--output", str(tmp_path / "out"),
                                       "--weights", str(tiny_weights), "--classifier", str(path)])
    assert result.exit_code == 2 and message in result.output
