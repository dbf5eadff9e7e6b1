"""The classifier and the SSL task networks, behind one registry: architecture name -> constructor(**config).

Every network takes float images in [0, 1], N×3×S×S (S a multiple of 16: the working size of its model set, 32 for
CIFAR-10), and normalizes inside (docs/design.md, principle 5), so that an attack, a repair and an exported graph all
work in pixel space. Nothing here is sized by S: the backbones end in a global pool and the encoder-decoders are
fully convolutional, so one architecture serves every size. The backbone is the airbench94 layout (Jordan, 2024) at
a width that the 2-core machines can train: 32-128-128 has 0.50 M parameters and trains at ~940 img/s at S = 32
(docs/measurements.md).

``mean`` and ``std`` in a config are the per-channel statistics of the training images (default CIFAR-10's; a model
set trained on a folder records its own).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


Stats = tuple[float, float, float]


class Normalize(nn.Module):
    """(x - mean) / std with the training images' statistics; constants of the config, not saved with the weights."""

    def __init__(self, mean: Stats = CIFAR_MEAN, std: Stats = CIFAR_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]


class ConvGroup(nn.Sequential):
    """airbench's block: conv, 2×2 max-pool, BN, GELU, conv, BN, GELU; halves the resolution."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2),
                         nn.BatchNorm2d(c_out), nn.GELU(), *conv_bn(c_out, c_out))


class Backbone(nn.Module):
    """Normalize -> stem -> three ConvGroups (S -> S/2 -> S/4 -> S/8) -> global average pool. ``stem_stride`` 2
    halves the image in the stem first (the maps are then S/4, S/8, S/16): at S = 64 a network then costs what it
    costs at 32 (a training step 129 against 39 images/s, docs/imagenette.md), as ImageNet networks' stems do.

    Average, not airbench's max: with max-pooled features an unscaled linear head starts at a loss of 3-6 and
    FGSM training stalled at chance for a whole epoch; the average trains from the first steps (measured).

    ``forward`` gives the pooled vector N×widths[2]; ``maps`` the three groups' outputs, where the task heads on a
    classifier's backbone attach (engine/models/heads.py).
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 128, 128), stem: int = 24, mean: Stats = CIFAR_MEAN,
                 std: Stats = CIFAR_STD, stem_stride: int = 1) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.stem = nn.Sequential(*conv_bn(3, stem, stem_stride))
        self.stem_stride = stem_stride
        self.group1 = ConvGroup(stem, widths[0])
        self.group2 = ConvGroup(widths[0], widths[1])
        self.group3 = ConvGroup(widths[1], widths[2])
        self.out_dim = widths[2]

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three groups' outputs: N×widths[0]×S/2×S/2, N×widths[1]×S/4×S/4, N×widths[2]×S/8×S/8."""
        m16 = self.group1(self.stem(self.normalize(x)))
        m8 = self.group2(m16)
        return m16, m8, self.group3(m8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maps(x)[2].mean(dim=(2, 3))


class Classifier(nn.Module):
    """Backbone + linear layer. Output: logits N×num_classes."""

    def __init__(self, widths: tuple[int, int, int] = (32, 128, 128), num_classes: int = 10, mean: Stats = CIFAR_MEAN,
                 std: Stats = CIFAR_STD, stem_stride: int = 1) -> None:
        super().__init__()
        self.backbone = Backbone(tuple(widths), mean=mean, std=std, stem_stride=stem_stride)
        self.head = nn.Linear(self.backbone.out_dim, num_classes, bias=False)
        nn.init.zeros_(self.head.weight)         # start at the uniform prediction, loss ln 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class RotationNet(nn.Module):
    """Predicts which of 4 rotations (0°, 90°, 180°, 270°) an image has. Output: logits N×4."""

    def __init__(self, widths: tuple[int, int, int] = (16, 64, 64), mean: Stats = CIFAR_MEAN,
                 std: Stats = CIFAR_STD, stem_stride: int = 1) -> None:
        super().__init__()
        self.backbone = Backbone(tuple(widths), stem=16, mean=mean, std=std, stem_stride=stem_stride)
        self.head = nn.Linear(self.backbone.out_dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class ContrastiveNet(nn.Module):
    """SimCLR encoder + projection head. ``forward`` gives unit-norm projections N×proj_dim.

    ``bank`` holds unit-norm projections of augmented clean training images: the negatives of the repair-time
    contrastive loss, so that an image's loss never depends on the other images of its batch (principle 3).
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 128, 128), proj_dim: int = 64,
                 bank_size: int = 4096, mean: Stats = CIFAR_MEAN, std: Stats = CIFAR_STD,
                 stem_stride: int = 1) -> None:
        super().__init__()
        self.backbone = Backbone(tuple(widths), mean=mean, std=std, stem_stride=stem_stride)
        d = self.backbone.out_dim
        self.projector = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, proj_dim))
        self.register_buffer("bank", torch.zeros(bank_size, proj_dim))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (before the projection head), the representation kNN accuracy is measured on."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)


class ContextEncoder(nn.Module):
    """Context encoder (Pathak et al., 2016): sees the image with a region dropped (mask = 1 there) and the mask, and
    predicts the whole image in [0, 1]; the loss reads only the dropped region. Fully convolutional (S -> S/8 -> S)."""

    def __init__(self, width: int = 32, mean: Stats = CIFAR_MEAN, std: Stats = CIFAR_STD) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        w = width

        def down(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]

        def up(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]

        self.encoder = nn.Sequential(*down(4, w), *down(w, 2 * w), *down(2 * w, 4 * w), *conv_bn(4 * w, 4 * w))
        self.decoder = nn.Sequential(*up(4 * w, 2 * w), *up(2 * w, w), nn.ConvTranspose2d(w, 3, 4, 2, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        context = self.normalize(x) * (1 - mask)
        return torch.sigmoid(self.decoder(self.encoder(torch.cat([context, mask], dim=1))))


class RotationHead(nn.Module):
    """Rotation prediction on a classifier's backbone (Hendrycks et al., 2019; Mao et al., 2021): an MLP on the
    last map, average-pooled to 4×4 (it is 4×4 at S = 32, and at 64 behind a stride-2 stem). The map, not the pooled
    vector: which way is up lives in the spatial layout, which the global average pool throws away. Output: N×4."""

    def __init__(self, widths: tuple[int, int, int] = (32, 128, 128), hidden: int = 256, mean: Stats = CIFAR_MEAN,
                 std: Stats = CIFAR_STD, stem_stride: int = 1) -> None:
        super().__init__()
        self.backbone = Backbone(tuple(widths), mean=mean, std=std, stem_stride=stem_stride)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(widths[2] * 16, hidden), nn.GELU(), nn.Linear(hidden, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.backbone.maps(x)[2]
        if m.shape[-1] != 4:            # a static shape: at S = 32 the graph has no pool, as before sizes were free
            m = F.avg_pool2d(m, m.shape[-1] // 4)
        return self.head(m)


class InpaintingHead(nn.Module):
    """Inpainting decoder on a classifier's backbone: the backbone sees the image with the dropped region filled
    with the mean colour (0 after normalization, like the context encoder's zeroed input), and a small U-Net
    decoder climbs from its S/8 map back to S×S through the S/4 and S/2 maps. Output: N×3×S×S in [0, 1]."""

    def __init__(self, widths: tuple[int, int, int] = (32, 128, 128), width: int = 64, mean: Stats = CIFAR_MEAN,
                 std: Stats = CIFAR_STD, stem_stride: int = 1) -> None:
        super().__init__()
        self.backbone = Backbone(tuple(widths), mean=mean, std=std, stem_stride=stem_stride)
        self.register_buffer("fill", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        w = width
        self.reduce = nn.Sequential(nn.Conv2d(widths[2], w, 1, bias=False), nn.BatchNorm2d(w), nn.GELU())
        self.up8 = nn.Sequential(*conv_bn(w + widths[1], w))
        self.up16 = nn.Sequential(*conv_bn(w + widths[0], w // 2))
        self.out = nn.Conv2d(w // 2, 3, 3, padding=1)

    def masked_input(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What the backbone sees: x with the dropped region filled with the mean colour."""
        return x * (1 - mask) + self.fill * mask

    def decode(self, m16: torch.Tensor, m8: torch.Tensor, m4: torch.Tensor) -> torch.Tensor:
        """The backbone's three maps (of the masked input) -> the predicted image N×3×S×S in [0, 1]."""
        up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)
        h = self.up8(torch.cat([up(self.reduce(m4)), m8], dim=1))
        h = self.up16(torch.cat([up(h), m16], dim=1))
        if self.backbone.stem_stride > 1:       # the first map is S/4 behind a stride-2 stem: one more doubling
            h = up(h)
        return torch.sigmoid(self.out(up(h)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.backbone.maps(self.masked_input(x, mask)))


ARCHITECTURES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (Classifier, RotationNet, ContrastiveNet, ContextEncoder, RotationHead, InpaintingHead)
}


def build_model(architecture: str, config: dict) -> nn.Module:
    """A fresh network from its registry name and config (as a weights manifest stores them)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](**config)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
