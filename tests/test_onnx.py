"""ONNX export and the onnxruntime backend against the PyTorch reference (tiny models; golden files for the
shipped weights)."""
import json
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

from cli import main
from engine.backends.onnxruntime_backend import OnnxRuntimeBackend, choose_providers
from engine.pipeline import load_pipeline
from export.onnx_export import ExportError, export_all
from export.parity import TOLERANCES, Tolerance, agreement, compare
from tests.conftest import SHIPPED, needs_shipped

GRAPHS = {"classifier", "contrastive_loss", "inpainting_loss", "rotation_loss", "multitask_loss"}
REPAIR_GRAPHS = {"repair_step", "repair"}          # tests/test_repair_graphs.py tests them
GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def exported(tiny_bundle):
    return tiny_bundle, json.loads((tiny_bundle / "manifest.json").read_text())


def test_export_writes_checked_graphs_and_a_manifest(exported):
    out, manifest = exported
    assert set(manifest["graphs"]) == GRAPHS | REPAIR_GRAPHS and manifest["opset"] == 18
    for name in GRAPHS:
        entry = manifest["graphs"][name]
        model = onnx.load(str(out / entry["file"]))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == 18
        assert entry["inputs"][0] == {"name": "x", "shape": ["batch", 3, 32, 32], "dtype": "float32"}
        assert entry["outputs"][0]["shape"][0] == "batch" and len(entry["sha256"]) == 64
    assert [i["name"] for i in manifest["graphs"]["contrastive_loss"]["inputs"]] == \
        ["x", "crop_y", "crop_x", "brightness", "contrast", "color"]
    assert manifest["graphs"]["multitask_loss"]["inputs"][-1]["name"] == "alpha"
    assert manifest["graphs"]["contrastive_loss"]["sources"]["contrastive_views"] == 4


def test_exporting_again_keeps_and_reproduces_the_same_graphs(tiny_weights, tiny_pipeline, exported, bundle_copy,
                                                             tmp_path):
    _, manifest = exported
    _, notes = export_all(tiny_pipeline, bundle_copy)
    assert all("up to date" in n for n in notes) and len(notes) == len(GRAPHS | REPAIR_GRAPHS)
    # a fresh export is byte-identical (one task's pipeline: its classifier and loss graph are the same graphs)
    one_task = load_pipeline(tiny_weights, tasks=["rotation"], objective="plain")
    again, _ = export_all(one_task, tmp_path / "again", repair_graphs=False)
    for name in ("classifier", "rotation_loss"):
        assert again["graphs"][name]["sha256"] == manifest["graphs"][name]["sha256"]


def test_a_corrupt_graph_is_re_exported_with_a_note(tiny_pipeline, exported, bundle_copy):
    out = bundle_copy
    (out / "rotation_loss.onnx").write_bytes(b"garbage")
    manifest, notes = export_all(tiny_pipeline, out)
    assert any("rotation_loss.onnx: did not match its manifest" in n for n in notes)
    assert manifest["graphs"]["rotation_loss"]["sha256"] == exported[1]["graphs"]["rotation_loss"]["sha256"]


def test_foreign_files_are_not_overwritten(tiny_pipeline, tmp_path):
    (tmp_path / "classifier.onnx").write_bytes(b"someone else's")
    with pytest.raises(ExportError, match="classifier.onnx.*--overwrite"):
        export_all(tiny_pipeline, tmp_path)
    assert (tmp_path / "classifier.onnx").read_bytes() == b"someone else's"
    result = CliRunner().invoke(main, ["export", "--weights", str(SHIPPED.parent / "nowhere"), "--out",
                                       str(tmp_path)])
    assert result.exit_code == 2 and "cli.py train classifier" in result.output


def test_onnxruntime_matches_torch_at_another_batch_size(tiny_pipeline, exported, images):
    backend = OnnxRuntimeBackend(exported[0], tiny_pipeline.tasks)
    x = images[:5]                                   # exported at batch 2: the batch axis is free
    params = tiny_pipeline.objective.sample_params(x, 1)
    tol = TOLERANCES["fp32"]
    reference = tiny_pipeline.classifier(x)
    assert compare("logits", reference, backend.logits(x), tol["logits"]).passed
    assert agreement(reference, backend.logits(x)) == 1.0
    ours = backend.task_losses(x, params)
    for task, loss in tiny_pipeline.objective.per_task(x, params).items():
        result = compare(f"{task}_loss", loss, ours[task], tol["loss"])
        assert result.passed, result.report()


