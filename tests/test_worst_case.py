"""The worst case per image (engine/eval/worst_case.py, `cli.py worst-case`) with tiny budgets: every stage on the
shipped weights, the bookkeeping (an image one attack breaks once is broken; the worst case is never above any attack),
resuming, and two stand-in defenses: the identity (its worst case is the base's) and one that masks gradients by
rounding (BPDA and Square see through it)."""
import json
import types

import pytest
import torch
from click.testing import CliRunner

from cli import main
from tests.conftest import SHIPPED, needs_shipped

pytest.importorskip("pyautoattack", reason="needs AutoAttack (pip install -e '.[attacks]')")
pytestmark = needs_shipped

# the tiny run: 8 images, 2 iterations, E = 2, R = 2 (the randomized deployment, whose repeated scorings the
# bookkeeping below is about); small query budgets so that it takes seconds
TINY = dict(n=8, base_iterations=2, iterations=2, eot=2, deployment="randomized", repeats=2, base_queries=8,
            square_queries=4, surrogate_steps=2, chunk=4)


@pytest.fixture(scope="module")
def shipped():
    from engine import load_pipeline

    return load_pipeline(objective="plain", calibration=SHIPPED / "calibration.json")


def stand_in(fn, key: str | None = None):
    """A defense that applies ``fn``; with ``key``, the cache knows it (and the aware attack's objective, the
    pipeline's) by that."""
    from engine.eval.worst_case import Defense

    return Defense(repair=lambda x, seed: fn(x), key=key and {"stand-in": key},
                   objective_key=key and {"objective": "the pipeline's"})


IDENTITY = lambda x: x
ROUND_TO_8_LEVELS = lambda x: (x * 7).round() / 7        # no gradient anywhere: masks it from plain attacks


def test_summary_counts_an_image_broken_once_as_broken():
    from engine.eval.worst_case import ATTACKS_ON_DEFENSE
    from engine.eval.worst_case_table import summarize

    right = [True, True, True, False]
    attacks = {a: [list(right), list(right)] for a in ATTACKS_ON_DEFENSE}
    attacks["square"][1][0] = False                  # one attack, one of the two scorings, image 0
    result = summarize([True, True, False, False], {"d": attacks})["defenses"]["d"]
    assert result["worst_correct"] == [False, True, True, False]
    assert result["attacks"]["square"]["accuracy"] == 0.5 and result["attacks"]["square"]["mean_over_repeats"] == 0.625
    assert result["attacks"]["transfer"]["accuracy"] == 0.75
    assert result["worst_case"]["per_repeat"] == [0.75, 0.5]
    assert result["worst_case"]["accuracy"] == 0.5
    assert result["mcnemar_vs_base"] == {"a_only": 1, "b_only": 1, "p": 1.0}
    assert result["verdict"] == "no measurable difference"


def test_a_repair_is_judged_against_the_noise_control_as_well_as_the_base():
    from engine.eval.worst_case import ATTACKS_ON_DEFENSE
    from engine.eval.worst_case_table import markdown_table, summarize

    n = 12
    outcomes = lambda right: {a: [list(right), list(right)] for a in ATTACKS_ON_DEFENSE}
    repair = outcomes([True] * 8 + [False] * 4)        # right on 6 images the control loses, wrong on none it keeps
    control = outcomes([True] * 2 + [False] * 10)
    result = summarize([True] * 2 + [False] * 10, {"repair": repair, "noise": control}, control="noise")
    result.update(config={"eps": 8 / 255, "repeats": 2}, seconds_per_image={})
    assert result["defenses"]["repair"]["vs_control"] == {"control": "noise", "a_only": 0, "b_only": 6,
                                                          "p": 0.03125, "verdict": "beats the control"}
    assert result["defenses"]["repair"]["verdict"] == "improves"          # against the base: the same counts here
    assert "vs_control" not in result["defenses"]["noise"]
    assert "| repair | noise | 0 | 6 | 0.0312 | **beats the control** |" in markdown_table(result)
    alone = summarize([True] * n, {"repair": repair, "noise": control})["defenses"]["repair"]
    assert "vs_control" not in alone and "control" not in markdown_table({**result, "defenses": {"repair": alone}})


