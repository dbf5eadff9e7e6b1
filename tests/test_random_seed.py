"""`--seed random`: the deployment `cli.py worst-case --deployment randomized` evaluates. Every batch draws a fresh
seed, so that the same image repaired twice meets other draws, on the PyTorch reference and in the runtime without
PyTorch, and the report says "random"; an integer seed keeps the repair a deterministic function of the image."""
import hashlib
import json
import shutil

import click
import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from tests.conftest import EXAMPLES

STEPS = ["--steps", "2", "--batch-size", "2", "--quiet"]


def test_the_seed_is_an_integer_or_random():
    from runtime.cli import SEED

    assert SEED.convert("7", None, None) == 7 and SEED.convert(" random ", None, None) is None
    for bad, message in (("seven", "is not an integer or 'random'"), (str(2 ** 63), "does not fit in 64 bits")):
        with pytest.raises(click.BadParameter, match=message):
            SEED.convert(bad, None, None)


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


@pytest.fixture
def two_images(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for path in sorted((EXAMPLES).glob("*.png"))[:2]:
        shutil.copy(path, folder / path.name)
    return folder


def test_the_reference_repairs_with_fresh_draws_for_each_batch(tiny_weights, two_images, tmp_path):
    run = lambda name, seed: CliRunner().invoke(main, [
        "repair", "--input", str(two_images), "--output", str(tmp_path / name), "--weights", str(tiny_weights),
        "--tasks", "rotation", "--objective", "plain", "--backend", "torch", "--seed", seed, *STEPS])
    for name, seed in (("a", "random"), ("b", "random"), ("c", "3"), ("d", "3")):
        result = run(name, seed)
        assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a" / "report.json").read_text())["config"]["seed"] == "random"
    assert digests(tmp_path / "c") == digests(tmp_path / "d")            # a seed: the same bytes every run
    assert set(digests(tmp_path / "a").values()).isdisjoint(digests(tmp_path / "b").values())


def test_the_runtime_repairs_with_fresh_draws_for_each_batch(tiny_bundle):
    from runtime.bundle import Bundle, BundleRepair
    from runtime.settings import RepairSettings

    bundle = Bundle(tiny_bundle, 1)
    x = np.random.default_rng(0).random((2, 3, bundle.size, bundle.size), dtype=np.float32)
    repair = lambda seed: BundleRepair(str(tiny_bundle), 1, RepairSettings(seed=seed, steps=2)).on(bundle)(x)
    first, again = repair(None), repair(None)
    assert not any(np.array_equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(repair(3), repair(3)))
    assert BundleRepair(str(tiny_bundle), 1, RepairSettings(seed=None)).config(bundle)["seed"] == "random"
