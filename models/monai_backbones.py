"""MONAI 3D encoders behind the zoo interface.

Each class subclasses the MONAI network itself, so its ``state_dict`` keys are MONAI's own
(a SwinUNETR checkpoint loads after stripping ``swinViT.``, a CT-FM SegResEncoder or MONAI ResNet
checkpoint loads as is) and adds:

- ``embed_dim``: width of ``forward``'s output; ``token_dim``: channels of the feature map;
- ``forward_features(x) -> [B, C', d, h, w]`` (last-stage feature map);
- ``forward(x) -> [B, embed_dim]`` (global average pool of that map);
- ``no_weight_decay() -> set[str]``;
- ``input_orientation`` (``MODEL.INPUT_ORIENTATION``): the network sees its input permuted / flipped from
  the data's RAS array order to this code (a model trained on SPL or LPS arrays: CT-FM, FMCIB), and
  ``forward_features`` returns the feature map permuted / flipped back, so callers see RAS order.

Import cost: MONAI takes seconds to import, so ``models.zoo`` imports this module only when a
MONAI encoder is asked for.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck
from monai.networks.nets.segresnet_ds import SegResEncoder
from monai.networks.nets.swin_unetr import SwinTransformer

from models.names import orientation_axes


def _check_input(x: torch.Tensor, in_chans: int, name: str) -> None:
    if x.ndim != 5 or x.shape[1] != in_chans:
        raise ValueError(f"{name} expects input [B, {in_chans}, D, H, W]; got {tuple(x.shape)}")


class _Oriented:
    """Input orientation of an encoder: RAS arrays in, the network run on ``input_orientation`` arrays."""

    input_orientation = "RAS"

    def set_input_orientation(self, code: str) -> None:
        """Run the network on arrays oriented ``code`` (e.g. 'SPL'); ValueError for a bad code."""
        perm, flips = orientation_axes(code)
        self.input_orientation = code.upper()
        self._perm, self._flips = perm, [2 + i for i, f in enumerate(flips) if f]

    def _to_input(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, X, Y, Z] (RAS) -> [B, C, *axes of input_orientation]
        if self.input_orientation == "RAS":
            return x
        x = x.permute(0, 1, *(2 + p for p in self._perm))
        return x.flip(self._flips) if self._flips else x

    def _from_input(self, f: torch.Tensor) -> torch.Tensor:
        # feature map in the input orientation's axes -> RAS axes (the inverse of _to_input)
        if self.input_orientation == "RAS":
            return f
        f = f.flip(self._flips) if self._flips else f
        inverse = [self._perm.index(i) for i in range(3)]
        return f.permute(0, 1, *(2 + p for p in inverse))


class SwinEncoder(_Oriented, SwinTransformer):
    """The SwinUNETR Swin-Transformer encoder (as in SwinUNETR self-supervised pretraining).

    Patch size 2, window 7, depths (2, 2, 2, 2), heads (3, 6, 12, 24): the SwinUNETR defaults.
    The last stage (after its patch merging) has ``16 * feature_size`` channels at 1/32 of the
    input size; ``forward`` averages it over space. Inputs divisible by 32 are the natural sizes.

    Args:
        in_chans: input channels.
        feature_size: embedding width of the first stage (multiple of 12; SwinUNETR uses 48).
        depths: blocks per stage.
        num_heads: heads per stage.
        window_size: local attention window (per axis).
        drop_path_rate: stochastic depth rate.
    """

    def __init__(self, in_chans: int, feature_size: int = 48, depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                 drop_path_rate: float = 0.0) -> None:
        try:
            import einops  # noqa: F401  (MONAI's Swin blocks rearrange with it)
        except ImportError:
            raise ImportError("MODEL.NAME swin needs the einops package (pip install einops)") from None
        if feature_size % 12:
            raise ValueError(f"swin needs MODEL.FEATURE_SIZE divisible by 12 (heads 3/6/12/24); got {feature_size}")
        super().__init__(in_chans=in_chans, embed_dim=feature_size, window_size=(window_size,) * 3,
                         patch_size=(2, 2, 2), depths=depths, num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True,
                         drop_path_rate=drop_path_rate, norm_layer=nn.LayerNorm, spatial_dims=3,
                         downsample="merging", use_v2=False)
        self.in_chans = in_chans
        self.feature_size = feature_size
        # MONAI's SwinTransformer sets embed_dim = first-stage width; the zoo's embed_dim is the output
        self.embed_dim = feature_size * 2 ** len(depths)
        self.token_dim = self.embed_dim
        self.mask_token = None  # [1, F, 1, 1, 1], the embedding of masked blocks; made by a method that masks (Alice)

    def grid_size(self, spatial_shape: Sequence[int]) -> tuple[int, int, int]:
        """Tokens per axis of the last stage (one per 32^3 block of the input); ValueError unless divisible."""
        if any(int(s) % 32 for s in spatial_shape):
            raise ValueError(f"swin tokens need input sizes divisible by 32; got {list(spatial_shape)}")
        return tuple(int(s) // 32 for s in spatial_shape)  # type: ignore[return-value]

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, C, D, H, W]`` -> layer-normalised last stage ``[B, 16F, D/32, H/32, W/32]``.

        ``mask`` (``[B, N]`` bool over the ``D/32 x H/32 x W/32`` token grid, row-major; True = masked): every
        patch embedding of a masked token's 32^3 block is replaced by :attr:`mask_token` before the stages (as
        SimMIM masks a Swin), so the encoder sees nothing of those blocks. Needs RAS input orientation.
        """
        _check_input(x, self.in_chans, "swin")
        if mask is None:
            return self._from_input(super().forward(self._to_input(x).contiguous(), normalize=True)[-1])
        if self.mask_token is None or self.input_orientation != "RAS":
            raise ValueError("a masked swin forward needs a mask token and RAS input orientation")
        grid = self.grid_size(x.shape[2:])
        x0 = self.patch_embed(x.contiguous())  # [B, F, D/2, H/2, W/2]
        m = mask.reshape(x.shape[0], 1, *grid)
        for ax in (2, 3, 4):  # token grid -> patch-embedding grid: 16 embeddings a token per axis
            m = m.repeat_interleave(16, dim=ax)
        x0 = torch.where(m, self.mask_token.to(x0.dtype), x0)
        x0 = self.pos_drop(x0)
        for stage in (self.layers1, self.layers2, self.layers3, self.layers4):
            x0 = stage[0](x0.contiguous())
        return self.proj_out(x0, normalize=True)

    def forward_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last stage as tokens: ``[B, N, 16F]``, ``N = D/32 * H/32 * W/32`` in row-major grid order."""
        return self.forward_features(x, mask).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``[B, C, D, H, W]`` -> ``[B, embed_dim]``."""
        return self.forward_features(x).mean(dim=(2, 3, 4))

    def no_weight_decay(self) -> set[str]:
        """Relative position bias tables (as Swin)."""
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}


