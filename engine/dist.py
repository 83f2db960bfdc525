"""Process-group set-up (torchrun, Slurm srun, or one plain process) and loaders.

NCCL on GPU, Gloo on CPU. Samples are keyed by ``(index, epoch)`` so that a dataset can derive
each sample's randomness from (SEED, epoch, index) alone: augmentations do not depend on the
number of workers or ranks, and a run resumed in the middle of an epoch sees the same samples.

Loader faults end the run in seconds (docs/cluster.md, "Faults"): an exception in a worker is
re-raised with a note naming the scans of its batch, a worker that dies or a batch that does not
arrive within ``DATA.TIMEOUT`` seconds raises :class:`LoaderError` naming the worker or the scans,
and the process never waits at exit for workers that ignore SIGTERM (:func:`_kill_workers_at_exit`).
With several ranks, the others then fail in their next collective (under Gloo at once: the dead
peer's connections close), or torchrun stops them.
"""
from __future__ import annotations

import atexit
import copy
import multiprocessing
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

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


class LoaderError(RuntimeError):
    """A DataLoader worker died, or a batch did not arrive within DATA.TIMEOUT; the message names
    the worker or the scans of the batch that was waited for."""


_TIMED_OUT = "DataLoader timed out"  # how torch's errors begin (torch/utils/data/dataloader.py)
_WORKER_DIED = "DataLoader worker (pid"
MAX_NAMED_ROWS = 64  # rows an error message names at most
_exit_hook_installed = False


def _kill_workers_at_exit() -> None:
    """SIGKILL the daemonic child processes (DataLoader workers) still alive at interpreter exit.

    Our workers ignore SIGTERM (:func:`_worker_init`), and persistent workers outlive an exception
    that ends the run; multiprocessing's own exit handler would SIGTERM them, which they ignore,
    and then join them forever. This handler is registered after multiprocessing's, so it runs
    first (atexit is last-in, first-out). Daemonic children are terminated at exit in any case;
    they hold nothing worth saving. torch's SIGCHLD handler, which would report these deaths as
    worker failures, is removed first.
    """
    children = [p for p in multiprocessing.active_children() if p.daemon]
    if not children:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in children:
        p.kill()
    for p in children:
        p.join(timeout=5)


def _install_exit_hook() -> None:
    global _exit_hook_installed
    if not _exit_hook_installed:
        atexit.register(_kill_workers_at_exit)
        _exit_hook_installed = True


def describe_rows(dataset: Dataset, keys: Sequence, limit: int = MAX_NAMED_ROWS) -> str:
    """Name the rows of sampler ``keys`` (``index`` or ``(index, epoch)``) for an error message.

    A dataset may define ``describe(index) -> str`` (``VolumeDataset``: id and path); other rows
    are named by index.
    """
    describe = getattr(dataset, "describe", None)
    names = []
    for key in list(keys)[:limit]:
        index = int(key[0]) if isinstance(key, (tuple, list)) else int(key)
        try:
            names.append(str(describe(index)) if callable(describe) else f"row {index}")
        except Exception:  # naming must never hide the fault being reported
            names.append(f"row {index}")
    more = len(keys) - limit
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


