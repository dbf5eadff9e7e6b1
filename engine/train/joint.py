"""Joint models: one backbone trained at once on classification and on its SSL heads (issue: SSL losses that see the
attack; SOAP, Shi et al. 2021; Hendrycks et al. 2019).

A frozen backbone never has to carry SSL structure, so an attack on the classifier leaves the heads' losses where
they were (measured: AUC 0.51–0.55). Trained jointly, the classifier's own features must also predict rotations,
fill holes and agree across augmented views; an attack that moves those features should move the SSL losses too.

The recipe starts from a trained classifier (the shipped one: fine-tuning is the cheap way on 2 cores) and from the
heads trained on its frozen backbone where they exist, and trains everything unfrozen. Each step, on one batch:

- classification: ``robust`` — two-step PGD from a random start (FGSM with random start, as the base classifier
  was trained, overfitted catastrophically in this fine-tune); ``standard`` — Gaussian-noise augmentation as in
  SOAP, no adversarial examples;
- SSL, on a clean share of the batch: one random rotation per image, two SimCLR views (contrastive, and label
  consistency from the classifier's predictions of the same two views), the centre-hole inpainting decoder.

One backbone pass carries the classification batch and every SSL input (so BatchNorm sees them together, as at
training of any multi-task net). Each SSL loss enters divided by a running mean of its own value: the tasks' raw
scales differ by 100× (inpainting MSE ≈ 0.02, NT-Xent ≈ 4), and this makes ``ssl_weight`` the share each one gets
relative to the cross-entropy, whatever its units (frozen after a warm-up in the robust recipe: see its profile).

The result is saved in the format of heads on a classifier (engine/models/heads.py): ``classifier`` plus
``contrastive-head``, ``inpainting-head``, ``rotation-head``, each holding a copy of the jointly trained backbone, so
that loading, calibration, export and parity work unchanged. ``consistency`` and ``hedge`` read the classifier itself.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.model_sets import model_set_split
from ..models.heads import backbone_config
from ..models.networks import build_model, num_params
from ..models.weights import WeightsError, load_model, model_input, save_model
from ..tasks import augment
from ..tasks.consistency import prediction_spread
from ..tasks.contrastive import nt_xent_pairs
from ..tasks.inpainting import centre_mask
from .loop import batched, crop_flip, log, shuffled_batches, triangular_lr
from .recipes import classifier_metrics, fill_bank, inpainting_metrics, knn_accuracy

JOINT_MODELS = ("joint-robust", "joint-standard")
HEADS = {"contrastive-head": ("ContrastiveNet", dict(proj_dim=64, bank_size=4096)),
         "rotation-head": ("RotationHead", dict()), "inpainting-head": ("InpaintingHead", dict(width=64))}
SSL_TASKS = ("rotation", "contrastive", "inpainting", "consistency")

# Sized so that a recipe trains in about an hour on one thread of the 2-core machine.
# SSL on a quarter of the batch: measured 3.5 s/step (11 min/epoch) robust at 1 thread, against 6.1 s with half
# the batch; the SSL heads see 64 images a step, 12,500 an epoch. ssl_weight 0.25 per task: the four SSL terms
# together weigh as much as the CE.
CPU_PROFILE: dict[str, dict] = {
    # Two PGD steps of ε/2 from a random start (Andriushchenko & Flammarion 2020), not FGSM: the first run, FGSM
    # at step 1.25 ε and lr 0.05, overfitted catastrophically in its third epoch (training CE 1.42 → 0.94,
    # PGD-20 1.25 %). lr 0.03: a fine-tune of an already robust backbone. SSL scales frozen after 50 steps: a
    # running scale let label consistency fall to 1e-4 and so weigh ×250 (its floor), pushing the classifier to
    # saturated, gradient-masking outputs.
    "joint-robust": dict(attack_steps=2, attack_step=4 / 255, epochs=4, batch=256, lr=0.03, weight_decay=5e-4,
                         eps=8 / 255, ssl_weight=0.25, ssl_fraction=0.25, tau=0.2, noise_std=0.0, scale_warmup=50),
    # SOAP trains with Gaussian noise, on its auxiliary tasks too (its reconstruction task is a denoiser). The
    # first run noised only the classification batch (σ 0.05, running SSL scales): its SSL losses then flagged
    # uniform noise of 16/255 as readily as PGD (AUC 0.89 vs 0.73), and a repair that removes *any* perturbation
    # cannot tell the attack's apart. So here every SSL input is noised as well (the inpainting target stays the
    # clean image), and the classification batch with it, at σ 0.1 instead of 0.05 (≈ 25/255, std ×2.8 the
    # repair's own uniform 16/255 moves): noise the losses have learned to ignore, leaving what still moves them to
    # the structured perturbations. Scales frozen after 50 steps, as in the robust recipe.
    "joint-standard": dict(attack_steps=0, epochs=5, batch=256, lr=0.05, weight_decay=5e-4,
                           eps=8 / 255, ssl_weight=0.25, ssl_fraction=0.25, tau=0.2, noise_std=0.1,
                           ssl_noise=True, scale_warmup=50),
}
# The same recipes at a GPU's scale: longer, larger batches, SSL on the whole batch.
JOINT_PROFILES: dict[str, dict[str, dict]] = {
    "cpu": CPU_PROFILE,
    "gpu": {name: {**cfg, "epochs": 30, "batch": 512, "lr": 0.1, "ssl_fraction": 1.0}
            for name, cfg in CPU_PROFILE.items()},
}


class JointNets(nn.Module):
    """The classifier and its three heads around one shared backbone (``classifier.backbone``); ``configs``: each
    head's architecture config, as its manifest will store it."""

    def __init__(self, classifier: nn.Module, heads: dict[str, nn.Module], configs: dict[str, dict]) -> None:
        super().__init__()
        self.classifier, self.configs = classifier, configs
        self.heads = nn.ModuleDict({name.replace("-", "_"): net for name, net in heads.items()})
        for net in self.heads.values():
            net.backbone = classifier.backbone          # shared: one set of backbone parameters

    def head(self, name: str) -> nn.Module:
        return self.heads[name.replace("-", "_")]


