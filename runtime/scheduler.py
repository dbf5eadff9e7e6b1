"""Continuous batching of the repair loop: between two steps, images that left the loop give their places to waiting
ones (iteration-level scheduling, as LLM servers run their decode loops: Orca, vLLM).

A static batch lasts as long as its slowest image: with the early exit most images leave within a few steps, and
their slots idle until the last one is done. ``SteppedRepair`` instead holds up to ``capacity`` images in flight,
each with its own draws (runtime/draws.py: a generator per image and task, seeded by the image's own pixels), its
own step count and its own key; ``join`` admits images, ``step`` runs one repair step on every image in flight and
returns the rows of those that left. Because an image's draws and arithmetic never depend on its batch-mates
(docs/design.md, principle 3), an image's result is the same whatever joined or left around it — the rows are those
of ``Bundle.repair_batch`` and engine/folder.py's ``repair_batch``, byte for byte (tests/test_scheduler.py).

The engine is a ``StepKernel``: the exported step graph in onnxruntime (runtime/bundle.py) or the PyTorch reference
(engine/stepper.py). ``ContinuousBatcher`` drives one on a replica's worker thread from asyncio (runtime/serve.py).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Iterator, Protocol

import numpy as np

from .draws import StepDraws
from .folder import image_rows
from .imageio import quantize
from .settings import RepairSettings
from .step_loop import start_point

Params = dict[str, dict[str, np.ndarray]]             # task -> key -> array, the first axis the images
log = logging.getLogger("ray.serve")


class StepKernel(Protocol):
    """What the scheduler needs of an engine: forward passes and one repair step, on numpy arrays."""
    classes: list[str]
    views: dict[str, int | None]          # each task of the objective, in its order -> its views (None: no draws)
    levels: dict[str, float] | None       # the clean levels (None: a plain objective, which never exits early)

    def logits(self, x: np.ndarray) -> np.ndarray: ...

    def task_losses(self, x: np.ndarray, params: Params) -> dict[str, np.ndarray]: ...

    def combine(self, losses: dict[str, np.ndarray]) -> np.ndarray: ...

    def gate_score(self, losses: dict[str, np.ndarray]) -> np.ndarray: ...

    def gate_threshold(self, fpr: float) -> float: ...

    def step(self, x: np.ndarray, x0: np.ndarray, params: Params, eps: float,
             step_size: float) -> tuple[np.ndarray, np.ndarray]:
        """(x after one projected sign-gradient step, the objective at x) for a batch."""


@dataclass
class InFlight:
    """One image in the loop: its input, where it stands, its draws, and what its row will need."""
    key: Hashable
    x0: np.ndarray                         # 3×S×S float32
    x: np.ndarray
    draws: StepDraws
    first: Params                          # the first step's draws: the losses before and after use them
    before: dict[str, np.ndarray]          # task losses of x0 (each a 1-array)
    logits_before: np.ndarray
    gate: dict | None
    trace: np.ndarray                      # steps, NaN after the image left
    steps_run: int = 0


def _cat(parts: list[Params]) -> Params:
    return {task: {key: np.concatenate([p[task][key] for p in parts]) for key in parts[0][task]} for task in parts[0]}


def _row(values: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {k: v[i:i + 1] for k, v in values.items()}


@dataclass
class SteppedRepair:
    """Up to ``capacity`` images in the repair loop at once (thread-confined: one thread calls it). Its rows are
    runtime/folder.py's ``image_rows``, as a static batch gives them."""
    kernel: StepKernel
    settings: RepairSettings
    capacity: int
    # a newcomer joins only while every image in the loop has run fewer steps than this (None: whenever a place is
    # free): an image that needs many steps then finishes in a loop that empties around it, as in a static batch,
    # instead of paying for a full loop at every step
    join_before_step: int | None = None
    in_flight: list[InFlight] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"the loop holds at least one image, not {self.capacity}")
        self.threshold = (None if self.settings.gate_fpr is None
                          else self.kernel.gate_threshold(self.settings.gate_fpr))
        self.exits = self.settings.early_exit and self.kernel.levels is not None

    @property
    def free(self) -> int:
        """Places a newcomer may take now."""
        limit = self.join_before_step
        if limit is not None and any(item.steps_run >= limit for item in self.in_flight):
            return 0
        return self.capacity - len(self.in_flight)

    def join(self, keys: list[Hashable], images: np.ndarray) -> list[tuple[Hashable, dict]]:
        """Admit ``images`` (N×3×S×S, N ≤ ``free``) under ``keys``; the rows of those that need no step (gated out,
        or ``steps`` 0) come back at once."""
        if len(keys) > self.free:
            raise ValueError(f"{len(keys)} images do not fit in the {self.free} free places of the loop (capacity "
                             f"{self.capacity}, {len(self.in_flight)} in it)")
        if not len(keys):
            return []
        images = np.ascontiguousarray(images, dtype=np.float32)
        seeds = [self.settings.batch_seed() for _ in keys]
        draws = [StepDraws(image[None], seed, self.kernel.views) for image, seed in zip(images, seeds)]
        first = [d.next() for d in draws]            # step 0's draws, drawn once: the loop's first step uses them
        before = self.kernel.task_losses(images, _cat(first))
        logits = self.kernel.logits(images)
        flagged = np.ones(len(keys), dtype=bool)
        gate = None
        if self.threshold is not None:
            score = self.kernel.gate_score(before)
            flagged = score > self.threshold
            gate = {"gate_score": [round(float(v), 6) for v in score], "gated_out": (~flagged).tolist()}
        steps, eps = self.settings.steps, self.settings.eps
        joined = []
        for i, key in enumerate(keys):
            x = start_point(images[i:i + 1], seeds[i], eps)[0] if flagged[i] else images[i].copy()
            joined.append(InFlight(key, images[i], x, draws[i], first[i], _row(before, i), logits[i:i + 1],
                                   None if gate is None else {k: v[i:i + 1] for k, v in gate.items()},
                                   np.full(steps, np.nan, dtype=np.float32)))
        done = [item for item, f in zip(joined, flagged) if not f or steps == 0]
        self.in_flight += [item for item, f in zip(joined, flagged) if f and steps > 0]
        return self.finish(done)

    def step(self) -> list[tuple[Hashable, dict]]:
        """One repair step on every image in flight; the rows of the images that left (objective zero with the early
        exit, or every step run)."""
        if not self.in_flight:
            return []
        items = self.in_flight
        params = _cat([item.first if item.steps_run == 0 else item.draws.next() for item in items])
        x_next, loss = self.kernel.step(np.stack([i.x for i in items]), np.stack([i.x0 for i in items]), params,
                                        self.settings.eps, self.settings.step_size)
        left = []
        for item, x, value in zip(items, x_next, loss):
            item.x, item.trace[item.steps_run] = x, value
            item.steps_run += 1
            if (self.exits and value == 0) or item.steps_run == self.settings.steps:
                left.append(item)
        self.in_flight = [item for item in items if item not in left]
        return self.finish(left)

    def drop(self, keys: set) -> None:
        """Let go of the images under ``keys`` (their callers left): their places are free at the next step."""
        self.in_flight = [item for item in self.in_flight if item.key not in keys]

    def finish(self, items: list[InFlight]) -> list[tuple[Hashable, dict]]:
        """The rows of images that left the loop, their forward passes after the repair run together."""
        if not items:
            return []
        x0 = np.stack([i.x0 for i in items])
        repaired = quantize(np.stack([i.x for i in items]))
        after = self.kernel.task_losses(repaired, _cat([i.first for i in items]))
        before = {t: np.concatenate([i.before[t] for i in items]) for t in items[0].before}
        gates = [i.gate for i in items]
        gate = None if gates[0] is None else {k: [v for g in gates for v in g[k]] for k in gates[0]}
        rows = image_rows(repaired, x0, np.concatenate([i.logits_before for i in items]),
                          self.kernel.logits(repaired), before, after, self.kernel.combine(before),
                          self.kernel.combine(after), self.kernel.classes, gate,
                          np.stack([i.trace for i in items], axis=1))
        return [(item.key, row) for item, row in zip(items, rows)]


