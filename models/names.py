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
# array orientation codes (MODEL.INPUT_ORIENTATION): one letter of each pair, the direction each array axis runs to
ORIENTATION_PAIRS = ("RL", "AP", "SI")


def orientation_axes(code: str) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """How a RAS array ``[X, Y, Z]`` becomes an array oriented ``code`` (e.g. 'SPL', 'LPS').

    Returns:
        ``perm``: the RAS axis that becomes each new axis; ``flips``: whether that new axis runs the
        other way (L, P or I).

    Raises:
        ValueError: ``code`` is not three letters, one of each of R/L, A/P, S/I.
    """
    letters = str(code).upper()
    pairs = [next((i for i, p in enumerate(ORIENTATION_PAIRS) if c in p), -1) for c in letters]
    if len(letters) != 3 or sorted(pairs) != [0, 1, 2]:
        raise ValueError(f"orientation {code!r}: expected three letters, one of each of R/L, A/P, S/I (e.g. RAS, SPL)")
    flips = tuple(c == ORIENTATION_PAIRS[i][1] for c, i in zip(letters, pairs))
    return tuple(pairs), flips  # type: ignore[return-value]


NORMS = ("batch", "instance")  # MODEL.NORM (segresnet; both with affine parameters, as SegResEncoder builds them)
