"""The worst case per image over strong, diverse attacks: how a test-time defense is evaluated today (Croce et al.,
*Evaluating the Adversarial Robustness of Adaptive Test-time Defenses*, ICML 2022, who found none of nine such
defenses better than its static base).

On the same N images (a seeded subset of the test split, in chunks; every stage's output is kept, so a killed run
resumes and a rerun with another budget recomputes only what that budget changes):

1. **base**: AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square) on the classifier alone;
2. **transfer**: those adversarial images through each defense;
3. **adaptive, white-box**: APGD-CE and APGD-DLR on classifier(defense(x)), BPDA through the defense (its backward is
   the identity; its forward a shortened surrogate of the repair) with EOT over its randomness, and the
   defense-aware PGD (CE − λ·L_ssl);
4. **black-box**: Square on classifier(defense(x)) with the real defense in every query (no gradients: what
   gradient masking cannot hide from), on every image, as the APGDs are (engine/attacks.py's ``…EveryImage``);
5. **worst case per image**: every final image is scored on the *real* defense (all steps, the early exit as
   shipped); an image counts as robust only if it is classified correctly under every attack.
6. **stronger** (optional): APGD-CE and APGD-DLR once more at a larger budget after all the others, which answers
   the question every such table owes (does more budget lower the worst case?) on the same images.

**Which defense is attacked** (``deployment``) is the threat model:

- ``"fixed"`` (the default): the function `cli.py repair` and `cli.py serve` deploy — the repair at one seed
  (``repair_seed``, the CLI's 0), whose draws depend only on that seed and each image's pixels, so it answers every
  query the same. Square queries exactly that function; every point the gradient attacks ask about is judged on it
  too, and each keeps the first point it misclassified, else the one of its smallest margin (engine/attacks.py's
  ``KeptByDeployed``: what an attacker of the service, who gets its exact answers, would keep); each final image is
  scored once on it. The gradients of the BPDA attacks still average EOT samples of other seeds: an expectation is a
  good surrogate for a function whose draws are a hash of its input, and only the point kept must be the deployed
  function's choice.
- ``"randomized"``: a defense whose draws are fresh on every query (a per-request seed): every query of the
  attacks and every scoring draws anew, each final image is scored ``repeats`` times (seeds ``repair_seed + r ·
  SCORE_SEED``), and an image is robust only if right every time; the figure is also given per repeat (mean ± std).

The attacks are AutoAttack's published implementation (``pyautoattack``); only the glue is here. The defenses are
the eval's repair names (engine/eval/repair_spec.py), or any ``Defense`` (tests use stand-ins).

Example::

    config = WorstCaseConfig(n=500, defenses=["mtl:clean:exit", "noise"])
    result = run_worst_case(pipeline, config, Path("worst.json"))
"""
from __future__ import annotations

import hashlib
import logging
import re
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from runtime.files import write_json
from runtime.settings import DEFAULTS

from ..attacks import APGDEveryImage, AutoAttackAPGD, DefenseAwarePGD, KeptByDeployed, SquareEveryImage
from ..defended import DefendedClassifier
from ..pipeline import Pipeline
from .evaluate import EvalConfig, Evaluator, calibration_key, chunk_images, classifier_key, eval_subset
from .on_ray import Chunk, RayRun, chunk_label, run_chunks, run_chunks_here
from .progress import BarProgress
from .stage_cache import CHUNKS, StageCache
from .worst_case_table import stronger_name, summarize, summarize_transfer

RepairFn = Callable[[torch.Tensor, int], torch.Tensor]       # (images, seed) -> repaired images
ATTACKS_ON_DEFENSE = ("transfer", "apgd-ce", "apgd-dlr", "aware", "square")
SCORE_SEED = 7919          # randomized: repeat r scores with seed repair_seed + r * SCORE_SEED
DEPLOYMENTS = ("fixed", "randomized")