class FailFastLoader(DataLoader):
    """A DataLoader whose faults name what failed (what :func:`make_loader` returns).

    Batches arrive in sampler order, so the batch being waited for is the pass's ``done``-th;
    with a deterministic sampler (one with ``set_epoch``, as every sampler of engine/samplers.py)
    its keys are recomputed from a copy of the sampler taken when the pass began. An exception in
    a worker (or in the dataset without workers) keeps its type and gains a note naming the scans
    of its batch; a worker that died and a batch that timed out raise :class:`LoaderError` naming
    the worker's pid and the scans it was reading, or the scans waited for.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # (sampler copy, batches yielded) of a pass left before its end: persistent workers finish
        # its prefetched batches when the next pass starts
        self._abandoned: Optional[tuple[Any, int]] = None

    def __iter__(self) -> Iterator:
        plan = copy.copy(self.sampler) if hasattr(self.sampler, "set_epoch") else None
        try:
            it = super().__iter__()
        except Exception as e:
            stale, first = self._abandoned or (None, 0)
            count = (self.prefetch_factor or 1) * max(1, self.num_workers)
            err = self._explain(e, "while the workers finished the batches prefetched for the previous pass",
                                stale, range(first, first + count))
            if err is e:
                raise
            raise err from e
        self._abandoned = None
        done = 0
        try:
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    return
                except Exception as e:
                    err = self._explain(e, f"waiting for batch {done} of this pass", plan, [done])
                    if err is e:
                        raise
                    raise err from e
                done += 1
                yield batch
        finally:
            if self.num_workers > 0 and done < len(self):
                self._abandoned = (plan, done)

    def _keys(self, plan, batches: Sequence[int]) -> Optional[list]:
        """Sampler keys of ``batches`` (indices in the pass) of the pass ``plan`` (a sampler copy)
        describes; None without a deterministic sampler or when they cannot be computed."""
        if plan is None or not batches:
            return None
        try:
            keys: list = []
            wanted, last = set(batches), max(batches)
            for k, batch in enumerate(torch.utils.data.BatchSampler(plan, self.batch_size, self.drop_last)):
                if k > last:
                    break
                if k in wanted:
                    keys.extend(batch)
            return keys or None
        except Exception:  # naming must never hide the fault being reported
            return None

    def _scans(self, plan, batches: Sequence[int]) -> str:
        keys = self._keys(plan, batches)
        if not keys:
            return "scans unknown (a sampler without set_epoch)"
        epoch = f" of epoch {keys[0][1]}" if isinstance(keys[0], (tuple, list)) else ""
        return f"scans{epoch} {describe_rows(self.dataset, keys)}"

    def _dead_workers(self, wait: float = 0.0) -> dict[int, Any]:
        """This loader's workers (worker id -> process) that have exited, polling up to ``wait``
        seconds for one to be seen dead."""
        workers = getattr(getattr(self, "_iterator", None), "_workers", None) or []  # torch's worker processes
        deadline = time.monotonic() + wait
        while True:
            try:
                dead = {i: w for i, w in enumerate(workers) if w.exitcode is not None}  # exitcode reaps
                if dead or time.monotonic() >= deadline:
                    return dead
                time.sleep(0.05)
            except RuntimeError:  # torch's SIGCHLD handler reporting the same death
                continue

    def _explain(self, error: Exception, where: str, plan, batches: Sequence[int]) -> Exception:
        """``error`` with a note naming the scans of ``batches`` (of the pass ``plan`` describes), or
        a :class:`LoaderError` for a dead or stalled worker."""
        rank = f"rank {get_rank()}"
        text = str(error).strip()
        if text.startswith(_TIMED_OUT):
            return LoaderError(
                f"{text} ({rank}, DATA.TIMEOUT) {where}: one of its {self._scans(plan, batches)} stalls its "
                "reader (a hung network filesystem?) or takes longer than that to read; check those files and "
                "their storage, or raise DATA.TIMEOUT (0 = wait forever)")
        # a worker's death can also surface as a broken connection (ConnectionResetError when the
        # main process fetches a batch's shared memory from it) a moment before the worker is seen dead
        died = text.startswith(_WORKER_DIED)
        dead = self._dead_workers(wait=1.0 if died or isinstance(error, (OSError, EOFError)) else 0.0)
        if died or dead:
            head = text if died else "DataLoader worker (pid(s) {}) exited unexpectedly ({})".format(
                ", ".join(str(w.pid) for w in dead.values()),
                ", ".join(f"killed by {signal.Signals(-w.exitcode).name}" if w.exitcode < 0
                          else f"exit status {w.exitcode}" for w in dead.values()))
            # the dead worker died reading one of the batches of this pass it was given and the
            # main process has not received (torch's task list; empty while a pass restarts)
            tasks = getattr(getattr(self, "_iterator", None), "_task_info", None) or {}
            given = sorted(i for i, info in tasks.items() if len(info) == 1 and info[0] in dead)
            what = (f"; it died reading one of batches {', '.join(map(str, given))}: {self._scans(plan, given)}"
                    if given and len(batches) == 1 else f": {self._scans(plan, batches)}")
            return LoaderError(
                f"{head} ({rank}) {where}{what}. A worker killed by a signal is most often the kernel's "
                "out-of-memory killer (see dmesg): lower DATA.NUM_WORKERS or DATA.PREFETCH_FACTOR, or give the "
                "job more memory")
        error.add_note(f"DataLoader ({rank}) {where}: {self._scans(plan, batches)}")
        return error


def make_loader(dataset: Dataset, cfg, train: bool, collate_fn: Optional[Callable] = None,
                sampler: Optional[torch.utils.data.Sampler] = None, batch_size: Optional[int] = None) -> FailFastLoader:
    """The DataLoader every entry script uses (a :class:`FailFastLoader`).

    Args:
        dataset: a dataset whose ``__getitem__`` accepts ``(index, epoch)`` keys; an optional
            ``describe(index) -> str`` names a row in loader errors.
        cfg: the config (DATA.BATCH_SIZE, DATA.NUM_WORKERS, DATA.PIN_MEMORY, DATA.PREFETCH_FACTOR,
            DATA.TIMEOUT, SEED).
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
    extra = {}
    if workers > 0:
        _install_exit_hook()
        extra = {"prefetch_factor": cfg.DATA.PREFETCH_FACTOR, "persistent_workers": True,
                 "timeout": float(cfg.DATA.TIMEOUT)}
    return FailFastLoader(dataset, batch_size=batch_size or cfg.DATA.BATCH_SIZE, sampler=sampler,
                          num_workers=workers, collate_fn=collate_fn, drop_last=train,
                          pin_memory=cfg.DATA.PIN_MEMORY and torch.cuda.is_available(),
                          worker_init_fn=_worker_init(cfg.SEED * 1000 + get_rank() * 100), generator=generator,
                          **extra)
