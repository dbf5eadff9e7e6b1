"""Several processes running one command split its chunks: claims are exclusive, a dead process's claim is taken
over, a held chunk is waited for and read back, and two real eval processes compute every chunk once."""
import json
import multiprocessing
import os
import socket
import threading
import time

import engine.evaluate as ev
from engine.shared_work import Claims, for_each_claimed


def test_a_claim_is_held_by_one_process_at_a_time(tmp_path):
    claims, other = Claims(tmp_path), Claims(tmp_path)
    with claims.hold("chunk") as mine:
        assert mine and (tmp_path / "chunk.claim").exists()
        other.me = {"host": other.me["host"], "pid": os.getppid()}        # a live process of this machine
        with other.hold("chunk") as theirs:
            assert not theirs
    assert not (tmp_path / "chunk.claim").exists()
    with Claims(None).hold("anything") as mine:                        # no folder: nothing to share
        assert mine


def test_a_dead_process_claim_is_taken_over_and_another_machine_s_is_not(tmp_path):
    dead = multiprocessing.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join()
    (tmp_path / "a.claim").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "then"}))
    (tmp_path / "b.claim").write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    claims = Claims(tmp_path)
    with claims.hold("a") as mine:
        assert mine
    with claims.hold("b") as mine:
        assert not mine
    assert claims.holder("b") == "elsewhere:1 since then"


def test_a_chunk_held_elsewhere_is_waited_for_then_read_back(tmp_path):
    done, messages = [], []
    other = Claims(tmp_path)
    held, release = threading.Event(), threading.Event()

    def another_process():
        with other.hold("1"):
            held.set()
            release.wait(5)
    thread = threading.Thread(target=another_process)
    thread.start()
    held.wait(5)
    threading.Timer(0.3, release.set).start()
    claims = Claims(tmp_path)
    claims._stale = lambda path: False                 # the same pid here: the thread's claim is a live one
    out = for_each_claimed([0, 1, 2], claims, str, lambda i: done.append(i) or i * 10, poll_seconds=0.05,
                           say=messages.append)
    thread.join()
    assert out == [0, 10, 20] and done == [0, 2, 1]    # chunk 1 last, once its holder let it go
    assert messages and "waiting for 1 chunk" in messages[0]


def _eval_in_a_process(pipeline, config, json_path, stages, start_together=None):
    import torch

    torch.set_num_threads(1)            # a forked child must not use the parent's OpenMP pool (it would hang)
    if start_together is not None:
        start_together.wait(30)
    ev.run_eval(pipeline, config, json_path, progress=False, cache_dir=stages, poll_seconds=0.1)


def test_two_eval_processes_compute_every_chunk_once(tiny_pipeline, fake_test_set, tmp_path, monkeypatch):
    real = ev.Evaluator.run_chunk

    def slow_chunk(self, x, y, seed):                  # long enough that both processes are at work at once
        time.sleep(0.5)
        return real(self, x, y, seed)
    monkeypatch.setattr(ev.Evaluator, "run_chunk", slow_chunk)
    config = ev.EvalConfig(n=8, chunk=2, attacks=["none"], repairs=["none", "noise"])
    fork = multiprocessing.get_context("fork")
    start_together = fork.Barrier(2)
    runs = [fork.Process(target=_eval_in_a_process, args=(tiny_pipeline, config, tmp_path / f"{name}.json",
                                                           tmp_path / "stages", start_together)) for name in "ab"]
    for run in runs:
        run.start()
    for run in runs:
        run.join(120)
        assert run.exitcode == 0
    a, b = (json.loads((tmp_path / f"{name}.json").read_text()) for name in "ab")
    assert a["stages"]["computed"] + b["stages"]["computed"] == 4
    assert a["stages"]["computed"] >= 1 and b["stages"]["computed"] >= 1
    assert a["rows"] == b["rows"] and a["mcnemar"] == b["mcnemar"]
    assert not list((tmp_path / "stages").glob("*.claim"))


def test_a_killed_process_s_chunk_is_taken_over_by_the_next_run(tiny_pipeline, fake_test_set, tmp_path,
                                                                monkeypatch):
    """A process killed mid-chunk (SIGKILL: no cleanup) leaves its claim; a later run on this machine takes it over."""
    config = ev.EvalConfig(n=4, chunk=2, attacks=["none"], repairs=["none"])
    real = ev.Evaluator.run_chunk
    calls = []

    def killed_in_the_second(self, x, y, seed):
        calls.append(seed)
        if len(calls) == 2:
            os.kill(os.getpid(), 9)
        return real(self, x, y, seed)
    monkeypatch.setattr(ev.Evaluator, "run_chunk", killed_in_the_second)
    run = multiprocessing.get_context("fork").Process(
        target=_eval_in_a_process, args=(tiny_pipeline, config, tmp_path / "e.json", tmp_path / "stages"))
    run.start()
    run.join(60)
    assert run.exitcode == -9 and len(list((tmp_path / "stages").glob("*.claim"))) == 1
    monkeypatch.setattr(ev.Evaluator, "run_chunk", real)
    result = ev.run_eval(tiny_pipeline, config, tmp_path / "e.json", progress=False, poll_seconds=0.1)
    assert result["stages"] == {"computed": 1, "reused": 1}
    assert not list((tmp_path / "stages").glob("*.claim"))
