"""DINO multi-crop views: counts, sizes, crops from inside the volume (no padded canvas),
determinism by the passed rng only, memmap input, box geometry."""
import numpy as np
import pytest
import torch

from config import get_defaults
from scipy import ndimage

from data.views import (DINO_GLOBAL_AUGMENTS, DINO_LOCAL_AUGMENT, CropAugment, DINOViews, augment_crop,
                        gaussian_blur3, noise_field, resized_crop, sample_crop_box)


def make_cfg(roi=(16, 16, 16), n_local=3, local=(), windows=("brain", "subdural", "bone")):
    cfg = get_defaults()
    cfg.DATA.ROI = list(roi)
    cfg.DATA.WINDOWS = list(windows)
    cfg.DINO.LOCAL_CROPS_NUMBER = n_local
    cfg.DINO.LOCAL_CROP_SIZE = list(local)
    return cfg


def head(shape=(30, 36, 26), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(40, 20, size=shape)).astype(np.int16)


@pytest.mark.parametrize("roi,local,n_local,expect_local", [
    ((16, 16, 16), (), 3, (8, 8, 8)),  # default: half the ROI
    ((16, 24, 16), (8, 8, 8), 2, (8, 8, 8)),
    ((16, 16, 16), (), 0, (8, 8, 8)),
])
def test_counts_sizes_dtype_range(roi, local, n_local, expect_local):
    v = DINOViews(make_cfg(roi, n_local, local))
    out = v(head(), {}, np.random.default_rng(0))
    assert set(out) == {"global", "local"}
    assert out["global"].shape == (2, 3, *roi) and out["global"].dtype == torch.float32
    assert out["local"].shape == (n_local, 3, *expect_local) and out["local"].dtype == torch.float32
    for t in out.values():
        assert torch.isfinite(t).all() and (t.numel() == 0 or (t.min() >= 0 and t.max() <= 1))


def test_collated_shapes():
    from data.datasets import collate
    v = DINOViews(make_cfg())
    batch = collate([{**v(head(), {}, np.random.default_rng(i)), "index": i, "id": str(i)} for i in range(3)])
    assert batch["global"].shape == (3, 2, 3, 16, 16, 16)
    assert batch["local"].shape == (3, 3, 3, 8, 8, 8)


@pytest.mark.parametrize("shape", [(30, 36, 26), (10, 12, 8), (60, 9, 40)])  # larger, smaller than the crops
def test_crops_come_from_inside_the_volume_no_air(shape):
    """A head of constant 40 HU tissue: no crop voxel may hold air (nothing padded)."""
    cfg = make_cfg(n_local=6, windows=("soft_tissue",))  # 40/400: air -> 0, 40 HU -> 0.5
    v = DINOViews(cfg)
    hu = np.full(shape, 40, dtype=np.int16)
    for seed in range(4):
        out = v(hu, {}, np.random.default_rng(seed))
        for t in out.values():
            # 40 HU -> 0.5, moved by intensity, noise and gamma by well under 0.35; air would give 0
            assert t.min() > 0.15 and t.max() < 0.85, (seed, t.min(), t.max())


