"""A before/after picture of a folder repair: the first repaired images, each input above its repair, with the
classifier's prediction on each and the true label where labels.csv gave one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .files import atomic_write
from .imageio import SIZE, input_root, read_image


def wrap(label: str, width: int = 12) -> str:
    """A class name on lines of about ``width`` characters (at word breaks), to fit under one thumbnail."""
    lines, line = [], ""
    for word in label.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def check_preview_path(path: Path, *, overwrite: bool) -> None:
    """ValueError where ``path`` cannot take the picture."""
    if path.suffix.lower() != ".png":
        raise ValueError(f"--preview writes a PNG: name a .png file, not {path.name}")
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists: choose another --preview file, or pass --overwrite")


def write_preview(report: dict, input_dir: Path, output_dir: Path, path: Path, classes: list[str],
                  count: int = 8, *, resize: bool = False, size: int = SIZE) -> int:
    """Write the picture of the first ``count`` repaired images to ``path`` (PNG); returns how many it shows.
    ``classes``: the names of the true labels; ``size``: the side the inputs were read at."""
    try:
        import matplotlib

        matplotlib.use("Agg")                     # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("--preview draws with matplotlib: pip install matplotlib") from e
    rows = [r for r in report["images"] if r["status"] == "repaired"][:count]
    if not rows:
        return 0
    base = input_root(input_dir)
    fig, axes = plt.subplots(2, len(rows), figsize=(1.7 * len(rows) + 0.6, 4.6), squeeze=False)
    for i, row in enumerate(rows):
        before = read_image(base / row["file"], resize, size)[0]
        after = np.asarray(Image.open(output_dir / row["output"]).convert("RGB"))
        truth = f"true {wrap(classes[row['true_label']])}\n" if "true_label" in row else ""
        changed = row["pred_after"] != row["pred_before"]
        # the input's labels above it, the repair's below it: two rows of titles never meet between the images
        axes[0, i].set_title(f"{truth}{wrap(row['label_before'])}", fontsize=8)
        axes[1, i].set_xlabel(wrap(row["label_after"]), fontsize=8, color="tab:red" if changed else "black")
        for ax, image in ((axes[0, i], before.transpose(1, 2, 0)), (axes[1, i], after)):
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("input", fontsize=9)
    axes[1, 0].set_ylabel("repaired", fontsize=9)
    fig.suptitle("predictions before (above) and after (below) the repair (red: changed)", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return len(rows)
