"""Table-1 style evaluation: accuracy of {attack} × {repair} on a seeded, fixed subset of the CIFAR-10 test set,
with 95 % Wilson intervals and exact McNemar tests on the paired per-image outcomes.

Work goes in chunks of images; each chunk's per-image outcomes are kept (engine/eval/stage_cache.py, in ``stages/``
beside the JSON output) under what they depend on, so an interrupted run resumes where it stopped, a run over more
images reuses the chunks it shares with a smaller one, and with ``ray`` the chunks run as Ray tasks over a cluster's
workers (engine/eval/on_ray.py).
"""
from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from runtime.files import write_json
from runtime.settings import DEFAULTS

from ..attacks import BPDAEOT, PGD, AutoAttackAPGD, DefenseAwarePGD
from ..calibration import calibrate_command
from ..data.model_sets import model_set_split
from ..defended import DefendedClassifier
from ..models.heads import base_task
from ..models.provenance import is_preview
from ..models.weights import model_input
from ..pipeline import DEFAULT_TASKS, Gate, Pipeline, build_objective
from ..repair import RepairResult
from .on_ray import Chunk, RayRun, chunk_label, run_chunks, run_chunks_here
from .progress import BarProgress
from .repair_spec import parse_repair
from .stage_cache import CHUNKS, StageCache, fingerprint
from .stats import mcnemar_exact, wilson_interval

# autoattack: APGD-CE + APGD-T on the classifier (transfer: the repair then runs on its images);
# autoattack-bpda: APGD-CE through the repair, BPDA (the repair is the identity backward), EOT over its randomness
ATTACKS = ("none", "pgd", "aware", "bpda-eot", "autoattack", "autoattack-bpda")
ADAPTIVE_ATTACKS = ("aware", "bpda-eot", "autoattack-bpda")      # aimed at the config's defense


@dataclass
class EvalConfig:
    n: int = 1000
    seed: int = 0
    attacks: list[str] = field(default_factory=lambda: ["none", "pgd"])
    repairs: list[str] = field(default_factory=lambda: ["none", "noise", "contrastive", "mtl"])
    attack_eps: float = 8 / 255
    attack_step: float = 2 / 255
    attack_steps: int = 20
    eps_r: float = DEFAULTS.eps
    repair_steps: int = DEFAULTS.steps
    repair_step_size: float = DEFAULTS.step_size
    views: int = 4
    alpha: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])   # contrastive, inpainting, rotation
    level: float = 0.5                  # the clean-level objective's quantile of clean losses
    gate_fpr: float = 0.05
    gate_tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    defense: str = "mtl"                # the repair the adaptive attacks (aware, bpda-eot) are aimed at
    aware_lambda: float = 1.0
    bpda_steps: int = 10
    bpda_eot: int = 2
    bpda_repair_steps: int = 10
    autoattack_iters: int = 100         # AutoAttack's standard version: 100 iterations, 9 target classes
    autoattack_targets: int = 9
    autoattack_eot: int = 1             # gradient samples per APGD step of autoattack-bpda
    chunk: int = 100


def eval_subset(n: int, seed: int, root: str | None = None,
                inputs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images float N×3×S×S, labels N, test-set indices N): a seeded random subset of the test split of ``root``
    (None: CIFAR-10) at the model set's size (``inputs``, default CIFAR-10's), the same for every run."""
    x, y = model_set_split(root, "test", inputs or model_input({}), labelled=True)
    if not 1 <= n <= len(x):
        raise ValueError(f"--n must be between 1 and {len(x)}, not {n}")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx].float() / 255, y[idx], idx


def repairs_used(config: EvalConfig) -> list[str]:
    """The config's repairs, and its defense where an adaptive attack aims at it."""
    adaptive = any(a in ADAPTIVE_ATTACKS for a in config.attacks)
    return list(dict.fromkeys([*config.repairs, *([config.defense] if adaptive else [])]))


def tasks_needed(config: EvalConfig) -> list[str]:
    """Every task a config's repairs, gate and defense use (the pipeline must load them)."""
    specs = [parse_repair(name) for name in repairs_used(config)]
    tasks = [t for spec in specs for t in spec.tasks]
    if any(spec.gated for spec in specs):
        tasks += config.gate_tasks
    return list(dict.fromkeys(tasks)) or list(DEFAULT_TASKS)


def needs_calibration(config: EvalConfig) -> bool:
    return any(s.objective == "clean" or s.gated for s in map(parse_repair, repairs_used(config)))


