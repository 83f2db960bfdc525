import argparse
import logging

import pytest
import torch

from config import CHOICES, get_defaults
from models.pos_embed import grid_to_tokens, resize_pos_embed
from models.vit3d import VisionTransformer3D
from models.zoo import BACKBONES, PretrainedLoadError, build_backbone, load_pretrained


def vit_cfg(name="vit_tiny", roi=(32, 32, 32), patch=(16, 16, 16), **model):
    cfg = get_defaults()
    cfg.MODEL.NAME = name
    cfg.DATA.ROI = list(roi)
    cfg.MODEL.PATCH_SIZE = list(patch)
    for k, v in model.items():
        cfg.MODEL[k] = v
    return cfg


def small_vit(**kw) -> VisionTransformer3D:
    args = dict(img_size=32, patch_size=8, in_chans=3, width=48, depth=2, num_heads=3)
    args.update(kw)
    return VisionTransformer3D(**args)


def test_registry_covers_config_choices():
    assert set(BACKBONES) == set(CHOICES["MODEL.NAME"])
    cfg = vit_cfg()
    cfg.MODEL.NAME = "vit_huge"
    with pytest.raises(ValueError, match="MODEL.NAME"):
        build_backbone(cfg)


@pytest.mark.parametrize("name,dim", [("vit_tiny", 192), ("vit_small", 384)])
def test_vits_build_forward_backward(name, dim):
    m = build_backbone(vit_cfg(name, NUM_REGISTERS=1, POOL="mean"))
    assert isinstance(m, VisionTransformer3D) and m.embed_dim == dim and m.num_prefix_tokens == 2
    assert m.in_chans == 3 and m.mask_token is None
    out = m(torch.rand(1, 3, 32, 32, 32))
    assert out.shape == (1, dim)
    out.sum().backward()
    assert m.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name,dim,depth,params", [("vit_base", 768, 12, (85e6, 86e6)),
                                                   ("vit_large", 1024, 24, (302e6, 303e6))])
def test_large_vits_on_meta_device(name, dim, depth, params):
    """ViT-B/L (95M/315M parameters) are checked on the meta device: shapes and autograd, no compute.

    The code path is the one vit_tiny/vit_small run for real above; only the sizes differ.
    """
    with torch.device("meta"):
        m = build_backbone(vit_cfg(name))
    out = m(torch.rand(1, 3, 32, 32, 32, device="meta"))
    assert out.shape == (1, dim) and m.num_layers == depth
    out.sum().backward()
    assert m.patch_embed.proj.weight.grad.shape == m.patch_embed.proj.weight.shape
    n = sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in m.patch_embed.parameters())
    assert params[0] < n < params[1]


def test_build_options_reach_the_vit():
    cfg = vit_cfg(patch=(8, 16, 16), POS_EMBED="learned", POOL="cls+mean", DROP_PATH=0.1)
    cfg.DATA.WINDOWS = ["brain", "bone"]
    cfg.DINO.IBOT_WEIGHT = 1.0
    m = build_backbone(cfg)
    assert m.patch_size == (8, 16, 16) and m.in_chans == 2 and m.embed_dim == 384
    assert isinstance(m.pos_embed, torch.nn.Parameter) and m.mask_token is not None
    assert m.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


# ------------------------------------------------------------------------------------ loading
def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


WRAPS = {
    "raw": lambda sd: sd,
    "model": lambda sd: {"model": sd, "epoch": 3},
    "state_dict+module": lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
    "backbone+compile": lambda sd: {"backbone": {"_orig_mod." + k: v for k, v in sd.items()}},
    "teacher": lambda sd: {"teacher": {"backbone." + k: v for k, v in sd.items()}},
    "student": lambda sd: {"student": {"module.backbone." + k: v for k, v in sd.items()}},
    "encoder": lambda sd: {"encoder." + k: v for k, v in sd.items()},
    "method": lambda sd: {"model": {**{"backbone." + k: v for k, v in sd.items()},
                                    "decoder.pred.weight": torch.zeros(3, 3)}},
    "ddp+compile+teacher": lambda sd: {"model": {"module._orig_mod.teacher.backbone." + k: v
                                                 for k, v in sd.items()}},
}