def load_base(base_dir: str | os.PathLike) -> tuple[JointNets, dict]:
    """The base classifier from ``base_dir`` and its heads (where trained on its backbone, else fresh)."""
    base_dir = Path(base_dir)
    if not (base_dir / "classifier.json").exists():
        raise WeightsError(f"the joint recipes fine-tune a trained classifier: {base_dir / 'classifier.json'} is "
                           "missing (pass --base DIR holding classifier.json and classifier.safetensors)")
    classifier, manifest = load_model("classifier", base_dir)
    if manifest["architecture"] != "Classifier":
        raise WeightsError(f"{base_dir / 'classifier.json'} is a {manifest['architecture']}, not a Classifier")
    backbone = backbone_config(manifest["config"])
    heads, configs = {}, {}
    for name, (architecture, config) in HEADS.items():
        configs[name] = {**config, **backbone}
        head = build_model(architecture, configs[name])
        if (base_dir / f"{name}.json").exists():
            trained, head_manifest = load_model(name, base_dir)
            if head_manifest.get("backbone", {}).get("sha256") == manifest["sha256"]:
                head, configs[name] = trained, head_manifest["config"]
        heads[name] = head
    return JointNets(classifier, heads, configs).train().requires_grad_(True), manifest


def one_rotation(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image rotated by a random multiple of 90° (one rotation per image), with the rotation index."""
    k = torch.randint(0, 4, (len(x),), generator=generator).to(x.device)
    rotated = torch.stack([torch.rot90(x, r, dims=(2, 3)) for r in range(4)])       # 4×N×C×H×W
    return rotated[k, torch.arange(len(x), device=x.device)], k


class LossScale:
    """The unit each SSL loss is measured in: an exponential moving average of its value, frozen after
    ``warmup`` updates where given (then each loss keeps the weight its starting scale gave it, and a loss that its
    own term drives towards zero stops being amplified as it falls)."""

    def __init__(self, warmup: int | None = None, momentum: float = 0.98, floor: float = 1e-3) -> None:
        self.warmup, self.momentum, self.floor = warmup, momentum, floor
        self.values: dict[str, float] = {}
        self.updates: dict[str, int] = {}

    def __call__(self, name: str, loss: torch.Tensor) -> float:
        seen = self.updates.get(name, 0)
        if self.warmup is not None and seen >= self.warmup:
            return self.values[name]
        value = max(loss.item(), self.floor)
        old = self.values.get(name, value)
        # during a warm-up: the plain mean of the values so far; after it (or without one): a moving average
        self.values[name] = old + (value - old) / (seen + 1) if self.warmup else \
            self.momentum * old + (1 - self.momentum) * value
        self.updates[name] = seen + 1
        return self.values[name]


def gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=generator).to(x.device)).clamp(0, 1)


def attacked_batch(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: dict,
                   generator: torch.Generator) -> torch.Tensor:
    """The classification batch: PGD from a random start (``attack_steps`` steps of ``attack_step`` within ``eps``;
    one step is FGSM with random start) or, with no steps, Gaussian noise of ``noise_std``."""
    eps = cfg["eps"]
    if not cfg["attack_steps"]:
        return gaussian_noise(x, cfg["noise_std"], generator)
    delta = (torch.rand(x.shape, generator=generator) * 2 - 1).to(x.device) * eps
    for _ in range(cfg["attack_steps"]):
        delta.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(classifier((x + delta).clamp(0, 1)), y), delta)
        delta = (delta.detach() + cfg["attack_step"] * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1)


def joint_step(nets: JointNets, cfg: dict, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
               scale: LossScale) -> tuple[torch.Tensor, dict[str, float]]:
    """One batch's total loss (CE + Σ_k w · L_k / running scale_k) and each term's value."""
    clf, device = nets.classifier, x.device
    x = crop_flip(x, generator)
    x_cls = attacked_batch(clf, x, y, cfg, generator)
    b = max(2, int(len(x) * cfg["ssl_fraction"]))
    xs = x[:b]
    noisy = (lambda t: gaussian_noise(t, cfg["noise_std"], generator)) if cfg.get("ssl_noise") else (lambda t: t)
    x_rot, k = one_rotation(xs, generator)
    params = {key: v.to(device) for key, v in augment.sample_views(b, 2, generator, x.shape[-1]).items()}
    views = augment.apply_views(xs, **params).transpose(0, 1).flatten(0, 1)        # view 1 of all, then view 2
    inpainting = nets.head("inpainting-head")
    mask = centre_mask(b, device=device, size=x.shape[-1])
    ssl_inputs = torch.cat([noisy(x_rot), noisy(views), inpainting.masked_input(noisy(xs), mask)])
    m16, m8, m4 = clf.backbone.maps(torch.cat([x_cls, ssl_inputs]))
    n = len(x)
    pooled = m4.mean((2, 3))
    losses = {"classification": F.cross_entropy(clf.head(pooled[:n]), y)}
    losses["rotation"] = F.cross_entropy(nets.head("rotation-head").head(m4[n:n + b]), k)
    z = F.normalize(nets.head("contrastive-head").projector(pooled[n + b:n + 3 * b]), dim=1)
    losses["contrastive"] = nt_xent_pairs(z[:b], z[b:], cfg["tau"])
    probs = clf.head(pooled[n + b:n + 3 * b]).softmax(1).view(2, b, -1).transpose(0, 1)
    losses["consistency"] = prediction_spread(probs).mean()
    filled = inpainting.decode(m16[n + 3 * b:], m8[n + 3 * b:], m4[n + 3 * b:])
    losses["inpainting"] = ((filled - xs) ** 2 * mask).sum() / (mask.sum() * 3)
    total = losses["classification"] + sum(cfg["ssl_weight"] * losses[t] / scale(t, losses[t]) for t in SSL_TASKS)
    return total, {name: loss.item() for name, loss in losses.items()}


def train_epochs(nets: JointNets, cfg: dict, data: dict, generator: torch.Generator, device: torch.device,
                 name: str) -> None:
    params = list(dict.fromkeys(nets.parameters()))       # the shared backbone once
    optimizer = torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, nesterov=True, weight_decay=cfg["weight_decay"])
    steps_per_epoch = len(data["train_x"]) // cfg["batch"]
    total, step, scale = cfg["epochs"] * steps_per_epoch, 0, LossScale(cfg["scale_warmup"])
    for epoch in range(cfg["epochs"]):
        nets.train()
        start, sums = time.time(), {}
        for idx in shuffled_batches(len(data["train_x"]), cfg["batch"], generator):
            for group in optimizer.param_groups:
                group["lr"] = triangular_lr(step, total, cfg["lr"])
            x = data["train_x"][idx].to(device).float().div_(255)
            loss, values = joint_step(nets, cfg, x, data["train_y"][idx].to(device), generator, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for key, v in values.items():
                sums[key] = sums.get(key, 0.0) + v
            step += 1
        log(f"{name} epoch {epoch + 1}/{cfg['epochs']}: "
            + ", ".join(f"{k} {v / steps_per_epoch:.4f}" for k, v in sums.items()) + f", {time.time() - start:.0f} s")


@torch.no_grad()
def reestimate_batchnorm(nets: JointNets, data: dict, device: torch.device, n: int = 10_000,
                         batch: int = 500) -> None:
    """BatchNorm statistics of the shared backbone measured again on ``n`` clean training images.

    The running statistics that training leaves are those of its mixed batches (adversarial or noisy images,
    rotations, augmented views, masked images), which are not an input's at test time: the first joint models scored
    17–20 % clean with them and 66–69 % once re-estimated on clean images (measured, 1,000 test images), 67–68 %
    with the batch's own statistics. So every joint model ends with this step; the heads share the backbone and so
    these statistics."""
    norms = [m for m in nets.classifier.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                  # a cumulative average over every batch below
    nets.classifier.backbone.train()
    for i in range(0, min(n, len(data["train_x"])), batch):
        nets.classifier.backbone(data["train_x"][i:i + batch].to(device).float().div_(255))
    for m in norms:
        m.momentum = 0.1
    nets.eval()


def measure(nets: JointNets, data: dict, generator: torch.Generator, device: torch.device,
            n_pgd: int) -> dict[str, dict]:
    """Test-set metrics of each saved network: accuracy clean and under PGD-20 (first ``n_pgd`` images), two-view
    agreement of the classifier, and each head's metric as its frozen-backbone recipe measures it."""
    nets.eval()
    clf, test_x = nets.classifier, data["test_x"]
    rotation = nets.head("rotation-head")
    rot_correct = batched(lambda x: torch.stack([(rotation(torch.rot90(x, r, dims=(2, 3))).argmax(1) == r)
                                                 for r in range(4)]).float().sum(0), test_x, device)
    agree = []
    for i in range(0, len(test_x), 500):
        x = test_x[i:i + 500].float().div(255)
        views = augment.apply_views(x, **augment.sample_views(len(x), 2, generator, x.shape[-1])).flatten(0, 1)
        with torch.no_grad():
            pred = clf(views.to(device)).argmax(1).view(-1, 2)
        agree.append((pred[:, 0] == pred[:, 1]).float().cpu())
    return {
        "classifier": {**classifier_metrics(clf, data, device, n_pgd),
                       "consistency_two_view_agreement": torch.cat(agree).mean().item()},
        "rotation-head": {"rotation_accuracy": rot_correct.sum().item() / (4 * len(test_x))},
        "inpainting-head": inpainting_metrics(nets.head("inpainting-head"), data, device),
        "contrastive-head": {"knn_accuracy": knn_accuracy(nets.head("contrastive-head"), data, device, k=20),
                             "knn_k": 20},
    }


def finish(nets: JointNets, data: dict, generator: torch.Generator, device: torch.device,
           n_pgd: int) -> dict[str, dict]:
    """After the last step: clean BatchNorm statistics, the contrastive head's negatives, the test-set metrics."""
    reestimate_batchnorm(nets, data, device)
    fill_bank(nets.head("contrastive-head"), data, generator, device)
    return measure(nets, data, generator, device, n_pgd)


def train_joint(name: str, profile: str = "cpu", data_root: str | None = None, out_dir: str = "weights/joint",
                base_dir: str = "weights", seed: int = 0, device: str | None = None, overwrite: bool = False,
                epochs: int | None = None, command: str | None = None, n_pgd: int = 2000) -> str:
    """Train joint model ``name`` (a key of JOINT_PROFILES[profile]) from the classifier in ``base_dir``; write the
    classifier and its three heads, with manifests, to ``out_dir``. Returns the classifier manifest's path."""
    if profile not in JOINT_PROFILES or name not in JOINT_PROFILES[profile]:
        raise ValueError(f"no {name!r} recipe in profile {profile!r}: the joint models have the profiles "
                         f"{', '.join(p for p in JOINT_PROFILES if name in JOINT_PROFILES[p])}")
    cfg = dict(JOINT_PROFILES[profile][name])
    if epochs is not None:
        cfg["epochs"] = epochs
    out = Path(out_dir)
    if not overwrite:
        taken = [out / f"{m}.json" for m in ("classifier", *HEADS) if (out / f"{m}.json").exists()]
        if taken:
            raise WeightsError(f"{taken[0]} already exists; pass --overwrite to replace it, or choose another --out")
    if out.resolve() == Path(base_dir).resolve():
        raise WeightsError(f"--out {out} is the base classifier's folder: the joint model would replace it")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    nets, base_manifest = load_base(base_dir)
    inputs = model_input(base_manifest)          # the base classifier's images: its size, its classes
    train_x, train_y = model_set_split(data_root, "train", inputs, labelled=True)
    test_x, test_y = model_set_split(data_root, "test", inputs, labelled=True)
    data = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    log(f"training {name} ({profile} profile, {cfg['epochs']} epochs) on {dev}, from {base_dir}/classifier")
    start = time.time()
    nets = nets.to(dev, memory_format=torch.channels_last)
    train_epochs(nets, cfg, data, generator, dev, name)
    nets.eval().requires_grad_(False)
    metrics = finish(nets, data, generator, dev, n_pgd)
    wall = time.time() - start
    log(f"{name} done in {wall / 60:.1f} min: {metrics}")
    source = {"data_md5": base_manifest["data_md5"]} if "data_md5" in base_manifest else {"input": inputs}
    common = {"profile": profile, "command": command, "joint": name, "recipe": cfg, **source,
              "epochs": cfg["epochs"], "seed": seed, "wall_seconds": round(wall, 1),
              "base": {"name": "classifier", "dir": str(base_dir), "sha256": base_manifest["sha256"]},
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"},
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = save_model(nets.classifier, "classifier", out, {
        "architecture": "Classifier", "config": base_manifest["config"], "params": num_params(nets.classifier),
        "metrics": metrics["classifier"], **common}, overwrite=overwrite)
    classifier_sha = load_model("classifier", out)[1]["sha256"]
    for head, (architecture, _) in HEADS.items():
        net = nets.head(head)
        save_model(net, head, out, {
            "architecture": architecture, "config": nets.configs[head], "params": num_params(net),
            "metrics": metrics[head], "backbone": {"name": "classifier", "sha256": classifier_sha}, **common},
            overwrite=overwrite)
    return str(path)
