"""Segmentation networks of every zoo family: output shapes, the pretrained encoder loaded strictly into
the segmenter, gradients reaching the encoder only when fine-tuning, a frozen encoder left bit-identical."""
import pytest
import torch

from config import get_defaults
from engine.launch import build_backbone_from_cfg
from methods.classify import FrozenBackboneError
from methods.segment import Segmenter, build_segmentation_method
from models import monai_backbones as mb
from models.segmenters import (ResNetSegmenter, SegResSegmenter, SwinSegmenter, ViTSegmenter, build_segmenter)
from models.vit3d import VisionTransformer3D
from models.zoo import PretrainedLoadError


def tiny_vit(patch=4, size=16):
    return VisionTransformer3D(img_size=size, patch_size=patch, in_chans=2, width=32, depth=4, num_heads=2)


@pytest.mark.parametrize("make, size, cls", [
    (lambda: tiny_vit(4, 16), 16, ViTSegmenter),
    (lambda: tiny_vit(8, 16), 16, ViTSegmenter),
    (lambda: mb.SegResEncoderBackbone(2, init_filters=4), 16, SegResSegmenter),
    (lambda: mb.ResNet3D(18, 2, width=4), 32, ResNetSegmenter),
])
def test_output_shapes(make, size, cls):
    net = build_segmenter(make(), 3, width=4)
    assert isinstance(net, cls)
    x = torch.randn(2, 2, size, size, size)
    net.train()
    out = net(x)
    if cls is SegResSegmenter:  # deep supervision: full resolution first, then halving
        assert [tuple(o.shape[2:]) for o in out] == [(size,) * 3, (size // 2,) * 3, (size // 4,) * 3]
        out = out[0]
    assert out.shape == (2, 3, size, size, size)
    net.eval()
    with torch.no_grad():
        assert net(x[:1]).shape == (1, 3, size, size, size)


def test_vit_taps_evenly_spaced_blocks_as_unetr():
    vit = VisionTransformer3D(img_size=32, patch_size=16, in_chans=1, width=24, depth=12, num_heads=2)
    assert ViTSegmenter(vit, 2, width=4).taps == [3, 6, 9]  # UNETR's hidden states 3, 6, 9 for patch 16
    with pytest.raises(ValueError, match="power-of-two patch"):
        ViTSegmenter(VisionTransformer3D(img_size=24, patch_size=6, in_chans=1, width=24, depth=2, num_heads=2), 2)


def test_swin_decoder_shape():
    enc = mb.SwinEncoder(1, feature_size=12, depths=(1, 1, 1, 1), window_size=2)
    net = SwinSegmenter(enc, 2).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 64, 64, 64)).shape == (1, 2, 64, 64, 64)
    assert not any(k.startswith("decoder.swinViT") for k in net.state_dict())  # the encoder is ours alone
    with pytest.raises(ValueError, match="divisible by 32"):
        net(torch.randn(1, 1, 48, 64, 64))


def seg_cfg(name="segresnet", pretrained=""):
    cfg = get_defaults()
    cfg.MODEL.NAME, cfg.MODEL.FEATURE_SIZE, cfg.MODEL.PRETRAINED = name, 4, pretrained
    cfg.DATA.ROI, cfg.DATA.WINDOWS = [16, 16, 16], ["brain"]
    cfg.DOWNSTREAM.SEG_CLASSES, cfg.DOWNSTREAM.SEG_DECODER_WIDTH = [1, 2], 4
    return cfg


