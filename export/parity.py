"""One comparison rule for every engine against the PyTorch reference (Polygraphy's): an element fails only where
it exceeds *both* the absolute and the relative tolerance, |a − r| > atol and |a − r| / |r| > rtol.

The tolerances live here, per precision and output, and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


TOLERANCES = {
    # FP32 engines reorder sums, nothing more: 1e-4 absolute on logits and losses of magnitude 0.1–100.
    "fp32": {"logits": Tolerance(atol=1e-4, rtol=1e-3), "loss": Tolerance(atol=1e-4, rtol=1e-3)},
    # FP16 keeps ~3 decimal digits: compared after FP32 IO, on the same outputs.
    "fp16": {"logits": Tolerance(atol=5e-2, rtol=2e-2), "loss": Tolerance(atol=5e-2, rtol=2e-2)},
}


@dataclass
class Comparison:
    output: str
    max_abs: float
    max_rel: float
    n_failed: int
    n: int
    tolerance: Tolerance
    needed_atol: float          # the smallest atol that would pass with this rtol
    needed_rtol: float          # the smallest rtol that would pass with this atol
    worst: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.n_failed == 0

    def report(self) -> str:
        head = (f"{self.output}: {self.n_failed} of {self.n} elements exceed both atol={self.tolerance.atol:g} and "
                f"rtol={self.tolerance.rtol:g} (max_abs {self.max_abs:.3g}, max_rel {self.max_rel:.3g}); would pass "
                f"with atol={self.needed_atol:.3g} or rtol={self.needed_rtol:.3g}")
        rows = [f"  at {w['index']}: reference {w['reference']:.6g}, got {w['got']:.6g} "
                f"(abs {w['abs']:.3g}, rel {w['rel']:.3g})" for w in self.worst]
        return "\n".join([head, *rows])


def compare(output: str, reference: torch.Tensor, candidate: torch.Tensor, tolerance: Tolerance,
            show: int = 5) -> Comparison:
    ref, got = reference.detach().double().cpu(), candidate.detach().double().cpu()
    if ref.shape != got.shape:
        raise ValueError(f"{output}: shape {tuple(got.shape)} differs from the reference's {tuple(ref.shape)}")
    diff = (got - ref).abs()
    rel = torch.where(ref == 0, torch.where(diff == 0, 0.0, float("inf")), diff / ref.abs())
    failed = (diff > tolerance.atol) & (rel > tolerance.rtol)
    needed_atol = diff[rel > tolerance.rtol].max().item() if (rel > tolerance.rtol).any() else 0.0
    needed_rtol = rel[diff > tolerance.atol].max().item() if (diff > tolerance.atol).any() else 0.0
    order = torch.argsort(torch.where(failed, diff, -1.0).flatten(), descending=True)[:show]
    worst = [{"index": tuple(int(i) for i in torch.unravel_index(k, ref.shape)), "reference": ref.flatten()[k].item(),
              "got": got.flatten()[k].item(), "abs": diff.flatten()[k].item(), "rel": rel.flatten()[k].item()}
             for k in order if failed.flatten()[k]]
    return Comparison(output, diff.max().item() if diff.numel() else 0.0,
                      rel[torch.isfinite(rel)].max().item() if torch.isfinite(rel).any() else 0.0,
                      int(failed.sum()), diff.numel(), tolerance, needed_atol, needed_rtol, worst)


def agreement(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> float:
    """Fraction of images whose predicted class is the same."""
    return (reference_logits.argmax(1) == candidate_logits.argmax(1)).float().mean().item()
