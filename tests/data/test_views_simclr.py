"""SimCLR views: shapes per mode, determinism, seed-point crops through a rotated/flipped affine,
distant negative crops, histogram shift, bad coordinates, an int16 memmap as input."""
import numpy as np
import pytest
import torch

from config import get_defaults
from data.io import BadInputError
from data.views import (SIMCLR_AUGMENT, SimCLRAugment, SimCLRViews, histogram_shift, random_head_voxel,
                        sample_negative_center, views_per_scan, world_to_voxel)

# no randomness in intensity or geometry beyond the crop position: the seed test can look at voxels
PLAIN = SimCLRAugment(flip_p=0.0, intensity_p=0.0, gamma_p=0.0, blur_p=0.0, noise_p=0.0, hist_p=0.0)


def cfg_for(mode: str, crop=(16, 16, 16), scale=(0.3, 1.0), patches: int = 3, aspect: float = 4 / 3):
    cfg = get_defaults()
    cfg.SIMCLR.CROP_ASPECT = aspect
    cfg.SIMCLR.MODE = mode
    cfg.SIMCLR.CROP_SIZE = list(crop)
    cfg.SIMCLR.CROP_SCALE = list(scale)
    cfg.SIMCLR.PATCHES_PER_SCAN = patches
    cfg.DATA.WINDOWS = ["brain", "bone"]
    return cfg


def head(shape=(40, 44, 36)) -> np.ndarray:
    """An ellipsoid 'head' of 30 HU in air, int16."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(g ** 2 for g in grid) < 0.9
    return np.where(inside, 30, -1000).astype(np.int16)


def meta_for(hu, coord=None, affine=None):
    return {"spacing": (1.0, 1.0, 1.0), "affine": np.eye(4) if affine is None else affine, "coord": coord,
            "path": "scan.nii.gz", "id": "scan"}


@pytest.mark.parametrize("mode,views", [("inter", 2), ("intra", 6), ("negative_mined", 4)])
def test_shapes_range_and_determinism(mode, views):
    view = SimCLRViews(cfg_for(mode, crop=(16, 12, 16)))
    hu = head()
    assert view.num_views == views == views_per_scan(mode, 3)
    out = view(hu, meta_for(hu), np.random.default_rng([0, 1, 2]))
    assert set(out) == {"views"}
    x = out["views"]
    assert x.shape == (views, 2, 16, 12, 16) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    again = view(hu, meta_for(hu), np.random.default_rng([0, 1, 2]))["views"]
    assert torch.equal(x, again)  # a pure function of the generator
    other = view(hu, meta_for(hu), np.random.default_rng([0, 2, 2]))["views"]
    assert not torch.equal(x, other)
    assert not torch.equal(x[0], x[1])  # the two views of a pair differ


def test_crop_aspect_sets_how_far_views_are_stretched():
    """SIMCLR.CROP_ASPECT 1: whole-region views of a cube are the cube itself, identical for every
    draw; above 1 the boxes' sides are stretched (and cut to the array) differently per draw."""
    hu = head((32, 32, 32))
    whole = SimCLRViews(cfg_for("inter", scale=(1.0, 1.0), aspect=1.0), augment=PLAIN)
    x = whole(hu, meta_for(hu), np.random.default_rng(0))["views"]
    assert torch.equal(x[0], x[1])
    assert torch.equal(x[0], whole(hu, meta_for(hu), np.random.default_rng(1))["views"][0])
    stretched = SimCLRViews(cfg_for("inter", scale=(1.0, 1.0), aspect=4 / 3), augment=PLAIN)
    y = stretched(hu, meta_for(hu), np.random.default_rng(0))["views"]
    assert not torch.equal(y[0], y[1]) and not torch.equal(y[0], x[0])
    with pytest.raises(ValueError, match="SIMCLR.CROP_ASPECT"):
        SimCLRViews(cfg_for("inter", aspect=0.5))


def test_global_rng_is_untouched():
    np.random.seed(3)
    torch.manual_seed(3)
    a, b = np.random.random(), torch.rand(1)
    np.random.seed(3)
    torch.manual_seed(3)
    SimCLRViews(cfg_for("intra"))(head(), meta_for(None), np.random.default_rng(0))
    assert np.random.random() == a and torch.equal(torch.rand(1), b)


