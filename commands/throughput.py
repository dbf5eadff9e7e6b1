"""`cli.py bench`: on the same inputs, for each backend, full-repair throughput, per-graph forward throughput,
and parity against the PyTorch reference. Speed is only ever reported next to parity (docs/design.md, principle 4).

Backends:
- ``torch``: eager PyTorch, the reference;
- ``onnxruntime``: the whole repair in one exported Loop graph (export/repair_graphs.py) and the forward passes;
- ``tensorrt``: TensorRT engines do the forward-only passes, the gradient loop stays in autograd;
- ``torch-compile``: eager forwards, the repair's gradient step through ``torch.compile``.
Each name may carry ``+exit``: the same engine with the early exit (engine.repair.reverse_attack; in onnxruntime the
step graph called once per step on the images left). Speed-ups are against the first row, torch without the exit
(the reference); parity of an engine is against torch with the same exit setting. A backend that cannot run here is
listed with its reason, never dropped.
"""
from __future__ import annotations

import copy
import logging
import platform
import time
from pathlib import Path

import torch

from engine.backends import BackendUnavailable
from engine.folder import repair_batch
from engine.pipeline import DEFAULT_TASKS, Pipeline, load_pipeline
from export.onnx_export import load_exported_pipeline
from export.parity import TOLERANCES, agreement, compare
from runtime.imageio import read_folder
from runtime.settings import RepairSettings

from .roofline import attach as attach_limit

BENCH_BACKENDS = ("torch", "onnxruntime", "tensorrt", "torch-compile")
EXIT = "+exit"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def bench_names(names: list[str]) -> list[str]:
    """The rows to run: the reference first, torch+exit wherever an engine is asked for with the exit (its parity
    reference), then the rest in the order given."""
    wanted = ["torch", *(["torch" + EXIT] if any(n.endswith(EXIT) for n in names) else []), *names]
    return list(dict.fromkeys(wanted))


