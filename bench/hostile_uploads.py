"""What hostile uploads cost a replica of `cli.py serve` (docs/serving.md, "Hostile uploads"), measured on 127.0.0.1.

    python -m bench.hostile_uploads --threads 1 --seconds 40 --json results/serve/hostile_t1.json

1. **Decode cost at the pixel limit**: each kind of image at ``--max-pixels`` decoded once in a fresh process
   (runtime.imageio.decode_image, as the service decodes): its time and the process's peak memory above a process
   that only imported the decoder. That is what one decode costs a replica at most.
2. **A mix under load**: the service (one replica, the options of `cli.py serve --resize`) gets, at once, ``--normal``
   closed-loop clients sending the examples, ``--hostile`` closed-loop clients each sending in turn a header bomb
   (20000², a few hundred bytes), a 9000² PNG of zeros (236 KB, 81 MP), a real photo-sized PNG just under the limit
   (``--max-pixels``) and a truncated JPEG, and a probe of ``/healthz`` every 50 ms. Per kind: the statuses, the
   latency p50/p99; for ``/healthz`` p50/p99/max; the replica's peak memory (VmHWM). Every normal answer is compared
   with the batch job's PNG.

The script speaks HTTP and builds the service with ``commands.serve.serving``: run from another checkout (with this
file and bench/hostile_files.py copied in) it measures that checkout's service the same way.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "attacked"

# (what it is, the code making the bytes of a side × side image)
DECODE_KINDS = {
    "PNG RGB 8-bit (noise)": "png(rng.integers(0, 256, (side, side, 3), np.uint8))",
    "PNG grey 16-bit (noise)": "png(rng.integers(0, 65536, (side, side), np.uint16))",
    "JPEG RGB (noise, q 90)": "jpeg(rng.integers(0, 256, (side, side, 3), np.uint8))",
}
MAKER = """
import io, sys
import numpy as np
from PIL import Image
side, rng = int(sys.argv[1]), np.random.default_rng(0)
def png(a):
    b = io.BytesIO(); Image.fromarray(a).save(b, "PNG", compress_level=1); return b.getvalue()
def jpeg(a):
    b = io.BytesIO(); Image.fromarray(a).save(b, "JPEG", quality=90); return b.getvalue()
open(sys.argv[2], "wb").write({make})
"""
# a process that holds only the file's bytes, then decodes them as the service does (ru_maxrss is a peak: the
# image's making would hide the decode's own)
DECODER = """
import resource, sys, time
from pathlib import Path
from runtime.imageio import decode_image
data = Path(sys.argv[1]).read_bytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
decode_image(data, resize=True, size=32, max_pixels=int(sys.argv[2]))
print(time.perf_counter() - start, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def decode_costs(max_pixels: int, work: Path) -> list[dict]:
    """Each kind at the limit decoded once in a process of its own: seconds and peak memory growth (MB)."""
    side, rows, root = math.isqrt(max_pixels), [], Path(__file__).resolve().parent.parent
    for kind, make in DECODE_KINDS.items():
        path = work / "image"
        subprocess.run([sys.executable, "-c", MAKER.format(make=make), str(side), str(path)], check=True)
        out = subprocess.run([sys.executable, "-c", DECODER, str(path), str(max_pixels)], capture_output=True,
                             text=True, check=True, cwd=root).stdout.split()
        seconds, before_kb, after_kb = float(out[0]), int(out[1]), int(out[2])
        rows.append({"kind": kind, "side": side, "pixels": side * side,
                     "file_mb": round(path.stat().st_size / 2**20, 1), "seconds": round(seconds, 2),
                     "peak_growth_mb": round((after_kb - before_kb) / 1024, 1)})
        print(rows[-1])
    return rows


def percentile(values: list[float], q: float) -> float | None:
    return round(sorted(values)[min(len(values) - 1, int(q * len(values)))], 1) if values else None


def mix(url: str, normal: list[tuple[bytes, bytes]], hostile: dict[str, bytes], clients: int, hostile_clients: int,
        seconds: float) -> dict:
    """The mix of the module docstring for ``seconds``: per kind, statuses and latencies (ms)."""
    import aiohttp

    records: list[tuple[str, int, float, bool]] = []

    async def send(http, kind: str, data: bytes, expected: bytes | None, path: str = "/v1/repair") -> None:
        start = time.perf_counter()
        try:
            if path == "/healthz":
                async with http.get(url + path) as answer:
                    status, body = answer.status, await answer.read()
            else:
                async with http.post(url + path, data=data, headers={"Content-Type": "image/png"}) as answer:
                    status, body = answer.status, await answer.read()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            status, body = 0, b""
        wrong = expected is not None and status == 200 and body != expected
        records.append((kind, status, 1000 * (time.perf_counter() - start), wrong))

    async def run() -> None:
        stop = time.perf_counter() + seconds
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=300)) as http:
            async def normal_client(k: int) -> None:
                i = k
                while time.perf_counter() < stop:
                    image, expected = normal[i % len(normal)]
                    await send(http, "normal", image, expected)
                    i += clients

            async def hostile_client(k: int) -> None:
                kinds, i = list(hostile), k
                while time.perf_counter() < stop:
                    kind = kinds[i % len(kinds)]
                    await send(http, kind, hostile[kind], None)
                    i += 1

            async def probe() -> None:
                while time.perf_counter() < stop:
                    await send(http, "/healthz", b"", None, "/healthz")
                    await asyncio.sleep(0.05)

            await asyncio.gather(*(normal_client(k) for k in range(clients)),
                                 *(hostile_client(k) for k in range(hostile_clients)), probe())

    asyncio.run(run())
    table = {}
    for kind in ["normal", *hostile, "/healthz"]:
        rows = [r for r in records if r[0] == kind]
        statuses: dict[str, int] = {}
        for _, status, _, _ in rows:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        ms = [r[2] for r in rows]
        table[kind] = {"requests": len(rows), "statuses": statuses, "p50_ms": percentile(ms, 0.5),
                       "p99_ms": percentile(ms, 0.99), "max_ms": round(max(ms), 1) if ms else None,
                       "wrong": sum(r[3] for r in rows)}
    return table


