import pytest
import torch

from config import get_defaults
from methods.mae import MAE, mae_loss, normalize_patches, num_visible, random_masking
from models.mae import patchify
from models.vit3d import VisionTransformer3D


def tiny_cfg(mask_ratio=0.75, norm_pix=True):
    cfg = get_defaults()
    cfg.DATA.ROI = [16, 16, 16]
    cfg.MODEL.PATCH_SIZE = [4, 4, 4]
    cfg.MAE.MASK_RATIO = mask_ratio
    cfg.MAE.NORM_PIX_LOSS = norm_pix
    cfg.MAE.DECODER_DIM = 24
    cfg.MAE.DECODER_DEPTH = 1
    cfg.MAE.DECODER_NUM_HEADS = 2
    return cfg


def tiny_mae(**kw) -> MAE:
    vit = VisionTransformer3D(img_size=16, patch_size=4, in_chans=3, width=48, depth=2, num_heads=3,
                              num_registers=kw.pop("num_registers", 0))
    return MAE(tiny_cfg(**kw), vit)


@pytest.mark.parametrize("n,ratio,keep", [(8, 0.75, 2), (64, 0.9, 6), (64, 0.75, 16), (27, 0.5, 14)])
def test_num_visible(n, ratio, keep):
    assert num_visible(n, ratio) == keep == round((1 - ratio) * n)


def test_random_masking_per_sample():
    torch.manual_seed(0)
    keep, mask = random_masking(4, 64, 0.75, torch.device("cpu"))
    assert keep.shape == (4, 16) and mask.shape == (4, 64) and mask.dtype == torch.bool
    assert (mask.sum(1) == 48).all()
    assert not mask.gather(1, keep).any()  # kept = not masked
    assert len({tuple(sorted(k.tolist())) for k in keep}) == 4  # differs per sample
    torch.manual_seed(0)
    assert torch.equal(random_masking(4, 64, 0.75, torch.device("cpu"))[0], keep)  # torch RNG decides
    with pytest.raises(ValueError, match="MAE.MASK_RATIO"):
        random_masking(1, 8, 0.99, torch.device("cpu"))


def test_encoder_sees_only_visible_tokens():
    mae = tiny_mae(num_registers=2)
    seen = []
    orig = mae.backbone.forward_features  # the MAE calls forward_features, not forward: wrap it

    def spy(x, keep_idx=None, mask=None):
        out = orig(x, keep_idx=keep_idx, mask=mask)
        seen.append(out.shape)
        return out

    mae.backbone.forward_features = spy
    out = mae({"image": torch.rand(3, 3, 16, 16, 16)})
    assert seen == [(3, 1 + 2 + 16, 48)]  # CLS + registers + round(0.25 * 64) visible patches
    assert out["mask_ratio"] == pytest.approx(0.75) and out["loss"].ndim == 0


def test_loss_ignores_visible_patches():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 10, 12), torch.randn(2, 10, 12)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 3:] = True
    perturbed = pred.clone()
    perturbed[~mask] += 100.0
    for norm in (True, False):
        assert torch.equal(mae_loss(pred, target, mask, norm), mae_loss(perturbed, target, mask, norm))
    changed = pred.clone()
    changed[mask] += 1.0
    assert not torch.equal(mae_loss(pred, target, mask, False), mae_loss(changed, target, mask, False))
    # mean over masked patches only
    expect = (pred - target).pow(2).mean(-1)[mask].mean()
    assert torch.allclose(mae_loss(pred, target, mask, False), expect)


def test_norm_pix_loss():
    torch.manual_seed(0)
    target = torch.randn(2, 5, 16) * 3 + 7
    normed = normalize_patches(target)
    assert torch.allclose(normed.mean(-1), torch.zeros(2, 5), atol=1e-5)
    assert torch.allclose(normed.var(-1), torch.ones(2, 5), atol=1e-4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert mae_loss(normed, target, mask, True) < 1e-8
    # invariant to a per-patch affine change of intensity
    assert torch.allclose(mae_loss(normed, 5 * target - 2, mask, True), torch.tensor(0.0), atol=1e-6)
    assert mae_loss(normed, target, mask, False) > 1.0


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    mae = tiny_mae(norm_pix=False)
    x = torch.rand(2, 3, 16, 16, 16)
    opt = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        torch.manual_seed(1)  # same mask every step: a pure fitting problem
        loss = mae({"image": x})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert mae.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_visualize_images_and_rng_untouched():
    mae = tiny_mae()
    x = torch.rand(2, 3, 16, 16, 16)
    mae.train()
    state = torch.get_rng_state()
    imgs = mae.reconstruct(x)
    assert torch.equal(torch.get_rng_state(), state) and mae.training
    assert set(imgs) == {"input", "masked", "reconstruction"}
    for img in imgs.values():
        assert img.shape == (1, 16, 16) and img.min() >= 0 and img.max() <= 1
    assert torch.equal(imgs["input"][0], x[0, 0, :, :, 8].t().flip(0))
    assert (imgs["masked"] == 0).float().mean() > 0.5  # 75% of patches blanked
    panel = mae.visualize({"image": x})["mae/reconstruction"]
    assert mae.vis_every == 5  # MAE.VIS_EVERY, read by the trainer
    assert panel.shape == (1, 16, 3 * 16 + 4)
    # reconstruction keeps the visible patches of the input
    vis = imgs["masked"] != 0
    assert torch.allclose(imgs["reconstruction"][vis], imgs["input"][vis])


def test_bad_configs():
    cfg = tiny_cfg(mask_ratio=1.0)
    vit = VisionTransformer3D(img_size=16, patch_size=4, in_chans=3, width=48, depth=1, num_heads=3)
    with pytest.raises(ValueError, match="MAE.MASK_RATIO"):
        MAE(cfg, vit)
    with pytest.raises(ValueError, match="ViT backbone"):
        MAE(tiny_cfg(), torch.nn.Linear(2, 2))
    mae = MAE(tiny_cfg(), vit)
    with pytest.raises(ValueError, match=r"\[B, C, D, H, W\]"):
        mae({"image": torch.rand(3, 16, 16, 16)})
    assert patchify(torch.rand(1, 3, 16, 16, 16), mae.backbone.patch_size).shape == (1, 64, 192)
