"""Writes examples/clean/: the first 64 CIFAR-10 test images as lossless PNG, and examples/labels.csv.

    CIFAR10_ROOT=../shared/data/cifar10 python examples/make_examples.py

The default `cli.py repair` run and the fast tests read these, so they need no data set.
"""
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.data import CLASSES, load_cifar10  # noqa: E402
from engine.imageio import write_png  # noqa: E402

N = 64
here = Path(__file__).resolve().parent
images, labels = load_cifar10("test")
rows = []
for i in range(N):
    name = f"{i:04d}_{CLASSES[labels[i]]}.png"
    write_png(here / "clean" / name, images[i].float() / 255)
    rows.append({"file": f"clean/{name}", "test_index": i, "label": int(labels[i]), "class": CLASSES[labels[i]]})
with open(here / "labels.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
print(f"wrote {N} images to {here / 'clean'}")
