"""Repair a folder on Ray Data: the same outputs and report as ``runtime.folder.repair_folder``, with the repair
spread over a pool of actors, each of which loads the engine once.

The driver plans as a single-process run does (``plan_folder``: every file validated, outputs assigned, bad inputs
reported; pixels are not kept), Ray Data carries the paths of the inputs to repair, each actor reads its batch's
files and repairs them, and the driver writes the PNGs and the report as the results stream back. Inputs must be
readable by every worker (one machine, or a shared filesystem); outputs are written by the driver only. A repair
never depends on its batch-mates (docs/design.md, principle 3), so the PNGs and the report's rows are
byte-identical to a single-process run's (tests/test_ray.py).
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from .folder import BatchRepair, finish_report, plan_folder, repaired_this_run, save_repaired
from .imageio import MAX_PIXELS, SIZE, ImageError, input_root, read_image

EXTRA = "pip install 'mssl-repair[ray]' (Ray Data: ray[data])"


def import_ray():
    """The ``ray`` module, or ImportError naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (the data library is a separate part of the ray[data] extra)
    except ImportError as e:
        raise ImportError(f"--ray needs Ray Data, which is not installed: {EXTRA}") from e
    return ray


def quiet_ray_logs() -> None:
    """Ray's and Ray Data's console notes (start-up, execution plans) off: they would bury the run's summary.
    Ray Data's file log (in the session's logs folder) keeps them."""
    logging.getLogger("ray").setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.ERROR)


class RepairActor:
    """One Ray actor: builds the engine's batch repair once (``make_repair()``), then repairs batches of paths.
    Each output row carries the time the actor's engine was ready, from which the driver tells Ray's start-up
    apart from the repair."""

    def __init__(self, make_repair: Callable[[], BatchRepair], resize: bool, size: int = SIZE,
                 max_pixels: int = MAX_PIXELS) -> None:
        self.make_repair, self.resize, self.size, self.max_pixels = make_repair, resize, size, max_pixels
        self.repair: BatchRepair | None = None
        self.ready_at = 0.0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.repair is None:
            # built on the thread that repairs, not in __init__: Ray Data runs the two on different threads, and
            # torch's OpenMP threads then ran the repair ~20 % slower at 2 threads (the process manages more
            # OpenMP threads than it has CPUs, and libgomp stops spinning for work; docs/results.md, "Ray Data")
            self.repair, self.ready_at = self.make_repair(), time.time()
        images, errors = [], []
        for path in batch["path"]:
            try:
                images.append(read_image(Path(path), self.resize, self.size, max_pixels=self.max_pixels)[0])
                errors.append("")
            except ImageError as e:                 # the file changed between planning and repair
                images.append(None)
                errors.append(f"changed while the run was going: {e}")
        readable = [i for i, e in enumerate(errors) if not e]
        rows = self.repair(np.stack([images[i] for i in readable])) if readable else []
        out_rows = [""] * len(errors)
        out_images = np.zeros((len(errors), 3, self.size, self.size), np.float32)   # one shape in every batch (Arrow)
        for i, row in zip(readable, rows):
            out_images[i] = row.pop("image")
            row.pop("detail", None)                 # the service's, not the report's
            out_rows[i] = json.dumps(row)
        return {"file": batch["file"], "image": out_images, "row": np.array(out_rows), "error": np.array(errors),
                "ready_at": np.full(len(errors), self.ready_at)}


def connect_ray(ray, address: str | None) -> None:
    """ray.init on the cluster at ``address`` (None: a new local one); ValueError saying how where none answers."""
    # Ray runs the workers it starts at niceness 15 by default: on a machine with anything else busy they would
    # starve, and here they are the job (measured: 10× slower beside two busy processes on 2 cores)
    os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    except ConnectionError as e:
        raise ValueError(f"no Ray cluster answered at --ray-address {address} ({e}); start one with `ray start "
                         "--head`, or leave --ray-address out to start a local one") from None


