"""models.import_checkpoint: each published layout, rebuilt with the library its authors use and saved as
they save it, imports strictly and gives the source model's features (max |diff| <= 1e-5, float32)."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from config import merge_file, get_defaults, validate
from models.import_checkpoint import CheckpointImportError, convert_checkpoint, import_checkpoint
from models.zoo import build_backbone, load_pretrained

TOL = 1e-5


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def _randomise_norm_stats(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so that eval-mode features test them."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            if m.track_running_stats:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def _check_outputs(report: dict, out) -> nn.Module:
    """model.yaml builds the backbone and MODEL.PRETRAINED loads every tensor of it; returns it (eval)."""
    folder = out.parent
    assert (folder / "model.yaml").is_file() and (folder / "import.json").is_file()
    saved = json.loads((folder / "import.json").read_text())
    assert saved["tensors"] == report["tensors"] and saved["dropped"] == report["dropped"]
    cfg = get_defaults()
    merge_file(cfg, str(folder / "model.yaml"))
    validate(cfg)
    model = build_backbone(cfg)
    rep = load_pretrained(model, cfg.MODEL.PRETRAINED, min_fraction=1.0)
    assert rep["missing"] == [] and rep["unexpected"] == [] and rep["mismatched"] == []
    return model.eval()


# ------------------------------------------------------------------------------------------ CT-FM
def _ctfm_encoder(norm="batch"):
    from monai.networks.nets.segresnet_ds import SegResEncoder

    torch.manual_seed(0)
    enc = SegResEncoder(spatial_dims=3, init_filters=8, in_channels=1, blocks_down=(1, 2, 2, 4, 4), norm=norm)
    _randomise_norm_stats(enc)
    return enc.eval()


def _save_hub_folder(folder, state, config):
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


CTFM_CONFIG = {"spatial_dims": 3, "in_channels": 1, "init_filters": 8, "blocks_down": [1, 2, 2, 4, 4]}


def test_ctfm_hub_folder_gives_source_features(tmp_path):
    pytest.importorskip("safetensors", reason="the ct-fm hub format is safetensors (pip install safetensors)")
    enc = _ctfm_encoder()
    _save_hub_folder(tmp_path / "ct_fm_feature_extractor", enc.state_dict(), {**CTFM_CONFIG, "norm": "batch"})
    out = tmp_path / "ctfm" / "backbone.pth"
    report = import_checkpoint("ct-fm", str(tmp_path / "ct_fm_feature_extractor"), str(out))
    assert report["dropped"] == {} and report["filled"] == {}
    assert report["settings"]["MODEL.NAME"] == "segresnet" and report["settings"]["MODEL.FEATURE_SIZE"] == 8
    assert report["settings"]["DATA.WINDOWS"] == ["512,3072"]
    _check_outputs(report, out)
    conv, model = convert_checkpoint("ct-fm", str(tmp_path / "ct_fm_feature_extractor"))
    assert conv.settings["MODEL.INPUT_ORIENTATION"] == "SPL"
    x = torch.rand(2, 1, 32, 48, 16)  # RAS [X, Y, Z]
    spl = x.permute(0, 1, 4, 3, 2).flip(3, 4)  # CT-FM's SPL array: axes (Z, -Y, -X)
    with torch.no_grad():
        ref = enc(spl)[-1].mean(dim=(2, 3, 4))  # CT-FM's embedding: global average of the last level
        assert _max_diff(model(x), ref) <= TOL
        fmap = model.forward_features(x)
        assert fmap.shape[2:] == (2, 3, 1)  # returned in RAS order
        assert _max_diff(fmap, enc(spl)[-1].flip(3, 4).permute(0, 1, 4, 3, 2)) <= TOL


def test_ctfm_instance_norm_running_stats_are_dropped_by_name(tmp_path):
    pytest.importorskip("safetensors", reason="the ct-fm hub format is safetensors (pip install safetensors)")
    enc = _ctfm_encoder(norm="instance")
    state = dict(enc.state_dict())
    stats = {}
    for name, m in enc.named_modules():  # statistics saved by a norm layer that does not use them
        if isinstance(m, nn.InstanceNorm3d):
            stats[f"{name}.running_mean"] = torch.zeros(m.num_features)
            stats[f"{name}.running_var"] = torch.ones(m.num_features)
    _save_hub_folder(tmp_path / "hub", {**state, **stats}, {**CTFM_CONFIG, "norm": ["instance", {"affine": True}]})
    conv, model = convert_checkpoint("ct-fm", str(tmp_path / "hub"))
    assert set(conv.dropped) == set(stats) and conv.settings["MODEL.NORM"] == "instance"
    x = torch.rand(1, 1, 32, 32, 32)
    spl = x.permute(0, 1, 4, 3, 2).flip(3, 4)
    with torch.no_grad():
        assert _max_diff(model(x), enc(spl)[-1].mean(dim=(2, 3, 4))) <= TOL


def test_ctfm_full_segresnetds_keeps_the_encoder(tmp_path):
    from monai.networks.nets.segresnet_ds import SegResNetDS

    torch.manual_seed(0)
    net = SegResNetDS(spatial_dims=3, init_filters=8, in_channels=1, out_channels=3, blocks_down=(1, 2, 2, 4, 4))
    _randomise_norm_stats(net)
    net.eval()
    path = tmp_path / "ct_fm_segresnet.ckpt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}, path)
    (tmp_path / "config.json").write_text(json.dumps({**CTFM_CONFIG, "out_channels": 3, "dsdepth": 1}))
    conv, model = convert_checkpoint("ct-fm", str(path))
    decoder = {k for k in net.state_dict() if not k.startswith("encoder.")}  # keys without 'module.'

    assert set(conv.dropped) == decoder and conv.entry == "state_dict" and conv.other_entries == ["epoch"]
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert _max_diff(model(x), net.encoder(x.permute(0, 1, 4, 3, 2).flip(3, 4))[-1].mean(dim=(2, 3, 4))) <= TOL
    # only SegResNetDS's decoder (up_layers) is dropped by its role; any other tensor stops the import
    torch.save({"state_dict": {**{f"module.{k}": v for k, v in net.state_dict().items()},
                               "module.ema.conv_init.weight": torch.zeros(8, 1, 3, 3, 3)}}, path)
    with pytest.raises(CheckpointImportError, match=r"ema.conv_init.weight \(8, 1, 3, 3, 3\)"):
        convert_checkpoint("ct-fm", str(path))


def test_ctfm_config_the_zoo_cannot_build_is_refused(tmp_path):
    torch.save(_ctfm_encoder().state_dict(), tmp_path / "enc.pt")
    conv, _ = convert_checkpoint("ct-fm", str(tmp_path / "enc.pt"))  # no config.json: CT-FM's, width from weights
    assert conv.settings["MODEL.FEATURE_SIZE"] == 8 and "No config.json" in conv.notes[-1]
    (tmp_path / "config.json").write_text(json.dumps({**CTFM_CONFIG, "blocks_down": [1, 2, 2, 4]}))
    with pytest.raises(CheckpointImportError, match=r"blocks_down = \[1, 2, 2, 4\]"):
        convert_checkpoint("ct-fm", str(tmp_path / "enc.pt"))
    (tmp_path / "config.json").write_text(json.dumps({**CTFM_CONFIG, "norm": "group"}))
    with pytest.raises(CheckpointImportError, match="norm = 'group'"):
        convert_checkpoint("ct-fm", str(tmp_path / "enc.pt"))


def test_ctfm_without_safetensors_names_the_package(tmp_path, monkeypatch):
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "model.safetensors").write_bytes(b"\0" * 16)
    (tmp_path / "hub" / "config.json").write_text(json.dumps(CTFM_CONFIG))
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointImportError, match="'safetensors' package"):
        convert_checkpoint("ct-fm", str(tmp_path / "hub"))


# ------------------------------------------------------------------------------------------ SwinUNETR SSL
def _swin_source():
    pytest.importorskip("einops")
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    return SwinUNETR(in_channels=1, out_channels=2, feature_size=12).swinViT.eval()


def _swinvit_file(swin, path, extra=None):
    """model_swinvit.pt's layout: module. prefix, mlp.fc1/fc2, a final norm over the last stage."""
    state = {}
    for k, v in swin.state_dict().items():
        state["module." + k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")] = v
    state["module.norm.weight"] = torch.rand(16 * 12)
    state["module.norm.bias"] = torch.rand(16 * 12)
    state.update(extra or {})
    torch.save({"state_dict": state}, path)
    return state


def test_swinunetr_ssl_gives_source_features(tmp_path):
    swin = _swin_source()
    _swinvit_file(swin, tmp_path / "model_swinvit.pt")
    out = tmp_path / "swin" / "backbone.pth"
    report = import_checkpoint("swinunetr-ssl", str(tmp_path / "model_swinvit.pt"), str(out))
    assert set(report["dropped"]) == {"norm.weight", "norm.bias"}  # source keys without 'module.'

    assert report["settings"]["MODEL.FEATURE_SIZE"] == 12 and report["settings"]["DATA.WINDOWS"] == ["0,2000"]
    assert report["renamed"]["layers1.0.blocks.0.mlp.linear1.weight"] == "layers1.0.blocks.0.mlp.fc1.weight"
    _check_outputs(report, out)
    _, model = convert_checkpoint("swinunetr-ssl", str(tmp_path / "model_swinvit.pt"))
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        ref = swin(x, normalize=True)[-1].mean(dim=(2, 3, 4))
        assert _max_diff(model(x), ref) <= TOL


def test_swinunetr_ssl_strictness_names_keys_and_shapes(tmp_path):
    swin = _swin_source()
    path = tmp_path / "model_swinvit.pt"
    state = _swinvit_file(swin, path, extra={"module.rotation_head.weight": torch.zeros(4, 192)})
    assert "rotation head" in convert_checkpoint("swinunetr-ssl", str(path))[0].dropped["rotation_head.weight"]

    _swinvit_file(swin, path, extra={"module.mystery.weight": torch.zeros(3, 5)})
    with pytest.raises(CheckpointImportError, match=r"the backbone lacks: \['mystery.weight \(3, 5\)'\]"):
        convert_checkpoint("swinunetr-ssl", str(path))

    key = "module.layers1.0.blocks.0.attn.qkv.weight"
    bad = dict(state)
    bad[key] = torch.zeros(36, 13)
    torch.save({"state_dict": bad}, path)
    with pytest.raises(CheckpointImportError, match=r"qkv.weight \(36, 13\) -> layers1.0.blocks.0.attn.qkv.weight "
                                                    r"\(36, 12\)"):
        convert_checkpoint("swinunetr-ssl", str(path))

    del bad[key]
    torch.save({"state_dict": bad}, path)
    with pytest.raises(CheckpointImportError, match=r"1 backbone tensors with no source: "
                                                    r"\['layers1.0.blocks.0.attn.qkv.weight \(36, 12\)'\]"):
        convert_checkpoint("swinunetr-ssl", str(path))


# ------------------------------------------------------------------------------------------ FMCIB
def _fmcib_trunk(block_inplanes=(8, 16, 32, 64)):
    """FMCIB's trunk with the library call it uses (MONAI ResNet, bottleneck [3, 4, 6, 3], widen factor 2,
    stem stride 2, no fc), narrowed for the test: widths x 1/8 of ResNet-50's."""
    from monai.networks.nets.resnet import ResNet

    torch.manual_seed(0)
    net = ResNet(block="bottleneck", layers=[3, 4, 6, 3], block_inplanes=list(block_inplanes), spatial_dims=3,
                 n_input_channels=1, conv1_t_stride=2, widen_factor=2, feed_forward=False)
    _randomise_norm_stats(net)
    return net.eval()


@pytest.mark.parametrize("layout", ["trunk_state_dict", "lightning"])
def test_fmcib_gives_source_features(tmp_path, layout):
    trunk = _fmcib_trunk()
    head = {"0.weight": torch.rand(2048, 1024), "0.bias": torch.rand(2048)}
    if layout == "trunk_state_dict":
        obj = {"trunk_state_dict": trunk.state_dict(), "head_state_dict": head}
    else:
        obj = {"state_dict": {**{f"model.trunk.{k}": v for k, v in trunk.state_dict().items()},
                              **{f"model.head.{k}": v for k, v in head.items()}}, "epoch": 99}
    torch.save(obj, tmp_path / "model_weights.torch")
    conv, model = convert_checkpoint("fmcib", str(tmp_path / "model_weights.torch"))
    assert conv.settings["MODEL.NAME"] == "resnet50" and conv.settings["MODEL.FEATURE_SIZE"] == 16
    assert len(conv.dropped) == 2 and all("projection head" in why for why in conv.dropped.values())
    assert conv.settings["MODEL.INPUT_ORIENTATION"] == "LPS"
    x = torch.rand(2, 1, 32, 32, 32)  # RAS
    with torch.no_grad():
        ref = trunk(x.flip(2, 3))  # FMCIB's LPS array; feed_forward=False: the pooled 32 x width features
        assert model.embed_dim == ref.shape[1] == 512
        assert _max_diff(model(x), ref) <= TOL


def test_fmcib_full_size_layout_matches_the_zoo_on_meta_device():
    """The real FMCIB trunk (resnet50, widen_factor 2: 4096-d) has exactly the zoo resnet50's keys and
    shapes at MODEL.FEATURE_SIZE 128 (checked without allocating its weights)."""
    from monai.networks.nets import resnet50

    with torch.device("meta"):
        src = resnet50(spatial_dims=3, n_input_channels=1, widen_factor=2, conv1_t_stride=2, feed_forward=False)
        cfg = get_defaults()
        cfg.MODEL.NAME, cfg.MODEL.FEATURE_SIZE, cfg.DATA.WINDOWS = "resnet50", 128, ["512,3072"]
        ours = build_backbone(cfg)
    assert {k: tuple(v.shape) for k, v in src.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours.embed_dim == 4096


# ------------------------------------------------------------------------------------------ HeadCT-FM
class _MonaiStyleBlock(nn.Module):
    """A pre-norm block in HeadCT-Foundation's layout: att_norm / ffn_norm (torch LayerNorm defaults),
    attn.qkv / attn.proj, MONAI's MLPBlock (linear1 / linear2)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        from monai.networks.blocks.mlp import MLPBlock

        super().__init__()
        self.heads = heads
        self.att_norm, self.ffn_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn.proj = nn.Linear(dim, dim)
        self.mlp = MLPBlock(dim, 4 * dim, 0.0)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.attn.qkv(self.att_norm(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.attn.proj(y)
        return x + self.mlp(self.ffn_norm(x))


class _HeadCTViT(nn.Module):
    """HeadCT-Foundation's ViT-B in its key layout: MONAI-style patch embedding with a [1, N, D] table,
    CLS then register tokens, 12 blocks, final LayerNorm eps 1e-6; its output token 0 is the feature."""

    def __init__(self, patch=12, roi=24, in_chans=3, registers=4, qkv_bias=True):
        super().__init__()
        dim, n = 768, (roi // patch) ** 3
        self.patch_embedding = nn.Module()
        self.patch_embedding.patch_embeddings = nn.Conv3d(in_chans, dim, patch, stride=patch)
        self.patch_embedding.position_embeddings = nn.Parameter(torch.randn(1, n, dim) * 0.1)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.register_tokens = nn.Parameter(torch.randn(1, registers, dim) * 0.1) if registers else None
        self.blocks = nn.ModuleList([_MonaiStyleBlock(dim, 12, qkv_bias) for _ in range(12)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        t = self.patch_embedding.patch_embeddings(x).flatten(2).transpose(1, 2)
        t = t + self.patch_embedding.position_embeddings
        b = t.shape[0]
        prefix = [self.cls_token] + ([self.register_tokens] if self.register_tokens is not None else [])
        t = torch.cat([p.expand(b, -1, -1) for p in prefix] + [t], dim=1)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)[:, 0]


def _teacher_of(student: dict, scale=0.02) -> dict:
    """The student's tensors (shared, so the file stores them once) except a few that differ."""
    g = torch.Generator().manual_seed(7)
    differ = ("module.backbone.cls_token", "module.backbone.norm.weight", "module.backbone.blocks.11.attn.qkv.weight",
              "module.backbone.patch_embedding.position_embeddings")
    return {k: v + scale * torch.randn(v.shape, generator=g) if k in differ else v for k, v in student.items()}


@pytest.fixture(scope="module")
def headct_source():
    torch.manual_seed(0)
    vit = _HeadCTViT().eval()
    for m in vit.modules():  # LayerNorm affine parameters away from 1 / 0
        if isinstance(m, nn.LayerNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return vit


def test_headct_training_checkpoint_teacher_and_student(tmp_path, headct_source):
    vit = headct_source
    student = {f"module.backbone.{k}": v.clone() for k, v in vit.state_dict().items()}  # not aliasing vit
    student["module.head.mlp.0.weight"] = torch.zeros(16, 768)
    teacher = _teacher_of(student)
    torch.save({"epoch": 5, "best_loss": 1.0, "state_dict": student, "momentum_model_state_dict": teacher,
                "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "dino.pt")
    x = torch.rand(2, 3, 24, 24, 24)
    for entry, state in ((None, teacher), ("student", student)):  # None: the teacher when present
        conv, model = convert_checkpoint("headct-fm", str(tmp_path / "dino.pt"), entry=entry)
        assert conv.entry == ("state_dict" if entry == "student" else "momentum_model_state_dict")
        assert conv.dropped == {"head.mlp.0.weight": "DINO projection head"}
        assert conv.settings["MODEL.NAME"] == "vit_base_headct" and conv.settings["MODEL.NUM_REGISTERS"] == 4
        assert conv.settings["MODEL.PATCH_SIZE"] == [12, 12, 12] and conv.settings["DATA.ROI"] == [24, 24, 24]
        vit.load_state_dict({k[len("module.backbone."):]: v for k, v in state.items() if ".backbone." in k})
        with torch.no_grad():
            assert _max_diff(model(x), vit(x)) <= TOL


def test_headct_plain_backbone_without_qkv_bias_and_compile_prefix(tmp_path):
    torch.manual_seed(3)
    vit = _HeadCTViT(registers=0, qkv_bias=False).eval()
    torch.save({f"_orig_mod.backbone.{k}": v for k, v in vit.state_dict().items()}, tmp_path / "vit.pth")
    out = tmp_path / "headct" / "backbone.pth"
    report = import_checkpoint("headct-fm", str(tmp_path / "vit.pth"), str(out))
    assert len(report["filled"]) == 12 and all(k.endswith("attn.qkv.bias") for k in report["filled"])
    assert report["settings"]["MODEL.NUM_REGISTERS"] == 0
    model = _check_outputs(report, out)  # built from model.yaml, loaded through MODEL.PRETRAINED
    x = torch.rand(1, 3, 24, 24, 24)
    with torch.no_grad():
        assert _max_diff(model(x), vit(x)) <= TOL


def test_headct_errors_name_the_problem(tmp_path, headct_source):
    state = {f"module.backbone.{k}": v.clone() for k, v in headct_source.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "student_only.pt")
    with pytest.raises(CheckpointImportError, match="--entry teacher needs 'momentum_model_state_dict'"):
        convert_checkpoint("headct-fm", str(tmp_path / "student_only.pt"), entry="teacher")
    lora = dict(state)
    lora["module.backbone.blocks.0.attn.lora_q.lora_matrix_A"] = torch.zeros(128, 768)
    torch.save(lora, tmp_path / "lora.pt")
    with pytest.raises(CheckpointImportError, match=r"blocks.0.attn.lora_q.lora_matrix_A \(128, 768\)"):
        convert_checkpoint("headct-fm", str(tmp_path / "lora.pt"))
    with pytest.raises(CheckpointImportError, match="--roi"):
        bad = dict(state)
        bad["module.backbone.patch_embedding.position_embeddings"] = torch.zeros(1, 12, 768)
        torch.save(bad, tmp_path / "flat.pt")
        convert_checkpoint("headct-fm", str(tmp_path / "flat.pt"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="format 'dinov2'"):
        convert_checkpoint("dinov2", "x.pt")
    with pytest.raises(ValueError, match="entry applies to headct-fm"):
        convert_checkpoint("fmcib", "x.pt", entry="teacher")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        convert_checkpoint("fmcib", "nope.pt")