def test_attacked_images_outside_the_threat_model_stop_the_run():
    from engine.eval.worst_case import check_threat_model

    x = torch.full((2, 3, 4, 4), 0.5)
    check_threat_model(x + 8 / 255, x, 8 / 255, "fine")
    for bad in (x + 9 / 255, x.clamp(max=0.49) - 0.5, x[:1]):
        with pytest.raises(RuntimeError, match="square: attacked images outside the threat model"):
            check_threat_model(bad, x, 8 / 255, "square")


def test_every_stage_on_the_shipped_default_and_the_noise_control(shipped, fake_test_set, tmp_path, monkeypatch):
    import engine.eval.worst_case as wc
    from engine.eval.worst_case import ATTACKS_ON_DEFENSE, WorstCaseConfig, run_worst_case
    from engine.eval.worst_case_table import markdown_table

    attacked = []                                       # (clean chunk, each attack's output on it)
    run_chunk, cache_run = wc.WorstCase.run_chunk, wc.StageCache.run
    monkeypatch.setattr(wc.WorstCase, "run_chunk",
                        lambda self, x, *args, **kw: attacked.append((x, [])) or run_chunk(self, x, *args, **kw))

    def kept(self, parts, compute):
        out = cache_run(self, parts, compute)
        if isinstance(out[0], torch.Tensor):
            attacked[-1][1].append(out[0])
        return out
    monkeypatch.setattr(wc.StageCache, "run", kept)
    config = WorstCaseConfig(**TINY, repair_steps=5)    # the repair shortened to 5 steps (from 40): each Square
    result = run_worst_case(shipped, config, tmp_path / "w.json", progress=False)       # query and scoring runs it
    assert len(attacked) == 2 and all(len(outputs) == 1 + 2 * 4 for _, outputs in attacked)
    for x, outputs in attacked:                         # every attack's images within ε of the clean ones, in [0, 1]
        for x_adv in outputs:
            assert (x_adv - x).abs().max() <= config.eps + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    assert json.loads((tmp_path / "w.json").read_text())["n"] == 8
    assert list(result["defenses"]) == ["mtl:clean:exit", "noise"]
    assert result["defenses"]["mtl:clean:exit"]["vs_control"]["control"] == "noise"      # the last one named
    for defense in result["defenses"].values():
        worst = defense["worst_case"]["accuracy"]
        assert all(worst <= defense["attacks"][a]["accuracy"] for a in ATTACKS_ON_DEFENSE)
        assert worst <= min(defense["worst_case"]["per_repeat"])
        assert defense["verdict"] in ("improves", "no measurable difference", "weakens")
    stages = {"autoattack"} | {f"{a} {d}" for d in result["defenses"] for a in (*ATTACKS_ON_DEFENSE[1:], "score")}
    assert set(result["seconds_per_image"]) == stages
    assert "**worst case**" in markdown_table(result)


def counting_attacks(monkeypatch, kill_at: int | None = None) -> list[str]:
    """Records each attack computed (the base and those on a defense); raises KeyboardInterrupt at call ``kill_at``."""
    import engine.eval.worst_case as wc

    calls, base, attack = [], wc.WorstCase.base, wc.WorstCase.attack

    def counted(real, name):
        def run(self, *args):
            calls.append(name(args))
            if len(calls) == kill_at:
                raise KeyboardInterrupt
            return real(self, *args)
        return run

    monkeypatch.setattr(wc.WorstCase, "base", counted(base, lambda args: "autoattack"))
    monkeypatch.setattr(wc.WorstCase, "attack", counted(attack, lambda args: args[0]))
    return calls


