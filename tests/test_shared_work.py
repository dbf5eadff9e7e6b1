"""Several processes running one command split its chunks: claims are exclusive, a dead process's claim is taken
over, a held chunk is waited for and read back, and two real eval processes compute every chunk once."""
import json
import multiprocessing
import os
import socket
import threading
import time

import engine.eval.evaluate as ev
from engine.eval.shared_work import Claims, for_each_claimed


def test_a_claim_is_held_by_one_process_at_a_time(tmp_path):
    claims, other = Claims(tmp_path), Claims(tmp_path)
    with claims.hold("chunk") as mine:
        assert mine and (tmp_path / "chunk.claim").exists()
        with other.hold("chunk") as theirs:                            # this live process holds it
            assert not theirs
        assert (tmp_path / "chunk.claim").exists()                     # and the refused one left it alone
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
    me = claims.me
    for name, holder in {"reused-pid": {**me, "start": "0"}, "rebooted": {**me, "boot": "another boot"}}.items():
        (tmp_path / f"{name}.claim").write_text(json.dumps({**holder, "since": "then"}))
        with claims.hold(name) as mine:                # a live pid, but not the process that claimed
            assert mine


def _take_over_in_a_process(folder, start_together, out):
    claims = Claims(folder)
    start_together.wait(30)
    with claims.hold("stale") as mine:
        out.put(mine)
        time.sleep(0.5)


def test_two_processes_never_both_take_a_stale_claim_over(tmp_path):
    fork = multiprocessing.get_context("fork")
    dead = fork.Process(target=lambda: None)
    dead.start()
    dead.join()
    for attempt in range(5):
        (tmp_path / "stale.claim").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                          "since": "then"}))
        start_together, out = fork.Barrier(2), fork.Queue()
        runs = [fork.Process(target=_take_over_in_a_process, args=(tmp_path, start_together, out)) for _ in "ab"]
        for run in runs:
            run.start()
        got = sorted(out.get(timeout=30) for _ in runs)
        for run in runs:
            run.join(30)
        assert got == [False, True]
        assert not (tmp_path / "stale.claim").exists()     # the winner released it; the loser did not touch it


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


def _eval_in_a_process(pipeline, config, json_path, stages):
    import torch

    torch.set_num_threads(1)            # a forked child must not use the parent's OpenMP pool (it would hang)
    ev.run_eval(pipeline, config, json_path, progress=False, cache_dir=stages, poll_seconds=0.1)


def test_two_eval_processes_compute_every_chunk_once(tiny_pipeline, fake_test_set, tmp_path, monkeypatch):
    real = ev.Evaluator.run_chunk
    fork = multiprocessing.get_context("fork")
    both_at_work = fork.Barrier(2)
    first = []

    def first_chunks_at_once(self, x, y, seed):       # each process's first chunk waits for the other's: a split
        if not first:
            first.append(seed)
            both_at_work.wait(60)
        return real(self, x, y, seed)
    monkeypatch.setattr(ev.Evaluator, "run_chunk", first_chunks_at_once)
    config = ev.EvalConfig(n=8, chunk=2, attacks=["none"], repairs=["none", "noise"])
    runs = [fork.Process(target=_eval_in_a_process, args=(tiny_pipeline, config, tmp_path / f"{name}.json",
                                                           tmp_path / "stages")) for name in "ab"]
    for run in runs:
        run.start()
    try:
        for run in runs:
            run.join(120)
            assert run.exitcode == 0
    finally:
        for run in runs:
            run.kill()
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
