"""Alice: block masks, CASA, the loss dict, gradients (student yes, teacher never), EMA, exact
state round trip, centres in eval mode, overfitting one batch, refusal of backbones without tokens."""
import pytest
import torch

from config import get_defaults
from engine.checkpoint import load_state_strict
from engine.optim import param_groups
from methods.alice import Alice, block_patch_mask
from models.alice import CrossAttentionBlock
from models.vit3d import VisionTransformer3D

KEYS = {"loss", "dino_loss", "patch_loss", "recon_loss", "teacher_entropy", "kl", "teacher_temp", "momentum",
        "cross_fraction"}


def tiny_cfg(roi=16, **alice):
    cfg = get_defaults()
    cfg.DATA.ROI = [roi] * 3
    cfg.DATA.WINDOWS = ["brain"]
    cfg.MODEL.PATCH_SIZE = [8, 8, 8]
    cfg.DINO.OUT_DIM = 32
    cfg.DINO.HEAD_HIDDEN_DIM = 16
    cfg.DINO.HEAD_BOTTLENECK_DIM = 8
    cfg.TRAIN.EPOCHS = 3
    cfg.ALICE.DECODER_DIM = 16
    for k, v in alice.items():
        cfg.ALICE[k] = v
    return cfg


def tiny_vit(roi=16, mask_token=False):
    return VisionTransformer3D(img_size=roi, patch_size=8, in_chans=1, width=32, depth=2, num_heads=2,
                               use_mask_token=mask_token)


def tiny_method(seed=0, roi=16, koleo=0.0, **alice):
    torch.manual_seed(seed)
    cfg = tiny_cfg(roi, **alice)
    cfg.DINO.KOLEO_WEIGHT = koleo
    return Alice(cfg, tiny_vit(roi))


