"""What the commands share: the names they know before torch loads (so that a mistyped argument is answered
at once), the parsers of comma-separated options, and the usage errors of loading a pipeline."""
from __future__ import annotations

import contextlib
from pathlib import Path

import click

from runtime.cli import FRACTION

MODELS = ("classifier", "contrastive", "inpainting", "rotation", "contrastive-head", "inpainting-head",
          "rotation-head", "classifier-standard", "inpainting-patches")
PROFILES = ("cpu", "gpu", "folder-cpu", "quick")     # engine/train/profiles.py's PROFILES (tests check the two agree)
JOINT_MODELS = ("joint-robust", "joint-standard")     # engine/train/joint.py (kept here: --help imports no torch)
# engine.tasks.TASKS's names, kept here so that a mistyped argument is answered before torch loads (tests check
# the two agree)
TASK_NAMES = ("contrastive", "inpainting", "rotation", "contrastive-head", "inpainting-head", "rotation-head",
              "inpainting-patches", "consistency", "hedge")
CALIBRATED_TASKS = TASK_NAMES[:6]        # the tasks with networks of their own whose clean losses :clean and :gate read


def weights_option(help: str = "Weights folder (default: the shipped weights/)."):
    return click.option("--weights", type=click.Path(file_okay=False, path_type=Path), default=None, help=help)


DATA_OPTION = click.option(
    "--data", "data_root", default=None,
    help="The model set's kind of images: a folder (class subfolders; train/ and val/ where it has them), or cifar10 "
         "(the default: CIFAR-10 at $CIFAR10_ROOT).")


THREADS_OPTION = click.option("--threads", type=click.IntRange(min=1), default=None,
                              help="torch threads (default: the idle cores).")


def option_group(options: list):
    """A decorator that adds ``options`` (click.option decorators) to a command, in their listed order."""
    def add(command):
        for option in reversed(options):
            command = option(command)
        return command
    return add


def ray_option_group(ray_help: str, workers: bool = False):
    """--ray with where it runs (--ray-address) and what each worker takes (--worker-cpus, --worker-gpus; and with
    ``workers``, --workers: how many)."""
    return option_group([
        click.option("--ray", "use_ray", is_flag=True, help=ray_help),
        click.option("--ray-address", default=None,
                     help="--ray: the cluster to join (auto: the one running here, ray://HOST:10001: a remote one; "
                          "default: start a local one)."),
        *([click.option("--workers", type=click.IntRange(min=1), default=None,
                        help="--ray: actors in the pool (default: the cluster's CPUs / --worker-cpus).")]
          if workers else []),
        click.option("--worker-cpus", type=click.FloatRange(min=0, min_open=True), default=1, show_default=True,
                     help="--ray: CPUs per worker (also its torch threads, unless --threads)."),
        click.option("--worker-gpus", type=click.FloatRange(min=0), default=None,
                     help="--ray: GPUs per worker (default: 1 with --device cuda, else 0)."),
    ])


def ray_settings(use_ray: bool, address: str | None, worker_cpus: float, worker_gpus: float | None,
                 device: str = "cpu", workers: int | None = None) -> dict | None:
    """--ray's settings (None without it); a usage error where Ray is missing or a --ray option is given without
    --ray."""
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
    return dict(address=address, worker_cpus=worker_cpus, worker_gpus=gpus,
                **({"workers": workers} if workers is not None else {}))


def parse_tasks(text: str, option: str = "--tasks") -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if not tasks or unknown:
        raise click.BadParameter(f"unknown task(s) {', '.join(unknown) or '(none given)'}; "
                                 f"choose from {', '.join(TASK_NAMES)}", param_hint=option)
    if len(set(tasks)) != len(tasks):
        raise click.BadParameter(f"a task is named twice in {text!r}", param_hint=option)
    return tasks


def parse_alpha(text: str | None, tasks: list[str]) -> dict[str, float]:
    if text is None:
        return {t: 1.0 for t in tasks}
    values = [FRACTION.convert(v, None, None) for v in text.split(",")]
    if len(values) != len(tasks):
        raise click.BadParameter(f"{len(values)} weight(s) for {len(tasks)} task(s) ({', '.join(tasks)})",
                                 param_hint="--alpha")
    return dict(zip(tasks, values))


def parse_names(text: str, known, option: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in known]
    if not names or unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}",
                                 param_hint=option)
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def usage_errors():
    """Every user-fixable failure of loading a pipeline (``export.onnx_export.load_exported_pipeline``, which the
    commands call directly) as a usage error (exit 2)."""
    from engine.backends import BackendUnavailable
    from engine.models.weights import WeightsError

    try:
        yield
    except (ValueError, WeightsError, BackendUnavailable) as e:
        raise click.UsageError(str(e)) from None


def check_size(size: int) -> None:
    """A usage error before torch loads where --size is no multiple of 16 (engine.data.model_sets.check_size's rule; the
    range 32–224 is the option's own)."""
    if size % 16:
        raise click.BadParameter(f"{size} is not a multiple of 16", param_hint="--size")


def check_device(device: str | None) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError("--device cuda was asked for, but PyTorch sees no CUDA GPU here")
