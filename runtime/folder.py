"""Repair a folder of images: ``OUTPUT/<same relative path>.png`` per readable input, plus ``report.json`` and
``report.csv`` listing every input with its status (docs/usage.md; docs/design.md, principle 7).

One contract for every engine: ``repair_folder`` takes the engine's batch repair as a callable, so the PyTorch
reference (engine/folder.py) and the runtime without PyTorch (runtime/bundle.py) read, refuse, write and report alike.
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from .files import write_csv, write_json
from .imageio import (IMAGE_EXTENSIONS, MAX_PIXELS, SIZE, ImageRecord, encode_png, input_root, read_folder,
                      write_png)
from .journal import JOURNAL, Journal, done_rows

REPORT_FILES = ("report.json", "report.csv")
PREVIEW_NOTE = ("the model set is a preview (train-set --profile quick): two thirds of the full recipe's epochs, "
                "the PGD-20 measurement on 500 test images")
CSV_COLUMNS = ("file", "status", "error", "notes", "output", "true_label", "pred_before", "pred_after",
               "label_before", "label_after", "ssl_loss_before", "ssl_loss_after", "linf", "gate_score", "gated_out")
# images N×3×S×S float32 -> per image: "image" (the 8-bit repaired image, 3×S×S) and its report fields
BatchRepair = Callable[[np.ndarray], list[dict]]


def check_folders(input_dir: Path, output_dir: Path, *, overwrite: bool = False, resume: bool = False) -> None:
    """ValueError with a clear message where the input (a folder, or one image file) and the output folder
    cannot be used as given."""
    if not input_dir.exists():
        raise ValueError(f"input {input_dir} does not exist")
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output {output_dir} exists and is not a folder")
    if not input_dir.is_dir():
        if not input_dir.is_file():
            raise ValueError(f"input {input_dir} is neither a folder nor a file")
        if (output_dir.resolve() / input_dir.with_suffix(".png").name) == input_dir.resolve():
            raise ValueError(f"the repaired image would replace the input {input_dir}: choose another --output")
        check_reports(output_dir, overwrite=overwrite, resume=resume)
        return
    src, dst = input_dir.resolve(), output_dir.resolve()
    if dst == src or src in dst.parents:
        raise ValueError(f"output {output_dir} is inside the input folder {input_dir}: choose a folder outside it")
    if dst in src.parents:
        raise ValueError(f"input {input_dir} is inside the output folder {output_dir}: choose a folder outside it")
    check_reports(output_dir, overwrite=overwrite, resume=resume)


def check_reports(output_dir: Path, *, overwrite: bool, resume: bool) -> None:
    if resume and overwrite:
        raise ValueError("--resume finishes an earlier run, --overwrite starts it again: pass one of them")
    if resume or overwrite:
        return
    if (output_dir / JOURNAL).exists() and not (output_dir / "report.json").exists():
        raise ValueError(f"{output_dir} holds an unfinished run ({JOURNAL}): pass --resume to finish it, "
                         "--overwrite to start again, or choose another --output")
    existing = [name for name in REPORT_FILES if (output_dir / name).exists()]
    if existing:
        raise ValueError(f"{output_dir} already holds {', '.join(existing)} from an earlier run: "
                         "choose another --output, pass --overwrite, or --resume to finish it")


def assign_outputs(records: list[ImageRecord], output_dir: Path, *, overwrite: bool,
                   done: dict[str, dict] | None = None) -> dict[str, Path]:
    """Output path per readable input; a name taken twice or an existing file (without ``overwrite``, and not
    the output of a ``done`` row) is an error."""
    outputs, taken = {}, {}
    for rec in records:
        if rec.error or rec.skipped:
            continue
        out_rel = Path(rec.rel).with_suffix(".png").as_posix()
        if out_rel in taken:
            rec.error = f"output {out_rel} is already written for {taken[out_rel]}; rename one of them"
        elif (output_dir / out_rel).exists() and not overwrite and rec.rel not in (done or {}):
            rec.error = f"output {out_rel} already exists (pass --overwrite to replace it)"
        else:
            taken[out_rel] = rec.rel
            outputs[rec.rel] = output_dir / out_rel
    return outputs


@dataclass
class FolderPlan:
    """What a folder repair will do before it repairs anything: every input's report row (errors and skips filled
    in), the output path of each readable one, and those still to repair (in order)."""
    records: list[ImageRecord]
    outputs: dict[str, Path]
    rows: dict[str, dict]
    todo: list[ImageRecord]
    journal: Journal
    labels_from: str | None = None         # where the true labels came from: "labels.csv", "class folders" or none


def plan_folder(input_dir: Path, output_dir: Path, config: dict, *, resize: bool = False, overwrite: bool = False,
                resume: bool = False, keep_images: bool = True, max_pixels: int = MAX_PIXELS,
                class_folders: list[str] | None = None) -> FolderPlan:
    """Check the folders, read (or with ``keep_images=False`` only validate) every input at the repair's
    ``config["size"]`` (default 32) under the decode policy's ``max_pixels``, assign outputs, and open the journal;
    with ``resume``, the images an earlier run of ``config`` finished are done already. True labels come from a
    labels.csv, else from first-level subfolders named as the model set's ``class_folders`` (``folder_labels``)."""
    check_folders(input_dir, output_dir, overwrite=overwrite, resume=resume)
    done = done_rows(output_dir, config) if resume else {}
    records = read_folder(input_dir, resize=resize, keep_images=keep_images, size=config.get("size", SIZE),
                          max_pixels=max_pixels)
    if not records:
        raise ValueError(f"no files under {input_dir} (looked recursively for images)")
    if all(rec.skipped for rec in records):
        raise ValueError(f"no images under {input_dir}: all {len(records)} file(s) are other types (read as "
                         f"images: {', '.join(IMAGE_EXTENSIONS)})")
    outputs = assign_outputs(records, output_dir, overwrite=overwrite, done=done)
    rows = {rec.rel: {"file": rec.rel, "status": "skipped" if rec.skipped else "error", "error": rec.error,
                      "notes": rec.notes} for rec in records}
    labels, labels_from = read_labels(input_root(input_dir) / "labels.csv"), "labels.csv"
    if not labels:
        labels, labels_from = folder_labels(records, class_folders), "class folders"
    for rel, row in rows.items():
        if rel in labels:
            row["true_label"] = labels[rel]
    for rel in set(done) & set(outputs):
        rows[rel] = done[rel]
    todo = [rec for rec in records if rec.rel in outputs and rec.rel not in done]
    return FolderPlan(records, outputs, rows, todo, Journal(output_dir, config, append=resume),
                      labels_from if labels else None)


