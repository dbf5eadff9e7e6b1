"""The measuring commands: `attack` (attacked test images), `eval` (accuracy of attack × repair), `worst-case`
(the worst case per image over strong attacks) and `calibrate` (the clean losses the repair aims at)."""
from __future__ import annotations

from pathlib import Path

import click

from runtime.cli import FRACTION, default_threads, fraction_text
from runtime.folder import PREVIEW_NOTE
from runtime.settings import DEFAULTS

from .common import (CALIBRATED_TASKS, DATA_OPTION, TASK_NAMES, THREADS_OPTION, check_device, option_group,
                     parse_alpha, parse_names, parse_tasks, ray_option_group, ray_settings, usage_errors,
                     weights_option)


@click.command()
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
@weights_option("Weights folder whose classifier is attacked (default: the shipped weights/).")
@DATA_OPTION
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace files of an earlier run.")
def attack(output_dir: Path, n: int, attack: str, eps: float, steps: int, step_size: float, lam: float, seed: int,
           clean_output: Path | None, tasks: str, weights: Path | None, data_root: str | None, device: str,
           overwrite: bool) -> None:
    """Write attacked test images (CIFAR-10, or --data) as lossless 8-bit PNG + labels.csv (the classifier of
    --weights)."""
    from engine.eval.attack_set import write_attack_set
    from engine.data.cifar10 import DataError
    from export.onnx_export import load_exported_pipeline

    check_device(device)
    # PGD reads the classifier alone: hedge is a task with no weights of its own, so any weights folder loads
    task_list = parse_tasks(tasks) if attack == "aware" else ["hedge"]
    with usage_errors():
        pipeline = load_exported_pipeline(weights=weights, device=device, tasks=task_list, objective="plain")
    try:
        summary = write_attack_set(pipeline, output_dir, n, attack, eps, steps, step_size, seed, clean_output,
                                   data_root, overwrite, lam)
    except (ValueError, DataError) as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {n} attacked images to {output_dir}; accuracy: clean {100 * summary['accuracy_clean']:.1f} %, "
               f"attacked {100 * summary['accuracy_attacked_float']:.1f} % in float, "
               f"{100 * summary['accuracy_attacked_png']:.1f} % as 8-bit PNG")


# How the evaluated repairs run (as `cli.py repair`'s --eps, --steps, --step-size, --views, --level): `eval` and
# `worst-case` take the same settings
EVALUATED_REPAIR_SETTINGS = [
    click.option("--eps-r", type=FRACTION, default=fraction_text(DEFAULTS.eps), show_default=True,
                 help="L∞ bound of the repair."),
    click.option("--repair-steps", type=click.IntRange(min=1), default=DEFAULTS.steps, show_default=True),
    click.option("--repair-step-size", type=FRACTION, default=fraction_text(DEFAULTS.step_size), show_default=True),
    click.option("--views", type=click.IntRange(min=2), default=4, show_default=True,
                 help="Augmented views per image of the contrastive losses."),
    click.option("--level", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
                 show_default=True, help=":clean repairs aim each task at this quantile of its clean-image losses."),
]


evaluated_repair_settings = option_group(EVALUATED_REPAIR_SETTINGS)