def batch(b=3, roi=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {"query": torch.rand(b, 1, roi, roi, roi, generator=gen),
            "anchor": torch.rand(b, 1, roi, roi, roi, generator=gen),
            "cross": torch.tensor([1.0, 0.0, 1.0][:b] + [1.0] * max(0, b - 3))}


# ------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("grid,ratio", [((8, 8, 8), 0.75), ((4, 6, 2), 0.5), ((2, 2, 2), 0.75), ((6, 6, 6), 0.1)])
def test_block_mask_has_the_exact_ratio(grid, ratio):
    n = grid[0] * grid[1] * grid[2]
    m = block_patch_mask(7, grid, ratio, torch.device("cpu"))
    assert m.shape == (7, n) and m.dtype == torch.bool
    assert (m.sum(1) == round(ratio * n)).all()


def _boundary_faces(mask_grid: torch.Tensor) -> torch.Tensor:
    """Faces between a masked and an unmasked neighbour, per sample of ``[B, gd, gh, gw]``."""
    m = mask_grid.int()
    return sum((m.diff(dim=d) != 0).flatten(1).sum(1) for d in (1, 2, 3))


def test_block_masks_are_blocks_not_scattered_patches():
    torch.manual_seed(0)
    grid, ratio, b = (8, 8, 8), 0.5, 16
    blocks = block_patch_mask(b, grid, ratio, torch.device("cpu")).reshape(b, *grid)
    scattered = torch.zeros(b, 512, dtype=torch.bool)
    scattered[torch.arange(b)[:, None], torch.rand(b, 512).argsort(1)[:, :256]] = True
    # cuboids share faces: far fewer masked/visible boundaries than a random mask of the same size
    assert _boundary_faces(blocks).float().mean() < 0.5 * _boundary_faces(scattered.reshape(b, *grid)).float().mean()
    # at a small ratio too, almost every masked patch has a masked face neighbour (a block has >= 2 patches)
    small = block_patch_mask(b, grid, 0.1, torch.device("cpu")).reshape(b, *grid)
    padded = torch.nn.functional.pad(small.float(), (1, 1, 1, 1, 1, 1))
    neighbours = sum(padded.roll(s, d) for d in (1, 2, 3) for s in (1, -1))[:, 1:-1, 1:-1, 1:-1]
    assert ((neighbours > 0) & small).sum() >= 0.9 * small.sum()


def test_block_mask_follows_the_torch_rng():
    torch.manual_seed(3)
    a = block_patch_mask(4, (4, 4, 4), 0.75, torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(a, block_patch_mask(4, (4, 4, 4), 0.75, torch.device("cpu")))


def test_mask_ratio_must_leave_masked_and_visible_patches():
    with pytest.raises(ValueError, match="ALICE.MASK_RATIO"):
        Alice(tiny_cfg(MASK_RATIO=0.99), tiny_vit())


# -------------------------------------------------------------------------------------------- CASA
def test_casa_shapes_and_gradients_reach_query_and_context():
    torch.manual_seed(0)
    casa = CrossAttentionBlock(32, num_heads=4)
    q = torch.randn(2, 5, 32, requires_grad=True)
    kv = torch.randn(2, 7, 32, requires_grad=True)
    out = casa(q, kv)
    assert out.shape == (2, 5, 32)
    out.square().sum().backward()
    assert q.grad.abs().sum() > 0 and kv.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="divisible"):
        CrossAttentionBlock(30, num_heads=4)


def test_casa_output_depends_on_the_other_view():
    torch.manual_seed(0)
    casa = CrossAttentionBlock(16, num_heads=2)
    q = torch.randn(1, 4, 16)
    assert not torch.allclose(casa(q, torch.randn(1, 6, 16)), casa(q, torch.randn(1, 6, 16)))


# ----------------------------------------------------------------------------------------- forward
def test_forward_returns_finite_scalars_with_all_keys():
    m = tiny_method(koleo=0.1)
    m.train()
    m.on_step_start(2, 0, 12)
    out = m(batch())
    assert KEYS | {"koleo"} <= set(out)
    for k, v in out.items():
        v = torch.as_tensor(v)
        assert v.ndim == 0 and torch.isfinite(v), k
    assert out["cross_fraction"] == pytest.approx(2 / 3)
    assert out["teacher_temp"] == m.teacher_temp and out["momentum"] == m.momentum


def test_zero_weights_drop_their_modules_and_keys():
    m = tiny_method(PATCH_WEIGHT=0.0, RECON_WEIGHT=0.0)
    assert not hasattr(m, "casa") and not hasattr(m, "decoder") and "patch_center" not in m.state_dict()
    m.train()
    out = m(batch())
    assert "patch_loss" not in out and "recon_loss" not in out and torch.isfinite(out["loss"])
    out["loss"].backward()  # every trainable parameter takes part (DDP without find_unused_parameters)
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_gradients_reach_every_student_part_and_never_the_teacher():
    m = tiny_method(koleo=0.1)
    m.train()
    m(batch())["loss"].backward()
    for name, p in m.named_parameters():
        if name.startswith("teacher."):
            assert not p.requires_grad and p.grad is None, name
        elif p.requires_grad:  # DINO heads' fixed weight norm has none
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for part in (m.backbone.blocks, m.backbone.patch_embed, m.head, m.casa.q, m.casa.kv, m.patch_head, m.decoder):
        assert any(p.grad.abs().sum() > 0 for p in part.parameters() if p.requires_grad)
    assert m.backbone.mask_token.grad.abs().sum() > 0
    names = [n for g in param_groups(m) for n in g["names"]]
    assert names and not any(n.startswith("teacher.") for n in names)


def test_ema_moves_every_teacher_copy_and_last_layers_freeze():
    m = tiny_method()
    m.train()
    m.on_step_start(0, 0, 12)
    m(batch())["loss"].backward()
    m.on_after_backward(0)  # DINO.FREEZE_LAST_LAYER_EPOCHS = 1
    assert all(p.grad is None for h in (m.head, m.patch_head) for p in h.last_layer.parameters())
    assert any(p.grad is not None for p in m.patch_head.mlp.parameters())
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.5)
    old = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    m.on_step_end(0)
    mom = m.momentum
    for part in ("backbone", "head", "casa", "patch_head"):
        student = dict(getattr(m, part).named_parameters())
        for n, p in m.teacher[part].named_parameters():
            expected = mom * old[f"{part}.{n}"] + (1 - mom) * student[n]
            assert torch.allclose(p, expected, atol=1e-6), f"{part}.{n}"
    assert not torch.equal(m.teacher["casa"].q.weight, old["casa.q.weight"])


