"""Two repairs of the same folder, compared: prediction agreement, accuracy of each against the labels, the exact
McNemar test between them, and how many pixels of the repaired PNGs differ.

    python -m bench.compare_reports OUT_A OUT_B [--labels DIR/labels.csv] [--json FILE]

OUT_A and OUT_B are ``--output`` folders of ``cli.py repair`` or ``python -m runtime repair`` (each with its
report.json) over the same inputs, e.g. the PyTorch reference and the onnxruntime engine, or a repair with and
without the early exit; ``labels.csv`` is what ``cli.py attack`` writes beside the attacked images. This is the
parity rule for whole repairs (docs/repair-graphs.md): predictions are the contract; pixels may differ where a
sign step flipped on a gradient within rounding of zero.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import click
import numpy as np
from PIL import Image

from engine.eval.evaluate import mcnemar_exact, wilson_interval
from runtime.imageio import read_image


def repaired_rows(out_dir: Path) -> dict[str, dict]:
    """file -> report row of the repaired images in ``out_dir``'s report."""
    report = json.loads((out_dir / "report.json").read_text())
    return {row["file"]: row for row in report["images"] if row["status"] == "repaired"}


def compare(out_a: Path, out_b: Path, labels: Path | None = None) -> dict:
    a, b = repaired_rows(out_a), repaired_rows(out_b)
    files = sorted(set(a) & set(b))
    if not files:
        raise click.UsageError(f"{out_a} and {out_b} have no repaired file in common")
    result = {"a": str(out_a), "b": str(out_b), "n": len(files), "only_one": len(set(a) ^ set(b)),
              "prediction_agreement": float(np.mean([a[f]["pred_after"] == b[f]["pred_after"] for f in files]))}
    # the written PNG's path: the input's, with .png (and renamed where two inputs would clash)
    read = lambda path: read_image(path, size=Image.open(path).size[0])[0]     # a repaired PNG is S×S
    differing = [np.mean(read(out_a / a[f]["output"]) != read(out_b / b[f]["output"])) for f in files]
    result["pixels_differing"] = {"mean": float(np.mean(differing)), "max": float(np.max(differing)),
                                  "images_identical": int(sum(d == 0 for d in differing))}
    if labels is not None:
        with labels.open() as fh:
            truth = {row["file"]: int(row["label"]) for row in csv.DictReader(fh)}
        files = [f for f in files if f in truth]
        if not files:
            raise click.UsageError(f"{labels} labels none of the repaired files")
        right_a = [a[f]["pred_after"] == truth[f] for f in files]
        right_b = [b[f]["pred_after"] == truth[f] for f in files]
        for name, right in (("a", right_a), ("b", right_b)):
            result[f"accuracy_{name}"] = sum(right) / len(files)
            result[f"ci95_{name}"] = list(wilson_interval(sum(right), len(files)))
        result["mcnemar"] = mcnemar_exact(right_a, right_b)
        result["n_labelled"] = len(files)
    return result


@click.command()
@click.argument("out_a", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_b", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="labels.csv of the inputs (cli.py attack writes one): adds accuracies and McNemar.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(out_a: Path, out_b: Path, labels: Path | None, json_path: Path | None) -> None:
    for folder in (out_a, out_b):
        if not (folder / "report.json").exists():
            raise click.UsageError(f"{folder} holds no report.json: pass the --output folder of a repair run")
    result = compare(out_a, out_b, labels)
    click.echo(json.dumps(result, indent=2))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