def test_an_interrupted_run_resumes_from_its_last_stage_to_the_same_table(shipped, fake_test_set, tmp_path,
                                                                          monkeypatch):
    import engine.eval.worst_case as wc

    config = wc.WorstCaseConfig(**TINY)
    defenses = {"identity": stand_in(IDENTITY, "identity")}
    whole = wc.run_worst_case(shipped, config, tmp_path / "whole" / "w.json", progress=False, defenses=defenses)
    per_chunk = ["autoattack", *wc.ATTACKS_ON_DEFENSE[1:]]
    calls = counting_attacks(monkeypatch, kill_at=len(per_chunk) + 2)      # killed in the second chunk's 2nd attack
    with pytest.raises(KeyboardInterrupt):
        wc.run_worst_case(shipped, config, tmp_path / "w.json", progress=False, defenses=defenses)
    assert not (tmp_path / "w.json").exists()
    resumed = wc.run_worst_case(shipped, config, tmp_path / "w.json", progress=False, defenses=defenses)
    assert calls == per_chunk + per_chunk[:2] + per_chunk[1:]               # nothing finished was run again
    drop = lambda r: {k: v for k, v in r.items() if k not in ("seconds_per_image", "stages", "chunks")}
    assert drop(resumed) == drop(whole)
    assert resumed["stages"]["reused"] > 0 and whole["stages"]["reused"] == 0
    assert resumed["chunks"] == {"computed": 1, "reused": 1}                  # the first chunk's outcomes were kept


def test_a_rerun_recomputes_only_what_its_options_change(shipped, fake_test_set, tmp_path, monkeypatch):
    """More APGD iterations: AutoAttack on the classifier alone and Square are reused; more images: the first
    chunks are; another seed (other images, other random starts): nothing is."""
    from engine.eval.worst_case import WorstCaseConfig, run_worst_case

    defenses = {"identity": stand_in(IDENTITY, "identity")}
    run = lambda **options: run_worst_case(shipped, WorstCaseConfig(**{**TINY, "n": 4, **options}), progress=False,
                                           defenses=defenses, cache_dir=tmp_path)
    first = run()
    calls = counting_attacks(monkeypatch)
    assert run() == {**first, "stages": {"computed": 0, "reused": 0},                  # the chunk's outcomes kept
                     "chunks": {"computed": 0, "reused": first["chunks"]["computed"]}} and calls == []
    run(iterations=3)
    assert calls == ["apgd-ce", "apgd-dlr", "aware"]
    calls.clear()
    run(n=8)
    assert calls == ["autoattack", "apgd-ce", "apgd-dlr", "aware", "square"]          # the second chunk only
    calls.clear()
    run(seed=1)
    assert calls == ["autoattack", "apgd-ce", "apgd-dlr", "aware", "square"]


def test_the_progress_names_each_stage_while_it_runs(shipped, tmp_path):
    """The bar's label is the stage being computed, set before it starts (a stage can take an hour), and a stage read
    back from the cache is never announced."""
    import engine.eval.worst_case as wc

    runner = wc.WorstCase(shipped, wc.WorstCaseConfig(**{**TINY, "n": 4}),
                          {"identity": stand_in(IDENTITY, "identity")}, wc.StageCache(tmp_path))
    x, y, events = torch.rand(4, 3, 32, 32), torch.arange(4), []
    run = lambda: runner.run_chunk(x, y, "four images", 0, lambda stage, reused: events.append(("done", stage, reused)),
                                   begin=lambda stage: events.append(("begin", stage)))
    run()
    done = [e[1] for e in events if e[0] == "done"]
    assert done == runner.stages() and all(e[2] is False for e in events if e[0] == "done")
    for stage in done:                       # announced before it ends (scoring: once per final image set, interleaved)
        begun = [i for i, e in enumerate(events) if e == ("begin", stage)]
        assert begun and max(begun) < events.index(("done", stage, False))
    events.clear()
    run()
    assert events == [("done", stage, True) for stage in runner.stages()]


def test_a_run_goes_on_from_its_committed_chunks_alone(shipped, fake_test_set, tmp_path, monkeypatch):
    """What a clone of the repository holds of a run (its chunks' outcomes; the attacked images are not committed)
    is enough to continue it elsewhere: finished chunks are not attacked again, and the table is the same."""
    from engine.eval.worst_case import WorstCaseConfig, run_worst_case

    defenses = {"identity": stand_in(IDENTITY, "identity")}
    run = lambda n: run_worst_case(shipped, WorstCaseConfig(**{**TINY, "n": n}), tmp_path / "w.json",
                                   progress=False, defenses=defenses)
    whole = run(8)
    for path in (tmp_path / "stages").iterdir():
        if not path.name.startswith("chunk-"):
            path.unlink()
    calls = counting_attacks(monkeypatch)
    again = run(8)
    drop = lambda r: {k: v for k, v in r.items() if k not in ("stages", "chunks")}
    assert calls == [] and drop(again) == drop(whole) and again["chunks"] == {"computed": 0, "reused": 2}