# What `eval` and `worst-case` are run with beyond their own choices: where the results go, the test subset's seed,
# the model set and the machine
MEASUREMENT_OPTIONS = [
    click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Write the results here (each chunk's outcomes are kept in --stages)."),
    click.option("--stages", "stages_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Keep each chunk's outcomes here (default: stages/ beside --json): a killed run resumes, and a "
                      "rerun recomputes only what its options change (more images, a new budget for one attack); "
                      "with --ray, the driver keeps them here for every worker."),
    click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Write the table here."),
    click.option("--seed", type=int, default=0, show_default=True,
                 help="The test subset's seed (and the attacks' random starts)."),
    click.option("--lam", type=FRACTION, default="1", show_default=True, help="λ of the defense-aware attack."),
    click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Clean-loss statistics for :clean and :gate (default: calibration.json beside the weights)."),
    weights_option(),
    DATA_OPTION,
    THREADS_OPTION,
    click.option("--quiet", is_flag=True, help="No progress bar."),
]


measurement_options = option_group(MEASUREMENT_OPTIONS)
# the chunks on Ray (engine/eval/on_ray.py)
on_ray_options = ray_option_group("Run each chunk as a Ray task (the ray extra): one worker per --worker-cpus of "
                                  "the cluster, the stages kept in --stages on this machine; the same table as "
                                  "without it.")


def ray_run(settings: dict | None, threads: int | None, **load: object):
    """The RayRun of --ray (None without it): each worker loads the model set as this process did (``load``:
    load_exported_pipeline's arguments)."""
    if settings is None:
        return None
    from functools import partial

    from engine.eval.on_ray import RayRun
    from export.onnx_export import load_exported_pipeline

    # a worker's own directory is not this one: it reads the files by their absolute paths
    load = {name: value.resolve() if isinstance(value, Path) else value for name, value in load.items()}
    return RayRun(partial(load_exported_pipeline, **load), threads=threads, **settings)


@click.command("eval")
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
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Bar chart (PNG) of the accuracies with their 95 % intervals.")
@evaluated_repair_settings
@click.option("--alpha", default="1,1,1", show_default=True,
              help="Task weights of the repairs, in the order contrastive,inpainting,rotation.")
@click.option("--gate-fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05,
              show_default=True, help=":gate repairs: fraction of clean calibration images the gate flags.")
@click.option("--gate-tasks", default="contrastive,inpainting,rotation", show_default=True,
              help="Tasks whose losses make the gate's score.")
@click.option("--defense", default="mtl", show_default=True,
              help="The repair (a --repairs name) that the aware and bpda-eot attacks aim at.")
@click.option("--attack-eps", type=FRACTION, default="8/255", show_default=True)
@click.option("--attack-step", type=FRACTION, default=None, help="Step of the PGD attacks (default: --attack-eps / 4).")
@click.option("--attack-steps", type=click.IntRange(min=1), default=20, show_default=True)
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
@measurement_options
@on_ray_options
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "tensorrt"]), default="auto",
              show_default=True,
              help="Engine for the forward-only passes (predictions); attacks and repairs run in PyTorch.")
