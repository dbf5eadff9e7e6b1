"""How the repair's cost per image grows with the working size S, for one recipe's networks.

A repair's cost does not depend on what the weights hold, only on the architectures, so the networks here are the
recipe's (``engine.train.profiles.PROFILES[profile]``) at random initialization, saved as a model set at each S. For each
S: the full repair (plain objective, every step for every image: no early exit, whose rate does depend on the weights)
in torch eager and in onnxruntime's Loop graph, per image, and that per-image time against S = the first size's, next to
the pixel ratio (S / S₀)². The target of issue 21: the cost grows no faster than the pixel count.

    python -m bench.size_scaling --sizes 32,64 --threads 1 --json results/imagenette/size_scaling.json
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from engine.folder import repair_batch
from engine.models.networks import build_model
from engine.train.profiles import PROFILES
from engine.models.weights import save_model
from export.onnx_export import load_exported_pipeline
from runtime.files import write_json
from runtime.settings import RepairSettings

TASKS = ("contrastive", "inpainting", "rotation")


def random_model_set(profile: str, size: int, out: Path) -> Path:
    """The classifier and the three SSL networks of ``profile`` at random init, as a model set of side ``size``."""
    torch.manual_seed(0)
    inputs = {"size": size, "dataset": "size-scaling", "classes": [str(i) for i in range(10)]}
    for name in ("classifier", *TASKS):
        cfg = PROFILES[profile][name]
        save_model(build_model(cfg["architecture"], cfg["config"]), name, out,
                   {"architecture": cfg["architecture"], "config": cfg["config"], "input": inputs})
    return out


def seconds_per_image(pipeline, x: torch.Tensor, settings: RepairSettings, repeat: int) -> float:
    repair_batch(pipeline, x, settings)                      # warm-up (graph sessions, allocator)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        repair_batch(pipeline, x, settings)
        best = min(best, time.perf_counter() - start)
    return best / len(x)


def measure(sizes: list[int], profile: str, batch: int, steps: int, threads: int, repeat: int,
            backends: list[str], work: Path) -> dict:
    torch.set_num_threads(threads)
    settings = RepairSettings(steps=steps, batch_size=batch, early_exit=False)
    rows = []
    for size in sizes:
        weights = random_model_set(profile, size, work / f"s{size}")
        x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
        row = {"size": size, "pixels_vs_first": (size / sizes[0]) ** 2}
        for backend in backends:
            pipeline = load_exported_pipeline(weights=weights, tasks=list(TASKS), objective="plain",
                                              backend=backend, onnx_dir=work / f"onnx{size}", threads=threads)
            row[f"{backend}_ms_per_image"] = round(1000 * seconds_per_image(pipeline, x, settings, repeat), 2)
            print(f"S={size} {backend}: {row[f'{backend}_ms_per_image']} ms per image", flush=True)
        rows.append(row)
    for row in rows:
        for backend in backends:
            row[f"{backend}_cost_vs_first"] = round(row[f"{backend}_ms_per_image"] /
                                                    rows[0][f"{backend}_ms_per_image"], 3)
    return {"profile": profile, "batch": batch, "steps": steps, "threads": threads, "repeat": repeat,
            "objective": "plain", "early_exit": False, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,64")
    parser.add_argument("--profile", default="folder-cpu", choices=sorted(PROFILES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--backends", default="torch,onnxruntime")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        result = measure([int(s) for s in args.sizes.split(",")], args.profile, args.batch, args.steps, args.threads,
                         args.repeat, args.backends.split(","), Path(work))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
