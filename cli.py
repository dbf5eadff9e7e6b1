"""mssl-repair command line: thin wrappers that parse, check and call engine/.

Exit status: 0 on full success, 1 when some inputs failed (the rest done), 2 on usage errors.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from runtime.cli import FRACTION, checked_eps, default_threads

MODELS = ("classifier", "contrastive", "inpainting", "rotation", "contrastive-head", "inpainting-head",
          "rotation-head", "classifier-standard", "inpainting-patches")
PROFILES = ("cpu", "gpu", "folder-cpu")              # engine/train.py's PROFILES (tests check the two agree)
JOINT_MODELS = ("joint-robust", "joint-standard")     # engine/joint.py (kept here: --help imports no torch)
# engine.tasks.TASKS's names, kept here so that a mistyped argument is answered before torch loads (tests check
# the two agree)
TASK_NAMES = ("contrastive", "inpainting", "rotation", "contrastive-head", "inpainting-head", "rotation-head",
              "inpainting-patches", "consistency", "hedge")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Repair adversarially attacked images with multiple self-supervised tasks (Lawhon & Ducrest)."""


@main.command()
@click.argument("model", type=click.Choice(MODELS + JOINT_MODELS))
@click.option("--profile", type=click.Choice(PROFILES), default="cpu", show_default=True,
              help="Recipe: cpu fits CIFAR-10 on a 2-core machine, gpu is the larger variant for a CUDA GPU, "
                   "folder-cpu fits ~10,000 photos at --size 64 on a 2-core machine.")
@click.option("--data", "data_root", default=None,
              help="A folder of images (class subfolders give labels; train/ and val/ subfolders give the splits), "
                   "or cifar10 (default: CIFAR-10 at $CIFAR10_ROOT).")
@click.option("--size", type=click.IntRange(32, 224), default=32, show_default=True,
              help="Working size S: images are centre-cropped and resized to S×S (a multiple of 16).")
@click.option("--resume", is_flag=True, help="Continue a stopped run from its last epoch checkpoint.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="weights", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the profile's epoch count.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when available.")
@click.option("--overwrite", is_flag=True, help="Replace existing weights of the same name in --out.")
@click.option("--base", "base_dir", type=click.Path(file_okay=False), default="weights", show_default=True,
              help="joint-*: the folder of the trained classifier (and its heads) to fine-tune jointly.")
