"""A folder of stage outputs, each saved under a key that names everything it depends on.

A worst-case evaluation runs a dozen expensive stages per chunk of images (AutoAttack on the classifier alone takes
~30 s per CIFAR-10 image on one core). Keying each stage's output by its own inputs — the images, the seed, the
weights, that stage's budget — instead of by the whole run's configuration means that a rerun recomputes only what
changed: a killed run continues from its last finished stage, a probe with more APGD iterations reuses AutoAttack and
Square, and a run over 500 images reuses the first 500 of a run over 1,000 (same chunks).

Example::

    cache = StageCache(Path("results/worst_case/stages"))
    x_adv = cache.run({"stage": "autoattack", "images": "…", "eps": 8 / 255}, lambda: attack(x, y)).output
"""
from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

# the name of every file that holds a chunk's outcomes starts so: .gitignore keeps these and ignores the other stages
CHUNKS = "chunk-"

# bumped when the code of an attack or of the repair changes what it returns, so that older outputs are not reused
# (the versions of this package, torch and AutoAttack's package are in every key too). 2: APGD's random start seeded
VERSION = 2


def _environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None
    return {"cache": VERSION, "torch": torch.__version__, **{p: installed(p) for p in ("mssl-repair", "pyautoattack")}}


def fingerprint(parts: dict) -> str:
    """A short hash of a JSON-able description."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


class Stage(NamedTuple):
    output: Any
    seconds: float          # what computing it took (when reused: in the run that computed it)
    reused: bool


class StageFiles:
    """A folder of kept outputs, each a file of bytes; a kill while writing one leaves no half-written file behind,
    and two writers (even on two machines sharing the folder) never write the same file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def read(self, name: str) -> bytes | None:
        """The file's bytes; None where there is none, or (with a warning: it is computed again) it cannot be read."""
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            warnings.warn(f"{self.folder / name} could not be read ({e}); computing that stage again")
            return None

    def write(self, name: str, data: bytes) -> None:
        partial = self.folder / f"{Path(name).stem}.{uuid.uuid4().hex}.tmp"
        partial.write_bytes(data)
        partial.replace(self.folder / name)


class StageCache:
    """``run(parts, compute)`` returns the Stage computed, or read back where an output with the same ``parts`` was
    saved before. ``folder=None`` keeps nothing. ``hits`` and ``misses`` count the calls.

    ``prefix`` starts every file's name: a chunk's outcomes (a few kilobytes, the raw data of a table) are kept as
    ``chunk-*.pt``, which the repository keeps, beside stages of attacked images (megabytes), which it ignores; so a
    run that spans several machines or sessions goes on from its committed chunks. ``files``: where the bytes are
    kept (default: ``StageFiles(folder)``; a Ray task's cache keeps them in its driver's folder, engine/eval/on_ray.py).
    """

    def __init__(self, folder: Path | None, prefix: str = "", files: StageFiles | None = None) -> None:
        self.folder, self.prefix = folder, prefix
        self.hits = self.misses = 0
        self.environment = _environment()
        self.files = files or (StageFiles(folder) if folder is not None else None)

    def name(self, parts: dict) -> str:
        """The name of the file ``parts``' output is kept in (without its prefix and suffix)."""
        return fingerprint({**parts, "environment": self.environment})

    def file(self, parts: dict | None) -> str | None:
        """The file ``parts``' output is kept in (None: nothing is kept)."""
        if self.files is None or parts is None:
            return None
        return f"{self.prefix}{self.name(parts)}.pt"

    def get(self, parts: dict | None) -> Stage | None:
        """The output kept under ``parts``, or None; nothing is computed (nor counted)."""
        return self._kept(self.file(parts))

    def _kept(self, file: str | None) -> Stage | None:
        data = self.files.read(file) if file is not None else None
        saved = None if data is None else self._load(data, file)
        return None if saved is None else Stage(saved["output"], saved["seconds"], True)

    def run(self, parts: dict | None, compute: Callable[[], Any]) -> Stage:
        """``parts=None``: computed and not kept (what it depends on cannot be named)."""
        saved = self._kept(self.file(parts))
        if saved is not None:
            self.hits += 1
            return saved
        self.misses += 1
        start = time.perf_counter()
        output = compute()
        seconds = time.perf_counter() - start
        self.put(parts, output, seconds)
        return Stage(output, seconds, False)

    def put(self, parts: dict | None, output: Any, seconds: float) -> None:
        """Keep ``output`` (what computing it took: ``seconds``) under ``parts``; nothing where ``parts`` is None."""
        file = self.file(parts)
        if file is not None:
            buffer = io.BytesIO()
            torch.save({"output": output, "seconds": seconds, "parts": json.dumps(parts, sort_keys=True)}, buffer)
            self.files.write(file, buffer.getvalue())

    def _load(self, data: bytes, file: str) -> dict | None:
        """A kept output, or None (with a warning: it is computed again) where its bytes cannot be read."""
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:        # a damaged or foreign file: torch raises several kinds
            where = self.folder / file if self.folder else file
            warnings.warn(f"{where} could not be read ({type(e).__name__}: {e}); computing that stage again")
            return None