def test_each_key_holds_what_its_stage_depends_on(shipped, fake_test_set, tmp_path, monkeypatch):
    """The noise control's repair depends on its bound alone; the repair on its steps, level and calibration too; the
    noise control's aware attack on the objective it borrows; a classifier passed as a module on its parameters; a
    defense without a key is never kept."""
    import engine.eval.worst_case as wc

    keys = lambda **options: {name: (d.key, d.objective_key) for name, d in wc.named_defenses(
        shipped, wc.WorstCaseConfig(**{**TINY, **options})).items()}
    default = keys()
    assert keys(repair_steps=7)["noise"] == default["noise"]
    assert keys(level=0.6)["noise"][0] == default["noise"][0] and keys(level=0.6)["noise"][1] != default["noise"][1]
    assert keys(eps_r=8 / 255)["noise"][0] != default["noise"][0]
    for change in (dict(repair_steps=7), dict(level=0.6), dict(repair_step_size=1 / 255), dict(views=2)):
        assert keys(**change)["mtl:clean:exit"][0] != default["mtl:clean:exit"][0], change
    plain = keys(defenses=["mtl", "noise"])
    assert plain["noise"][0] == default["noise"][0] and plain["noise"][1] != default["noise"][1]

    def module(weight: float):
        layer = torch.nn.Linear(2, 2)
        torch.nn.init.constant_(layer.weight, weight), torch.nn.init.zeros_(layer.bias)
        return types.SimpleNamespace(manifests={"classifier": {"sha256": None}}, classifier=layer)
    assert wc.classifier_key(module(1.0)) == wc.classifier_key(module(1.0)) != wc.classifier_key(module(2.0))

    calls = counting_attacks(monkeypatch)
    for _ in range(2):
        wc.run_worst_case(shipped, wc.WorstCaseConfig(**{**TINY, "n": 4}), progress=False, cache_dir=tmp_path,
                          defenses={"unnamed": stand_in(IDENTITY)})
    on_defense = list(wc.ATTACKS_ON_DEFENSE[1:])
    assert calls == ["autoattack", *on_defense, *on_defense]         # the base is kept, the unnamed defense's not


def test_the_attacks_on_the_defense_can_run_on_fewer_images_than_the_base(shipped, fake_test_set, tmp_path,
                                                                        monkeypatch):
    """The issue's split (the base and its transfer on N, the rest on the first M): the second chunk runs AutoAttack
    and the transfer only; the worst case is over the first M, the transfer row over all N."""
    import engine.eval.worst_case as wc
    from engine.eval.worst_case_table import markdown_table

    defenses = {"identity": stand_in(IDENTITY, "identity")}
    whole = wc.run_worst_case(shipped, wc.WorstCaseConfig(**TINY), progress=False, defenses=defenses,
                              cache_dir=tmp_path)
    calls = counting_attacks(monkeypatch)
    split = wc.run_worst_case(shipped, wc.WorstCaseConfig(**TINY, adaptive_n=4), progress=False, defenses=defenses)
    assert calls == ["autoattack", *wc.ATTACKS_ON_DEFENSE[1:], "autoattack"]
    first = wc.run_worst_case(shipped, wc.WorstCaseConfig(**{**TINY, "n": 4}), progress=False, defenses=defenses,
                              cache_dir=tmp_path)
    assert split["n"] == 4 and split["defenses"] == first["defenses"] and split["base"] == first["base"]
    assert split["transfer_all"]["n"] == 8 and split["transfer_all"]["base"] == whole["base"]
    assert split["transfer_all"]["defenses"]["identity"]["accuracy"] == \
        whole["defenses"]["identity"]["attacks"]["transfer"]["accuracy"]
    assert "On all 8 images" in markdown_table(split)
    with pytest.raises(ValueError, match="multiple of the chunk"):
        wc.WorstCaseConfig(**TINY, adaptive_n=3)