def repair_folder_ray(make_repair: Callable[[], BatchRepair], input_dir: Path, output_dir: Path, config: dict,
                      batch_size: int, *, resize: bool = False, overwrite: bool = False, progress: bool = True,
                      address: str | None = None, workers: int | None = None, worker_cpus: float = 1,
                      worker_gpus: float = 0, resume: bool = False, max_pixels: int = MAX_PIXELS,
                      class_folders: list[str] | None = None) -> dict:
    """``repair_folder`` on Ray Data: ``workers`` actors (default: as many as the cluster's CPUs allow at
    ``worker_cpus`` each), each with ``worker_cpus`` CPUs and ``worker_gpus`` GPUs, on the cluster at ``address``
    (None: the one this process is connected to, else a new local one; "auto": a running cluster)."""
    ray = import_ray()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    start = time.time()
    first_ready, done = float("inf"), start
    started_here = not ray.is_initialized()
    if started_here:                        # before the plan writes anything: a cluster not found leaves no trace
        quiet_ray_logs()
        connect_ray(ray, address)
    try:
        plan = plan_folder(input_dir, output_dir, config, resize=resize, overwrite=overwrite, resume=resume,
                           keep_images=False, max_pixels=max_pixels, class_folders=class_folders)
        if plan.todo:
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars, context.print_on_execution_start = False, False
            if workers is None:
                workers = max(1, int(ray.cluster_resources().get("CPU", 1) // max(worker_cpus, 1e-9)))
            with warnings.catch_warnings():     # max_restarts goes through ray_remote_args, deprecated from 2.60
                warnings.simplefilter("ignore", DeprecationWarning)
                results = ray.data.from_arrow(path_blocks(plan.todo, input_root(input_dir), batch_size)).map_batches(
                    RepairActor, fn_constructor_args=(make_repair, resize, config.get("size", SIZE), max_pixels),
                    batch_size=batch_size,
                    compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=worker_cpus, num_gpus=worker_gpus,
                    batch_format="numpy", max_restarts=0)   # an actor that dies fails the run: no silent retry
            with tqdm(total=len(plan.todo), unit="img", desc="repair (ray)", disable=not progress) as bar:
                for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
                    first_ready = min(first_ready, float(batch["ready_at"].min()))
                    for rel, image, row, error in zip(batch["file"], batch["image"], batch["row"], batch["error"]):
                        if error:
                            plan.rows[rel].update(status="error", error=str(error))
                        else:
                            save_repaired(plan, str(rel), {**json.loads(row), "image": image}, output_dir)
                    bar.update(len(batch["file"]))
        done = time.time()
    finally:
        if started_here:
            ray.shutdown()
    return finish_report(plan, config, output_dir, time.time() - start, {"ray_workers": workers, **startup(
        start, first_ready, done, repaired_this_run(plan))})


def path_blocks(todo: list, base: Path, batch_size: int) -> list:
    """The inputs' paths as Arrow tables of one batch each, so that the engine is always called on ``batch_size``
    images (the last batch: the rest). Left to itself, Ray Data cut a 512-image folder into 200 blocks of 2-3 rows,
    and a task of 66 rows ran the engine on 64 images, then on 2 (tests/test_ray.py)."""
    import pyarrow as pa                            # a dependency of Ray Data

    chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    return [pa.table({"file": [rec.rel for rec in chunk], "path": [str(base / rec.rel) for rec in chunk]})
            for chunk in chunks]


def startup(start: float, first_ready: float, done: float, repaired_here: int) -> dict:
    """Ray's start-up (cluster, actor processes, engine loads: until the first actor's engine was ready) apart from
    the repair after it, comparable with a single process's images/s (timed once its engine is loaded and the
    folder planned; an actor also decodes its images inside that time); the clocks are the driver's and the
    actors' (one machine, or NTP-close ones)."""
    if first_ready == float("inf"):                 # nothing was sent to an actor
        return {}
    repairing = done - first_ready
    return {"ray_startup_s": round(first_ready - start, 3),
            "images_per_s_after_startup": round(repaired_here / repairing, 3) if repairing > 0 else None}
