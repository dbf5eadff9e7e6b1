"""`cli.py bench` on tiny models: every backend listed (an absent one with its reason), parity next to speed."""
import json

import pytest
import torch

from click.testing import CliRunner

from cli import main


def test_bench_lists_every_backend_with_parity(tiny_weights, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--n", "4", "--steps", "1", "--backends", "torch,onnxruntime,tensorrt",
                                       "--weights", str(tiny_weights), "--onnx-dir", str(tmp_path / "onnx"),
                                       "--json", str(out), "--plot", str(tmp_path / "bench.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    names = [b["name"] for b in report["backends"]]
    assert names == ["torch", "onnxruntime", "tensorrt"]
    by_name = {b["name"]: b for b in report["backends"]}
    assert by_name["torch"]["available"] and by_name["torch"]["images_per_s"] > 0
    assert set(by_name["onnxruntime"]["graphs"]) == {"classifier", "contrastive_loss", "inpainting_loss",
                                                     "rotation_loss"}
    if not by_name["tensorrt"]["available"]:
        assert by_name["tensorrt"]["reason"] and by_name["tensorrt"]["images_per_s"] is None
    ort_parity = [p for p in report["parity"] if p["backend"] == "onnxruntime"]
    assert {p["output"] for p in ort_parity} >= {"logits", "rotation_loss", "repaired prediction"}
    assert all(p["passed"] is not False for p in ort_parity)
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_attack_signal_auc_is_the_mann_whitney_statistic():
    from scipy import stats

    from bench.attack_signal import auc

    g = torch.Generator().manual_seed(0)
    negatives, positives = torch.randn(50, generator=g), torch.randn(40, generator=g).add(0.5).round()
    u = stats.mannwhitneyu(positives.numpy(), negatives.numpy()).statistic
    assert auc(negatives, positives) == pytest.approx(u / (50 * 40))
    assert auc(negatives, negatives) == pytest.approx(0.5)
