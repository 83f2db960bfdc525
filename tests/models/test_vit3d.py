import math

import pytest
import torch

from models.pos_embed import grid_to_tokens, sincos_3d
from models.vit3d import VIT_SIZES, VisionTransformer3D, create_vit


def small_vit(**kw) -> VisionTransformer3D:
    args = dict(img_size=32, patch_size=8, in_chans=3, width=48, depth=2, num_heads=3)
    args.update(kw)
    return VisionTransformer3D(**args)


@pytest.mark.parametrize("roi", [(32, 32, 32), (32, 48, 32)])
@pytest.mark.parametrize("pool,regs", [("cls", 0), ("mean", 4), ("cls+mean", 2)])
def test_shapes_two_rois(roi, pool, regs):
    m = small_vit(pool=pool, num_registers=regs)
    x = torch.rand(2, 3, *roi)
    n = math.prod(r // 8 for r in roi)
    tokens = m.forward_features(x)
    assert tokens.shape == (2, 1 + regs + n, 48)
    assert m.num_prefix_tokens == 1 + regs
    out = m(x)
    assert out.shape == (2, m.embed_dim)
    assert m.embed_dim == (96 if pool == "cls+mean" else 48) and m.token_dim == 48
    if pool == "cls+mean":
        assert torch.allclose(out[:, :48], tokens[:, 0])
        assert torch.allclose(out[:, 48:], tokens[:, 1 + regs:].mean(1))


def test_anisotropic_patch():
    m = small_vit(img_size=(16, 32, 32), patch_size=(4, 8, 8))
    assert m.patch_size == (4, 8, 8)
    assert m.grid_size((16, 32, 32)) == (4, 4, 4)
    assert m.forward_features(torch.rand(1, 3, 16, 32, 32)).shape == (1, 65, 48)
    assert m(torch.rand(1, 3, 8, 16, 24)).shape == (1, 48)  # other grid (2, 2, 3), interpolated


def test_gradients_reach_patch_embedding_and_tokens():
    m = small_vit(num_registers=2, pos_embed="learned", pool="cls+mean")
    m(torch.rand(2, 3, 32, 32, 32)).sum().backward()
    for name in ("patch_embed.proj.weight", "cls_token", "reg_tokens", "pos_embed", "blocks.0.attn.qkv.weight"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_sdpa_path_and_drop_path():
    m = small_vit(depth=3, drop_path_rate=0.2)
    assert all(b.attn.fused_attn for b in m.blocks)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in m.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])


def test_pos_embed_fixed_vs_learned_and_interpolation():
    fixed = small_vit()
    assert "pos_embed" not in fixed.state_dict()  # recomputed, never loaded
    assert torch.equal(fixed.pos_embed_tokens((4, 4, 4)), grid_to_tokens(sincos_3d(48, (4, 4, 4))))
    learned = small_vit(pos_embed="learned")
    assert isinstance(learned.pos_embed, torch.nn.Parameter) and "pos_embed" in learned.state_dict()
    assert learned.pos_embed_tokens((4, 4, 4)).data_ptr() == learned.pos_embed.data_ptr()  # same grid: identity
    other = learned.pos_embed_tokens((4, 6, 4))
    assert other.shape == (1, 96, 48)
    assert "pos_embed" in learned.no_weight_decay() and "pos_embed" not in fixed.no_weight_decay()


def test_keep_idx_selects_tokens_after_pos_embed():
    m = small_vit(num_registers=1)
    x = torch.rand(2, 3, 32, 32, 32)
    keep = torch.tensor([[0, 5, 63], [7, 2, 1]])
    full = m.prepare_tokens(x)  # [2, 2 + 64, 48]
    kept = m.prepare_tokens(x, keep_idx=keep)
    assert kept.shape == (2, 2 + 3, 48)
    assert torch.equal(kept[:, :2], full[:, :2])
    assert torch.allclose(kept[:, 2:], torch.gather(full[:, 2:], 1, keep[..., None].expand(-1, -1, 48)))
    assert m.forward_features(x, keep_idx=keep).shape == (2, 5, 48)


