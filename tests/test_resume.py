"""`cli.py repair --resume`: a run killed part-way is finished into the same output, and the result is the run
that was never stopped; the journal guards what it does not vouch for."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from cli import main
from runtime.folder import repair_folder
from runtime.journal import JOURNAL
from tests.conftest import EXAMPLES, ROOT

ARGS = ["--steps", "2", "--batch-size", "1", "--quiet"]


def repair(*args):
    return CliRunner().invoke(main, ["repair", *map(str, args)])


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for p in sorted(EXAMPLES.glob("*.png"))[:12]:
        shutil.copy(p, src / p.name)
    return src


def journal_rows(out):
    path = out / JOURNAL
    return sum(1 for line in path.read_text().splitlines()[1:]) if path.exists() else 0


def journal_entries(out) -> list[dict]:
    """The journal's whole lines past its config (a kill can cut the last one short)."""
    return [json.loads(line) for line in (out / JOURNAL).read_text().splitlines(keepends=True)[1:]
            if line.endswith("\n")]


def vouched(out, entry: dict) -> bool:
    """Whether the entry's PNG holds the bytes it names."""
    png = out / entry["row"]["output"]
    return png.is_file() and hashlib.sha256(png.read_bytes()).hexdigest() == entry["png_sha256"]


def test_a_killed_run_resumes_to_the_uninterrupted_result(tiny_weights, folder, tmp_path):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert repair("--input", folder, "--output", whole, "--weights", tiny_weights, *ARGS).exit_code == 0
    command = [sys.executable, str(ROOT / "cli.py"), "repair", "--input", str(folder), "--output", str(stopped),
               "--weights", str(tiny_weights), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while journal_rows(stopped) < 3 and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = journal_rows(stopped)
    assert 3 <= done_before < 12 and not (stopped / "report.json").exists()
    before = journal_entries(stopped)
    left_done = {e["row"]["file"] for e in before if vouched(stopped, e)}   # killed between a row and its PNG: undone
    assert len(left_done) >= done_before - 1
    # without --resume the unfinished run is pointed out, not clobbered
    plain = repair("--input", folder, "--output", stopped, "--weights", tiny_weights, *ARGS)
    assert plain.exit_code == 2 and "--resume" in plain.output
    resumed = repair("--input", folder, "--output", stopped, "--weights", tiny_weights, *ARGS, "--resume")
    assert resumed.exit_code == 0, resumed.output
    a, b = (json.loads((d / "report.json").read_text()) for d in (whole, stopped))
    assert a["images"] == b["images"] and a["config"] == b["config"]
    assert all((whole / r["output"]).read_bytes() == (stopped / r["output"]).read_bytes() for r in a["images"])
    # the stopped run's rows, then one for each image it had not left done: none done twice
    rows = [e["row"]["file"] for e in journal_entries(stopped)]
    assert rows[:len(before)] == [e["row"]["file"] for e in before]
    assert sorted(rows[len(before):]) == sorted({r["file"] for r in a["images"]} - left_done)


def test_resume_refuses_other_settings(tiny_weights, folder, tmp_path):
    out = tmp_path / "out"
    assert repair("--input", folder, "--output", out, "--weights", tiny_weights, *ARGS).exit_code == 0
    other = repair("--input", folder, "--output", out, "--weights", tiny_weights, "--steps", "2", "--batch-size",
                   "3", "--quiet", "--resume")
    assert other.exit_code == 2 and "other settings" in other.output and "batch_size" in other.output


def test_resume_repairs_again_what_the_journal_does_not_vouch_for(folder, tmp_path):
    calls = []

    def fake_repair(x):                            # the "repair": images as they are, a row field to compare
        calls.append(len(x))
        time.sleep(0.05)                           # long enough for the summary's images/s to be read back
        return [{"image": image, "pred_before": 0, "pred_after": 0} for image in x]

    out = tmp_path / "out"
    first = repair_folder(fake_repair, folder, out, {"k": 1}, batch_size=4, progress=False)
    # as a kill leaves it: the journal's first five rows and a line cut short, no report; one PNG not the journal's
    (out / JOURNAL).write_text("\n".join((out / JOURNAL).read_text().splitlines()[:6]) + '\n{"row": {cut')
    (out / "report.json").unlink()
    for row in first["images"][5:]:
        (out / row["output"]).unlink()
    changed = first["images"][0]
    (out / changed["output"]).write_bytes(b"not what the journal recorded")
    calls.clear()
    kept = repair_folder(fake_repair, folder, out, {"k": 1}, batch_size=4, progress=False, resume=True)
    assert sum(calls) == 7                       # 12 less the five journal rows (four intact, one PNG changed)
    row = next(r for r in kept["images"] if r["file"] == changed["file"])
    assert row["status"] == "error" and "already exists" in row["error"]   # a PNG no line vouches for stays
    assert (out / changed["output"]).read_bytes() == b"not what the journal recorded"
    (out / changed["output"]).unlink()            # the user removes it and resumes once more
    calls.clear()
    again = repair_folder(fake_repair, folder, out, {"k": 1}, batch_size=4, progress=False, resume=True)
    assert sum(calls) == 1 and again["images"] == first["images"]
    summary = again["summary"]                    # this run's speed counts its own image, not the 11 kept ones
    assert summary["n_repaired"] == 12 and 0.5 < summary["images_per_s"] * summary["seconds"] < 1.5