def test_deterministic_in_the_rng_only():
    v = DINOViews(make_cfg())
    hu = head()
    torch.manual_seed(0)
    np.random.seed(0)
    a = v(hu, {}, np.random.default_rng([0, 1, 2]))
    torch.manual_seed(123)  # the global RNGs play no part
    np.random.seed(123)
    b = v(hu, {}, np.random.default_rng([0, 1, 2]))
    c = v(hu, {}, np.random.default_rng([0, 2, 2]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["global"], c["global"])
    assert not torch.equal(a["global"][0], a["global"][1])  # two different global views


def test_int16_memmap_input(tmp_path):
    hu = head((40, 44, 36))
    np.save(tmp_path / "v.npy", hu)
    mm = np.load(tmp_path / "v.npy", mmap_mode="r")
    v = DINOViews(make_cfg())
    a = v(mm, {}, np.random.default_rng(5))
    b = v(hu, {}, np.random.default_rng(5))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("scale", [(0.05, 0.4), (0.4, 1.0), (1.0, 1.0)])
def test_crop_box_inside_and_volume_fraction(scale):
    shape = (40, 50, 30)
    fracs = []
    for seed in range(200):
        starts, sizes = sample_crop_box(shape, (16, 16, 16), scale, np.random.default_rng(seed))
        for s, n, d in zip(starts, sizes, shape):
            assert 0 <= s and n >= 1 and s + n <= d
        fracs.append(np.prod(sizes) / np.prod(shape))
    fracs = np.array(fracs)
    assert fracs.max() <= scale[1] * 1.25  # rounding only; clipping can only shrink a box
    if scale[1] < 1:
        assert fracs.min() >= scale[0] * 0.75


def test_crop_box_aspect_jitter_is_modest():
    for seed in range(100):
        _, sizes = sample_crop_box((200, 200, 200), (16, 16, 16), (0.1, 0.2), np.random.default_rng(seed))
        assert max(sizes) / min(sizes) <= (4 / 3) ** 2 * 1.05


def test_crop_box_bad_scale():
    with pytest.raises(ValueError, match="crop scale"):
        sample_crop_box((10, 10, 10), (4, 4, 4), (0.5, 0.2), np.random.default_rng(0))


def test_resized_crop_exact_when_same_size_and_flips():
    hu = np.arange(10 * 12 * 14, dtype=np.int16).reshape(10, 12, 14)
    x = resized_crop(hu, (1, 2, 3), (4, 5, 6), (4, 5, 6))
    assert x.dtype == torch.float32 and np.array_equal(x.numpy(), hu[1:5, 2:7, 3:9])
    y = resized_crop(hu, (1, 2, 3), (4, 5, 6), (4, 5, 6), flip_axes=(0,))
    assert np.array_equal(y.numpy(), hu[1:5, 2:7, 3:9][::-1])
    z = resized_crop(hu, (0, 0, 0), (10, 12, 14), (5, 6, 7))  # trilinear down-sampling
    assert tuple(z.shape) == (5, 6, 7) and hu.min() <= z.min() and z.max() <= hu.max()


def test_blur_variance_and_constant_preserved():
    x = torch.zeros(31, 31, 31)
    x[15, 15, 15] = 1.0
    for sigma in (0.3, 0.7, 1.0, 1.6):
        y = gaussian_blur3(x, sigma)
        assert y.sum().item() == pytest.approx(1.0, abs=1e-5)
        prof = y.sum(dim=(1, 2))  # marginal along axis 0
        pos = torch.arange(31.0) - 15
        assert (prof * pos ** 2).sum().item() == pytest.approx(sigma ** 2, rel=1e-4)
        if sigma >= 1.0:  # a sampled Gaussian is only meaningful for sigma >~ 1 voxel
            ref = torch.from_numpy(ndimage.gaussian_filter(x.numpy(), sigma, truncate=4.0))
            assert (y - ref).abs().max() < 0.2 * ref.max()  # binomial ~ Gaussian
    c = torch.full((8, 9, 10), 40.0)
    assert torch.allclose(gaussian_blur3(c, 1.0), c)  # replicated borders: no darkening at the edges


def test_noise_field_is_unit_gaussian_and_rng_driven():
    a = noise_field((20, 21, 22), np.random.default_rng(0))
    b = noise_field((20, 21, 22), np.random.default_rng(0))
    c = noise_field((20, 21, 22), np.random.default_rng(1))
    assert tuple(a.shape) == (20, 21, 22) and torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.mean().item()) < 0.05 and a.std().item() == pytest.approx(1.0, abs=0.05)


