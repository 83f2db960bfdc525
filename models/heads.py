"""Heads on top of a backbone: DINO head, SimCLR projection MLP, linear and attentive classifiers."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm


def _trunc_normal_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class DINOHead(nn.Module):
    """DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

    The last layer is ``weight_norm(Linear(bottleneck, out_dim, bias=False))`` through
    ``torch.nn.utils.parametrizations`` (state-dict keys
    ``last_layer.parametrizations.weight.original0`` (norm g, ``[out_dim, 1]``) and ``.original1``
    (direction v)). With ``norm_last_layer`` the norm is fixed at 1 (``requires_grad=False``), so
    DDP and the optimizer skip it. Parametrized modules deep-copy cleanly (EMA teacher).

    Args:
        in_dim: backbone feature width.
        out_dim: number of prototypes (``DINO.OUT_DIM``).
        hidden_dim: MLP width (``DINO.HEAD_HIDDEN_DIM``).
        bottleneck_dim: width before the last layer (``DINO.HEAD_BOTTLENECK_DIM``).
        nlayers: Linear layers of the MLP (>= 1); GELU between them.
        norm_last_layer: fix the last layer's weight norm to 1 (``DINO.NORM_LAST_LAYER``).
        use_bn: BatchNorm1d after each hidden Linear (``DINO.HEAD_BN``, as DINO's ``use_bn``) and,
            without affine parameters, on the bottleneck (as MoCo v3's projector). They use the
            statistics of the batch they see, in training and evaluation alike (no running buffers:
            nothing to average across ranks or to copy into the teacher), so a forward needs more
            than one sample. They rescale the part of the features that varies across the batch and
            centre the bottleneck, which keeps a small, homogeneous dataset from collapsing to one
            output for every scan.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True, use_bn: bool = False) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers = {nlayers}; it must be >= 1")
        def hidden(width_in: int) -> list[nn.Module]:
            bn = [nn.BatchNorm1d(hidden_dim, track_running_stats=False)] if use_bn else []
            return [nn.Linear(width_in, hidden_dim), *bn, nn.GELU()]
        layers: list[nn.Module] = []
        for i in range(nlayers - 1):
            layers += hidden(in_dim if i == 0 else hidden_dim)
        layers.append(nn.Linear(hidden_dim if nlayers > 1 else in_dim, bottleneck_dim))
        if use_bn:  # as MoCo v3's projector: the bottleneck centred and scaled over the batch
            layers.append(nn.BatchNorm1d(bottleneck_dim, affine=False, track_running_stats=False))
        self.mlp = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
        self.use_bn = bool(use_bn)
        _trunc_normal_init(self.mlp)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        nn.init.trunc_normal_(last.weight, std=0.02)
        self.last_layer = weight_norm(last, name="weight", dim=0)
        g = self.last_layer.parametrizations.weight.original0  # [out_dim, 1]
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_dim]`` -> logits ``[..., out_dim]`` (BatchNorm pools every leading position)."""
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if self.use_bn and x.shape[0] < 2:
            raise ValueError(f"DINO head with BatchNorm (DINO.HEAD_BN) got {x.shape[0]} feature vector(s); "
                             "batch statistics need at least 2 per forward (raise DATA.BATCH_SIZE)")
        x = self.mlp(x).reshape(*lead, -1)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


class ProjectionMLP(nn.Module):
    """SimCLR projection head: (Linear -> [BatchNorm1d] -> ReLU) x (num_layers-1) -> Linear.

    Args:
        in_dim: backbone feature width.
        hidden_dim: hidden width (``SIMCLR.PROJ_HIDDEN_DIM``).
        out_dim: output width (``SIMCLR.PROJ_DIM``).
        num_layers: Linear layers (>= 1).
        use_bn: BatchNorm1d after each hidden Linear (SimCLR v2); needs batches > 1 in training.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, num_layers: int = 2,
                 use_bn: bool = True) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers = {num_layers}; it must be >= 1")
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(d, hidden_dim, bias=not use_bn))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            d = hidden_dim
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_dim]`` -> ``[B, out_dim]`` (not normalised; the loss normalises)."""
        return self.net(x)


class LinearClassifier(nn.Module):
    """Linear probe: BatchNorm1d without affine (feature standardisation) + Linear (MAE linprobe).

    A training batch of one sample is normalised with the running statistics instead of failing.

    Args:
        in_dim: feature width (``backbone.embed_dim``).
        num_classes: outputs (one logit per label).
    """

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_dim]`` pooled features -> logits ``[B, num_classes]``."""
        if x.ndim != 2:
            raise ValueError(f"LinearClassifier expects pooled features [B, D]; got {tuple(x.shape)}")
        if self.training and x.shape[0] == 1:
            x = F.batch_norm(x, self.bn.running_mean, self.bn.running_var, training=False, eps=self.bn.eps)
        else:
            x = self.bn(x)
        return self.fc(x)


def feature_map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, d, h, w]`` CNN feature map -> ``[B, d*h*w, C]`` tokens; ``[B, T, D]`` passes through."""
    if x.ndim == 5:
        return x.flatten(2).transpose(1, 2)
    if x.ndim == 3:
        return x
    raise ValueError(f"expected tokens [B, T, D] or a feature map [B, C, d, h, w]; got {tuple(x.shape)}")


class AttentiveClassifier(nn.Module):
    """Attentive probe: a learned query cross-attends over all tokens, then a linear layer.

    ``pooled = q + Attn(q, LN(tokens)); pooled = pooled + MLP(LN(pooled)); logits = Linear(LN(pooled))``.
    Uses ``F.scaled_dot_product_attention``.

    Args:
        in_dim: token width (``backbone.token_dim``; channels of a CNN feature map).
        num_classes: outputs.
        num_heads: attention heads (``in_dim`` divisible by it); default ``in_dim // 64`` when
            that divides, else 1.
        mlp_ratio: hidden width of the residual MLP / in_dim.
    """

    def __init__(self, in_dim: int, num_classes: int, num_heads: int = 0, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if num_heads <= 0:
            num_heads = in_dim // 64 if in_dim % 64 == 0 else 1
        if in_dim % num_heads:
            raise ValueError(f"in_dim {in_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, in_dim))
        self.norm_kv = nn.LayerNorm(in_dim, eps=1e-6)
        self.q = nn.Linear(in_dim, in_dim)
        self.kv = nn.Linear(in_dim, 2 * in_dim)
        self.proj = nn.Linear(in_dim, in_dim)
        self.norm_mlp = nn.LayerNorm(in_dim, eps=1e-6)
        hidden = int(in_dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, in_dim))
        self.norm_out = nn.LayerNorm(in_dim, eps=1e-6)
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.query, std=0.02)
        _trunc_normal_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, T, D]`` or a feature map ``[B, D, d, h, w]`` -> logits ``[B, num_classes]``."""
        tokens = self.norm_kv(feature_map_to_tokens(x))  # [B, T, D]
        b, t, d = tokens.shape
        hd = d // self.num_heads
        q = self.q(self.query).expand(b, -1, -1)  # [B, 1, D]
        k, v = self.kv(tokens).reshape(b, t, 2, self.num_heads, hd).permute(2, 0, 3, 1, 4)  # [B, h, T, hd]
        q = q.reshape(b, 1, self.num_heads, hd).transpose(1, 2)  # [B, h, 1, hd]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, 1, hd]
        pooled = self.query + self.proj(out.transpose(1, 2).reshape(b, 1, d))  # [B, 1, D]
        pooled = pooled + self.mlp(self.norm_mlp(pooled))
        return self.fc(self.norm_out(pooled[:, 0]))