def stream(loop: SteppedRepair, items: Iterable[tuple[Hashable, np.ndarray]]) -> Iterator[tuple[Hashable, dict]]:
    """Every (key, image) of ``items`` through ``loop``, joining as places free up: (key, row) in the order the
    images leave (a folder repair: the next image starts as soon as one is done, not when its batch is)."""
    pending, exhausted = iter(items), False
    while True:
        joining = []
        while not exhausted and len(joining) < loop.free:
            try:
                joining.append(next(pending))
            except StopIteration:
                exhausted = True
        if joining:
            yield from loop.join([key for key, _ in joining], np.stack([image for _, image in joining]))
        if exhausted and not loop.in_flight:
            return
        yield from loop.step()


@dataclass(frozen=True)
class LoopFacts:
    """What a request's time in the loop was: the images in flight when it joined (itself included), the requests
    waiting on the replica then, the steps it ran and how long it was in the loop."""
    size: int
    waiting: int
    steps: int
    run_ms: float


class QueueLoop:
    """A queue of (item, future) on the event loop that serves the requests, and the one task that works it (``run``,
    started with the first request; kept: a task nobody holds may be collected mid-run). If the task ever ends, the
    requests it holds get their error at once (``ended``) and ``failure`` says why, for the replica's health check."""
    queue: asyncio.Queue | None = None
    task: asyncio.Task | None = None
    failure: str | None = None
    what = "the loop"                     # how the failure names it

    def enqueue(self, item: object) -> asyncio.Future:
        """The item in the queue now (no await before it counts in ``load``); its future gets (result, facts)."""
        loop = asyncio.get_running_loop()
        if self.failure:
            raise RuntimeError(self.failure)
        if self.queue is None:
            self.queue = asyncio.Queue()
            self.task = loop.create_task(self.run())
            self.task.add_done_callback(self.ended)
        future = loop.create_future()
        self.queue.put_nowait((item, future))
        return future

    def held(self) -> list[asyncio.Future]:
        """The futures of the requests this loop holds beyond its queue."""
        return []

    def ended(self, task: asyncio.Task) -> None:
        error = None if task.cancelled() else task.exception()
        self.failure = f"{self.what} stopped: {'cancelled' if error is None else repr(error)}"
        log.error(self.failure, exc_info=error)
        waiting = self.held() + [self.queue.get_nowait()[1] for _ in range(self.queue.qsize())]
        for future in waiting:
            if not future.done():
                future.set_exception(RuntimeError(self.failure))

    async def run(self) -> None:
        raise NotImplementedError


