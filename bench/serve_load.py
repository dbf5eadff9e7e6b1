"""Load on the online repair (`cli.py serve`, runtime/serve.py), measured on 127.0.0.1 against the offline batch job
on the same images and threads (docs/serving.md).

    python -m bench.serve_load --weights weights --threads 1 --json results/serve/load.json

It starts the service itself (one replica, ``--threads`` threads; or ``--bundle``), then:

1. the offline batch job: ``repair_folder`` over the same images (its images/s is the target's yardstick);
2. a closed-loop sweep: C clients, each sending its next request when the last is answered, for C in ``--clients``;
3. an open loop: Poisson arrivals at 50 %, 80 % and 120 % of the saturated throughput of step 2;
4. a replica killed under load (``--kill``, two replicas): the requests that failed and the time until Serve has
   both replicas running again.

Every answer is checked against the batch job's PNG for its image (a wrong answer counts, whatever its status);
every run stops by itself (``--seconds`` per point). Results: requests/s, latency p50/p95/p99 of the answered
requests, the realised batch size, the 503 rate and how fast a 503 came.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import requests

from runtime.files import write_json

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


class Client:
    """Sends images to the service (asyncio + aiohttp: one process, no thread per request, so that the generator
    takes as little of the machine as it can) and records, per request: status, latency (ms), batch size, and whether
    the PNG is the batch job's."""

    def __init__(self, url: str, images: list[tuple[bytes, bytes]], full_batch: int) -> None:
        self.url, self.images, self.full_batch = url, images, full_batch
        self.records: list[dict] = []

    async def send(self, session, i: int) -> None:
        import aiohttp

        image, expected = self.images[i % len(self.images)]
        start = time.perf_counter()
        try:
            async with session.post(self.url + "/v1/repair", data=image,
                                    headers={"Content-Type": "image/png"}) as answer:
                status, body = answer.status, await answer.read()
                facts = {name: float(answer.headers[header]) if header in answer.headers else None
                         for name, header in FACT_HEADERS.items()}
        except (aiohttp.ClientError, asyncio.TimeoutError):
            status, body, facts = 0, b"", dict.fromkeys(FACT_HEADERS)                     # an error
        self.records.append({"status": status, "ms": 1000 * (time.perf_counter() - start), "start": start,
                             "wrong": status == 200 and body != expected, **facts})

    def take(self) -> list[dict]:
        records, self.records = self.records, []
        return records


# what the service says of each answer, as recorded
FACT_HEADERS = {"batch": "x-batch-size", "replica_ms": "x-server-ms", "receive_ms": "x-receive-ms",
                "waiting": "x-waiting", "batch_ms": "x-batch-ms"}


def session():
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=300))


def summary(records: list[dict], seconds: float, full_batch: int) -> dict:
    ok = [r for r in records if r["status"] == 200]
    refused = [r for r in records if r["status"] == 503]

    def of_answered(name: str, q: float | None = None, where=lambda r: True):
        values = [r[name] for r in ok if r[name] is not None and where(r)]
        if q is not None:
            return percentile(values, q)
        return round(statistics.mean(values), 2) if values else None

    full = lambda r: r["batch"] == full_batch
    return {"requests": len(records), "answered": len(ok), "requests_per_s": round(len(ok) / seconds, 3),
            "p50_ms": of_answered("ms", 0.5), "p95_ms": of_answered("ms", 0.95), "p99_ms": of_answered("ms", 0.99),
            "batch_size": of_answered("batch"),
            # the part of the latency spent on the replica (from its handler's start): the rest is Serve's proxy and
            # router, and the network
            "replica_p50_ms": of_answered("replica_ms", 0.5), "replica_p99_ms": of_answered("replica_ms", 0.99),
            "receive_p50_ms": of_answered("receive_ms", 0.5),
            # requests waiting on the replica as each answered one's batch started
            "waiting_at_batch_start": of_answered("waiting"),
            # how long the repair of a full batch took on the replica (over the answers it held)
            "full_batch_p50_ms": of_answered("batch_ms", 0.5, full),
            "full_batch_p99_ms": of_answered("batch_ms", 0.99, full),
            "refused_503": len(refused), "refused_rate": round(len(refused) / max(1, len(records)), 4),
            "refusal_p99_ms": percentile([r["ms"] for r in refused], 0.99),
            "other_errors": sorted({r["status"] for r in records} - {200, 503}),
            "wrong": sum(r["wrong"] for r in records)}


def closed_loop(client: Client, clients: int, seconds: float) -> dict:
    """``clients`` threads, each sending its next request as soon as the last is answered, for ``seconds``."""
    records, elapsed = run_closed(client, clients, seconds)
    return {"clients": clients, **summary(records, elapsed, client.full_batch)}


