import numpy as np
import pytest
import torch

from models.pos_embed import _axis_dims, grid_to_tokens, resize_pos_embed, sincos_1d, sincos_3d, tokens_to_grid


def test_axis_dims_split_even_and_complete():
    assert _axis_dims(768) == [256, 256, 256]
    assert _axis_dims(1024) == [342, 342, 340]
    assert _axis_dims(192) == [64, 64, 64]
    for bad in (7, 4):
        with pytest.raises(ValueError, match="even embed_dim"):
            _axis_dims(bad)


def test_sincos_3d_shape_values_and_axis_separation():
    pe = sincos_3d(48, (2, 3, 4))
    assert pe.shape == (1, 48, 2, 3, 4) and pe.dtype == torch.float32
    assert pe.abs().max() <= 1.0
    tok = grid_to_tokens(pe)[0]  # [24, 48]
    assert torch.unique(tok, dim=0).shape[0] == 24  # every position distinct
    # moving along the last axis changes only that axis' channel slice
    diff = (pe[0, :, 0, 0, 1] - pe[0, :, 0, 0, 0]).abs()
    assert diff[:32].max() == 0 and diff[32:].max() > 0
    # raster order: token index = (i * gh + j) * gw + k
    assert torch.equal(tok[(1 * 3 + 2) * 4 + 3], pe[0, :, 1, 2, 3])


def test_sincos_1d_matches_formula():
    emb = sincos_1d(4, torch.tensor([0.0, 2.0]))
    omega = torch.tensor([1.0, 1.0 / 100.0])
    expect = torch.cat([torch.sin(2.0 * omega), torch.cos(2.0 * omega)])
    assert torch.allclose(emb[1], expect)
    assert torch.allclose(emb[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_resize_identity_on_same_grid():
    pe = torch.randn(1, 12, 2, 3, 4, requires_grad=True)
    assert resize_pos_embed(pe, (2, 3, 4)) is pe


def ramp(grid, slopes, offsets):
    """``[1, C, gd, gh, gw]``: channel c = offsets[c] + slopes[c] . (i, j, k), a linear ramp over the grid."""
    i, j, k = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij")
    return torch.stack([o + a * i + b * j + c * k for (a, b, c), o in zip(slopes, offsets)])[None].float()


def source_coordinate(n_in, n_out):
    """Where output cell o samples the input axis with align_corners=False: cell centres on one extent,
    ``(o + 0.5) * n_in / n_out - 0.5``, held inside ``[0, n_in - 1]`` at the borders."""
    return np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)


SLOPES = [(1.0, 0.0, 0.0), (0.0, -2.0, 0.0), (0.0, 0.0, 0.5), (0.3, -1.1, 2.0)]  # one axis each, then all
OFFSETS = [0.0, 1.0, -3.0, 0.25]


@pytest.mark.parametrize("src,dst", [((4, 4, 4), (4, 6, 8)), ((8, 6, 4), (4, 3, 2)), ((2, 3, 5), (7, 5, 3)),
                                     ((1, 4, 2), (3, 4, 6))])
def test_resize_of_a_linear_ramp_is_the_ramp_at_the_source_coordinates(src, dst):
    out = resize_pos_embed(ramp(src, SLOPES, OFFSETS), dst)
    assert out.shape == (1, len(SLOPES), *dst) and out.dtype == torch.float32
    x = [source_coordinate(n, m) for n, m in zip(src, dst)]
    gi, gj, gk = np.meshgrid(*x, indexing="ij")
    for c, ((a, b, d), o) in enumerate(zip(SLOPES, OFFSETS)):
        want = o + a * gi + b * gj + d * gk  # trilinear interpolation reproduces a linear function exactly
        np.testing.assert_allclose(out[0, c].numpy(), want, rtol=0, atol=1e-5)


def test_resize_upsamples_on_cell_centres_not_corners():
    # 0..3 on 4 cells -> 8 cells: centres at o/2 - 1/4, the ends held at 0 and 3 (align_corners=True
    # would give 0, 3/7, 6/7, ..., 3 instead)
    out = resize_pos_embed(ramp((1, 1, 4), [(0.0, 0.0, 1.0)], [0.0]), (1, 1, 8))
    np.testing.assert_allclose(out[0, 0, 0, 0].numpy(), [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3], atol=1e-6)
    # halving averages neighbouring pairs: 0..7 -> 0.5, 2.5, 4.5, 6.5
    out = resize_pos_embed(ramp((8, 1, 1), [(1.0, 0.0, 0.0)], [0.0]), (4, 1, 1))
    np.testing.assert_allclose(out[0, 0, :, 0, 0].numpy(), [0.5, 2.5, 4.5, 6.5], atol=1e-6)
    half = resize_pos_embed(ramp((4, 4, 4), SLOPES, OFFSETS).to(torch.bfloat16), (2, 2, 2))
    assert half.dtype == torch.bfloat16


def test_resize_of_sincos_is_a_convex_combination_per_channel():
    pe = sincos_3d(48, (4, 4, 4))
    up = resize_pos_embed(pe, (4, 6, 8))
    lo = pe.amin(dim=(2, 3, 4), keepdim=True)
    hi = pe.amax(dim=(2, 3, 4), keepdim=True)
    assert (up >= lo - 1e-6).all() and (up <= hi + 1e-6).all()


def test_tokens_to_grid_drops_cls_and_infers_cube():
    pe = sincos_3d(12, (3, 3, 3))
    tokens = torch.cat([torch.zeros(1, 1, 12), grid_to_tokens(pe)], dim=1)  # MAE-style [1, 1+N, D]
    assert torch.equal(tokens_to_grid(tokens), pe)
    assert torch.equal(tokens_to_grid(grid_to_tokens(pe)[0]), pe)
    aniso = sincos_3d(12, (2, 3, 4))
    assert torch.equal(tokens_to_grid(grid_to_tokens(aniso), grid=(2, 3, 4)), aniso)
    with pytest.raises(ValueError, match="cannot infer a 3D grid"):
        tokens_to_grid(grid_to_tokens(aniso))
