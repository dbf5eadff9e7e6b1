"""`repair`: a folder of images, repaired, with a report; the repair's settings, which `serve` shares."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from runtime.cli import (FOLDER_SCHEDULER_HELP, SEED_HELP, checked_settings, default_threads, max_pixels_option,
                         scheduler_option, setting_option)
from runtime.settings import FIELDS, RepairSettings

from .common import (check_device, option_group, parse_alpha, parse_tasks, ray_option_group, ray_settings,
                     usage_errors, weights_option)


# The repair's settings: `repair` and `serve` take the same ones, so that a served image is repaired as `cli.py repair`
# repairs it.
REPAIR_SETTINGS = [
    weights_option(),
    click.option("--tasks", default="contrastive,inpainting,rotation", show_default=True,
                 help="SSL tasks of the repair loss, comma-separated."),
    click.option("--classifier", "classifier_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Your own classifier as an ONNX file (N×3×S×S in [0, 1] -> logits, S the model set's size): "
                      "the report gives its predictions before and after the repair (tasks that do not read the "
                      "shipped classifier only)."),
    click.option("--alpha", default=None, help="Weight per task, comma-separated, in --tasks order (default: all 1)."),
    setting_option("eps", help="L∞ bound of the repair."),
    setting_option("steps", help="PGD steps (0: random start only, the noise control)."),
    setting_option("step_size"),
    click.option("--views", type=click.IntRange(min=2), default=4, show_default=True,
                 help="Augmented views per image for the contrastive loss."),
    click.option("--objective", type=click.Choice(["plain", "clean"]), default="clean", show_default=True,
                 help="clean: each task hinged at its clean-image level, α from clean statistics (the measured best: "
                      "same PGD accuracy as plain, smaller clean cost; docs/results.md) — the default everywhere "
                      "(load_pipeline(), eval's mtl:clean:exit); plain: Σ α_k L_k."),
    click.option("--level", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5, show_default=True,
                 help="--objective clean: the quantile of clean-image losses each task is aimed at."),
    setting_option("gate_fpr", "--gate", help="Repair only inputs whose SSL losses exceed what this fraction of clean "
                                              "images exceeds (e.g. 0.05); the rest are written unchanged."),
    click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Clean-loss statistics for --objective clean and --gate (default: calibration.json beside "
                      "the weights; made by `cli.py calibrate`)."),
    setting_option("seed", help=SEED_HELP),
    click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True),
    setting_option("early_exit", help="An image leaves the loop once its objective is zero (every task at its clean "
                                      "level): the same accuracy in a fraction of the steps (docs/repair-graphs.md). "
                                      "No effect with --objective plain."),
    click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "tensorrt"]), default="auto",
                 show_default=True,
                 help="Engine (auto: the fastest present). onnxruntime runs the whole repair in its exported graphs "
                      "where they were exported for this objective; tensorrt runs the forward-only passes, the "
                      "gradient loop staying in PyTorch."),
    click.option("--threads", type=click.IntRange(min=1), default=None,
                 help="torch and onnxruntime intra-op threads (default: the cores not busy by the load average; with "
                      "--ray, --worker-cpus). On a shared 2-core machine 2 threads ran 8–25× slower than 1."),
    click.option("--onnx-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Exported graphs for --backend onnxruntime/tensorrt (default: exported on first use into a "
                      "cache)."),
    click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
                 help="Precision of TensorRT engines."),
    click.option("--allow-large-eps", is_flag=True, help="Accept --eps above 64/255."),
    click.option("--resize/--no-resize", default=None,
                 help="Centre-crop and scale images that are not S×S (S: the model set's size) instead of reporting "
                      "an error. Default: as the model set was trained (on for a set trained on a folder of photos, "
                      "off for CIFAR-10's)."),
    max_pixels_option(),
]


repair_settings = option_group(REPAIR_SETTINGS)


REPAIR_SETTING_NAMES = {param.name for param in repair_settings(click.Command("settings")).params}


@click.command()
@click.option("--input", "input_dir", type=click.Path(path_type=Path), required=True,
              help="Folder of images (searched recursively).")
@click.option("--output", "output_dir", type=click.Path(path_type=Path), required=True,
              help="Folder for the repaired PNGs and report.json/report.csv (outside --input).")
@repair_settings
@setting_option("batch_size")
@scheduler_option(FOLDER_SCHEDULER_HELP)
@click.option("--overwrite", is_flag=True, help="Replace existing outputs and reports.")
@click.option("--preview", "preview_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a before/after picture (PNG) of the first --preview-n repaired images with their "
                   "predictions.")
@click.option("--preview-n", type=click.IntRange(1, 32), default=8, show_default=True)
@click.option("--resume", is_flag=True,
              help="Finish a stopped run into the same --output with the same options: images it repaired "
                   "(report.jsonl) are kept, the rest repaired.")
@ray_option_group("Repair on a pool of Ray Data actors (the ray extra), each loading the engine once; same "
                  "outputs and report as without it.", workers=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def repair(input_dir: Path, output_dir: Path, batch_size: int, scheduler: str, overwrite: bool,
           preview_file: Path | None,
           preview_n: int, resume: bool, use_ray: bool, ray_address: str | None, workers: int | None,
           worker_cpus: float, worker_gpus: float | None, quiet: bool, **options) -> None:
    """Repair every image under INPUT into OUTPUT (same relative paths, lossless PNG) with a report.

    Exit status: 0 when every input was repaired, 1 when some failed (see the report), 2 on usage errors.
    """
    from runtime.folder import check_folders, summary_lines
    from runtime.preview import check_preview_path

    settings, options = split_settings(options, batch_size)
    if use_ray and scheduler == "continuous":
        raise click.UsageError("--scheduler continuous runs in this process: a Ray Data actor repairs the batches "
                               "Ray hands it (leave out --ray, or --scheduler)")
    check_device(options["device"])
    ray_options = ray_settings(use_ray, ray_address, worker_cpus, worker_gpus, options["device"], workers)
    load_options = pipeline_options(options, settings, options["threads"] or (max(1, int(worker_cpus)) if use_ray
                                                                             else default_threads()))
    try:
        check_folders(input_dir, output_dir, overwrite=overwrite, resume=resume)
        if preview_file:
            check_preview_path(preview_file, overwrite=overwrite)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    from engine.folder import repair_folder       # torch: only once the arguments are known good

    pipeline = load_with_threads(load_options)
    resize = pipeline.inputs["resize"] if options["resize"] is None else options["resize"]
    how = dict(resize=resize, overwrite=overwrite, progress=not quiet, resume=resume,
               max_pixels=options["max_pixels"])
    try:
        if ray_options is None:
            report = repair_folder(pipeline, input_dir, output_dir, settings, scheduler=scheduler, **how)
        else:
            import functools

            from engine.folder import repair_folder_on_ray
            from export.onnx_export import load_exported_pipeline

            # each actor loads what the driver loaded (the export cache, if any, is already written)
            load = functools.partial(load_exported_pipeline, **load_options)
            report = repair_folder_on_ray(pipeline, load, input_dir, output_dir, settings,
                                          threads=load_options["threads"], **how, **ray_options)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    for line, to_stderr in summary_lines(report, output_dir):
        click.echo(line, err=to_stderr)
    if preview_file:
        from runtime.preview import write_preview

        shown = write_preview(report, input_dir, output_dir, preview_file, pipeline.class_names, preview_n,
                              resize=resize, size=pipeline.size)
        click.echo(f"preview of {shown} image(s): {preview_file}" if shown else "no repaired image to preview")
    sys.exit(1 if report["summary"]["n_error"] else 0)


def split_settings(options: dict, batch_size: int):
    """(the repair's RepairSettings, the other REPAIR_SETTINGS options: which pipeline, how images are read) from a
    command's options; usage errors where the settings cannot run."""
    rest = dict(options)
    values = {name: rest.pop(name) for name in FIELDS if name in rest}
    return checked_settings(rest.pop("allow_large_eps"), batch_size=batch_size, **values), rest


def pipeline_options(options: dict, settings: RepairSettings, threads: int) -> dict:
    """The arguments of the pipeline's loader from the other REPAIR_SETTINGS options (``split_settings``), the gate
    of ``settings`` and ``threads``; the task and α lists checked (usage errors)."""
    tasks = parse_tasks(options["tasks"])
    return dict(weights=options["weights"], device=options["device"], tasks=tasks,
                alpha=parse_alpha(options["alpha"], tasks), views=options["views"], backend=options["backend"],
                onnx_dir=options["onnx_dir"], precision=options["precision"], objective=options["objective"],
                level=options["level"], gate_fpr=settings.gate_fpr, calibration=options["calibration"],
                threads=threads,
                classifier=None if options["classifier_file"] is None else str(options["classifier_file"]))


def load_with_threads(load_options: dict):
    """The repair's pipeline, loaded with torch's threads set first (``load_options["threads"]``)."""
    import torch

    from export.onnx_export import load_exported_pipeline

    torch.set_num_threads(load_options["threads"])
    with usage_errors():
        return load_exported_pipeline(**load_options)