@dataclass
class Defense:
    """A defense under evaluation: ``repair`` as deployed; ``surrogate`` what the BPDA attacks run forward (default:
    the repair); ``objective`` the SSL loss the defense-aware attacker keeps low (default: the pipeline's).

    ``key`` names everything the repair and the surrogate depend on, ``objective_key`` everything the objective
    depends on: a stage's output is kept (engine/eval/stage_cache.py) only where its key is given, so that a defense the
    cache cannot tell apart from another is always computed afresh."""
    repair: RepairFn
    surrogate: RepairFn | None = None
    objective: nn.Module | None = None
    key: dict | None = None
    objective_key: dict | None = None


@dataclass
class WorstCaseConfig:
    n: int = 1000
    offset: int = 0
    seed: int = 0
    eps: float = 8 / 255
    defenses: list[str] = field(default_factory=lambda: ["mtl:clean:exit", "noise"])   # the last is the control
    base_iterations: int = 100   # AutoAttack on the classifier alone: APGD and FAB iterations (standard: 100),
    targets: int = 9             # target classes of APGD-T and FAB-T (standard: 9)
    base_queries: int = 5000     # and Square's queries (standard: 5000)
    iterations: int = 100        # the attacks on the defense: APGD iterations and the aware PGD's steps
    square_queries: int = 1000   # Square on the defense: every query runs the real repair
    eot: int = 4                 # repair samples averaged per APGD step through the defense
    deployment: str = "fixed"    # the threat model: the deployed function at repair_seed, or fresh draws per query
    repair_seed: int = 0         # the seed the repair is deployed with (`cli.py repair --seed`)
    repeats: int | None = None   # scorings of each final image on the real defense: 1 when fixed (the function is
    #                              deterministic), 3 by default when randomized
    surrogate_steps: int = 10    # repair steps in the BPDA attacks' forward (the scored repair keeps repair_steps)
    aware_lambda: float = 1.0
    eps_r: float = DEFAULTS.eps  # the repair, as `cli.py repair` runs it by default
    repair_steps: int = DEFAULTS.steps
    repair_step_size: float = DEFAULTS.step_size
    views: int = 4
    level: float = 0.5
    chunk: int = 25
    adaptive_n: int | None = None  # the attacks on the defense on the first adaptive_n images (None: all n); the
    #                                base and its transfer on all n (a multiple of chunk: whole chunks)
    survivors: bool = False      # each attack on the defense only on the images some scoring of every earlier one
    #                              left right (AutoAttack's own practice): the same worst case and figures per repeat
    #                              at a fraction of the cost where the transfer breaks most images; the attack rows
    #                              become cumulative
    stronger: tuple[int, int] | None = None   # (iterations, eot): APGD-CE and APGD-DLR once more at this budget after
    #                                           every other attack: does more budget lower the worst case? (with
    #                                           survivors, on the images still standing only: a probe of a whole table
    #                                           at the price of the images right on some scoring of every attack)

    def __post_init__(self) -> None:
        if self.deployment not in DEPLOYMENTS:
            raise ValueError(f"the deployment is one of {', '.join(DEPLOYMENTS)}, not {self.deployment!r}")
        if self.repeats is None:
            self.repeats = 1 if self.deployment == "fixed" else 3
        if self.deployment == "fixed" and self.repeats != 1:
            raise ValueError(f"the fixed deployment answers every query the same: each image is scored once, not "
                             f"{self.repeats} times (repeated scorings belong to --deployment randomized)")
        m = self.adaptive_n
        if m is not None and (not 0 < m <= self.n or (m % self.chunk and m != self.n)):
            raise ValueError(f"the attacks on the defense run on whole chunks of the first images: adaptive_n ({m}) "
                             f"must be a multiple of the chunk ({self.chunk}) and at most n ({self.n})")
        if self.stronger is not None:
            self.stronger = tuple(self.stronger)          # a list once read back from JSON
            if len(self.stronger) != 2 or not all(isinstance(v, int) and v > 0 for v in self.stronger):
                raise ValueError(f"the stronger budget is (iterations, eot), two integers above 0, not "
                                 f"{self.stronger}")
            iterations, eot = self.stronger
            if iterations < self.iterations or eot < self.eot or self.stronger == (self.iterations, self.eot):
                raise ValueError(f"the stronger budget ({iterations} iterations, EOT {eot}) must be at least the "
                                 f"table's ({self.iterations} iterations, EOT {self.eot}) in both, and above it in "
                                 f"at least one")