def train(model: str, profile: str, data_root: str | None, size: int, resume: bool, out_dir: str, seed: int,
          epochs: int | None, device: str | None, overwrite: bool, base_dir: str) -> None:
    """Train MODEL and write OUT/MODEL.safetensors + OUT/MODEL.json (with test-set metrics).

    joint-robust and joint-standard fine-tune the classifier in --base together with its rotation, contrastive and
    inpainting heads (and label consistency) and write the classifier and the three heads to --out, which must be
    another folder (e.g. --out weights/joint-robust).
    """
    from engine.data import DataError
    from engine.weights import WeightsError

    _check_device(device)
    _check_size(size)
    command = f"python cli.py train {model} --profile {profile} --out {out_dir} --seed {seed}"
    command += f" --epochs {epochs}" if epochs else ""
    command += f" --data {data_root} --size {size}" if data_root else ""
    try:
        if model in JOINT_MODELS:
            from engine.joint import train_joint

            path = train_joint(model, profile, data_root, out_dir, base_dir, seed, device, overwrite, epochs,
                               f"{command} --base {base_dir}")
        else:
            from engine.train import train_model

            path = train_model(model, profile, data_root, out_dir, seed, device, overwrite, epochs, command, size,
                               resume)
    except (DataError, WeightsError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {path}")


SET_MODELS = ("classifier", "contrastive", "rotation", "inpainting")


@main.command("train-set")
@click.option("--data", "data_root", required=True,
              help="A folder of images (class subfolders give the classifier's labels; train/ and val/ subfolders "
                   "give the splits, else a tenth is held out).")
@click.option("--size", type=click.IntRange(32, 224), default=64, show_default=True,
              help="Working size S (a multiple of 16): images are centre-cropped and resized to S×S.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The model set's folder, e.g. weights/NAME.")
@click.option("--profile", type=click.Choice(PROFILES), default="folder-cpu", show_default=True)
@click.option("--standard", is_flag=True, help="Also train an undefended classifier (classifier-standard).")
@click.option("--calibration-n", type=click.IntRange(min=10), default=2000, show_default=True,
              help="Clean training images whose SSL losses calibrate the repair.")
@click.option("--objective", type=click.Choice(["plain", "clean"]), default="clean", show_default=True,
              help="The objective of the exported repair graphs (as `cli.py export --objective`).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads (default: the cores not busy by the load average).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when available.")
@click.option("--resume", is_flag=True, help="Continue a stopped run: finished models are kept, a model stopped "
                                             "mid-way continues from its last epoch.")
@click.option("--overwrite", is_flag=True, help="Start again, replacing a model set in --out.")
def train_set(data_root: str, size: int, out_dir: Path, profile: str, standard: bool, calibration_n: int,
              objective: str, seed: int, threads: int | None, device: str | None, resume: bool,
              overwrite: bool) -> None:
    """Train a whole model set on a folder of images, in order: the robust classifier (and with --standard an
    undefended one), the contrastive, rotation and inpainting networks, the clean-loss calibration, and the ONNX
    export (OUT/onnx). Every model checkpoints each epoch; --resume continues a run that was stopped."""
    import torch

    from engine.calibration import calibrate as measure, save_calibration
    from engine.data import DataError
    from engine.train import log, train_model
    from engine.weights import WeightsError
    from export.onnx_export import ExportError, export_all

    _check_device(device)
    _check_size(size)
    if resume and overwrite:
        raise click.UsageError("--resume continues a run, --overwrite starts it again: pass one of them")
    models = [*SET_MODELS[:1], *(["classifier-standard"] if standard else []), *SET_MODELS[1:]]
    existing = [m for m in models if (out_dir / f"{m}.json").exists()] + \
        [p.name for p in (out_dir / "calibration.json", out_dir / ".checkpoints") if p.exists()]
    if existing and not (resume or overwrite):
        raise click.UsageError(f"{out_dir} already holds {', '.join(existing)}: pass --resume to continue that run, "
                               "--overwrite to start again, or choose another --out")
    torch.set_num_threads(threads or default_threads())
    steps = len(models) + 2
    base = f"python cli.py train-set --data {data_root} --size {size} --out {out_dir} --profile {profile} --seed {seed}"
    try:
        for i, model in enumerate(models, 1):
            if resume and (out_dir / f"{model}.json").exists():
                log(f"[{i}/{steps}] {model}: done before, kept")
                continue
            log(f"[{i}/{steps}] {model}")
            train_model(model, profile, data_root, str(out_dir), seed, device, overwrite, None,
                        f"{base} (step {model})", size, resume)
        calibration = out_dir / "calibration.json"
        if not (resume and calibration.exists()):
            log(f"[{steps - 1}/{steps}] calibration on {calibration_n} clean training images")
            pipeline = _load(weights=out_dir, tasks=list(TASK_NAMES[:3]), objective="plain")
            stats = measure(pipeline, calibration_n, seed, data_root)
            save_calibration(stats, calibration, f"{base} (step calibration)", overwrite=True)
        log(f"[{steps}/{steps}] ONNX export to {out_dir / 'onnx'}")
        manifest, notes = export_all(_load(weights=out_dir, objective=objective), out_dir / "onnx", overwrite,
                                     f"{base} --objective {objective} (step export)")
    except (DataError, WeightsError, ExportError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    for note in notes:
        click.echo(note)
    click.echo(f"model set in {out_dir}: {', '.join(models)}, calibration.json, onnx/ ({len(manifest['graphs'])} "
               "graphs)")


def _parse_tasks(text: str, option: str = "--tasks") -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if not tasks or unknown:
        raise click.BadParameter(f"unknown task(s) {', '.join(unknown) or '(none given)'}; "
                                 f"choose from {', '.join(TASK_NAMES)}", param_hint=option)
    if len(set(tasks)) != len(tasks):
        raise click.BadParameter(f"a task is named twice in {text!r}", param_hint=option)
    return tasks


def _parse_alpha(text: str | None, tasks: list[str]) -> dict[str, float]:
    if text is None:
        return {t: 1.0 for t in tasks}
    values = [FRACTION.convert(v, None, None) for v in text.split(",")]
    if len(values) != len(tasks):
        raise click.BadParameter(f"{len(values)} weight(s) for {len(tasks)} task(s) ({', '.join(tasks)})",
                                 param_hint="--alpha")
    return dict(zip(tasks, values))


# The repair's settings: `repair` and `serve` take the same ones, so that a served image is repaired as `cli.py repair`
# repairs it.
REPAIR_SETTINGS = [
    click.option("--weights", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Weights folder (default: the shipped weights/)."),
    click.option("--tasks", default="contrastive,inpainting,rotation", show_default=True,
                 help="SSL tasks of the repair loss, comma-separated."),
    click.option("--classifier", "classifier_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Your own classifier as an ONNX file (N×3×S×S in [0, 1] -> logits, S the model set's size): "
                      "the report gives its predictions before and after the repair (tasks that do not read the "
                      "shipped classifier only)."),
    click.option("--alpha", default=None, help="Weight per task, comma-separated, in --tasks order (default: all 1)."),
    click.option("--eps", type=FRACTION, default="16/255", show_default=True, help="L∞ bound of the repair."),
    click.option("--steps", type=click.IntRange(min=0), default=40, show_default=True,
                 help="PGD steps (0: random start only, the noise control)."),
    click.option("--step-size", type=FRACTION, default="2/255", show_default=True),
    click.option("--views", type=click.IntRange(min=2), default=4, show_default=True,
                 help="Augmented views per image for the contrastive loss."),
    click.option("--objective", type=click.Choice(["plain", "clean"]), default="clean", show_default=True,
                 help="clean: each task hinged at its clean-image level, α from clean statistics (the measured best: "
                      "same PGD accuracy as plain, smaller clean cost; docs/results.md) — the default everywhere "
                      "(load_pipeline(), eval's mtl:clean:exit); plain: Σ α_k L_k."),
    click.option("--level", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5, show_default=True,
                 help="--objective clean: the quantile of clean-image losses each task is aimed at."),
    click.option("--gate", "gate_fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
                 help="Repair only inputs whose SSL losses exceed what this fraction of clean images exceeds "
                      "(e.g. 0.05); the rest are written unchanged."),
    click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Clean-loss statistics for --objective clean and --gate (default: calibration.json beside "
                      "the weights; made by `cli.py calibrate`)."),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True),
    click.option("--early-exit/--no-early-exit", default=True, show_default=True,
                 help="An image leaves the loop once its objective is zero (every task at its clean level): the same "
                      "accuracy in a fraction of the steps (docs/repair-graphs.md). No effect with --objective plain."),
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
]


def _repair_settings(command):
    for option in reversed(REPAIR_SETTINGS):
        command = option(command)
    return command


REPAIR_SETTING_NAMES = {param.name for param in _repair_settings(click.Command("settings")).params}


@main.command()
@click.option("--input", "input_dir", type=click.Path(path_type=Path), required=True,
              help="Folder of images (searched recursively).")
@click.option("--output", "output_dir", type=click.Path(path_type=Path), required=True,
              help="Folder for the repaired PNGs and report.json/report.csv (outside --input).")
@_repair_settings
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace existing outputs and reports.")
@click.option("--preview", "preview_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a before/after picture (PNG) of the first --preview-n repaired images with their "
                   "predictions.")
@click.option("--preview-n", type=click.IntRange(1, 32), default=8, show_default=True)
@click.option("--resume", is_flag=True,
              help="Finish a stopped run into the same --output with the same options: images it repaired "
                   "(report.jsonl) are kept, the rest repaired.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Repair on a pool of Ray Data actors (the ray extra), each loading the engine once; same outputs "
                   "and report as without it.")
@click.option("--ray-address", default=None,
              help="--ray: the cluster to join (auto: the one running here, ray://HOST:10001: a remote one; "
                   "default: start a local one).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="--ray: actors in the pool (default: the cluster's CPUs / --worker-cpus).")
@click.option("--worker-cpus", type=click.FloatRange(min=0, min_open=True), default=1, show_default=True,
              help="--ray: CPUs per actor (also its torch threads, unless --threads).")
@click.option("--worker-gpus", type=click.FloatRange(min=0), default=None,
              help="--ray: GPUs per actor (default: 1 with --device cuda, else 0).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def repair(input_dir: Path, output_dir: Path, batch_size: int, overwrite: bool, preview_file: Path | None,
           preview_n: int, resume: bool, use_ray: bool, ray_address: str | None, workers: int | None,
           worker_cpus: float, worker_gpus: float | None, quiet: bool, **settings) -> None:
    """Repair every image under INPUT into OUTPUT (same relative paths, lossless PNG) with a report.

    Exit status: 0 when every input was repaired, 1 when some failed (see the report), 2 on usage errors.
    """
    from runtime.folder import check_folders, summary_lines
    from runtime.preview import check_preview_path

    steps, note = checked_eps(settings["eps"], settings["steps"], settings["allow_large_eps"])
    if note:
        click.echo(note, err=True)

    _check_device(settings["device"])
    ray_options = _ray_options(use_ray, ray_address, workers, worker_cpus, worker_gpus, settings["device"])
    load_options = _load_options(settings, settings["threads"] or (max(1, int(worker_cpus)) if use_ray
                                                                   else default_threads()))
    try:
        check_folders(input_dir, output_dir, overwrite, resume)
        if preview_file:
            check_preview_path(preview_file, overwrite)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    from engine.folder import RepairConfig, repair_folder       # torch: only once the arguments are known good

    pipeline = _load_with_threads(load_options)
    resize = pipeline.inputs["resize"] if settings["resize"] is None else settings["resize"]
    config = RepairConfig(eps=settings["eps"], steps=steps, step_size=settings["step_size"], seed=settings["seed"],
                          batch_size=batch_size, early_exit=settings["early_exit"])
    try:
        if ray_options is None:
            report = repair_folder(pipeline, input_dir, output_dir, config, resize, overwrite, not quiet, resume)
        else:
            import functools

            from engine.folder import repair_folder_on_ray
            from export.onnx_export import load_exported_pipeline

            # each actor loads what the driver loaded (the export cache, if any, is already written)
            load = functools.partial(load_exported_pipeline, **load_options)
            report = repair_folder_on_ray(pipeline, load, input_dir, output_dir, config, resize, overwrite,
                                          not quiet, load_options["threads"], resume, **ray_options)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    for line, to_stderr in summary_lines(report, output_dir):
        click.echo(line, err=to_stderr)
    if preview_file:
        from runtime.preview import write_preview

        shown = write_preview(report, input_dir, output_dir, preview_file, pipeline.class_names, preview_n, resize,
                              pipeline.size)
        click.echo(f"preview of {shown} image(s): {preview_file}" if shown else "no repaired image to preview")
    sys.exit(1 if report["summary"]["n_error"] else 0)


# Settings of a served repair that a bundle fixes at its export (the rest apply with or without --bundle)
BUNDLE_FIXED = ("weights", "tasks", "classifier_file", "alpha", "views", "objective", "level", "calibration", "device",
                "backend", "onnx_dir", "precision")


@main.command()
@_repair_settings
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Serve an exported bundle (`cli.py export`): the replicas run it in onnxruntime without importing "
                   "PyTorch; tasks, α, objective and weights are the bundle's.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--replica-cpus", type=click.FloatRange(min=0, min_open=True), default=1, show_default=True,
              help="CPUs per replica (also its threads, unless --threads).")
@click.option("--replica-gpus", type=click.FloatRange(min=0), default=None,
              help="GPUs per replica (default: 1 with --device cuda, else 0).")
@click.option("--max-batch-size", type=click.IntRange(1, 1024), default=64, show_default=True,
              help="Requests repaired together at most (a smaller batch also shortens the longest wait: "
                   "docs/serving.md).")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0), default=10, show_default=True,
              help="How long a batch that is not full waits for more requests.")
@click.option("--max-queued", type=click.IntRange(min=0), default=None,
              help="Requests a replica holds beyond --max-batch-size (the batch it repairs counted in); more are "
                   "refused at once (503 with Retry-After). Default: --max-batch-size, so that an accepted request "
                   "waits for two batches when the one being repaired is full, three at most; each --max-batch-size "
                   "more adds a batch to the longest wait.")
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=60, show_default=True,
              help="A request not repaired within this time is answered 504.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=20, show_default=True,
              help="Larger request bodies are refused (413).")
