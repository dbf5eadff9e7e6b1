"""Continuous batching (runtime/scheduler.py): an image's row is the one a static batch gives it, byte for byte,
whatever joined or left around it — any order, any arrival step, any capacity — on the bundle and on the PyTorch
engine; a caller that leaves frees its place without touching the others."""
import numpy as np
import pytest
import torch

from runtime.scheduler import SteppedRepair
from runtime.settings import RepairSettings
from tests.conftest import EXAMPLES, tiny_clean_pipeline

pytest.importorskip("onnxruntime", reason="the bundle runs in onnxruntime")


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Clean example images (the tiny networks' clean levels were measured on them, so that some reach their level
    within a few steps and leave the loop early), slightly noised by ``seed``."""
    from runtime.imageio import read_image

    paths = sorted(EXAMPLES.glob("*.png"))[seed:seed + n]
    x = np.stack([read_image(p, size=size)[0] for p in paths])
    return np.clip(x + np.random.default_rng(seed).uniform(-2 / 255, 2 / 255, x.shape), 0, 1).astype(np.float32)


def run_continuously(kernel, settings, x: np.ndarray, capacity: int, order, arrivals) -> dict[int, dict]:
    """Image ``order[k]`` is offered at step ``arrivals[k]`` (or as soon after as a place is free)."""
    loop, rows, step = SteppedRepair(kernel, settings, capacity), {}, 0
    offered = sorted(zip(arrivals, order))
    while offered or loop.in_flight:
        ready = [i for at, i in offered if at <= step][:loop.free]
        offered = [(at, i) for at, i in offered if i not in ready]
        rows.update(loop.join(ready, x[ready]) if ready else [])
        rows.update(loop.step())
        step += 1
    return rows


def assert_same_rows(static: list[dict], continuous: dict[int, dict], losses_within: float = 0) -> None:
    """The same repaired bytes and the same row; with ``losses_within``, the reported losses may differ by that much
    (PyTorch's CPU convolutions round differently at another batch size: the losses before and after are forward
    passes over the images that joined or left together, not the static batch)."""
    assert sorted(continuous) == list(range(len(static)))
    for i, row in enumerate(static):
        other = continuous[i]
        assert np.array_equal(row["image"], other["image"]), i
        assert row["detail"]["objective"] == pytest.approx(other["detail"]["objective"], abs=losses_within), i
        for key in ("ssl_loss_before", "ssl_loss_after"):
            assert row[key] == pytest.approx(other[key], abs=losses_within), (i, key)
        for key in ("task_losses_before", "task_losses_after"):
            assert row[key] == pytest.approx(other[key], abs=losses_within), (i, key)
        floats = ("detail", "ssl_loss_before", "ssl_loss_after", "task_losses_before", "task_losses_after", "image")
        assert {k: v for k, v in row.items() if k not in floats} == {k: v for k, v in other.items() if k not in floats}
        assert row["detail"]["probs_after"] == pytest.approx(other["detail"]["probs_after"], abs=losses_within)


SCHEDULES = [(6, [0, 1, 2, 3, 4, 5], [0] * 6),                 # all at once: the static batch's own shape
             (2, [5, 3, 1, 0, 2, 4], [0, 0, 1, 1, 3, 7]),      # few places, other order, staggered arrivals
             (3, [2, 0, 4, 1, 5, 3], [0, 2, 2, 5, 5, 6])]


@pytest.fixture(scope="module")
def clean_bundle(tiny_clean_bundle):
    from runtime.bundle import Bundle

    return Bundle(tiny_clean_bundle, 1)


def test_the_clean_objective_lets_these_images_leave_at_different_steps(clean_bundle):
    # the schedules below only test something if images leave the loop at different steps
    settings = RepairSettings(steps=12)
    steps_run = {len(r["detail"]["objective"]) for r in clean_bundle.repair_batch(images(6, clean_bundle.size),
                                                                                  settings)}
    assert len(steps_run) > 1, steps_run


@pytest.mark.parametrize("capacity, order, arrivals", SCHEDULES)
def test_bundle_rows_are_the_static_batch_rows_whatever_the_schedule(clean_bundle, capacity, order, arrivals):
    settings = RepairSettings(steps=12, seed=3)
    x = images(6, clean_bundle.size)
    static = clean_bundle.repair_batch(x, settings)
    assert_same_rows(static, run_continuously(clean_bundle, settings, x, capacity, order, arrivals))


def test_bundle_rows_with_the_gate_and_without_the_early_exit(tiny_bundle):
    from runtime.bundle import Bundle

    bundle = Bundle(tiny_bundle, 1)                  # plain objective: every step for every image
    settings = RepairSettings(steps=3, gate_fpr=0.5, early_exit=False)
    x = images(6, bundle.size, seed=1)
    static = bundle.repair_batch(x, settings)
    assert any(row["gated_out"] for row in static) and not all(row["gated_out"] for row in static)
    assert_same_rows(static, run_continuously(bundle, settings, x, 2, [3, 1, 0, 5, 4, 2], [0, 0, 0, 1, 4, 4]))


def test_no_steps_is_the_noise_control_and_leaves_at_once(clean_bundle):
    settings = RepairSettings(steps=0)
    x = images(3, clean_bundle.size)
    loop = SteppedRepair(clean_bundle, settings, 4)
    rows = dict(loop.join([0, 1, 2], x))
    assert not loop.in_flight
    assert_same_rows(clean_bundle.repair_batch(x, settings), rows)


@pytest.mark.parametrize("capacity, order, arrivals", SCHEDULES[1:])
def test_torch_rows_are_the_static_batch_rows_whatever_the_schedule(tiny_weights, capacity, order, arrivals):
    from engine.folder import repair_batch
    from engine.stepper import TorchStepKernel

    pipeline = tiny_clean_pipeline(tiny_weights)
    settings = RepairSettings(steps=12, seed=5)
    x = images(6, pipeline.size, seed=2)
    static = repair_batch(pipeline, torch.from_numpy(x), settings)
    assert_same_rows(static, run_continuously(TorchStepKernel(pipeline), settings, x, capacity, order, arrivals),
                     losses_within=2e-6)


def test_a_caller_that_leaves_frees_its_place_and_changes_no_other_row(clean_bundle):
    settings = RepairSettings(steps=12, seed=3)
    x = images(4, clean_bundle.size)
    static = clean_bundle.repair_batch(x, settings)
    loop = SteppedRepair(clean_bundle, settings, 2)
    rows = dict(loop.join([0, 1], x[:2]))
    rows.update(loop.step())
    loop.drop({1})
    assert [item.key for item in loop.in_flight] in ([0], [])
    rows.update(loop.join([2, 3][:loop.free], x[2:2 + loop.free]))
    while loop.in_flight or len(rows) < 3:
        rows.update(loop.step())
        if loop.free and 3 not in rows and all(item.key != 3 for item in loop.in_flight):
            rows.update(loop.join([3], x[3:]))
    rows.pop(1, None)
    assert sorted(rows) == [0, 2, 3]
    for key in rows:
        assert np.array_equal(rows[key]["image"], static[key]["image"])


def test_more_images_than_places_are_refused(clean_bundle):
    loop = SteppedRepair(clean_bundle, RepairSettings(steps=2), 1)
    with pytest.raises(ValueError, match="free places"):
        loop.join([0, 1], images(2, clean_bundle.size))


def test_the_service_loop_answers_each_request_and_lets_a_cancelled_one_go(clean_bundle):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from runtime.scheduler import ContinuousBatcher

    settings = RepairSettings(steps=12, seed=3)
    x = images(5, clean_bundle.size)
    static = clean_bundle.repair_batch(x, settings)

    async def serve_five():
        batcher = ContinuousBatcher(lambda: SteppedRepair(clean_bundle, settings, 2), ThreadPoolExecutor(1))
        futures = [batcher.enqueue(image) for image in x]
        futures[3].cancel()                     # its client left before it joined
        answers = [await f for i, f in enumerate(futures) if i != 3]
        await asyncio.sleep(0.05)
        return answers, batcher.load

    answers, load = asyncio.run(serve_five())
    assert load == 0
    for i, (row, facts) in zip([0, 1, 2, 4], answers):
        assert np.array_equal(row["image"], static[i]["image"])
        assert 1 <= facts.size <= 2 and facts.steps == len(static[i]["detail"]["objective"])


def test_no_newcomer_joins_while_the_oldest_image_has_run_its_share(clean_bundle):
    settings = RepairSettings(steps=12, seed=3)
    x = images(6, clean_bundle.size)
    static = clean_bundle.repair_batch(x, settings)
    loop, rows, offered, step = SteppedRepair(clean_bundle, settings, 4, join_before_step=2), {}, list(range(6)), 0
    while offered or loop.in_flight:
        if any(item.steps_run >= 2 for item in loop.in_flight):
            assert loop.free == 0
        ready = offered[:loop.free]
        offered = offered[len(ready):]
        rows.update(loop.join(ready, x[ready]) if ready else [])
        rows.update(loop.step())
        step += 1
    assert_same_rows(static, rows)