def save_repaired(plan: FolderPlan, rel: str, row: dict, output_dir: Path) -> None:
    """Write one repaired image (``row["image"]``) to its output and fill in its report row (in the journal first:
    a run stopped between the two repairs the image again)."""
    png = encode_png(row.pop("image"))
    row.pop("detail", None)
    plan.rows[rel].update(row, status="repaired", output=plan.outputs[rel].relative_to(output_dir).as_posix())
    plan.journal.record(plan.rows[rel], png)
    write_png(plan.outputs[rel], png)


def repaired_this_run(plan: FolderPlan) -> int:
    """Images this run repaired: a resumed run's speed is not credited with those an earlier run did."""
    return sum(plan.rows[rec.rel]["status"] == "repaired" for rec in plan.todo)


def finish_report(plan: FolderPlan, config: dict, output_dir: Path, seconds: float,
                  run: dict | None = None) -> dict:
    """The report over every input (in the order read), written to ``output_dir``; ``run``: facts of how it ran
    (such as Ray's worker count), added to the summary beside its time."""
    plan.journal.close()
    images = [plan.rows[rec.rel] for rec in plan.records]
    n_repaired = sum(r["status"] == "repaired" for r in images)
    n_error = sum(r["status"] == "error" for r in images)
    gated = [r["gated_out"] for r in images if "gated_out" in r]
    repaired_here = repaired_this_run(plan)
    report = {
        "config": config,
        "images": images,
        "summary": {"n_inputs": len(images), "n_repaired": n_repaired, "n_error": n_error,
                    "n_skipped": len(images) - n_repaired - n_error, "seconds": round(seconds, 3),
                    "images_per_s": round(repaired_here / seconds, 3) if seconds else None,
                    **accuracy(images, plan.labels_from),
                    **({"n_gated_out": sum(gated)} if config.get("gate") else {}), **(run or {})},
    }
    write_report(report, output_dir)
    return report


