"""Per-iteration schedules indexed by the global iteration (never restarted per epoch)."""
from __future__ import annotations

import math


def cosine(it: int, base: float, final: float, total_iters: int, warmup_iters: int = 0,
           warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_iters``, then cosine to ``final``.

    Args:
        it: global iteration (optimizer steps since the start of training, across epochs).
        base: value at the end of warm-up.
        final: value at ``total_iters`` (and after).
        total_iters: length of the whole schedule.
        warmup_iters: warm-up length (0 = none).
        warmup_start: value at iteration 0 when warming up.
    """
    if total_iters <= 0:
        raise ValueError(f"total_iters = {total_iters}; it must be > 0")
    if warmup_iters > 0 and it < warmup_iters:
        return warmup_start + (base - warmup_start) * it / warmup_iters
    span = max(1, total_iters - warmup_iters)
    progress = min(1.0, (it - warmup_iters) / span)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def linear_warmup(it: int, start: float, end: float, warmup_iters: int) -> float:
    """Linear from ``start`` to ``end`` over ``warmup_iters``, constant after (e.g. DINO teacher temperature)."""
    if warmup_iters <= 0 or it >= warmup_iters:
        return end
    return start + (end - start) * it / warmup_iters
