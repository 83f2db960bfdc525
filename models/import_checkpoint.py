"""Convert a published foundation model's checkpoint into this zoo's ``backbone.pth`` + ``model.yaml``.

Formats (:data:`FORMATS`), each read in the layout its authors publish:

``ct-fm``          CT-FM's feature extractor (a ``PyTorchModelHubMixin`` folder: ``model.safetensors`` +
                   ``config.json``, MONAI ``SegResEncoder`` keys) or its full SegResNetDS (``encoder.*``
                   kept, the decoder dropped) -> ``segresnet``.
``swinunetr-ssl``  ``model_swinvit.pt`` of MONAI's SwinUNETR self-supervised pretraining
                   (``{"state_dict": {"module.patch_embed...", "module.layers1.0.blocks...", ...}}``,
                   ``mlp.fc1/fc2``, a final ``norm``) -> ``swin``.
``fmcib``          FMCIB's ``model_weights.torch`` (MONAI 3D ResNet-50, widen factor 2, under
                   ``trunk_state_dict`` or a Lightning ``state_dict`` with ``model.trunk.*``) -> ``resnet50``
                   with ``MODEL.FEATURE_SIZE 128``.
``headct-fm``      what the HeadCT-Foundation code saves (MONAI-style ViT: ``patch_embedding.*``,
                   ``blocks.N.att_norm / ffn_norm / mlp.linear1``, ``register_tokens``; under ``module.`` /
                   ``backbone.`` / ``_orig_mod.``; a training checkpoint's ``state_dict`` (student) or
                   ``momentum_model_state_dict`` (teacher)) -> ``vit_base_headct``.

Every conversion is strict: every tensor of the target backbone is filled (from a source tensor, or,
where the source architecture has none, by a rule that keeps the source's function, e.g. a zero qkv
bias, and is listed under ``filled``), every source tensor is used or listed under ``dropped`` with
the reason (decoder, heads, projection, statistics the source model does not use), and anything
else stops with :class:`CheckpointImportError` naming the keys and shapes. The written
``backbone.pth`` is a plain state dict that ``models.zoo.load_pretrained`` loads in full.

The settings the source model expects go to ``model.yaml`` (``MODEL.*``, ``DATA.*``; usable as
``--cfg`` or as a ``_BASE_``); preprocessing this codebase cannot reproduce exactly (orientation,
unclipped intensities, crops around seed points) is written there as comments and under ``notes``
of ``import.json``, which also records the source file, its SHA-256, and what was dropped and filled.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from models.zoo import PretrainedLoadError, _strip_wrappers

logger = logging.getLogger(__name__)

FORMATS = ("ct-fm", "swinunetr-ssl", "fmcib", "headct-fm")
ENTRIES = ("teacher", "student")  # headct-fm: momentum_model_state_dict | state_dict

# CT-FM's SegResEncoder (lighter_zoo / MONAI defaults when config.json leaves a key out)
CTFM_DEFAULTS = {"spatial_dims": 3, "in_channels": 1, "init_filters": 32, "blocks_down": [1, 2, 2, 4, 4],
                 "norm": "batch", "act": "relu"}
ZOO_SEGRESNET_BLOCKS = [1, 2, 2, 4, 4]  # the zoo's segresnet levels
# config.json keys of a SegResNetDS that concern only its decoder / head (the encoder ignores them)
CTFM_DECODER_CONFIG = {"out_channels", "blocks_up", "dsdepth", "upsample_mode", "head_module", "preprocess"}


class CheckpointImportError(PretrainedLoadError):
    """A checkpoint cannot be converted strictly; the message names the file, keys and shapes."""


@dataclass
class Conversion:
    """A source checkpoint mapped onto a zoo backbone.

    Attributes:
        fmt: the format.
        path: the source file (or folder).
        entry: where in the file the weights were found ('' = top level).
        state: zoo key -> tensor (every key of the target backbone).
        origin: zoo key -> source key it came from.
        dropped: source key -> why it is not part of the backbone.

    Source keys are named without the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) segments.
        filled: zoo key -> how it was filled without a source tensor.
        settings: ``"MODEL.NAME"`` -> value, ... (what ``model.yaml`` sets).
        notes: preprocessing of the source model the config cannot express exactly.
        other_entries: top-level entries of the file that hold no backbone (optimizer, epoch, ...).
        unknown: source key -> shape, for tensors of no known role (the conversion then fails).
    """

    fmt: str
    path: str
    entry: str = ""
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    filled: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    other_entries: list[str] = field(default_factory=list)
    unknown: dict[str, tuple] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ reading
def _torch_load(path: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, objects refused by weights_only
        raise CheckpointImportError(
            f"{path}: cannot be read by torch.load(weights_only=True): {e}. If the file also pickles other objects "
            "(a scheduler, a config) and you trust it, save its weights alone first, e.g. "
            "torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pt')") from e


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointImportError(f"{path}: reading .safetensors needs the 'safetensors' package "
                                    "(pip install safetensors; it is in requirements.txt)") from None
    try:
        return dict(load_file(path, device="cpu"))
    except Exception as e:
        raise CheckpointImportError(f"{path}: cannot be read as safetensors: {e}") from e


def _tensors(obj: Any, path: str, where: str) -> dict[str, torch.Tensor]:
    """``obj`` as a state dict with DDP / torch.compile segments removed; error when it is none."""
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointImportError(f"{path}: {where or 'the top level'} holds a {type(obj).__name__}, "
                                    "not a state dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointImportError(f"{path}: {where or 'the top level'} is not a state dict; entries that are "
                                    f"not tensors: {bad[:10]}")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        key = _strip_wrappers(str(k))
        if key in out:
            raise CheckpointImportError(f"{path}: keys {k!r} and another one both become {key!r} once "
                                        "'module.' / '_orig_mod.' are removed")
        out[key] = v
    return out


def _pick_entry(obj: Any, path: str, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """The state dict at the top level or under the first of ``names`` present (and not None)."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _tensors(obj, path, ""), "", []
    if not isinstance(obj, Mapping):
        raise CheckpointImportError(f"{path}: holds a {type(obj).__name__}, not a dict of weights")
    for name in names:
        if obj.get(name) is not None:
            others = sorted(str(k) for k in obj if k != name)
            return _tensors(obj[name], path, repr(name)), name, others
    raise CheckpointImportError(f"{path}: no weights found; expected a state dict or one of {list(names)} at "
                                f"the top level, which has {sorted(map(str, obj))[:12]}")


