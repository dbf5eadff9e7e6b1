"""`cli.py repair --ray`: the same PNGs and report on a local Ray cluster (2 CPUs, 2 actors) as in one process, bad
inputs included; without Ray Data a clear usage error."""
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from bench.hostile_files import eps, header_bomb
from cli import main
from tests.conftest import EXAMPLES

# the default objective is the clean-level one, whose levels live in the tiny weights' calibration
COMMON = ["--steps", "3", "--batch-size", "4", "--quiet"]


def repair(*args):
    return CliRunner().invoke(main, ["repair", *map(str, args)])


@pytest.fixture(scope="module")
def local_ray(ray_cluster):
    pytest.importorskip("ray.data", reason="needs Ray Data (the ray extra)")
    return ray_cluster


@pytest.fixture
def mixed_folder(tmp_path):
    """Ten example images in two folders, a text file named .png, two hostile files (a header bomb and an EPS file
    named .png: the decode policy's errors) and a labels.csv."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    pngs = sorted(EXAMPLES.glob("*.png"))[:10]
    for i, p in enumerate(pngs):
        shutil.copy(p, src / ("sub" if i % 3 == 0 else "") / p.name)
    (src / "broken.png").write_text("not an image")
    (src / "bomb.png").write_bytes(header_bomb())
    (src / "sub" / "eps.png").write_bytes(eps())
    shutil.copy(EXAMPLES / "labels.csv", src / "labels.csv")
    return src


def test_ray_run_is_byte_identical_to_one_process(local_ray, tiny_weights, mixed_folder, tmp_path):
    single = repair("--input", mixed_folder, "--output", tmp_path / "one", "--weights", tiny_weights, *COMMON)
    on_ray = repair("--input", mixed_folder, "--output", tmp_path / "ray", "--weights", tiny_weights, *COMMON,
                    "--ray", "--workers", "2")
    assert single.exit_code == on_ray.exit_code == 1, on_ray.output    # the bad files: exit 1, the rest repaired
    one, ray_out = tmp_path / "one", tmp_path / "ray"
    pngs = sorted(p.relative_to(one) for p in one.rglob("*.png"))
    assert len(pngs) == 10
    assert all((one / p).read_bytes() == (ray_out / p).read_bytes() for p in pngs)
    assert sorted(p.relative_to(ray_out) for p in ray_out.rglob("*.png")) == pngs
    a, b = (json.loads((d / "report.json").read_text()) for d in (one, ray_out))
    assert a["images"] == b["images"] and a["config"] == b["config"]
    assert (one / "report.csv").read_bytes() == (ray_out / "report.csv").read_bytes()
    assert b["summary"]["ray_workers"] == 2 and b["summary"]["n_error"] == 3
    assert 0 < b["summary"]["ray_startup_s"] < b["summary"]["seconds"]       # timed apart from the repair
    assert b["summary"]["images_per_s_after_startup"] > b["summary"]["images_per_s"]
    assert "broken.png" in on_ray.output
    assert "over the limit" in b["images"][[r["file"] for r in b["images"]].index("bomb.png")]["error"]


def test_ray_run_keeps_what_is_there(local_ray, tiny_weights, mixed_folder, tmp_path):
    out = tmp_path / "out"
    first = repair("--input", mixed_folder, "--output", out, "--weights", tiny_weights, *COMMON, "--ray")
    assert first.exit_code == 1
    again = repair("--input", mixed_folder, "--output", out, "--weights", tiny_weights, *COMMON, "--ray")
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_ray_options_need_ray(tiny_weights, mixed_folder, tmp_path):
    result = repair("--input", mixed_folder, "--output", tmp_path / "o", "--weights", tiny_weights, "--workers", "2")
    assert result.exit_code == 2 and "only apply with --ray" in result.output


def test_without_ray_data_the_error_names_the_extra(monkeypatch, tiny_weights, mixed_folder, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)               # import ray -> ImportError
    result = repair("--input", mixed_folder, "--output", tmp_path / "o", "--weights", tiny_weights, "--ray")
    assert result.exit_code == 2
    assert "mssl-repair[ray]" in result.output
    assert not (tmp_path / "o").exists()


def _batch_recorder():
    """A stand-in engine (importable by the actors) whose rows say how many images came in their batch."""
    return lambda x: [{"image": image, "pred_after": 0, "batch": len(x)} for image in x]


def test_each_ray_batch_is_batch_size_images(local_ray, tmp_path):
    """512 inputs: Ray Data's own blocks (200, of 2-3 rows) had the engine called on 64, 54 and 2 images (measured);
    with one block per batch, on 64 each time."""
    from runtime.ray_folder import repair_folder_ray

    src = tmp_path / "in"
    src.mkdir()
    pngs = sorted(EXAMPLES.glob("*.png"))
    for i in range(512):
        shutil.copy(pngs[i % len(pngs)], src / f"{i:03d}.png")
    report = repair_folder_ray(_batch_recorder, src, tmp_path / "out", {"k": 1}, batch_size=64, progress=False,
                               workers=2)
    assert [r["batch"] for r in report["images"]] == [64] * 512


def test_each_ray_block_is_one_batch():
    pytest.importorskip("pyarrow", reason="needs Ray Data (the ray extra)")
    from runtime.ray_folder import path_blocks

    todo = [SimpleNamespace(rel=f"sub/{i}.png") for i in range(10)]
    blocks = path_blocks(todo, Path("/data"), batch_size=4)
    assert [b.num_rows for b in blocks] == [4, 4, 2]
    assert blocks[2].column("file").to_pylist() == ["sub/8.png", "sub/9.png"]
    assert blocks[0].column("path").to_pylist()[1] == str(Path("/data/sub/1.png"))


def test_an_actor_builds_its_engine_on_the_thread_that_repairs():
    """Ray Data calls __init__ and the batches on different threads; an engine loaded on the other one ran torch's
    OpenMP threads ~20 % slower at 2 threads (docs/results.md, "Ray Data")."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from runtime.ray_folder import RepairActor

    built_on = []

    def make_repair():
        built_on.append(threading.get_ident())
        return lambda x: [{"image": image, "pred_after": 0} for image in x]

    actor = RepairActor(make_repair, resize=False)
    assert built_on == []
    batch = {"file": np.array(["a.png"]), "path": np.array([str(sorted(EXAMPLES.glob("*.png"))[0])])}
    with ThreadPoolExecutor(max_workers=1) as pool:
        thread = pool.submit(threading.get_ident).result()
        outs = [pool.submit(actor, batch).result() for _ in range(2)]
    assert built_on == [thread]                                  # once, on the repairing thread
    assert json.loads(outs[1]["row"][0]) == {"pred_after": 0} and outs[1]["ready_at"][0] == actor.ready_at > 0