def bench_images(n: int, inputs: dict | None = None, folder: Path | None = None) -> torch.Tensor:
    """``n`` images (repeated where n exceeds them) at the model set's size: the same inputs for every backend.
    Default: the examples of the model set's data set (examples/imagenette for an Imagenette set), else the
    CIFAR-10 examples, centre-cropped and resized to the model set's size."""
    inputs = inputs or {"size": 32, "dataset": "cifar10"}
    if folder is None:
        folder = EXAMPLES / inputs["dataset"]
        folder = folder if folder.is_dir() else EXAMPLES / "clean"
    records = read_folder(folder, resize=True, size=int(inputs["size"]))
    x = torch.stack([torch.from_numpy(r.image) for r in records if r.image is not None])
    return x.repeat((n + len(x) - 1) // len(x), 1, 1, 1)[:n]


def timed(fn, repeat: int = 1) -> float:
    """Seconds per call, best of ``repeat`` (after one untimed warm-up call)."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def make_pipeline(name: str, weights, device: str, onnx_dir, threads: int | None, views: int = 4,
                  objective: str = "clean", tasks: list[str] | None = None,
                  alpha: dict[str, float] | None = None) -> tuple[Pipeline, float]:
    """(pipeline, seconds it took to make: export, engine build or compilation included)."""
    start = time.perf_counter()
    options = dict(views=views, objective=objective, tasks=tasks or DEFAULT_TASKS, alpha=alpha)
    if name == "torch-compile":
        pipeline = load_pipeline(weights, device, **options)
        if device == "cpu":     # inductor looks for a CUDA toolkit and warns that there is none: not news on a CPU
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        pipeline.objective = torch.compile(pipeline.objective)
    else:
        pipeline = load_exported_pipeline(weights=weights, device=device, backend=name, onnx_dir=onnx_dir,
                                          threads=threads, **options)
    return pipeline, time.perf_counter() - start


def steps_run(pipeline: Pipeline, x: torch.Tensor, settings: RepairSettings) -> float:
    """The fraction of the steps × images a repair with ``settings`` runs (below 1 where images leave early)."""
    trace = pipeline.repair_with_trace(x.to(pipeline.device), settings.eps, settings.steps, settings.step_size,
                                       settings.seed, early_exit=settings.early_exit).trace
    return round(trace.isfinite().float().mean().item(), 4) if trace.numel() else 0.0


def latency_ms(pipeline: Pipeline, x: torch.Tensor, settings: RepairSettings) -> dict:
    """Single-image repair latency, p50 and p95 over the images of x repaired one at a time."""
    repair_batch(pipeline, x[:1], settings)                                   # warm-up
    times = []
    for i in range(len(x)):
        start = time.perf_counter()
        repair_batch(pipeline, x[i:i + 1], settings)
        times.append(1000 * (time.perf_counter() - start))
    q = torch.quantile(torch.tensor(times, dtype=torch.float64), torch.tensor([0.5, 0.95], dtype=torch.float64))
    return {"p50": round(q[0].item(), 1), "p95": round(q[1].item(), 1), "n": len(times)}


def graph_throughput(pipeline: Pipeline, x: torch.Tensor, batches: tuple[int, ...]) -> dict:
    """images/s of each forward graph of the pipeline's backend at each batch size."""
    out = {}
    for batch in batches:
        xb = x.repeat((batch + len(x) - 1) // len(x), 1, 1, 1)[:batch].to(pipeline.device)
        params = pipeline.objective.sample_params(xb, 0)
        out.setdefault("classifier", {})[str(batch)] = batch / timed(lambda: pipeline.backend.logits(xb), 3)
        for task in pipeline.tasks:
            one = {task: params[task]}
            seconds = timed(lambda: pipeline.backend.task_losses(xb, one), 3)
            out.setdefault(f"{task}_loss", {})[str(batch)] = batch / seconds
    return {g: {b: round(v, 1) for b, v in per.items()} for g, per in out.items()}


def parity_rows(name: str, reference: Pipeline, candidate: Pipeline, x: torch.Tensor, ref_rows: list[dict],
                rows: list[dict], precision: str) -> list[dict]:
    x = x.to(candidate.device)
    params = reference.objective.sample_params(x, 0)
    tol = TOLERANCES[precision]
    ref_logits, logits = reference.backend.logits(x), candidate.backend.logits(x)
    results = [compare("logits", ref_logits, logits, tol["logits"])]
    ref_losses, losses = reference.backend.task_losses(x, params), candidate.backend.task_losses(x, params)
    results += [compare(f"{t}_loss", ref_losses[t], losses[t], tol["loss"]) for t in ref_losses]
    out = [{"backend": name, "output": r.output, "max_abs": r.max_abs, "max_rel": r.max_rel, "passed": r.passed,
            "agreement": agreement(ref_logits, logits) if r.output == "logits" else None} for r in results]
    after = sum(a["pred_after"] == b["pred_after"] for a, b in zip(ref_rows, rows)) / len(rows)
    out.append({"backend": name, "output": "repaired prediction", "max_abs": None, "max_rel": None,
                "passed": None, "agreement": after})
    return out


def run_bench(n: int = 64, backends: list[str] = list(BENCH_BACKENDS), device: str = "cpu", steps: int = 40,
              weights=None, onnx_dir=None, precision: str = "fp32", batches: tuple[int, ...] = (64, 256),
              threads: int | None = None, latency_images: int = 8, views: int = 4, objective: str = "clean",
              tasks: list[str] | None = None, alpha: dict[str, float] | None = None, log=print) -> dict:
    """``threads``: torch's and onnxruntime's intra-op threads (default: torch's current setting). On a shared
    machine, 2 threads can run many times slower than 1 when anything else is busy: always say which.
    ``objective``: the repair's (clean, the CLI's default, is the one an early exit can shorten); ``tasks`` and
    ``alpha``: its tasks (default: the three) and their weights (default: all 1). ``batches``: the batch sizes of the
    per-graph forward throughput."""
    if threads:
        torch.set_num_threads(threads)
    reference, _ = make_pipeline("torch", weights, device, onnx_dir, threads, views, objective, tasks, alpha)
    x = bench_images(n, reference.inputs)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "n": n, "steps": steps, "views": views, "objective": objective,
              "tasks": reference.tasks,
              "alpha": {t: (alpha or {}).get(t, 1.0) for t in reference.tasks}, "precision": precision,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "backends": [], "parity": []}
    ref_rows: dict[bool, list[dict]] = {}
    pipelines: dict[str, Pipeline] = {"torch": reference}
    for name in bench_names(backends):
        engine, early_exit = name.removesuffix(EXIT), name.endswith(EXIT)
        settings = RepairSettings(steps=steps, batch_size=n, early_exit=early_exit)
        entry = {"name": name, "available": False, "reason": None, "images_per_s": None}
        try:
            if engine not in pipelines:
                pipelines[engine], setup = make_pipeline(engine, weights, device, onnx_dir, threads, views, objective,
                                                         tasks, alpha)
                entry["setup_seconds"] = round(setup, 1)
        except BackendUnavailable as e:
            entry["reason"] = str(e)
            result["backends"].append(entry)
            log(f"{name}: not available ({e})")
            continue
        pipeline = pipelines[engine]
        last: dict[str, list[dict]] = {}

        def full_repair() -> None:
            last["rows"] = repair_batch(pipeline, x, settings)

        seconds = timed(full_repair)
        rows = last["rows"]
        entry.update(available=True, early_exit=early_exit, repair_seconds=round(seconds, 2),
                     images_per_s=round(n / seconds, 3), graphs=graph_throughput(pipeline, x, batches),
                     whole_repair_graph=bool(getattr(pipeline.backend, "can_repair", lambda o: False)(
                         pipeline.objective)),
                     latency_ms=latency_ms(pipeline, x[:latency_images], settings) if latency_images else None)
        if engine == "torch":             # without the exit every image runs every step
            entry["steps_run"] = steps_run(pipeline, x, settings) if early_exit else 1.0
        log(f"{name}: {entry['images_per_s']} images/s (full repair, {steps} steps)")
        if engine == "torch":
            ref_rows[early_exit] = copy.deepcopy(rows)
        else:
            result["parity"] += parity_rows(name, reference, pipeline, x, ref_rows[early_exit], rows, precision)
        result["backends"].append(entry)
    torch_speed = result["backends"][0]["images_per_s"]
    for entry in result["backends"]:
        if entry["available"]:
            entry["speedup_vs_torch"] = round(entry["images_per_s"] / torch_speed, 3)
    attach_limit(result, reference, steps)
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [b["name"] for b in result["backends"]]
    speeds = [b["images_per_s"] or 0 for b in result["backends"]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bars = ax.bar(names, speeds, color=["C0" if b["available"] else "0.8" for b in result["backends"]])
    for bar, b in zip(bars, result["backends"]):
        ax.annotate("not available" if not b["available"] else f"{b['images_per_s']:.2f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("full repair, images/s")
    ax.set_title(f"{result['device']}, n = {result['n']}, {result['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
