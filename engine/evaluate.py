"""Table-1 style evaluation: accuracy of {attack} × {repair} on a seeded, fixed subset of the CIFAR-10 test set,
with 95 % Wilson intervals and exact McNemar tests on the paired per-image outcomes.

Work goes in chunks of images; after each chunk the per-image outcomes are saved to a state file beside the JSON
output, so an interrupted run resumes where it stopped (same configuration only: the state file is named after a
hash of it).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from .attacks import BPDAEOT, PGD, DefenseAwarePGD
from .data import load_cifar10
from .pipeline import DEFAULT_TASKS, Pipeline, build_objective
from .weights import write_json

Z95 = 1.959963984540054
ATTACKS = ("none", "pgd", "aware", "bpda-eot")
# The task set of each repair; "noise" is the control: the random start of the repair, no optimization.
REPAIRS = {"none": None, "noise": DEFAULT_TASKS, "contrastive": ("contrastive",), "inpainting": ("inpainting",),
           "rotation": ("rotation",), "mtl": DEFAULT_TASKS}


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


@dataclass
class EvalConfig:
    n: int = 1000
    seed: int = 0
    attacks: list[str] = field(default_factory=lambda: ["none", "pgd"])
    repairs: list[str] = field(default_factory=lambda: ["none", "noise", "contrastive", "mtl"])
    attack_eps: float = 8 / 255
    attack_step: float = 2 / 255
    attack_steps: int = 20
    eps_r: float = 16 / 255
    repair_steps: int = 40
    repair_step_size: float = 2 / 255
    views: int = 4
    alpha: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])   # contrastive, inpainting, rotation
    aware_lambda: float = 1.0
    bpda_steps: int = 10
    bpda_eot: int = 2
    bpda_repair_steps: int = 10
    chunk: int = 100

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def eval_subset(n: int, seed: int, root: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images float N×3×32×32, labels N, test-set indices N): a seeded random subset, the same for every run."""
    x, y = load_cifar10("test", root)
    if not 1 <= n <= len(x):
        raise ValueError(f"--n must be between 1 and {len(x)}, not {n}")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx].float() / 255, y[idx], idx