class SegResEncoderBackbone(_Oriented, SegResEncoder):
    """The SegResNet encoder (MONAI ``SegResEncoder``, as CT-FM's pretraining trunk).

    CT-FM uses ``init_filters=32, blocks_down=(1, 2, 2, 4, 4)`` with batch norm; the width here
    comes from ``MODEL.FEATURE_SIZE``. The last level has ``init_filters * 2**(levels-1)``
    channels at ``1 / 2**(levels-1)`` of the input size.

    Args:
        in_chans: input channels.
        init_filters: filters of the first level.
        blocks_down: residual blocks per level.
        norm: MONAI norm name or (name, args); SegResEncoder gives norms affine parameters unless
            the args say otherwise ('batch', MONAI's default, and 'instance' are ``MODEL.NORM``'s choices).
    """

    def __init__(self, in_chans: int, init_filters: int = 32, blocks_down: Sequence[int] = (1, 2, 2, 4, 4),
                 norm: str | tuple = "batch") -> None:
        super().__init__(spatial_dims=3, init_filters=init_filters, in_channels=in_chans, act="relu", norm=norm,
                         blocks_down=tuple(blocks_down))
        self.in_chans = in_chans
        self.embed_dim = init_filters * 2 ** (len(blocks_down) - 1)
        self.token_dim = self.embed_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, D, H, W]`` -> last level ``[B, embed_dim, D/16, H/16, W/16]`` (5 levels)."""
        _check_input(x, self.in_chans, "segresnet")
        return self._from_input(self._forward(self._to_input(x))[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``[B, C, D, H, W]`` -> ``[B, embed_dim]``."""
        return self.forward_features(x).mean(dim=(2, 3, 4))

    def no_weight_decay(self) -> set[str]:
        """None beyond the engine's rule (norms and biases)."""
        return set()


class ResNet3D(_Oriented, ResNet):
    """MONAI 3D ResNet without its fc layer (as FMCIB's ResNet-50 trunk).

    ``conv1`` has stride 2 (FMCIB and the 2D ResNet; MONAI's default is 1), followed by max-pool
    and 3 strided stages: the feature map is at 1/32 of the input size.

    Args:
        depth: 18 (basic blocks) or 50 (bottlenecks).
        in_chans: input channels.
        width: channels of the first stage (64 in the standard ResNet, 128 in FMCIB's widened one);
            stages use ``width * (1, 2, 4, 8)``.
    """

    LAYERS = {18: ("basic", [2, 2, 2, 2]), 50: ("bottleneck", [3, 4, 6, 3])}

    def __init__(self, depth: int, in_chans: int, width: int = 64) -> None:
        if depth not in self.LAYERS:
            raise ValueError(f"ResNet depth {depth} not supported; expected one of {list(self.LAYERS)}")
        block, layers = self.LAYERS[depth]
        super().__init__(block=block, layers=layers, block_inplanes=[width, 2 * width, 4 * width, 8 * width],
                         spatial_dims=3, n_input_channels=in_chans, conv1_t_size=7, conv1_t_stride=2,
                         feed_forward=False)
        expansion = (ResNetBlock if block == "basic" else ResNetBottleneck).expansion
        self.in_chans = in_chans
        self.embed_dim = 8 * width * expansion
        self.token_dim = self.embed_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, D, H, W]`` -> ``[B, embed_dim, D/32, H/32, W/32]``."""
        _check_input(x, self.in_chans, "resnet")
        x = self.act(self.bn1(self.conv1(self._to_input(x))))
        if not self.no_max_pool:
            x = self.maxpool(x)
        return self._from_input(self.layer4(self.layer3(self.layer2(self.layer1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``[B, C, D, H, W]`` -> ``[B, embed_dim]``."""
        return self.forward_features(x).mean(dim=(2, 3, 4))

    def no_weight_decay(self) -> set[str]:
        """None beyond the engine's rule (norms and biases)."""
        return set()
