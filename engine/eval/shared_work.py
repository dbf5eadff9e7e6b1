"""Several processes running one command over the same folder split its chunks between them.

`cli.py eval` and `cli.py worst-case` keep each chunk's work in a folder (engine/eval/stage_cache.py). Before a process
computes a chunk it *claims* it: it creates ``<name>.claim`` in that folder, which fails where another process
already has. So the same command started twice (on two cores, or on several machines that share the folder) computes
every chunk once; each process takes the chunks nobody holds, then waits for the others' and reads them back, and
every process ends with the whole table.

A claim names its holder (machine, process id, and on Linux the boot and the process's start time) and is removed
when the chunk is done. One left behind by a killed process on this machine is taken over (its process is gone, or
its pid now another's); one from another machine is waited for, with its path in the message, since its process
cannot be checked from here: delete the file if that process is gone.

Example::

    results = for_each_claimed(starts, Claims(folder), lambda s: f"chunk-{s}", lambda s: compute(s))
"""
from __future__ import annotations

import fcntl
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


def _identity() -> dict:
    """This process, as a claim names it: machine and pid, and (Linux) the boot and the process's start time, so that
    a pid reused after a reboot or by a later process is not taken for the claim's holder."""
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        me["boot"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        me["start"] = _start_time(os.getpid())
    except OSError:
        pass
    return me


def _start_time(pid: int) -> str:
    """The process's start (clock ticks since boot, /proc/PID/stat's 22nd field); OSError where there is none."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()[19]


class Claims:
    """Claims on named pieces of work in ``folder`` (None: no folder, every claim granted at once)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.me = _identity()

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
        if not (self._create(path) or self._take_over(path)):
            yield False
            return
        try:
            yield True
        finally:
            if self._read(path) == self.me:     # never remove a claim that is not (or no longer) this process's
                path.unlink(missing_ok=True)

    def _create(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self.me, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
        return True

    def _take_over(self, path: Path) -> bool:
        """Replace a stale claim with this process's. One process of this machine at a time decides (a lock file), and
        decides again under the lock, so that two cannot both take the same claim over."""
        with open(self.folder / ".takeover.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self._stale(path):
                return False
            path.unlink(missing_ok=True)
            return self._create(path)

    @staticmethod
    def _read(path: Path) -> dict | None:
        try:
            holder = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        holder.pop("since", None)
        return holder

    def _stale(self, path: Path) -> bool:
        """A claim released meanwhile, one of a process of this machine that no longer runs (its pid gone, or taken
        by a later process or a reboot), or one left unreadable for a minute (a kill while writing it). A claim from
        another machine is never stale from here."""
        try:
            text, age = path.read_text(), time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        try:
            holder = json.loads(text)
        except ValueError:
            return age > 60
        if holder.get("host") != self.me["host"]:
            return False
        if "boot" in holder and holder["boot"] != self.me.get("boot"):
            return True
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:                 # alive, another user's
            pass
        try:
            return "start" in holder and _start_time(int(holder["pid"])) != holder["start"]
        except OSError:
            return True

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
