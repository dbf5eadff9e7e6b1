"""``python -m runtime repair --bundle DIR --input DIR --output DIR``: the repair without PyTorch.

Same outputs, report and exit status as ``cli.py repair``: 0 when every input was repaired, 1 when some failed (see
the report; the rest are repaired), 2 on usage errors. The repair objective is the one the bundle was exported for.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .settings import FIELDS, RepairSettings, bounded


class Fraction(click.ParamType):
    """A float that may be written as a fraction, e.g. ``16/255``."""

    name = "number"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        text = str(value).strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                result = float(num) / float(den)
            else:
                result = float(text)
        except (ValueError, ZeroDivisionError):
            self.fail(f"{value!r} is not a number or a fraction like 16/255", param, ctx)
        if result < 0:
            self.fail(f"{value!r} must not be negative", param, ctx)
        return result


FRACTION = Fraction()


class Seed(click.ParamType):
    """The repair's seed: an integer (the same draws for the same image on every run), or ``random`` (None: fresh
    draws for every batch, runtime/draws.py's ``deployed_seed``)."""

    name = "integer|random"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        text = str(value).strip()
        if text == "random":
            return None
        try:
            seed = int(text)
        except ValueError:
            self.fail(f"{value!r} is not an integer or 'random'", param, ctx)
        if not -2 ** 63 <= seed < 2 ** 63:
            self.fail(f"{seed} does not fit in 64 bits", param, ctx)
        return seed


SEED = Seed()
SEED_HELP = ("The repair's draws: an integer seed makes it a deterministic function of the image (what `cli.py "
             "worst-case` attacks by default); 'random' draws a fresh seed for every batch, so that an image sent "
             "twice meets other draws (`cli.py worst-case --deployment randomized`).")


def max_pixels_option():
    """``--max-pixels``: the decode policy's limit (runtime/decode_policy.py), the same for every command that reads
    images."""
    from .decode_policy import MAX_PIXELS, check_max_pixels

    def checked(ctx, param, value: int) -> int:
        try:
            return check_max_pixels(value)
        except ValueError as e:
            raise click.BadParameter(str(e).removeprefix(f"--max-pixels {value}: ")) from None

    return click.option("--max-pixels", type=int, default=MAX_PIXELS, show_default=True, callback=checked,
                        help="An image whose header states more pixels is refused before it is decoded (an error "
                             "row; 413 from the service): a 48 KB PNG can claim 20000×20000. Formats read: PNG, "
                             "JPEG, BMP, WebP, TIFF, GIF (first frame).")


def fraction_text(value: float) -> str:
    """How a default shows in --help: 16/255 where the number is so many 255ths."""
    return f"{round(value * 255)}/255" if abs(value * 255 - round(value * 255)) < 1e-9 else repr(value)


def setting_option(name: str, *decls: str, **options):
    """The option of the repair setting ``name`` (runtime/settings.py), its default and range taken from there:
    ``decls`` default to ``--name-with-dashes``; ``options`` (help, …) are click's."""
    default = FIELDS[name].default
    if name == "early_exit":
        return click.option(*(decls or ("--early-exit/--no-early-exit",)), default=default, show_default=True,
                            **options)
    if name == "seed":
        kind, shown = SEED, str(default)
    else:
        low, high, open_ends = FIELDS[name].metadata["range"]
        if isinstance(default, int):
            kind, shown = click.IntRange(low, high, min_open=open_ends, max_open=open_ends), default
        elif default is None:       # an optional fraction of images: no default to show
            kind, shown = click.FloatRange(low, high, min_open=open_ends, max_open=open_ends), None
        else:                       # a bound or a step, written as a fraction (FRACTION refuses negatives)
            kind, shown = FRACTION, fraction_text(default)
    return click.option(*(decls or (f"--{name.replace('_', '-')}",)), name, type=kind, default=shown,
                        show_default=shown is not None, **options)


SCHEDULERS = ("static", "continuous")


def scheduler_option(help: str):
    """``--scheduler``: how images go through the repair loop (runtime/scheduler.py)."""
    return click.option("--scheduler", type=click.Choice(SCHEDULERS), default="static", show_default=True, help=help)


FOLDER_SCHEDULER_HELP = ("static: --batch-size images at a time, each batch run to its slowest image; continuous: "
                         "--batch-size images in the loop, an image that leaves it giving its place to the next "
                         "(the same PNGs; docs/serving.md).")