@click.option("--ray-address", default=None,
              help="The Ray cluster to join (auto: the one running here; default: start a local one).")
@click.pass_context
def serve(ctx: click.Context, **options) -> None:
    """Serve the repair over HTTP on Ray Serve until Ctrl-C: POST /v1/repair (an image -> its repaired PNG),
    POST /v1/classify, GET /v1/info, GET /healthz and a page at / (docs/serving.md). A served image is repaired as
    `cli.py repair` repairs it, byte for byte, whatever it is batched with."""
    import time

    from runtime import serve as service

    make_repair, settings, where = _serving(ctx)
    click.echo(f"starting {where.replicas} replica(s) of the repair ({settings.repair['backend']}, "
               f"{settings.size}×{settings.size}) ...")
    start = time.perf_counter()
    try:
        url = service.start(make_repair, settings, where, options["ray_address"])
        click.echo(f"serving on {url} (ready in {time.perf_counter() - start:.1f} s); Ctrl-C stops it")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        service.stop()


def serving(options: list[str]):
    """What `cli.py serve OPTIONS` deploys: (make_repair, ServiceSettings, Deployment). bench.serve_load and the tests
    build their service with it, so that they serve exactly what the command serves."""
    with serve.make_context("serve", list(options)) as ctx:
        return _serving(ctx)


