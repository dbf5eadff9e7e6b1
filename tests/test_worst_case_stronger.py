"""`worst-case --stronger IxE`: APGD-CE and APGD-DLR once more at a larger budget after every other attack, to show
whether more budget lowers a finished table's worst case; with --survivors, on the images still standing only."""
import pytest
import torch
from click.testing import CliRunner

from cli import main
from tests.conftest import needs_shipped

pytest.importorskip("pyautoattack", reason="needs AutoAttack (pip install -e '.[attacks]')")
from tests.test_worst_case import (TINY, IDENTITY, configs_read, counting_attacks, shipped,  # noqa: E402, F401
                                   stand_in)                                    # (shipped: a fixture)

pytestmark = needs_shipped
STRONGER = (3, 3)                                       # TINY's APGD: 2 iterations, EOT 2
ROWS = ["apgd-ce (I 3, E 3)", "apgd-dlr (I 3, E 3)"]


def test_the_stronger_rows_attack_what_still_stands_at_their_own_budget(shipped, monkeypatch):
    """A defense that answers every input with one grey image stands, under any attack, on exactly the images of
    that image's class: the stronger APGDs get those images, with the stronger iterations and EOT."""
    import engine.eval.worst_case as wc

    grey = torch.full((1, 3, 32, 32), 0.5)
    c = shipped.predict(grey).item()
    budgets = []

    class RecordedAPGD:
        def __init__(self, model, eps, loss, iterations, eot, seed):
            budgets.append((loss, iterations, eot))

        def __call__(self, x, y):
            return x
    monkeypatch.setattr(wc, "APGDEveryImage", RecordedAPGD)
    seen, attack = [], wc.WorstCase.attack
    monkeypatch.setattr(wc.WorstCase, "attack", lambda self, name, d, x, y, seed:
                        seen.append((name, y.tolist())) or attack(self, name, d, x, y, seed))
    runner = wc.WorstCase(shipped, wc.WorstCaseConfig(**{**TINY, "n": 4}, survivors=True, stronger=STRONGER),
                          {"grey": stand_in(lambda x: grey.expand_as(x).clone(), "grey")})
    out = runner.run_chunk(torch.rand(4, 3, 32, 32), torch.tensor([c, (c + 1) % 10, c, (c + 2) % 10]), "four", 0,
                           lambda *_: None)
    assert seen == [(a, [c, c]) for a in [*wc.ATTACKS_ON_DEFENSE[1:], *ROWS]]
    assert budgets == [("ce", 2, 2), ("dlr", 2, 2), ("ce", 3, 3), ("dlr", 3, 3)]
    assert list(out["defenses"]["grey"]) == [*wc.ATTACKS_ON_DEFENSE, *ROWS]
    assert runner.stages() == ["autoattack", *[f"{a} grey" for a in [*wc.ATTACKS_ON_DEFENSE[1:], *ROWS, "score"]]]
    kept = lambda row: runner.parts(row, runner.defenses["grey"])
    assert kept(ROWS[0]) == {**kept("apgd-ce"), "iterations": 3, "eot": 3}     # kept as APGD-CE at that budget


def test_a_finished_table_is_probed_at_the_price_of_its_standing_images(shipped, fake_test_set, tmp_path,
                                                                         monkeypatch):
    """From the table's chunk records alone (what a clone holds: the attacked images are not committed), only the
    stronger rows run, on the chunks where an image still stands; the table's rows are the same, the worst case can
    only fall, and the table says how its last rows were made."""
    import engine.eval.worst_case as wc
    from engine.eval.worst_case_table import markdown_table

    defenses = {"identity": stand_in(IDENTITY, "identity")}
    run = lambda **options: wc.run_worst_case(shipped, wc.WorstCaseConfig(**TINY, survivors=True, **options),
                                              progress=False, defenses=defenses, cache_dir=tmp_path)
    table = run()
    for path in tmp_path.iterdir():
        if not path.name.startswith("chunk-"):
            path.unlink()
    calls = counting_attacks(monkeypatch)
    probed = run(stronger=STRONGER)
    standing = table["defenses"]["identity"]["worst_correct"]      # deterministic: right on one scoring = on all
    chunks = [standing[i:i + TINY["chunk"]] for i in range(0, TINY["n"], TINY["chunk"])]
    assert any(standing)                                        # the stronger rows have something to attack
    assert calls == [row for chunk in chunks if any(chunk) for row in ROWS]
    before, after = table["defenses"]["identity"], probed["defenses"]["identity"]
    assert probed["base"] == table["base"] and list(after["attacks"]) == [*wc.ATTACKS_ON_DEFENSE, *ROWS]
    assert all(after["attacks"][a] == before["attacks"][a] for a in wc.ATTACKS_ON_DEFENSE)
    assert after["worst_case"]["accuracy"] == after["attacks"][ROWS[-1]]["accuracy"] <= before["worst_case"]["accuracy"]
    assert "| + apgd-dlr (I 3, E 3) |" in markdown_table(probed) and "--stronger" in markdown_table(probed)
    assert "--stronger" not in markdown_table(table)


def test_the_command_reads_the_stronger_budget_and_refuses_a_weaker_one(monkeypatch):
    configs = configs_read(monkeypatch)
    invoke = lambda *options: CliRunner().invoke(main, ["worst-case", "--n", "4", "--chunk", "4", *options])
    result = invoke("--stronger", "200x8")
    assert result.exit_code == 2 and "stopped after reading the options" in result.output
    assert configs[0].stronger == (200, 8)
    for wrong, message in (("200", "not ITERATIONSxEOT"), ("0x8", "not ITERATIONSxEOT"), ("2²x8", "ITERATIONSxEOT"),
                           ("50x8", "must be at least the table's (100 iterations, EOT 4)"),
                           ("100x4", "above it in at least one")):
        result = invoke("--stronger", wrong)
        assert result.exit_code == 2 and message in result.output, (wrong, result.output)
    assert invoke("--stronger", "200x4").exit_code == 2 and configs[-1].stronger == (200, 4)   # more iterations only
    assert len(configs) == 2