def replica_peak_mb(url: str) -> float | None:
    """The replica's peak resident memory (VmHWM), from its pid in /v1/info (same machine)."""
    import requests

    pid = requests.get(url + "/v1/info", timeout=30).json()["replica"]["pid"]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="weights")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-pixels", type=int, default=50_000_000)
    parser.add_argument("--normal", type=int, default=4, help="closed-loop clients sending the examples")
    parser.add_argument("--hostile", type=int, default=2, help="closed-loop clients sending hostile uploads")
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--no-decode-costs", action="store_true", help="skip stage 1")
    parser.add_argument("--port", type=int, default=8124)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    from bench.hostile_files import header_bomb, png_of_zeros, small_file_big_png, truncated_jpeg
    from commands.serve import serving
    from runtime import serve as service
    from runtime.files import write_json
    from runtime.folder import repair_folder

    result = {"threads": args.threads, "max_batch_size": args.max_batch_size, "max_pixels": args.max_pixels,
              "normal_clients": args.normal, "hostile_clients": args.hostile, "seconds": args.seconds}
    work = Path(tempfile.mkdtemp())
    if not args.no_decode_costs:
        result["decode_costs"] = decode_costs(args.max_pixels, work)
    options = ["--weights", args.weights, "--threads", str(args.threads), "--replica-cpus", str(args.threads),
               "--max-batch-size", str(args.max_batch_size), "--port", str(args.port), "--resize", "--timeout-s", "120"]
    make_repair, settings, where = serving(options)
    try:
        inputs = work / "in"
        inputs.mkdir()
        for path in sorted(EXAMPLES.glob("*.png")):
            shutil.copy(path, inputs / path.name)
        report = repair_folder(make_repair(), inputs, work / "out", settings.repair, settings.max_batch_size,
                               resize=True, progress=False)
        normal = [((inputs / r["file"]).read_bytes(), (work / "out" / r["output"]).read_bytes())
                  for r in report["images"] if r["status"] == "repaired"]
        side = math.isqrt(args.max_pixels) - 1
        hostile = {"header bomb 20000²": header_bomb(), "PNG 9000² of zeros (236 KB)": small_file_big_png(),
                   f"PNG {side}² of zeros, under the limit": png_of_zeros(side, side),
                   "truncated JPEG": truncated_jpeg()}
        result["hostile_bytes"] = {kind: len(data) for kind, data in hostile.items()}
        service.start(make_repair, settings, where)
        url = f"http://{where.host}:{where.port}"
        mix(url, normal[:4], {}, 1, 0, 3)                                   # warm
        result["quiet"] = mix(url, normal, {}, args.normal, 0, args.seconds / 2)
        print("quiet:", json.dumps(result["quiet"]))
        result["mix"] = mix(url, normal, hostile, args.normal, args.hostile, args.seconds)
        print("mix:", json.dumps(result["mix"]))
        result["replica_peak_mb"] = replica_peak_mb(url)
        print("replica peak (VmHWM) MB:", result["replica_peak_mb"])
    finally:
        service.stop()
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
