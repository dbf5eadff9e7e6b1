"""The repair's settings, stated once: their defaults, their ranges and the one check of them.

Every command builds a ``RepairSettings`` once from its options (runtime/cli.py's ``setting_option`` makes those
options from the fields below, defaults and ranges included), and every engine takes it as it is: the PyTorch
reference (engine/folder.py), the bundle (runtime/bundle.py), the service and its Ray replicas. Its ``record()``
opens the ``config`` section of a report and the ``repair`` section of the service's ``/v1/info``. Torch-free, so
that the runtime stands on it as the engine does.

Example::

    settings = RepairSettings(steps=10, seed=None)     # ten steps, fresh draws for every batch (`--seed random`)
    settings.batch_seed()                              # the seed one batch is repaired with
    DEFAULTS.eps                                       # 16/255, the bound of `cli.py repair`
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace

from .draws import deployed_seed, seed_record

MAX_EPS = 64 / 255          # beyond this an L∞ "repair" repaints the image (measured: --eps 2 turned it to noise)


def _range(low: float | None = None, high: float | None = None, open_ends: bool = False) -> dict:
    """A field's range, as metadata: what ``check`` enforces and runtime/cli.py's options show."""
    return {"range": (low, high, open_ends)}


@dataclass(frozen=True)
class RepairSettings:
    """How one image is repaired (and how many at once), whatever the engine: the bound, the steps, the draws.

    Mao et al.'s reference settings are the defaults: ε_r = 16/255, 40 sign-gradient steps of 2/255. The results do
    not depend on ``batch_size`` (principle 3, docs/design.md); a report records it because the speed does.
    """
    eps: float = field(default=16 / 255, metadata=_range(0))           # the L∞ bound of the reverse perturbation r
    steps: int = field(default=40, metadata=_range(0))                 # 0: the random start alone (the noise control)
    step_size: float = field(default=2 / 255, metadata=_range(0))
    seed: int | None = 0            # the draws' seed; None: a fresh one for every batch (`--seed random`)
    batch_size: int = field(default=64, metadata=_range(1))
    early_exit: bool = True         # an image leaves the loop once its (clean-level) objective is zero
    gate_fpr: float | None = field(default=None, metadata=_range(0, 1, open_ends=True))   # None: repair every input

    def __post_init__(self) -> None:
        for f in fields(self):
            check(f.name, getattr(self, f.name))

    def batch_seed(self) -> int:
        """The seed of one batch: ``seed``, or a fresh one from the operating system where it is None."""
        return deployed_seed(self.seed)

    def record(self) -> dict:
        """What a report records of these settings, in its order (the gate is recorded with its threshold by the
        engine that computes it)."""
        return {**{k: v for k, v in asdict(self).items() if k != "gate_fpr"}, "seed": seed_record(self.seed)}


FIELDS = {f.name: f for f in fields(RepairSettings)}


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check(name: str, value) -> None:
    """ValueError (naming the setting) where ``value`` is not a valid ``name``."""
    if name == "seed":
        if value is not None and not (_integer(value) and -2 ** 63 <= value < 2 ** 63):
            raise ValueError(f"seed: {value!r} is not a 64-bit integer or None (random)")
        return
    if name == "early_exit":
        if not isinstance(value, bool):
            raise ValueError(f"early_exit: {value!r} is not True or False")
        return
    if value is None and FIELDS[name].default is None:
        return
    integer = isinstance(FIELDS[name].default, int)
    number = _integer(value) or (not integer and isinstance(value, numbers.Real) and not isinstance(value, bool))
    if not number or not math.isfinite(value):
        raise ValueError(f"{name}: {value!r} is not {'an integer' if integer else 'a finite number'}")
    low, high, open_ends = FIELDS[name].metadata["range"]
    below = low is not None and (value <= low if open_ends else value < low)
    above = high is not None and (value >= high if open_ends else value > high)
    if below or above:
        raise ValueError(f"{name}: {value!r} is not in {describe_range(name)}")


def describe_range(name: str) -> str:
    low, high, open_ends = FIELDS[name].metadata["range"]
    if high is None:
        return f"x{'>' if open_ends else '>='}{low}"
    return f"{low}<x<{high}" if open_ends else f"{low}<=x<={high}"


DEFAULTS = RepairSettings()


def bounded(settings: RepairSettings, allow_large_eps: bool = False) -> tuple[RepairSettings, str | None]:
    """(the settings to run, a note to print) for what a user asked: ValueError where ``eps`` is beyond MAX_EPS
    (unless allowed), and no steps where ``eps`` is 0 (nothing to descend in)."""
    eps = settings.eps
    if eps > MAX_EPS and not allow_large_eps:
        raise ValueError(f"{eps:.4g} (= {eps * 255:.3g}/255) is beyond 64/255, where the repair repaints images "
                         "instead of nudging them; pass --allow-large-eps if you mean it")
    if eps == 0:
        return replace(settings, steps=0), ("--eps 0: no repair (the images are written unchanged, with their "
                                            "predictions)")
    return settings, None
