"""`eval --ray` and `worst-case --ray` (engine/eval/on_ray.py): each chunk a Ray task on the session's local cluster
(2 CPUs: two 1-CPU workers), the table the one a single process writes; a worker killed mid-chunk is run again by
Ray from its last finished stage; a chunk that raises is reported, not retried, and the others are kept."""
import json
import os
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

import engine.eval.evaluate as ev
from cli import main
from tests.conftest import needs_shipped

TIMINGS = ("seconds", "seconds_per_image", "ray")


def drop_timings(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in TIMINGS}


@pytest.fixture(scope="module")
def local_ray(ray_cluster):
    pytest.importorskip("ray.data", reason="needs Ray (the ray extra)")
    return ray_cluster


def on_ray(pipeline):
    from engine.eval.on_ray import RayRun

    return RayRun(lambda: pipeline, worker_cpus=1, threads=1)


def test_eval_on_ray_writes_the_single_process_table(local_ray, tiny_pipeline, fake_test_set, tmp_path):
    config = ev.EvalConfig(n=8, chunk=2, attacks=["none", "pgd"], repairs=["none", "noise", "mtl"], attack_steps=2,
                           repair_steps=2)
    alone = ev.run_eval(tiny_pipeline, config, tmp_path / "alone" / "e.json", progress=False)
    spread = ev.run_eval(tiny_pipeline, config, tmp_path / "ray" / "e.json", progress=False, ray=on_ray(tiny_pipeline))
    assert drop_timings(spread) == drop_timings(alone)
    assert spread["ray"]["tasks"] == 4 and spread["ray"]["runs_again"] == 0
    assert sorted(p.name for p in (tmp_path / "ray" / "stages").iterdir()) == sorted(
        p.name for p in (tmp_path / "alone" / "stages").iterdir())          # the same chunk records, by name
    again = ev.run_eval(tiny_pipeline, config, tmp_path / "ray" / "e.json", progress=False, ray=on_ray(tiny_pipeline))
    assert again["stages"] == {"computed": 0, "reused": 4} and again["ray"]["tasks"] == 0     # read back, none run


class KillsItsWorkerOnce:
    """The identity, except that the first call in a process other than the test's SIGKILLs it (a worker that dies
    mid-chunk: Ray runs its task again); ``marker`` remembers that it happened."""

    def __init__(self, marker, driver: int) -> None:
        self.marker, self.driver = marker, driver

    def __call__(self, x, seed):
        if os.getpid() != self.driver:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))     # one worker of the two, once
            except FileExistsError:
                return x
            os.kill(os.getpid(), signal.SIGKILL)
        return x


def identity_defense(repair=lambda x, seed: x):
    from engine.eval.worst_case import Defense

    return {"identity": Defense(repair=repair, key={"stand-in": "identity"},
                                objective_key={"objective": "the pipeline's"})}


@needs_shipped
def test_worst_case_on_ray_writes_the_single_process_table(local_ray, fake_test_set, tmp_path):
    pytest.importorskip("pyautoattack", reason="needs AutoAttack (pip install -e '.[attacks]')")
    from engine import load_pipeline
    from engine.eval.worst_case import WorstCaseConfig, run_worst_case
    from tests.conftest import SHIPPED
    from tests.test_worst_case import TINY

    shipped = load_pipeline(objective="plain", calibration=SHIPPED / "calibration.json")
    config = WorstCaseConfig(**TINY, repair_steps=5)          # the shipped default repair and the noise control
    alone = run_worst_case(shipped, config, tmp_path / "alone" / "w.json", progress=False)
    spread = run_worst_case(shipped, config, tmp_path / "ray" / "w.json", progress=False, ray=on_ray(shipped))
    assert drop_timings(spread) == drop_timings(alone)
    assert spread["ray"]["tasks"] == 2 and spread["stages"] == alone["stages"]

    # a worker killed in its chunk's first attack on the defense: Ray runs the task again, which reads the stages
    # its first run kept (AutoAttack's) back from the driver's folder
    marker = tmp_path / "worker-killed"
    killed = run_worst_case(shipped, config, tmp_path / "killed" / "w.json", progress=False, ray=on_ray(shipped),
                            defenses=identity_defense(KillsItsWorkerOnce(marker, os.getpid())))
    plain = run_worst_case(shipped, config, tmp_path / "plain" / "w.json", progress=False,
                           defenses=identity_defense())
    assert marker.exists() and killed["ray"]["runs_again"] == 1
    assert drop_timings({**killed, "stages": None}) == drop_timings({**plain, "stages": None})
    assert killed["stages"]["reused"] >= 1 and plain["stages"]["reused"] == 0


