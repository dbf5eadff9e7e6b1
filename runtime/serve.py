"""The online repair: a Ray Serve deployment that repairs images posted over HTTP, in dynamic batches, with the same
bytes as ``cli.py repair`` (docs/serving.md).

Each replica builds its engine's batch repair once (``make_repair()``: the PyTorch pipeline of engine/folder.py, or
an exported bundle here in the runtime, which never imports PyTorch) and answers:

- ``POST /v1/repair``: the image as the raw body or as a multipart file -> the repaired PNG, with the predictions
  before and after, the gate's decision, the steps run and the server time in headers (``?format=json``: all of it
  as JSON, the PNG in base64);
- ``POST /v1/classify``: the defended prediction (the classifier on the repaired image) and the undefended one, with
  class probabilities;
- ``GET /v1/info`` (settings, weights' sha256, versions), ``GET /healthz``, and ``GET /`` (a page to try it).

Requests that arrive together are repaired as one batch (``Batcher``) on a worker thread, so the event loop
collects the next batch meanwhile. An image's repair never depends on its batch-mates (docs/design.md, principle 3):
a served PNG is the CLI's, whatever it was batched with. Uploads are received and decoded within bounds of bytes,
time and pixels, off the event loop (runtime/uploads.py); bad input is answered with a 4xx and a message and never
reaches a batch; a batch that fails is repaired again one image at a time, so only the image at fault fails. An error
of the service itself is a short answer with the request's id; its detail goes to the replica's log under that id.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from .folder import BatchRepair
from .imageio import encode_png
from .scheduler import ContinuousBatcher, QueueLoop, SteppedRepair
from .uploads import RequestError, UploadLimits, Uploads

PAGE = Path(__file__).with_name("serve_page.html")
# Serve's replica log (logs/serve/replica_*.log in the Ray session's folder), each line with its request's id
log = logging.getLogger("ray.serve")


@dataclass
class ServiceSettings:
    """What a replica needs besides its engine: the images it takes, the batching, the limits, and what
    ``/v1/info`` reports (``repair``: the repair's settings as the CLI's report records them)."""
    size: int
    resize: bool
    classes: list[str]
    repair: dict
    max_batch_size: int = 64
    batch_wait_ms: float = 10.0
    # requests that may wait on a replica beyond the batch it is repairing; more are refused at once (503)
    max_queued: int = 64
    retry_after_s: int = 1
    timeout_s: float = 60.0
    # static: a batch runs to its slowest image; continuous: images join and leave between steps (runtime/scheduler.py)
    scheduler: str = "static"
    join_before_step: int | None = None      # continuous: newcomers join only while the loop's oldest is younger
    uploads: UploadLimits = field(default_factory=UploadLimits)
    info: dict = field(default_factory=dict)


def error_response(status: int, message: str, rid: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse({"error": message, "status": status, "request_id": rid}, status_code=status, headers=headers)


def request_id(request: Request) -> str:
    """The id Serve's proxy gave the request (its ``X-Request-Id``, which it also puts on the answer), or one made
    here, once, where the replica is called without the proxy."""
    if "request_id" not in request.scope:
        request.scope["request_id"] = request.headers.get("x-request-id") or uuid.uuid4().hex
    return request.scope["request_id"]


def header_text(value: object) -> str:
    """An HTTP header value: ASCII, other characters percent-encoded (class names may be any text)."""
    return quote(str(value), safe=" !#$&'()*+,-./:;<=>?@[]^_`{|}~")


@dataclass(frozen=True)
class BatchFacts:
    """What a request's batch was: its size, the requests waiting on the replica as it started (itself and its
    batch-mates included) and how long it took to run."""
    size: int
    waiting: int
    run_ms: float


class Batcher(QueueLoop):
    """Gathers a replica's requests into batches: the first waiting request opens a batch, which takes what else is
    waiting and what arrives within ``wait_s``, up to ``max_size``; one batch runs at a time (``work``, a coroutine
    over a list of items returning one result each), and what arrives meanwhile waits in the queue for the next. A
    request cancelled before its batch started (its client left, or it timed out) is dropped from it; one cancelled
    later leaves its batch-mates alone. (Ray Serve 2.60's ``@serve.batch`` handed out batches of 1.09 images on
    average while 11.9 requests waited on the replica: docs/serving.md.)"""

    what = "the batcher"

    def __init__(self, work: Callable, max_size: int, wait_s: float) -> None:
        self.work, self.max_size, self.wait_s = work, max_size, wait_s
        self.batch: list[tuple[object, asyncio.Future]] = []    # the batch being gathered or run
        self.running = 0                   # requests in the batch being gathered or run

    @property
    def load(self) -> int:
        """Requests on this batcher: in the batch being gathered or run, and waiting."""
        return self.running + (self.queue.qsize() if self.queue else 0)

    async def submit(self, item: object) -> tuple[object, BatchFacts]:
        """The item's result, and its batch's facts."""
        return await self.enqueue(item)

    def held(self) -> list[asyncio.Future]:
        return [future for _, future in self.batch]

    async def gather(self) -> list[tuple[object, asyncio.Future]]:
        """The next batch: the first waiting request, what else waits and what arrives within ``wait_s``."""
        loop = asyncio.get_running_loop()
        self.batch = batch = [await self.queue.get()]
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_size:
            self.running = len(batch)
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
            except asyncio.TimeoutError:
                break
        return batch

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.gather()
            live = [(item, future) for item, future in batch if not future.cancelled()]
            self.running = len(live)
            if not live:
                continue
            waiting, start = len(live) + self.queue.qsize(), loop.time()
            try:
                results = await self.work([item for item, _ in live])
            except Exception as e:  # noqa: BLE001  (every request of the batch gets the error)
                results = [e] * len(live)
            self.running = 0
            facts = BatchFacts(len(live), waiting, round(1000 * (loop.time() - start), 1))
            for (_, future), result in zip(live, results):
                if not future.done():
                    future.set_result((result, facts))
            self.batch = []


class RepairService:
    """One replica (see the module docstring). ``make_repair`` builds the batch repair on the replica's worker
    thread, the one that then runs every batch (torch's OpenMP threads belong to the thread that made them)."""

    def __init__(self, make_repair: Callable[[], BatchRepair], settings: ServiceSettings) -> None:
        self.settings = settings
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="repair")
        if settings.scheduler == "continuous":       # make_repair.kernel(): the engine's StepKernel
            capacity = settings.max_batch_size
            self.batcher = ContinuousBatcher(
                lambda: SteppedRepair(make_repair.kernel(), make_repair.settings, capacity,
                                      settings.join_before_step), self.worker)
        else:
            self.repair: BatchRepair = self.worker.submit(make_repair).result()
            self.batcher = Batcher(self.repair_many, settings.max_batch_size, settings.batch_wait_ms / 1000)
        self.uploads = Uploads(settings.uploads, settings.size, settings.resize)

    async def __call__(self, request: Request) -> Response:
        start, rid = time.perf_counter(), request_id(request)
        route = ROUTES.get((request.method, request.url.path))
        if route is None:
            known = sorted({path for _, path in ROUTES})
            status = 405 if any(path == request.url.path for _, path in ROUTES) else 404
            return error_response(status, f"{request.method} {request.url.path}: not a route of this service "
                                          f"({', '.join(known)})", rid)
        try:
            return await route(self, request, start)
        except RequestError as e:
            return error_response(e.status, str(e), rid, self.settings.retry_after_s if e.status == 503 else None)
        except Exception:  # noqa: BLE001  (the service's own fault: a short answer, the detail in the log)
            log.exception("request %s (%s %s) failed", rid, request.method, request.url.path)
            return error_response(500, f"internal error of the service (request {rid}: the replica's log has "
                                       "the detail)", rid)

    def check_health(self) -> None:
        """Serve's health check (every 10 s): a replica whose batcher stopped raises, and Serve replaces it."""
        if self.batcher.failure:
            raise RuntimeError(self.batcher.failure)

    # --- routes ----------------------------------------------------------------------------------------------------

    async def repair_route(self, request: Request, start: float) -> Response:
        fmt = request.query_params.get("format", "png")
        if fmt not in ("png", "json"):
            raise RequestError(422, f"format={fmt!r}: choose png (the default) or json")
        row, notes = await self.repaired(request)
        png = encode_png(row["image"])
        facts = self.facts(row, notes, start)
        if fmt == "json":
            return JSONResponse({**facts, "image_png_base64": base64.b64encode(png).decode()})
        headers = {f"X-{name.replace('_', '-').title()}": header_text(value) for name, value in facts.items()
                   if name in HEADER_FACTS and value is not None}
        return Response(png, media_type="image/png", headers=headers)

    async def classify_route(self, request: Request, start: float) -> Response:
        row, notes = await self.repaired(request)
        detail, classes = row["detail"], self.settings.classes
        prediction = lambda pred, probs: {"class": pred, "label": classes[pred], "probabilities": probs}
        return JSONResponse({"defended": prediction(row["pred_after"], detail["probs_after"]),
                             "undefended": prediction(row["pred_before"], detail["probs_before"]),
                             "classes": classes, "notes": notes, "gated_out": row.get("gated_out"),
                             "server_ms": round(1000 * (time.perf_counter() - start), 1)})

    async def info_route(self, request: Request, start: float) -> Response:
        return JSONResponse({"size": self.settings.size, "resize": self.settings.resize,
                             "classes": self.settings.classes, "repair": self.settings.repair,
                             "service": {**{k: v for k, v in asdict(self.settings).items()
                                            if k in ("max_batch_size", "batch_wait_ms", "max_queued", "timeout_s",
                                                     "scheduler", "join_before_step")},
                                         **asdict(self.settings.uploads)},
                             # the replica that answered: a bundle's never loads PyTorch
                             "replica": {"pid": os.getpid(), "torch_loaded": "torch" in sys.modules},
                             **self.settings.info})

    async def health_route(self, request: Request, start: float) -> Response:
        if self.batcher.failure:
            raise RequestError(503, f"unhealthy: {self.batcher.failure}; Serve replaces this replica")
        return Response("ok\n", media_type="text/plain")

    async def page_route(self, request: Request, start: float) -> Response:
        return HTMLResponse(PAGE.read_text())

    # --- the repair --------------------------------------------------------------------------------------------------

    async def repaired(self, request: Request) -> tuple[dict, list[str]]:
        """The request's image decoded and repaired (in a batch with whatever arrives with it): (row, notes)."""
        self.admit()                       # before reading the body: a refusal costs nothing
        start = time.perf_counter()
        # the body in, the line checked again (others may have come in meanwhile), the image decoded
        image, notes = await self.uploads.image(request, self.admit)
        row_timing = {"receive_ms": round(1000 * (time.perf_counter() - start), 1)}
        try:
            row, batch = await asyncio.wait_for(self.batcher.enqueue(image), self.settings.timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(504, f"not repaired within {self.settings.timeout_s} s (--timeout-s): the service "
                                    "is overloaded, try again later") from None
        if isinstance(row, Exception):
            rid = request_id(request)
            log.error("request %s: the repair failed: %r", rid, row, exc_info=row)
            raise RequestError(500, f"the repair failed on this image (request {rid}: the replica's log has the "
                                    "detail)")
        facts = {"batch_size": batch.size, "waiting": batch.waiting, "batch_ms": batch.run_ms}
        return {**row, **row_timing, **facts}, notes

    def admit(self) -> None:
        """RequestError 503 where the replica's line is full: the replica knows it exactly (Serve's router learns it
        late), so it refuses itself whatever would wait past the batch being gathered or run and max_queued more.
        Images being decoded count in the line, bodies still being received do not (their bytes are bounded by
        --max-pending-mb and their time by --receive-timeout-s)."""
        full = self.settings.max_batch_size + self.settings.max_queued
        if self.batcher.load + self.uploads.decoding >= full:
            raise RequestError(503, f"the service is full ({full} requests on this replica: a batch being repaired "
                                    f"and {self.settings.max_queued} waiting, --max-queued); retry in "
                                    f"{self.settings.retry_after_s} s")

    async def repair_many(self, images: list[np.ndarray]) -> list[dict | Exception]:
        return await asyncio.get_running_loop().run_in_executor(self.worker, self.repair_isolated, images)

    def repair_isolated(self, images: list[np.ndarray]) -> list[dict | Exception]:
        """The batch's rows; where the batch fails, each image repaired alone, so only the one at fault fails."""
        try:
            rows = self.repair(np.stack(images))
        except Exception as e:  # noqa: BLE001  (each error goes back to its own request, as a 500 with its text)
            rows = [e] if len(images) == 1 else [self.repair_alone(image) for image in images]
        return rows

    def repair_alone(self, image: np.ndarray) -> dict | Exception:
        try:
            return self.repair(image[None])[0]
        except Exception as e:  # noqa: BLE001
            return e

    def facts(self, row: dict, notes: list[str], start: float) -> dict:
        detail = row["detail"]
        return {"pred_before": row["pred_before"], "pred_after": row["pred_after"],
                "label_before": row["label_before"], "label_after": row["label_after"],
                "gated_out": row.get("gated_out"), "steps_run": len(detail["objective"]),
                "objective": detail["objective"], "ssl_loss_before": row["ssl_loss_before"],
                "ssl_loss_after": row["ssl_loss_after"], "linf": row["linf"], "notes": notes,
                "classes": self.settings.classes, "batch_size": row["batch_size"], "waiting": row["waiting"],
                "batch_ms": row["batch_ms"], "receive_ms": row["receive_ms"],
                "server_ms": round(1000 * (time.perf_counter() - start), 1)}


# the facts that go into headers of a PNG answer (the rest, lists, only with ?format=json)
HEADER_FACTS = ("pred_before", "pred_after", "label_before", "label_after", "gated_out", "steps_run", "batch_size",
                "waiting", "batch_ms", "receive_ms", "server_ms")
ROUTES = {("POST", "/v1/repair"): RepairService.repair_route, ("POST", "/v1/classify"): RepairService.classify_route,
          ("GET", "/v1/info"): RepairService.info_route, ("GET", "/healthz"): RepairService.health_route,
          ("GET", "/"): RepairService.page_route}


def info_versions() -> dict:
    """The versions /v1/info reports (of the driver that deployed the service: replicas run the same install)."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("mssl-repair", "numpy", "onnxruntime", "onnxruntime-gpu", "ray", "torch"):
        if package == "torch" and "torch" not in sys.modules:
            continue                            # a bundle service: no PyTorch anywhere
        try:
            versions[package.removesuffix("-gpu")] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


@dataclass
class Deployment:
    """How the service is spread over the cluster, and where it listens (``keep_alive_s``: how long Serve's proxy
    keeps an idle connection open)."""
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    replica_cpus: float = 1
    replica_gpus: float = 0
    keep_alive_s: int = 5


APP_NAME = "mssl-repair"
# requests a replica takes beyond its line, to refuse them itself at once, and requests Serve's proxy holds while its
# router assigns them (see deploy)
ROUTER_SLACK = 64


def start(make_repair: Callable[[], BatchRepair], settings: ServiceSettings, where: Deployment,
          ray_address: str | None = None) -> str:
    """Start (or join, with ``ray_address``) Ray and Serve, deploy the service and return its URL once every replica
    is up."""
    start_serve(where, settings.timeout_s, ray_address)
    deploy(make_repair, settings, where)
    return f"http://{where.host}:{where.port}"


def start_serve(where: Deployment, timeout_s: float, ray_address: str | None = None) -> None:
    """Ray (a local cluster, or the one at ``ray_address``) and Serve's proxy on ``where.host:where.port``."""
    import ray
    from ray.serve.config import HTTPOptions

    from .ray_folder import connect_ray

    if not ray.is_initialized():
        connect_ray(ray, ray_address)
    # past the timeout, a request at a replica is answered 504 by it; one still waiting for a replica, 408 by the proxy
    serve.start(http_options=HTTPOptions(host=where.host, port=where.port, request_timeout_s=timeout_s + 1,
                                         keep_alive_timeout_s=where.keep_alive_s))


def deploy(make_repair: Callable[[], BatchRepair], settings: ServiceSettings, where: Deployment) -> None:
    """(Re)deploy the service's replicas and wait until they are all up.

    A replica refuses what it cannot start within its line (``settings.max_queued`` past the batch being repaired)
    itself, at once, with 503 and Retry-After. Serve's router is left room to hand requests on promptly: it learns a
    replica's line late, and a router allowed exactly the line either starves the next batch (measured: batches of
    4.1 of 8, 0.84× the throughput) or, with a short queue of its own, refuses requests at two clients."""
    from ray.serve.config import BackpressureConfig

    line = settings.max_batch_size + settings.max_queued
    deployment = serve.deployment(RepairService).options(
        name="RepairService", num_replicas=where.replicas,
        ray_actor_options={"num_cpus": where.replica_cpus, "num_gpus": where.replica_gpus},
        max_ongoing_requests=line + ROUTER_SLACK, max_queued_requests=ROUTER_SLACK,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=settings.retry_after_s))
    serve.run(deployment.bind(make_repair, settings), name=APP_NAME, route_prefix="/", blocking=False)
    wait_for_replaced_replicas(where.replicas)


def wait_for_replaced_replicas(replicas: int, timeout_s: float = 60.0) -> None:
    """Until the service runs ``replicas`` replicas and no other: on a redeploy, serve.run returns once the new
    replicas are up, while those they replace may still be stopping, and a request routed meanwhile can be refused."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = serve.status().applications[APP_NAME].deployments["RepairService"].replica_states
        if {state: n for state, n in states.items() if n} == {"RUNNING": replicas}:      # a str enum
            return
        time.sleep(0.1)
    raise RuntimeError(f"the service did not settle on {replicas} running replica(s) within {timeout_s} s: {states}")


def stop() -> None:
    """Take the service down and leave Ray (a cluster this process started stops with it)."""
    import ray

    serve.shutdown()
    ray.shutdown()
