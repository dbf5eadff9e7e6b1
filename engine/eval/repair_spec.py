"""Names of the repairs an evaluation compares: ``BASE[:clean][:gate]``.

BASE is ``none`` (no repair), ``noise`` (the repair's random start only: the control every repair must beat),
``mtl`` (the three independent networks), ``mtl-head`` (the three heads on the classifier's backbone),
``mtl-joint`` (the three heads and label consistency, for a jointly trained model), one task
(``rotation``, ``contrastive-head``, ...) or tasks joined by ``+`` (``contrastive-head+rotation-head``).
``:clean`` uses the clean-level objective instead of the plain sum; ``:gate`` repairs only the inputs the gate flags
(for ``noise:gate``: adds noise only to them, the control of a gated repair); ``:exit`` lets an image leave the loop
once its objective is zero (engine.repair.reverse_attack's early exit, the default of ``cli.py repair``; only a
``:clean`` objective reaches zero).

Examples: ``mtl``, ``mtl-head:clean``, ``mtl-head:clean:gate``, ``noise:gate``, ``mtl:clean:exit``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..models.heads import HEAD_TASKS
from ..pipeline import DEFAULT_TASKS
from ..tasks import TASKS

# mtl-joint: the heads of a jointly trained model (engine/train/joint.py) and label consistency on its classifier
TASK_SETS = {"mtl": DEFAULT_TASKS, "mtl-head": HEAD_TASKS, "mtl-joint": (*HEAD_TASKS, "consistency")}
MODIFIERS = ("clean", "gate", "exit")


@dataclass(frozen=True)
class RepairSpec:
    name: str
    tasks: tuple[str, ...]          # the objective's tasks; () for none and noise
    optimize: bool                  # False: none or noise (no optimization steps)
    noise: bool                     # the random start (every repair but none has it)
    objective: str = "plain"        # plain | clean
    gated: bool = False
    early_exit: bool = False


def parse_repair(name: str) -> RepairSpec:
    """A RepairSpec from its name; ValueError naming what is wrong."""
    base, *mods = name.split(":")
    bad = [m for m in mods if m not in MODIFIERS] + [m for m in set(mods) if mods.count(m) > 1]
    if bad:
        raise ValueError(f"repair {name!r}: unknown or repeated modifier(s) {', '.join(bad)}; "
                         f"allowed: {', '.join(':' + m for m in MODIFIERS)}")
    gated = "gate" in mods
    if base in ("none", "noise"):
        if "clean" in mods or "exit" in mods or (base == "none" and gated):
            raise ValueError(f"repair {name!r}: {base} has no objective" + ("" if base == "noise" else " or gate"))
        return RepairSpec(name, (), False, base == "noise", gated=gated)
    if "exit" in mods and "clean" not in mods:
        raise ValueError(f"repair {name!r}: :exit needs :clean (only the clean-level objective reaches zero)")
    tasks = TASK_SETS.get(base) or tuple(base.split("+"))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or len(set(tasks)) != len(tasks):
        raise ValueError(f"repair {name!r}: unknown or repeated task(s) {', '.join(unknown) or base}; "
                         f"use none, noise, {', '.join(TASK_SETS)}, or tasks from {', '.join(TASKS)} joined by +")
    return RepairSpec(name, tasks, True, True, "clean" if "clean" in mods else "plain", gated, "exit" in mods)