def checked_settings(allow_large_eps: bool = False, **values) -> RepairSettings:
    """The repair's settings from a command's options (RepairSettings' field names), the note of ``bounded``
    printed; a usage error where they cannot run."""
    try:
        settings = RepairSettings(**values)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        settings, note = bounded(settings, allow_large_eps)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--eps") from None
    if note:
        click.echo(note, err=True)
    return settings


def default_threads() -> int:
    """Intra-op threads for a repair when none are asked for: the cores not already busy (1-minute load average),
    at least 1. Measured on 2 cores (64 images, the default repair): quiet, 2 threads 1.85× faster than 1; beside one
    busy process, 1 thread 1.8× faster than 2 (docs/results.md, "Threads")."""
    cores = os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:                          # no load average on this platform
        busy = 0
    return max(1, min(cores, cores - busy))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Repair adversarially attacked images with an exported bundle (numpy + onnxruntime, no PyTorch)."""


@main.command()
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), required=True,
              help="Folder written by `python cli.py export` (graphs and manifest.json).")
@click.option("--input", "input_dir", type=click.Path(path_type=Path), required=True,
              help="Folder of images (searched recursively).")
@click.option("--output", "output_dir", type=click.Path(path_type=Path), required=True,
              help="Folder for the repaired PNGs and report.json/report.csv (outside --input).")
@setting_option("eps", help="L∞ bound of the repair.")
@setting_option("steps", help="Sign-gradient steps (0: random start only, the noise control).")
@setting_option("step_size")
@setting_option("seed", help=SEED_HELP)
@setting_option("batch_size")
@setting_option("gate_fpr", "--gate",
                help="Repair only inputs whose SSL losses exceed what this fraction of clean images exceeds "
                     "(e.g. 0.05); the rest are written unchanged. Needs a bundle exported with a calibration.")
@setting_option("early_exit",
                help="An image leaves the loop once its objective is zero (every task at its clean level): same "
                     "accuracy, a fraction of the steps (docs/repair-graphs.md). No effect on a plain objective.")
@scheduler_option(FOLDER_SCHEDULER_HELP)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="onnxruntime intra-op threads (default: the cores not busy by the load average).")
@click.option("--allow-large-eps", is_flag=True, help="Accept --eps above 64/255.")
@click.option("--resize/--no-resize", default=None,
              help="Centre-crop and scale images that are not S×S (S: the bundle's size) instead of reporting an "
                   "error. Default: as the model set was trained (on for a set trained on a folder of photos).")
@max_pixels_option()
@click.option("--overwrite", is_flag=True, help="Replace existing outputs and reports.")
@click.option("--resume", is_flag=True,
              help="Finish a stopped run into the same --output with the same options (report.jsonl).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def repair(bundle_dir: Path, input_dir: Path, output_dir: Path, scheduler: str, threads: int | None,
           allow_large_eps: bool, resize: bool | None, max_pixels: int, overwrite: bool, resume: bool, quiet: bool,
           **values) -> None:
    """Repair every image under INPUT into OUTPUT (same relative paths, lossless PNG) with a report."""
    from .bundle import Bundle, BundleRepair
    from .folder import check_folders, repair_folder, summary_lines

    settings = checked_settings(allow_large_eps, **values)
    try:
        check_folders(input_dir, output_dir, overwrite=overwrite, resume=resume)
        bundle = Bundle(bundle_dir, threads or default_threads())
        repair_with = BundleRepair(str(bundle_dir), threads, settings)
        config = repair_with.config(bundle)    # the config records what was asked
    except ValueError as e:                # BundleError too
        raise click.UsageError(str(e)) from None
    resize = bundle.resize if resize is None else resize
    try:
        if scheduler == "continuous":
            from .scheduler import SteppedRepair

            repair_fn = SteppedRepair(bundle, settings, settings.batch_size)
        else:
            repair_fn = repair_with.on(bundle)
        report = repair_folder(repair_fn, input_dir, output_dir, config, settings.batch_size,
                               resize=resize, overwrite=overwrite, progress=not quiet, resume=resume,
                               max_pixels=max_pixels, class_folders=bundle.manifest.get("class_folders"))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    for line, to_stderr in summary_lines(report, output_dir):
        click.echo(line, err=to_stderr)
    sys.exit(1 if report["summary"]["n_error"] else 0)
