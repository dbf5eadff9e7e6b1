"""Statistics against scipy, the eval JSON schema, resuming, and the attack command."""
import json

import pytest
from click.testing import CliRunner
from scipy import stats

import engine.eval.evaluate as ev
from cli import main
from engine.eval.stats import mcnemar_exact, wilson_interval


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (59, 100), (870, 1000), (200, 200)])
def test_wilson_matches_scipy(k, n):
    reference = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((reference.low, reference.high), abs=1e-9)


@pytest.mark.parametrize("a_only, b_only", [(0, 0), (5, 1), (12, 30), (40, 40), (0, 9)])
def test_mcnemar_matches_an_exact_binomial_test(a_only, b_only):
    a = [True] * a_only + [False] * b_only + [True] * 7 + [False] * 3
    b = [False] * a_only + [True] * b_only + [True] * 7 + [False] * 3
    result = mcnemar_exact(a, b)
    expected = 1.0 if a_only + b_only == 0 else stats.binomtest(a_only, a_only + b_only, 0.5).pvalue
    assert (result["a_only"], result["b_only"]) == (a_only, b_only)
    assert result["p"] == pytest.approx(expected, rel=1e-9)


FAST = dict(n=6, chunk=3, attacks=["none", "pgd", "aware", "bpda-eot"],
            repairs=["none", "noise", "contrastive", "mtl"], attack_steps=2, repair_steps=2, bpda_steps=1,
            bpda_eot=1, bpda_repair_steps=1)


def test_eval_json_schema_and_table(tiny_pipeline, fake_test_set, tmp_path):
    result = ev.run_eval(tiny_pipeline, ev.EvalConfig(**FAST), tmp_path / "eval.json", progress=False)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["n"] == 6 and {"rows", "mcnemar", "config", "seconds"} <= set(saved)
    assert len(saved["rows"]) == 16
    for row in saved["rows"]:
        assert set(row) == {"attack", "repair", "accuracy", "ci95", "n", "repaired_fraction", "ssl_loss_mean"}
        assert row["n"] == 6 and row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
        assert set(row["ssl_loss_mean"]) == {"contrastive", "inpainting", "rotation"}
        assert row["repaired_fraction"] == (0.0 if row["repair"] == "none" else 1.0)
    pairs = {(t["a"], t["b"]) for t in saved["mcnemar"]}
    assert ("pgd/none", "pgd/mtl") in pairs and ("none/none", "none/mtl") in pairs
    assert ("bpda-eot/noise", "bpda-eot/contrastive") in pairs and ("pgd/noise", "pgd/mtl") in pairs
    assert len(list((tmp_path / "stages").glob("chunk-*.pt"))) == 2                 # the repository keeps these
    table = ev.markdown_table(result)
    assert table.count("\n| ") >= 4 and "pgd/none vs pgd/mtl" in table and "mean SSL loss" in table
    ev.plot(result, tmp_path / "eval.png")
    assert (tmp_path / "eval.png").stat().st_size > 1000


def test_an_interrupted_eval_resumes(tiny_pipeline, fake_test_set, tmp_path, monkeypatch):
    config = ev.EvalConfig(**{**FAST, "attacks": ["none"], "repairs": ["none", "noise"]})
    calls = []
    real = ev.Evaluator.run_chunk

    def fail_on_second(self, x, y, seed):
        calls.append(seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, x, y, seed)

    monkeypatch.setattr(ev.Evaluator, "run_chunk", fail_on_second)
    ticks = iter(range(10**6))      # every timed step takes exactly 1 s
    monkeypatch.setattr(ev.time, "perf_counter", lambda: float(next(ticks)))
    with pytest.raises(KeyboardInterrupt):
        ev.run_eval(tiny_pipeline, config, tmp_path / "eval.json", progress=False)
    assert len(list((tmp_path / "stages").glob("*.pt"))) == 1
    monkeypatch.setattr(ev.Evaluator, "run_chunk", real)
    result = ev.run_eval(tiny_pipeline, config, tmp_path / "eval.json", progress=False)
    assert all(row["n"] == 6 for row in result["rows"]) and result["stages"] == {"computed": 1, "reused": 1}
    # the seconds cover both chunks, the one run before the interruption too
    assert result["seconds"]["repair noise"] == result["seconds"]["attack none"] == 2.0


def test_an_eval_with_other_weights_does_not_resume_from_the_first_ones(tiny_pipeline, fake_test_set, tmp_path,
                                                                       monkeypatch):
    import dataclasses

    config = ev.EvalConfig(**{**FAST, "attacks": ["none"], "repairs": ["none"]})
    real = ev.Evaluator.run_chunk

    def interrupt_after_one(self, x, y, seed):
        if seed != config.seed:
            raise KeyboardInterrupt
        return real(self, x, y, seed)

    monkeypatch.setattr(ev.Evaluator, "run_chunk", interrupt_after_one)
    other = dataclasses.replace(tiny_pipeline, manifests={**tiny_pipeline.manifests,
                                                          "classifier": {"sha256": "another model"}})
    for pipeline in (tiny_pipeline, other):
        with pytest.raises(KeyboardInterrupt):
            ev.run_eval(pipeline, config, tmp_path / "eval.json", progress=False)
    assert len(list((tmp_path / "stages").glob("*.pt"))) == 2


