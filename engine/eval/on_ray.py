"""The chunks of an evaluation as Ray tasks: `cli.py eval --ray` and `cli.py worst-case --ray`.

The driver plans the run as a single process does (the images, every chunk's key), reads back the chunks its stage
folder holds already, and gives every other chunk to Ray as a task. A task loads the model set once per worker
process (``RayRun.make_pipeline``), runs its chunk, and keeps each stage's output in the *driver's* folder through an
actor on the driver's machine (``StageFolder``): workers need no shared filesystem, a chunk whose worker died resumes
from its last finished stage when Ray runs it again, and a killed driver resumes as a single-process run does. The
outcomes a task returns are the chunk's record, written by the driver; the table is the one a single process writes
(tests/test_eval_on_ray.py), apart from its timings and a ``ray`` entry saying how it ran.

A task whose worker process or node dies is run again by Ray, up to ``RayRun.retries`` times; one that raises is not
(the code is deterministic: it would raise again). A chunk that fails either way is reported with its error once the
others are done, and the run stops naming it (``ChunkFailures``), every finished chunk kept for the next run.

Example::

    outputs, facts = run_chunks(chunk_task, (config, None), chunks, records, RayRun(make_pipeline, worker_cpus=1),
                                progress)
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from runtime.ray_folder import connect_ray, import_ray, quiet_ray_logs

from ..pipeline import Pipeline
from .progress import BarProgress
from .stage_cache import StageCache, StageFiles


@dataclass(frozen=True)
class RayRun:
    """How the chunks run on Ray: ``make_pipeline()`` (pickled to the workers: what it reads must be there, as for
    `repair --ray`) builds the model set on a worker; each task takes ``worker_cpus`` CPUs and ``worker_gpus``
    GPUs, and runs torch on ``threads`` threads (default: its CPUs, at least 1)."""
    make_pipeline: Callable[[], Pipeline]
    address: str | None = None        # None: a local cluster, started for the run (or the one this process joined)
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0
    threads: int | None = None
    retries: int = 3                  # runs again of a task whose worker or node died

    @property
    def task_threads(self) -> int:
        return self.threads or max(1, int(self.worker_cpus))


@dataclass(frozen=True)
class Chunk:
    """One chunk of work: ``label`` names it in messages, ``parts`` keys its record (None: not kept), ``inputs()``
    gives what its work takes beyond the run's shared state (asked only where the chunk is computed)."""
    label: str
    parts: dict | None
    inputs: Callable[[], tuple]


def chunk_label(start: int, size: int, n: int) -> str:
    """How messages name the chunk of ``size`` images from ``start`` (of ``n``)."""
    return f"images {start}-{min(start + size, n) - 1}"


def run_chunks_here(compute: Callable[..., Any], chunks: list[Chunk], records: StageCache,
                    progress: BarProgress) -> list[Any]:
    """``run_chunks`` in this process: each chunk's output read back from ``records``, or ``compute(*inputs())``
    and kept there."""
    outputs = []
    for i, chunk in enumerate(chunks):
        done = records.run(chunk.parts, lambda: compute(*chunk.inputs()))
        progress.chunk_done(i, done.reused)
        outputs.append(done.output)
    return outputs


class ChunkFailures(RuntimeError):
    """Chunks that failed on Ray (after Ray's retries), each with its error."""


class StageFolder:
    """The actor through which tasks read and write the driver's stage folder (``folder`` None: nothing is kept),
    and leave the events the driver's progress shows."""

    def __init__(self, folder: str | None) -> None:
        self.files = StageFiles(Path(folder)) if folder else None
        self.events: list[tuple] = []

    def read(self, name: str) -> bytes | None:
        return self.files.read(name)

    def write(self, name: str, data: bytes) -> None:
        self.files.write(name, data)

    def note(self, event: tuple) -> None:
        self.events.append(event)

    def take(self) -> list[tuple]:
        events, self.events = self.events, []
        return events