def rotated_affine() -> np.ndarray:
    """Voxel -> world with a 90-degree rotation, a flip, anisotropic spacing and an offset."""
    a = np.zeros((4, 4))
    a[0, 1] = 0.8  # world x grows with voxel j
    a[1, 0] = -1.2  # world y falls with voxel i (flipped)
    a[2, 2] = 2.0
    a[:3, 3] = [-30.0, 55.0, -12.5]
    a[3, 3] = 1.0
    return a


@pytest.mark.parametrize("voxel", [(20, 25, 17), (5, 40, 3)])  # the second near edges: padded with air
def test_seed_point_crop_is_centred_on_the_world_point(voxel):
    affine = rotated_affine()
    hu = head().astype(np.float32)
    hu[voxel] = 3000.0  # a bright marker at the seed
    world = (affine @ np.array([*voxel, 1.0]))[:3]
    np.testing.assert_allclose(world_to_voxel(affine, world), voxel, atol=1e-9)
    crop = (12, 10, 14)
    view = SimCLRViews(cfg_for("negative_mined", crop=crop, scale=(1.0, 1.0), aspect=1.0), augment=PLAIN)
    x = view(hu, meta_for(hu, coord=world, affine=affine), np.random.default_rng(5))["views"]  # [4, C, *crop]
    bone = x[:, 1]
    for v in (0, 1):  # both views of the seed crop: the marker at index crop // 2
        idx = np.unravel_index(int(bone[v].argmax()), crop)
        assert tuple(int(i) for i in idx) == tuple(c // 2 for c in crop)
    assert bone[2:].max() < 0.5  # the negative crop does not contain it


def test_seed_point_outside_the_array_names_the_file():
    hu = head()
    view = SimCLRViews(cfg_for("negative_mined"))
    with pytest.raises(BadInputError, match="scan.nii.gz.*outside the preprocessed array"):
        view(hu, meta_for(hu, coord=np.array([500.0, 0.0, 0.0])), np.random.default_rng(0))


def test_random_seed_inside_head_and_negative_far_away():
    hu = head((48, 48, 48))
    rng = np.random.default_rng(0)
    crop = np.array([12, 12, 12])
    for _ in range(50):
        seed = random_head_voxel(hu, -300.0, rng)
        assert hu[tuple(seed)] > -300
        neg = sample_negative_center(hu.shape, seed, crop, rng, accept=lambda v: hu[tuple(v)] > -300)
        assert (np.abs(neg - seed) >= crop).any()  # the two boxes do not overlap
        assert hu[tuple(neg)] > -300 and (neg >= 0).all() and (neg < 48).all()


def test_negative_center_when_no_disjoint_box_fits():
    neg = sample_negative_center((20, 20, 30), (10, 10, 16), (16, 16, 16), np.random.default_rng(0))
    assert neg[2] == 0  # the far end of the roomiest axis (16 voxels away)


def test_histogram_shift_monotone_with_fixed_ends():
    x = torch.linspace(0, 1, 101).view(1, 1, 1, 101).repeat(2, 1, 1, 1)
    y = histogram_shift(x, 5, np.random.default_rng(1))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y[..., 0].eq(0).all() and y[..., -1].eq(1).all()
    assert (y.diff(dim=-1) >= 0).all()
    assert not torch.allclose(y, x)
    with pytest.raises(ValueError, match="control points"):
        histogram_shift(x, 2, np.random.default_rng(1))


def test_int16_memmap_input(tmp_path):
    path = tmp_path / "vol.npy"
    np.save(path, head())
    mm = np.load(path, mmap_mode="r")
    out = SimCLRViews(cfg_for("intra"))(mm, meta_for(mm), np.random.default_rng(0))
    assert out["views"].shape == (6, 2, 16, 16, 16)


def test_crop_size_defaults_to_roi_and_default_augment():
    cfg = cfg_for("inter", crop=())
    cfg.DATA.ROI = [24, 24, 24]
    view = SimCLRViews(cfg)
    assert view.crop == (24, 24, 24) and view.augment == SIMCLR_AUGMENT
    assert SIMCLR_AUGMENT.flip_axes == (0,)  # left-right only (see the rotation task)
    assert view(head(), None, np.random.default_rng(0))["views"].shape == (2, 2, 24, 24, 24)
