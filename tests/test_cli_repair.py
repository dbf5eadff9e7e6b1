"""`cli.py repair` end to end on tiny weights: outputs, reports, exit codes, and every bad-input case."""
import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from tests.conftest import EXAMPLES

FAST = ["--steps", "1", "--quiet"]


def run(*args):
    return CliRunner().invoke(main, ["repair", *map(str, args)])


@pytest.fixture
def input_dir(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    pngs = sorted(EXAMPLES.glob("*.png"))
    for p in pngs[:2]:
        shutil.copy(p, src / p.name)
    shutil.copy(pngs[2], src / "sub" / pngs[2].name)
    return src


def digest_tree(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_repairs_a_folder_with_reports(tiny_weights, input_dir, tmp_path):
    before = digest_tree(input_dir)
    out = tmp_path / "out"
    result = run("--input", input_dir, "--output", out, "--weights", tiny_weights, "--steps", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert digest_tree(input_dir) == before                       # inputs untouched
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"config", "images", "summary"}
    assert report["config"]["tasks"] == ["contrastive", "inpainting", "rotation"]
    assert report["config"]["objective"] == "clean" and report["config"]["gate"] is None      # the defaults
    assert report["config"]["early_exit"] is True
    assert report["config"]["eps"] == pytest.approx(16 / 255) and report["config"]["steps"] == 2
    assert set(report["config"]["weights"]) == {"classifier", "contrastive", "inpainting", "rotation"}
    assert report["summary"]["n_repaired"] == 3 and report["summary"]["n_error"] == 0
    for row in report["images"]:
        assert row["status"] == "repaired" and row["error"] is None
        assert (out / row["file"]).exists()                       # same relative path, .png
        assert 0 <= row["linf"] <= 16 / 255 + 1e-6
        assert row["label_before"] and isinstance(row["pred_after"], int)
        assert row["ssl_loss_before"] >= 0 and all(v > 0 for v in row["task_losses_before"].values())
        assert set(row["task_losses_after"]) == {"contrastive", "inpainting", "rotation"}
    assert any(row["file"].startswith("sub/") for row in report["images"])
    with open(out / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    repaired = np.asarray(Image.open(out / report["images"][0]["file"]))
    assert repaired.shape == (32, 32, 3) and repaired.dtype == np.uint8


@pytest.mark.parametrize("case", ["missing", "output_inside", "empty", "no_images"])
def test_unusable_folders_exit_2_with_a_message(tiny_weights, tmp_path, input_dir, case):
    out = tmp_path / "out"
    if case == "missing":
        src, expect = tmp_path / "nope", "does not exist"
    elif case == "no_images":
        src, expect = tmp_path / "docs", "no images under"
        src.mkdir()
        (src / "notes.txt").write_text("hello")
    elif case == "output_inside":
        src, out, expect = input_dir, input_dir / "repaired", "inside the input folder"
    else:
        src, expect = tmp_path / "empty", "no files"
        src.mkdir()
    result = run("--input", src, "--output", out, "--weights", tiny_weights, *FAST)
    assert result.exit_code == 2 and expect in result.output
    assert not (input_dir / "repaired").exists()


def test_bad_files_are_reported_and_the_rest_repaired(tiny_weights, input_dir, tmp_path):
    (input_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (input_dir / "notes.txt").write_text("hello")
    Image.new("RGB", (40, 30)).save(input_dir / "big.png")
    result = run("--input", input_dir, "--output", tmp_path / "out", "--weights", tiny_weights, *FAST)
    assert result.exit_code == 1
    rows = {r["file"]: r for r in json.loads((tmp_path / "out" / "report.json").read_text())["images"]}
    assert rows["broken.png"]["status"] == "error" and "cannot read image" in rows["broken.png"]["error"]
    assert rows["notes.txt"]["status"] == "skipped" and "not an image by its extension" in rows["notes.txt"]["notes"][0]
    assert "40×30" in rows["big.png"]["error"] and "--resize" in rows["big.png"]["error"]
    assert sum(r["status"] == "repaired" for r in rows.values()) == 3


def test_resize_scales_odd_sizes(tiny_weights, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(src / "big.jpg")
    result = run("--input", src, "--output", tmp_path / "out", "--weights", tiny_weights, "--resize", *FAST)
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "out" / "report.json").read_text())["images"][0]
    assert row["notes"] == ["centre-cropped to 30×30 and resized from 40×30 to 32×32"]
    assert (tmp_path / "out" / "big.png").exists()


def test_resize_refuses_images_too_small_to_scale_up(tmp_path):
    from runtime.imageio import ImageError, UnreadableImage, decode_image

    Image.new("RGB", (30, 7), (9, 9, 9)).save(tmp_path / "strip.png")
    with pytest.raises(ImageError, match="30×7: too small for 32×32 models .* at least 8 pixels"):
        decode_image(tmp_path / "strip.png", resize=True, size=32)
    assert decode_image(tmp_path / "strip.png", resize=True, size=28)[0].shape == (3, 28, 28)   # 7 ≥ 28 / 4
    with pytest.raises(UnreadableImage, match="cannot read image"):
        decode_image(b"not an image", resize=True)


def test_resize_keeps_the_aspect_ratio(tmp_path):
    from runtime.imageio import read_image

    wide = np.zeros((30, 90, 3), np.uint8)
    wide[:, 30:60] = 255                         # a white centre square between black thirds
    Image.fromarray(wide).save(tmp_path / "wide.png")
    image, notes = read_image(tmp_path / "wide.png", resize=True)
    assert image.min() == 1.0                    # the centre square only: no squashed black bands
    assert notes == ["centre-cropped to 30×30 and resized from 90×30 to 32×32"]


def test_a_single_image_file_is_an_input(tiny_weights, input_dir, tmp_path):
    photo = sorted(input_dir.glob("*.png"))[0]
    result = run("--input", photo, "--output", tmp_path / "out", "--weights", tiny_weights, *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["file"] for r in report["images"]] == [photo.name]
    assert (tmp_path / "out" / photo.name).exists()
    # the output folder its own folder: the repaired PNG would replace the input, even with --overwrite
    same = run("--input", photo, "--output", photo.parent, "--weights", tiny_weights, "--overwrite", *FAST)
    assert same.exit_code == 2 and "would replace the input" in same.output


def test_other_modes_are_converted_and_noted(tiny_weights, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rgb = Image.open(sorted(EXAMPLES.glob("*.png"))[0])
    rgb.convert("L").save(src / "grey.png")
    rgb.convert("RGBA").save(src / "alpha.png")
    rgb.convert("P").save(src / "palette.png")
    Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)).save(src / "deep.png")
    Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)).save(src / "deep16.tif")
    result = run("--input", src, "--output", tmp_path / "out", "--weights", tiny_weights, *FAST)
    assert result.exit_code == 0, result.output
    notes = {r["file"]: " ".join(r["notes"]) for r in
             json.loads((tmp_path / "out" / "report.json").read_text())["images"]}
    assert "greyscale converted" in notes["grey.png"]
    assert "alpha channel dropped" in notes["alpha.png"]
    assert "palette" in notes["palette.png"]
    assert "16-bit" in notes["deep.png"]
    assert "16-bit" in notes["deep16.tif"]


