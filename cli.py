"""mssl-repair command line: thin wrappers that parse, check and call engine/.

Exit status: 0 on full success, 1 when some inputs failed (the rest done), 2 on usage errors.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

MODELS = ("classifier", "contrastive", "inpainting", "rotation")


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Repair adversarially attacked images with multiple self-supervised tasks (Lawhon & Ducrest)."""


@main.command()
@click.argument("model", type=click.Choice(MODELS))
@click.option("--profile", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Recipe size: cpu fits a 2-core machine, gpu is the larger variant for a CUDA GPU.")
@click.option("--data", "data_root", type=click.Path(file_okay=False), default=None,
              help="CIFAR-10 folder (default: $CIFAR10_ROOT).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="weights", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the profile's epoch count.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when available.")
@click.option("--overwrite", is_flag=True, help="Replace existing weights of the same name in --out.")
def train(model: str, profile: str, data_root: str | None, out_dir: str, seed: int, epochs: int | None,
          device: str | None, overwrite: bool) -> None:
    """Train MODEL and write OUT/MODEL.safetensors + OUT/MODEL.json (with test-set metrics)."""
    from engine.data import DataError
    from engine.train import train_model
    from engine.weights import WeightsError

    _check_device(device)
    try:
        path = train_model(model, profile, data_root, out_dir, seed, device, overwrite, epochs)
    except (DataError, WeightsError) as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {path}")


def _parse_tasks(text: str) -> list[str]:
    from engine.tasks import TASKS

    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise click.BadParameter(f"unknown task(s) {', '.join(unknown) or '(none given)'}; "
                                 f"choose from {', '.join(TASKS)}", param_hint="--tasks")
    if len(set(tasks)) != len(tasks):
        raise click.BadParameter(f"a task is named twice in {text!r}", param_hint="--tasks")
    return tasks


def _parse_alpha(text: str | None, tasks: list[str]) -> dict[str, float]:
    if text is None:
        return {t: 1.0 for t in tasks}
    values = [FRACTION.convert(v, None, None) for v in text.split(",")]
    if len(values) != len(tasks):
        raise click.BadParameter(f"{len(values)} weight(s) for {len(tasks)} task(s) ({', '.join(tasks)})",
                                 param_hint="--alpha")
    return dict(zip(tasks, values))


@main.command()
@click.option("--input", "input_dir", type=click.Path(path_type=Path), required=True,
              help="Folder of images (searched recursively).")
@click.option("--output", "output_dir", type=click.Path(path_type=Path), required=True,
              help="Folder for the repaired PNGs and report.json/report.csv (outside --input).")
@click.option("--weights", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Weights folder (default: the shipped weights/).")
@click.option("--tasks", default="contrastive,inpainting,rotation", show_default=True,
              help="SSL tasks of the repair loss, comma-separated.")
@click.option("--alpha", default=None, help="Weight per task, comma-separated, in --tasks order (default: all 1).")
@click.option("--eps", type=FRACTION, default="16/255", show_default=True, help="L∞ bound of the repair.")
@click.option("--steps", type=click.IntRange(min=0), default=40, show_default=True,
              help="PGD steps (0: random start only, the noise control).")
@click.option("--step-size", type=FRACTION, default="2/255", show_default=True)
@click.option("--views", type=click.IntRange(min=2), default=4, show_default=True,
              help="Augmented views per image for the contrastive loss.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "torch"]), default="auto", show_default=True,
              help="Engine for the forward passes (auto: the fastest present).")
@click.option("--resize", is_flag=True, help="Scale images that are not 32×32 instead of reporting an error.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs and reports.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def repair(input_dir: Path, output_dir: Path, weights: Path | None, tasks: str, alpha: str | None, eps: float,
           steps: int, step_size: float, views: int, seed: int, batch_size: int, device: str, backend: str,
           resize: bool, overwrite: bool, quiet: bool) -> None:
    """Repair every image under INPUT into OUTPUT (same relative paths, lossless PNG) with a report.

    Exit status: 0 when every input was repaired, 1 when some failed (see the report), 2 on usage errors.
    """
    from engine.folder import RepairConfig, check_folders, repair_folder
    from engine.pipeline import load_pipeline
    from engine.weights import WeightsError

    _check_device(device)
    task_list = _parse_tasks(tasks)
    alphas = _parse_alpha(alpha, task_list)
    try:
        check_folders(input_dir, output_dir, overwrite)
        pipeline = load_pipeline(weights, device, task_list, alphas, views)
    except (ValueError, WeightsError) as e:
        raise click.UsageError(str(e)) from None
    config = RepairConfig(eps=eps, steps=steps, step_size=step_size, seed=seed, batch_size=batch_size,
                          backend="torch")
    try:
        report = repair_folder(pipeline, input_dir, output_dir, config, resize, overwrite, progress=not quiet)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    summary = report["summary"]
    click.echo(f"repaired {summary['n_repaired']} of {summary['n_inputs']} file(s) in {summary['seconds']:.1f} s "
               f"({summary['images_per_s'] or 0:.2f} images/s); report: {output_dir / 'report.json'}")
    for row in report["images"]:
        if row["status"] == "error":
            click.echo(f"  error: {row['file']}: {row['error']}", err=True)
    changed = sum(r.get("pred_before") != r.get("pred_after") for r in report["images"] if r["status"] == "repaired")
    click.echo(f"prediction changed for {changed} image(s)")
    sys.exit(1 if summary["n_error"] else 0)


def _check_device(device: str | None) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError("--device cuda was asked for, but PyTorch sees no CUDA GPU here")


if __name__ == "__main__":
    sys.exit(main())