def test_the_identity_defense_transfers_the_base_exactly_and_never_improves_it(shipped, fake_test_set):
    from engine.eval.worst_case import WorstCaseConfig, run_worst_case

    result = run_worst_case(shipped, WorstCaseConfig(**TINY), progress=False,
                            defenses={"identity": stand_in(IDENTITY)})
    identity = result["defenses"]["identity"]
    assert identity["attacks"]["transfer"] == {**result["base"], "mean_over_repeats": result["base"]["accuracy"]}
    assert identity["worst_case"]["accuracy"] <= result["base"]["accuracy"]
    assert identity["worst_case"]["std"] == 0                # deterministic: every scoring the same
    assert identity["verdict"] != "improves"


def test_a_defense_that_masks_gradients_falls_to_the_base(shipped, fake_test_set):
    """Rounding to 8 levels leaves no gradient: APGD straight through it cannot move, so its accuracy stays that of
    the rounded clean images; BPDA (and Square) are not fooled by that, and the worst case falls to the base."""
    from engine.attacks import AutoAttackAPGD
    from engine.eval.evaluate import eval_subset
    from engine.eval.worst_case import WorstCaseConfig, run_worst_case

    config = WorstCaseConfig(**{**TINY, "n": 16, "chunk": 16, "iterations": 10})
    result = run_worst_case(shipped, config, progress=False, defenses={"round": stand_in(ROUND_TO_8_LEVELS)})
    x, y, _ = eval_subset(config.n, config.seed, inputs=shipped.inputs)
    masked = torch.nn.Sequential(torch.nn.Identity(), shipped.classifier)
    masked[0].forward = ROUND_TO_8_LEVELS
    naive = AutoAttackAPGD(masked, config.eps, ("apgd-ce",), config.iterations)(x, y)
    with torch.no_grad():
        naive_accuracy = (masked(naive).argmax(1) == y).float().mean().item()
    rounded = result["defenses"]["round"]
    assert rounded["attacks"]["apgd-ce"]["accuracy"] < naive_accuracy      # BPDA gets through where APGD cannot
    assert rounded["worst_case"]["accuracy"] <= result["base"]["accuracy"]


def test_the_command_refuses_an_unknown_repair_or_a_split_off_its_chunks_before_loading_anything(monkeypatch):
    monkeypatch.delenv("CIFAR10_ROOT", raising=False)            # reading the data would fail with another message
    result = CliRunner().invoke(main, ["worst-case", "--repair", "mtl:sideways", "--n", "4"])
    assert result.exit_code == 2 and "--repair" in result.output
    result = CliRunner().invoke(main, ["worst-case", "--repair", "", "--n", "4"])
    assert result.exit_code == 2 and "name the repair" in result.output
    result = CliRunner().invoke(main, ["worst-case", "--n", "8", "--chunk", "4", "--adaptive-n", "6"])
    assert result.exit_code == 2 and "adaptive_n (6) must be a multiple of the chunk (4)" in result.output


def test_survivors_attack_only_the_images_every_earlier_attack_left_robust(shipped, tmp_path, monkeypatch):
    """--survivors: a defense that answers every input with one grey image is right, whatever the attack, on exactly
    the images of that image's class. After the transfer each attack gets those images only; with none left, no
    attack runs at all; without the option, each gets all four."""
    import engine.eval.worst_case as wc

    grey = torch.full((1, 3, 32, 32), 0.5)
    c = shipped.predict(grey).item()
    constant = {"grey": stand_in(lambda x: grey.expand_as(x).clone(), "grey")}
    seen, attack = [], wc.WorstCase.attack
    monkeypatch.setattr(wc.WorstCase, "attack", lambda self, name, d, x, y, seed:
                        seen.append((name, y.tolist())) or attack(self, name, d, x, y, seed))
    x = torch.rand(4, 3, 32, 32)
    run = lambda y, survivors: wc.WorstCase(shipped, wc.WorstCaseConfig(**{**TINY, "n": 4, "survivors": survivors}),
                                            constant).run_chunk(x, torch.tensor(y), "four", 0, lambda *_: None)
    out = run([c, (c + 1) % 10, c, (c + 2) % 10], survivors=True)
    assert seen == [(a, [c, c]) for a in wc.ATTACKS_ON_DEFENSE[1:]]
    assert all(runs == [[True, False, True, False]] * 2 for runs in out["defenses"]["grey"].values())
    seen.clear()
    out = run([(c + 1) % 10] * 4, survivors=True)
    assert seen == [] and all(runs == [[False] * 4] * 2 for runs in out["defenses"]["grey"].values())
    assert all(out["seconds"][f"{a} grey"] == 0 for a in wc.ATTACKS_ON_DEFENSE[1:])
    run([c, (c + 1) % 10, c, (c + 2) % 10], survivors=False)
    assert [len(labels) for _, labels in seen] == [4] * 4