def test_loss_falls_when_overfitting_one_batch():
    m = tiny_method(roi=32)
    m.train()
    x = batch(b=4, roi=32)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    losses, kls = [], []
    for it in range(25):
        m.on_step_start(it, 1, 100)  # epoch 1: last layers free
        out = m(x)
        opt.zero_grad()
        out["loss"].backward()
        m.on_after_backward(1)
        opt.step()
        m.on_step_end(it)
        losses.append(float(out["loss"].detach()))
        kls.append(float(out["kl"]))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses
    # the student fits the moving teacher: KL falls (on one fixed batch the centre later lifts the
    # teacher's entropy, and with it the cross-entropy, so longer runs are not monotone)
    assert sum(kls[-4:]) / 4 < 0.5 * sum(kls[1:5]) / 4, kls


# ---------------------------------------------------------------------------------- state, centres
def test_state_round_trip_gives_identical_outputs(tmp_path):
    from models.zoo import load_pretrained
    m = tiny_method()
    m.train()
    m.on_step_start(3, 0, 12)
    m(batch())["loss"].backward()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1)  # student != teacher
    sd = m.state_dict()
    expected = {"center", "patch_center", "center_ready", "backbone.mask_token", "teacher.backbone.mask_token"}
    assert expected <= set(sd) and bool(sd["center_ready"])
    for prefix in ("head.", "casa.", "patch_head.", "decoder.", "teacher.backbone.", "teacher.head.",
                   "teacher.casa.", "teacher.patch_head."):
        assert any(k.startswith(prefix) for k in sd), prefix
    fresh = tiny_method(seed=7)
    load_state_strict(fresh, sd, "test")
    fresh.on_step_start(3, 0, 12)
    fresh.train()
    torch.manual_seed(11)
    a = m(batch(seed=2))
    torch.manual_seed(11)
    b = fresh(batch(seed=2))
    for k in a:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
    assert torch.equal(m.center, fresh.center) and torch.equal(m.patch_center, fresh.patch_center)
    # backbone.pth (the teacher, with its mask token) loads into a ViT built without one
    bb = m.exported_backbone()
    assert bb is m.teacher["backbone"]
    path = tmp_path / "backbone.pth"
    torch.save(bb.state_dict(), path)
    report = load_pretrained(tiny_vit(), str(path), min_fraction=1.0)
    assert report["fraction"] == 1.0 and report["unexpected"] == ["mask_token"]


def test_centres_move_in_training_only():
    m = tiny_method()
    m.eval()
    with torch.no_grad():
        m(batch())
    assert not m.center.any() and not m.patch_center.any() and not bool(m.center_ready)
    m.train()
    with torch.no_grad():
        m(batch())
    assert m.center.abs().sum() > 0 and m.patch_center.abs().sum() > 0 and bool(m.center_ready)
    c, pc = m.center.clone(), m.patch_center.clone()
    m.eval()
    with torch.no_grad():
        m(batch(seed=3))
    assert torch.equal(m.center, c) and torch.equal(m.patch_center, pc)