class Evaluator:
    """Runs the attacks and repairs of a config on batches of images; outcome lists keyed "attack/repair"."""

    def __init__(self, pipeline: Pipeline, config: EvalConfig) -> None:
        self.p, self.cfg = pipeline, config
        self.specs = {name: parse_repair(name) for name in repairs_used(config)}
        if config.defense in self.specs and not self.specs[config.defense].optimize:
            raise ValueError(f"the defense the adaptive attacks aim at must be a repair, not {config.defense!r}")
        cal = pipeline.calibration
        uncalibrated = sorted({t for spec in self.specs.values() if spec.objective == "clean" or spec.gated
                               for t in (*spec.tasks, *(config.gate_tasks if spec.gated else ()))
                               if cal is None or t not in cal.losses})
        if uncalibrated:
            held = list(cal.losses) if cal is not None else []
            raise ValueError(f"the :clean and :gate repairs need clean-loss statistics of {', '.join(uncalibrated)}, "
                             "which the calibration does not hold; run `"
                             f"{calibrate_command(list(dict.fromkeys([*held, *uncalibrated])), config.views)} "
                             "--out FILE` and pass --calibration FILE")
        self.nets = {name: task.net for name, task in pipeline.objective.tasks.items()}
        alpha = {t: dict(zip(DEFAULT_TASKS, config.alpha)).get(base_task(t), 1.0) for t in self.nets}
        self.objectives = {name: build_objective({t: self.nets[t] for t in spec.tasks}, alpha, config.views, cal,
                                                 config.level if spec.objective == "clean" else None)
                           for name, spec in self.specs.items() if spec.optimize}
        self.gate = Gate(cal, config.gate_tasks, config.gate_fpr) if any(s.gated for s in self.specs.values()) \
            else None
        self.seconds: dict[str, float] = {}       # of the chunk being run

    def repair(self, name: str, x: torch.Tensor, seed: int, steps: int | None = None) -> RepairResult:
        spec = self.specs[name]
        if not spec.noise:
            return RepairResult(x, x.new_zeros(0, len(x)))
        steps = 0 if not spec.optimize else (self.cfg.repair_steps if steps is None else steps)
        return self.p.repair_with_trace(x, self.cfg.eps_r, steps, self.cfg.repair_step_size, seed,
                                        self.objectives.get(name), self.gate if spec.gated else None,
                                        early_exit=spec.early_exit)

    def aware_objective(self, name: str | None = None) -> torch.nn.Module:
        """What the defense-aware attacker keeps low against repair ``name`` (default: the config's defense): the
        gate's score where it is gated (what decides its output: an attacked image the gate passes is not
        repaired), else its own repair objective."""
        name = name or self.cfg.defense
        if not self.specs[name].gated:
            return self.objectives[name]
        tasks = self.gate.tasks
        return build_objective({t: self.nets[t] for t in tasks}, self.gate.calibration.score_weights(tasks),
                               self.cfg.views)

    def attack(self, name: str, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        cfg, model = self.cfg, self.p.classifier
        if name == "none":
            return x
        if name == "pgd":
            return PGD(model, cfg.attack_eps, cfg.attack_step, cfg.attack_steps,
                       generator=torch.Generator().manual_seed(seed))(x, y)
        if name == "aware":
            return DefenseAwarePGD(model, self.aware_objective(), cfg.aware_lambda, cfg.attack_eps, cfg.attack_step,
                                   cfg.attack_steps, seed)(x, y)
        if name == "bpda-eot":
            return BPDAEOT(model, lambda xa, s: self.repair(cfg.defense, xa, s, cfg.bpda_repair_steps).images,
                           cfg.attack_eps, cfg.attack_step, cfg.bpda_steps, cfg.bpda_eot, seed)(x, y)
        if name == "autoattack":
            return AutoAttackAPGD(model, cfg.attack_eps, iters=cfg.autoattack_iters, targets=cfg.autoattack_targets,
                                  seed=seed)(x, y)
        if name == "autoattack-bpda":
            defended = DefendedClassifier(self.p, bpda=True, seed=seed, repair=lambda xa, s: self.repair(
                cfg.defense, xa, s, cfg.bpda_repair_steps).images)
            return AutoAttackAPGD(defended, cfg.attack_eps, ("apgd-ce",), cfg.autoattack_iters,
                                  eot=cfg.autoattack_eot, seed=seed)(x, y)
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")

    def _timed(self, key: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
        return out

    def run_chunk(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, dict]:
        """Per "attack/repair": per-image correctness, the summed per-task SSL losses of the final images (every
        task loaded, so over-minimization shows against the clean level), how many the gate sent to repair, and the
        seconds each attack and repair took on this chunk (saved with it, so a resumed run still counts them)."""
        correct, loss_sums, repaired = {}, {}, {}
        self.seconds = {}
        x, y = x.to(self.p.device), y.to(self.p.device)
        for attack in self.cfg.attacks:
            x_adv = self._timed(f"attack {attack}", self.attack, attack, x, y, seed)
            for repair in self.cfg.repairs:
                key = f"{attack}/{repair}"
                result = self._timed(f"repair {repair}", self.repair, repair, x_adv, seed)
                correct[key] = (self.p.predict(result.images) == y).int().tolist()
                with torch.no_grad():
                    losses = self.p.task_losses(result.images, seed)
                loss_sums[key] = {t: loss.double().sum().item() for t, loss in losses.items()}
                repaired[key] = (0 if not self.specs[repair].noise else
                                 len(x) if result.repaired is None else int(result.repaired.sum()))
        return {"correct": correct, "loss_sums": loss_sums, "repaired": repaired, "seconds": self.seconds}


def summarize(outcomes: dict[str, dict], config: EvalConfig) -> dict:
    """Rows (accuracy, Wilson CI, mean SSL loss per task, fraction repaired) and McNemar tests of every repair
    against the noise control (and the gated noise control, for gated repairs) and against no repair."""
    rows = []
    for key, values in outcomes["correct"].items():
        attack, repair = key.split("/")
        k, n = sum(values), len(values)
        rows.append({"attack": attack, "repair": repair, "accuracy": k / n, "ci95": list(wilson_interval(k, n)),
                     "n": n, "repaired_fraction": outcomes["repaired"][key] / n,
                     "ssl_loss_mean": {t: v / n for t, v in outcomes["loss_sums"][key].items()}})
    tests = []
    for attack in config.attacks:
        for repair in config.repairs:
            spec = parse_repair(repair)
            controls = ["none", "noise"] + (["noise:gate"] if spec.gated else [])
            for control in controls if spec.optimize else []:
                a, b = f"{attack}/{control}", f"{attack}/{repair}"
                if a in outcomes["correct"]:
                    tests.append({"a": a, "b": b, **mcnemar_exact(outcomes["correct"][a], outcomes["correct"][b])})
    return {"rows": rows, "mcnemar": tests}


def markdown_table(result: dict) -> str:
    """Accuracy table (a row per repair, a column per attack), McNemar tests, and the mean SSL losses."""
    repairs = list(dict.fromkeys(r["repair"] for r in result["rows"]))
    attacks = list(dict.fromkeys(r["attack"] for r in result["rows"]))
    cell = {(r["attack"], r["repair"]): r for r in result["rows"]}
    pct = lambda v: f"{100 * v:.1f}"
    lines = ["| repair | " + " | ".join(f"{a} (95 % CI) | {a} repaired" for a in attacks) + " |",
             "|---" * (2 * len(attacks) + 1) + "|"]
    for repair in repairs:
        cells = [f"{pct(c['accuracy'])} ({pct(c['ci95'][0])}–{pct(c['ci95'][1])}) | {pct(c['repaired_fraction'])} %"
                 for c in (cell[a, repair] for a in attacks)]
        lines.append(f"| {repair} | " + " | ".join(cells) + " |")
    lines += ["", "| McNemar (exact) | a right only | b right only | p |", "|---|---|---|---|"]
    lines += [f"| {t['a']} vs {t['b']} | {t['a_only']} | {t['b_only']} | {t['p']:.3g} |" for t in result["mcnemar"]]
    tasks = list(result["rows"][0]["ssl_loss_mean"])
    lines += ["", "| mean SSL loss of the final images | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    lines += [f"| {r['attack']}/{r['repair']} | " + " | ".join(f"{r['ssl_loss_mean'][t]:.4g}" for t in tasks) + " |"
              for r in result["rows"]]
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


def calibration_key(pipeline: Pipeline) -> str | None:
    """A short hash of the clean-loss statistics the pipeline's :clean and :gate repairs read (None: none loaded)."""
    if pipeline.calibration is None:
        return None
    return fingerprint({t: v.tolist() for t, v in sorted(pipeline.calibration.losses.items())})


def classifier_key(pipeline: Pipeline) -> str:
    """The classifier's weights: its file's sha256, or (a module passed in, which has no file) its parameters'."""
    sha = pipeline.manifests.get("classifier", {}).get("sha256")
    if sha:
        return sha
    digest = hashlib.sha256(type(pipeline.classifier).__qualname__.encode())
    for name, tensor in sorted(pipeline.classifier.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def chunk_images(idx: torch.Tensor, start: int, chunk: int, data_root: str | None) -> str:
    """A name for the chunk of ``chunk`` test images from ``start`` (their indices in the split, and the data)."""
    return fingerprint({"test_indices": idx[start:start + chunk].tolist(), "data": str(data_root)})


def run_parts(pipeline: Pipeline, config: EvalConfig) -> dict:
    """What every chunk's outcomes depend on besides its images and seed: the configuration but for the number of
    images and the chunk size, the weights (the classifier's parameters where it came from no file), the calibration
    and the forward engine (its precision too). Computed once a run: hashing a classifier's parameters is not free."""
    return {"stage": "eval chunk", "config": {k: v for k, v in asdict(config).items() if k not in ("n", "chunk")},
            "weights": {k: m["sha256"] for k, m in sorted(pipeline.manifests.items())},
            "classifier": classifier_key(pipeline), "calibration": calibration_key(pipeline),
            "device": str(pipeline.device), "backend": pipeline.backend.name,
            "precision": getattr(pipeline.backend, "precision", "fp32")}


def eval_chunk_task(pipeline: Pipeline, config: EvalConfig, cache: StageCache, note: Callable, x: torch.Tensor,
                    y: torch.Tensor, seed: int) -> dict:
    """A chunk of the eval as a Ray task (engine/eval/on_ray.py)."""
    return Evaluator(pipeline, config).run_chunk(x, y, seed)


def run_eval(pipeline: Pipeline, config: EvalConfig, json_path: Path | None = None, data_root: str | None = None,
             progress: bool = True, cache_dir: Path | None = None, ray: RayRun | None = None) -> dict:
    """Evaluate, chunk by chunk. Each chunk's outcomes are kept in ``cache_dir`` (default: ``stages/`` beside
    ``json_path``; none without either) under what they depend on (``run_parts``, the images, the seed), so a killed run
    resumes and a run over more images reuses the chunks it shares with a smaller one; ``ray``: the chunks run as Ray
    tasks (engine/eval/on_ray.py), to the same table."""
    for name in config.attacks:
        if name not in ATTACKS:
            raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    for name in [*config.repairs, config.defense]:
        parse_repair(name)
    x, y, idx = eval_subset(config.n, config.seed, data_root, pipeline.inputs)
    cache = StageCache(cache_dir or (json_path.parent / "stages" if json_path else None), prefix=CHUNKS)
    for old in json_path.parent.glob(f"{json_path.stem}.partial-*.json") if json_path else ():
        warnings.warn(f"{old} is the saved progress of an older version of `eval`, which this one does not read: its "
                      f"chunks are computed again (into {cache.folder}); delete the file once this run is done")
    starts = list(range(0, config.n, config.chunk))
    start_time = time.time()
    common = run_parts(pipeline, config)
    parts = lambda start: {**common, "images": chunk_images(idx, start, config.chunk, data_root),
                           "seed": config.seed + start}
    inputs = lambda start: (x[start:start + config.chunk], y[start:start + config.chunk], config.seed + start)
    evaluator = Evaluator(pipeline, config)       # here also with Ray: what it refuses is refused before any task
    with tqdm(total=len(starts), desc="eval", unit="chunk", disable=not progress) as bar:
        shown = BarProgress(bar)
        tasks = [Chunk(chunk_label(start, config.chunk, config.n), parts(start), partial(inputs, start))
                 for start in starts]
        if ray is None:
            chunks = run_chunks_here(evaluator.run_chunk, tasks, cache, shown)
        else:
            chunks, ran = run_chunks(eval_chunk_task, config, tasks, cache, ray, shown)
    outcomes: dict[str, dict] = {"correct": {}, "loss_sums": {}, "repaired": {}}
    seconds: dict[str, float] = {}
    for chunk in chunks:
        for key, v in chunk["seconds"].items():
            seconds[key] = seconds.get(key, 0.0) + v
        for key, values in chunk["correct"].items():
            outcomes["correct"].setdefault(key, []).extend(values)
            outcomes["repaired"][key] = outcomes["repaired"].get(key, 0) + chunk["repaired"][key]
            sums = outcomes["loss_sums"].setdefault(key, {})
            for task, v in chunk["loss_sums"][key].items():
                sums[task] = sums.get(task, 0.0) + v
    result = {"n": config.n, **summarize(outcomes, config), "config": asdict(config),
              "test_indices_sha256": hashlib.sha256(idx.numpy().tobytes()).hexdigest(),
              "seconds": {"total_this_run": round(time.time() - start_time, 1),
                          **{k: round(v, 1) for k, v in seconds.items()}},
              "stages": {"computed": cache.misses, "reused": cache.hits},
              "device": str(pipeline.device), "weights": {k: m["sha256"] for k, m in pipeline.manifests.items()},
              **({"preview": True} if is_preview(pipeline.manifests) else {}),          # a --profile quick set
              **({"ray": ran} if ray else {})}
    if json_path:
        write_json(json_path, result)
    return result
