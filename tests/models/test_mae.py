import pytest
import torch

from models.mae import MAEDecoder, patchify, unpatchify


@pytest.mark.parametrize("patch,shape", [((4, 4, 4), (2, 3, 8, 12, 16)), ((2, 4, 8), (1, 1, 4, 8, 16))])
def test_patchify_unpatchify_round_trip(patch, shape):
    x = torch.randn(*shape)
    p = patchify(x, patch)
    grid = tuple(s // q for s, q in zip(shape[2:], patch))
    assert p.shape == (shape[0], grid[0] * grid[1] * grid[2], patch[0] * patch[1] * patch[2] * shape[1])
    assert torch.equal(unpatchify(p, patch, grid, shape[1]), x)


def test_patchify_order_matches_vit_tokens():
    """Patch n is the block at raster position n of the grid (last axis fastest), voxels (pd, ph, pw, C)."""
    x = torch.randn(1, 2, 4, 6, 8)
    p = patchify(x, (2, 3, 4))  # grid (2, 2, 2)
    i, j, k = 1, 0, 1
    n = (i * 2 + j) * 2 + k
    block = x[0, :, 2 * i:2 * i + 2, 3 * j:3 * j + 3, 4 * k:4 * k + 4]  # [C, 2, 3, 4]
    assert torch.equal(p[0, n], block.permute(1, 2, 3, 0).reshape(-1))
    conv = torch.nn.Conv3d(2, 1, kernel_size=(2, 3, 4), stride=(2, 3, 4), bias=False)
    tokens = conv(x).flatten(2)[0, 0]  # the ViT patch embedding's token order
    w = conv.weight[0].permute(1, 2, 3, 0).reshape(-1)
    assert torch.allclose(tokens, p[0] @ w, atol=1e-5)


def test_bad_patch_sizes():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 1, 6, 8, 8), (4, 4, 4))
    with pytest.raises(ValueError, match="do not fit"):
        unpatchify(torch.zeros(1, 7, 64), (4, 4, 4), (2, 2, 2), 1)


def test_decoder_shapes_and_scatter():
    torch.manual_seed(0)
    dec = MAEDecoder(encoder_dim=24, decoder_dim=16, depth=1, num_heads=2, patch_size=(2, 2, 2), in_chans=3,
                     grid=(2, 2, 2))
    keep = torch.tensor([[3, 0], [5, 6]])
    latent = torch.randn(2, 1 + 2, 24)  # CLS + 2 visible tokens
    out = dec(latent, keep, (2, 2, 2), num_prefix_tokens=1)
    assert out.shape == (2, 8, 2 * 2 * 2 * 3)
    out.sum().backward()
    assert dec.mask_token.grad is not None and dec.decoder_embed.weight.grad.abs().sum() > 0
    # another grid gets its own sin-cos table
    assert dec(torch.randn(1, 3, 24), torch.tensor([[0, 9]]), (2, 3, 2), 1).shape == (1, 12, 24)
    assert "pos_embed" not in dec.state_dict()