def test_mask_token():
    m = small_vit(use_mask_token=True)
    x = torch.rand(2, 3, 32, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :10] = True
    with torch.no_grad():
        m.mask_token.normal_()
    full, masked = m.prepare_tokens(x), m.prepare_tokens(x, mask=mask)
    assert torch.equal(full[:, 11:], masked[:, 11:]) and not torch.allclose(full[:, 1:11], masked[:, 1:11])
    pos = m.pos_embed_tokens((4, 4, 4))
    assert torch.allclose(masked[:, 1:11], (m.mask_token + pos[:, :10]).expand(2, -1, -1))
    assert "mask_token" in m.no_weight_decay()
    with pytest.raises(ValueError, match="use_mask_token"):
        small_vit().forward_features(x, mask=mask)
    with pytest.raises(ValueError, match=r"mask must be \[B, N\]"):
        m.forward_features(x, mask=mask[:, :5])


def test_last_attention_matches_block():
    torch.manual_seed(0)
    m = small_vit(num_registers=2).eval()
    x = torch.rand(2, 3, 32, 32, 32)
    attn = m.last_attention(x)
    assert attn.shape == (2, 3, 67, 67)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 3, 67), atol=1e-5)
    # A @ V through the projection reproduces the (SDPA) attention branch of the last block
    with torch.no_grad():
        t = m.prepare_tokens(x)
        for blk in m.blocks[:-1]:
            t = blk(t)
        last = m.blocks[-1]
        y = last.norm1(t)
        v = last.attn.qkv(y).reshape(2, 67, 3, 3, 16).permute(2, 0, 3, 1, 4)[2]
        manual = last.attn.proj((attn @ v).transpose(1, 2).reshape(2, 67, 48))
        assert torch.allclose(manual, last.attn(y), atol=1e-5)


def test_layer_ids_and_no_weight_decay():
    m = small_vit(depth=3, num_registers=1)
    assert m.num_layers == 3
    assert m.layer_id("cls_token") == 0 and m.layer_id("patch_embed.proj.weight") == 0
    assert m.layer_id("reg_tokens") == 0
    assert m.layer_id("blocks.0.attn.qkv.weight") == 1 and m.layer_id("blocks.2.mlp.fc2.bias") == 3
    assert m.layer_id("norm.weight") == 4
    names = dict(m.named_parameters())
    assert m.no_weight_decay() <= set(names) and m.no_weight_decay() == {"cls_token", "reg_tokens"}


def test_bad_inputs():
    m = small_vit()
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        m(torch.rand(1, 3, 30, 32, 32))
    with pytest.raises(ValueError, match=r"expected input \[B, 3"):
        m(torch.rand(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="pool"):
        small_vit(pool="max")
    with pytest.raises(ValueError, match="patch_size"):
        small_vit(patch_size=(8, 8))
    with pytest.raises(ValueError, match="unknown ViT"):
        create_vit("vit_huge")


def test_named_sizes_and_vit_base_parameter_count():
    assert VIT_SIZES["vit_tiny"] == (192, 12, 3) and VIT_SIZES["vit_large"] == (1024, 24, 16)
    with torch.device("meta"):  # count without allocating or running anything
        base = create_vit("vit_base", img_size=96, patch_size=16, in_chans=3)
    total = sum(p.numel() for p in base.parameters())
    patch = sum(p.numel() for p in base.patch_embed.parameters())
    assert patch == 16 ** 3 * 3 * 768 + 768  # a 3D patch embedding is 16x larger than the 2D one
    assert 85e6 < total - patch < 86e6  # transformer: ~85.1M; with a 2D 16x16x3 patch embed ~85.6M
    assert total == 94_494_720
    assert base.embed_dim == 768 and base.num_layers == 12 and base.blocks[0].attn.num_heads == 12
