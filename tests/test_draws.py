"""The repair's draws (runtime/draws.py): per (image, task) streams, so an image's draws ignore its batch-mates, the
other tasks and the number of steps; seeded; and the module runs where torch cannot be imported."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime import draws

TASKS = {"contrastive-head": 4, "consistency": 2, "inpainting-head": None, "rotation-head": None, "hedge": None}


@pytest.fixture
def batch():
    return np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for task in a:
        assert a[task].keys() == b[task].keys()
        for key in a[task]:
            np.testing.assert_array_equal(a[task][key], b[task][key])


def test_an_image_draws_the_same_alone_as_in_a_batch(batch):
    together = draws.batch_draws(batch, 7, TASKS, steps=3)
    alone = draws.batch_draws(batch[2:3], 7, TASKS, steps=3)
    assert_same(alone, {t: {k: v[:, 2:3] for k, v in p.items()} for t, p in together.items()})
    np.testing.assert_array_equal(draws.start_noise(batch, 7)[2:3], draws.start_noise(batch[2:3], 7))


def test_a_tasks_draws_ignore_the_other_tasks_and_the_number_of_steps(batch):
    full = draws.batch_draws(batch, 0, TASKS, steps=5)
    just = draws.batch_draws(batch, 0, {"consistency": 2}, steps=3)
    assert_same(just, {"consistency": {k: v[:3] for k, v in full["consistency"].items()}})


def test_step_draws_for_the_images_left_are_the_batch_draws_of_those_images(batch):
    full = draws.batch_draws(batch, 3, TASKS, steps=3)
    stepper = draws.StepDraws(batch, 3, TASKS)
    for step, rows in enumerate([[0, 1, 2, 3, 4], [1, 3, 4], [3]]):        # images leave as a repair's do
        assert_same(stepper.next(rows), {t: {k: v[step, rows] for k, v in p.items()} for t, p in full.items()})


def test_draws_are_seeded_and_shaped(batch):
    a, b = draws.batch_draws(batch, 1, TASKS, 2), draws.batch_draws(batch, 1, TASKS, 2)
    assert_same(a, b)
    other = draws.batch_draws(batch, 2, TASKS, 2)
    assert not np.array_equal(a["consistency"]["crop_y"], other["consistency"]["crop_y"])
    assert a["contrastive-head"]["crop_y"].shape == (2, 5, 4, 32, 32)
    assert a["contrastive-head"]["color"].shape == (2, 5, 4, 3, 3)
    assert a["inpainting-head"]["mask"].shape == (2, 5, 1, 32, 32) and a["inpainting-head"]["mask"].sum() == 2 * 5 * 256
    assert a["rotation-head"] == {} and a["hedge"] == {}
    assert all(v.dtype == np.float32 for p in a.values() for v in p.values())
    # rows of the crop matrices are convex weights; views differ between steps
    np.testing.assert_allclose(a["consistency"]["crop_y"].sum(-1), 1, atol=1e-6)
    assert not np.array_equal(a["consistency"]["crop_y"][0], a["consistency"]["crop_y"][1])


def test_an_unknown_task_is_named():
    with pytest.raises(ValueError, match="segmentation"):
        draws.batch_draws(np.zeros((1, 3, 32, 32), np.float32), 0, {"segmentation": None}, 1)


def test_draws_run_where_torch_cannot_be_imported():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np; from runtime import draws\n"
            "x = np.zeros((1, 3, 32, 32), np.float32)\n"
            "print(draws.batch_draws(x, 0, {'contrastive': 4}, 1)['contrastive']['crop_y'].shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "(1, 1, 4, 32, 32)"


def test_draws_take_the_images_size_and_patch_masks_move_each_step():
    images = np.random.default_rng(1).random((3, 3, 64, 64), dtype=np.float32)
    params = draws.batch_draws(images, 0, {"contrastive": 2, "inpainting": None, "inpainting-patches": None}, steps=4)
    assert params["contrastive"]["crop_y"].shape == (4, 3, 2, 64, 64)
    centre = params["inpainting"]["mask"]
    assert centre.shape == (4, 3, 1, 64, 64) and (centre.sum((2, 3, 4)) == 32 * 32).all()
    patches = params["inpainting-patches"]["mask"]
    covered = patches.sum((2, 3, 4))
    assert ((covered >= 16 * 16) & (covered <= 4 * 16 * 16)).all()       # 4 squares of side 16, overlap allowed
    assert not np.array_equal(patches[0], patches[1])                    # fresh patches every step
    again = draws.batch_draws(images[1:2], 0, {"inpainting-patches": None}, steps=4)["inpainting-patches"]["mask"]
    np.testing.assert_array_equal(again[:, 0], patches[:, 1])            # the image's own stream