@pytest.mark.parametrize("wrap", list(WRAPS))
def test_round_trip_through_prefixes(tmp_path, wrap):
    torch.manual_seed(0)
    src = small_vit(num_registers=2, pos_embed="learned")
    path = tmp_path / "ckpt.pth"
    torch.save(WRAPS[wrap](src.state_dict()), path)
    dst = small_vit(num_registers=2, pos_embed="learned")
    assert not _same_weights(src, dst)
    report = load_pretrained(dst, str(path))
    assert _same_weights(src, dst)
    assert report["loaded"] == report["total"] == len(src.state_dict()) and report["fraction"] == 1.0
    assert report["missing"] == [] and report["unexpected"] == [] and report["mismatched"] == []
    x = torch.rand(1, 3, 32, 32, 32)
    assert torch.allclose(src.eval()(x), dst.eval()(x))
    if wrap == "method":
        assert report["prefix"] == "backbone." and report["other_keys"] == 1


def test_teacher_preferred_over_student(tmp_path):
    torch.manual_seed(0)
    student, teacher = small_vit(), small_vit()
    ckpt = {"model": {**{"student.backbone." + k: v for k, v in student.state_dict().items()},
                      **{"teacher.backbone." + k: v for k, v in teacher.state_dict().items()}}}
    torch.save(ckpt, tmp_path / "dino.pth")
    dst = small_vit()
    report = load_pretrained(dst, str(tmp_path / "dino.pth"))
    assert report["prefix"] == "teacher.backbone." and _same_weights(dst, teacher)


def test_monai_backbone_round_trip(tmp_path):
    cfg = get_defaults()
    cfg.MODEL.NAME, cfg.MODEL.FEATURE_SIZE = "resnet18", 8
    src, dst = build_backbone(cfg), build_backbone(cfg)
    torch.save({"model": {"module.backbone." + k: v for k, v in src.state_dict().items()}}, tmp_path / "r.pth")
    report = load_pretrained(dst, str(tmp_path / "r.pth"))
    assert report["fraction"] == 1.0 and _same_weights(src, dst)


def test_learned_pos_embed_interpolated_to_new_grid(tmp_path):
    torch.manual_seed(0)
    src = small_vit(pos_embed="learned")  # grid 4x4x4
    with torch.no_grad():
        src.pos_embed.normal_()
    torch.save(src.state_dict(), tmp_path / "a.pth")
    dst = small_vit(img_size=(32, 48, 32), pos_embed="learned")  # grid 4x6x4
    report = load_pretrained(dst, str(tmp_path / "a.pth"))
    assert report["pos_embed_resized"] == [[4, 4, 4], [4, 6, 4]] and report["fraction"] == 1.0
    assert torch.allclose(dst.pos_embed, resize_pos_embed(src.pos_embed.detach(), (4, 6, 4)))
    # another codebase's [1, 1 + N, D] list with a CLS entry
    foreign = dict(src.state_dict())
    foreign["pos_embed"] = torch.cat([torch.zeros(1, 1, 48), grid_to_tokens(src.pos_embed.detach())], dim=1)
    torch.save(foreign, tmp_path / "b.pth")
    dst2 = small_vit(pos_embed="learned")
    load_pretrained(dst2, str(tmp_path / "b.pth"))
    assert torch.equal(dst2.pos_embed, src.pos_embed)


def test_fixed_pos_embed_ignores_checkpoint_table(tmp_path):
    src = small_vit(pos_embed="learned")
    torch.save(src.state_dict(), tmp_path / "a.pth")
    dst = small_vit()
    table = dst.pos_embed.clone()
    report = load_pretrained(dst, str(tmp_path / "a.pth"))
    assert torch.equal(dst.pos_embed, table) and report["fraction"] == 1.0
    assert report["unexpected"] == [] and report["ignored"]