def repair_folder(repair_batch: BatchRepair, input_dir: Path, output_dir: Path, config: dict, batch_size: int, *,
                  resize: bool = False, overwrite: bool = False, progress: bool = True, resume: bool = False,
                  max_pixels: int = MAX_PIXELS, class_folders: list[str] | None = None) -> dict:
    """Repair every readable image under ``input_dir`` with ``repair_batch``, ``batch_size`` images at a time, or
    where it is a ``runtime.scheduler.SteppedRepair``, streamed through its loop (an image that leaves gives its
    place to the next); returns the report (also written to ``output_dir``), whose "config" is ``config``.
    ``resume``: finish a stopped run of the same config (runtime/journal.py); ``max_pixels``: the decode policy's
    limit; ``class_folders``: the model set's class folder names (``plan_folder``)."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    plan = plan_folder(input_dir, output_dir, config, resize=resize, overwrite=overwrite, resume=resume,
                       max_pixels=max_pixels, class_folders=class_folders)
    start, stepped = time.time(), hasattr(repair_batch, "join")
    with tqdm(total=len(plan.todo), unit="img", desc="repair", disable=not progress) as bar:
        if stepped:                                  # continuous batching: rows in the order images leave
            from .scheduler import stream

            for rel, row in stream(repair_batch, ((rec.rel, rec.image) for rec in plan.todo)):
                save_repaired(plan, rel, row, output_dir)
                bar.update(1)
        else:
            for i in range(0, len(plan.todo), batch_size):
                batch = plan.todo[i:i + batch_size]
                for rec, row in zip(batch, repair_batch(np.stack([r.image for r in batch]))):
                    save_repaired(plan, rec.rel, row, output_dir)
                bar.update(len(batch))
    run = {"scheduler": "continuous"} if stepped else None
    return finish_report(plan, config, output_dir, time.time() - start, run)


def image_rows(repaired: np.ndarray, x: np.ndarray, logits_before: np.ndarray, logits_after: np.ndarray,
               before: dict[str, np.ndarray], after: dict[str, np.ndarray], total_before: np.ndarray,
               total_after: np.ndarray, classes: list[str], gate: dict[str, list] | None = None,
               trace: np.ndarray | None = None) -> list[dict]:
    """The report fields of a repaired batch (8-bit ``repaired`` and inputs ``x``, N×3×S×S), per image, and under
    "detail" what only the service answers with (class probabilities, the objective at each step run: ``trace``,
    steps×N, NaN where an image did not run a step); the folder's report leaves "detail" out."""
    linf = np.abs(repaired - x).max(axis=(1, 2, 3))
    pred_before, pred_after = logits_before.argmax(1), logits_after.argmax(1)
    probs_before, probs_after = softmax(logits_before), softmax(logits_after)
    trace = np.full((0, len(x)), np.nan) if trace is None else trace
    return [{
        "image": repaired[i],
        "pred_before": int(pred_before[i]), "pred_after": int(pred_after[i]),
        "label_before": classes[pred_before[i]], "label_after": classes[pred_after[i]],
        "ssl_loss_before": round(float(total_before[i]), 6), "ssl_loss_after": round(float(total_after[i]), 6),
        "task_losses_before": {t: round(float(v[i]), 6) for t, v in before.items()},
        "task_losses_after": {t: round(float(v[i]), 6) for t, v in after.items()},
        "linf": round(float(linf[i]), 6),
        **{k: v[i] for k, v in (gate or {}).items()},
        "detail": {"probs_before": [round(float(p), 6) for p in probs_before[i]],
                   "probs_after": [round(float(p), 6) for p in probs_after[i]],
                   "objective": [round(float(v), 6) for v in trace[:, i] if np.isfinite(v)]},
    } for i in range(len(x))]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


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


def folder_labels(records: list[ImageRecord], class_folders: list[str] | None) -> dict[str, int]:
    """file -> true class from its first-level subfolder, where every first-level subfolder holding an image is one
    of the model set's ``class_folders`` (as train-set read them); {} otherwise, or without class folders."""
    index = {c: i for i, c in enumerate(class_folders or [])}
    inputs = [rec.rel for rec in records if not rec.skipped]
    folders = {rel.split("/")[0] for rel in inputs if "/" in rel}
    if not folders or not folders <= set(index):
        return {}
    return {rel: index[rel.split("/")[0]] for rel in inputs if "/" in rel}


def accuracy(images: list[dict], labels_from: str | None = None) -> dict:
    labelled = [r for r in images if r["status"] == "repaired" and "true_label" in r]
    if not labelled:
        return {}
    n = len(labelled)
    return {"n_labelled": n, "labels": labels_from,
            "accuracy_before": round(sum(r["pred_before"] == r["true_label"] for r in labelled) / n, 4),
            "accuracy_after": round(sum(r["pred_after"] == r["true_label"] for r in labelled) / n, 4)}


def write_report(report: dict, output_dir: Path) -> None:
    write_json(output_dir / "report.json", report)
    rows = [{**{c: row.get(c) for c in CSV_COLUMNS}, "notes": "; ".join(row.get("notes", []))}
            for row in report["images"]]
    write_csv(output_dir / "report.csv", rows, CSV_COLUMNS)


def summary_lines(report: dict, output_dir: Path) -> list[tuple[str, bool]]:
    """What a command prints after a folder repair: (line, whether it goes to stderr)."""
    summary = report["summary"]
    lines = [(f"repaired {summary['n_repaired']} of {summary['n_inputs']} file(s) in {summary['seconds']:.1f} s "
              f"({summary['images_per_s'] or 0:.2f} images/s); report: {output_dir / 'report.json'}", False)]
    lines += [(f"  error: {row['file']}: {row['error']}", True) for row in report["images"] if row["status"] == "error"]
    if summary["n_skipped"]:
        lines.append((f"skipped {summary['n_skipped']} file(s) that are not images (listed in the report)", False))
    changed = sum(r.get("pred_before") != r.get("pred_after") for r in report["images"] if r["status"] == "repaired")
    lines.append((f"prediction changed for {changed} image(s)", False))
    if "n_gated_out" in summary:
        lines.append((f"gate (false-positive rate {report['config']['gate']['fpr']}): {summary['n_gated_out']} "
                      "image(s) passed unchanged", False))
    if report["config"].get("preview"):
        lines.append((PREVIEW_NOTE, False))
    if "accuracy_before" in summary:
        lines.append((f"accuracy on the {summary['n_labelled']} labelled image(s) ({summary.get('labels')}): "
                      f"{100 * summary['accuracy_before']:.1f} % before, {100 * summary['accuracy_after']:.1f} % after",
                      False))
    return lines
