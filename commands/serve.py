"""`serve`: the repair as an online service on Ray Serve (runtime/serve.py; docs/serving.md)."""
from __future__ import annotations

from pathlib import Path

import click

from runtime.cli import scheduler_option

from .common import check_device
from .repair import REPAIR_SETTING_NAMES, load_with_threads, pipeline_options, repair_settings, split_settings


# Settings of a served repair that a bundle fixes at its export (the rest apply with or without --bundle)
BUNDLE_FIXED = ("weights", "tasks", "classifier_file", "alpha", "views", "objective", "level", "calibration", "device",
                "backend", "onnx_dir", "precision")


@click.command()
@repair_settings
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
              help="How long a batch that is not full waits for more requests (static scheduler).")
@scheduler_option("static: a batch is gathered, then repaired to its slowest image; continuous: up to "
                  "--max-batch-size images in the loop, a finished one giving its place to a waiting one between two "
                  "steps (docs/serving.md).")
@click.option("--join-before-step", type=click.IntRange(min=1), default=None,
              help="--scheduler continuous: a waiting request joins the loop only while every image in it has run "
                   "fewer steps than this (default: whenever a place is free); docs/serving.md.")
@click.option("--max-queued", type=click.IntRange(min=0), default=None,
              help="Requests a replica holds beyond --max-batch-size (the batch it repairs counted in); more are "
                   "refused at once (503 with Retry-After). Default: --max-batch-size, so that an accepted request "
                   "waits for two batches when the one being repaired is full, three at most; each --max-batch-size "
                   "more adds a batch to the longest wait.")
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=60, show_default=True,
              help="A request not repaired within this time is answered 504.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=20, show_default=True,
              help="Larger request bodies are refused (413).")
@click.option("--max-pending-mb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Bodies a replica holds received and not yet decoded, over all its requests; an upload past it is "
                   "refused (503). Default: 4 × --max-body-mb.")
@click.option("--receive-timeout-s", type=click.FloatRange(min=0, min_open=True), default=30, show_default=True,
              help="A body not received within this time is answered 408 (a client that declares a body and "
                   "never sends it).")
@click.option("--large-decodes", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Images of over 4 MP decoded at once on a replica (as many more may wait; more are refused, "
                   "503); smaller ones decode in a lane of their own. Memory: docs/serving.md.")
@click.option("--keep-alive-s", type=click.IntRange(min=1), default=5, show_default=True,
              help="How long Serve's proxy keeps an idle client connection open.")
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
    except ValueError as e:                 # no Ray cluster at --ray-address
        raise click.UsageError(str(e)) from None
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
        from runtime.uploads import UploadLimits
    except ImportError as e:
        raise click.UsageError(f"serve needs Ray Serve, which is not installed ({e}): "
                               "pip install 'mssl-repair[serve]'") from None
    options = dict(ctx.params)
    # a batch of the service is a batch of the repair
    settings, engine = split_settings({name: options.pop(name) for name in REPAIR_SETTING_NAMES},
                                      options["max_batch_size"])
    engine["threads"] = engine["threads"] or max(1, int(options["replica_cpus"]))
    check_device(engine["device"])
    gpus = options["replica_gpus"] if options["replica_gpus"] is not None else int(engine["device"] == "cuda")
    queued = options["max_queued"] if options["max_queued"] is not None else options["max_batch_size"]
    body = int(options["max_body_mb"] * 2**20)
    pending = 4 * body if options["max_pending_mb"] is None else int(options["max_pending_mb"] * 2**20)
    try:
        uploads = UploadLimits(max_body_bytes=body, max_pending_bytes=pending,
                               receive_timeout_s=options["receive_timeout_s"], max_pixels=engine.pop("max_pixels"),
                               large_decodes=options["large_decodes"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-pending-mb") from None
    limits = dict(max_batch_size=options["max_batch_size"], batch_wait_ms=options["batch_wait_ms"], max_queued=queued,
                  scheduler=options["scheduler"], join_before_step=options["join_before_step"],
                  timeout_s=options["timeout_s"], uploads=uploads)
    make_repair, service_settings = (_bundle_service(ctx, options["bundle_dir"], settings, engine, limits)
                                     if options["bundle_dir"] else _torch_service(settings, engine, limits))
    where = service.Deployment(options["host"], options["port"], options["replicas"], options["replica_cpus"], gpus,
                               options["keep_alive_s"])
    return make_repair, service_settings, where


def _service_settings(service, size: int, resize: bool | None, default_resize: bool, classes: list[str],
                      config: dict, limits: dict):
    return service.ServiceSettings(size=size, resize=default_resize if resize is None else resize, classes=classes,
                                   repair=config, info={"versions": service.info_versions()}, **limits)


def _bundle_service(ctx: click.Context, bundle_dir: Path, settings, engine: dict, limits: dict):
    """(make_repair, ServiceSettings) of a bundle service; settings the bundle fixes are refused if given."""
    from runtime import serve as service
    from runtime.bundle import Bundle, BundleRepair

    given = [f"--{name.removesuffix('_file').replace('_', '-')}" for name in BUNDLE_FIXED
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if given:
        raise click.UsageError(f"{', '.join(given)}: fixed by the bundle's export (cli.py export); leave them out "
                               "with --bundle, or serve the weights without --bundle")
    make_repair = BundleRepair(str(bundle_dir), engine["threads"], settings)
    try:
        bundle = Bundle(bundle_dir, 1)
        config = make_repair.config(bundle)
    except ValueError as e:                 # BundleError too
        raise click.UsageError(str(e)) from None
    return make_repair, _service_settings(service, bundle.size, engine["resize"], bundle.resize, bundle.classes,
                                          config, limits)


def _torch_service(settings, engine: dict, limits: dict):
    """(make_repair, ServiceSettings) of a PyTorch service: the pipeline is loaded here once (usage errors answered
    before Ray starts), then by each replica."""
    import functools

    from engine.folder import BatchRepairFactory, report_config
    from export.onnx_export import load_exported_pipeline
    from runtime import serve as service

    load_options = pipeline_options(engine, settings, engine["threads"])
    pipeline = load_with_threads(load_options)
    make_repair = BatchRepairFactory(functools.partial(load_exported_pipeline, **load_options), settings,
                                     engine["threads"])
    return make_repair, _service_settings(service, pipeline.size, engine["resize"], pipeline.inputs["resize"],
                                          pipeline.class_names, report_config(pipeline, settings), limits)