def _serving(ctx: click.Context):
    """(make_repair, ServiceSettings, Deployment) from `serve`'s parsed options; usage errors before Ray starts."""
    try:
        from runtime import serve as service
    except ImportError as e:
        raise click.UsageError(f"serve needs Ray Serve, which is not installed ({e}): "
                               "pip install 'mssl-repair[serve]'") from None
    options = dict(ctx.params)
    settings = {name: options.pop(name) for name in REPAIR_SETTING_NAMES}
    steps, note = checked_eps(settings["eps"], settings["steps"], settings.pop("allow_large_eps"))
    if note:
        click.echo(note, err=True)
    settings.update(steps=steps, threads=settings["threads"] or max(1, int(options["replica_cpus"])))
    _check_device(settings["device"])
    gpus = options["replica_gpus"] if options["replica_gpus"] is not None else int(settings["device"] == "cuda")
    queued = options["max_queued"] if options["max_queued"] is not None else options["max_batch_size"]
    limits = dict(max_batch_size=options["max_batch_size"], batch_wait_ms=options["batch_wait_ms"], max_queued=queued,
                  timeout_s=options["timeout_s"], max_body_bytes=int(options["max_body_mb"] * 2**20))
    make_repair, service_settings = (_bundle_service(ctx, options["bundle_dir"], settings, limits)
                                     if options["bundle_dir"] else _torch_service(settings, limits))
    where = service.Deployment(options["host"], options["port"], options["replicas"], options["replica_cpus"], gpus)
    return make_repair, service_settings, where


def _service_settings(service, size: int, resize: bool | None, default_resize: bool, classes: list[str],
                      config: dict, limits: dict):
    return service.ServiceSettings(size=size, resize=default_resize if resize is None else resize, classes=classes,
                                   repair=config, info={"versions": service.info_versions()}, **limits)


