"""Repair a folder of images: ``OUTPUT/<same relative path>.png`` per readable input, plus ``report.json`` and
``report.csv`` listing every input with its status (DESIGN.md, "Contracts" and principle 7)."""
from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .data import CLASSES
from .imageio import ImageRecord, quantize, read_folder, write_png
from .pipeline import Pipeline
from .repair import image_generators
from .weights import write_csv, write_json

REPORT_FILES = ("report.json", "report.csv")
CSV_COLUMNS = ("file", "status", "error", "notes", "output", "true_label", "pred_before", "pred_after",
               "label_before", "label_after", "ssl_loss_before", "ssl_loss_after", "linf", "gate_score", "gated_out")


@dataclass
class RepairConfig:
    eps: float = 16 / 255
    steps: int = 40
    step_size: float = 2 / 255
    seed: int = 0
    batch_size: int = 64


def check_folders(input_dir: Path, output_dir: Path, overwrite: bool) -> None:
    """ValueError with a clear message where the folders cannot be used as given."""
    if not input_dir.exists():
        raise ValueError(f"input folder {input_dir} does not exist")
    if not input_dir.is_dir():
        raise ValueError(f"input {input_dir} is not a folder")
    src, dst = input_dir.resolve(), output_dir.resolve()
    if dst == src or src in dst.parents:
        raise ValueError(f"output {output_dir} is inside the input folder {input_dir}: choose a folder outside it")
    if dst in src.parents:
        raise ValueError(f"input {input_dir} is inside the output folder {output_dir}: choose a folder outside it")
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output {output_dir} exists and is not a folder")
    existing = [name for name in REPORT_FILES if (output_dir / name).exists()]
    if existing and not overwrite:
        raise ValueError(f"{output_dir} already holds {', '.join(existing)} from an earlier run: "
                         "choose another --output, or pass --overwrite")


def assign_outputs(records: list[ImageRecord], output_dir: Path, overwrite: bool) -> dict[str, Path]:
    """Output path per readable input; a name taken twice or an existing file (without ``overwrite``) is an error."""
    outputs, taken = {}, {}
    for rec in records:
        if rec.error or rec.skipped:
            continue
        out_rel = Path(rec.rel).with_suffix(".png").as_posix()
        if out_rel in taken:
            rec.error = f"output {out_rel} is already written for {taken[out_rel]}; rename one of them"
        elif (output_dir / out_rel).exists() and not overwrite:
            rec.error = f"output {out_rel} already exists (pass --overwrite to replace it)"
        else:
            taken[out_rel] = rec.rel
            outputs[rec.rel] = output_dir / out_rel
    return outputs


