"""The names ``MODEL.*`` may take, defined once: ``config.py`` validates against them (without importing
torch) and the zoo builds from them."""
from __future__ import annotations

# ViT name -> (embed_dim, depth, num_heads)
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
# named ViT variants: name -> (size in VIT_SIZES, VisionTransformer3D arguments that differ from the default)
VIT_VARIANTS: dict[str, tuple[str, dict[str, float]]] = {
    # HeadCT-Foundation's ViT-B (MONAI-style blocks): LayerNorm eps 1e-5 inside the blocks, 1e-6 final
    "vit_base_headct": ("vit_base", {"block_norm_eps": 1e-5}),
}
VIT_NAMES = tuple(VIT_SIZES) + tuple(VIT_VARIANTS)
BACKBONES = VIT_NAMES + ("swin", "segresnet", "resnet18", "resnet50")  # MODEL.NAME
POOLS = ("cls", "mean", "cls+mean")  # MODEL.POOL
POS_EMBEDS = ("sincos", "learned")  # MODEL.POS_EMBED
NORMS = ("batch", "instance")  # MODEL.NORM (segresnet; both with affine parameters, as SegResEncoder builds them)
