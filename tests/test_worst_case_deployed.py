"""The worst case attacks the function a user deploys (``--deployment fixed``: the repair at one seed, which Square
queries, which judges every point the gradient attacks ask about, and on which each image is scored once) or a
randomized defense (``randomized``: fresh draws on every query, repeated scorings): the seeds each one runs, and a
stand-in defense that is right only at the deployed seed."""
import pytest
import torch

from tests.conftest import needs_shipped
from tests.test_worst_case import TINY, shipped  # noqa: F401 (a fixture)

pytest.importorskip("pyautoattack", reason="needs AutoAttack (pip install -e '.[attacks]')")
pytestmark = needs_shipped

FIXED = {**TINY, "deployment": "fixed", "repeats": None}


def right_only_at(seed_right: int, clean: torch.Tensor):
    """A stand-in repair that maps each image back to the clean image within ε of it at ``seed_right`` (a perfect
    purifier) and does nothing at every other seed."""
    def repair(x: torch.Tensor, seed: int) -> torch.Tensor:
        if seed != seed_right:
            return x
        distance = (x[:, None] - clean[None]).abs().flatten(2).amax(2)          # image × clean image, L∞
        return clean[distance.argmin(1)]
    return repair


def test_a_defense_right_only_at_the_deployed_seed_is_robust_as_deployed_and_broken_when_randomized(
        shipped, fake_test_set):  # noqa: F811
    from engine.eval.evaluate import eval_subset
    from engine.eval.worst_case import Defense, WorstCaseConfig, run_worst_case

    clean = fake_test_set[0].float() / 255
    x, y, _ = eval_subset(TINY["n"], 0, None, shipped.inputs)
    clean_accuracy = (shipped.predict(x) == y).float().mean().item()
    defenses = {"right at seed 0": Defense(repair=right_only_at(0, clean))}
    run = lambda **options: run_worst_case(shipped, WorstCaseConfig(**options), progress=False, defenses=defenses)
    fixed, randomized = run(**FIXED), run(**TINY)
    as_deployed, drawn = fixed["defenses"]["right at seed 0"], randomized["defenses"]["right at seed 0"]
    assert fixed["base"]["accuracy"] < clean_accuracy                # AutoAttack breaks some on the bare classifier
    assert as_deployed["worst_case"]["accuracy"] == clean_accuracy and as_deployed["worst_case"]["per_repeat"] == [
        clean_accuracy]                                              # the deployed function undoes every attack
    assert drawn["worst_case"]["accuracy"] <= randomized["base"]["accuracy"]   # another seed: the bare classifier
    # deployed at another seed, the same defense is the bare classifier, and as broken
    elsewhere = run(**FIXED, repair_seed=1)["defenses"]["right at seed 0"]["worst_case"]["accuracy"]
    assert elsewhere <= fixed["base"]["accuracy"]


def test_as_deployed_every_query_of_the_real_repair_runs_the_deployed_seed(shipped, fake_test_set):  # noqa: F811
    """The real repair (Square's queries, the judge of the gradient attacks' points, the scoring) runs only at
    --repair-seed when fixed; the BPDA surrogate's EOT samples draw other seeds. Randomized: never the same seed
    twice in Square's queries, and the scorings at repair_seed + r · 7919."""
    from engine.eval.worst_case import SCORE_SEED, Defense, WorstCaseConfig, run_worst_case

    seeds = {"repair": [], "surrogate": []}
    recorded = lambda kind: lambda x, seed: seeds[kind].append(seed) or x
    defenses = {"recorded": Defense(repair=recorded("repair"), surrogate=recorded("surrogate"))}
    config = {**FIXED, "n": 4, "chunk": 4}
    run_worst_case(shipped, WorstCaseConfig(**config, repair_seed=5), progress=False, defenses=defenses)
    assert set(seeds["repair"]) == {5}
    # Square's queries, a judgement of each APGD point (clean, start, each iterate) and of the aware PGD's, 5 scorings
    assert len(seeds["repair"]) >= TINY["square_queries"] + 2 * (TINY["iterations"] + 2) + TINY["iterations"] + 5
    assert seeds["surrogate"] and 5 not in seeds["surrogate"]
    seeds["repair"].clear()
    run_worst_case(shipped, WorstCaseConfig(**{**config, "deployment": "randomized", "repeats": 2}), progress=False,
                   defenses=defenses)
    scorings = [0, SCORE_SEED] * 5                                  # transfer, APGD-CE, APGD-DLR, aware, Square
    assert seeds["repair"][-2:] == scorings[-2:] and seeds["repair"].count(SCORE_SEED) == 5
    queries = [s for s in seeds["repair"] if s not in (0, SCORE_SEED)]
    assert len(queries) >= TINY["square_queries"] and len(set(queries)) == len(queries)


def test_the_aware_attack_on_a_gated_defense_aims_at_the_gate_score(shipped):  # noqa: F811
    """What decides a gated defense's output is its gate (an image it passes is not repaired): the aware attack keeps
    the gate's score low, for the gated noise control too; an ungated repair's aim is its own objective."""
    from engine.eval.evaluate import EvalConfig, Evaluator
    from engine.eval.worst_case import WorstCaseConfig, named_defenses

    config = WorstCaseConfig(n=4, chunk=4, defenses=["mtl:clean:gate", "mtl:clean", "noise:gate", "noise"])
    defenses = named_defenses(shipped, config)
    evaluator = Evaluator(shipped, EvalConfig(n=4, attacks=["none"], repairs=config.defenses))
    gate = evaluator.aware_objective("mtl:clean:gate").signature()
    assert gate["alpha"] == [round(w, 8) for w in evaluator.gate.calibration.score_weights(evaluator.gate.tasks)
                             .values()] and gate != evaluator.objectives["mtl:clean:gate"].signature()
    aims = {name: d.objective.signature() for name, d in defenses.items()}
    assert aims["mtl:clean:gate"] == aims["noise:gate"] == gate
    assert aims["mtl:clean"] == evaluator.objectives["mtl:clean"].signature() != gate
    assert aims["noise"] == gate                                 # no objective or gate: the first defense's aim
    assert defenses["mtl:clean:gate"].objective_key != defenses["mtl:clean"].objective_key