def _bundle_service(ctx: click.Context, bundle_dir: Path, settings: dict, limits: dict):
    """(make_repair, ServiceSettings) of a bundle service; settings the bundle fixes are refused if given."""
    from runtime import serve as service
    from runtime.bundle import Bundle, BundleRepair

    given = [f"--{name.removesuffix('_file').replace('_', '-')}" for name in BUNDLE_FIXED
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if given:
        raise click.UsageError(f"{', '.join(given)}: fixed by the bundle's export (cli.py export); leave them out "
                               "with --bundle, or serve the weights without --bundle")
    make_repair = BundleRepair(str(bundle_dir), settings["threads"], settings["seed"], settings["eps"],
                               settings["steps"], settings["step_size"], settings["gate_fpr"], settings["early_exit"])
    try:
        bundle = Bundle(bundle_dir, 1)
        config = make_repair.config(bundle, limits["max_batch_size"])
    except ValueError as e:                 # BundleError too
        raise click.UsageError(str(e)) from None
    return make_repair, _service_settings(service, bundle.size, settings["resize"], bundle.resize, bundle.classes,
                                          config, limits)


def _torch_service(settings: dict, limits: dict):
    """(make_repair, ServiceSettings) of a PyTorch service: the pipeline is loaded here once (usage errors answered
    before Ray starts), then by each replica."""
    import functools

    from engine.folder import BatchRepairFactory, RepairConfig, report_config
    from export.onnx_export import load_exported_pipeline
    from runtime import serve as service

    load_options = _load_options(settings, settings["threads"])
    pipeline = _load_with_threads(load_options)
    config = RepairConfig(eps=settings["eps"], steps=settings["steps"], step_size=settings["step_size"],
                          seed=settings["seed"], batch_size=limits["max_batch_size"], early_exit=settings["early_exit"])
    make_repair = BatchRepairFactory(functools.partial(load_exported_pipeline, **load_options), config,
                                     settings["threads"])
    return make_repair, _service_settings(service, pipeline.size, settings["resize"], pipeline.inputs["resize"],
                                          pipeline.class_names, report_config(pipeline, config), limits)


def _load_options(settings: dict, threads: int) -> dict:
    """The arguments of the pipeline's loader from the repair settings (REPAIR_SETTINGS' names), with ``threads``; the
    task and α lists checked (usage errors)."""
    tasks = _parse_tasks(settings["tasks"])
    return dict(weights=settings["weights"], device=settings["device"], tasks=tasks,
                alpha=_parse_alpha(settings["alpha"], tasks), views=settings["views"], backend=settings["backend"],
                onnx_dir=settings["onnx_dir"], precision=settings["precision"], objective=settings["objective"],
                level=settings["level"], gate_fpr=settings["gate_fpr"], calibration=settings["calibration"],
                threads=threads,
                classifier=None if settings["classifier_file"] is None else str(settings["classifier_file"]))


def _load_with_threads(load_options: dict):
    """The repair's pipeline, loaded with torch's threads set first (``load_options["threads"]``)."""
    import torch

    torch.set_num_threads(load_options["threads"])
    return _load(**load_options)


def _ray_options(use_ray: bool, address: str | None, workers: int | None, worker_cpus: float,
                 worker_gpus: float | None, device: str) -> dict | None:
    """The Ray pool's settings for --ray (None without it); a usage error where Ray Data is missing or a --ray
    option is given without --ray."""
    if not use_ray:
        given = [name for name, value in (("--ray-address", address), ("--workers", workers),
                                          ("--worker-gpus", worker_gpus)) if value is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply with --ray")
        return None
    from runtime.ray_folder import import_ray

    try:
        import_ray()
    except ImportError as e:
        raise click.UsageError(str(e)) from None
    gpus = worker_gpus if worker_gpus is not None else (1 if device == "cuda" else 0)
    return dict(address=address, workers=workers, worker_cpus=worker_cpus, worker_gpus=gpus)


@main.command()
@click.option("--output", "output_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the attacked PNGs, labels.csv and attack.json.")
@click.option("--n", type=click.IntRange(min=1), default=64, show_default=True,
              help="Attack the first N test images (CIFAR-10, or --data).")
@click.option("--attack", type=click.Choice(["pgd", "aware"]), default="pgd", show_default=True,
              help="pgd: on the classifier; aware: PGD that also keeps the repair's SSL loss low.")
@click.option("--eps", type=FRACTION, default="8/255", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--step-size", type=FRACTION, default="2/255", show_default=True)
@click.option("--lam", type=FRACTION, default="1", show_default=True, help="λ of the aware attack.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--clean-output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the clean originals (and their labels.csv) here.")
@click.option("--tasks", default="contrastive,inpainting,rotation", show_default=True,
              help="--attack aware: the SSL tasks whose loss the attack keeps low.")
@click.option("--weights", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Weights folder whose classifier is attacked (default: the shipped weights/).")
@click.option("--data", "data_root", default=None,
              help="The model set's kind of images: a folder (class subfolders; train/ and val/ where it has them), "
                   "or cifar10 (the default: CIFAR-10 at $CIFAR10_ROOT).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace files of an earlier run.")
def attack(output_dir: Path, n: int, attack: str, eps: float, steps: int, step_size: float, lam: float, seed: int,
           clean_output: Path | None, tasks: str, weights: Path | None, data_root: str | None, device: str,
           overwrite: bool) -> None:
    """Write attacked test images (CIFAR-10, or --data) as lossless 8-bit PNG + labels.csv (the classifier of
    --weights)."""
    from engine.attack_set import write_attack_set
    from engine.data import DataError

    _check_device(device)
    # PGD reads the classifier alone: hedge is a task with no weights of its own, so any weights folder loads
    task_list = _parse_tasks(tasks) if attack == "aware" else ["hedge"]
    pipeline = _load(weights=weights, device=device, tasks=task_list, objective="plain")
    try:
        summary = write_attack_set(pipeline, output_dir, n, attack, eps, steps, step_size, seed, clean_output,
                                   data_root, overwrite, lam)
    except (ValueError, DataError) as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {n} attacked images to {output_dir}; accuracy: clean {100 * summary['accuracy_clean']:.1f} %, "
               f"attacked {100 * summary['accuracy_attacked_float']:.1f} % in float, "
               f"{100 * summary['accuracy_attacked_png']:.1f} % as 8-bit PNG")


def _parse_batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in text.split(","))
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of positive batch sizes",
                                 param_hint="--graph-batches")
    return batches


def _names(text: str, known, option: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in known]
    if not names or unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}",
                                 param_hint=option)
    return list(dict.fromkeys(names))


@main.command("eval")
@click.option("--n", type=click.IntRange(min=1, max=10000), default=1000, show_default=True,
              help="Test images (a seeded random subset, the same on every run).")