@click.option("--onnx-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Precision of TensorRT engines.")
def evaluate(n: int, attacks: str, repairs: str, json_path: Path | None, stages_dir: Path | None,
             plot_path: Path | None, markdown_path: Path | None, seed: int, eps_r: float, repair_steps: int,
             repair_step_size: float, views: int, alpha: str, level: float, gate_fpr: float, gate_tasks: str,
             defense: str,
             calibration: Path | None, attack_eps: float, attack_step: float | None, attack_steps: int, lam: float,
             bpda_steps: int, eot: int,
             bpda_repair_steps: int, aa_iters: int, aa_targets: int, aa_eot: int, chunk: int, weights: Path | None,
             data_root: str | None, device: str,
             backend: str, onnx_dir: Path | None, precision: str, threads: int | None, quiet: bool,
             use_ray: bool, ray_address: str | None, worker_cpus: float, worker_gpus: float | None) -> None:
    """Accuracy of attack × repair on test images (CIFAR-10, or --data), with 95 % intervals and McNemar tests
    (Table 1)."""
    import torch

    from engine.data.cifar10 import DataError
    from engine.eval.evaluate import (ATTACKS, EvalConfig, markdown_table, needs_calibration, plot, run_eval,
                                      tasks_needed)
    from engine.eval.on_ray import ChunkFailures
    from engine.eval.repair_spec import parse_repair
    from export.onnx_export import load_exported_pipeline

    check_device(device)
    on_ray = ray_settings(use_ray, ray_address, worker_cpus, worker_gpus, device)
    torch.set_num_threads(threads or default_threads())
    repair_names = [r.strip() for r in repairs.split(",") if r.strip()]
    for name, option in [*((r, "--repairs") for r in repair_names), (defense, "--defense")]:
        try:
            parse_repair(name)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint=option) from None
    if not repair_names:
        raise click.BadParameter("no repair named", param_hint="--repairs")
    config = EvalConfig(n=n, seed=seed, attacks=parse_names(attacks, ATTACKS, "--attacks"),
                        repairs=list(dict.fromkeys(repair_names)), attack_eps=attack_eps,
                        attack_step=attack_eps / 4 if attack_step is None else attack_step,
                        attack_steps=attack_steps, eps_r=eps_r, repair_steps=repair_steps,
                        repair_step_size=repair_step_size, views=views,
                        alpha=list(parse_alpha(alpha, list(TASK_NAMES[:3])).values()),
                        level=level, gate_fpr=gate_fpr, gate_tasks=parse_tasks(gate_tasks, "--gate-tasks"),
                        defense=defense, aware_lambda=lam, bpda_steps=bpda_steps,
                        bpda_eot=eot, bpda_repair_steps=bpda_repair_steps, autoattack_iters=aa_iters,
                        autoattack_targets=aa_targets, autoattack_eot=aa_eot, chunk=chunk)
    if needs_calibration(config):
        from engine.calibration import calibration_path

        calibration = calibration_path(weights, calibration)
    # each repair row builds its own objective (engine/eval/repair_spec.py); the pipeline's is the plain sum
    load = dict(weights=weights, device=device, tasks=tasks_needed(config), views=views, backend=backend,
                objective="plain", onnx_dir=onnx_dir, precision=precision, calibration=calibration)
    with usage_errors():
        pipeline = load_exported_pipeline(**load)
    try:
        result = run_eval(pipeline, config, json_path, data_root, progress=not quiet, cache_dir=stages_dir,
                          ray=ray_run(on_ray, threads, **load))
    except (ValueError, DataError) as e:
        raise click.UsageError(str(e)) from None
    except ChunkFailures as e:
        raise click.ClickException(str(e)) from None
    table = markdown_table(result)
    click.echo(table)
    if result.get("preview"):
        click.echo(f"\n{PREVIEW_NOTE}")
    click.echo(f"\nseconds: {result['seconds']}")
    if markdown_path:
        markdown_path.write_text(table + "\n")
    if plot_path:
        plot(result, plot_path)


def parse_budget(text: str | None) -> tuple[int, int] | None:
    """``IxE`` (e.g. 200x8) as (iterations, eot)."""
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"{text!r} is not ITERATIONSxEOT with both above 0, e.g. 200x8",
                                 param_hint="--stronger")
    return int(parts[0]), int(parts[1])


@click.command("worst-case")
@click.option("--repair", "defense", default="mtl:clean:exit", show_default=True,
              help="The defense (an eval repair name); the default is `cli.py repair`'s default repair.")
@click.option("--control", default="noise", show_default=True,
              help="Evaluated beside it the same way: the repair's random start only ('' for none).")
@click.option("--n", type=click.IntRange(min=1, max=10000), default=1000, show_default=True,
              help="Test images (the eval's seeded subset: the same images as `cli.py eval --n`).")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True,
              help="Skip the subset's first K images (to extend a run over new images).")
@click.option("--adaptive-n", type=click.IntRange(min=1), default=None,
              help="Run the attacks on the defense (and the worst case) on the first M images only, AutoAttack on "
                   "the classifier and its transfer on all --n (a multiple of --chunk; default: all --n).")
@click.option("--survivors", is_flag=True,
              help="Each attack on the defense only on the images no earlier one broke on every scoring "
                   "(AutoAttack's own practice): the same worst case and per-repeat figures, at a fraction of the "
                   "cost where the transfer breaks most images; the attack rows become cumulative.")
@click.option("--eps", type=FRACTION, default="8/255", show_default=True, help="The attacker's L∞ budget.")
@click.option("--iterations", type=click.IntRange(min=1), default=100, show_default=True,
              help="The attacks on the defense: APGD iterations and the defense-aware PGD's steps.")