class Evaluator:
    """Runs the attacks and repairs of a config on batches of images; outcome lists keyed "attack/repair"."""

    def __init__(self, pipeline: Pipeline, config: EvalConfig) -> None:
        self.p, self.cfg = pipeline, config
        nets = {name: task.net for name, task in pipeline.objective.tasks.items()}
        alpha = dict(zip(DEFAULT_TASKS, config.alpha))
        self.objectives = {repair: build_objective({t: nets[t] for t in tasks}, alpha, config.views)
                           for repair, tasks in REPAIRS.items() if tasks is not None}
        self.seconds: dict[str, float] = {}

    def repair(self, name: str, x: torch.Tensor, seed: int, steps: int | None = None) -> torch.Tensor:
        if name == "none":
            return x
        from .repair import reverse_attack

        steps = 0 if name == "noise" else (self.cfg.repair_steps if steps is None else steps)
        return reverse_attack(self.objectives[name], x, self.cfg.eps_r, steps, self.cfg.repair_step_size, seed).images

    def attack(self, name: str, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        cfg, model = self.cfg, self.p.classifier
        if name == "none":
            return x
        if name == "pgd":
            return PGD(model, cfg.attack_eps, cfg.attack_step, cfg.attack_steps,
                       generator=torch.Generator().manual_seed(seed))(x, y)
        if name == "aware":
            return DefenseAwarePGD(model, self.objectives["mtl"], cfg.aware_lambda, cfg.attack_eps, cfg.attack_step,
                                   cfg.attack_steps, seed)(x, y)
        if name == "bpda-eot":
            return BPDAEOT(model, lambda xa, s: self.repair("mtl", xa, s, cfg.bpda_repair_steps), cfg.attack_eps,
                           cfg.attack_step, cfg.bpda_steps, cfg.bpda_eot, seed)(x, y)
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")

    def _timed(self, key: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
        return out

    def run_chunk(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, list[int]]:
        outcomes = {}
        x, y = x.to(self.p.device), y.to(self.p.device)
        for attack in self.cfg.attacks:
            x_adv = self._timed(f"attack {attack}", self.attack, attack, x, y, seed)
            for repair in self.cfg.repairs:
                x_rep = self._timed(f"repair {repair}", self.repair, repair, x_adv, seed)
                outcomes[f"{attack}/{repair}"] = (self.p.predict(x_rep) == y).int().tolist()
        return outcomes


def summarize(outcomes: dict[str, list[int]], config: EvalConfig) -> dict:
    rows = []
    for key, values in outcomes.items():
        attack, repair = key.split("/")
        k, n = sum(values), len(values)
        rows.append({"attack": attack, "repair": repair, "accuracy": k / n, "ci95": list(wilson_interval(k, n)),
                     "n": n})
    tests = []
    for attack in config.attacks:
        for other in ("none", "noise", "contrastive"):
            a, b = f"{attack}/{other}", f"{attack}/mtl"
            if a in outcomes and b in outcomes:
                tests.append({"a": a, "b": b, **mcnemar_exact(outcomes[a], outcomes[b])})
    return {"rows": rows, "mcnemar": tests}


def markdown_table(result: dict) -> str:
    repairs = list(dict.fromkeys(r["repair"] for r in result["rows"]))
    attacks = list(dict.fromkeys(r["attack"] for r in result["rows"]))
    cell = {(r["attack"], r["repair"]): r for r in result["rows"]}
    lines = ["| attack \\ repair | " + " | ".join(repairs) + " |", "|---" * (len(repairs) + 1) + "|"]
    for attack in attacks:
        cells = [f"{100 * cell[attack, r]['accuracy']:.1f} ({100 * cell[attack, r]['ci95'][0]:.1f}–"
                 f"{100 * cell[attack, r]['ci95'][1]:.1f})" for r in repairs]
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    lines += ["", "| McNemar (exact) | a right only | b right only | p |", "|---|---|---|---|"]
    lines += [f"| {t['a']} vs {t['b']} | {t['a_only']} | {t['b_only']} | {t['p']:.3g} |" for t in result["mcnemar"]]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    repairs = list(dict.fromkeys(r["repair"] for r in result["rows"]))
    attacks = list(dict.fromkeys(r["attack"] for r in result["rows"]))
    cell = {(r["attack"], r["repair"]): r for r in result["rows"]}
    width = 0.8 / len(repairs)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(attacks), 3.6))
    for j, repair in enumerate(repairs):
        xs = [i + (j - (len(repairs) - 1) / 2) * width for i in range(len(attacks))]
        acc = [100 * cell[a, repair]["accuracy"] for a in attacks]
        err = [[100 * (cell[a, repair]["accuracy"] - cell[a, repair]["ci95"][0]) for a in attacks],
               [100 * (cell[a, repair]["ci95"][1] - cell[a, repair]["accuracy"]) for a in attacks]]
        ax.bar(xs, acc, width, yerr=err, capsize=2, label=repair)
    ax.set_xticks(range(len(attacks)), attacks)
    ax.set_ylabel("accuracy (%), 95 % Wilson CI")
    ax.set_title(f"CIFAR-10, n = {result['n']}")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_eval(pipeline: Pipeline, config: EvalConfig, json_path: Path | None = None, data_root: str | None = None,
             progress: bool = True) -> dict:
    """Evaluate, resuming from ``json_path``'s state file where one with the same configuration exists."""
    for name in config.attacks:
        if name not in ATTACKS:
            raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    for name in config.repairs:
        if name not in REPAIRS:
            raise ValueError(f"unknown repair {name!r}; known: {', '.join(REPAIRS)}")
    x, y, idx = eval_subset(config.n, config.seed, data_root)
    state_path = json_path.with_name(f"{json_path.stem}.partial-{config.key()}.json") if json_path else None
    state = json.loads(state_path.read_text()) if state_path and state_path.exists() else {"chunks": {}}
    evaluator = Evaluator(pipeline, config)
    starts = range(0, config.n, config.chunk)
    start_time = time.time()
    for start in tqdm(starts, desc="eval", unit="chunk", disable=not progress):
        if str(start) in state["chunks"]:
            continue
        chunk = slice(start, start + config.chunk)
        state["chunks"][str(start)] = evaluator.run_chunk(x[chunk], y[chunk], config.seed + start)
        if state_path:
            write_json(state_path, state)
    outcomes: dict[str, list[int]] = {}
    for start in starts:
        for key, values in state["chunks"][str(start)].items():
            outcomes.setdefault(key, []).extend(values)
    result = {"n": config.n, **summarize(outcomes, config), "config": asdict(config),
              "test_indices_sha256": hashlib.sha256(idx.numpy().tobytes()).hexdigest(),
              "seconds": {"total_this_run": round(time.time() - start_time, 1),
                          **{k: round(v, 1) for k, v in evaluator.seconds.items()}},
              "device": str(pipeline.device), "weights": {k: m["sha256"] for k, m in pipeline.manifests.items()}}
    if json_path:
        write_json(json_path, result)
        state_path.unlink(missing_ok=True)
    return result