@click.option("--attacks", default="none,pgd", show_default=True,
              help="Comma-separated: none, pgd, aware, bpda-eot, autoattack (APGD-CE + APGD-T on the classifier, "
                   "then the repair), autoattack-bpda (APGD-CE through the repair, BPDA); autoattack needs the "
                   "attacks extra.")
@click.option("--repairs", default="none,noise,contrastive,mtl,mtl:clean:exit", show_default=True,
              help="Comma-separated repair names BASE[:clean][:gate]; BASE: none, noise, mtl (the independent "
                   "networks), mtl-head (heads on the classifier), a task, or tasks joined by + "
                   "(e.g. noise,mtl-head,mtl-head:clean:gate).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the results here; partial results go beside it and an interrupted run resumes.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Bar chart (PNG) of the accuracies with their 95 % intervals.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eps-r", type=FRACTION, default="16/255", show_default=True, help="L∞ bound of the repair.")
@click.option("--repair-steps", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--repair-step-size", type=FRACTION, default="2/255", show_default=True)
@click.option("--views", type=click.IntRange(min=2), default=4, show_default=True)
@click.option("--alpha", default="1,1,1", show_default=True,
              help="Task weights of the repairs, in the order contrastive,inpainting,rotation.")
@click.option("--level", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5, show_default=True,
              help=":clean repairs aim each task at this quantile of its clean-image losses.")
@click.option("--gate-fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05,
              show_default=True, help=":gate repairs: fraction of clean calibration images the gate flags.")
@click.option("--gate-tasks", default="contrastive,inpainting,rotation", show_default=True,
              help="Tasks whose losses make the gate's score.")
@click.option("--defense", default="mtl", show_default=True,
              help="The repair (a --repairs name) that the aware and bpda-eot attacks aim at.")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Clean-loss statistics for :clean and :gate (default: calibration.json beside the weights).")
@click.option("--attack-eps", type=FRACTION, default="8/255", show_default=True)
@click.option("--attack-step", type=FRACTION, default=None, help="Step of the PGD attacks (default: --attack-eps / 4).")
@click.option("--attack-steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--lam", type=FRACTION, default="1", show_default=True, help="λ of the defense-aware attack.")
@click.option("--bpda-steps", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--eot", type=click.IntRange(min=1), default=2, show_default=True,
              help="Repair samples averaged per BPDA step.")
@click.option("--bpda-repair-steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Repair steps inside the BPDA+EOT attack (the evaluated repair keeps --repair-steps).")
@click.option("--aa-iters", type=click.IntRange(min=1), default=100, show_default=True,
              help="APGD iterations of the autoattack attacks (AutoAttack's standard: 100).")
@click.option("--aa-targets", type=click.IntRange(1, 9), default=9, show_default=True,
              help="Target classes of APGD-T (AutoAttack's standard: 9).")
@click.option("--aa-eot", type=click.IntRange(min=1), default=1, show_default=True,
              help="Gradient samples per APGD step of autoattack-bpda (EOT over the repair's randomness).")
@click.option("--chunk", type=click.IntRange(min=1), default=100, show_default=True,
              help="Images per unit of work (and of saved progress).")
@click.option("--weights", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--data", "data_root", default=None,
              help="The model set's kind of images: a folder (class subfolders; train/ and val/ where it has them), "
                   "or cifar10 (the default: CIFAR-10 at $CIFAR10_ROOT).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "tensorrt"]), default="auto",
              show_default=True,
              help="Engine for the forward-only passes (predictions); attacks and repairs run in PyTorch.")
@click.option("--onnx-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Precision of TensorRT engines.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate(n: int, attacks: str, repairs: str, json_path: Path | None, plot_path: Path | None,
             markdown_path: Path | None, seed: int, eps_r: float, repair_steps: int, repair_step_size: float,
             views: int, alpha: str, level: float, gate_fpr: float, gate_tasks: str, defense: str,
             calibration: Path | None, attack_eps: float, attack_step: float | None, attack_steps: int, lam: float,
             bpda_steps: int, eot: int,
             bpda_repair_steps: int, aa_iters: int, aa_targets: int, aa_eot: int, chunk: int, weights: Path | None,
             data_root: str | None, device: str,
             backend: str, onnx_dir: Path | None, precision: str, quiet: bool) -> None:
    """Accuracy of attack × repair on test images (CIFAR-10, or --data), with 95 % intervals and McNemar tests
    (Table 1)."""
    from engine.data import DataError
    from engine.evaluate import ATTACKS, EvalConfig, markdown_table, needs_calibration, plot, run_eval, tasks_needed
    from engine.repair_spec import parse_repair

    _check_device(device)
    repair_names = [r.strip() for r in repairs.split(",") if r.strip()]
    for name, option in [*((r, "--repairs") for r in repair_names), (defense, "--defense")]:
        try:
            parse_repair(name)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint=option) from None
    if not repair_names:
        raise click.BadParameter("no repair named", param_hint="--repairs")
    config = EvalConfig(n=n, seed=seed, attacks=_names(attacks, ATTACKS, "--attacks"),
                        repairs=list(dict.fromkeys(repair_names)), attack_eps=attack_eps,
                        attack_step=attack_eps / 4 if attack_step is None else attack_step,
                        attack_steps=attack_steps, eps_r=eps_r, repair_steps=repair_steps,
                        repair_step_size=repair_step_size, views=views,
                        alpha=list(_parse_alpha(alpha, list(TASK_NAMES[:3])).values()),
                        level=level, gate_fpr=gate_fpr, gate_tasks=_parse_tasks(gate_tasks, "--gate-tasks"),
                        defense=defense, aware_lambda=lam, bpda_steps=bpda_steps,
                        bpda_eot=eot, bpda_repair_steps=bpda_repair_steps, autoattack_iters=aa_iters,
                        autoattack_targets=aa_targets, autoattack_eot=aa_eot, chunk=chunk)
    if needs_calibration(config):
        from engine.calibration import calibration_path

        calibration = calibration_path(weights, calibration)
    # each repair row builds its own objective (engine/repair_spec.py); the pipeline's is the plain sum
    pipeline = _load(weights=weights, device=device, tasks=tasks_needed(config), views=views, backend=backend,
                     objective="plain", onnx_dir=onnx_dir, precision=precision, calibration=calibration)
    try:
        result = run_eval(pipeline, config, json_path, data_root, progress=not quiet)
    except (ValueError, DataError) as e:
        raise click.UsageError(str(e)) from None
    table = markdown_table(result)
    click.echo(table)
    click.echo(f"\nseconds: {result['seconds']}")
    if markdown_path:
        markdown_path.write_text(table + "\n")
    if plot_path:
        plot(result, plot_path)