def _split_prefix(src: Mapping[str, torch.Tensor], prefixes: Sequence[str],
                  probe: Callable[[str], bool], path: str) -> str:
    """The first prefix of ``prefixes`` under which the most keys satisfy ``probe``."""
    best, count = None, 0
    for p in prefixes:
        n = sum(1 for k in src if k.startswith(p) and probe(k[len(p):]))
        if n > count:
            best, count = p, n
    if best is None:
        raise CheckpointImportError(f"{path}: no key looks like the expected architecture under any of the prefixes "
                                    f"{list(prefixes)}; keys are e.g. {sorted(src)[:8]}")
    return best


def sha256(path: str) -> str:
    """Hex SHA-256 of a file, or of a folder's files in name order (name and content)."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in sorted(os.listdir(path))
                                                  if os.path.isfile(os.path.join(path, f))]
    for f in files:
        if len(files) > 1:
            h.update(os.path.basename(f).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ formats
def _ctfm_files(path: str) -> tuple[dict[str, torch.Tensor], dict, str, list[str]]:
    """CT-FM weights and config.json from a hub folder, a .safetensors file or a torch checkpoint."""
    config_path = ""
    if os.path.isdir(path):
        weights = [f for f in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(path, f))]
        if not weights:
            raise CheckpointImportError(f"{path}: a CT-FM folder must hold model.safetensors (or pytorch_model.bin); "
                                        f"it has {sorted(os.listdir(path))[:10]}")
        file = os.path.join(path, weights[0])
        config_path = os.path.join(path, "config.json")
    elif os.path.isfile(path):
        file = path
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
        config_path = beside if os.path.isfile(beside) else ""
    else:
        raise FileNotFoundError(f"CT-FM checkpoint {path!r} does not exist")
    if file.endswith(".safetensors"):
        src, entry, others = _tensors(_load_safetensors(file), file, ""), "", []
    else:
        src, entry, others = _pick_entry(_torch_load(file), file, ("state_dict", "model", "net"))
    config: dict = {}
    if config_path and os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointImportError(f"{config_path}: not readable JSON: {e}") from e
        if not isinstance(config, dict):
            raise CheckpointImportError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    elif os.path.isdir(path):
        raise CheckpointImportError(f"{path}: config.json is missing; it says how the encoder was built")
    return src, config, entry, others


def _ctfm_norm(value: Any, where: str) -> str:
    """config.json's MONAI ``norm`` (name or [name, args]) -> a ``MODEL.NORM`` value (SegResEncoder makes
    norms affine unless the args say ``affine: false``)."""
    name, args = None, None
    if isinstance(value, str):
        name, args = value, {}
    elif isinstance(value, (list, tuple)) and value:
        name, args = value[0], value[1] if len(value) > 1 else {}
    if not isinstance(name, str) or not isinstance(args, dict):
        raise CheckpointImportError(f"{where}: norm = {value!r} is not a MONAI norm name or [name, args]")
    name = name.lower()
    if name == "batch" and args.get("affine", True) and args.get("track_running_stats", True):
        return "batch"
    if name == "instance" and args.get("affine", True) and not args.get("track_running_stats", False):
        return "instance"
    raise CheckpointImportError(f"{where}: norm = {value!r}; the zoo's segresnet supports batch and instance norms "
                                "with affine parameters (SegResEncoder's default) and no instance running statistics")


def _convert_ctfm(path: str, entry: Optional[str]) -> Conversion:
    src, config, found, others = _ctfm_files(path)
    where = os.path.join(path, "config.json") if os.path.isdir(path) else f"{path} (config.json)"
    cfg = {**CTFM_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    stem = next((v for k, v in src.items() if k.endswith("conv_init.weight") and v.ndim == 5), None)
    if "init_filters" not in config and stem is not None:  # no config.json: the width is in the weights
        cfg["init_filters"] = int(stem.shape[0])
    for key in ("anisotropic_scales", "resolution"):
        if config.get(key):
            raise CheckpointImportError(f"{where}: {key} = {config[key]!r}; the zoo's segresnet is isotropic")
    unknown = sorted(set(config) - set(CTFM_DEFAULTS) - CTFM_DECODER_CONFIG - {"anisotropic_scales", "resolution"})
    if unknown:
        raise CheckpointImportError(f"{where}: unknown settings {unknown}; cannot tell whether they change the encoder")
    if int(cfg["spatial_dims"]) != 3:
        raise CheckpointImportError(f"{where}: spatial_dims = {cfg['spatial_dims']}; only 3D encoders import")
    if list(cfg["blocks_down"]) != ZOO_SEGRESNET_BLOCKS:
        raise CheckpointImportError(f"{where}: blocks_down = {cfg['blocks_down']}; the zoo's segresnet has "
                                    f"{ZOO_SEGRESNET_BLOCKS} (CT-FM's)")
    act = cfg["act"][0] if isinstance(cfg["act"], (list, tuple)) else cfg["act"]
    if str(act).lower() != "relu":
        raise CheckpointImportError(f"{where}: act = {cfg['act']!r}; the zoo's segresnet uses relu (CT-FM's)")
    norm = _ctfm_norm(cfg["norm"], where)
    in_chans, width = int(cfg["in_channels"]), int(cfg["init_filters"])
    if in_chans != 1:
        raise CheckpointImportError(f"{where}: in_channels = {in_chans}; CT-FM reads one channel (HU -> [0, 1])")

    conv = Conversion("ct-fm", path, entry=found, other_entries=others)
    conv.settings = {"MODEL.NAME": "segresnet", "MODEL.FEATURE_SIZE": width, "MODEL.NORM": norm,
                     "MODEL.INPUT_ORIENTATION": "SPL", "DATA.WINDOWS": ["512,3072"], "DATA.SPACING": [1.0, 1.0, 3.0],
                     "DATA.ROI": [160, 208, 80], "DATA.FIT": "crop_pad"}
    conv.notes = [
        "CT-FM maps HU [-1024, 2048] -> [0, 1] with clipping: the window '512,3072' is the same map.",
        "CT-FM reads arrays oriented SPL at 3 x 1 x 1 mm (S, P, L): the data stay RAS here, so DATA.SPACING "
        "[1, 1, 3] and DATA.ROI list the same voxels in RAS order, and MODEL.INPUT_ORIENTATION SPL hands the "
        "network its input as SPL arrays (feature maps come back in RAS order).",
        "DATA.ROI [160, 208, 80] covers an adult head at that spacing; any size divisible by 16 works.",
    ]
    if not config:
        conv.notes.append("No config.json was found: CT-FM's architecture was assumed (blocks_down [1, 2, 2, 4, 4], "
                          "batch norm, relu), with init_filters read from conv_init.weight.")
    target = _build(conv.settings, meta=True).state_dict()
    prefix = _split_prefix(src, ("", "encoder.", "model.encoder.", "backbone.encoder.", "model.", "backbone."),
                           lambda k: k in target, path)
    for key, value in src.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name is not None and name in target:
            conv.state[name], conv.origin[name] = value, key
        elif name is None and prefix.endswith("encoder.") \
                and key.startswith(prefix[:-len("encoder.")] + "up_layers."):
            conv.dropped[key] = "SegResNetDS decoder / head (not part of the encoder)"
        elif name is not None and re.search(r"\.(running_mean|running_var|num_batches_tracked)$", name) \
                and norm.startswith("instance"):
            conv.dropped[key] = (f"running statistics of a norm layer that config.json makes InstanceNorm without "
                                 f"running statistics ({cfg['norm']!r}): the source model does not use them")
        else:
            conv.unknown[key] = tuple(value.shape)
    return conv


SWIN_HEADS = (("rotation_head.", "SSL rotation head"), ("contrastive_head.", "SSL contrastive projection"),
              ("conv.", "SSL reconstruction (inpainting) decoder"))


def _convert_swin(path: str, entry: Optional[str]) -> Conversion:
    src, found, others = _pick_entry(_torch_load(path), path, ("state_dict", "model", "net"))
    conv = Conversion("swinunetr-ssl", path, entry=found, other_entries=others)
    prefix = _split_prefix(src, ("", "swinViT."), lambda k: k.startswith(("patch_embed.", "layers1.")), path)
    patch = src.get(prefix + "patch_embed.proj.weight")
    if patch is None or patch.ndim != 5:
        raise CheckpointImportError(f"{path}: no 3D patch embedding '{prefix}patch_embed.proj.weight'; keys are e.g. "
                                    f"{sorted(src)[:8]}")
    width, in_chans = int(patch.shape[0]), int(patch.shape[1])
    if in_chans != 1:
        raise CheckpointImportError(f"{path}: patch_embed.proj.weight {tuple(patch.shape)} reads {in_chans} channels; "
                                    "SwinUNETR's SSL model reads one (HU -> [0, 1])")
    conv.settings = {"MODEL.NAME": "swin", "MODEL.FEATURE_SIZE": width, "DATA.WINDOWS": ["0,2000"],
                     "DATA.SPACING": [1.5, 1.5, 2.0], "DATA.ROI": [96, 96, 96], "DATA.FIT": "crop_pad"}
    conv.notes = [
        "SwinUNETR's pretraining maps HU [-1000, 1000] -> [0, 1] with clipping (window '0,2000'), RAS at "
        "1.5 x 1.5 x 2 mm, 96^3 crops: the settings here.",
        "The final LayerNorm 'norm.*' of the pretraining code's Swin is dropped: MONAI's SwinTransformer (and "
        "SwinUNETR) has none and normalises each stage's output without parameters instead.",
    ]
    target = _build(conv.settings).state_dict()
    for key, value in src.items():
        if not key.startswith(prefix):
            conv.unknown[key] = tuple(value.shape)
            continue
        name = key[len(prefix):]
        head = next((why for p, why in SWIN_HEADS if name.startswith(p)), None)
        if head:
            conv.dropped[key] = head
            continue
        if name in ("norm.weight", "norm.bias"):
            conv.dropped[key] = "final LayerNorm of the pretraining code's Swin (MONAI's SwinTransformer has none)"
            continue
        name = name.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        if name.endswith("relative_position_index") and name in target:
            if not torch.equal(value.long(), target[name].long()):
                raise CheckpointImportError(f"{path}: {key} differs from the index of a window-7 Swin; the "
                                            "checkpoint was trained with another window size")
        conv.state[name] = value
        conv.origin[name] = key
    for name, value in target.items():  # buffers derived from the window size, absent from some files
        if name.endswith("relative_position_index") and name not in conv.state:
            conv.state[name] = value
            conv.filled[name] = "derived from the window size (a constant buffer)"
    return conv


def _resnet_depth(src: Mapping[str, torch.Tensor], path: str) -> int:
    blocks = [len({k.split(".")[1] for k in src if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    bottleneck = any(k.endswith(".conv3.weight") for k in src)
    depth = {(True, (3, 4, 6, 3)): 50, (False, (2, 2, 2, 2)): 18}.get((bottleneck, tuple(blocks)))
    if depth is None:
        raise CheckpointImportError(f"{path}: a ResNet with {blocks} blocks per stage "
                                    f"({'bottleneck' if bottleneck else 'basic'}); the zoo has resnet18 and resnet50")
    return depth


def _convert_fmcib(path: str, entry: Optional[str]) -> Conversion:
    obj = _torch_load(path)
    conv = Conversion("fmcib", path)
    if isinstance(obj, Mapping) and obj.get("trunk_state_dict") is not None:
        src = _tensors(obj["trunk_state_dict"], path, "'trunk_state_dict'")
        conv.entry = "trunk_state_dict"
        for name in obj:
            if name == "trunk_state_dict":
                continue
            if isinstance(obj[name], Mapping) and obj[name] and \
                    all(isinstance(v, torch.Tensor) for v in obj[name].values()):
                for k in obj[name]:
                    conv.dropped[f"{name}.{k}"] = "projection head (SimCLR), not part of the trunk"
            else:
                conv.other_entries.append(str(name))
        prefix = ""
    else:
        src, conv.entry, conv.other_entries = _pick_entry(obj, path, ("state_dict", "model"))
        prefix = _split_prefix(src, ("model.trunk.", "trunk.", ""), lambda k: k.startswith(("conv1.", "layer1.")), path)
    inner = {k[len(prefix):]: v for k, v in src.items() if k.startswith(prefix)}
    stem = inner.get("conv1.weight")
    if stem is None or stem.ndim != 5:
        raise CheckpointImportError(f"{path}: no 3D stem '{prefix}conv1.weight'; keys are e.g. {sorted(src)[:8]}")
    depth, width, in_chans = _resnet_depth(inner, path), int(stem.shape[0]), int(stem.shape[1])
    if in_chans != 1:
        raise CheckpointImportError(f"{path}: {prefix}conv1.weight {tuple(stem.shape)} reads {in_chans} channels; "
                                    "FMCIB reads one")
    conv.settings = {"MODEL.NAME": f"resnet{depth}", "MODEL.FEATURE_SIZE": width, "MODEL.INPUT_ORIENTATION": "LPS",
                     "DATA.WINDOWS": ["512,3072"],
                     "DATA.SPACING": [1.0, 1.0, 1.0], "DATA.ROI": [50, 50, 50], "DATA.FIT": "crop_pad"}
    conv.notes = [
        "FMCIB normalises (HU + 1024) / 3072 without clipping; the window '512,3072' is the same map clipped to "
        "[0, 1] (it differs only above 2048 HU: metal, dense calcium).",
        "FMCIB reads LPS arrays at 1 mm: MODEL.INPUT_ORIENTATION LPS hands the network its RAS input flipped "
        "along x and y.",
        "FMCIB embeds 50^3 crops centred on seed points (coordX/Y/Z); the evaluation views here centre the crop "
        "on the head instead: crop around your seed points before feature extraction to match it.",
        "The stem's stride (conv1_t_stride 2) is not stored in the weights; the zoo's ResNets use stride 2.",
    ]
    target = _build(conv.settings, meta=True).state_dict()
    for key, value in src.items():
        if not key.startswith(prefix):
            head = key.startswith(("model.head.", "head.", "model.heads.", "projection_head."))
            if head:
                conv.dropped[key] = "projection head (SimCLR), not part of the trunk"
            else:
                conv.unknown[key] = tuple(value.shape)
            continue
        name = key[len(prefix):]
        if name.startswith("fc.") and name not in target:
            conv.dropped[key] = "the ResNet's fc layer (FMCIB builds the trunk with feed_forward=False)"
            continue
        conv.state[name], conv.origin[name] = value, key
    return conv


# HeadCT-Foundation ViT key -> zoo key (applied to the name under the backbone prefix)
HEADCT_RENAMES = (
    (r"^patch_embedding\.patch_embeddings\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^patch_embedding\.position_embeddings$", "pos_embed"),
    (r"^cls_token$", "cls_token"),
    (r"^register_tokens$", "reg_tokens"),
    (r"^blocks\.(\d+)\.att_norm\.(weight|bias)$", r"blocks.\1.norm1.\2"),
    (r"^blocks\.(\d+)\.ffn_norm\.(weight|bias)$", r"blocks.\1.norm2.\2"),
    (r"^blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)$", r"blocks.\1.attn.\2.\3"),
    (r"^blocks\.(\d+)\.mlp\.linear1\.(weight|bias)$", r"blocks.\1.mlp.fc1.\2"),
    (r"^blocks\.(\d+)\.mlp\.linear2\.(weight|bias)$", r"blocks.\1.mlp.fc2.\2"),
    (r"^norm\.(weight|bias)$", r"norm.\1"),
)
HEADCT_DROPS = ((r"^classification_head\.", "classification head"), (r"^decoder", "MAE decoder"),
                (r"^mask_token$", "MAE mask token"))
HEADCT_OUTSIDE_DROPS = ((r"^head\.", "DINO projection head"),)


def _convert_headct(path: str, entry: Optional[str], roi: Optional[Sequence[int]] = None) -> Conversion:
    obj = _torch_load(path)
    if entry is not None and entry not in ENTRIES:
        raise ValueError(f"entry = {entry!r}; expected one of {ENTRIES}")
    keys = {"teacher": ("momentum_model_state_dict",), "student": ("state_dict",)}
    names = keys[entry] if entry else ("momentum_model_state_dict", "state_dict", "model", "backbone")
    if entry and isinstance(obj, Mapping) and obj.get(names[0]) is None:
        raise CheckpointImportError(f"{path}: --entry {entry} needs '{names[0]}', which this file does not hold "
                                    f"(top level: {sorted(map(str, obj))[:12]})")
    src, found, others = _pick_entry(obj, path, names)
    conv = Conversion("headct-fm", path, entry=found, other_entries=others)
    prefix = _split_prefix(src, ("", "backbone.", "encoder.", "model.backbone.", "model."),
                           lambda k: k.startswith(("patch_embedding.", "blocks.", "cls_token")), path)
    get = lambda k: src.get(prefix + k)  # noqa: E731
    patch = get("patch_embedding.patch_embeddings.weight")
    if patch is None or patch.ndim != 5:
        raise CheckpointImportError(f"{path}: no 3D patch embedding '{prefix}patch_embedding.patch_embeddings.weight'"
                                    f"; keys are e.g. {sorted(src)[:8]}")
    width, in_chans, patch_size = int(patch.shape[0]), int(patch.shape[1]), [int(s) for s in patch.shape[2:]]
    depth = len({k[len(prefix):].split(".")[1] for k in src if k.startswith(prefix + "blocks.")})
    if (width, depth) != (768, 12):
        raise CheckpointImportError(f"{path}: a ViT of width {width} and {depth} blocks; the zoo's HeadCT-FM variant "
                                    "(vit_base_headct) is ViT-B: width 768, 12 blocks")
    fc1 = get("blocks.0.mlp.linear1.weight")
    if fc1 is not None and tuple(fc1.shape) != (4 * width, width):
        raise CheckpointImportError(f"{path}: {prefix}blocks.0.mlp.linear1.weight {tuple(fc1.shape)}; the zoo's ViT "
                                    f"has an MLP of width 4 x {width}")
    regs = get("register_tokens")
    pos = get("patch_embedding.position_embeddings")
    if pos is None or pos.ndim != 3:
        raise CheckpointImportError(f"{path}: no position table '{prefix}patch_embedding.position_embeddings' "
                                    "[1, N, D] (a ViT with pos_embed 'none' has no zoo counterpart)")
    n = int(pos.shape[1])
    if roi is None:
        side = round(n ** (1 / 3))
        if side ** 3 != n:
            raise CheckpointImportError(f"{path}: the position table has {n} patches, not a cube; give the input "
                                        "size the model was trained at (--roi D H W)")
        grid = [side] * 3
    else:
        grid = [int(r) // p for r, p in zip(roi, patch_size)]
        if [g * p for g, p in zip(grid, patch_size)] != [int(r) for r in roi] or grid[0] * grid[1] * grid[2] != n:
            raise CheckpointImportError(f"{path}: --roi {list(roi)} with patch {patch_size} does not give the "
                                        f"{n} patches of the position table")
    windows = {3: ["brain", "subdural", "bone"], 1: ["40,300"]}.get(in_chans)
    if windows is None:
        raise CheckpointImportError(f"{path}: the patch embedding reads {in_chans} channels; HeadCT-FM uses 3 "
                                    "(brain, subdural, bone) or 1 (40 +- 150 HU)")
    conv.settings = {"MODEL.NAME": "vit_base_headct", "MODEL.PATCH_SIZE": patch_size,
                     "MODEL.NUM_REGISTERS": int(regs.shape[1]) if regs is not None else 0,
                     "MODEL.POS_EMBED": "learned", "MODEL.POOL": "cls", "DATA.WINDOWS": windows,
                     "DATA.SPACING": [1.0, 1.0, 1.0], "DATA.ROI": [g * p for g, p in zip(grid, patch_size)],
                     "DATA.FIT": "resize"}
    conv.notes = [
        "HeadCT-FM: RAS at 1 mm, windows brain 40/80, subdural 80/200, bone 600/2800 (the presets), CLS pooling.",
        "HeadCT-FM resizes the foreground crop to 96^3 without keeping its aspect ratio; DATA.FIT resize keeps the "
        "aspect ratio and pads.",
        "The position table is imported as it was trained (MODEL.POS_EMBED learned), not recomputed.",
    ]
    target = _build(conv.settings, meta=True).state_dict()
    for key, value in src.items():
        if not key.startswith(prefix):
            why = next((w for p, w in HEADCT_OUTSIDE_DROPS if re.match(p, key)), None)
            if why:
                conv.dropped[key] = why
            else:
                conv.unknown[key] = tuple(value.shape)
            continue
        name = key[len(prefix):]
        why = next((w for p, w in HEADCT_DROPS if re.match(p, name)), None)
        if why:
            conv.dropped[key] = why
            continue
        new = next((re.sub(p, r, name) for p, r in HEADCT_RENAMES if re.match(p, name)), None)
        if new is None:
            conv.unknown[key] = tuple(value.shape)
            continue
        if new == "pos_embed":  # [1, N, D] raster order of the patch grid -> [1, D, gd, gh, gw]
            value = value.transpose(1, 2).reshape(1, value.shape[2], *grid)
        conv.state[new], conv.origin[new] = value, key
    for i in range(depth):  # a ViT trained without qkv bias: a zero bias computes the same
        name = f"blocks.{i}.attn.qkv.bias"
        if name in target and name not in conv.state and f"blocks.{i}.attn.qkv.weight" in conv.state:
            conv.state[name] = torch.zeros(target[name].shape)
            conv.filled[name] = "zeros: the source ViT has no qkv bias (USE_BIAS False), so the same function"
    return conv


NO_META = ("swin",)  # MONAI's Swin reads tensor values (.item()) while it is built: never on the meta device
CONVERTERS: dict[str, Callable[..., Conversion]] = {"ct-fm": _convert_ctfm, "swinunetr-ssl": _convert_swin,
                                                    "fmcib": _convert_fmcib, "headct-fm": _convert_headct}


# ------------------------------------------------------------------------------------------ target
def settings_config(settings: Mapping[str, Any]):
    """The default config with ``settings`` (``"MODEL.NAME": ...``) applied, validated (not frozen)."""
    from config import get_defaults, validate

    cfg = get_defaults()
    for key, value in settings.items():
        group, name = key.split(".")
        cfg[group][name] = value
    validate(cfg)
    return cfg


def _build(settings: Mapping[str, Any], meta: bool = False) -> torch.nn.Module:
    """The zoo backbone of ``settings``; with ``meta``, on the meta device (names and shapes, no memory)
    where the architecture can be built there."""
    from models.zoo import build_backbone

    if meta and settings.get("MODEL.NAME") not in NO_META:
        with torch.device("meta"):
            return build_backbone(settings_config(settings))
    return build_backbone(settings_config(settings))


def _check_strict(conv: Conversion, model: torch.nn.Module) -> None:
    """Raise naming every unrecognised, missing or shape-mismatched tensor."""
    target = model.state_dict()
    unexpected = [f"{conv.origin.get(k, k)} {tuple(v.shape)}" + (f" (as {k})" if conv.origin.get(k, k) != k else "")
                  for k, v in conv.state.items() if k not in target]
    missing = [f"{k} {tuple(target[k].shape)}" for k in target if k not in conv.state]
    mismatched = [f"{conv.origin.get(k, k)} {tuple(v.shape)} -> {k} {tuple(target[k].shape)}"
                  for k, v in conv.state.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
    problems = []
    for label, items in (("source tensors of no known role", [f"{k} {s}" for k, s in conv.unknown.items()]),
                         ("source tensors the backbone lacks", unexpected),
                         ("backbone tensors with no source", missing), ("shape mismatches", mismatched)):
        if items:
            problems.append(f"{len(items)} {label}: {items[:8]}{' ...' if len(items) > 8 else ''}")
    if problems:
        name = conv.settings.get("MODEL.NAME")
        raise CheckpointImportError(f"{conv.path}: not a {conv.fmt} checkpoint the zoo's {name} can hold exactly "
                                    f"(entry {conv.entry or '<top level>'!r}); " + "; ".join(problems))


def convert_checkpoint(fmt: str, path: str, entry: Optional[str] = None,
                       roi: Optional[Sequence[int]] = None) -> tuple[Conversion, torch.nn.Module]:
    """Read a published checkpoint and load it, strictly, into the zoo backbone it corresponds to.

    Args:
        fmt: one of :data:`FORMATS`.
        path: the file (or, for ct-fm, the hub folder).
        entry: headct-fm only: 'teacher' (``momentum_model_state_dict``) or 'student' (``state_dict``)
            of a training checkpoint; None = the teacher when present.
        roi: headct-fm only: the input size ``[D, H, W]`` the ViT was trained at when its position
            table is not a cube.

    Returns:
        The conversion record and the backbone holding the weights (eval mode).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointImportError: the file cannot be read, or does not map one-to-one onto the backbone.
    """
    if fmt not in CONVERTERS:
        raise ValueError(f"format {fmt!r}; expected one of {list(FORMATS)}")
    if entry is not None and fmt != "headct-fm":
        raise ValueError(f"entry applies to headct-fm training checkpoints only, not to {fmt}")
    if roi is not None and fmt != "headct-fm":
        raise ValueError(f"roi applies to headct-fm only, not to {fmt}")
    conv = CONVERTERS[fmt](path, entry, roi) if fmt == "headct-fm" else CONVERTERS[fmt](path, entry)
    _check_strict(conv, _build(conv.settings, meta=True))  # before allocating the backbone
    model = _build(conv.settings)
    target = model.state_dict()
    state = {k: v.to(dtype=target[k].dtype) for k, v in conv.state.items()}
    model.load_state_dict(state, strict=True)
    conv.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return conv, model.eval()


# ------------------------------------------------------------------------------------------ writing
def model_yaml(conv: Conversion, backbone_path: str, digest: str) -> str:
    """The text of ``model.yaml``: comments on the source, then its MODEL.* and DATA.* settings."""
    tree: dict[str, dict[str, Any]] = {}
    for key, value in {**conv.settings, "MODEL.PRETRAINED": os.path.abspath(backbone_path)}.items():
        group, name = key.split(".")
        tree.setdefault(group, {})[name] = value
    head = [f"# imported by tools/import_checkpoint.py --format {conv.fmt}",
            f"# source: {os.path.abspath(conv.path)} (sha256 {digest})",
            f"# entry: {conv.entry or '<top level>'}; {len(conv.state)} backbone tensors; "
            f"{len(conv.dropped)} source tensors dropped, {len(conv.filled)} filled (import.json lists them)"]
    head += [f"# note: {n}" for n in conv.notes]
    body = []  # one key a line, values as JSON (valid YAML): MODEL first, then DATA
    for group in sorted(tree, key=lambda g: (g != "MODEL", g)):
        body.append(f"{group}:")
        body += [f"  {name}: {json.dumps(value)}" for name, value in tree[group].items()]
    return "\n".join(head + body) + "\n"


def _summarise(keys: Mapping[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for why in keys.values():
        counts[why] = counts.get(why, 0) + 1
    return counts


def import_checkpoint(fmt: str, path: str, out: str, entry: Optional[str] = None,
                      roi: Optional[Sequence[int]] = None) -> dict:
    """Convert ``path`` and write ``out`` (``backbone.pth``), ``model.yaml`` and ``import.json`` beside it.

    Args:
        fmt: one of :data:`FORMATS`.
        path: the published file (or, for ct-fm, the hub folder).
        out: where the backbone state dict goes (its folder gets model.yaml and import.json).
        entry: see :func:`convert_checkpoint`.
        roi: see :func:`convert_checkpoint`.

    Returns:
        The report written to ``import.json``: ``format``, ``source``, ``sha256``, ``entry``,
        ``settings``, ``tensors``, ``dropped`` / ``filled`` (key -> reason), ``renamed`` (zoo key ->
        source key where they differ), ``other_entries``, ``notes``, ``backbone``, ``model_yaml``.
    """
    from engine.checkpoint import atomic_save

    conv, _ = convert_checkpoint(fmt, path, entry=entry, roi=roi)
    digest = sha256(path)
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    atomic_save(conv.state, out)
    yaml_path = os.path.join(folder, "model.yaml")
    with open(yaml_path + ".tmp", "w") as f:
        f.write(model_yaml(conv, out, digest))
    os.replace(yaml_path + ".tmp", yaml_path)
    report = {"format": fmt, "source": os.path.abspath(path), "sha256": digest, "entry": conv.entry,
              "settings": conv.settings, "tensors": len(conv.state), "dropped": conv.dropped, "filled": conv.filled,
              "renamed": {k: v for k, v in conv.origin.items() if k != v}, "other_entries": conv.other_entries,
              "notes": conv.notes, "backbone": os.path.abspath(out), "model_yaml": yaml_path}
    json_path = os.path.join(folder, "import.json")
    with open(json_path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(json_path + ".tmp", json_path)
    logger.info("imported %s (%s, entry %r): %d backbone tensors -> %s", path, fmt, conv.entry or "<top level>",
                len(conv.state), out)
    for why, n in _summarise(conv.dropped).items():
        logger.info("dropped %d source tensors: %s", n, why)
    for why, n in _summarise(conv.filled).items():
        logger.info("filled %d backbone tensors: %s", n, why)
    return report
