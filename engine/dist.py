"""Process-group set-up (torchrun, Slurm srun, or one plain process) and loaders.

NCCL on GPU, Gloo on CPU. Samples are keyed by ``(index, epoch)`` so that a dataset can derive
each sample's randomness from (SEED, epoch, index) alone: augmentations do not depend on the
number of workers or ranks, and a run resumed in the middle of an epoch sees the same samples.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as tdist
from torch.utils.data import DataLoader, Dataset


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0] or "127.0.0.1"


def _env_from_slurm() -> None:
    """Fill torchrun's variables from those of ``srun`` (one task per process, no torchrun)."""
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
    # a port derived from the job id, so two jobs sharing a node do not collide
    os.environ.setdefault("MASTER_PORT", str(15000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def init_distributed() -> DistInfo:
    """Initialise from torchrun variables, from Slurm variables, or as one plain process."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 \
            and "SLURM_PROCID" in os.environ:
        _env_from_slurm()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        tdist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank, world_size, local_rank, device)


def cleanup() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def get_rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        tdist.barrier()


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj`` in rank order (a one-element list in a single process)."""
    if get_world_size() == 1:
        return [obj]
    out: list = [None] * get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process); returns ``t``."""
    if get_world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) in this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(base_seed: int) -> Callable[[int], None]:
    def init(worker_id: int) -> None:
        # Slurm and torchrun signal whole process groups; the main process handles SIGTERM and
        # SIGUSR1 (checkpoint, then exit) and shuts its workers down itself.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        seed_everything(base_seed + worker_id)
    return init


def make_loader(dataset: Dataset, cfg, train: bool, collate_fn: Optional[Callable] = None,
                sampler: Optional[torch.utils.data.Sampler] = None, batch_size: Optional[int] = None) -> DataLoader:
    """The DataLoader every entry script uses.

    Args:
        dataset: a dataset whose ``__getitem__`` accepts ``(index, epoch)`` keys.
        cfg: the config (DATA.BATCH_SIZE, DATA.NUM_WORKERS, DATA.PIN_MEMORY, DATA.PREFETCH_FACTOR, SEED).
        train: shuffle and drop the last incomplete batch (equal steps on every rank).
        collate_fn: batch assembly (``data.datasets.collate``).
        sampler: replaces the default :class:`EpochSampler` (it must have ``set_epoch(epoch, start)``).
        batch_size: overrides DATA.BATCH_SIZE (evaluation passes).
    """
    if sampler is None:
        from engine.samplers import EpochSampler
        sampler = EpochSampler(dataset, shuffle=train, seed=cfg.SEED, drop_last=train)
    workers = cfg.DATA.NUM_WORKERS
    # the loader draws its workers' base seed from its own generator, never from the global RNG
    # that methods use (masks), so a resumed run consumes the global RNG exactly as an unbroken one
    generator = torch.Generator().manual_seed(cfg.SEED * 1000 + get_rank())
    extra = {"prefetch_factor": cfg.DATA.PREFETCH_FACTOR, "persistent_workers": True} if workers > 0 else {}
    return DataLoader(dataset, batch_size=batch_size or cfg.DATA.BATCH_SIZE, sampler=sampler,
                      num_workers=workers, collate_fn=collate_fn, drop_last=train,
                      pin_memory=cfg.DATA.PIN_MEMORY and torch.cuda.is_available(),
                      worker_init_fn=_worker_init(cfg.SEED * 1000 + get_rank() * 100), generator=generator,
                      **extra)
