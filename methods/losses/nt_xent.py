"""NT-Xent (SimCLR's normalised temperature-scaled cross entropy) with negatives from every rank.

Embeddings are L2-normalised; for an anchor ``i`` with positive ``p(i)`` and candidate set ``K``
(every embedding of the *global* batch but ``i`` itself)::

    loss_i = -log( exp(cos(z_i, z_p(i)) / T) / sum_{k in K} exp(cos(z_i, z_k) / T) )

and the loss is the mean over anchors. Which rows are anchors and which row is each anchor's
positive is given by a ``positive`` index vector (``-1`` = a candidate only, never an anchor), so
one function serves SimCLR between scans, within scans and with mined negatives.

Across ranks (training under DDP) each rank scores its own anchors against the embeddings of all
ranks, gathered with :class:`GatherWithGrad` (an all-gather whose backward sums every rank's
gradient for each slice: an all-reduce, so Gloo works too; ``torch.distributed.nn.functional.all_gather``
needs reduce-scatter or all-to-all there). The loss on each rank is the mean over its anchors;
DDP's gradient averaging then yields exactly the gradient of the mean over the global batch,
i.e. of one process holding the concatenated batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 that passes gradients back to every rank's slice.

    Forward: ``[N, ...]`` on each of W ranks -> ``[W*N, ...]`` (rank order) on every rank; every rank
    must hold the same ``N``. Backward: the gradients that all ranks computed for the gathered
    tensor are summed (all-reduce) and each rank keeps the rows of its own slice.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world = _world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x [N, ...]`` of every rank concatenated ``[W*N, ...]`` and this rank's row offset ``rank * N``.

    A single process (or no process group) returns ``(x, 0)``.
    """
    rank, world = _world()
    if world == 1:
        return x, 0
    return GatherWithGrad.apply(x), rank * x.shape[0]


def nt_xent_logits(z: torch.Tensor, positive: torch.Tensor, temperature: float, gather: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of the NT-Xent cross entropy (the loss is ``F.cross_entropy`` of them).

    Args:
        z: embeddings ``[N, P]`` of this rank (any float dtype; computed in float32).
        positive: long ``[N]``: for each row the index (in this rank's ``z``) of its positive, or -1
            for rows that are only candidates (negatives), never anchors.
        temperature: T > 0.
        gather: score against the embeddings of all ranks (training under DDP); every rank must
            hold the same N and call this together.

    Returns:
        ``logits [A, W*N]`` (float32, the anchor's own column set to -inf) and ``target [A]`` (long,
        column of each anchor's positive), for the A anchors of this rank in row order.
    """
    if z.ndim != 2 or positive.shape != (z.shape[0],):
        raise ValueError(f"expected z [N, P] and positive [N]; got {tuple(z.shape)} and {tuple(positive.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature = {temperature}; it must be > 0")
    z = F.normalize(z.float(), dim=1)  # [N, P]
    keys, offset = gather_with_grad(z) if gather else (z, 0)  # [W*N, P]
    anchors = torch.nonzero(positive >= 0).squeeze(1)  # [A]
    if anchors.numel() == 0:
        raise ValueError("no anchors: every entry of `positive` is -1")
    if (positive[anchors] == anchors).any() or (positive >= z.shape[0]).any():
        raise ValueError("`positive` must point at another row of z for every anchor")
    logits = z[anchors] @ keys.t() / temperature  # [A, W*N]
    own = torch.zeros_like(logits, dtype=torch.bool)
    own[torch.arange(anchors.numel(), device=z.device), offset + anchors] = True
    return logits.masked_fill(own, float("-inf")), offset + positive[anchors]


def nt_xent(z: torch.Tensor, positive: torch.Tensor, temperature: float, gather: bool = False) -> torch.Tensor:
    """Mean NT-Xent over this rank's anchors (see :func:`nt_xent_logits` for the arguments)."""
    logits, target = nt_xent_logits(z, positive, temperature, gather)
    return F.cross_entropy(logits, target)


def pair_positives(batch_size: int, views_per_sample: int, anchor_views: int, device=None) -> torch.Tensor:
    """``positive`` for rows laid out ``b * V + v`` where views ``2k, 2k + 1`` form a positive pair.

    Args:
        batch_size: B samples.
        views_per_sample: V (even).
        anchor_views: views ``v < anchor_views`` are anchors (positive ``v ^ 1``); the rest are
            candidates only (-1), e.g. the negative crop of mined-negative SimCLR.
        device: of the result.

    Returns:
        long ``[B * V]``.
    """
    if views_per_sample % 2 or not 0 < anchor_views <= views_per_sample or anchor_views % 2:
        raise ValueError(f"views_per_sample = {views_per_sample} and anchor_views = {anchor_views} must be even "
                         "with 0 < anchor_views <= views_per_sample")
    v = torch.arange(views_per_sample, device=device)
    pattern = torch.where(v < anchor_views, v ^ 1, torch.full_like(v, -1))  # [V]
    base = torch.arange(batch_size, device=device)[:, None] * views_per_sample  # [B, 1]
    return torch.where(pattern >= 0, base + pattern, pattern).reshape(-1)  # [B * V]
