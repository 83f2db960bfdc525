import nibabel as nib
import numpy as np
import pytest
import torch

from config import get_defaults
from data.datasets import build_dataset
from data.views import SingleView, random_flip, window_tensor
from data.windows import window_specs


def cfg_for(roi=(16, 16, 16), fit="crop_pad", windows=("brain", "subdural", "bone")):
    cfg = get_defaults()
    cfg.SEED = 3
    cfg.DATA.ROI = list(roi)
    cfg.DATA.FIT = fit
    cfg.DATA.WINDOWS = list(windows)
    cfg.DATA.SPACING = [2.0, 2.0, 2.0]
    return cfg


def head(shape=(24, 30, 20)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(-1024, 1500, shape).astype(np.int16)


@pytest.mark.parametrize("fit", ["crop_pad", "resize"])
def test_single_view_shape_range_and_dtype(fit):
    cfg = cfg_for(fit=fit)
    for train in (True, False):
        out = SingleView(cfg, train)(head(), {}, np.random.default_rng(0))
        assert set(out) == {"image"}
        x = out["image"]
        assert x.shape == (3, 16, 16, 16) and x.dtype == torch.float32
        assert 0 <= float(x.min()) and float(x.max()) <= 1


def test_eval_is_centred_and_deterministic():
    cfg = cfg_for()
    hu = head()
    view = SingleView(cfg, train=False)
    a = view(hu, {}, np.random.default_rng(0))["image"]
    b = view(hu, {}, np.random.default_rng(99))["image"]
    torch.testing.assert_close(a, b)
    centre = hu[4:20, 7:23, 2:18]  # (24-16)//2, (30-16)//2, (20-16)//2
    torch.testing.assert_close(a, window_tensor(centre, window_specs(cfg.DATA.WINDOWS)))


def test_train_uses_only_the_given_rng():
    cfg = cfg_for()
    hu = head()
    view = SingleView(cfg, train=True)
    np.random.seed(1)
    torch.manual_seed(1)
    a = view(hu, {}, np.random.default_rng([3, 0, 5]))["image"]
    np.random.seed(2)
    torch.manual_seed(2)
    b = view(hu, {}, np.random.default_rng([3, 0, 5]))["image"]
    torch.testing.assert_close(a, b)
    outs = [view(hu, {}, np.random.default_rng(s))["image"] for s in range(8)]
    assert len({o.numpy().tobytes() for o in outs}) > 1  # different draws differ


def test_train_flips_left_right_about_half_the_time():
    hu = np.zeros((4, 4, 4), np.int16)
    hu[0] = 100  # left-most X plane marked
    flips = 0
    for s in range(200):
        out = random_flip(hu, np.random.default_rng(s))
        flips += int(out[3, 0, 0] == 100)
        assert out[0, 0, 0] == 100 or out[3, 0, 0] == 100
    assert 70 < flips < 130


def test_train_crop_is_a_window_of_the_input():
    cfg = cfg_for(windows=("-1024,4096",))  # nearly linear over the whole range: invertible
    hu = np.arange(24 * 30 * 20, dtype=np.float32).reshape(24, 30, 20) % 2000 - 1000
    view = SingleView(cfg, train=True, hu_shift=0.0)
    x = view(hu, {}, np.random.default_rng(5))["image"][0].numpy()
    back = x * 4096 - 1024 - 2048  # invert the window: HU = x * width + centre - width / 2
    found = False
    for flip in (False, True):
        src = hu[::-1] if flip else hu
        for i in range(24 - 16 + 1):
            for j in range(30 - 16 + 1):
                for k in range(20 - 16 + 1):
                    if np.allclose(src[i:i + 16, j:j + 16, k:k + 16], back, atol=0.01):
                        found = True
    assert found


def test_memmap_input_and_dataset_determinism_per_seed_epoch_index(tmp_path):
    rows = []
    for i in range(3):
        grid = np.indices((32, 32, 32), dtype=np.float32)
        r = np.sqrt(sum((g - 15.5) ** 2 for g in grid))
        hu = np.where(r < 12, 40.0, -1000.0).astype(np.float32)
        hu += np.random.default_rng(i).normal(0, 30, hu.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(hu, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / f"c{i}.nii.gz"))
        rows.append(f"c{i}.nii.gz\n")
    (tmp_path / "m.csv").write_text("img_path\n" + "".join(rows))
    cfg = cfg_for()
    ds = build_dataset(cfg, tmp_path / "m.csv", SingleView(cfg, train=True))
    a = ds[(1, 4)]["image"]
    torch.testing.assert_close(a, ds[(1, 4)]["image"])  # same (seed, epoch, index): same sample
    assert not torch.equal(a, ds[(1, 5)]["image"])  # another epoch: another draw
    torch.testing.assert_close(ds[2]["image"], ds[(2, 0)]["image"])  # int key = epoch 0
    cfg2 = cfg_for()
    cfg2.SEED = 4
    ds2 = build_dataset(cfg2, tmp_path / "m.csv", SingleView(cfg2, train=True))
    assert not torch.equal(a, ds2[(1, 4)]["image"])  # another seed: another draw
    # an int16 memmap input gives the same result as the array itself
    hu = head()
    np.save(tmp_path / "h.npy", hu)
    mm = np.load(tmp_path / "h.npy", mmap_mode="r")
    view = SingleView(cfg, train=True)
    torch.testing.assert_close(view(mm, {}, np.random.default_rng(1))["image"],
                               view(hu, {}, np.random.default_rng(1))["image"])
