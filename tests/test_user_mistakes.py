"""What a user can get wrong before hours of work, said at once and without a traceback: a profile without a recipe, a
bank larger than the folder, a calibration without a task's statistics (and a fix that keeps the others), a Ray
cluster that is not there."""
import json

import pytest
from click.testing import CliRunner

import engine.eval.evaluate as ev
from cli import main
from engine.calibration import CALIBRATION_FILE
from engine.pipeline import load_pipeline
from engine.models.weights import WeightsError

from .conftest import IMAGENETTE_SAMPLE


def test_train_set_refuses_a_profile_without_a_recipe_before_training(tmp_path):
    result = CliRunner().invoke(main, ["train-set", "--data", str(tmp_path), "--out", str(tmp_path / "w"),
                                       "--profile", "cpu", "--standard", "--size", "32"])
    assert result.exit_code == 2 and "profile 'cpu' has no recipe for classifier-standard" in result.output
    assert "folder-cpu" in result.output and not (tmp_path / "w").exists()
    result = CliRunner().invoke(main, ["train", "joint-robust", "--profile", "folder-cpu", "--data", str(tmp_path),
                                       "--out", str(tmp_path / "j")])
    assert result.exit_code == 2 and "joint models have the profiles cpu, gpu" in result.output


@pytest.mark.skipif(not IMAGENETTE_SAMPLE.exists(), reason="needs ../shared/data/imagenette/sample")
def test_a_contrastive_bank_larger_than_the_folder_is_sized_to_it_and_recorded(tmp_path):
    # (it once stopped after the epochs: "fills a bank of 4096 negatives with training images; there are only 200")
    result = CliRunner().invoke(main, ["train", "contrastive", "--profile", "folder-cpu", "--data",
                                       str(IMAGENETTE_SAMPLE), "--size", "32", "--out", str(tmp_path / "w"),
                                       "--epochs", "1"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "w" / "contrastive.json").read_text())
    assert manifest["config"]["bank_size"] == manifest["metrics"]["bank_size"] == 200
    assert manifest["sized_from_data"] == ["bank of negatives 4096 -> 200: one view of each training image"]


def test_a_calibration_is_read_for_the_tasks_it_holds_and_its_fix_keeps_them(tiny_weights, tmp_path):
    data = json.loads((tiny_weights / CALIBRATION_FILE).read_text())
    data["losses"] = {"rotation": data["losses"]["rotation"]}
    path = tmp_path / "rotation_only.json"
    path.write_text(json.dumps(data))
    plain = load_pipeline(tiny_weights, tasks=["rotation", "inpainting"], objective="plain", calibration=path)
    assert list(plain.calibration.losses) == ["rotation"]
    with pytest.raises(WeightsError, match=r"no statistics for inpainting; run `python cli.py calibrate --tasks "
                                           r"rotation,inpainting "):
        load_pipeline(tiny_weights, tasks=["rotation", "inpainting"], objective="clean", calibration=path)
    config = ev.EvalConfig(n=2, attacks=["none"], repairs=["rotation:clean", "inpainting:clean"])
    with pytest.raises(ValueError, match=r"statistics of inpainting, .*calibrate --tasks rotation,inpainting "):
        ev.Evaluator(plain, config)
    ev.Evaluator(plain, ev.EvalConfig(n=2, attacks=["none"], repairs=["rotation:clean", "inpainting"]))


def test_a_ray_cluster_that_is_not_there_is_a_clear_error():
    from runtime.ray_folder import connect_ray

    class NoCluster:
        @staticmethod
        def init(**kwargs):
            raise ConnectionError("Could not find any running Ray instance.")
    with pytest.raises(ValueError, match="no Ray cluster answered at --ray-address auto .*ray start --head"):
        connect_ray(NoCluster, "auto")