def test_augment_identity_and_intensity_by_window_move():
    x = np.linspace(-100, 200, 4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    none = CropAugment(flip_p=0, intensity_p=0, gamma_p=0, blur_p=0, noise_p=0)
    out = augment_crop(torch.from_numpy(x.copy()), [(40.0, 80.0)], none, np.random.default_rng(0))
    assert torch.allclose(out[0], torch.from_numpy(np.clip((x - 0.0) / 80.0, 0, 1)), atol=1e-6)
    # scale/shift applied by moving the window equals windowing a*hu+b
    shift = CropAugment(flip_p=0, intensity_p=1, gamma_p=0, blur_p=0, noise_p=0)
    rng = np.random.default_rng(3)
    out = augment_crop(torch.from_numpy(x.copy()), [(40.0, 80.0)], shift, rng)
    r = np.random.default_rng(3)
    r.random(), r.random()  # blur and noise coins
    r.random()  # intensity coin
    a, b = r.uniform(0.9, 1.1), r.uniform(-10, 10)
    expect = np.clip((a * x + b - 0.0) / 80.0, 0, 1)
    assert np.allclose(out[0].numpy(), expect, atol=1e-5)


def test_global_views_augmented_differently_as_dino():
    assert DINO_GLOBAL_AUGMENTS[0].blur_p == 1.0 and DINO_GLOBAL_AUGMENTS[0].noise_p == 0
    assert DINO_GLOBAL_AUGMENTS[1].blur_p == 0.1 and DINO_GLOBAL_AUGMENTS[1].noise_p > 0
    assert DINO_LOCAL_AUGMENT.blur_p == 0.5


def test_dataset_integration(tmp_path):
    """Through VolumeDataset on a NIfTI file: [(index, epoch)] keys give reproducible samples."""
    nib = pytest.importorskip("nibabel")
    from data.datasets import build_dataset
    hu = np.full((40, 40, 30), -1000, dtype=np.int16)
    hu[8:32, 6:34, 4:26] = 40  # a box-shaped "head"
    nib.save(nib.Nifti1Image(hu, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "a.nii.gz"))
    (tmp_path / "m.csv").write_text("img_path\na.nii.gz\n")
    cfg = make_cfg(windows=("soft_tissue",))
    cfg.DATA.SPACING = [2.0, 2.0, 2.0]
    ds = build_dataset(cfg, str(tmp_path / "m.csv"), DINOViews(cfg))
    a, b, c = ds[(0, 1)], ds[(0, 1)], ds[(0, 2)]
    assert torch.equal(a["global"], b["global"]) and not torch.equal(a["global"], c["global"])
    assert a["global"].shape == (2, 1, 16, 16, 16)


def test_device_stage_gives_the_same_views():
    """Workers stop at resized float16 HU + draws; the batched stage finishes them identically."""
    from data.datasets import collate
    from data.views import dino_batch_transform
    cfg = make_cfg(n_local=4)
    hu = head((30, 36, 26))
    hu[::3] = 300  # some structure, so blur and noise matter
    cpu = DINOViews(cfg)
    dev = DINOViews(cfg, device_stage=True)
    samples = [dev(hu, {}, np.random.default_rng([0, 0, i])) for i in range(4)]
    assert samples[0]["global"].dtype == torch.float16 and samples[0]["global_aug"].shape == (2, 11)
    batch = dev.batch_transform(collate([{**s, "index": i, "id": str(i)} for i, s in enumerate(samples)]))
    assert "global_aug" not in batch and batch["global"].shape == (4, 2, 3, 16, 16, 16)
    for i in range(4):
        ref = cpu(hu, {}, np.random.default_rng([0, 0, i]))
        for k in ("global", "local"):
            assert (batch[k][i] - ref[k]).abs().max() < 2e-3, k  # float16 HU rounding only
    plain = collate([{**cpu(hu, {}, np.random.default_rng(0)), "index": 0, "id": "0"}])
    assert dino_batch_transform(plain, cpu.specs) is plain  # a windowed batch passes through


def test_batched_blur_matches_per_volume_blur():
    x = torch.rand(5, 12, 13, 14)
    sig = torch.tensor([0.0, 0.3, 0.9, 1.2, 0.7])
    y = gaussian_blur3(x, sig)
    for i, s in enumerate(sig.tolist()):
        assert torch.allclose(y[i], gaussian_blur3(x[i], s), atol=1e-6)


def test_views_never_modify_the_input_array():
    cfg = make_cfg(roi=(10, 12, 8), n_local=2)
    hu = np.random.default_rng(0).normal(40, 30, size=(10, 12, 8)).astype(np.float32)  # crop size == array
    before = hu.copy()
    for seed in range(10):
        DINOViews(cfg)(hu, {}, np.random.default_rng(seed))
    assert np.array_equal(hu, before)