def run_closed(client: Client, clients: int, seconds: float) -> tuple[list[dict], float]:
    async def run() -> None:
        stop, counter = time.perf_counter() + seconds, iter(range(10**9))
        async with session() as http:
            async def loop() -> None:
                while time.perf_counter() < stop:
                    await client.send(http, next(counter))
            await asyncio.gather(*(loop() for _ in range(clients)))

    start = time.perf_counter()
    asyncio.run(run())
    return client.take(), time.perf_counter() - start


def open_loop(client: Client, rate: float, seconds: float, seed: int = 0) -> dict:
    """Poisson arrivals at ``rate`` requests/s for ``seconds``, each sent at its time whatever the others do."""
    rng = random.Random(seed)

    async def run() -> None:
        async with session() as http:
            begin, at, i, sent = time.perf_counter(), 0.0, 0, []
            while at < seconds:
                await asyncio.sleep(max(0.0, begin + at - time.perf_counter()))
                sent.append(asyncio.create_task(client.send(http, i)))
                at, i = at + rng.expovariate(rate), i + 1
            await asyncio.gather(*sent)

    start = time.perf_counter()
    asyncio.run(run())
    return {"rate": round(rate, 3), **summary(client.take(), time.perf_counter() - start, client.full_batch)}


def offline(make_repair, settings, folder: Path, out: Path) -> tuple[dict, list[tuple[bytes, bytes]]]:
    """The batch job on ``folder`` (images/s once its engine is built; the p50 time of one image repaired alone,
    over 16; the p50 and longest time of a full batch) and (input, repaired PNG) per image."""
    from runtime.folder import repair_folder
    from runtime.imageio import read_folder

    repair = make_repair()
    start = time.perf_counter()
    report = repair_folder(repair, folder, out, settings.repair, settings.max_batch_size, resize=settings.resize,
                           progress=False)
    seconds = time.perf_counter() - start
    pairs = [((folder / row["file"]).read_bytes(), (out / row["output"]).read_bytes()) for row in report["images"]
             if row["status"] == "repaired"]
    images = [record.image for record in read_folder(folder, resize=settings.resize, size=settings.size)]
    single = [timed_ms(repair, images[i:i + 1]) for i in range(min(16, len(images)))]
    full = settings.max_batch_size
    batches = [timed_ms(repair, images[i:i + full]) for i in range(0, len(images) - full + 1, full)]
    return {"images_per_s": round(len(pairs) / seconds, 3), "single_image_p50_ms": percentile(single, 0.5),
            "full_batch_p50_ms": percentile(batches, 0.5), "full_batch_max_ms": percentile(batches, 1.0)}, pairs


def timed_ms(repair, images: list) -> float:
    import numpy as np

    start = time.perf_counter()
    repair(np.stack(images))
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None)
    parser.add_argument("--bundle", default=None, help="serve this exported bundle instead (no PyTorch in replicas)")
    parser.add_argument("--images", type=Path, default=None,
                        help="folder of images (default: the model set's examples: examples/attacked for CIFAR-10)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-wait-ms", type=float, default=10)
    parser.add_argument("--max-queued", type=int, default=None, help="default: --max-batch-size, as cli.py serve")
    parser.add_argument("--clients", default="1,2,4,8,16,32,64", help="closed-loop points ('': none)")
    parser.add_argument("--loads", default="0.5,0.8,1.2", help="open-loop rates, as fractions of the capacity")
    parser.add_argument("--capacity", type=float, default=None,
                        help="requests/s the open loop's fractions are of (default: the closed loop's best)")
    parser.add_argument("--seconds", type=float, default=30, help="per closed-loop point, and the replica kill")
    parser.add_argument("--open-seconds", type=float, default=60,
                        help="per open-loop point (long enough for the queue to fill at 120 %%)")
    parser.add_argument("--kill", action="store_true", help="also kill one of two replicas under load")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--join-before-step", type=int, default=None, help="as cli.py serve's (continuous)")
    parser.add_argument("--schedulers", default="static,continuous",
                        help="measured one after the other in this run, at the same open-loop rates")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    from runtime import serve as service

    schedulers = [name for name in args.schedulers.split(",") if name]
    make_repair, settings, where, started = build(args, schedulers[0])
    folder = args.images or (EXAMPLES / ("attacked" if settings.size == 32 else "imagenette"))
    work = Path(tempfile.mkdtemp())
    inputs = work / "in"
    inputs.mkdir()
    for path in sorted(folder.glob("*")):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            shutil.copy(path, inputs / path.name)
    batch_job, pairs = offline(make_repair, settings, inputs, work / "out")
    result = {"threads": args.threads, "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
              "max_queued": settings.max_queued, "backend": settings.repair["backend"], "size": settings.size,
              "images": len(pairs), "batch_job": batch_job, "serves": started}
    print(f"batch job on {len(pairs)} images: {batch_job}")
    t0 = time.perf_counter()
    service.start_serve(where, settings.timeout_s)
    result["ray_and_proxy_start_s"] = round(time.perf_counter() - t0, 2)
    capacity = args.capacity
    try:
        for scheduler in schedulers:       # the same images, machine and arrival rates for each scheduler
            make_repair, settings, where, _ = build(args, scheduler)
            t1 = time.perf_counter()
            service.deploy(make_repair, settings, where)
            point = {"replica_start_s": round(time.perf_counter() - t1, 2)}
            print(f"{scheduler}: the replica ({started}) up in {point['replica_start_s']} s")
            client = Client(f"http://{where.host}:{where.port}", pairs, settings.max_batch_size)
            run_closed(client, 1, 1)                                  # warm
            point["closed_loop"] = []
            for clients in [int(c) for c in args.clients.split(",") if c]:
                point["closed_loop"].append(closed_loop(client, clients, args.seconds))
                print(scheduler, point["closed_loop"][-1])
            # the open loop's rates from the first scheduler's best throughput, for every scheduler
            capacity = capacity or max((p["requests_per_s"] for p in point["closed_loop"]), default=None)
            point["capacity_requests_per_s"] = capacity
            point["open_loop"] = []
            for load in [float(x) for x in args.loads.split(",") if x and capacity]:
                point["open_loop"].append({"load": load, **open_loop(client, load * capacity, args.open_seconds)})
                print(scheduler, point["open_loop"][-1])
            if args.kill:
                point["replica_kill"] = kill_one_replica(client, where, make_repair, settings, args.seconds)
                print(point["replica_kill"])
            result[scheduler] = point
    finally:
        service.stop()
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.json, result)
    print(f"wrote {args.json}")