@main.command("worst-case")
@click.option("--repair", "defense", default="mtl:clean:exit", show_default=True,
              help="The defense (an eval repair name); the default is `cli.py repair`'s default repair.")
@click.option("--control", default="noise", show_default=True,
              help="Evaluated beside it the same way: the repair's random start only ('' for none).")
@click.option("--n", type=click.IntRange(min=1, max=10000), default=1000, show_default=True,
              help="Test images (the eval's seeded subset: the same images as `cli.py eval --n`).")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True,
              help="Skip the subset's first K images (to extend a run over new images).")
@click.option("--eps", type=FRACTION, default="8/255", show_default=True, help="The attacker's L∞ budget.")
@click.option("--iterations", type=click.IntRange(min=1), default=100, show_default=True,
              help="The attacks on the defense: APGD iterations and the defense-aware PGD's steps.")
@click.option("--base-iterations", type=click.IntRange(min=1), default=100, show_default=True,
              help="AutoAttack on the classifier alone: APGD and FAB iterations (the standard version's 100).")
@click.option("--eot", type=click.IntRange(min=1), default=4, show_default=True,
              help="Repair samples averaged per APGD step through the defense.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Scorings of each final image on the real defense (seeds 0, 7919, …); robust = right every time.")
@click.option("--targets", type=click.IntRange(1, 9), default=9, show_default=True,
              help="Target classes of APGD-T and FAB-T (standard: 9).")
@click.option("--base-queries", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Square's queries on the classifier alone (AutoAttack's standard: 5000).")
@click.option("--square-queries", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Square's queries on the defense: each runs the real repair.")
@click.option("--surrogate-steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Repair steps in the forward of the BPDA attacks (the scored repair runs all its steps).")
@click.option("--lam", type=FRACTION, default="1", show_default=True, help="λ of the defense-aware attack.")
@click.option("--chunk", type=click.IntRange(min=1), default=25, show_default=True,
              help="Images per unit of work (and of saved progress).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the results here.")
@click.option("--stages", "stages_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep each stage's output here (default: stages/ beside --json): a killed run resumes, and a rerun "
                   "recomputes only what its options change (a new budget for one attack, more images).")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--weights", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--data", "data_root", default=None, help="As `cli.py eval --data` (default: CIFAR-10).")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads (default: the idle cores).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def worst_case(defense: str, control: str, n: int, offset: int, eps: float, iterations: int, base_iterations: int,
               eot: int, repeats: int, targets: int, base_queries: int, square_queries: int, surrogate_steps: int,
               lam: float, chunk: int, json_path: Path | None, stages_dir: Path | None, markdown_path: Path | None,
               seed: int, weights: Path | None, data_root: str | None, calibration: Path | None, threads: int | None,
               quiet: bool) -> None:
    """Does the repair help the classifier? The worst case per image over AutoAttack on the classifier alone, its
    transfer, APGD-CE/DLR through the repair (BPDA + EOT), the defense-aware attack and Square on the defense, each
    final image scored REPEATS times on the real repair; Wilson intervals, McNemar against the base and a verdict
    (docs/results.md)."""
    import torch

    from engine.data import DataError
    from engine.evaluate import EvalConfig, needs_calibration, tasks_needed
    from engine.repair_spec import parse_repair
    from engine.worst_case import WorstCaseConfig, markdown_table, run_worst_case

    names = [name for name in (defense, control) if name]
    for name, option in zip(names, ("--repair", "--control")):
        try:
            parse_repair(name)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint=option) from None
    from engine.attacks import pyautoattack

    try:
        pyautoattack()
    except ImportError as e:
        raise click.UsageError(str(e)) from None
    torch.set_num_threads(threads or default_threads())
    config = WorstCaseConfig(n=n, offset=offset, seed=seed, eps=eps, defenses=list(dict.fromkeys(names)),
                             iterations=iterations, base_iterations=base_iterations, targets=targets,
                             base_queries=base_queries,
                             square_queries=square_queries, eot=eot, repeats=repeats, surrogate_steps=surrogate_steps,
                             aware_lambda=lam, chunk=chunk)
    as_eval = EvalConfig(repairs=config.defenses, attacks=["none"])
    if needs_calibration(as_eval):
        from engine.calibration import calibration_path

        calibration = calibration_path(weights, calibration)
    pipeline = _load(weights=weights, tasks=tasks_needed(as_eval), objective="plain", calibration=calibration)
    try:
        result = run_worst_case(pipeline, config, json_path, data_root, progress=not quiet, cache_dir=stages_dir)
    except (ValueError, DataError) as e:
        raise click.UsageError(str(e)) from None
    table = markdown_table(result)
    click.echo(table)
    if markdown_path:
        markdown_path.write_text(table + "\n")