@click.option("--base-iterations", type=click.IntRange(min=1), default=100, show_default=True,
              help="AutoAttack on the classifier alone: APGD and FAB iterations (the standard version's 100).")
@click.option("--eot", type=click.IntRange(min=1), default=4, show_default=True,
              help="Repair samples averaged per APGD step through the defense.")
@click.option("--stronger", callback=lambda ctx, param, text: parse_budget(text), default=None, metavar="IxE",
              help="After every other attack, APGD-CE and APGD-DLR once more at I iterations and EOT E (e.g. "
                   "200x8; at least --iterations and --eot): does more budget lower the worst case? Add it to a "
                   "finished table's command: its chunks are read back, and with --survivors only the images still "
                   "standing are attacked.")
@click.option("--deployment", type=click.Choice(["fixed", "randomized"]), default="fixed", show_default=True,
              help="The defense attacked: fixed, the function `cli.py repair` and `serve` deploy (the repair at "
                   "--repair-seed: Square and every attack's final choice query it, each image scored once on it); "
                   "randomized, fresh draws on every query and --repeats scorings (a per-request seed).")
@click.option("--repair-seed", type=int, default=0, show_default=True,
              help="The seed the repair is deployed with (`cli.py repair --seed`).")
@click.option("--repeats", type=click.IntRange(min=1), default=None,
              help="--deployment randomized: scorings of each final image (seeds --repair-seed + 0, 7919, …; "
                   "default 3); robust = right every time. The fixed deployment is scored once.")
@click.option("--targets", type=click.IntRange(1, 9), default=9, show_default=True,
              help="Target classes of APGD-T and FAB-T (standard: 9).")
