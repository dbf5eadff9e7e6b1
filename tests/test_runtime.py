"""The runtime without PyTorch (runtime/): run where ``import torch`` fails, it repairs a folder with an exported
bundle like the PyTorch reference (same draws: same predictions, same statuses, same report), and refuses what it
cannot use with a message."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["contrastive", "inpainting", "rotation"]      # views, a mask and no draws: every kind of parameter
REPAIR = ["--steps", "3", "--seed", "1", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    """The session's tiny bundle (tests/conftest.py): the plain objective of the three tasks, with the gate's
    statistics."""
    return tiny_bundle


def run_without_torch(*args: str) -> subprocess.CompletedProcess:
    """``python -m runtime ARGS`` in a process where importing torch raises ImportError."""
    code = ("import sys; sys.modules['torch'] = None\n"
            f"sys.argv = ['runtime', *{list(args)!r}]\n"
            "from runtime.cli import main; main()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for path in sorted((ROOT / "examples" / "attacked").glob("*.png"))[:6]:
        shutil.copy(path, folder / path.name)
    shutil.copy(ROOT / "examples" / "attacked" / "labels.csv", folder / "labels.csv")
    (folder / "notes.png").write_text("not an image")
    return folder


def test_runtime_repairs_like_the_torch_reference_with_torch_unimportable(bundle, tiny_weights, inputs, tmp_path):
    reference = CliRunner().invoke(main, ["repair", "--input", str(inputs), "--output", str(tmp_path / "ref"),
                                          "--weights", str(tiny_weights), "--tasks", ",".join(TASKS), "--objective", "plain",
                                          "--backend", "torch", *REPAIR])
    assert reference.exit_code == 1, reference.output            # the bad file: exit 1, the rest repaired
    result = run_without_torch("repair", "--bundle", str(bundle), "--input", str(inputs), "--output",
                               str(tmp_path / "rt"), "--threads", "1", *REPAIR)
    assert result.returncode == 1, result.stderr
    assert "notes.png" in result.stderr and "repaired 6 of 8" in result.stdout
    ref, got = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("ref", "rt"))
    assert ref["config"]["weights"] == got["config"]["weights"] and got["config"]["objective"] == "plain"
    for a, b in zip(ref["images"], got["images"]):
        assert (a["file"], a["status"], a["error"]) == (b["file"], b["status"], b["error"])
        if a["status"] != "repaired":
            continue
        assert (a["pred_before"], a["pred_after"], a["label_after"]) == (b["pred_before"], b["pred_after"],
                                                                         b["label_after"])
        for task in TASKS:                        # the same draws: the same losses before and after
            assert b["task_losses_before"][task] == pytest.approx(a["task_losses_before"][task], rel=1e-4, abs=1e-5)
            assert b["task_losses_after"][task] == pytest.approx(a["task_losses_after"][task], rel=1e-3, abs=1e-4)
        pixels = [np.asarray(Image.open(tmp_path / d / a["output"]), dtype=np.int16) for d in ("ref", "rt")]
        # sign steps flip only where a gradient is ~0: almost every pixel is the same 8-bit value
        assert (pixels[0] != pixels[1]).mean() <= 1e-3
    assert got["summary"]["accuracy_after"] == ref["summary"]["accuracy_after"]


def test_runtime_gate_passes_the_same_inputs_as_the_reference(bundle, tiny_weights, inputs, tmp_path):
    gate = ["--gate", "0.5", "--steps", "1", "--quiet"]
    reference = CliRunner().invoke(main, ["repair", "--input", str(inputs), "--output", str(tmp_path / "ref"),
                                          "--weights", str(tiny_weights), "--tasks", ",".join(TASKS), "--objective",
                                          "plain", "--backend", "torch", *gate])
    assert reference.exit_code == 1, reference.output
    result = run_without_torch("repair", "--bundle", str(bundle), "--input", str(inputs), "--output",
                               str(tmp_path / "rt"), *gate)
    assert result.returncode == 1, result.stderr
    ref, got = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("ref", "rt"))
    assert got["config"]["gate"]["threshold"] == pytest.approx(ref["config"]["gate"]["threshold"], rel=1e-9)
    rows = [(a, b) for a, b in zip(ref["images"], got["images"]) if a["status"] == "repaired"]
    assert [a["gated_out"] for a, _ in rows] == [b["gated_out"] for _, b in rows]
    assert 0 < got["summary"]["n_gated_out"] < len(rows)         # the test says something: some in, some out
    # the score is Σ w_k (L_k − median_k) with w_k = 1/(K·IQR_k): the losses agree to ~1e-6 relative (float32, two
    # engines), so the scores agree to Σ w_k·1e-6·|L_k| — large on the tiny nets, whose IQRs are ~1e-5
    stats = json.loads((bundle / "manifest.json").read_text())["gate"]
    for a, b in rows:
        tol = sum(w * 2e-6 * (1 + abs(a["task_losses_before"][t])) for t, w in stats["weights"].items())
        assert abs(b["gate_score"] - a["gate_score"]) <= tol


def test_runtime_refuses_what_it_cannot_use(bundle, inputs, tmp_path):
    not_a_bundle = run_without_torch("repair", "--bundle", str(tmp_path), "--input", str(inputs), "--output",
                                     str(tmp_path / "out"))
    assert not_a_bundle.returncode == 2 and "cli.py export" in not_a_bundle.stderr
    inside = run_without_torch("repair", "--bundle", str(bundle), "--input", str(inputs), "--output",
                               str(inputs / "out"))
    assert inside.returncode == 2 and "inside the input folder" in inside.stderr
    assert not (tmp_path / "out").exists() and not (inputs / "out").exists()
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "classifier.onnx").write_bytes(b"corrupt")
    corrupt = run_without_torch("repair", "--bundle", str(broken), "--input", str(inputs), "--output",
                                str(tmp_path / "out"))
    assert corrupt.returncode == 2 and "sha256" in corrupt.stderr
