"""Segmentation networks around the zoo's encoders: MONAI decoders, our glue.

Every network keeps the zoo backbone as ``self.encoder`` (loaded beforehand by
:func:`models.zoo.load_pretrained`, strict on coverage) and everything trained from scratch outside
it, so ``encoder.*`` parameters are the pretrained ones. ``forward(x [B, C, D, H, W])`` returns logits
``[B, K + 1, D, H, W]``; SegResNet's decoder also returns its deep-supervision outputs (a list, full
resolution first) in training mode.

=============  ============================================================================================
ViT            UNETR-style: MONAI ``UnetrPrUpBlock`` / ``UnetrUpBlock`` on the hidden states of evenly
               spaced blocks; any isotropic power-of-two patch size (UNETR's own class fixes 12 layers
               and patch 16)
Swin           the SwinUNETR decoder (MONAI ``SwinUNETR`` without its ``swinViT``) on our Swin encoder
SegResNet      SegResNetDS's decoder (``up_layers``, deep supervision) on the SegResNet encoder (CT-FM)
ResNet         a U-Net decoder of ``UnetrUpBlock`` s on the stem and the four stages
=============  ============================================================================================
"""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn as nn
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

from models.vit3d import VisionTransformer3D

Logits = Union[torch.Tensor, list]
NORM = "instance"  # decoder normalisation (UNETR, SwinUNETR); batch statistics of a batch of 2 are noisy