def test_existing_outputs_are_kept_unless_overwrite(tiny_weights, input_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    name = sorted(input_dir.glob("*.png"))[0].name
    (out / name).write_bytes(b"mine")
    result = run("--input", input_dir, "--output", out, "--weights", tiny_weights, *FAST)
    assert result.exit_code == 1 and (out / name).read_bytes() == b"mine"
    rows = {r["file"]: r for r in json.loads((out / "report.json").read_text())["images"]}
    assert "already exists" in rows[name]["error"]
    again = run("--input", input_dir, "--output", out, "--weights", tiny_weights, *FAST)
    assert again.exit_code == 2 and "report.json" in again.output        # the report of the first run is kept
    forced = run("--input", input_dir, "--output", out, "--weights", tiny_weights, "--overwrite", *FAST)
    assert forced.exit_code == 0 and (out / name).read_bytes() != b"mine"


def test_two_inputs_with_one_output_name(tiny_weights, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    img = Image.open(sorted(EXAMPLES.glob("*.png"))[0])
    img.save(src / "a.png")
    img.save(src / "a.bmp")
    result = run("--input", src, "--output", tmp_path / "out", "--weights", tiny_weights, *FAST)
    assert result.exit_code == 1
    rows = {r["file"]: r for r in json.loads((tmp_path / "out" / "report.json").read_text())["images"]}
    assert rows["a.bmp"]["status"] == "repaired" and "already written for a.bmp" in rows["a.png"]["error"]


@pytest.mark.parametrize("args, expect", [
    (["--tasks", "contrastive,colour"], "unknown task"),
    (["--tasks", "rotation,rotation"], "named twice"),
    (["--alpha", "1,2"], "2 weight(s) for 3 task(s)"),
    (["--eps", "abc"], "not a number"),
    (["--steps", "-1"], "-1"),
])
def test_bad_options_exit_2(tiny_weights, input_dir, tmp_path, args, expect):
    result = run("--input", input_dir, "--output", tmp_path / "out", "--weights", tiny_weights, *args)
    assert result.exit_code == 2 and expect in result.output
    assert not (tmp_path / "out").exists()


def test_missing_weights_exit_2(input_dir, tmp_path):
    result = run("--input", input_dir, "--output", tmp_path / "out", "--weights", tmp_path / "none", *FAST)
    assert result.exit_code == 2 and "cli.py train classifier" in result.output


def test_repair_refuses_a_bound_that_repaints_images_and_skips_the_loop_at_zero(tiny_weights, tmp_path):
    from tests.conftest import EXAMPLES

    common = ["repair", "--input", str(EXAMPLES), "--weights", str(tiny_weights), "--objective", "plain", "--quiet"]
    large = CliRunner().invoke(main, [*common, "--output", str(tmp_path / "large"), "--eps", "2"])
    assert large.exit_code == 2 and "--allow-large-eps" in large.output and not (tmp_path / "large").exists()
    zero = CliRunner().invoke(main, [*common, "--output", str(tmp_path / "zero"), "--eps", "0"])
    assert zero.exit_code == 0 and "no repair" in zero.output
    report = json.loads((tmp_path / "zero" / "report.json").read_text())
    assert report["config"]["steps"] == 0
    repaired = [r for r in report["images"] if r["status"] == "repaired"]
    assert repaired and all(r["linf"] == 0 and r["pred_before"] == r["pred_after"] for r in repaired)


def test_no_early_exit_runs_every_step_and_says_so(tiny_weights, input_dir, tmp_path):
    outs = {}
    for flag in ("--early-exit", "--no-early-exit"):
        out = tmp_path / flag
        assert run("--input", input_dir, "--output", out, "--weights", tiny_weights, "--steps", "3", flag,
                   "--quiet").exit_code == 0
        outs[flag] = json.loads((out / "report.json").read_text())
    assert outs["--early-exit"]["config"]["early_exit"] and not outs["--no-early-exit"]["config"]["early_exit"]
    assert [r["status"] for r in outs["--no-early-exit"]["images"]] == ["repaired"] * 3


def test_stray_non_images_are_skipped_and_do_not_fail_the_run(tiny_weights, input_dir, tmp_path):
    (input_dir / "notes.txt").write_text("hello")
    result = run("--input", input_dir, "--output", tmp_path / "out", "--weights", tiny_weights, *FAST)
    assert result.exit_code == 0, result.output
    assert "skipped 1 file(s) that are not images" in result.output


def test_task_names_known_before_torch_are_the_engines():
    from commands.common import TASK_NAMES
    from engine.tasks import TASKS

    assert TASK_NAMES == tuple(TASKS)


def test_usage_errors_come_before_torch_is_imported(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys; sys.argv = ['cli.py', 'repair', '--input', 'nope', '--output', 'x', '--tasks', 'rotaton']\n"
            "import cli\ntry:\n    cli.main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False"], out.stderr


def test_preview_draws_inputs_above_their_repairs(tiny_weights, input_dir, tmp_path):
    picture = tmp_path / "preview.png"
    result = run("--input", input_dir, "--output", tmp_path / "out", "--weights", tiny_weights, "--preview", picture,
                 "--preview-n", "2", *FAST)
    assert result.exit_code == 0, result.output
    assert "preview of 2 image(s)" in result.output
    width, height = Image.open(picture).size
    assert height > 300 and width >= 300          # two rows (input, repaired), one column per image
    again = run("--input", input_dir, "--output", tmp_path / "out2", "--weights", tiny_weights, "--preview",
                picture, *FAST)
    assert again.exit_code == 2 and "already exists" in again.output      # the picture is not overwritten
    bad = run("--input", input_dir, "--output", tmp_path / "out3", "--weights", tiny_weights, "--preview",
              tmp_path / "p.jpg", *FAST)
    assert bad.exit_code == 2 and ".png" in bad.output


def test_one_default_repair_for_the_cli_the_api_and_eval(tiny_weights):
    from engine import load_pipeline

    params = {c: {p.name: p.default for p in main.commands[c].params} for c in ("repair", "eval")}
    assert params["repair"]["objective"] == "clean" and params["repair"]["early_exit"] is True
    assert load_pipeline(tiny_weights).objective.levels is not None          # the API's default: clean-level too
    assert "mtl:clean:exit" in params["eval"]["repairs"].split(",")         # and eval checks that very repair


@pytest.mark.parametrize("cores, load, expect", [(2, 0.1, 2), (2, 1.2, 1), (2, 3.0, 1), (8, 2.6, 5)])
def test_default_threads_leave_busy_cores_alone(monkeypatch, cores, load, expect):
    import runtime.cli

    monkeypatch.setattr(runtime.cli.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(runtime.cli.os, "getloadavg", lambda: (load, load, load))
    assert runtime.cli.default_threads() == expect