class RemoteFiles:
    """``StageFiles``' face over a ``StageFolder`` actor: a task's stages kept in its driver's folder."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def read(self, name: str) -> bytes | None:
        import ray

        return ray.get(self.folder.read.remote(name))

    def write(self, name: str, data: bytes) -> None:
        import ray

        ray.get(self.folder.write.remote(name, data))


_loaded: dict[str, Pipeline] = {}        # on a worker: the model set of the run it last served, loaded once


def _task(run_id: str, make_pipeline: Callable[[], Pipeline], work: Callable, shared: Any, folder, kept: bool,
          threads: int, index: int, *args) -> tuple[Any, float, int, int]:
    """On a worker: ``work(pipeline, shared, cache, note, *args)`` with a cache kept in the driver's folder; returns
    (its output, its seconds, the cache's hits and misses)."""
    import ray

    torch.set_num_threads(threads)
    ray.get(folder.note.remote(("start", index)))     # delivered before anything can kill this run
    if run_id not in _loaded:
        _loaded.clear()
        _loaded[run_id] = make_pipeline()
    cache = StageCache(None, files=RemoteFiles(folder)) if kept else StageCache(None)
    start = time.perf_counter()
    output = work(_loaded[run_id], shared, cache, lambda *event: folder.note.remote((event[0], index, *event[1:])),
                  *args)
    seconds = time.perf_counter() - start
    ray.get(folder.note.remote(("end", index)))     # after this task's notes, which the driver then has all of
    return output, seconds, cache.hits, cache.misses


def concurrent_tasks(ray, run: RayRun) -> int:
    """How many tasks the cluster runs at once (its nodes as they are now); ValueError where no node has what one
    task asks for, which Ray would wait for without a word."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    fit = lambda r: min(int(r.get("CPU", 0) // run.worker_cpus),
                        int(r.get("GPU", 0) // run.worker_gpus) if run.worker_gpus else len(nodes) * 10**6)
    slots = sum(fit(r) for r in nodes)
    if slots < 1:
        most = max(nodes, key=lambda r: (r.get("CPU", 0), r.get("GPU", 0)), default={})
        raise ValueError(f"no node of the Ray cluster has what one worker asks for ({run.worker_cpus:g} CPUs and "
                         f"{run.worker_gpus:g} GPUs: --worker-cpus, --worker-gpus); its largest has "
                         f"{most.get('CPU', 0):g} CPUs and {most.get('GPU', 0):g} GPUs")
    return slots


def run_chunks(work: Callable, shared: Any, chunks: list[Chunk], records: StageCache, run: RayRun,
               progress: BarProgress, stages: StageCache | None = None) -> tuple[list[Any], dict]:
    """Every chunk's output in order: read back from ``records`` where kept, else ``work`` (a module-level function,
    ``work(pipeline, shared, cache, note, *chunk.inputs())``; ``note("begin", stage)`` and ``note("advance", stage,
    reused)`` reach ``progress``) as a Ray task, its output kept in ``records``. ``stages`` (default ``records``)
    counts the tasks' stage hits and misses. Returns the outputs and what the run was (workers' CPUs, tasks, runs
    again)."""
    ray = import_ray()
    outputs: list[Any] = [None] * len(chunks)
    todo = []
    for i, chunk in enumerate(chunks):
        found = records.get(chunk.parts)
        if found is None:
            todo.append(i)
        else:
            records.hits += 1
            outputs[i] = found.output
            progress.chunk_done(i, True)
    facts = {"worker_cpus": run.worker_cpus, "worker_gpus": run.worker_gpus, "threads": run.task_threads,
             "tasks": len(todo), "runs_again": 0}
    if not todo:
        return outputs, facts
    started_here = not ray.is_initialized()
    if started_here:
        quiet_ray_logs()
        connect_ray(ray, run.address)
    try:
        tasks = Tasks(ray, run, chunks, records, stages or records, progress, facts)
        try:
            failures = tasks.run(work, shared, todo, outputs)
        finally:
            tasks.close()
    finally:
        if started_here:
            ray.shutdown()
    if failures:
        kept = f"; the finished chunks are kept in {records.folder}: run the command again" if records.folder else ""
        raise ChunkFailures(f"{len(failures)} chunk(s) failed on Ray{kept}:\n" + "\n".join(failures))
    return outputs, facts


class Tasks:
    """The driver's side of one run on Ray: the stage folder's actor on this node, at most as many tasks in flight as
    the cluster runs at once (a task waiting on the actor gives its CPU back to Ray, which would start another chunk
    in it), the tasks' notes shown as they come."""

    def __init__(self, ray, run: RayRun, chunks: list[Chunk], records: StageCache, stages: StageCache,
                 progress: BarProgress, facts: dict) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray, self.run_settings, self.chunks, self.records, self.stages = ray, run, chunks, records, stages
        self.progress, self.facts = progress, facts
        self.slots = concurrent_tasks(ray, run)
        facts["cluster_cpus"] = ray.cluster_resources().get("CPU", 0)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.folder = ray.remote(StageFolder).options(num_cpus=0, scheduling_strategy=here).remote(
            str(records.folder.resolve()) if records.folder is not None else None)
        self.pending: dict = {}
        self.starts: dict[int, int] = {}
        self.advanced: dict[int, list[bool]] = {}        # each chunk's stages reported so far (reused or not)

    def run(self, work: Callable, shared: Any, todo: list[int], outputs: list[Any]) -> list[str]:
        """Every chunk of ``todo`` run, its output in ``outputs``; returns the failures, one line each."""
        run, ray, failures = self.run_settings, self.ray, []
        task = ray.remote(_task).options(num_cpus=run.worker_cpus, num_gpus=run.worker_gpus, max_retries=run.retries,
                                         retry_exceptions=False)
        run_id, make, shared_ref = uuid.uuid4().hex, ray.put(run.make_pipeline), ray.put(shared)
        waiting = list(todo)
        while waiting or self.pending:
            while waiting and len(self.pending) < self.slots:
                i = waiting.pop(0)
                self.pending[task.remote(run_id, make, work, shared_ref, self.folder, self.records.folder is not None,
                                         run.task_threads, i, *self.chunks[i].inputs())] = i
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=0.5)
            self.show(ray.get(self.folder.take.remote()))
            for ref in ready:
                i = self.pending.pop(ref)
                try:
                    output, seconds, hits, misses = ray.get(ref)
                except Exception as e:  # noqa: BLE001  (each failure is reported with its chunk once all are done)
                    why = (str(e).strip().splitlines() or [""])[-1]
                    failures.append(f"{self.chunks[i].label}: {type(e).__name__}: {why}")
                    self.progress.say(f"failed: {failures[-1]}")
                    continue
                self.records.put(self.chunks[i].parts, output, seconds)
                self.records.misses += 1
                self.stages.hits, self.stages.misses = self.stages.hits + hits, self.stages.misses + misses
                outputs[i] = output
                self.progress.chunk_done(i, False)
        return failures

    def show(self, events: list[tuple]) -> None:
        for kind, i, *rest in events:
            if kind == "start":
                self.starts[i] = self.starts.get(i, 0) + 1
                if self.starts[i] > 1:                 # what its last run reported is counted again by this one
                    self.facts["runs_again"] += 1
                    self.progress.forget(self.advanced.pop(i, []))
                    self.progress.say(f"{self.chunks[i].label}: its worker stopped (process or node gone); Ray runs "
                                      f"it again (run {self.starts[i]}), from its last finished stage")
            elif kind == "advance":
                self.advanced.setdefault(i, []).append(rest[1])
                self.progress.advance(*rest)
            elif kind == "begin":
                self.progress.begin(*rest)

    def close(self) -> None:
        """Cancels what still runs (a driver stopped: Ctrl-C) and ends the folder's actor."""
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        self.ray.kill(self.folder)
