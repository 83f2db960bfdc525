import numpy as np
import pytest
import torch
from monai.transforms import Compose, MapTransform, Transform

from data.windows import WINDOW_PRESETS, ApplyWindows, ApplyWindowsd, apply_windows, window_specs


def test_presets_and_custom_specs():
    assert WINDOW_PRESETS == {"brain": (40.0, 80.0), "subdural": (80.0, 200.0), "stroke": (40.0, 40.0),
                              "bone": (600.0, 2800.0), "soft_tissue": (40.0, 400.0)}
    assert window_specs(["brain", "35,70", (10, 20)]) == [(40.0, 80.0), (35.0, 70.0), (10.0, 20.0)]
    for bad in (["brian"], ["40"], ["40,0"], ["40,-5"], [(1, 2, 3)], []):
        with pytest.raises(ValueError):
            window_specs(bad)


def test_exact_values_for_a_few_hu():
    hu = np.array([-1024, -100, 0, 20, 40, 60, 80, 600, 2000, 3000], dtype=np.int16)
    out = apply_windows(hu, window_specs(["brain", "bone", "stroke"]))
    assert out.shape == (3, 10) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], [0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1, 1], atol=1e-7)  # 0..80 HU
    bone = [0, 0.25, 800 / 2800, 820 / 2800, 840 / 2800, 860 / 2800, 880 / 2800, 0.5, 1.0, 1.0]
    np.testing.assert_allclose(out[1], bone, atol=1e-6)  # -800..2000 HU
    np.testing.assert_allclose(out[2], [0, 0, 0, 0, 0.5, 1, 1, 1, 1, 1], atol=1e-7)  # 20..60 HU


def test_numpy_shape_and_int16_memmap_input(tmp_path):
    hu = np.random.default_rng(0).integers(-1024, 2000, (5, 6, 7)).astype(np.int16)
    np.save(tmp_path / "a.npy", hu)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    out = apply_windows(mm[1:4], window_specs(["brain", "subdural"]))
    assert out.shape == (2, 3, 6, 7)
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out, apply_windows(hu[1:4].astype(np.float32), window_specs(["brain", "subdural"])))


def test_torch_batched_matches_numpy():
    specs = window_specs(["brain", "subdural", "bone"])
    hu = torch.randint(-1024, 3000, (2, 1, 4, 5, 6)).float()  # [B, 1, D, H, W]
    out = apply_windows(hu, specs)
    assert out.shape == (2, 3, 4, 5, 6) and out.dtype == torch.float32
    for b in range(2):
        np.testing.assert_allclose(out[b].numpy(), apply_windows(hu[b, 0].numpy(), specs), atol=1e-6)
    single = apply_windows(hu[0], specs)  # [1, D, H, W] -> [C, D, H, W]
    assert single.shape == (3, 4, 5, 6)
    torch.testing.assert_close(single, out[0])
    assert apply_windows(hu[0, 0].to(torch.int16), specs).shape == (3, 4, 5, 6)
    with pytest.raises(ValueError):
        apply_windows(torch.zeros(2, 2, 4, 4, 4), specs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_torch_on_gpu():
    specs = window_specs(["brain", "bone"])
    hu = torch.randint(-1024, 3000, (2, 1, 8, 8, 8), device="cuda").float()
    out = apply_windows(hu, specs)
    assert out.device.type == "cuda" and out.shape == (2, 2, 8, 8, 8)
    torch.testing.assert_close(out.cpu(), apply_windows(hu.cpu(), specs))


def test_monai_array_and_dict_transforms():
    assert isinstance(ApplyWindows(["brain"]), Transform)
    assert isinstance(ApplyWindowsd("image", ["brain"]), MapTransform)
    hu = np.array([[[0, 40, 80]]], dtype=np.float32)  # [1, 1, 3]
    t = Compose([ApplyWindowsd(keys="image", windows=["brain", "40,40"])])
    d = t({"image": hu, "other": 1})
    assert d["other"] == 1 and d["image"].shape == (2, 1, 1, 3)
    np.testing.assert_allclose(d["image"][0, 0, 0], [0, 0.5, 1])
    np.testing.assert_allclose(d["image"][1, 0, 0], [0, 0.5, 1])
    np.testing.assert_allclose(ApplyWindows(["brain"])(hu), d["image"][:1])
    assert ApplyWindowsd("x", ["brain"], allow_missing_keys=True)({"image": hu})["image"] is hu
