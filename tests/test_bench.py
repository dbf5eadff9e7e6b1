"""`cli.py bench` on tiny models: every backend listed (an absent one with its reason), parity next to speed."""
import json
import shutil

import numpy as np
import pytest
import torch

from click.testing import CliRunner

from cli import main
from tests.conftest import CLEAN_OPTIONS


def test_bench_lists_every_backend_with_parity(tiny_weights, tiny_clean_bundle, tmp_path):
    out, onnx_dir = tmp_path / "bench.json", shutil.copytree(tiny_clean_bundle, tmp_path / "onnx")
    # the session's bundle for the same tasks, objective and α (tests/conftest.py): every graph is up to date
    result = CliRunner().invoke(main, ["bench", "--n", "4", "--steps", "2", "--backends",
                                       "torch,onnxruntime,onnxruntime+exit,tensorrt", "--latency-images", "2",
                                       "--graph-batches", "4,8", *CLEAN_OPTIONS, "--weights", str(tiny_weights),
                                       "--onnx-dir", str(onnx_dir), "--json", str(out), "--plot",
                                       str(tmp_path / "bench.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    names = [b["name"] for b in report["backends"]]
    # torch+exit joins as the parity reference of onnxruntime+exit
    assert names == ["torch", "torch+exit", "onnxruntime", "onnxruntime+exit", "tensorrt"]
    assert report["objective"] == "clean" and report["alpha"] == {"inpainting": 1.0, "rotation": 1e-4}
    by_name = {b["name"]: b for b in report["backends"]}
    assert by_name["torch"]["available"] and by_name["torch"]["images_per_s"] > 0
    assert set(by_name["onnxruntime"]["graphs"]) == {"classifier", "inpainting_loss", "rotation_loss"}
    assert set(by_name["onnxruntime"]["graphs"]["classifier"]) == {"4", "8"}
    assert by_name["onnxruntime+exit"]["whole_repair_graph"]          # the bundle's Loop graph, not a fallback
    if not by_name["tensorrt"]["available"]:
        assert by_name["tensorrt"]["reason"] and by_name["tensorrt"]["images_per_s"] is None
    for name in ("onnxruntime", "onnxruntime+exit"):
        ort_parity = [p for p in report["parity"] if p["backend"] == name]
        assert {p["output"] for p in ort_parity} >= {"logits", "rotation_loss", "repaired prediction"}
        assert all(p["passed"] is not False for p in ort_parity)
    assert by_name["torch"]["steps_run"] == 1 and 0 < by_name["torch+exit"]["steps_run"] <= 1
    assert by_name["onnxruntime+exit"]["early_exit"] and not by_name["onnxruntime"]["early_exit"]
    assert (tmp_path / "bench.png").stat().st_size > 1000
    # how close to the limit: one step's FLOPs are its tasks' (each counted alone), and each engine's GFLOP/s is its
    # images/s times the FLOPs of the steps it ran
    limit = report["limit"]
    assert limit["step_mflops"] == pytest.approx(sum(limit["per_task_step_mflops"].values()), rel=1e-3)
    assert limit["peak_gflops"] > 0 and limit["row_forwards_mflops"] > 0
    for name, steps_run in (("torch", 1.0), ("onnxruntime+exit", by_name["torch+exit"]["steps_run"])):
        entry = by_name[name]
        per_image = 2 * steps_run * limit["step_mflops"] + limit["row_forwards_mflops"]
        assert entry["mflops_per_image"] == pytest.approx(per_image, rel=1e-2)
        assert entry["gflops"] == pytest.approx(entry["images_per_s"] * entry["mflops_per_image"] / 1e3, rel=1e-2)
        assert entry["fraction_of_peak"] == pytest.approx(entry["gflops"] / limit["peak_gflops"], rel=1e-2)
    lines = result.output.splitlines()    # a summary line per backend, the limit and where the JSON went, no dump
    assert lines[-7].startswith("torch: ") and "(1.0× torch)" in lines[-7] and lines[-1] == f"wrote {out}"
    assert lines[-2].startswith("one step of one image: ") and "GFLOP/s" in lines[-2]
    assert '"backends"' not in result.output


def test_attack_signal_auc_is_the_mann_whitney_statistic():
    from scipy import stats

    from bench.attack_signal import auc

    g = torch.Generator().manual_seed(0)
    negatives, positives = torch.randn(50, generator=g), torch.randn(40, generator=g).add(0.5).round()
    u = stats.mannwhitneyu(positives.numpy(), negatives.numpy()).statistic
    assert auc(negatives, positives) == pytest.approx(u / (50 * 40))
    assert auc(negatives, negatives) == pytest.approx(0.5)


def test_sweep_runs_each_point_once_against_its_own_noise_control(tiny_weights, fake_test_set, tmp_path, monkeypatch):
    from bench import sweep as sw

    rows = sw.sweep(4, "mtl:clean", [8 / 255, 16 / 255], [1], [2], tmp_path, str(tiny_weights), 32)
    assert [(r["eps_r_255"], r["steps"], r["views"]) for r in rows] == [(8, 1, 2), (16, 1, 2)]
    # the shipped (tiny) calibration has 4 views: a 2-view one was measured beside the results
    assert json.loads((tmp_path / "calibration_views2.json").read_text())["views"] == 2
    for row in rows:
        saved = json.loads(sw.point_path(tmp_path, row["eps_r_255"] / 255, 1, 2).read_text())
        assert saved["config"]["eps_r"] == pytest.approx(row["eps_r_255"] / 255) and saved["n"] == 4
        acc = {r["repair"]: r["accuracy"] for r in saved["rows"]}
        assert (row["noise"], row["repair"]) == (acc["noise"], acc["mtl:clean"])
        assert row["gain"] == pytest.approx(acc["mtl:clean"] - acc["noise"]) and 0 <= row["p"] <= 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished point was run again")

    monkeypatch.setattr(sw, "run_eval", must_not_run)
    assert sw.sweep(4, "mtl:clean", [8 / 255, 16 / 255], [1], [2], tmp_path, str(tiny_weights)) == rows
    table = sw.markdown(rows, "mtl:clean", 4)
    assert "| 8/255 | 1 | 2 |" in table and "| 16/255 | 1 | 2 |" in table
    with pytest.raises(ValueError, match="none to vary"):
        sw.sweep(4, "noise", [8 / 255], [1], [2], tmp_path, str(tiny_weights))


def test_compare_reports_counts_agreement_accuracy_and_differing_pixels(tmp_path):
    from PIL import Image

    from bench.compare_reports import main as compare_main

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for name, preds, touched in (("a", [3, 5, 1], 0), ("b", [3, 4, 1], 8)):
        out = tmp_path / name
        out.mkdir()
        rows = []
        for i, pred in enumerate(preds):
            pixels = image.copy()
            pixels[:touched, 0] ^= 1 if i == 0 else 0          # b's first image differs in 8 pixels (of 1024)
            Image.fromarray(pixels).save(out / f"{i}.png")           # the input was a JPEG: its output a PNG
            rows.append({"file": f"{i}.jpg", "status": "repaired", "pred_after": pred, "output": f"{i}.png"})
        rows.append({"file": "bad.png", "status": "error", "pred_after": None})
        (out / "report.json").write_text(json.dumps({"images": rows}))
    (tmp_path / "labels.csv").write_text("file,label\n0.jpg,3\n1.jpg,4\n2.jpg,2\n")
    result = CliRunner().invoke(compare_main, [str(tmp_path / "a"), str(tmp_path / "b"), "--labels",
                                               str(tmp_path / "labels.csv")])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert got["n"] == 3 and got["prediction_agreement"] == pytest.approx(2 / 3)
    assert got["accuracy_a"] == pytest.approx(1 / 3) and got["accuracy_b"] == pytest.approx(2 / 3)
    assert got["mcnemar"] == {"a_only": 0, "b_only": 1, "p": 1.0}
    assert got["pixels_differing"]["images_identical"] == 2
    assert got["pixels_differing"]["max"] == pytest.approx(8 / 1024)
    missing = CliRunner().invoke(compare_main, [str(tmp_path / "a"), str(tmp_path)])
    assert missing.exit_code == 2 and "report.json" in missing.output
