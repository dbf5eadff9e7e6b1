"""Attacked CIFAR-10 test images as lossless 8-bit PNG, with labels.csv and attack.json (`cli.py attack`).

The attack runs in float; the PNG holds it rounded to k/255. Both accuracies are reported, so a user can see that
the attack still fools the classifier after quantization.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..attacks import PGD, DefenseAwarePGD
from ..data.model_sets import model_set_split
from ..imageio import quantize, write_png
from ..pipeline import Pipeline
from runtime.files import write_csv, write_json

ATTACK_SET_ATTACKS = ("pgd", "aware")


def write_attack_set(pipeline: Pipeline, out_dir: Path, n: int = 64, attack: str = "pgd", eps: float = 8 / 255,
                     steps: int = 20, step_size: float = 2 / 255, seed: int = 0, clean_dir: Path | None = None,
                     data_root: str | None = None, overwrite: bool = False, aware_lambda: float = 1.0) -> dict:
    """Attack the first ``n`` test images; write OUT/<index>_<class>.png, OUT/labels.csv and OUT/attack.json (and
    the clean images with their labels.csv to ``clean_dir``). Returns the summary that attack.json holds."""
    if attack not in ATTACK_SET_ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACK_SET_ATTACKS)}")
    images, labels = model_set_split(data_root, "test", pipeline.inputs, labelled=True)
    classes = pipeline.class_names
    if not 1 <= n <= len(images):
        raise ValueError(f"--n must be between 1 and {len(images)}, not {n}")
    names = [f"{i:04d}_{classes[labels[i]].replace(' ', '_')}.png" for i in range(n)]
    folders = [out_dir] + ([clean_dir] if clean_dir else [])
    if not overwrite:
        for folder in folders:
            taken = [p for p in [folder / "labels.csv", *(folder / name for name in names)] if p.exists()]
            if taken:
                raise ValueError(f"{taken[0]} already exists ({len(taken)} file(s) would be replaced): "
                                 "choose another folder, or pass --overwrite")
    model = pipeline.classifier
    rows, counts = [], {"clean": 0, "attacked_float": 0, "attacked_png": 0}
    for start in range(0, n, 100):
        x = images[start:min(n, start + 100)].float().div(255).to(pipeline.device)
        y = labels[start:start + len(x)].to(pipeline.device)
        if attack == "pgd":
            x_adv = PGD(model, eps, step_size, steps, generator=torch.Generator().manual_seed(seed + start))(x, y)
        else:
            x_adv = DefenseAwarePGD(model, pipeline.objective, aware_lambda, eps, step_size, steps,
                                    seed + start)(x, y)
        x_png = quantize(x_adv)
        preds = {key: pipeline.predict(v) for key, v in
                 (("clean", x), ("attacked_float", x_adv), ("attacked_png", x_png))}
        for key, pred in preds.items():
            counts[key] += (pred == y).sum().item()
        for j in range(len(x)):
            i = start + j
            write_png(out_dir / names[i], x_png[j])
            if clean_dir:
                write_png(clean_dir / names[i], x[j])
            rows.append({"file": names[i], "test_index": i, "label": int(y[j]), "class": classes[y[j]],
                         "pred_clean": int(preds["clean"][j]), "pred_attacked": int(preds["attacked_png"][j])})
    columns = list(rows[0])
    write_csv(out_dir / "labels.csv", rows, columns)
    if clean_dir:                                   # the clean copy has no attacked prediction
        write_csv(clean_dir / "labels.csv", rows, [c for c in columns if c != "pred_attacked"])
    summary = {"n": n, "attack": attack, "eps": eps, "steps": steps, "step_size": step_size, "seed": seed,
               "test_indices": [0, n], **{f"accuracy_{k}": v / n for k, v in counts.items()},
               "classifier_sha256": pipeline.manifests["classifier"]["sha256"]}
    write_json(out_dir / "attack.json", summary)
    return summary

