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


def test_resize_smooth_on_other_grid():
    pe = sincos_3d(48, (4, 4, 4))
    up = resize_pos_embed(pe, (4, 6, 8))
    assert up.shape == (1, 48, 4, 6, 8)
    # trilinear: a convex combination of source values, per channel
    lo = pe.amin(dim=(2, 3, 4), keepdim=True)
    hi = pe.amax(dim=(2, 3, 4), keepdim=True)
    assert (up >= lo - 1e-6).all() and (up <= hi + 1e-6).all()
    # smooth: neighbouring steps no larger than on the coarser source grid
    step_src = (pe[..., 1:] - pe[..., :-1]).abs().max()
    step_up = (up[..., 1:] - up[..., :-1]).abs().max()
    assert step_up <= step_src + 1e-6
    # back to the source grid stays close
    back = resize_pos_embed(resize_pos_embed(pe, (8, 8, 8)), (4, 4, 4))
    assert (back - pe).abs().max() < 0.2


def test_tokens_to_grid_drops_cls_and_infers_cube():
    pe = sincos_3d(12, (3, 3, 3))
    tokens = torch.cat([torch.zeros(1, 1, 12), grid_to_tokens(pe)], dim=1)  # MAE-style [1, 1+N, D]
    assert torch.equal(tokens_to_grid(tokens), pe)
    assert torch.equal(tokens_to_grid(grid_to_tokens(pe)[0]), pe)
    aniso = sincos_3d(12, (2, 3, 4))
    assert torch.equal(tokens_to_grid(grid_to_tokens(aniso), grid=(2, 3, 4)), aniso)
    with pytest.raises(ValueError, match="cannot infer a 3D grid"):
        tokens_to_grid(grid_to_tokens(aniso))
