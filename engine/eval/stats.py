"""The two statistics every table of this project reports: a 95 % Wilson interval for each accuracy, and an exact
McNemar test for two repairs (or a repair and the base) judged on the same images — paired outcomes, so only the
images on which the two disagree count."""
from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959963984540054           # the two-sided 95 % quantile of the standard normal


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson, 1927)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # The interval always holds p; the clamp keeps rounding (k = 0 gives 3e-17) from saying otherwise.
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact (binomial) two-sided McNemar test on paired outcomes: only the discordant pairs count.
    Returns the counts a-only (a right, b wrong), b-only and the p-value."""
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n = a_only + b_only
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p": 1.0}
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2 ** n
    return {"a_only": a_only, "b_only": b_only, "p": min(1.0, 2 * tail)}