def test_min_fraction_rule_fires_with_a_clear_message(tmp_path):
    src = small_vit(depth=4)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith(("blocks.2.", "blocks.3."))}
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    dst = small_vit(depth=4)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(PretrainedLoadError) as err:
        load_pretrained(dst, str(path), min_fraction=0.9)
    msg = str(err.value)
    total = len(dst.state_dict())
    assert str(path) in msg and f"{len(sd)}/{total}" in msg and "blocks.2." in msg
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # nothing half-loaded
    report = load_pretrained(dst, str(path), min_fraction=0.5)
    assert report["loaded"] == len(sd) and len(report["missing"]) == total - len(sd)


def test_shape_mismatch_counts_as_not_loaded(tmp_path, caplog):
    src = small_vit(in_chans=1)
    torch.save(src.state_dict(), tmp_path / "one_channel.pth")
    dst = small_vit(in_chans=3)
    with caplog.at_level(logging.WARNING, logger="models.zoo"):
        report = load_pretrained(dst, str(tmp_path / "one_channel.pth"), min_fraction=0.5)
    assert report["loaded"] == report["total"] - 1
    assert report["missing"] == ["patch_embed.proj.weight"]
    assert report["mismatched"] == ["patch_embed.proj.weight: checkpoint (48, 1, 8, 8, 8) vs model (48, 3, 8, 8, 8)"]
    assert "shape-mismatched" in caplog.text
    with pytest.raises(PretrainedLoadError, match="only"):
        load_pretrained(small_vit(width=96), str(tmp_path / "one_channel.pth"))


def test_unreadable_or_missing_files(tmp_path):
    m = small_vit()
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(m, str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedLoadError, match="junk.pth"):
        load_pretrained(m, str(tmp_path / "junk.pth"))
    torch.save({"model": argparse.Namespace(a=1)}, tmp_path / "pickled.pth")  # refused by weights_only=True
    with pytest.raises(PretrainedLoadError, match="weights_only"):
        load_pretrained(m, str(tmp_path / "pickled.pth"))
    torch.save({"epoch": 3, "note": "x"}, tmp_path / "empty.pth")
    with pytest.raises(PretrainedLoadError, match="no state dict"):
        load_pretrained(m, str(tmp_path / "empty.pth"))


def test_vit_base_headct_variant_and_segresnet_norm():
    """vit_base_headct is ViT-B with torch's LayerNorm eps inside the blocks (HeadCT-Foundation's);
    MODEL.NORM sets the segresnet's normalisation (affine either way; instance norms keep no statistics)."""
    with torch.device("meta"):
        m = build_backbone(vit_cfg("vit_base_headct", roi=(24, 24, 24), patch=(12, 12, 12), NUM_REGISTERS=4))
    assert isinstance(m, VisionTransformer3D) and m.embed_dim == 768 and m.num_layers == 12
    assert m.blocks[0].norm1.eps == 1e-5 and m.blocks[-1].norm2.eps == 1e-5 and m.norm.eps == 1e-6
    keys = build_backbone(vit_cfg("segresnet", FEATURE_SIZE=4, NORM="instance")).state_dict()
    assert any(k.endswith("norm1.weight") for k in keys) and not any(k.endswith("running_mean") for k in keys)
    keys = build_backbone(vit_cfg("segresnet", FEATURE_SIZE=4)).state_dict()
    assert any(k.endswith("norm1.running_mean") for k in keys)


def test_input_orientation_codes_are_checked():
    from config import ConfigError, validate
    from models.names import orientation_axes

    assert orientation_axes("SPL") == ((2, 1, 0), (False, True, True))
    assert orientation_axes("ras") == ((0, 1, 2), (False, False, False))
    cfg = vit_cfg("segresnet", INPUT_ORIENTATION="SPX")
    with pytest.raises(ConfigError, match="MODEL.INPUT_ORIENTATION.*'SPX'"):
        validate(cfg)
    with pytest.raises(ConfigError, match="ViTs take RAS input only"):
        validate(vit_cfg("vit_tiny", INPUT_ORIENTATION="SPL"))