def test_a_chunk_that_raises_is_reported_and_the_others_are_kept(local_ray, tiny_pipeline, fake_test_set, tmp_path):
    from tqdm import tqdm

    import engine.eval.on_ray as on_ray_module
    from engine.eval.progress import BarProgress

    config = ev.EvalConfig(n=4, chunk=2, attacks=["none"], repairs=["none", "noise"])
    x, y, _ = ev.eval_subset(4, 0, None, tiny_pipeline.inputs)
    calls = tmp_path / "calls"
    real = ev.Evaluator.run_chunk

    def raises_on_the_second(pipeline, shared, cache, note, x, y, seed):
        with open(calls, "a") as f:
            f.write(f"{seed}\n")
        if seed == 2:
            raise ValueError("this chunk's repair failed")
        return real(ev.Evaluator(pipeline, shared), x, y, seed)
    chunks = [on_ray_module.Chunk(f"images {s}-{s + 1}", {"chunk": s}, lambda s=s: (x[s:s + 2], y[s:s + 2], s))
              for s in (0, 2)]
    with pytest.raises(on_ray_module.ChunkFailures,
                       match=r"1 chunk\(s\) failed on Ray.*\nimages 2-3: .*this chunk's repair failed"):
        on_ray_module.run_chunks(raises_on_the_second, config, chunks, ev.StageCache(tmp_path / "stages", "chunk-"),
                                 on_ray(tiny_pipeline), BarProgress(tqdm(total=2, disable=True)))
    assert sorted(calls.read_text().split()) == ["0", "2"]           # raised once: not run again
    assert len(list((tmp_path / "stages").glob("chunk-*.pt"))) == 1   # the chunk that finished is kept


def test_a_worker_no_node_can_hold_is_refused_before_any_task(local_ray, tiny_pipeline, tmp_path):
    from tqdm import tqdm

    from engine.eval.on_ray import Chunk, RayRun, run_chunks
    from engine.eval.progress import BarProgress

    config = ev.EvalConfig(n=2, chunk=2, attacks=["none"], repairs=["none"])
    too_big = RayRun(lambda: tiny_pipeline, worker_cpus=64)
    with pytest.raises(ValueError, match="no node of the Ray cluster has what one worker asks for .64 CPUs"):
        run_chunks(ev.eval_chunk_task, config, [Chunk("images 0-1", {"chunk": 0}, tuple)],
                   ev.StageCache(tmp_path, "chunk-"), too_big, BarProgress(tqdm(total=1, disable=True)))


def test_ray_options_apply_only_with_ray():
    result = CliRunner().invoke(main, ["worst-case", "--worker-gpus", "1"])
    assert result.exit_code == 2 and "--worker-gpus only apply with --ray" in result.output
    result = CliRunner().invoke(main, ["eval", "--ray-address", "auto"])
    assert result.exit_code == 2 and "--ray-address only apply with --ray" in result.output


def test_the_commands_hand_their_ray_settings_on(monkeypatch, tmp_path):
    """`eval --ray` builds a RayRun whose workers load the model set as the driver did."""
    pytest.importorskip("ray.data", reason="needs Ray (the ray extra)")
    seen = {}

    def fake_run_eval(pipeline, config, json_path, data_root, progress, cache_dir, ray):
        seen["ray"] = ray
        raise ValueError("stop here")
    monkeypatch.setattr(ev, "run_eval", fake_run_eval)
    result = CliRunner().invoke(main, ["eval", "--n", "2", "--attacks", "none", "--repairs", "none", "--ray",
                                       "--worker-cpus", "2", "--threads", "1"])
    assert result.exit_code == 2 and "stop here" in result.output, result.output
    run = seen["ray"]
    assert (run.worker_cpus, run.worker_gpus, run.task_threads) == (2, 0, 1)
    assert run.make_pipeline.keywords["tasks"] and run.make_pipeline.keywords["objective"] == "plain"
    assert all(value.is_absolute() for value in run.make_pipeline.keywords.values() if isinstance(value, Path))
    assert json.loads(json.dumps(run.make_pipeline.keywords, default=str))["device"] == "cpu"


def test_the_bar_counts_a_chunk_run_again_once():
    """Stages a killed run of a chunk reported come off the bar when the chunk starts again: the bar ends at its total,
    not past it."""
    import io

    from tqdm import tqdm

    from engine.eval.progress import BarProgress

    bar = tqdm(total=4, file=io.StringIO())
    shown = BarProgress(bar, weight=lambda i: 4)
    shown.advance("autoattack", False)                 # the first run: one stage, then its worker died
    shown.forget([False])
    shown.advance("autoattack", True)                  # the second run reads it back, then computes the rest
    for stage in ("apgd-ce", "apgd-dlr", "score"):
        shown.advance(stage, False)
    assert (bar.n, bar.total) == (3, 3)