def repair_folder(pipeline: Pipeline, input_dir: Path, output_dir: Path, config: RepairConfig,
                  resize: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Repair every readable image under ``input_dir``; returns the report (also written to ``output_dir``)."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_folders(input_dir, output_dir, overwrite)
    records = read_folder(input_dir, resize)
    if not records:
        raise ValueError(f"no files under {input_dir} (looked recursively for images)")
    start = time.time()
    outputs = assign_outputs(records, output_dir, overwrite)
    rows = {rec.rel: {"file": rec.rel, "status": "skipped" if rec.skipped else "error", "error": rec.error,
                      "notes": rec.notes} for rec in records}
    labels = read_labels(input_dir / "labels.csv")
    for rel, row in rows.items():
        if rel in labels:
            row["true_label"] = labels[rel]
    todo = [rec for rec in records if rec.rel in outputs]
    with tqdm(total=len(todo), unit="img", desc="repair", disable=not progress) as bar:
        for i in range(0, len(todo), config.batch_size):
            batch = todo[i:i + config.batch_size]
            for rec, row in zip(batch, repair_batch(pipeline, torch.stack([r.image for r in batch]), config)):
                write_png(outputs[rec.rel], row.pop("image"))
                rows[rec.rel].update(row, status="repaired", output=outputs[rec.rel].relative_to(output_dir).as_posix())
            bar.update(len(batch))
    seconds = time.time() - start
    images = [rows[rec.rel] for rec in records]
    n_repaired = sum(r["status"] == "repaired" for r in images)
    n_error = sum(r["status"] == "error" for r in images)
    report = {
        "config": {**asdict(config), "backend": pipeline.backend.name, "tasks": pipeline.tasks,
                   "alpha": [pipeline.objective.alpha[t] for t in pipeline.tasks], "device": str(pipeline.device),
                   "objective": "plain" if pipeline.objective.levels is None else "clean",
                   "levels": pipeline.objective.levels,
                   "gate": None if pipeline.gate is None else {"fpr": pipeline.gate.fpr, "tasks": pipeline.gate.tasks,
                                                               "threshold": pipeline.gate.threshold},
                   "weights": {name: m["sha256"] for name, m in pipeline.manifests.items()}},
        "images": images,
        "summary": {"n_inputs": len(images), "n_repaired": n_repaired, "n_error": n_error,
                    "n_skipped": len(images) - n_repaired - n_error, "seconds": round(seconds, 3),
                    "images_per_s": round(n_repaired / seconds, 3) if seconds else None, **accuracy(images),
                    **({} if pipeline.gate is None else {"n_gated_out": sum(r.get("gated_out", False)
                                                                            for r in images)})},
    }
    write_report(report, output_dir)
    return report


@torch.no_grad()
def repair_batch(pipeline: Pipeline, x: torch.Tensor, config: RepairConfig) -> list[dict]:
    """Repair one batch; per image: the 8-bit repaired image and the report fields. Losses before and after use the
    same augmentation parameters (drawn from the input's generators), so the two are comparable."""
    x = x.to(pipeline.device)
    objective = pipeline.objective
    params = objective.sample_params(image_generators(x, config.seed), x)
    before = pipeline.backend.task_losses(x, params)
    with torch.enable_grad():
        result = pipeline.repair_with_trace(x, config.eps, config.steps, config.step_size, config.seed,
                                            losses=before)
    repaired = quantize(result.images)
    after = pipeline.backend.task_losses(repaired, params)
    pred_before, pred_after = pipeline.predict(x).tolist(), pipeline.predict(repaired).tolist()
    linf = (repaired - x).abs().amax((1, 2, 3)).tolist()
    total_before, total_after = objective.combine(before).tolist(), objective.combine(after).tolist()
    gate = {} if result.score is None else {"gate_score": [round(v, 6) for v in result.score.tolist()],
                                             "gated_out": (~result.repaired).tolist()}

    return [{
        "image": repaired[i],
        "pred_before": pred_before[i], "pred_after": pred_after[i],
        "label_before": CLASSES[pred_before[i]], "label_after": CLASSES[pred_after[i]],
        "ssl_loss_before": round(total_before[i], 6), "ssl_loss_after": round(total_after[i], 6),
        "task_losses_before": {t: round(v[i].item(), 6) for t, v in before.items()},
        "task_losses_after": {t: round(v[i].item(), 6) for t, v in after.items()},
        "linf": round(linf[i], 6),
        **{k: v[i] for k, v in gate.items()},
    } for i in range(len(x))]


def read_labels(path: Path) -> dict[str, int]:
    """file -> true class from a labels.csv (columns ``file`` and ``label``, as `cli.py attack` writes); {} if
    there is none or it cannot be read (labels are optional: they only add accuracy to the report)."""
    if not path.exists():
        return {}
    try:
        with open(path, newline="") as f:
            return {row["file"]: int(row["label"]) for row in csv.DictReader(f)}
    except (KeyError, ValueError, csv.Error):
        return {}


def accuracy(images: list[dict]) -> dict:
    labelled = [r for r in images if r["status"] == "repaired" and "true_label" in r]
    if not labelled:
        return {}
    n = len(labelled)
    return {"n_labelled": n,
            "accuracy_before": round(sum(r["pred_before"] == r["true_label"] for r in labelled) / n, 4),
            "accuracy_after": round(sum(r["pred_after"] == r["true_label"] for r in labelled) / n, 4)}


def write_report(report: dict, output_dir: Path) -> None:
    write_json(output_dir / "report.json", report)
    rows = [{**{c: row.get(c) for c in CSV_COLUMNS}, "notes": "; ".join(row.get("notes", []))}
            for row in report["images"]]
    write_csv(output_dir / "report.csv", rows, CSV_COLUMNS)