def test_survivors_attack_on_an_image_broken_on_some_scorings_only(shipped, monkeypatch):
    """Scripted scorings (two repeats): the transfer breaks image 0 on the first scoring only, image 1 on both. Only
    image 1 is spared the attacks after it, so that every repeat's figure is what a run without the option gives."""
    import engine.eval.worst_case as wc

    transfer, scored = [[False, False, True, True], [True, False, True, True]], []

    def scripted(self, defense, x_adv, y):
        scored.append(len(y))
        return transfer if len(scored) == 1 else [[True] * len(y)] * 2
    monkeypatch.setattr(wc.WorstCase, "scored", scripted)
    outcomes = {}
    for survivors in (False, True):
        scored.clear()
        runner = wc.WorstCase(shipped, wc.WorstCaseConfig(**{**TINY, "n": 4, "survivors": survivors}),
                              {"identity": stand_in(IDENTITY, "identity")})
        out = runner.run_chunk(torch.rand(4, 3, 32, 32), torch.arange(4), "four", 0, lambda *_: None)
        outcomes[survivors] = out["defenses"]["identity"]
        assert scored == [4, *[3 if survivors else 4] * 4]             # the images each final set was scored on
    every = wc.summarize([True] * 4, {"d": outcomes[False]})["defenses"]["d"]
    cumulative = wc.summarize([True] * 4, {"d": outcomes[True]}, cumulative=True)["defenses"]["d"]
    assert every["worst_case"] == cumulative["worst_case"]                   # per repeat, mean and std included
    assert every["worst_correct"] == cumulative["worst_correct"] == [False, False, True, True]
    assert cumulative["attacks"]["square"]["accuracy"] == 0.5 and every["attacks"]["square"]["accuracy"] == 1.0


def test_survivors_give_cumulative_rows_and_the_worst_case_as_their_last(shipped, fake_test_set, tmp_path,
                                                                         monkeypatch):
    """End to end on the identity: the base is read back from a run without the option, the attack rows never rise
    from one to the next, the worst case is the last row, and the table says how the rows were made."""
    import engine.eval.worst_case as wc
    from engine.eval.worst_case_table import markdown_table

    defenses = {"identity": stand_in(IDENTITY, "identity")}
    run = lambda survivors: wc.run_worst_case(shipped, wc.WorstCaseConfig(**TINY, survivors=survivors),
                                              progress=False, defenses=defenses, cache_dir=tmp_path)
    every = run(False)
    calls = counting_attacks(monkeypatch)
    result = run(True)
    assert "autoattack" not in calls and result["rows"] == "cumulative"
    rows = [r["accuracy"] for r in result["defenses"]["identity"]["attacks"].values()]
    assert rows == sorted(rows, reverse=True) and result["defenses"]["identity"]["worst_case"]["accuracy"] == rows[-1]
    assert rows[0] == every["defenses"]["identity"]["attacks"]["transfer"]["accuracy"]
    assert "| + apgd-ce |" in markdown_table(result) and "--survivors" in markdown_table(result)
    assert "| + apgd-ce |" not in markdown_table(every)


def configs_read(monkeypatch) -> list:
    """The configs the command builds from its options: its run is stopped there (exit 2, the message below)."""
    import engine.eval.worst_case as wc

    configs = []

    def stop(pipeline, config, *args, **kw):
        configs.append(config)
        raise ValueError("stopped after reading the options")
    monkeypatch.setattr(wc, "run_worst_case", stop)
    return configs


def test_the_command_passes_survivors_on(monkeypatch):
    configs = configs_read(monkeypatch)
    for flag in ([], ["--survivors"]):
        result = CliRunner().invoke(main, ["worst-case", "--n", "4", "--chunk", "4", *flag])
        assert result.exit_code == 2 and "stopped after reading the options" in result.output
    assert [c.survivors for c in configs] == [False, True]