def named_defenses(pipeline: Pipeline, config: WorstCaseConfig) -> dict[str, Defense]:
    """The config's repair names as defenses, each with the eval's repair (its surrogate: fewer steps) and keys that
    hold what its RepairSpec uses (the noise control: its bound alone). The aware attack keeps low what decides
    each defense's output: a gated one's gate score (an image the gate passes is not repaired), else its repair
    objective; a defense with neither (the noise control) is attacked with the first one's, as `cli.py eval`'s aware
    attack is."""
    eval_config = EvalConfig(n=config.n, attacks=["none"], repairs=list(config.defenses), eps_r=config.eps_r,
                             repair_steps=config.repair_steps, repair_step_size=config.repair_step_size,
                             views=config.views, level=config.level)
    evaluator = Evaluator(pipeline, eval_config)
    calibration = calibration_key(pipeline)

    networks = lambda tasks: {t: pipeline.manifests.get(t, {}).get("sha256") for t in tasks}

    def key(name: str) -> dict:
        spec = evaluator.specs[name]
        out = {"repair": name, "eps_r": config.eps_r}
        if spec.optimize:
            out.update(networks=networks(spec.tasks),
                       steps=config.repair_steps, step_size=config.repair_step_size, views=config.views,
                       alpha=eval_config.alpha)
        if spec.objective == "clean" or spec.gated:
            out.update(calibration=calibration, level=config.level)
        if spec.gated:
            out.update(gate_fpr=eval_config.gate_fpr, gate_tasks=eval_config.gate_tasks)
        return out

    def objective_key(objective) -> dict:         # its networks and what fixes it beyond them (α, levels, views)
        return {"networks": networks(objective.tasks), "objective": objective.signature()}
    # the aware attack aims at what decides a defense's output: a gated one's gate score, else its repair objective
    aims = {d: evaluator.aware_objective(d) for d in config.defenses
            if evaluator.specs[d].gated or d in evaluator.objectives}
    aimed = next(iter(aims.values()), pipeline.objective)

    def defense(name: str) -> Defense:
        objective = aims.get(name, aimed)
        return Defense(repair=lambda x, s: evaluator.repair(name, x, s).images,
                       surrogate=lambda x, s: evaluator.repair(name, x, s, config.surrogate_steps).images,
                       objective=objective, key=key(name), objective_key=objective_key(objective))
    return {name: defense(name) for name in config.defenses}


def check_threat_model(x_adv: torch.Tensor, x: torch.Tensor, eps: float, stage: str) -> None:
    """Every attacked image within ε (L∞) of its clean image and in [0, 1]: an image outside is a bug in an attack,
    and would make its row meaningless, so the run stops and says where."""
    distance = (x_adv - x).abs().amax().item()
    if x_adv.shape != x.shape or distance > eps + 1e-6 or x_adv.min() < 0 or x_adv.max() > 1:
        raise RuntimeError(f"{stage}: attacked images outside the threat model (shape {tuple(x_adv.shape)} for "
                           f"{tuple(x.shape)}, L∞ distance {distance:.6f} for ε {eps:.6f}, range "
                           f"[{x_adv.min().item():.4f}, {x_adv.max().item():.4f}])")


class _KnownToBeRandomized(logging.Filter):
    """Drops AutoAttack's warnings that the model is randomized or dynamic: this evaluation is built for such a
    defense (EOT, BPDA, Square, repeated scoring); its other warnings (e.g. zero gradients) still show."""
    pattern = "it seems to be a (randomized|dynamic) defense"

    def filter(self, record: logging.LogRecord) -> bool:
        return re.search(self.pattern, record.getMessage()) is None


KNOWN_TO_BE_RANDOMIZED = _KnownToBeRandomized()


