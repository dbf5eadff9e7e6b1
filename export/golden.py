"""Reference outputs of the shipped weights for parity tests: ``tests/golden/golden.safetensors`` + ``golden.json``.

    python -m export.golden [--weights weights] [--out tests/golden] [--overwrite]

Inputs: the first 16 example images and the SSL parameters the repair would draw for them (seed 0). Outputs: the
PyTorch reference's logits, each task's loss and the multi-task loss. Regenerate only on purpose (new shipped
weights): every engine is compared with these files.
"""
from __future__ import annotations

import time
from pathlib import Path

import click
import torch
from safetensors.torch import save_file

from engine.imageio import read_image
from engine.pipeline import load_pipeline
from runtime.files import atomic_write, write_json

ROOT = Path(__file__).resolve().parent.parent
N_IMAGES = 16


def golden_inputs(pipeline) -> dict[str, torch.Tensor]:
    paths = sorted((ROOT / "examples" / "clean").glob("*.png"))[:N_IMAGES]
    x = torch.stack([read_image(p)[0] for p in paths])
    params = pipeline.objective.sample_params(x, 0)
    return {"x": x, **{f"{task}.{key}": value for task, p in params.items() for key, value in p.items()}}


def split_params(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    params: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if "." in name and not name.startswith("out."):
            task, key = name.split(".", 1)
            params.setdefault(task, {})[key] = value
    return params


@torch.no_grad()
def reference_outputs(pipeline, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    x, params = inputs["x"], split_params(inputs)
    for task in pipeline.objective.tasks:
        params.setdefault(task, {})            # rotation has no parameters
    losses = pipeline.objective.per_task(x, params)
    return {"out.logits": pipeline.classifier(x), **{f"out.{t}_loss": v for t, v in losses.items()},
            "out.multitask_loss": pipeline.objective(x, params)}


@click.command()
@click.option("--weights", type=click.Path(file_okay=False), default=None)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=ROOT / "tests" / "golden")
@click.option("--overwrite", is_flag=True, help="Replace existing golden files (only for new shipped weights).")
def main(weights: str | None, out: Path, overwrite: bool) -> None:
    if (out / "golden.safetensors").exists() and not overwrite:
        raise click.UsageError(f"{out}/golden.safetensors exists; regenerate only on purpose, with --overwrite")
    pipeline = load_pipeline(weights, objective="plain")
    inputs = golden_inputs(pipeline)
    tensors = {**inputs, **reference_outputs(pipeline, inputs)}
    atomic_write(out / "golden.safetensors",
                 lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))
    write_json(out / "golden.json", {
        "command": "python -m export.golden" + (" --overwrite" if overwrite else ""), "torch": torch.__version__,
        "weights": {k: m["sha256"] for k, m in pipeline.manifests.items()}, "n_images": N_IMAGES,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    click.echo(f"wrote {len(tensors)} tensors to {out}")


if __name__ == "__main__":
    main()