def build(args, scheduler: str):
    """(make_repair, ServiceSettings, Deployment, what it serves): what `cli.py serve` deploys with these options."""
    from commands.serve import serving

    options = ["--scheduler", scheduler, "--threads", str(args.threads), "--replica-cpus", str(args.threads),
               "--max-batch-size", str(args.max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms), "--timeout-s", "120",
               "--port", str(args.port)] + ([] if args.max_queued is None else ["--max-queued", str(args.max_queued)])
    if args.join_before_step is not None and scheduler == "continuous":
        options += ["--join-before-step", str(args.join_before_step)]
    if args.bundle:
        return (*serving(options + ["--bundle", args.bundle]), f"bundle {args.bundle}")
    weights = args.weights or "weights"
    return (*serving(options + ["--weights", weights]), f"weights {weights} (torch)")


def kill_one_replica(client: Client, where, make_repair, settings, seconds: float) -> dict:
    """Two replicas under a closed loop of 8 clients; one replica's process is killed a third of the way in.
    Returns the failed requests and the time until Serve ran two replicas again."""
    import dataclasses
    import os
    import signal

    from ray import serve

    from runtime import serve as service

    service.deploy(make_repair, settings, dataclasses.replace(where, replicas=2))

    def running() -> int:
        status = serve.status().applications[service.APP_NAME].deployments["RepairService"]
        return status.replica_states.get("RUNNING", 0)

    done = threading.Event()
    outcome: dict = {}

    def replica_pid() -> int:
        return requests.get(client.url + "/v1/info", timeout=60).json()["replica"]["pid"]

    def killer() -> None:
        time.sleep(seconds / 3)
        before: set[int] = set()
        while len(before) < 2:                                      # both replicas, as the router spreads requests
            before.add(replica_pid())
        outcome["killed_at"] = time.perf_counter()
        os.kill(next(iter(before)), signal.SIGKILL)
        # recovered: a replica that was not there before answers, and Serve counts two running again
        while not done.is_set() and (replica_pid() in before or running() < 2):
            time.sleep(0.2)
        outcome["recovered_at"] = time.perf_counter()

    thread = threading.Thread(target=killer)
    thread.start()
    records, elapsed = run_closed(client, 8, seconds)
    done.set()
    thread.join()
    killed, recovered = outcome["killed_at"], outcome["recovered_at"]
    failed = [r for r in records if r["status"] != 200]
    return {"clients": 8, **summary(records, elapsed, client.full_batch), "recovery_s": round(recovered - killed, 2),
            "failed_sent_before_kill": sum(r["start"] < killed for r in failed),
            "failed_sent_during_recovery": sum(killed <= r["start"] < recovered for r in failed),
            "failed_sent_after_recovery": sum(r["start"] >= recovered for r in failed)}


if __name__ == "__main__":
    main()
