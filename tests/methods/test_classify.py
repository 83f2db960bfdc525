"""methods/classify.py: masked loss, pos_weight, frozen backbone (bit-identical, BatchNorm stats),
lr scales, heads, batch of one."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from config import get_defaults
from engine.optim import build_optimizer, param_groups
from methods.classify import (Classifier, FrozenBackboneError, backbone_checksum, build_classifier,
                              compute_pos_weight, masked_bce)
from models.zoo import build_backbone


def tiny_cfg(name="vit_tiny", roi=16, chans=1, **downstream):
    cfg = get_defaults()
    cfg.MODEL.NAME = name
    cfg.MODEL.PATCH_SIZE = [8, 8, 8]
    cfg.MODEL.FEATURE_SIZE = 8
    cfg.DATA.ROI = [roi] * 3
    cfg.DATA.WINDOWS = ["brain"] * chans
    for k, v in downstream.items():
        cfg.DOWNSTREAM[k] = v
    return cfg


def backbone(name="vit_tiny", roi=16):
    torch.manual_seed(0)
    return build_backbone(tiny_cfg(name, roi))


def batch(n=4, roi=16, labels=((1.0,), (0.0,), (1.0,), (0.0,))):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(n, 1, roi, roi, roi, generator=g), "label": torch.tensor(labels[:n])}


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_steps(method, steps=3, n=4, roi=16, labels=((1.0,), (0.0,), (1.0,), (0.0,))):
    opt = build_optimizer(tiny_cfg(), param_groups(method, 1.0, method.lr_scales()))
    method.train()
    for _ in range(steps):
        out = method(batch(n, roi, labels))
        out["loss"].backward()
        method.on_after_backward(0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_step_start(0, 0, steps)
    return out


# ------------------------------------------------------------------ loss
def test_masked_bce_ignores_blank_entries_and_uses_pos_weight():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0], [-2.0, 0.0]], requires_grad=True)
    target = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [float("nan"), 0.0]])
    known = ~torch.isnan(target)
    ref = nn.functional.binary_cross_entropy_with_logits(logits[known], target[known])
    assert torch.allclose(masked_bce(logits, target), ref)
    pw = torch.tensor([3.0, 1.0])
    per = nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(target), pos_weight=pw, reduction="none")
    assert torch.allclose(masked_bce(logits, target, pw), per[known].mean())
    assert masked_bce(logits, target, pw) > masked_bce(logits, target)  # positives weigh more
    blank = masked_bce(logits, torch.full_like(target, float("nan")))
    assert blank.item() == 0.0
    blank.backward()  # still attached to the graph: DDP needs a backward on every rank
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_pos_weight_is_neg_over_pos_and_refuses_a_missing_class():
    y = np.array([[1, 0], [0, 0], [0, 1], [np.nan, 0], [0, np.nan]], dtype=np.float32)
    assert torch.allclose(compute_pos_weight(y, ["a", "b"]), torch.tensor([3.0, 3.0]))
    with pytest.raises(ValueError, match="'b'.*0 positive"):
        compute_pos_weight(np.array([[1, 0], [0, 0]], dtype=np.float32), ["a", "b"])


def test_build_classifier_passes_pos_weight_to_the_loss_only_when_asked():
    y = np.array([[1], [0], [0], [0]], dtype=np.float32)
    m = build_classifier(tiny_cfg(IMBALANCE="pos_weight"), backbone(), y, frozen=True)
    assert torch.equal(m.pos_weight, torch.tensor([3.0]))
    b = batch()
    loss_weighted = m(b)["loss"]
    m.pos_weight = None
    assert not torch.allclose(loss_weighted, m(b)["loss"])  # the weight changes the loss
    assert build_classifier(tiny_cfg(IMBALANCE="none"), backbone(), y, frozen=True).pos_weight is None
    assert "pos_weight" not in m.state_dict()  # derived from the labels, not saved


# ------------------------------------------------------------------ frozen backbone
def test_linear_probe_leaves_resnet_backbone_bit_identical_including_batchnorm_stats():
    bb = backbone("resnet18", roi=32)
    before = state(bb)
    m = Classifier(bb, ["ICH"], freeze_backbone=True)
    assert all(not p.requires_grad for p in m.backbone.parameters())
    m.train()
    assert m.training and m.head.training and not m.backbone.training
    assert any(isinstance(x, nn.BatchNorm3d) for x in bb.modules())
    head_before = state(m.head)
    train_steps(m, steps=3, roi=32)
    after = state(m.backbone)
    assert before.keys() == after.keys()
    for k in before:  # weights and BatchNorm running_mean / running_var / num_batches_tracked
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(head_before[k], v) for k, v in state(m.head).items())  # the head learned
    m.check_frozen()
    names = {n for g in param_groups(m) for n in g["names"]}
    assert names and all(n.startswith("head.") for n in names)  # the optimizer never sees the backbone


def test_frozen_backbone_violations_raise():
    m = Classifier(backbone(), ["ICH"], freeze_backbone=True)
    with torch.no_grad():
        next(m.backbone.parameters()).add_(1e-3)
    with pytest.raises(FrozenBackboneError, match="changed"):
        m.check_frozen()
    m = Classifier(backbone(), ["ICH"], freeze_backbone=True)
    next(m.backbone.parameters()).requires_grad_(True)
    with pytest.raises(FrozenBackboneError, match="requires grad"):
        m.on_step_start(0, 0, 1)


def test_checksum_sees_buffers():
    bb = backbone("resnet18", roi=32)
    c = backbone_checksum(bb)
    bn = next(x for x in bb.modules() if isinstance(x, nn.BatchNorm3d))
    bn.running_mean[0] += 1e-6
    assert backbone_checksum(bb) != c


def test_finetune_trains_backbone_with_head_lr_scale_and_layer_decay():
    m = Classifier(backbone(), ["ICH"], freeze_backbone=False, head_lr_scale=10.0)
    assert m.lr_scales() == {"head.": 10.0}
    groups = param_groups(m, layer_decay=0.5, lr_scales=m.lr_scales())
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    depth = m.backbone.num_layers + 1
    assert scale["head.fc.weight"] == pytest.approx(10.0)
    assert scale["backbone.patch_embed.proj.weight"] == pytest.approx(0.5 ** depth)
    assert scale["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.5 ** (depth - 1))
    before = state(m.backbone)
    train_steps(m, steps=1)
    assert any(not torch.equal(before[k], v) for k, v in state(m.backbone).items())
    assert Classifier(backbone(), ["ICH"], freeze_backbone=True, head_lr_scale=10.0).lr_scales() == {}


@pytest.mark.parametrize("name,roi", [("vit_tiny", 16), ("resnet18", 32)])
def test_attentive_head_over_tokens_or_feature_map(name, roi):
    m = Classifier(backbone(name, roi), ["ICH", "SDH"], head="attentive", freeze_backbone=(name == "resnet18"))
    m.eval()
    logits = m.logits(torch.rand(2, 1, roi, roi, roi))
    assert logits.shape == (2, 2)
    out = train_steps(m, steps=1, n=2, roi=roi, labels=((1.0, float("nan")), (0.0, 1.0)))
    assert math.isfinite(out["loss"].item())


def test_batch_of_one_trains_with_batchnorm_head_and_clear_error_for_backbone_batchnorm():
    m = Classifier(backbone(), ["ICH"], head="linear")
    out = train_steps(m, steps=2, n=1)  # LinearClassifier's BatchNorm1d with one sample
    assert math.isfinite(out["loss"].item())
    m = Classifier(backbone("resnet18", 32), ["ICH"], head="linear", freeze_backbone=True)
    assert math.isfinite(train_steps(m, steps=1, n=1, roi=32)["loss"].item())  # frozen BN: fine
    m = Classifier(backbone("resnet18", 32), ["ICH"], head="linear", freeze_backbone=False)
    with pytest.raises(ValueError, match="DATA.BATCH_SIZE"):
        train_steps(m, steps=1, n=1, roi=32)  # 1^3 feature map: BatchNorm3d cannot train


@pytest.mark.parametrize("name,roi,patch", [("vit_tiny", 28, 4), ("vit_tiny", 96, 16), ("resnet18", 28, 8)])
def test_small_and_large_inputs(name, roi, patch):
    cfg = tiny_cfg(name, roi)
    cfg.MODEL.PATCH_SIZE = [patch] * 3
    torch.manual_seed(0)
    m = Classifier(build_backbone(cfg), ["ICH"], head="attentive")
    m.eval()
    assert m.logits(torch.rand(2, 1, roi, roi, roi)).shape == (2, 1)


def test_forward_without_labels_says_so():
    m = Classifier(backbone(), ["ICH"])
    with pytest.raises(ValueError, match="no 'label'"):
        m({"image": torch.rand(2, 1, 16, 16, 16)})
