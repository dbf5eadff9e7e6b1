"""Repair throughput and memory on the example images, with the cost split per task.

    python -m bench.repair_speed [--input examples/clean] [--steps 40] [--json FILE]

It times the full multi-task repair of every image in one batch (the defaults of `cli.py repair`), then the same
repair with each task alone, and reports the peak resident memory of the process.
"""
from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path

import click
import torch

from engine.pipeline import DEFAULT_TASKS, load_pipeline
from runtime.imageio import read_folder


def time_repair(pipeline, x: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    pipeline.repair(x, steps=steps, seed=0)
    return time.perf_counter() - start


@click.command()
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=Path("examples/clean"), show_default=True)
@click.option("--weights", type=click.Path(file_okay=False), default=None)
@click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(input_dir: Path, weights: str | None, steps: int, json_path: Path | None) -> None:
    full = load_pipeline(weights, objective="plain")
    x = torch.stack([torch.from_numpy(r.image) for r in read_folder(input_dir, resize=True, size=full.size)
                     if r.image is not None])
    time_repair(full, x[:2], 1)                                    # warm-up: first-call allocations
    seconds = time_repair(full, x, steps)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per_task = {}
    for task in DEFAULT_TASKS:
        per_task[task] = time_repair(load_pipeline(weights, tasks=(task,), objective="plain"), x, steps)
    result = {
        "n": len(x), "steps": steps, "tasks": list(DEFAULT_TASKS), "seconds": round(seconds, 2),
        "images_per_s": round(len(x) / seconds, 3), "peak_rss_mib": round(peak_mib),
        "per_task_seconds": {t: round(s, 2) for t, s in per_task.items()},
        "per_task_share": {t: round(s / sum(per_task.values()), 3) for t, s in per_task.items()},
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
    }
    click.echo(json.dumps(result, indent=2))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
