"""Several processes running one command over the same folder split its chunks between them.

`cli.py eval` and `cli.py worst-case` keep each chunk's work in a folder (engine/stage_cache.py). Before a process
computes a chunk it *claims* it: it creates ``<name>.claim`` in that folder, which fails where another process
already has. So the same command started twice (on two cores, or on several machines that share the folder) computes
every chunk once; each process takes the chunks nobody holds, then waits for the others' and reads them back, and
every process ends with the whole table.

A claim names its holder (machine and process id) and is removed when the chunk is done. One left behind by a
killed process on this machine is taken over (its process is gone); one from another machine is waited for, with its
path in the message, since its process cannot be checked from here: delete the file if that process is gone.

Example::

    results = for_each_claimed(starts, Claims(folder), lambda s: f"chunk-{s}", lambda s: compute(s))
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Claims:
    """Claims on named pieces of work in ``folder`` (None: no folder, every claim granted at once)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.claim"

    @contextmanager
    def hold(self, name: str) -> Iterator[bool]:
        """True inside where this process holds ``name`` (released on leaving, even by an exception); False where
        another live process does."""
        if self.folder is None:
            yield True
            return
        path = self.path(name)
        if not self._create(path):
            if not self._stale(path):
                yield False
                return
            path.unlink(missing_ok=True)
            if not self._create(path):          # another process took the stale claim over first
                yield False
                return
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)

    def _create(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self.me, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
        return True

    def _stale(self, path: Path) -> bool:
        """A claim of a process on this machine that no longer runs (or an unreadable claim: a kill while writing
        it). A claim from another machine is never stale from here."""
        try:
            holder = json.loads(path.read_text())
        except FileNotFoundError:
            return True                         # released meanwhile
        except ValueError:
            return time.time() - path.stat().st_mtime > 60
        if holder.get("host") != self.me["host"]:
            return False
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:                 # alive, another user's
            return False
        return False

    def holder(self, name: str) -> str:
        try:
            holder = json.loads(self.path(name).read_text())
            return f"{holder['host']}:{holder['pid']} since {holder['since']}"
        except (OSError, ValueError, KeyError):
            return "another process"


def for_each_claimed(items: list[T], claims: Claims, name: Callable[[T], str], work: Callable[[T], R],
                     poll_seconds: float = 30.0, say: Callable[[str], None] | None = None) -> list[R]:
    """``work(item)`` for every item, in order where no other process holds it; an item another process holds is
    come back to after the rest, waiting ``poll_seconds`` between rounds, until it is released (its output is then
    kept, so that ``work`` reads it back) — the results in the items' order."""
    say = say or (lambda text: print(text, file=sys.stderr))
    results: dict[int, R] = {}
    waiting = list(range(len(items)))
    while waiting:
        held_elsewhere = []
        for i in waiting:
            with claims.hold(name(items[i])) as mine:
                if mine:
                    results[i] = work(items[i])
                else:
                    held_elsewhere.append(i)
        if held_elsewhere:
            holders = sorted({claims.holder(name(items[i])) for i in held_elsewhere})
            say(f"waiting for {len(held_elsewhere)} chunk(s) that other processes are computing ({'; '.join(holders)}; "
                f"claims in {claims.folder})")
            time.sleep(poll_seconds)
        waiting = held_elsewhere
    return [results[i] for i in range(len(items))]
