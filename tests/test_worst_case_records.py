"""The committed worst-case tables (and the probe of one) come back from their committed chunk records, with nothing
computed: the commands docs/results.md gives still name the same keys (a change to what a key holds would silently
make hours of committed runs unreadable), and today's bookkeeping still makes the same tables of them.

Every key holds the versions it was made with (engine/eval/stage_cache.py): here the records' own are put in their
place, so that the test runs on any allowed torch build (and the data folder's path, part of a chunk's name, for the
Imagenette set wherever it is). What it cannot check is that this build would compute the same records: nothing is
computed. The tables made before #39 (--deployment randomized, APGD's start unseeded: cache version 1) are read with
that version; their JSON and markdown predate the deployment's name in the config and the table, which are left out of
the comparison."""
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from tests.conftest import ROOT, needs_cifar, needs_shipped

pytest.importorskip("pyautoattack", reason="needs AutoAttack (pip install -e '.[attacks]')")
pytestmark = needs_shipped

RESULTS = ROOT / "results" / "worst_case"
# every key holds the versions the records were made with (engine/eval/stage_cache.py): elsewhere they are not found
RECORDED_WITH = {"cache": 1, "torch": "2.14.1+cu130", "mssl-repair": "0.1.0", "pyautoattack": "0.2.0"}
BEFORE_39 = ["--deployment", "randomized"]
RECORDED_DATA = "/work/data/imagenette"                  # where the Imagenette table's machine had the set
BUDGET = [*BEFORE_39, "--chunk", "25", "--threads", "1", "--iterations", "100", "--eot", "4", "--square-queries", "200", "--quiet"]
TABLE = ["--n", "1000", "--adaptive-n", "500", *BUDGET]
JOINT = ["--weights", str(ROOT / "weights" / "joint-standard"), "--repair", "mtl-joint", "--views", "2",
         "--repair-steps", "20", "--survivors"]
IMAGENETTE = os.environ.get("IMAGENETTE_ROOT")
# the chunks name their images by file, so the Imagenette table needs the whole set, not the sample the other tests use
needs_imagenette = pytest.mark.skipif(not (IMAGENETTE and (Path(IMAGENETTE) / "val").is_dir()),
                                      reason="IMAGENETTE_ROOT is not set to the whole Imagenette set "
                                             "(../shared/data/imagenette/README.md says where it comes from)")
IMAGENETTE_BUDGET = [*BEFORE_39, "--weights", str(ROOT / "weights" / "imagenette"), "--data", str(IMAGENETTE),
                     "--eps", "4/255",
                     "--survivors", "--chunk", "25", "--threads", "1", "--iterations", "20", "--eot", "1",
                     "--square-queries", "200", "--quiet"]
committed = lambda name, command, needs: pytest.param(name, command, marks=needs, id=name)
TABLES = [                                                # docs/results.md's commands, output options aside
    committed("cifar10_default", TABLE, needs_cifar),
    committed("cifar10_joint_standard", [*JOINT, *TABLE], needs_cifar),
    committed("probe_joint_stronger_i200_e8", [*JOINT, "--n", "100", *BUDGET, "--stronger", "200x8"], needs_cifar),
    committed("imagenette_default", [*IMAGENETTE_BUDGET, "--n", "500"], needs_imagenette),
    committed("probe_imagenette_stronger_i100_e4", [*IMAGENETTE_BUDGET, "--n", "100", "--stronger", "100x4"],
              needs_imagenette),
]


@pytest.mark.parametrize("table,command", TABLES)
def test_a_committed_table_is_read_back_from_its_chunk_records(table, command, tmp_path, monkeypatch):
    import engine.eval.stage_cache
    import engine.eval.worst_case as wc

    monkeypatch.setattr(engine.eval.stage_cache, "_environment", lambda: RECORDED_WITH)
    # a chunk's name holds the data folder's path as given: the records' own, wherever the set is here
    chunk_images = wc.chunk_images
    monkeypatch.setattr(wc, "chunk_images", lambda idx, start, chunk, data_root: chunk_images(
        idx, start, chunk, data_root and RECORDED_DATA))
    stages = tmp_path / "stages"                          # a copy: the results folder stays as committed
    stages.mkdir()
    for record in (RESULTS / "stages").glob("chunk-*.pt"):
        shutil.copy(record, stages)

    def recomputed(*args, **kw):
        raise AssertionError("a committed chunk was computed again: its key has changed")
    monkeypatch.setattr(wc.WorstCase, "run_chunk", recomputed)
    result = CliRunner().invoke(main, ["worst-case", *command, "--stages", str(stages),
                                       "--json", str(tmp_path / "w.json"), "--markdown", str(tmp_path / "w.md")])
    assert result.exit_code == 0, result.output
    made = json.loads((tmp_path / "w.json").read_text())
    assert (made["config"].pop("deployment"), made["config"].pop("repair_seed")) == ("randomized", 0)
    assert made == json.loads((RESULTS / f"{table}.json").read_text())
    named = ", fresh draws on every query and scoring (--deployment randomized)"
    assert (tmp_path / "w.md").read_text().replace(named, "", 1) == (RESULTS / f"{table}.md").read_text()
