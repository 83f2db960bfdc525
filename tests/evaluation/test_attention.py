"""Tests of evaluation/attention.py: CLS attention maps, upsampling, PCA colours, slice overlays."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from evaluation.attention import (attention_maps, cls_attention, default_slices, normalize_maps,  # noqa: E402
                                  overlay_attention, overlay_slices, slice_2d, token_pca_rgb, upsample)
from models.vit3d import VisionTransformer3D  # noqa: E402


@pytest.fixture(scope="module")
def vit() -> VisionTransformer3D:
    torch.manual_seed(0)
    return VisionTransformer3D(img_size=(16, 16, 24), patch_size=8, in_chans=2, width=32, depth=2, num_heads=4,
                               num_registers=2).eval()


def test_cls_attention_excludes_registers_and_matches_last_attention(vit) -> None:
    x = torch.rand(2, 2, 16, 16, 24)
    maps = cls_attention(vit, x)
    assert maps.shape == (2, 4, 2, 2, 3)
    full = vit.last_attention(x)  # [B, heads, 1 + 2 + 12, T]
    np.testing.assert_allclose(maps.reshape(2, 4, -1), full[:, :, 0, 3:], rtol=1e-6)
    # the CLS row sums to 1 over CLS + registers + patches: the maps hold the patch part only
    total = maps.sum(dim=(2, 3, 4)) + full[:, :, 0, :3].sum(-1)
    np.testing.assert_allclose(total, torch.ones(2, 4), rtol=1e-5)
    # raster order: patch n of the flattened grid sits at (n // (gh*gw), (n // gw) % gh, n % gw)
    assert maps[1, 2, 1, 0, 2] == full[1, 2, 0, 3 + 1 * 6 + 0 * 3 + 2]


def test_attention_maps_upsampled_to_input_size(vit) -> None:
    x = torch.rand(1, 2, 16, 16, 24)
    up = attention_maps(vit, x)
    assert up.shape == (1, 4, 16, 16, 24)
    grid = cls_attention(vit, x)
    # trilinear with align_corners=False keeps the range and the mean of a patch-constant map closely
    assert up.min() >= grid.min() - 1e-6 and up.max() <= grid.max() + 1e-6
    norm = attention_maps(vit, x, normalize=True)
    assert norm.amin(dim=(2, 3, 4)).allclose(torch.zeros(1, 4)) and norm.amax(dim=(2, 3, 4)).allclose(torch.ones(1, 4))
    assert attention_maps(vit, x, upsampled=False).shape == (1, 4, 2, 2, 3)


def test_attention_needs_a_vit() -> None:
    with pytest.raises(ValueError, match="ViT"):
        cls_attention(torch.nn.Conv3d(2, 4, 3), torch.rand(1, 2, 8, 8, 8))


def test_upsample_and_normalize() -> None:
    const = torch.full((3, 2, 2, 2), 5.0)
    np.testing.assert_allclose(upsample(const, (6, 4, 8)), torch.full((3, 6, 4, 8), 5.0))
    near = upsample(np.arange(8, dtype=np.float32).reshape(2, 2, 2), (4, 4, 4), mode="nearest")
    assert near[0, 0, 0] == 0 and near[3, 3, 3] == 7
    n = normalize_maps(torch.tensor([[[[2.0, 4.0]]], [[[1.0, 1.0]]]]))
    np.testing.assert_allclose(n.reshape(2, 2), [[0, 1], [0, 0]])


def test_token_pca_rgb() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(24, 16))
    tokens[:12] += 5.0  # two clusters: the first component separates them
    rgb = token_pca_rgb(tokens, grid=(2, 3, 4))
    assert rgb.shape == (2, 3, 4, 3) and rgb.dtype == np.float32 and 0 <= rgb.min() and rgb.max() <= 1
    first = rgb.reshape(24, 3)[:, 0]
    assert abs(first[:12].mean() - first[12:].mean()) > 0.5
    shared = token_pca_rgb(np.stack([tokens, tokens + 0.1]))  # one basis for several scans
    assert shared.shape == (2, 24, 3)
    with pytest.raises(ValueError, match="grid"):
        token_pca_rgb(tokens, grid=(2, 2, 2))


def test_slice_orientation() -> None:
    v = np.zeros((4, 5, 6))
    v[3, 4, 2] = 1  # far right (high x), anterior (high y)
    ax = slice_2d(v, 2, 2)
    assert ax.shape == (5, 4) and ax[4, 3] == 1  # origin='lower': row 4 is the top, column 3 the right
    assert slice_2d(v, 0, 3).shape == (6, 5) and slice_2d(v, 1, 4).shape == (6, 4)
    with pytest.raises(ValueError):
        slice_2d(v, 3, 0)
    assert default_slices(10, 3) == [2, 4, 7]


def test_overlays_return_figures() -> None:
    img = np.random.default_rng(0).random((8, 8, 8))
    masks = np.zeros((2, 8, 8, 8))
    masks[0, 2:4, 2:4, 2:4] = 1
    fig = overlay_slices(img, masks, axis=2, slices=[2, 3, 5], hide_below=0, row_titles=["a", "b"])
    assert len(fig.axes) == 6
    rgb = np.random.default_rng(1).random((8, 8, 8, 3))
    assert len(overlay_slices(img, rgb, axis=1).axes) == 5
    fig2 = overlay_attention(np.stack([img, img]), np.random.default_rng(2).random((3, 8, 8, 8)), slices=[1, 4])
    assert len(fig2.axes) == (3 + 1) * 2
    with pytest.raises(ValueError, match="does not match"):
        overlay_slices(img, np.zeros((7, 8, 8)))
    plt.close("all")