@click.option("--base-queries", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Square's queries on the classifier alone (AutoAttack's standard: 5000).")
@click.option("--square-queries", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Square's queries on the defense: each runs the real repair.")
@click.option("--surrogate-steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Repair steps in the forward of the BPDA attacks (the scored repair runs all its steps).")
@evaluated_repair_settings
@click.option("--chunk", type=click.IntRange(min=1), default=25, show_default=True,
              help="Images per chunk: the unit of the stages kept in --stages.")
@measurement_options
@on_ray_options
def worst_case(defense: str, control: str, n: int, offset: int, adaptive_n: int | None, survivors: bool, eps: float,
               iterations: int, base_iterations: int, eot: int, stronger: tuple[int, int] | None, deployment: str,
               repair_seed: int, repeats: int | None,
               targets: int, base_queries: int, square_queries: int, surrogate_steps: int, lam: float, eps_r: float,
               repair_steps: int, repair_step_size: float, views: int, level: float, chunk: int, json_path: Path | None,
               stages_dir: Path | None, markdown_path: Path | None, seed: int, weights: Path | None,
               data_root: str | None, calibration: Path | None, threads: int | None, quiet: bool, use_ray: bool,
               ray_address: str | None, worker_cpus: float, worker_gpus: float | None) -> None:
    """Does the repair help the classifier? The worst case per image over AutoAttack on the classifier alone, its
    transfer, APGD-CE/DLR through the repair (BPDA + EOT), the defense-aware attack and Square on the defense, each
    final image scored on the repair as deployed; Wilson intervals, McNemar against the base and a verdict
    (docs/results.md)."""
    import torch

    from engine.data.cifar10 import DataError
    from engine.eval.evaluate import EvalConfig, needs_calibration, tasks_needed
    from engine.eval.repair_spec import parse_repair
    from engine.eval.on_ray import ChunkFailures
    from engine.eval.worst_case import WorstCaseConfig, run_worst_case
    from engine.eval.worst_case_table import markdown_table
    from export.onnx_export import load_exported_pipeline

    if not defense.strip():
        raise click.BadParameter("name the repair to evaluate (e.g. mtl:clean:exit, the default)",
                                 param_hint="--repair")
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
    on_ray = ray_settings(use_ray, ray_address, worker_cpus, worker_gpus)
    torch.set_num_threads(threads or default_threads())
    try:
        config = WorstCaseConfig(n=n, offset=offset, adaptive_n=adaptive_n, survivors=survivors, seed=seed,
                                 eps=eps, defenses=list(dict.fromkeys(names)), iterations=iterations,
                                 base_iterations=base_iterations, targets=targets, base_queries=base_queries,
                                 square_queries=square_queries, eot=eot, stronger=stronger,
                                 deployment=deployment, repair_seed=repair_seed, repeats=repeats,
                                 surrogate_steps=surrogate_steps, aware_lambda=lam, eps_r=eps_r,
                                 repair_steps=repair_steps, repair_step_size=repair_step_size, views=views,
                                 level=level, chunk=chunk)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    as_eval = EvalConfig(repairs=config.defenses, attacks=["none"])
    if needs_calibration(as_eval):
        from engine.calibration import calibration_path

        calibration = calibration_path(weights, calibration)
    load = dict(weights=weights, tasks=tasks_needed(as_eval), views=views, objective="plain", calibration=calibration)
    with usage_errors():
        pipeline = load_exported_pipeline(**load)
    try:
        result = run_worst_case(pipeline, config, json_path, data_root, progress=not quiet, cache_dir=stages_dir,
                                ray=ray_run(on_ray, threads, **load))
    except (ValueError, DataError) as e:
        raise click.UsageError(str(e)) from None
    except ChunkFailures as e:
        raise click.ClickException(str(e)) from None
    table = markdown_table(result)
    click.echo(table)
    if markdown_path:
        markdown_path.write_text(table + "\n")


@click.command()
@click.option("--tasks", default=None,
              help="Tasks to measure, comma-separated (default: each of " + ", ".join(CALIBRATED_TASKS) +
                   " whose network the weights folder holds).")
@click.option("--n", type=click.IntRange(min=10, max=50000), default=2000, show_default=True,
              help="Clean training images (a seeded subset; CIFAR-10, or --data).")
@click.option("--views", type=click.IntRange(min=2), default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@weights_option()
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output JSON (default: calibration.json beside the weights).")
@DATA_OPTION
@click.option("--overwrite", is_flag=True, help="Replace an existing calibration file.")
def calibrate(tasks: str | None, n: int, views: int, seed: int, weights: Path | None, out_path: Path | None,
              data_root: str | None, overwrite: bool) -> None:
    """Measure each task's SSL loss on clean training images: the levels of --objective clean and the gate."""
    from engine.calibration import calibrate as measure, calibration_path, save_calibration
    from engine.data.cifar10 import DataError
    from engine.models.weights import DEFAULT_WEIGHTS, WeightsError
    from export.onnx_export import load_exported_pipeline

    def held_tasks(folder: Path | None) -> list[str]:
        folder = folder or DEFAULT_WEIGHTS
        held = [t for t in CALIBRATED_TASKS if (folder / f"{t}.json").exists()]
        if not held:
            raise click.UsageError(f"{folder} holds none of the networks calibration measures "
                                   f"({', '.join(CALIBRATED_TASKS)})")
        return held

    task_list = parse_tasks(tasks) if tasks else held_tasks(weights)
    out_path = calibration_path(weights, out_path)
    if out_path.exists() and not overwrite:
        raise click.UsageError(f"{out_path} already exists; pass --overwrite to replace it, or choose another --out")
    with usage_errors():               # before any calibration
        pipeline = load_exported_pipeline(weights=weights, tasks=task_list, views=views, objective="plain")
    command = f"python cli.py calibrate --tasks {','.join(task_list)} --n {n} --views {views} --seed {seed}"
    try:
        stats = measure(pipeline, n, seed, data_root)
        save_calibration(stats, out_path, command, overwrite=overwrite)
    except (DataError, WeightsError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    for t in task_list:
        click.echo(f"{t}: clean median {stats.level(t):.4g}, IQR {stats.scale(t):.4g}, q90 {stats.level(t, 0.9):.4g}")
    click.echo(f"wrote {out_path}")
