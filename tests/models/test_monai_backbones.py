"""MONAI encoders: shapes at two ROIs, forward + backward, interface attributes (small widths, CPU)."""
import pytest
import torch

from config import get_defaults
from models.zoo import build_backbone


def cfg_for(name: str, width: int):
    cfg = get_defaults()
    cfg.MODEL.NAME = name
    cfg.MODEL.FEATURE_SIZE = width
    cfg.DATA.ROI = [32, 32, 32]
    return cfg


# name, FEATURE_SIZE, expected embed_dim, downsampling factor of forward_features
CASES = [("swin", 12, 12 * 16, 32), ("segresnet", 4, 4 * 16, 16), ("resnet18", 8, 8 * 8, 32),
         ("resnet50", 4, 4 * 8 * 4, 32)]


@pytest.mark.parametrize("name,width,dim,factor", CASES)
def test_forward_backward_and_shapes(name, width, dim, factor):
    torch.manual_seed(0)
    m = build_backbone(cfg_for(name, width))
    assert m.embed_dim == dim and m.token_dim == dim
    assert isinstance(m.no_weight_decay(), set)
    # BatchNorm at a 1^3 last stage needs 2 samples in training mode
    batch = 1 if name in ("swin", "segresnet") else 2
    out = m(torch.rand(batch, 3, 32, 32, 32))
    assert out.shape == (batch, dim)
    out.square().sum().backward()
    first = next(p for n, p in m.named_parameters() if p.ndim == 5)  # the stem convolution
    assert first.grad is not None and first.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        fmap = m.forward_features(torch.rand(1, 3, 32, 64, 32))
    assert fmap.shape == (1, dim, 32 // factor, 64 // factor, 32 // factor)


def test_swin_weight_decay_names_and_width_check():
    m = build_backbone(cfg_for("swin", 12))
    names = m.no_weight_decay()
    assert names and all("relative_position_bias_table" in n for n in names)
    assert names <= {n for n, _ in m.named_parameters()}
    with pytest.raises(ValueError, match="divisible by 12"):
        build_backbone(cfg_for("swin", 16))


def test_bad_input_channels():
    m = build_backbone(cfg_for("resnet18", 8))
    with pytest.raises(ValueError, match=r"\[B, 3, D, H, W\]"):
        m(torch.rand(2, 1, 32, 32, 32))