def test_the_progress_file_of_an_older_version_is_named_not_read(tiny_pipeline, fake_test_set, tmp_path):
    (tmp_path / "eval.partial-0123456789ab.json").write_text('{"chunks": {}}')
    config = ev.EvalConfig(**{**FAST, "attacks": ["none"], "repairs": ["none"]})
    with pytest.warns(UserWarning, match="eval.partial-0123456789ab.json is the saved progress of an older version"):
        ev.run_eval(tiny_pipeline, config, tmp_path / "eval.json", progress=False)


def test_a_run_over_more_images_reuses_the_chunks_of_a_smaller_one(tiny_pipeline, fake_test_set, tmp_path):
    config = ev.EvalConfig(**{**FAST, "n": 3, "attacks": ["none", "pgd"], "repairs": ["none", "noise"]})
    small = ev.run_eval(tiny_pipeline, config, tmp_path / "small.json", progress=False, cache_dir=tmp_path / "st")
    config.n = 6
    large = ev.run_eval(tiny_pipeline, config, tmp_path / "large.json", progress=False, cache_dir=tmp_path / "st")
    assert large["stages"] == {"computed": 1, "reused": 1}
    rows = lambda result: {(r["attack"], r["repair"]): r for r in result["rows"]}
    fresh = ev.run_eval(tiny_pipeline, config, None, progress=False)
    assert {k: (r["accuracy"], r["n"]) for k, r in rows(large).items()} == \
        {k: (r["accuracy"], r["n"]) for k, r in rows(fresh).items()}
    assert all(r["n"] == 3 for r in small["rows"])
    config.attack_steps = 3                          # anything else changed: computed afresh
    assert ev.run_eval(tiny_pipeline, config, None, progress=False, cache_dir=tmp_path / "st")["stages"] == \
        {"computed": 2, "reused": 0}


def test_eval_cli_rejects_unknown_names(tiny_weights):
    result = CliRunner().invoke(main, ["eval", "--attacks", "pgd,cw", "--weights", str(tiny_weights)])
    assert result.exit_code == 2 and "unknown cw" in result.output


def test_attack_cli_writes_pngs_labels_and_summary(tiny_weights, fake_test_set, tmp_path):
    out, clean = tmp_path / "attacked", tmp_path / "clean"
    args = ["attack", "--output", str(out), "--clean-output", str(clean), "--n", "5", "--steps", "3",
            "--weights", str(tiny_weights)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.png"))) == 5 and len(list(clean.glob("*.png"))) == 5
    summary = json.loads((out / "attack.json").read_text())
    assert summary["accuracy_attacked_png"] <= summary["accuracy_clean"]
    assert (out / "labels.csv").read_text().startswith("file,test_index,label,class,pred_clean,pred_attacked")
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "already exists" in again.output
    # the attacked folder repairs cleanly: labels.csv and attack.json are skipped, accuracy is reported
    repaired = CliRunner().invoke(main, ["repair", "--input", str(out), "--output", str(tmp_path / "rep"),
                                         "--weights", str(tiny_weights), "--steps", "1", "--quiet"])
    assert repaired.exit_code == 0, repaired.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["summary"]["n_skipped"] == 2 and report["summary"]["n_labelled"] == 5


def test_eval_alpha_weights_the_repair_objectives(tiny_pipeline):
    evaluator = ev.Evaluator(tiny_pipeline, ev.EvalConfig(alpha=[0.5, 0.0, 2.0]))
    assert evaluator.objectives["mtl"].alpha == {"contrastive": 0.5, "inpainting": 0.0, "rotation": 2.0}
    assert evaluator.objectives["contrastive"].alpha == {"contrastive": 0.5}
    result = CliRunner().invoke(main, ["eval", "--alpha", "1,2"])
    assert result.exit_code == 2 and "2 weight(s) for 3 task(s)" in result.output


def test_chunk_keys_tell_classifiers_without_a_file_apart(tiny_pipeline):
    """A classifier passed in as a module has no file to hash: its parameters name it, so another module's outcomes
    are never read back for it."""
    import copy
    import dataclasses

    import torch

    no_file = {**tiny_pipeline.manifests, "classifier": {"sha256": None}}
    a = dataclasses.replace(tiny_pipeline, manifests=no_file)
    other = copy.deepcopy(tiny_pipeline.classifier)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    b = dataclasses.replace(tiny_pipeline, manifests=no_file, classifier=other)
    config = ev.EvalConfig(n=2)
    assert ev.run_parts(a, config) != ev.run_parts(b, config)
    assert ev.run_parts(a, config) == ev.run_parts(dataclasses.replace(a), config)