def test_multitask_graph_weights_the_task_losses(tiny_pipeline, exported, images):
    import onnxruntime as ort

    x = images[:3]
    params = tiny_pipeline.objective.sample_params(x, 0)
    session = ort.InferenceSession(str(exported[0] / "multitask_loss.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"x": x.numpy(), **{f"{t}_{k}": v.numpy() for t, p in params.items() for k, v in p.items()},
             "alpha": torch.tensor([0.5, 2.0, 1.0]).numpy()}
    got = torch.from_numpy(session.run(None, feeds)[0])
    losses = tiny_pipeline.objective.per_task(x, params)
    expected = 0.5 * losses["contrastive"] + 2.0 * losses["inpainting"] + losses["rotation"]
    assert compare("multitask_loss", expected, got, TOLERANCES["fp32"]["loss"]).passed


def test_the_rule_fails_only_where_both_tolerances_are_exceeded():
    tol = Tolerance(atol=0.1, rtol=0.01)
    reference = torch.tensor([100.0, 0.001, 1.0])
    assert compare("o", reference, torch.tensor([100.5, 0.05, 1.0]), tol).passed   # rel ok / abs ok
    bad = compare("o", reference, torch.tensor([100.0, 0.001, 1.5]), tol)
    assert not bad.passed and bad.n_failed == 1 and bad.worst[0]["index"] == (2,)
    assert bad.needed_atol == pytest.approx(0.5) and bad.needed_rtol == pytest.approx(0.5)
    assert "would pass with atol=0.5" in bad.report() and "at (2,)" in bad.report()


def test_cpu_machines_ask_for_the_cpu_provider_only():
    assert choose_providers(torch.device("cpu")) == ["CPUExecutionProvider"]


def test_repair_with_the_onnxruntime_backend_predicts_like_torch(tiny_weights, bundle_copy, tmp_path):
    from tests.conftest import EXAMPLES

    reports = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        args = ["repair", "--input", str(EXAMPLES), "--output", str(out), "--weights", str(tiny_weights),
                "--steps", "2", "--quiet", "--backend", backend, "--onnx-dir", str(bundle_copy)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        reports[backend] = json.loads((out / "report.json").read_text())
    assert reports["onnxruntime"]["config"]["backend"] == "onnxruntime"
    for a, b in zip(reports["torch"]["images"], reports["onnxruntime"]["images"]):
        if a["status"] == "repaired":
            assert (a["pred_before"], a["pred_after"]) == (b["pred_before"], b["pred_after"])
            # per task: the objective's α of 1/IQR (--objective clean, the default) would magnify float noise
            for task, loss in a["task_losses_after"].items():
                assert loss == pytest.approx(b["task_losses_after"][task], rel=1e-3, abs=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (IO binding on CUDA tensors)")
def test_onnxruntime_io_binding_on_cuda(tiny_weights, tmp_path, images):
    pipeline = load_pipeline(tiny_weights, device="cuda", tasks=["inpainting", "rotation"], objective="plain")
    export_all(pipeline, tmp_path)
    backend = OnnxRuntimeBackend(tmp_path, pipeline.tasks, "cuda")
    x = images.cuda()
    assert compare("logits", pipeline.classifier(x), backend.logits(x), TOLERANCES["fp32"]["logits"]).passed
    # the Loop graph with its outputs bound to CUDA tensors, against the PyTorch reference on the same GPU
    got = backend.reverse_attack(pipeline.objective, x, 16 / 255, 3, 2 / 255, seed=1)
    ref = pipeline.repair_with_trace(x, steps=3, seed=1, early_exit=False)
    assert got.images.is_cuda and (got.images != ref.images).float().mean() <= 1e-3


# --- golden outputs of the shipped weights -----------------------------------------------------------------------

needs_golden = pytest.mark.skipif(not (GOLDEN / "golden.safetensors").exists(),
                                  reason="no tests/golden (python -m export.golden writes it)")


@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    meta = json.loads((GOLDEN / "golden.json").read_text())
    shipped = {name: json.loads((SHIPPED / f"{name}.json").read_text())["sha256"] for name in meta["weights"]}
    assert shipped == meta["weights"], "shipped weights changed: regenerate with python -m export.golden --overwrite"
    return load_file(str(GOLDEN / "golden.safetensors"))


def golden_params(golden):
    from export.golden import split_params

    params = split_params(golden)
    params.setdefault("rotation", {})
    return params


@needs_shipped
@needs_golden
@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_engines_match_the_golden_outputs(golden, engine, tmp_path_factory):
    pipeline = load_pipeline(objective="plain")
    if engine == "onnxruntime":
        out = tmp_path_factory.mktemp("shipped_onnx")
        export_all(pipeline, out, repair_graphs=False)
        backend = OnnxRuntimeBackend(out, pipeline.tasks)
    else:
        backend = pipeline.backend
    x, params, tol = golden["x"], golden_params(golden), TOLERANCES["fp32"]
    results = [compare("logits", golden["out.logits"], backend.logits(x), tol["logits"])]
    losses = backend.task_losses(x, params)
    results += [compare(f"{t}_loss", golden[f"out.{t}_loss"], losses[t], tol["loss"]) for t in losses]
    failed = [r.report() for r in results if not r.passed]
    assert not failed, "\n".join(failed)
    assert agreement(golden["out.logits"], backend.logits(x)) == 1.0


def test_head_tasks_export_and_match_torch_in_onnxruntime(tiny_weights, images, tmp_path):
    pipeline = load_pipeline(tiny_weights, tasks=["contrastive-head", "inpainting-head", "rotation-head"], objective="plain")
    manifest, _ = export_all(pipeline, tmp_path, repair_graphs=False)
    assert {"contrastive-head_loss", "inpainting-head_loss", "rotation-head_loss"} <= set(manifest["graphs"])
    assert manifest["graphs"]["contrastive-head_loss"]["sources"]["contrastive-head_views"] == 4
    backend = OnnxRuntimeBackend(tmp_path, pipeline.tasks)
    x = images[:3]
    params = pipeline.objective.sample_params(x, 2)
    ours = backend.task_losses(x, params)
    for task, loss in pipeline.objective.per_task(x, params).items():
        result = compare(f"{task}_loss", loss, ours[task], TOLERANCES["fp32"]["loss"])
        assert result.passed, result.report()