class WorstCase:
    """Runs every stage on a chunk of images: per-image outcomes and the seconds of each stage. Every stage's output
    is kept in ``cache`` under what it depends on (engine/eval/stage_cache.py), so a rerun recomputes only what
    changed."""

    def __init__(self, pipeline: Pipeline, config: WorstCaseConfig, defenses: dict[str, Defense],
                 cache: StageCache | None = None) -> None:
        self.p, self.cfg, self.defenses = pipeline, config, defenses
        self.classifier = pipeline.classifier
        self.cache = cache or StageCache(None)
        classifier = classifier_key(pipeline)
        self.budgets = {
            "autoattack": {"classifier": classifier, "iterations": config.base_iterations,
                           "targets": config.targets, "queries": config.base_queries},
            "apgd-ce": {"classifier": classifier, "iterations": config.iterations, "eot": config.eot,
                        "surrogate": config.surrogate_steps},
            "aware": {"classifier": classifier, "iterations": config.iterations, "lambda": config.aware_lambda},
            "square": {"classifier": classifier, "queries": config.square_queries, "every_image": True},
            "score": {"classifier": classifier, "repeats": config.repeats}}
        if config.deployment == "fixed":                 # (the randomized protocol's keys are those of before)
            for stage in ("apgd-ce", "aware", "square", "score"):
                self.budgets[stage]["deployed"] = {"seed": config.repair_seed}
        elif config.repair_seed:
            self.budgets["score"]["repair_seed"] = config.repair_seed
        self.budgets["apgd-dlr"] = self.budgets["apgd-ce"]
        self.table_budgets = dict(self.budgets)          # those of the table without the stronger rows
        # the table's rows in order, each with the attack it runs (a stronger row: an APGD at the stronger budget)
        self.attack_of = {attack: attack for attack in ATTACKS_ON_DEFENSE}
        if config.stronger:
            iterations, eot = config.stronger
            for attack in ("apgd-ce", "apgd-dlr"):
                row = stronger_name(attack, config.stronger)
                self.attack_of[row] = attack
                self.budgets[row] = {**self.budgets[attack], "iterations": iterations, "eot": eot}
        self.attacks = list(self.attack_of)

    def parts(self, stage: str, defense: Defense, of: dict | None = None) -> dict | None:
        """What a stage on ``defense`` depends on (None: the defense has no key; not kept). ``of``: a scoring's
        attacked images' parts."""
        depends = defense.key
        if stage == "aware":                             # its images: the objective's; fixed: judged by the defense
            depends = defense.objective_key if self.cfg.deployment == "randomized" else (
                defense.key and defense.objective_key and {"objective": defense.objective_key, "judge": defense.key})
        if depends is None or (stage == "score" and of is None):
            return None
        kind = self.attack_of.get(stage, stage)         # a stronger row is kept as its APGD at that budget
        return {"stage": kind, "defense": depends, **self.budgets[stage], **({"of": of} if of else {})}

    def stages(self, adaptive: bool = True) -> list[str]:
        attacks = (*self.attacks[1:], "score") if adaptive else ("score",)
        return ["autoattack"] + [f"{attack} {name}" for name in self.defenses for attack in attacks]

    def base(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        """AutoAttack's standard version on the classifier alone."""
        cfg = self.cfg
        return AutoAttackAPGD(self.classifier, cfg.eps, ("apgd-ce", "apgd-t", "fab-t", "square"),
                              cfg.base_iterations, cfg.targets, seed=seed, square_queries=cfg.base_queries)(x, y)

    def attack(self, name: str, defense: Defense, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        checks = logging.getLogger("auto-attack")
        checks.addFilter(KNOWN_TO_BE_RANDOMIZED)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=KNOWN_TO_BE_RANDOMIZED.pattern)
                return self.attack_defense(name, defense, x, y, seed)
        finally:
            checks.removeFilter(KNOWN_TO_BE_RANDOMIZED)

    def deployed(self, defense: Defense) -> DefendedClassifier:
        """The defended classifier as deployed: the real repair at the deployment's seed on every call."""
        return DefendedClassifier(self.p, bpda=False, seed=self.cfg.repair_seed, repair=defense.repair,
                                  fresh_draws=False)

    def attack_defense(self, name: str, defense: Defense, x: torch.Tensor, y: torch.Tensor,
                       seed: int) -> torch.Tensor:
        cfg, kind = self.cfg, self.attack_of.get(name, name)
        fixed = cfg.deployment == "fixed"
        judged = lambda model: KeptByDeployed(model, self.deployed(defense), x, y) if fixed else model
        if kind in ("apgd-ce", "apgd-dlr"):              # a stronger row: its budget, from the same random start
            budget = self.budgets[name]
            through = judged(DefendedClassifier(self.p, bpda=True, seed=seed,
                                                repair=defense.surrogate or defense.repair))
            x_adv = APGDEveryImage(through, cfg.eps, kind.removeprefix("apgd-"), budget["iterations"],
                                   budget["eot"], seed)(x, y)
        elif name == "aware":
            through = judged(self.classifier)
            x_adv = DefenseAwarePGD(through, defense.objective or self.p.objective, cfg.aware_lambda,
                                    cfg.eps, cfg.eps / 4, cfg.iterations, seed)(x, y)
        elif name == "square":                           # every query runs the real repair
            real = self.deployed(defense) if fixed else DefendedClassifier(self.p, bpda=False, seed=seed,
                                                                           repair=defense.repair)
            return SquareEveryImage(real, cfg.eps, cfg.square_queries, seed)(x, y)
        else:
            raise ValueError(f"unknown attack {name!r}")
        if not fixed:
            return x_adv
        through.judge(x_adv)                             # the attack's own final point is a candidate too
        return through.kept

    def scored(self, defense: Defense, x_adv: torch.Tensor, y: torch.Tensor) -> list[list[bool]]:
        """Per repeat, per image: the classifier right on the real defense's repair (fixed: once, at the deployed
        seed; randomized: at seeds repair_seed + r · SCORE_SEED)."""
        seed = self.cfg.repair_seed
        with torch.no_grad():
            return [(self.p.predict(defense.repair(x_adv, seed + r * SCORE_SEED)) == y).tolist()
                    for r in range(self.cfg.repeats)]

    def run_chunk(self, x: torch.Tensor, y: torch.Tensor, images: str, seed: int,
                  advance: Callable[[str, bool], None], adaptive: bool = True,
                  begin: Callable[[str], None] = lambda stage: None, known: dict | None = None) -> dict:
        """``images`` names the chunk's images (it keys their stages in the cache); ``seed`` seeds its attacks;
        ``begin(stage)`` is called before a stage is computed (not when it is read back), ``advance(stage, reused)``
        after each stage. ``adaptive=False``: the base and its transfer only. ``known``: this chunk's outcomes from
        the table without the stronger rows (its chunk record), whose rows are taken as they are: only the stronger
        rows are computed, so a clone that holds the chunk records alone probes a table as cheaply as its machine."""
        seconds: dict[str, float] = {}
        common = {"images": images, "seed": seed, "eps": self.cfg.eps}
        where = lambda parts: None if parts is None else {**common, **parts}

        def announced(stage: str, compute: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> Any:
                begin(stage)
                return compute()
            return run

        def attacked(name: str, parts: dict | None, clean: torch.Tensor,
                     compute: Callable[[], torch.Tensor]) -> torch.Tensor:
            x_adv, seconds[name], reused = self.cache.run(where(parts), announced(name, compute))
            advance(name, reused)
            x_adv = x_adv.to(self.p.device)
            check_threat_model(x_adv, clean, self.cfg.eps, name)
            return x_adv

        x, y = x.to(self.p.device), y.to(self.p.device)
        made = {"stage": "autoattack", **self.budgets["autoattack"]}
        if known is None:
            x_base = attacked("autoattack", made, x, lambda: self.base(x, y, seed))
            with torch.no_grad():
                base = (self.p.predict(x_base) == y).tolist()
        else:
            base, seconds = known["base"], dict(known["seconds"])
            advance("autoattack", True)
        outcomes = {}
        for name, defense in self.defenses.items():
            every = list(range(len(y)))
            standing = every                             # the images no attack has broken on every scoring
            scores, reused = {}, True
            score_seconds = seconds.get(f"score {name}", 0.0)          # the known rows' scorings
            for attack in self.attacks if adaptive else self.attacks[:1]:
                if known is not None and attack in known["defenses"][name]:
                    scores[attack] = known["defenses"][name][attack]
                    if attack != "transfer":             # (the transfer is no stage of its own: AutoAttack's images)
                        advance(f"{attack} {name}", True)
                    standing = [i for i in standing if any(run[i] for run in scores[attack])]
                    continue
                on = standing if self.cfg.survivors and attack != "transfer" else every
                scores[attack] = [[False] * len(y) for _ in range(self.cfg.repeats)]  # not attacked: broken every time
                if not on:                               # every image broken already: nothing left to attack
                    seconds[f"{attack} {name}"] = 0.0
                    advance(f"{attack} {name}", True)
                    continue
                x_on, y_on = x[on], y[on]
                if attack == "transfer":
                    parts, x_adv = made, x_base
                else:                                    # a subset is part of the key; all images keep the old key
                    parts = self.parts(attack, defense)
                    if parts is not None and on != every:
                        parts = {**parts, "on": on}
                    x_adv = attacked(f"{attack} {name}", parts, x_on,
                                     lambda: self.attack(attack, defense, x_on, y_on, seed))
                # each final image set scored apart: a new budget rescores its own only
                done = self.cache.run(where(self.parts("score", defense, parts)),
                                      announced(f"score {name}", lambda: self.scored(defense, x_adv, y_on)))
                for full, right in zip(scores[attack], done.output):
                    for i, ok in zip(on, right):
                        full[i] = ok
                # broken on every scoring: out; broken on some only, attacked on, so that each repeat's figure holds
                standing = [i for i in standing if any(run[i] for run in scores[attack])]
                score_seconds, reused = score_seconds + done.seconds, reused and done.reused
            seconds[f"score {name}"] = score_seconds
            advance(f"score {name}", reused)
            outcomes[name] = scores
        return {"base": base, "defenses": outcomes, "seconds": seconds}


def chunk_task(pipeline: Pipeline, shared: tuple, cache: StageCache, note: Callable, x: torch.Tensor,
               y: torch.Tensor, images: str, seed: int, adaptive: bool, known: dict | None) -> dict:
    """A chunk's stages as a Ray task (engine/eval/on_ray.py): ``shared`` is (config, the defenses passed to
    run_worst_case, or None for the config's named ones, built here)."""
    config, defenses = shared
    runner = WorstCase(pipeline, config, defenses or named_defenses(pipeline, config), cache)
    return runner.run_chunk(x, y, images, seed, lambda stage, reused: note("advance", stage, reused), adaptive,
                            begin=lambda stage: note("begin", stage), known=known)


def run_worst_case(pipeline: Pipeline, config: WorstCaseConfig, json_path: Path | None = None,
                   data_root: str | None = None, progress: bool = True,
                   defenses: dict[str, Defense] | None = None, cache_dir: Path | None = None,
                   ray: RayRun | None = None) -> dict:
    """Every stage on the config's images. Each stage's output is kept in ``cache_dir`` (default: ``stages/`` beside
    ``json_path``; none without either), so a killed run resumes from its last finished stage and a run that
    changes one budget, or covers more images, recomputes only that (engine/eval/stage_cache.py); ``ray``: the chunks
    run as Ray tasks (engine/eval/on_ray.py), to the same table. The stages of a defense passed in without a ``key``
    are not kept. The last of two or more defenses is the control: every other one's worst case is tested against
    its worst case as well as against the base."""
    passed, defenses = defenses, defenses or named_defenses(pipeline, config)
    x, y, idx = eval_subset(config.offset + config.n, config.seed, data_root, pipeline.inputs)
    x, y, idx = x[config.offset:], y[config.offset:], idx[config.offset:]
    cache = StageCache(cache_dir or (json_path.parent / "stages" if json_path else None))
    records = StageCache(cache.folder, prefix=CHUNKS)    # each chunk's outcomes, beside its stages' outputs
    runner = WorstCase(pipeline, config, defenses, cache)
    adaptive_n = config.n if config.adaptive_n is None else config.adaptive_n
    starts = list(range(0, config.n, config.chunk))
    images = lambda start: chunk_images(idx, start, config.chunk, data_root)
    # a defense without a key is not kept: then there is nothing to read back
    kept = all(d.key is not None and d.objective_key is not None for d in defenses.values())
    chunk_parts = lambda start, budgets=runner.budgets: None if not kept else {
        "worst-case chunk": images(start), "seed": config.seed + config.offset + start, "eps": config.eps,
        "adaptive": start < adaptive_n, "budgets": budgets,
        "defenses": [[d.key, d.objective_key] for d in defenses.values()],
        **({"survivors": True} if config.survivors else {})}

    def chunk_inputs(start: int) -> tuple:
        """run_chunk's inputs for the chunk from ``start`` (asked where its own record is missing). --stronger: the
        table's own chunk (the same command without it), whose rows are not run again."""
        part = slice(start, start + config.chunk)
        found = records.get(chunk_parts(start, runner.table_budgets)) if config.stronger and kept else None
        return (x[part], y[part], images(start), config.seed + config.offset + start, start < adaptive_n,
                found and found.output)
    weight = lambda i: len(runner.stages(starts[i] < adaptive_n))
    with tqdm(total=sum(map(weight, range(len(starts)))), desc="worst case", unit="stage",
              disable=not progress) as bar:
        shown = BarProgress(bar, weight)
        tasks = [Chunk(chunk_label(start, config.chunk, config.n), chunk_parts(start), partial(chunk_inputs, start))
                 for start in starts]
        if ray is None:
            run = lambda x_c, y_c, names, seed, on_defense, known: runner.run_chunk(
                x_c, y_c, names, seed, shown.advance, on_defense, begin=shown.begin, known=known)
            chunks = run_chunks_here(run, tasks, records, shown)
        else:
            chunks, ran = run_chunks(chunk_task, (config, passed), tasks, records, ray, shown, stages=cache)
    base, outcomes, seconds, images_per_stage = [], {name: {a: [[] for _ in range(config.repeats)]
                                                            for a in runner.attacks} for name in defenses}, {}, {}
    for chunk in chunks:
        base += chunk["base"]
        for name, attacks in chunk["defenses"].items():
            for attack, runs in attacks.items():
                for r, values in enumerate(runs):
                    outcomes[name][attack][r] += values
        for stage, s in chunk["seconds"].items():
            seconds[stage] = seconds.get(stage, 0.0) + s
            images_per_stage[stage] = images_per_stage.get(stage, 0) + len(chunk["base"])
    adaptive = {name: {a: [runs[:adaptive_n] for runs in attacks[a]] for a in attacks}
                for name, attacks in outcomes.items()}
    control = list(defenses)[-1] if len(defenses) > 1 else None        # the CLI's --control
    result = {**summarize(base[:adaptive_n], adaptive, cumulative=config.survivors, control=control),
              "config": asdict(config),
              **({"transfer_all": summarize_transfer(base, {name: attacks["transfer"] for name, attacks in
                                                            outcomes.items()})} if adaptive_n < config.n else {}),
              "test_indices_sha256": hashlib.sha256(idx.numpy().tobytes()).hexdigest(),
              "seconds_per_image": {k: round(v / images_per_stage[k], 3) for k, v in seconds.items()},
              "stages": {"computed": cache.misses, "reused": cache.hits},
              "chunks": {"computed": records.misses, "reused": records.hits},
              "threads": torch.get_num_threads(), "device": str(pipeline.device), **({"ray": ran} if ray else {}),
              "weights": {k: m["sha256"] for k, m in pipeline.manifests.items()}}
    if json_path:
        write_json(json_path, result)
    return result
