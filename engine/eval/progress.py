"""The progress bar of a chunked evaluation, fed the same way whether its chunks run here or as Ray tasks
(engine/eval/on_ray.py): a chunk read back leaves the count, so that the ETA is that of the work left."""
from __future__ import annotations

from typing import Callable

from tqdm import tqdm


class BarProgress:
    """``bar`` counts chunks (``weight`` None) or the stages of each chunk (``weight(i)``: chunk i's), which the
    chunk's work reports with ``begin(stage)`` and ``advance(stage, reused)``."""

    def __init__(self, bar: tqdm, weight: Callable[[int], int] | None = None) -> None:
        self.bar, self.weight = bar, weight

    def skipped(self, count: int) -> None:
        self.bar.total -= count
        self.bar.refresh()

    def chunk_done(self, i: int, reused: bool) -> None:
        """Chunk i finished (``reused``: read back whole)."""
        if reused:
            self.skipped(self.weight(i) if self.weight else 1)
        elif self.weight is None:
            self.bar.update(1)

    def begin(self, stage: str) -> None:
        self.bar.set_postfix_str(stage)

    def advance(self, stage: str, reused: bool) -> None:
        if reused:
            self.skipped(1)
        else:
            self.bar.update(1)

    def forget(self, reused: list[bool]) -> None:
        """A chunk's stages as an earlier run of it reported them (``reused`` each), out of the count again: the
        chunk is run again, and reports them anew."""
        self.bar.total += sum(reused)
        self.bar.update(-(len(reused) - sum(reused)))

    def say(self, text: str) -> None:
        self.bar.write(text)
