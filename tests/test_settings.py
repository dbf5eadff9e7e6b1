"""The repair's settings have one home (runtime/settings.py): their defaults are stated there and nowhere else in the
code, every command's options take them from there, and one check refuses what cannot run."""
from __future__ import annotations

import dataclasses
import io
import tokenize
from pathlib import Path

import click
import pytest

from runtime.settings import DEFAULTS, MAX_EPS, RepairSettings, bounded

ROOT = Path(__file__).resolve().parent.parent
CODE = ["engine", "export", "runtime", "commands", "bench", "cli.py"]


def _sources() -> list[Path]:
    return [p for part in CODE for p in ([ROOT / part] if part.endswith(".py") else (ROOT / part).rglob("*.py"))]


def _default_eps_written(path: Path) -> list[int]:
    """Lines where the code (not a comment or a docstring's prose) writes 16/255: as ``16 / 255`` or ``"16/255"``."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
              if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)]
    lines = [a.start[0] for a, b, c in zip(tokens, tokens[1:], tokens[2:])
             if (a.string, b.string, c.string) == ("16", "/", "255")]
    return lines + [t.start[0] for t in tokens if t.type == tokenize.STRING and t.string.strip("\"'") == "16/255"]


def test_the_default_bound_is_written_once_in_the_code():
    written = {str(p.relative_to(ROOT)): lines for p in _sources() if (lines := _default_eps_written(p))}
    assert written == {"runtime/settings.py": [written.get("runtime/settings.py", [0])[0]]}, written


def test_the_check_can_find_the_default_where_it_is_written(tmp_path):
    # the rule above is only worth something if it sees both spellings
    source = tmp_path / "m.py"
    source.write_text('EPS = 16 / 255  # 16 / 255 in a comment is prose\nTEXT = "16/255"\n')
    assert _default_eps_written(source) == [1, 2]


def test_every_command_offers_the_defaults_of_the_settings():
    from cli import main

    for name, command in [("repair", main.commands["repair"]), ("serve", main.commands["serve"])]:
        params = {p.name: p for p in command.params}
        ctx = click.Context(command)
        for field in ("eps", "steps", "step_size", "seed", "early_exit", "gate_fpr"):
            assert params[field].type_cast_value(ctx, params[field].get_default(ctx)) == getattr(DEFAULTS, field), \
                (name, field)
    from runtime.cli import main as runtime_main

    command = runtime_main.commands["repair"]
    params, ctx = {p.name: p for p in command.params}, click.Context(command)
    for field in ("eps", "steps", "step_size", "seed", "batch_size", "early_exit", "gate_fpr"):
        assert params[field].type_cast_value(ctx, params[field].get_default(ctx)) == getattr(DEFAULTS, field), field


def test_the_record_is_the_opening_of_a_report_config():
    assert list(DEFAULTS.record()) == ["eps", "steps", "step_size", "seed", "batch_size", "early_exit"]
    assert RepairSettings(seed=None).record()["seed"] == "random"
    assert DEFAULTS.batch_seed() == 0
    assert RepairSettings(seed=None).batch_seed() != RepairSettings(seed=None).batch_seed()


@pytest.mark.parametrize("values, message", [
    (dict(eps=-1 / 255), "eps: "), (dict(eps=float("nan")), "not a finite number"), (dict(steps=2.5), "an integer"),
    (dict(steps=-1), "x>=0"), (dict(steps=True), "an integer"), (dict(batch_size=0), "x>=1"),
    (dict(gate_fpr=1.0), "0<x<1"), (dict(gate_fpr=0), "0<x<1"), (dict(seed="0"), "64-bit"),
    (dict(seed=2 ** 63), "64-bit"), (dict(early_exit=1), "True or False"),
])
def test_settings_that_cannot_run_are_refused_naming_the_setting(values, message):
    with pytest.raises(ValueError, match=message):
        RepairSettings(**values)


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS.eps = 0.5


def test_the_bound_rules():
    assert bounded(DEFAULTS) == (DEFAULTS, None)
    none, note = bounded(RepairSettings(eps=0))
    assert none.steps == 0 and "no repair" in note
    with pytest.raises(ValueError, match="beyond 64/255"):
        bounded(RepairSettings(eps=MAX_EPS * 1.01))
    assert bounded(RepairSettings(eps=MAX_EPS * 1.01), allow_large_eps=True)[0].steps == DEFAULTS.steps


def test_a_command_answers_a_setting_it_cannot_run_with_a_usage_error(tmp_path):
    from click.testing import CliRunner

    from runtime.cli import main as runtime_main

    result = CliRunner().invoke(runtime_main, ["repair", "--bundle", str(tmp_path), "--input", str(tmp_path / "in"),
                                               "--output", str(tmp_path / "out"), "--eps", "100/255"])
    assert result.exit_code == 2 and "beyond 64/255" in result.output and "--eps" in result.output
