"""`train` (one model) and `train-set` (a whole model set on a folder of images)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from runtime.cli import default_threads

from .common import JOINT_MODELS, MODELS, PROFILES, TASK_NAMES, check_device, check_size, usage_errors


@click.command()
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
    from engine.data.cifar10 import DataError
    from engine.models.weights import WeightsError

    check_device(device)
    check_size(size)
    command = f"python cli.py train {model} --profile {profile} --out {out_dir} --seed {seed}"
    command += f" --epochs {epochs}" if epochs else ""
    command += f" --data {data_root} --size {size}" if data_root else ""
    try:
        if model in JOINT_MODELS:
            from engine.train.joint import train_joint

            path = train_joint(model, profile, data_root, out_dir, base_dir, seed, device, overwrite, epochs,
                               f"{command} --base {base_dir}")
        else:
            from engine.train.trainer import train_model

            path = train_model(model, profile, data_root, out_dir, seed, device, overwrite, epochs, command, size,
                               resume)
    except (DataError, WeightsError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {path}")


SET_MODELS = ("classifier", "contrastive", "rotation", "inpainting")


@click.command("train-set")
@click.option("--data", "data_root", required=True,
              help="A folder of images (class subfolders give the classifier's labels; train/ and val/ subfolders "
                   "give the splits, else a tenth is held out).")
@click.option("--size", type=click.IntRange(32, 224), default=64, show_default=True,
              help="Working size S (a multiple of 16): images are centre-cropped and resized to S×S.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The model set's folder, e.g. weights/NAME.")
@click.option("--profile", type=click.Choice(PROFILES), default="folder-cpu", show_default=True,
              help="folder-cpu: the recipe for ~10,000 photos (hours on 2 cores); quick: a first try, two thirds "
                   "of its epochs (minutes for a few thousand photos), its models labelled a preview.")
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
    export (OUT/onnx). The data is checked and the plan printed (each stage sized from the data, its time estimated)
    before the first model trains. Every model checkpoints each epoch and records the data it was trained on;
    --resume continues a stopped run of the same data and settings."""
    import torch

    from engine.calibration import calibrate as measure, save_calibration
    from engine.data.cifar10 import DataError
    from engine.models.provenance import resume_conflicts, trained_on
    from engine.train.loop import log
    from engine.train.profiles import PROFILES as RECIPES
    from engine.train.trainer import train_model
    from engine.train.plan import SetProgress, plan_set, summary_lines
    from engine.models.weights import WeightsError, read_manifest
    from export.onnx_export import ExportError, export_all, load_exported_pipeline

    check_device(device)
    check_size(size)
    if resume and overwrite:
        raise click.UsageError("--resume continues a run, --overwrite starts it again: pass one of them")
    models = [*SET_MODELS[:1], *(["classifier-standard"] if standard else []), *SET_MODELS[1:]]
    without = [m for m in models if m not in RECIPES[profile]]
    if without:                             # said before hours of training, not after
        raise click.UsageError(f"profile {profile!r} has no recipe for {', '.join(without)}: choose a profile that "
                               f"has ({', '.join(p for p in RECIPES if all(m in RECIPES[p] for m in models))})")
    existing = [m for m in models if (out_dir / f"{m}.json").exists()] + \
        [p.name for p in (out_dir / "calibration.json", out_dir / ".checkpoints") if p.exists()]
    if existing and not (resume or overwrite):
        raise click.UsageError(f"{out_dir} already holds {', '.join(existing)}: pass --resume to continue that run, "
                               "--overwrite to start again, or choose another --out")
    torch.set_num_threads(threads or default_threads())
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = f"python cli.py train-set --data {data_root} --size {size} --out {out_dir} --profile {profile} --seed {seed}"
    try:
        current = trained_on(data_root, size, seed, profile)
        conflicts = resume_conflicts(out_dir, models, current) if resume else {}
        if conflicts:                       # before any training: a resumed set never mixes runs
            listed = "; ".join(f"{m}: {', '.join(found)}" for m, found in conflicts.items())
            raise click.UsageError(f"--resume would keep models of another run in {out_dir} ({listed}): pass "
                                   "--overwrite to train the set again on this data, or choose another --out")
        kept = {m for m in models if resume and (out_dir / f"{m}.json").exists()}
        plan = plan_set(models, profile, data_root, size, calibration_n, dev, kept)
        for line in plan.lines():
            click.echo(line)
        progress = SetProgress(plan)
        for stage, model in zip(plan.stages, models):
            if model not in kept:
                train_model(model, profile, data_root, str(out_dir), seed, device, overwrite, None,
                            f"{base} (step {model})", size, resume,
                            on_step=lambda s=stage: progress.step(s.step_seconds))
            progress.finished(stage)
        calibration = out_dir / "calibration.json"
        with usage_errors():
            pipeline = load_exported_pipeline(weights=out_dir, tasks=list(TASK_NAMES[:3]), objective="plain")
        if not (resume and calibration_holds(calibration, pipeline.manifests, plan.calibration_n)):
            log(f"calibration on {plan.calibration_n} clean training images")
            stats = measure(pipeline, plan.calibration_n, seed, data_root)
            save_calibration(stats, calibration, f"{base} --calibration-n {calibration_n} (step calibration)",
                             overwrite=True)
        progress.finished(plan.stages[-2])
        log(f"ONNX export to {out_dir / 'onnx'}")
        with usage_errors():
            pipeline = load_exported_pipeline(weights=out_dir, objective=objective)
        manifest, notes = export_all(pipeline, out_dir / "onnx", overwrite=overwrite,
                                     command=f"{base} --objective {objective} (step export)")
        progress.close()
        manifests = {m: read_manifest(m, out_dir) for m in models}
    except (DataError, WeightsError, ExportError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    for note in notes:
        click.echo(note)
    preview = " (a preview: --profile quick)" if current["preview"] else ""
    click.echo(f"model set in {out_dir}{preview}: {', '.join(models)}, calibration.json, onnx/ "
               f"({len(manifest['graphs'])} graphs)")
    for line in summary_lines(out_dir, manifests, json.loads(calibration.read_text()), data_root):
        click.echo(line)


def calibration_holds(path: Path, manifests: dict[str, dict], n: int) -> bool:
    """Whether the calibration at ``path`` was measured on these very networks, on ``n`` images."""
    if not path.exists():
        return False
    recorded = json.loads(path.read_text())
    return (all(recorded["sources"].get(t) == m["sha256"] for t, m in manifests.items() if t != "classifier")
            and all(len(v) == n for v in recorded["losses"].values()))
