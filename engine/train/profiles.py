"""Every training hyperparameter in one table: ``PROFILES[profile][network]``, read by engine/train/recipes.py and
trainer.py.

``cpu`` is sized so that all four models train on CIFAR-10 in well under 90 minutes on a 2-core machine; ``gpu`` is
the larger variant for a CUDA GPU; ``folder-cpu`` is for a folder of ~10,000 photos at S = 64 on the 2-core machine
(Imagenette; docs/imagenette.md has the measurements behind it); ``quick`` is folder-cpu's networks for a first try on
a user's own photos. A recipe is for a data set of its size; a smaller one is fitted to the data
(``fit_to_data``, below; engine/train/plan.py sizes a whole set with it).
"""
from __future__ import annotations

from ..data.cifar10 import DataError

MIN_TRAIN_IMAGES = 16           # a training batch of fewer gives BatchNorm statistics of noise

PROFILES: dict[str, dict[str, dict]] = {
    "cpu": {
        # Fast adversarial training (FGSM with random start, Wong et al. 2020): step 10/255 = 1.25 ε is their
        # setting; the DESIGN probe reached 71.8 % clean / 42.8 % PGD-10 with this net in 12 epochs.
        "classifier": dict(architecture="Classifier", config=dict(widths=(32, 128, 128)), epochs=12, batch=256,
                           lr=0.1, weight_decay=5e-4, eps=8 / 255, fgsm_step=10 / 255),
        # SimCLR with in-batch negatives; τ = 0.2 as in the repair loss.
        "contrastive": dict(architecture="ContrastiveNet", config=dict(widths=(32, 128, 128), proj_dim=64,
                                                                       bank_size=4096),
                            epochs=7, batch=256, lr=2e-3, weight_decay=1e-4, tau=0.2),
        "rotation": dict(architecture="RotationNet", config=dict(widths=(16, 64, 64)), epochs=5, batch=128,
                         lr=0.2, weight_decay=5e-4),
        "inpainting": dict(architecture="ContextEncoder", config=dict(width=32), epochs=6, batch=256, lr=2e-3,
                           weight_decay=1e-4),
        # The same net dropping 4 random patches of a quarter side each (runtime/draws.py's patch_mask)
        "inpainting-patches": dict(architecture="ContextEncoder", config=dict(width=32), epochs=6, batch=256,
                                   lr=2e-3, weight_decay=1e-4, mask="patches"),
        # Heads on the classifier's frozen backbone (engine/models/heads.py): only the head trains, so an epoch costs
        # about one backbone forward per view (3 min for the contrastive head, 2.5 min for rotation's four). 1 rotation
        # epoch reached 65.2 % rotation accuracy (the independent net: 83.6 %), hence 3. A head's widths are its
        # classifier's (train_model reads them from the classifier it attaches to).
        "contrastive-head": dict(architecture="ContrastiveNet", config=dict(proj_dim=64, bank_size=4096),
                                 backbone="classifier", epochs=3, batch=256, lr=2e-3, weight_decay=1e-4, tau=0.2),
        "rotation-head": dict(architecture="RotationHead", config=dict(), backbone="classifier", epochs=3,
                              batch=128, lr=0.05, weight_decay=5e-4),
        "inpainting-head": dict(architecture="InpaintingHead", config=dict(width=64),
                                backbone="classifier", epochs=3, batch=256, lr=2e-3, weight_decay=1e-4),
    },
    # A folder of ~10,000 photos (Imagenette: 9,469) at S = 64, on the 2-core machine: the four models of
    # weights/imagenette took 164 min of 1-thread runs, two at a time (docs/imagenette.md). Every backbone halves the
    # image in its stem (stem_stride 2): its maps are then CIFAR's 32 -> 4 and a step costs what it costs at S = 32
    # (FGSM training 129 against 39 images/s with the full-size stem). Ten times fewer images than CIFAR-10 per
    # epoch, so more epochs for the same number of steps.
    "folder-cpu": {
        # ε = 4/255 (ImageNet's customary budget; step 1.25 ε as Wong et al.); wider than CIFAR's (64-128-256, 107 s
        # an epoch) because ten classes of photos need more features than a thumbnail's; 18 epochs ≈ 32 min.
        "classifier": dict(architecture="Classifier", config=dict(widths=(64, 128, 256), stem_stride=2), epochs=18,
                           batch=128, lr=0.1, weight_decay=5e-4, eps=4 / 255, fgsm_step=5 / 255),
        # The undefended classifier beside it (clean training: half the cost of an FGSM epoch).
        "classifier-standard": dict(architecture="Classifier", config=dict(widths=(64, 128, 256), stem_stride=2),
                                    epochs=18, batch=128, lr=0.1, weight_decay=5e-4, eps=4 / 255, fgsm_step=0.0),
        "contrastive": dict(architecture="ContrastiveNet", config=dict(widths=(32, 128, 128), proj_dim=64,
                                                                       bank_size=4096, stem_stride=2),
                            epochs=15, batch=128, lr=2e-3, weight_decay=1e-4, tau=0.2),
        "rotation": dict(architecture="RotationNet", config=dict(widths=(16, 64, 64), stem_stride=2), epochs=10,
                         batch=128, lr=0.1, weight_decay=5e-4),
        "inpainting": dict(architecture="ContextEncoder", config=dict(width=32), epochs=12, batch=128, lr=2e-3,
                           weight_decay=1e-4),
        "inpainting-patches": dict(architecture="ContextEncoder", config=dict(width=32), epochs=12, batch=128,
                                   lr=2e-3, weight_decay=1e-4, mask="patches"),
        "contrastive-head": dict(architecture="ContrastiveNet", config=dict(proj_dim=64, bank_size=4096),
                                 backbone="classifier", epochs=5, batch=128, lr=2e-3, weight_decay=1e-4, tau=0.2),
        "rotation-head": dict(architecture="RotationHead", config=dict(), backbone="classifier", epochs=5,
                              batch=128, lr=0.05, weight_decay=5e-4),
        "inpainting-head": dict(architecture="InpaintingHead", config=dict(width=64),
                                backbone="classifier", epochs=5, batch=128, lr=2e-3, weight_decay=1e-4),
    },
    "gpu": {
        "classifier": dict(architecture="Classifier", config=dict(widths=(64, 256, 256)), epochs=40, batch=512,
                           lr=0.2, weight_decay=5e-4, eps=8 / 255, fgsm_step=10 / 255),
        "contrastive": dict(architecture="ContrastiveNet", config=dict(widths=(64, 256, 256), proj_dim=128,
                                                                       bank_size=8192),
                            epochs=100, batch=512, lr=2e-3, weight_decay=1e-4, tau=0.2),
        "rotation": dict(architecture="RotationNet", config=dict(widths=(64, 256, 256)), epochs=30, batch=256,
                         lr=0.2, weight_decay=5e-4),
        "inpainting": dict(architecture="ContextEncoder", config=dict(width=64), epochs=40, batch=512, lr=2e-3,
                           weight_decay=1e-4),
        "inpainting-patches": dict(architecture="ContextEncoder", config=dict(width=64), epochs=40, batch=512,
                                   lr=2e-3, weight_decay=1e-4, mask="patches"),
        "contrastive-head": dict(architecture="ContrastiveNet", config=dict(proj_dim=128, bank_size=8192),
                                 backbone="classifier", epochs=20, batch=512, lr=2e-3, weight_decay=1e-4, tau=0.2),
        "rotation-head": dict(architecture="RotationHead", config=dict(), backbone="classifier", epochs=10,
                              batch=256, lr=0.05, weight_decay=5e-4),
        "inpainting-head": dict(architecture="InpaintingHead", config=dict(width=128),
                                backbone="classifier", epochs=20, batch=512, lr=2e-3, weight_decay=1e-4),
    },
}

