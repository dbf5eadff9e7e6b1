"""`export` (the ONNX graphs of a model set) and `bench` (the speed of each engine, with parity)."""
from __future__ import annotations

from pathlib import Path

import click

from .common import check_device, parse_alpha, parse_names, parse_tasks, usage_errors, weights_option


@click.command("export")
@weights_option()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("onnx"),
              show_default=True)
@click.option("--tasks", default="contrastive,inpainting,rotation", show_default=True)
@click.option("--views", type=click.IntRange(min=2), default=4, show_default=True,
              help="Contrastive views per image (fixed in the exported graph).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16: FP16 graphs with FP32 inputs and outputs (what TensorRT 11 needs for FP16 engines).")
@click.option("--objective", type=click.Choice(["plain", "clean"]), default="clean", show_default=True,
              help="The objective of the repair graphs (as `cli.py repair --objective`).")
@click.option("--level", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5, show_default=True)
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Clean-loss statistics for --objective clean (default: calibration.json beside the weights).")
@click.option("--overwrite", is_flag=True, help="Replace graphs exported from other weights.")
def export_command(weights: Path | None, out_dir: Path, tasks: str, views: int, precision: str, objective: str,
                   level: float, calibration: Path | None, overwrite: bool) -> None:
    """Export the classifier, the SSL loss graphs and the whole repair (its gradient step, and all steps in one ONNX
    Loop, for --objective) to ONNX (opset 18, dynamic batch) with a manifest."""
    from export.onnx_export import ExportError, export_all, load_exported_pipeline

    task_list = parse_tasks(tasks)
    with usage_errors():
        pipeline = load_exported_pipeline(weights=weights, tasks=task_list, views=views, objective=objective,
                                          level=level, calibration=calibration)
    command = (f"python cli.py export --out {out_dir} --tasks {','.join(task_list)} --views {views} "
               f"--precision {precision} --objective {objective} --level {level}")
    try:
        manifest, notes = export_all(pipeline, out_dir, overwrite=overwrite, command=command, precision=precision)
    except ExportError as e:
        raise click.UsageError(str(e)) from None
    for note in notes:
        click.echo(note)
    click.echo(f"{len(manifest['graphs'])} graphs in {out_dir} (manifest: {out_dir / 'manifest.json'})")


@click.command()
@click.option("--n", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per full repair (the examples, repeated where N is larger).")
@click.option("--backends", default="torch,onnxruntime,tensorrt,torch-compile", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@weights_option()
@click.option("--onnx-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--views", type=click.IntRange(min=2), default=4, show_default=True,
              help="Augmented views per image of the contrastive loss.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch and onnxruntime intra-op threads (default: torch's). Measure 1 and 2 on a shared machine.")
@click.option("--objective", type=click.Choice(["plain", "clean"]), default="clean", show_default=True,
              help="The repair's objective (clean: cli.py repair's default).")
@click.option("--tasks", default="contrastive,inpainting,rotation", show_default=True,
              help="The repair's tasks, comma-separated (as cli.py repair's).")
@click.option("--alpha", default=None, help="Weight per task, comma-separated, in --tasks order (default: all 1).")
@click.option("--latency-images", type=click.IntRange(min=0), default=8, show_default=True,
              help="Images repaired one at a time for the p50/p95 single-image latency (0: skip).")
@click.option("--graph-batches", default="64,256", show_default=True,
              help="Batch sizes of the per-graph forward throughput, comma-separated.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def bench(n: int, backends: str, steps: int, device: str, precision: str, weights: Path | None,
          onnx_dir: Path | None, views: int, threads: int | None, objective: str, tasks: str,
          alpha: str | None,
          latency_images: int, graph_batches: str, json_path: Path | None, plot_path: Path | None) -> None:
    """Full-repair throughput, single-image latency and per-graph forward throughput of each backend, with parity
    against torch. A backend named with +exit (e.g. onnxruntime+exit) repairs with the early exit; speed-ups are
    against torch without it."""
    from .throughput import BENCH_BACKENDS, EXIT, plot, run_bench
    from engine.models.weights import WeightsError
    from runtime.files import write_json

    check_device(device)
    names = parse_names(backends, [*BENCH_BACKENDS, *(b + EXIT for b in BENCH_BACKENDS)], "--backends")
    task_list = parse_tasks(tasks)
    alphas = parse_alpha(alpha, task_list)
    batches = parse_batches(graph_batches)
    try:
        result = run_bench(n, names, device, steps, weights, onnx_dir, precision, batches, threads=threads,
                           latency_images=latency_images, views=views, objective=objective, tasks=task_list,
                           alpha=alphas)
    except WeightsError as e:
        raise click.UsageError(str(e)) from None
    for b in result["backends"]:                  # the summary; the whole result goes to --json
        latency = b.get("latency_ms") or {}
        click.echo(f"{b['name']}: " + (f"{b['images_per_s']} images/s ({b.get('speedup_vs_torch')}× torch), "
                                       f"latency p50 {latency.get('p50')} ms, p95 {latency.get('p95')} ms"
                                       if b["available"] else f"not available: {b['reason']}")
                   + (f"; {b['gflops']} GFLOP/s, {100 * b['fraction_of_peak']:.1f} % of the peak" if "gflops" in b
                      else ""))
    limit = result["limit"]
    click.echo(f"one step of one image: {limit['step_mflops']} MFLOP ({limit['per_task_step_mflops']}); this "
               f"machine's fp32 peak at {result['threads']} thread(s): {limit['peak_gflops']} GFLOP/s")
    if json_path:
        write_json(json_path, result)
        click.echo(f"wrote {json_path}")
    if plot_path:
        plot(result, plot_path)


def parse_batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in text.split(","))
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of positive batch sizes",
                                 param_hint="--graph-batches")
    return batches