def test_pretrained_encoder_loads_strictly_into_the_segmenter(tmp_path):
    torch.manual_seed(0)
    src = build_backbone_from_cfg(seg_cfg())
    path = tmp_path / "backbone.pth"
    torch.save({"model": {f"backbone.{k}": v for k, v in src.state_dict().items()}}, path)  # a method's checkpoint
    torch.manual_seed(1)
    method = build_segmentation_method(seg_cfg(pretrained=str(path)), build_backbone_from_cfg(
        seg_cfg(pretrained=str(path))), frozen=False)
    got = method.net.encoder.state_dict()
    assert all(torch.equal(got[k], v) for k, v in src.state_dict().items())
    # a checkpoint of another family loads nothing: refused, not silently skipped
    other = tmp_path / "resnet.pth"
    torch.save(mb.ResNet3D(18, 1, width=4).state_dict(), other)
    with pytest.raises(PretrainedLoadError, match="only 0/"):
        build_backbone_from_cfg(seg_cfg(pretrained=str(other)))


def step(method: Segmenter) -> None:
    x = torch.randn(2, 1, 16, 16, 16)
    y = torch.zeros(2, 1, 16, 16, 16, dtype=torch.long)
    y[:, :, 4:8, 4:8, 4:8] = 1
    y[:, :, 9:12, 9:12, 9:12] = 2
    method.train()
    method.on_step_start(0, 0, 1)
    method({"image": x, "target": y})["loss"].backward()
    method.on_after_backward(0)


@pytest.mark.parametrize("family", ["segresnet", "vit"])
def test_gradients_reach_the_encoder_only_when_finetuning(family):
    def build(frozen):
        torch.manual_seed(0)
        if family == "vit":
            enc = VisionTransformer3D(img_size=16, patch_size=4, in_chans=1, width=32, depth=2, num_heads=2)
            return Segmenter(build_segmenter(enc, 3, 4), 3, freeze_encoder=frozen, decoder_lr_scale=10)
        return build_segmentation_method(seg_cfg(), build_backbone_from_cfg(seg_cfg()), frozen)

    ft = build(False)
    step(ft)
    enc_grads = [p.grad for p in ft.net.encoder.parameters()]
    assert all(g is not None for g in enc_grads) and sum(float(g.abs().sum()) for g in enc_grads) > 0
    assert set(ft.lr_scales()) and all(k.startswith("net.") and k != "net.encoder." for k in ft.lr_scales())

    lin = build(True)
    before = {k: v.clone() for k, v in lin.net.encoder.state_dict().items()}
    step(lin)
    assert all(p.grad is None and not p.requires_grad for p in lin.net.encoder.parameters())
    decoder = [p for n, p in lin.named_parameters() if not n.startswith("net.encoder.")]
    assert decoder and all(p.grad is not None for p in decoder)
    assert not lin.net.encoder.training and lin.lr_scales() == {}
    lin.check_frozen()  # BatchNorm statistics unchanged too
    assert all(torch.equal(before[k], v) for k, v in lin.net.encoder.state_dict().items())
    next(lin.net.encoder.parameters()).data.add_(1.0)
    with pytest.raises(FrozenBackboneError, match="changed"):
        lin.check_frozen()


@pytest.mark.parametrize("make", [lambda: mb.SegResEncoderBackbone(1, init_filters=4),
                                  lambda: mb.ResNet3D(18, 1, width=4)])
def test_an_encoder_with_an_input_orientation_segments_in_that_orientation(make):
    """CT-FM's encoder runs on SPL arrays: the segmenter hands it the RAS input reoriented and returns
    logits on the RAS grid, the same as running the RAS segmenter on the hand-reoriented volume."""
    torch.manual_seed(0)
    ras = build_segmenter(make(), 2, width=4).eval()
    spl = build_segmenter(make(), 2, width=4).eval()
    spl.load_state_dict(ras.state_dict())
    spl.encoder.set_input_orientation("SPL")
    x = torch.randn(1, 1, 32, 32, 64)  # RAS; SPL arrays: axes (Z, Y, X), Y and X flipped (to P and L)
    to_spl = x.permute(0, 1, 4, 3, 2).flip(3, 4)
    with torch.no_grad():
        want = ras(to_spl).flip(3, 4).permute(0, 1, 4, 3, 2)
        got = spl(x)
    assert got.shape == (1, 2, 32, 32, 64)
    assert torch.allclose(got, want, atol=1e-5)