class ViTSegmenter(nn.Module):
    """UNETR-style decoder on a :class:`VisionTransformer3D`.

    With patch size ``p = 2**k`` the bottleneck is the last block's normalised tokens at ``1/p``; skip
    ``j = 1..k-1`` at ``1/2**j`` comes from the hidden state of block ``round(depth * j / k)`` (12
    blocks, patch 16: blocks 3, 6, 9 as UNETR), upsampled by ``UnetrPrUpBlock``; the full-resolution skip
    is a ``UnetrBasicBlock`` on the input.

    Args:
        encoder: the ViT.
        num_classes: output channels (classes + background).
        width: decoder width (UNETR's ``feature_size``): ``width * 2**j`` channels at ``1/2**j``.
    """

    def __init__(self, encoder: VisionTransformer3D, num_classes: int, width: int = 16) -> None:
        super().__init__()
        p = set(encoder.patch_size)
        if len(p) != 1 or (p := p.pop()) < 2 or p & (p - 1):
            raise ValueError(f"the ViT decoder needs an isotropic power-of-two patch size (MODEL.PATCH_SIZE), got "
                             f"{list(encoder.patch_size)}")
        self.encoder = encoder
        self.levels = k = int(math.log2(p))
        depth, dim = len(encoder.blocks), encoder.token_dim
        # skip j (1..k-1) reads block taps[j-1] (1-based block number)
        self.taps = [max(1, round(depth * j / k)) for j in range(1, k)]
        self.stem = UnetrBasicBlock(3, encoder.in_chans, width, kernel_size=3, stride=1, norm_name=NORM, res_block=True)
        self.skips = nn.ModuleList([
            UnetrPrUpBlock(3, dim, width * 2 ** j, num_layer=k - j - 1, kernel_size=3, stride=1, upsample_kernel_size=2,
                           norm_name=NORM, conv_block=True, res_block=True) for j in range(1, k)])
        # up[i] goes from 1/2**(k-i) to 1/2**(k-i-1)
        chans = [dim] + [width * 2 ** j for j in range(k - 1, -1, -1)]
        self.up = nn.ModuleList([
            UnetrUpBlock(3, chans[i], chans[i + 1], kernel_size=3, upsample_kernel_size=2, norm_name=NORM,
                         res_block=True) for i in range(k)])
        self.out = UnetOutBlock(3, width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        grid = enc.grid_size(x.shape[2:])
        t = enc.prepare_tokens(x)  # [B, 1 + R + N, D]
        hidden = {}
        for i, blk in enumerate(enc.blocks, start=1):
            t = blk(t)
            if i in self.taps:
                hidden[i] = t
        to_map = lambda tok: tok[:, enc.num_prefix_tokens:].transpose(1, 2).reshape(  # noqa: E731
            x.shape[0], -1, *grid)  # [B, D, gd, gh, gw]
        y = to_map(enc.norm(t))
        skips = {0: self.stem(x)}
        for j in range(1, self.levels):
            skips[j] = self.skips[j - 1](to_map(hidden[self.taps[j - 1]]))  # [B, width * 2**j, at 1/2**j]
        for i, up in enumerate(self.up):
            y = up(y, skips[self.levels - i - 1])
        return self.out(y)


class SwinSegmenter(nn.Module):
    """SwinUNETR: MONAI's decoder around the zoo's :class:`models.monai_backbones.SwinEncoder`.

    Args:
        encoder: the Swin encoder (its ``feature_size`` sets the decoder's, as in SwinUNETR).
        num_classes: output channels.
    """

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        from monai.networks.nets import SwinUNETR

        self.encoder = encoder
        net = SwinUNETR(in_channels=encoder.in_chans, out_channels=num_classes, feature_size=encoder.feature_size,
                        norm_name=NORM, spatial_dims=3)
        del net.swinViT  # the encoder is ours (already loaded); the rest is the SwinUNETR decoder
        self.decoder = net

    def forward(self, x: torch.Tensor) -> Logits:
        return oriented(self.encoder, self._run, x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        from monai.networks.nets.swin_unetr import SwinTransformer

        if any(s % 32 or s < 64 for s in x.shape[2:]):
            raise ValueError(f"swin segmentation needs input sizes divisible by 32 and at least 64 (DATA.ROI); got "
                             f"{list(x.shape[2:])}: at 32 its deepest stage is one voxel, which instance "
                             "normalisation cannot normalise")
        d = self.decoder
        hs = SwinTransformer.forward(self.encoder, x.contiguous(), True)  # 5 stages, 1/2 .. 1/32
        enc0, enc1, enc2, enc3 = d.encoder1(x), d.encoder2(hs[0]), d.encoder3(hs[1]), d.encoder4(hs[2])
        y = d.decoder5(d.encoder10(hs[4]), hs[3])
        y = d.decoder1(d.decoder2(d.decoder3(d.decoder4(y, enc3), enc2), enc1), enc0)
        return d.out(y)


class SegResSegmenter(nn.Module):
    """SegResNetDS: MONAI's decoder (upsampling levels with a head each) around the SegResNet encoder.

    In training mode with ``deep_supervision > 1`` the output is a list of logits, full resolution
    first, then 1/2, 1/4 ... (MONAI's ``DeepSupervisionLoss`` takes it); in eval mode one tensor.

    Args:
        encoder: :class:`models.monai_backbones.SegResEncoderBackbone`.
        num_classes: output channels.
        deep_supervision: number of outputs (SegResNetDS ``dsdepth``; CT-FM fine-tunes with deep supervision).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, deep_supervision: int = 3) -> None:
        super().__init__()
        from monai.networks.nets import SegResNetDS

        self.encoder = encoder
        net = SegResNetDS(spatial_dims=3, init_filters=encoder.init_filters, in_channels=encoder.in_chans,
                          out_channels=num_classes, act="relu", norm=encoder.norm, blocks_down=encoder.blocks_down,
                          dsdepth=deep_supervision)
        self.shape_factor = net.shape_factor()
        self.dsdepth = net.dsdepth
        self.up_layers = net.up_layers  # only the decoder is kept; net.encoder is dropped

    def forward(self, x: torch.Tensor) -> Logits:
        return oriented(self.encoder, self._run, x)

    def _run(self, x: torch.Tensor) -> Logits:
        if any(s % f for s, f in zip(x.shape[2:], self.shape_factor)):
            raise ValueError(f"segresnet segmentation needs input sizes divisible by {self.shape_factor} (DATA.ROI); "
                             f"got {list(x.shape[2:])}")
        down = self.encoder._forward(x)[::-1]  # deepest first
        y, outputs = down[0], []
        n = len(self.up_layers)
        for i, level in enumerate(self.up_layers):
            y = level["blocks"](level["upsample"](y) + down[i + 1])
            if n - i <= self.dsdepth:
                outputs.append(level["head"](y))
        outputs.reverse()  # full resolution first
        return outputs if self.training and len(outputs) > 1 else outputs[0]


class ResNetSegmenter(nn.Module):
    """U-Net decoder on :class:`models.monai_backbones.ResNet3D`: skips from the stem (1/2) and stages 1-3
    (1/4, 1/8, 1/16), bottleneck stage 4 (1/32), and a full-resolution ``UnetrBasicBlock`` on the input.

    Args:
        encoder: the ResNet.
        num_classes: output channels.
        width: channels of the full-resolution decoder level.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.encoder = encoder
        e = encoder
        stage = [e.layer1, e.layer2, e.layer3, e.layer4]
        out_ch = lambda layer: [m for m in layer.modules() if isinstance(m, nn.Conv3d)][-1].out_channels  # noqa: E731
        skip_ch = [e.bn1.num_features] + [out_ch(s) for s in stage[:3]]  # 1/2, 1/4, 1/8, 1/16
        dec_ch = [max(width, c // 2) for c in skip_ch]
        self.stem = UnetrBasicBlock(3, encoder.in_chans, width, kernel_size=3, stride=1, norm_name=NORM, res_block=True)
        ins = [out_ch(stage[3])] + dec_ch[::-1][:-1]  # 1/32 -> 1/16 -> ... -> 1/2
        self.up = nn.ModuleList([UnetrUpBlock(3, i, o, kernel_size=3, upsample_kernel_size=2, norm_name=NORM,
                                              res_block=True) for i, o in zip(ins, dec_ch[::-1])])
        self.skip_proj = nn.ModuleList([nn.Conv3d(c, o, kernel_size=1) for c, o in zip(skip_ch[::-1], dec_ch[::-1])])
        self.final = UnetrUpBlock(3, dec_ch[0], width, kernel_size=3, upsample_kernel_size=2, norm_name=NORM,
                                  res_block=True)
        self.out = UnetOutBlock(3, width, num_classes)

    def forward(self, x: torch.Tensor) -> Logits:
        return oriented(self.encoder, self._run, x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % 32 for s in x.shape[2:]):
            raise ValueError(f"resnet segmentation needs input sizes divisible by 32 (DATA.ROI); got "
                             f"{list(x.shape[2:])}")
        e = self.encoder
        s0 = e.act(e.bn1(e.conv1(x)))  # 1/2
        s1 = e.layer1(e.maxpool(s0) if not e.no_max_pool else s0)  # 1/4
        s2 = e.layer2(s1)
        s3 = e.layer3(s2)
        y = e.layer4(s3)  # 1/32
        for up, proj, skip in zip(self.up, self.skip_proj, (s3, s2, s1, s0)):
            y = up(y, proj(skip))
        return self.out(self.final(y, self.stem(x)))


def oriented(encoder: nn.Module, run, x: torch.Tensor) -> Logits:
    """``run`` (the whole segmenter) on the encoder's input orientation (``MODEL.INPUT_ORIENTATION``,
    e.g. CT-FM's SPL); the logits (every deep-supervision output) come back on the RAS input grid."""
    to_input, from_input = getattr(encoder, "_to_input", None), getattr(encoder, "_from_input", None)
    if to_input is None:
        return run(x)
    y = run(to_input(x))
    return [from_input(o) for o in y] if isinstance(y, (list, tuple)) else from_input(y)


def build_segmenter(encoder: nn.Module, num_classes: int, width: int = 16) -> nn.Module:
    """The segmentation network of a zoo encoder's family.

    Args:
        encoder: a zoo backbone (ViT, Swin, SegResNet or ResNet), pretrained weights already loaded.
        num_classes: output channels (``len(DOWNSTREAM.SEG_CLASSES) + 1``).
        width: ``DOWNSTREAM.SEG_DECODER_WIDTH`` (ViT and ResNet decoders).
    """
    from models import monai_backbones as mb

    if isinstance(encoder, VisionTransformer3D):
        return ViTSegmenter(encoder, num_classes, width)
    if isinstance(encoder, mb.SwinEncoder):
        return SwinSegmenter(encoder, num_classes)
    if isinstance(encoder, mb.SegResEncoderBackbone):
        return SegResSegmenter(encoder, num_classes)
    if isinstance(encoder, mb.ResNet3D):
        return ResNetSegmenter(encoder, num_classes, width)
    raise ValueError(f"no segmentation decoder for {type(encoder).__name__}")
