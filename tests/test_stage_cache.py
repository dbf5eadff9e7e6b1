"""engine/eval/stage_cache.py: an output is kept under its parts and read back, not kept without parts or a folder, and
a damaged file is computed again with a warning."""
import pytest
import torch

from engine.eval.stage_cache import StageCache


def counted(value):
    calls = []

    def compute():
        calls.append(1)
        return value
    return compute, calls


def test_an_output_is_kept_under_its_parts_and_read_back(tmp_path):
    compute, calls = counted(torch.arange(3.0))
    first = StageCache(tmp_path).run({"stage": "a", "budget": 1}, compute)
    again = StageCache(tmp_path).run({"budget": 1, "stage": "a"}, compute)       # another process, same parts
    other = StageCache(tmp_path).run({"stage": "a", "budget": 2}, compute)
    assert len(calls) == 2 and not first.reused and again.reused and not other.reused
    assert torch.equal(again.output, first.output) and again.seconds == first.seconds
    assert not list(tmp_path.glob("*.tmp"))


def test_nothing_is_kept_without_parts_or_a_folder(tmp_path):
    compute, calls = counted([True, False])
    for cache, parts in ((StageCache(tmp_path), None), (StageCache(None), {"stage": "a"})):
        cache.run(parts, compute), cache.run(parts, compute)
        assert (cache.hits, cache.misses) == (0, 2)
    assert len(calls) == 4 and not list(tmp_path.iterdir())


def test_a_damaged_output_is_computed_again_with_a_warning(tmp_path):
    compute, calls = counted([[True]])
    StageCache(tmp_path).run({"stage": "a"}, compute)
    (kept,) = tmp_path.glob("*.pt")
    kept.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="could not be read"):
        stage = StageCache(tmp_path).run({"stage": "a"}, compute)
    assert stage.output == [[True]] and not stage.reused and len(calls) == 2
    assert StageCache(tmp_path).run({"stage": "a"}, compute).reused                   # written again, whole


def test_the_repository_keeps_chunk_outcomes_and_ignores_attacked_images(tmp_path):
    """A run spanning sessions goes on from what is committed: its `chunk-*.pt` (kilobytes), not its stages' attacked
    images (megabytes)."""
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("needs git and a clone of the repository")
    cache = StageCache(tmp_path, prefix="chunk-")
    cache.run({"chunk": 0}, lambda: [True])
    kept_name = next(tmp_path.glob("chunk-*.pt")).name
    ignored = lambda path: subprocess.run(["git", "check-ignore", "-q", path], cwd=root).returncode == 0
    assert not ignored(f"results/worst_case/stages/{kept_name}")
    assert not ignored(f"results/imagenette/stages/{kept_name}")
    for path in ("results/worst_case/stages/0123abcd.pt", "results/imagenette/stages/0123abcd.1f2e.tmp"):
        assert ignored(path), path