# A first try on a user's own photos (`train-set --profile quick`): folder-cpu's networks for two thirds of their
# epochs, and the classifier's PGD-20 on 500 test images rather than all of them (on Imagenette's 3,925 that alone costs
# minutes). On 3,000 Imagenette photos at S = 64 a third of the epochs took 5.6 min in all on the 2-core machine (2
# threads) and left the classifier at 43.7 % clean, its loss still falling fast; two thirds fit the ~10 minutes a first
# try may take. Its models are labelled a preview (engine/models/provenance.py); docs/imagenette.md compares it with
# folder-cpu.
QUICK_EPOCHS = {"classifier": 12, "classifier-standard": 12, "contrastive": 10, "rotation": 7, "inpainting": 8,
                "inpainting-patches": 8}
PROFILES["quick"] = {name: {**PROFILES["folder-cpu"][name], "epochs": epochs,
                            **({"pgd_n": 500} if name.startswith("classifier") else {})}
                     for name, epochs in QUICK_EPOCHS.items()}


def recipe(name: str, profile: str, epochs: int | None = None) -> dict:
    """``profile``'s recipe for ``name`` (a copy), with ``epochs`` where given."""
    if profile not in PROFILES or name not in PROFILES[profile]:
        raise ValueError(f"no {name!r} recipe in profile {profile!r}")
    cfg = {**PROFILES[profile][name], "config": dict(PROFILES[profile][name]["config"])}
    return cfg if epochs is None else {**cfg, "epochs": epochs}


def fit_to_data(cfg: dict, n_train: int) -> tuple[dict, list[str]]:
    """``cfg`` (a recipe) sized to a training split of ``n_train`` images, and what was changed and why."""
    if n_train < MIN_TRAIN_IMAGES:
        raise DataError(f"{n_train} training images are too few: a model set needs at least {MIN_TRAIN_IMAGES} "
                        f"(a training batch of fewer gives BatchNorm statistics of noise)")
    cfg, notes = {**cfg, "config": dict(cfg["config"])}, []
    if cfg["batch"] > n_train:
        notes.append(f"batch {cfg['batch']} -> {n_train}: the training split has {n_train} images")
        cfg["batch"] = n_train
    bank = cfg["config"].get("bank_size")
    if bank and bank > n_train:
        notes.append(f"bank of negatives {bank} -> {n_train}: one view of each training image")
        cfg["config"]["bank_size"] = n_train
    return cfg, notes

