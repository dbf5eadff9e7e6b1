"""The hand-built augmentation operators against plain references (F.interpolate, torchvision's functional ops)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from engine.tasks import augment
from runtime import draws

IDENTITY = dict(brightness=torch.ones(1, 1), contrast=torch.ones(1, 1), color=torch.eye(3).expand(1, 1, 3, 3))


def crop_matrices(top, left, h, w, size=32):
    t, l_, hh, ww = (np.array([v]) for v in (top, left, h, w))
    return (torch.from_numpy(draws.resize_matrix(t, hh, size, size))[None],
            torch.from_numpy(draws.resize_matrix(l_, ww, size, size))[None])


@pytest.mark.parametrize("box", [(0, 0, 32, 32), (3, 5, 20, 17), (10, 0, 7, 32), (0, 12, 32, 9), (1, 1, 31, 30)])
def test_crop_resize_matches_interpolate(images, box):
    top, left, h, w = box
    crop_y, crop_x = crop_matrices(top, left, h, w)
    ours = augment.apply_views(images[:1], crop_y, crop_x, **IDENTITY)[:, 0]
    reference = F.interpolate(images[:1, :, top:top + h, left:left + w], size=(32, 32), mode="bilinear",
                              align_corners=False)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_flip_reverses_rows_of_the_column_matrix(images):
    crop_y, crop_x = crop_matrices(4, 2, 24, 28)
    plain = augment.apply_views(images[:1], crop_y, crop_x, **IDENTITY)
    flipped = augment.apply_views(images[:1], crop_y, crop_x.flip(-2), **IDENTITY)
    torch.testing.assert_close(flipped, plain.flip(-1))


def full_crop():
    return crop_matrices(0, 0, 32, 32)


def test_brightness_and_contrast_match_torchvision(images):
    crop_y, crop_x = full_crop()
    for b, c in [(1.3, 1.0), (0.7, 1.0), (1.0, 1.35), (1.0, 0.6)]:
        ours = augment.apply_views(images[:1], crop_y, crop_x, torch.tensor([[b]]), torch.tensor([[c]]),
                                   torch.eye(3).expand(1, 1, 3, 3))[:, 0]
        reference = TF.adjust_contrast(TF.adjust_brightness(images[:1], b), c)
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_saturation_matches_torchvision(images):
    crop_y, crop_x = full_crop()
    for s in (0.6, 1.4):
        color = torch.from_numpy(draws.saturation_matrix(np.array([s]))).float()[None]
        ours = augment.apply_views(images[:1], crop_y, crop_x, torch.ones(1, 1), torch.ones(1, 1), color)[:, 0]
        torch.testing.assert_close(ours, TF.adjust_saturation(images[:1], s), atol=1e-5, rtol=0)


def test_grayscale_matches_torchvision_weights(images):
    crop_y, crop_x = full_crop()
    gray = torch.tensor(draws.GRAY_WEIGHTS).expand(3, 3)[None, None]
    ours = augment.apply_views(images[:1], crop_y, crop_x, torch.ones(1, 1), torch.ones(1, 1), gray)[:, 0]
    torch.testing.assert_close(ours, TF.rgb_to_grayscale(images[:1], num_output_channels=3), atol=1e-5, rtol=0)


def test_hue_rotation_keeps_greys_and_luma():
    m = torch.from_numpy(draws.hue_matrix(np.array([0.0, 0.1, -0.07]))).float()
    torch.testing.assert_close(m[0], torch.eye(3), atol=1e-6, rtol=0)
    grey = torch.full((3,), 0.4)
    torch.testing.assert_close(m @ grey, grey.expand(3, 3), atol=1e-5, rtol=0)
    luma = torch.tensor(draws.RGB_TO_YIQ[0])
    rgb = torch.tensor([0.9, 0.2, 0.4])
    torch.testing.assert_close(luma @ (m @ rgb).T, (luma @ rgb).expand(3), atol=1e-5, rtol=0)


def test_sampled_params_are_valid_and_seeded():
    a = augment.sample_views(16, 4, torch.Generator().manual_seed(3))
    b = augment.sample_views(16, 4, torch.Generator().manual_seed(3))
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert a["crop_y"].shape == (16, 4, 32, 32) and a["color"].shape == (16, 4, 3, 3)
    # every output pixel is a convex combination of input pixels
    torch.testing.assert_close(a["crop_y"].sum(-1), torch.ones(16, 4, 32))
    assert (a["crop_x"] >= 0).all() and (a["brightness"] > 0).all()
    top, left, h, w = (torch.from_numpy(a) for a in draws.crop_boxes(np.random.default_rng(0), 1000, 32))
    assert ((top >= 0) & (top + h <= 32) & (left >= 0) & (left + w <= 32)).all()
    area = (h * w).float() / 1024
    assert area.min() >= 0.18 and area.max() <= 1.0


def test_views_stay_in_unit_range(images):
    params = augment.sample_views(len(images), 4, torch.Generator().manual_seed(1))
    views = augment.apply_views(images, **params)
    assert views.shape == (len(images), 4, 3, 32, 32)
    assert views.min() >= 0 and views.max() <= 1
