"""Heads on the classifier's backbone, the clean-level objective, the gate, and the repair names of `cli.py eval`."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import engine.eval.evaluate as ev
from cli import main
from engine.calibration import CALIBRATION_FILE, Calibration
from engine.models.heads import HEAD_TASKS
from engine.pipeline import Gate, load_pipeline
from engine.eval.repair_spec import parse_repair
from engine.models.weights import WeightsError, load_model

from .conftest import EXAMPLES, needs_cifar


@pytest.fixture(scope="module")
def head_pipeline(tiny_weights):
    return load_pipeline(tiny_weights, tasks=list(HEAD_TASKS), objective="plain")


def test_heads_share_the_classifier_backbone(tiny_weights, head_pipeline):
    backbone = head_pipeline.classifier.backbone.state_dict()
    for name in HEAD_TASKS:
        head = head_pipeline.objective.tasks[name].net.backbone.state_dict()
        assert all(torch.equal(backbone[k], head[k]) for k in backbone), name


def test_heads_refuse_another_classifier(tiny_weights, tmp_path):
    other = tmp_path / "w"
    shutil.copytree(tiny_weights, other)
    manifest = json.loads((other / "rotation-head.json").read_text())
    manifest["backbone"]["sha256"] = "0" * 64
    (other / "rotation-head.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="trained on the backbone of classifier"):
        load_pipeline(other, tasks=["rotation-head"], objective="plain")


def test_head_losses_are_per_image_and_fall_under_the_repair(head_pipeline, images):
    x = images[:4]
    alone = head_pipeline.ssl_loss(x[:1])
    together = head_pipeline.ssl_loss(x)
    assert together.shape == (4,) and torch.allclose(alone, together[:1], rtol=1e-4, atol=1e-5)
    result = head_pipeline.repair_with_trace(x, steps=5, seed=0)
    assert (result.trace[-1] < result.trace[0]).float().mean() >= 0.75


def test_clean_objective_hinges_at_the_clean_level_with_alpha_from_the_iqr(tiny_weights, images):
    cal = json.loads((tiny_weights / CALIBRATION_FILE).read_text())
    p = load_pipeline(tiny_weights, tasks=["rotation", "inpainting"], objective="clean", level=0.5)
    for task in ("rotation", "inpainting"):
        losses = torch.tensor(cal["losses"][task], dtype=torch.float64)
        q25, median, q75 = torch.quantile(losses, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
        assert p.objective.levels[task] == pytest.approx(median)
        assert p.objective.alpha[task] == pytest.approx(1 / (q75 - q25))
    per_task = p.task_losses(images)
    expected = sum(p.objective.alpha[t] * (per_task[t] - p.objective.levels[t]).clamp(min=0) for t in per_task)
    assert torch.allclose(p.ssl_loss(images), expected)
    # an image already below every level has nothing to gain: zero objective, zero gradient, no step taken
    p.objective.levels = {t: 1e9 for t in per_task}
    noise_only = p.repair_with_trace(images[:2], steps=0, seed=0)
    stays = p.repair_with_trace(images[:2], steps=3, seed=0, early_exit=False)
    assert torch.equal(stays.images, noise_only.images) and (stays.trace == 0).all()
    # with the early exit it leaves after its first step, where it stood: NaN in the trace for the steps not run
    leaves = p.repair_with_trace(images[:2], steps=3, seed=0)
    assert torch.equal(leaves.images, noise_only.images)
    assert (leaves.trace[0] == 0).all() and leaves.trace[1:].isnan().all()


def test_gate_threshold_flags_the_stated_fraction_of_calibration_images():
    losses = {"a": torch.arange(1000, dtype=torch.float64), "b": torch.arange(1000, dtype=torch.float64).flip(0) ** 2}
    cal = Calibration(losses, 4, {})
    for fpr in (0.05, 0.2):
        gate = Gate(cal, ["a", "b"], fpr)
        flagged = (gate.score(losses) > gate.threshold).double().mean().item()
        assert flagged == pytest.approx(fpr, abs=0.002)
    with pytest.raises(ValueError, match="between 0 and 1"):
        Gate(cal, ["a"], 1.5)


def test_gated_repair_repairs_only_flagged_images_and_returns_the_rest_unchanged(tiny_weights, images):
    gated = load_pipeline(tiny_weights, gate_fpr=0.5, objective="plain")
    plain = load_pipeline(tiny_weights, objective="plain")
    x = torch.cat([images, (images + 0.3 * torch.randn_like(images)).clamp(0, 1)])   # clean and noisy inputs
    result = gated.repair_with_trace(x, steps=2, seed=1)
    full = plain.repair_with_trace(x, steps=2, seed=1)
    flagged = result.repaired
    assert flagged.any() and (~flagged).any()
    assert torch.equal(result.images[~flagged], x[~flagged])
    assert torch.allclose(result.images[flagged], full.images[flagged], atol=1e-6)
    assert torch.isnan(result.trace[:, ~flagged]).all()
    assert torch.equal(flagged, result.score > gated.gate.threshold)


def test_calibration_must_match_the_weights_and_views(tiny_weights, tmp_path):
    with pytest.raises(WeightsError, match="4 contrastive views, not 2") as error:
        load_pipeline(tiny_weights, views=2, gate_fpr=0.1, objective="plain")
    # the fix writes a file of its own instead of the shipped calibration
    assert f"--views 2 --out {tiny_weights / 'calibration_views2.json'}` and pass --calibration" in str(error.value)
    other = tmp_path / "w"
    shutil.copytree(tiny_weights, other)
    (other / CALIBRATION_FILE).unlink()
    with pytest.raises(WeightsError, match="cli.py calibrate"):
        load_pipeline(other, objective="clean")
    data = json.loads((tiny_weights / CALIBRATION_FILE).read_text())
    data["sources"]["rotation"] = "f" * 64
    (other / CALIBRATION_FILE).write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="other weights of rotation"):
        load_pipeline(other, objective="clean")


@pytest.mark.parametrize("name, tasks, optimize, objective, gated", [
    ("none", (), False, "plain", False),
    ("noise:gate", (), False, "plain", True),
    ("mtl", ("contrastive", "inpainting", "rotation"), True, "plain", False),
    ("mtl-head:clean:gate", HEAD_TASKS, True, "clean", True),
    ("contrastive-head+rotation", ("contrastive-head", "rotation"), True, "plain", False),
    ("mtl:clean:exit", ("contrastive", "inpainting", "rotation"), True, "clean", False),
])
def test_repair_names(name, tasks, optimize, objective, gated):
    spec = parse_repair(name)
    assert (spec.tasks, spec.optimize, spec.objective, spec.gated) == (tasks, optimize, objective, gated)
    assert spec.early_exit == name.endswith(":exit")


@pytest.mark.parametrize("name, message", [("mtl:fast", "unknown or repeated modifier"),
                                           ("mtl:gate:gate", "unknown or repeated modifier"),
                                           ("none:gate", "none has no objective"), ("noise:clean", "no objective"),
                                           ("rotation+jigsaw", "jigsaw"), ("rotation+rotation", "repeated task"),
                                           ("mtl:exit", ":exit needs :clean"), ("noise:exit", "no objective")])
def test_bad_repair_names_are_refused(name, message):
    with pytest.raises(ValueError, match=message):
        parse_repair(name)


def test_eval_with_heads_clean_objective_and_gate(tiny_weights, fake_test_set, tmp_path):
    repairs = "none,noise,noise:gate,mtl-head,mtl-head:clean:gate"
    args = ["eval", "--n", "6", "--chunk", "3", "--attacks", "none,pgd,aware", "--repairs", repairs,
            "--defense", "mtl-head:clean:gate", "--gate-tasks", "contrastive-head,rotation-head",
            "--gate-fpr", "0.2", "--attack-steps", "2", "--repair-steps", "2", "--weights", str(tiny_weights),
            "--json", str(tmp_path / "e.json"), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "e.json").read_text())
    rows = {(r["attack"], r["repair"]): r for r in saved["rows"]}
    assert rows["pgd", "noise:gate"]["repaired_fraction"] == rows["pgd", "mtl-head:clean:gate"]["repaired_fraction"]
    assert rows["pgd", "mtl-head"]["repaired_fraction"] == 1.0 and rows["pgd", "none"]["repaired_fraction"] == 0.0
    assert set(rows["none", "none"]["ssl_loss_mean"]) == {"contrastive-head", "inpainting-head", "rotation-head"}
    pairs = {(t["a"], t["b"]) for t in saved["mcnemar"]}
    assert ("pgd/noise:gate", "pgd/mtl-head:clean:gate") in pairs and ("pgd/noise", "pgd/mtl-head") in pairs


def test_eval_aware_attack_keeps_the_gate_score_low(tiny_weights):
    p = load_pipeline(tiny_weights, tasks=["rotation"], calibration=tiny_weights / CALIBRATION_FILE, objective="plain")
    config = ev.EvalConfig(repairs=["rotation:gate"], defense="rotation:gate", gate_tasks=["rotation"])
    evaluator = ev.Evaluator(p, config)
    x = torch.rand(3, 3, 32, 32)
    score = evaluator.gate.score(p.task_losses(x))
    aware = evaluator.aware_objective()
    # the attacked objective differs from the score by a constant: same gradient, same attack
    offset = aware(x, aware.sample_params(x, 0)) - score
    assert torch.allclose(offset, offset[:1].expand(3), atol=1e-5)


def test_cli_rejects_bad_repair_names_and_missing_calibration(tiny_weights, tmp_path):
    bad = CliRunner().invoke(main, ["eval", "--repairs", "mtl:fast", "--weights", str(tiny_weights)])
    assert bad.exit_code == 2 and "unknown or repeated modifier" in bad.output
    other = tmp_path / "w"
    shutil.copytree(tiny_weights, other)
    (other / CALIBRATION_FILE).unlink()
    result = CliRunner().invoke(main, ["repair", "--input", str(EXAMPLES), "--output", str(tmp_path / "o"),
                                       "--weights", str(other), "--gate", "0.05", "--quiet"])
    assert result.exit_code == 2 and "cli.py calibrate" in result.output


def test_repair_cli_with_gate_reports_scores(tiny_weights, tmp_path):
    result = CliRunner().invoke(main, ["repair", "--input", str(EXAMPLES), "--output", str(tmp_path / "o"),
                                       "--weights", str(tiny_weights), "--tasks", "rotation-head,contrastive-head",
                                       "--objective", "clean", "--gate", "0.5", "--steps", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    rows = [r for r in report["images"] if r["status"] == "repaired"]
    assert report["config"]["gate"]["fpr"] == 0.5 and report["config"]["objective"] == "clean"
    assert report["summary"]["n_gated_out"] == sum(r["gated_out"] for r in rows)
    for r in rows:
        assert r["gated_out"] == (r["gate_score"] <= report["config"]["gate"]["threshold"])
    # the calibration images are these very examples: about half score above the median-level threshold
    assert 20 <= report["summary"]["n_gated_out"] <= 44
    assert "passed unchanged" in result.output


def test_shipped_heads_load_with_the_shipped_classifier():
    from .conftest import SHIPPED

    if not (SHIPPED / "rotation-head.json").exists():
        pytest.skip("no shipped heads in weights/ (train them with cli.py train <task>-head)")
    classifier, _ = load_model("classifier", SHIPPED)
    p = load_pipeline(SHIPPED, tasks=[t for t in HEAD_TASKS if (SHIPPED / f"{t}.json").exists()], objective="plain")
    for task in p.objective.tasks.values():
        assert torch.equal(task.net.backbone.group3[0].weight, classifier.backbone.group3[0].weight)


@needs_cifar
def test_calibrate_cli_measures_clean_training_images_and_keeps_an_existing_file(tiny_weights, tmp_path):
    out = tmp_path / "cal.json"
    args = ["calibrate", "--weights", str(tiny_weights), "--tasks", "rotation,inpainting-head", "--n", "20",
            "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert {t: len(v) for t, v in data["losses"].items()} == {"rotation": 20, "inpainting-head": 20}
    assert data["views"] is None and "rotation: clean median" in result.output      # no contrastive task here
    load_pipeline(tiny_weights, tasks=["rotation", "inpainting-head"], gate_fpr=0.1, calibration=out, objective="plain")
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    held = [t for t in ("contrastive", "inpainting", "rotation", *HEAD_TASKS) if (tiny_weights / f"{t}.json").exists()]
    every = tmp_path / "every.json"             # no --tasks: every calibrated network the folder holds
    result = CliRunner().invoke(main, ["calibrate", "--weights", str(tiny_weights), "--n", "10", "--out", str(every)])
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(every.read_text())["losses"]) == sorted(held) and len(held) >= 3
