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
BACKBONES = tuple(VIT_SIZES) + ("swin", "segresnet", "resnet18", "resnet50")  # MODEL.NAME
POOLS = ("cls", "mean", "cls+mean")  # MODEL.POOL
POS_EMBEDS = ("sincos", "learned")  # MODEL.POS_EMBED