def test_first_training_step_sets_the_centre_to_the_teacher_mean():
    m = tiny_method()
    m.train()
    x = batch()
    with torch.no_grad():
        m(x)
        t = m.teacher["head"](m.teacher["backbone"](torch.cat([x["query"], x["anchor"]])))
    assert torch.allclose(m.center, t.mean(0, keepdim=True), atol=1e-6)


# ------------------------------------------------------------------------------------------ refusal
def test_cnn_backbone_is_refused_naming_it():
    from models.zoo import build_backbone
    cfg = tiny_cfg()
    cfg.MODEL.NAME = "resnet18"
    cfg.MODEL.FEATURE_SIZE = 8
    with pytest.raises(ValueError, match="resnet18.*no tokens"):
        Alice(cfg, build_backbone(cfg))


# ------------------------------------------------------------------------------------------- Swin
def tiny_swin_method(seed=0, roi=64):
    from models.monai_backbones import SwinEncoder
    torch.manual_seed(seed)
    cfg = tiny_cfg(roi)
    cfg.MODEL.NAME = "swin"
    return Alice(cfg, SwinEncoder(1, feature_size=12))


def test_swin_masks_its_blocks_and_trains_every_part():
    m = tiny_swin_method()
    m.train()
    assert tuple(m.backbone.mask_token.shape) == (1, 12, 1, 1, 1) and m.patch_size == (32, 32, 32)
    out = m(batch(2, roi=64))
    assert KEYS - {"cross_fraction"} <= set(out) and all(torch.isfinite(torch.as_tensor(v)) for v in out.values())
    out["loss"].backward()
    for name in ("backbone.mask_token", "casa.q.weight", "decoder.pred.weight", "head.mlp.0.weight"):
        p = dict(m.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in m.teacher.parameters())
    # the decoder predicts a masked 32^3 block at 8^3 per channel
    assert m.decoder.pred.out_features == 8 ** 3 * 1


def test_swin_masked_forward_hides_the_masked_blocks():
    from models.monai_backbones import SwinEncoder
    torch.manual_seed(0)
    enc = SwinEncoder(1, feature_size=12).eval()
    x = torch.rand(1, 1, 64, 64, 64)
    plain = enc.forward_tokens(x)  # [1, 8, 192]
    enc.mask_token = torch.nn.Parameter(torch.zeros(1, 12, 1, 1, 1))
    none = torch.zeros(1, 8, dtype=torch.bool)
    assert torch.equal(enc.forward_tokens(x, none), plain)  # no mask: the usual forward exactly
    mask = none.clone()
    mask[0, 0] = True  # hide block (0, 0, 0), the first 32^3 corner
    y = x.clone()
    y[..., :32, :32, :32] = torch.rand(32, 32, 32)  # change only what the mask hides
    assert torch.allclose(enc.forward_tokens(x, mask), enc.forward_tokens(y, mask), atol=1e-6)


def test_swin_backbone_pth_loads_into_a_swin_without_mask_token(tmp_path):
    from models.monai_backbones import SwinEncoder
    from models.zoo import load_pretrained
    m = tiny_swin_method()
    torch.save(m.exported_backbone().state_dict(), tmp_path / "backbone.pth")
    report = load_pretrained(SwinEncoder(1, feature_size=12), str(tmp_path / "backbone.pth"), min_fraction=1.0)
    assert report["fraction"] == 1.0 and "mask_token" in str(report["unexpected"])


def test_swin_roi_not_divisible_by_32_names_data_roi():
    from models.monai_backbones import SwinEncoder
    cfg = tiny_cfg(48)
    cfg.MODEL.NAME = "swin"
    with pytest.raises(ValueError, match=r"DATA.ROI = \[48, 48, 48\].*divisible by 32"):
        Alice(cfg, SwinEncoder(1, feature_size=12))


def test_bad_batch_shapes_are_refused():
    m = tiny_method()
    x = batch()
    x["anchor"] = x["anchor"][:, :, :8]
    with pytest.raises(ValueError, match="query.*anchor"):
        m(x)
