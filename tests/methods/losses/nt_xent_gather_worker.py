"""Run under torchrun (Gloo): NT-Xent with negatives gathered across ranks on a tiny linear encoder.

    python -m torch.distributed.run --nproc_per_node 2 \
        tests/methods/losses/nt_xent_gather_worker.py OUT.pt V,A [V,A ...]

For each case (V views per sample, the first A of them anchors) every rank builds the same encoder
and the same global inputs, takes its own rows, computes ``nt_xent(..., gather=True)``,
backpropagates, and averages loss and gradients over ranks as DDP does. Rank 0 saves
``{"V,A": {"loss", "grad_weight", "grad_bias", "input_grad"}, "world": W}`` (input_grad: every
rank's input-gradient slice, gathered in rank order and divided by the world size as the
parameter gradients are) for the test to compare with one process holding the whole batch.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository, run as a script by torchrun

from methods.losses.nt_xent import nt_xent, pair_positives  # noqa: E402

SAMPLES_PER_RANK, IN_DIM, OUT_DIM, TEMPERATURE = 3, 6, 5, 0.3


def inputs(world: int, views: int) -> tuple[torch.nn.Linear, torch.Tensor]:
    """The encoder and the global batch ``[world * SAMPLES_PER_RANK * views, IN_DIM]`` (fixed seed)."""
    g = torch.Generator().manual_seed(7)
    enc = torch.nn.Linear(IN_DIM, OUT_DIM)
    with torch.no_grad():
        enc.weight.copy_(torch.randn(OUT_DIM, IN_DIM, generator=g))
        enc.bias.copy_(torch.randn(OUT_DIM, generator=g))
    x = torch.randn(world * SAMPLES_PER_RANK * views, IN_DIM, generator=g)
    return enc, x


def run_case(views: int, anchor_views: int, rank: int, world: int) -> dict:
    enc, x = inputs(world, views)
    n = SAMPLES_PER_RANK * views
    x_local = x[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    positive = pair_positives(SAMPLES_PER_RANK, views, anchor_views)
    loss = nt_xent(enc(x_local), positive, TEMPERATURE, gather=True)
    loss.backward()
    stats = torch.stack([loss.detach()])
    dist.all_reduce(stats)
    for p in enc.parameters():  # what DDP does: average the gradients over ranks
        dist.all_reduce(p.grad)
        p.grad /= world
    parts = [torch.empty_like(x_local.grad) for _ in range(world)]
    dist.all_gather(parts, x_local.grad)
    return {"loss": stats[0] / world, "grad_weight": enc.weight.grad, "grad_bias": enc.bias.grad,
            "input_grad": torch.cat(parts) / world}


def main() -> None:
    out, cases = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {case: run_case(*map(int, case.split(",")), rank, world) for case in cases}
    if rank == 0:
        torch.save({**results, "world": world}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