@main.command()
@click.option("--tasks", default=",".join(MODELS[1:]), show_default=True, help="Tasks to measure.")
@click.option("--n", type=click.IntRange(min=10, max=50000), default=2000, show_default=True,
              help="Clean training images (a seeded subset; CIFAR-10, or --data).")
@click.option("--views", type=click.IntRange(min=2), default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--weights", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output JSON (default: calibration.json beside the weights).")
@click.option("--data", "data_root", default=None,
              help="The model set's kind of images: a folder (class subfolders; train/ and val/ where it has them), "
                   "or cifar10 (the default: CIFAR-10 at $CIFAR10_ROOT).")
@click.option("--overwrite", is_flag=True, help="Replace an existing calibration file.")
def calibrate(tasks: str, n: int, views: int, seed: int, weights: Path | None, out_path: Path | None,
              data_root: str | None, overwrite: bool) -> None:
    """Measure each task's SSL loss on clean training images: the levels of --objective clean and the gate."""
    from engine.calibration import calibrate as measure, calibration_path, save_calibration
    from engine.data import DataError
    from engine.weights import WeightsError

    task_list = _parse_tasks(tasks)
    out_path = calibration_path(weights, out_path)
    if out_path.exists() and not overwrite:
        raise click.UsageError(f"{out_path} already exists; pass --overwrite to replace it, or choose another --out")
    pipeline = _load(weights=weights, tasks=task_list, views=views, objective="plain")   # before any calibration
    command = f"python cli.py calibrate --tasks {','.join(task_list)} --n {n} --views {views} --seed {seed}"
    try:
        stats = measure(pipeline, n, seed, data_root)
        save_calibration(stats, out_path, command, overwrite)
    except (DataError, WeightsError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    for t in task_list:
        click.echo(f"{t}: clean median {stats.level(t):.4g}, IQR {stats.scale(t):.4g}, q90 {stats.level(t, 0.9):.4g}")
    click.echo(f"wrote {out_path}")


@main.command("export")
@click.option("--weights", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Weights folder (default: the shipped weights/).")
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
    from export.onnx_export import ExportError, export_all

    task_list = _parse_tasks(tasks)
    pipeline = _load(weights=weights, tasks=task_list, views=views, objective=objective, level=level,
                     calibration=calibration)
    command = (f"python cli.py export --out {out_dir} --tasks {','.join(task_list)} --views {views} "
               f"--precision {precision} --objective {objective} --level {level}")
    try:
        manifest, notes = export_all(pipeline, out_dir, overwrite, command, precision)
    except ExportError as e:
        raise click.UsageError(str(e)) from None
    for note in notes:
        click.echo(note)
    click.echo(f"{len(manifest['graphs'])} graphs in {out_dir} (manifest: {out_dir / 'manifest.json'})")


@main.command()
@click.option("--n", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per full repair (the examples, repeated where N is larger).")
@click.option("--backends", default="torch,onnxruntime,tensorrt,torch-compile", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--weights", type=click.Path(file_okay=False, path_type=Path), default=None)
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
    from bench.throughput import BENCH_BACKENDS, EXIT, plot, run_bench
    from engine.weights import WeightsError
    from runtime.files import write_json

    _check_device(device)
    names = _names(backends, [*BENCH_BACKENDS, *(b + EXIT for b in BENCH_BACKENDS)], "--backends")
    task_list = _parse_tasks(tasks)
    alphas = _parse_alpha(alpha, task_list)
    batches = _parse_batches(graph_batches)
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
                                       if b["available"] else f"not available: {b['reason']}"))
    if json_path:
        write_json(json_path, result)
        click.echo(f"wrote {json_path}")
    if plot_path:
        plot(result, plot_path)


def _load(**kwargs):
    """load_pipeline, with every user-fixable failure turned into a usage error (exit 2)."""
    from engine.backends import BackendUnavailable
    from engine.weights import WeightsError
    from export.onnx_export import load_exported_pipeline

    try:
        return load_exported_pipeline(**kwargs)
    except (ValueError, WeightsError, BackendUnavailable) as e:
        raise click.UsageError(str(e)) from None


def _check_size(size: int) -> None:
    """A usage error before torch loads where --size is no multiple of 16 (engine.datasets.check_size's rule; the
    range 32–224 is the option's own)."""
    if size % 16:
        raise click.BadParameter(f"{size} is not a multiple of 16", param_hint="--size")


def _check_device(device: str | None) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError("--device cuda was asked for, but PyTorch sees no CUDA GPU here")


if __name__ == "__main__":
    sys.exit(main())