class ContinuousBatcher(QueueLoop):
    """Runs a replica's ``SteppedRepair`` from asyncio: between two steps, requests that wait join (up to the loop's
    capacity) and requests whose callers left (a timeout, a closed connection) free their places; each step runs on
    ``worker`` (the thread that built the engine). The same face as runtime/serve.py's ``Batcher``: ``enqueue``,
    ``load``, ``failure``."""

    what = "the repair loop"

    def __init__(self, make: Callable[[], SteppedRepair], worker) -> None:
        self.worker = worker
        self.repair: SteppedRepair = worker.submit(make).result()
        self.futures: dict[int, tuple[asyncio.Future, float, int]] = {}    # key -> (future, joined at, in flight)
        self.next_key = 0

    @property
    def load(self) -> int:
        """Requests on this batcher: in the loop, and waiting."""
        return len(self.futures) + (self.queue.qsize() if self.queue else 0)

    def held(self) -> list[asyncio.Future]:
        return [future for future, _, _ in self.futures.values()]

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.futures:               # nothing in the loop: wait for the next request
                self.queue.put_nowait(await self.queue.get())
            joining = []
            while self.queue.qsize() and len(joining) < self.repair.free:
                item, future = self.queue.get_nowait()
                if not future.cancelled():
                    joining.append((item, future))
            gone = {key for key, (future, _, _) in self.futures.items() if future.cancelled()}
            keys = list(range(self.next_key, self.next_key + len(joining)))
            self.next_key += len(joining)
            waiting, now = len(joining) + self.queue.qsize(), loop.time()
            in_flight = len(self.futures) - len(gone) + len(joining)
            for key, (_, future) in zip(keys, joining):
                self.futures[key] = (future, now, in_flight)
            images = np.stack([item for item, _ in joining]) if joining else None
            try:
                rows = await loop.run_in_executor(self.worker, self.iterate, keys, images, gone)
            except Exception as e:  # noqa: BLE001  (the images in the loop get the error; the loop goes on)
                rows = [(key, e) for key in self.futures if key not in gone]
                self.repair.in_flight = []
            for key in gone:
                self.futures.pop(key, None)
            for key, row in rows:
                future, joined, size = self.futures.pop(key)
                if not future.done():
                    steps = 0 if isinstance(row, Exception) else len(row["detail"]["objective"])
                    future.set_result((row, LoopFacts(size, waiting, steps, round(1000 * (loop.time() - joined), 1))))

    def iterate(self, keys: list[int], images: np.ndarray | None, gone: set) -> list[tuple[int, dict]]:
        """On the worker: the callers that left dropped, the waiting images joined, one step."""
        self.repair.drop(gone)
        done = self.repair.join(keys, images) if keys else []
        return done + self.repair.step()
