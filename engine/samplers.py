"""Training and evaluation samplers; every one yields ``(index, epoch)`` keys and resumes mid-epoch.

:class:`EpochSampler` is the engine's default (``engine.dist.make_loader``): one pass over the data
per epoch, sharded over ranks. :class:`RandomEpochSampler` gives an epoch a chosen length and,
optionally, weights (``DOWNSTREAM.SAMPLES_PER_EPOCH``, ``DOWNSTREAM.IMBALANCE balanced_sampler``;
:func:`build_train_sampler`).
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import numpy as np
from torch.utils.data import Dataset, DistributedSampler, Sampler

from engine.dist import get_rank, get_world_size


class EpochSampler(DistributedSampler):
    """A DistributedSampler yielding ``(index, epoch)`` keys that can start mid-epoch.

    Training (``shuffle=True``): a permutation seeded by (seed, epoch), padded or truncated as
    DistributedSampler does so that every rank gets the same number of samples. Evaluation
    (``shuffle=False, drop_last=False``): rank r takes indices r, r+W, ... with no padding, so
    gathered predictions hold every sample exactly once.

    Args:
        dataset: any sized dataset.
        shuffle: permute every epoch.
        seed: base seed of the permutation.
        drop_last: drop the tail so the per-rank length divides evenly (training).
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None):
        super().__init__(dataset, num_replicas=num_replicas if num_replicas is not None else get_world_size(),
                         rank=rank if rank is not None else get_rank(), shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0
        self.pad = shuffle or drop_last

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip the first ``start`` samples of this rank (resume)."""
        super().set_epoch(epoch)
        self.start = start

    def _indices(self) -> list[int]:
        if self.pad:
            return list(super().__iter__())
        return list(range(self.rank, len(self.dataset), self.num_replicas))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self._indices()[self.start:]:
            yield (i, self.epoch)

    def __len__(self) -> int:
        n = self.num_samples if self.pad else len(range(self.rank, len(self.dataset), self.num_replicas))
        return max(0, n - self.start)


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Sampling probabilities ``[N]`` that give positives and negatives of one label equal mass.

    Rows where the label is blank keep their share ``n_blank / N`` at uniform weight; the rest is
    split half to the positives and half to the negatives.

    Args:
        labels: ``[N]`` targets of the balanced label (1 / 0 / NaN).
    """
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    n = y.size
    pos, neg, blank = y == 1, y == 0, np.isnan(y)
    if not pos.any() or not neg.any():
        raise ValueError(f"balanced sampling needs positives and negatives of the first label; got "
                         f"{int(pos.sum())} positives and {int(neg.sum())} negatives")
    share = 1.0 - blank.sum() / n
    w = np.zeros(n)
    w[pos] = 0.5 * share / pos.sum()
    w[neg] = 0.5 * share / neg.sum()
    w[blank] = 1.0 / n
    return w / w.sum()


class RandomEpochSampler(Sampler):
    """Training sampler with a chosen epoch length, optionally weighted; yields ``(index, epoch)``.

    Every rank draws the same global sequence from ``(seed, epoch)`` and takes every
    ``num_replicas``-th entry from its rank on, so ranks never share a draw within an epoch.
    Unweighted: consecutive random permutations of the dataset (each pass without replacement),
    truncated to ``num_samples``. Weighted: ``num_samples`` draws with replacement.

    Args:
        n: dataset length.
        num_samples: samples per epoch over all ranks (rounded up to a multiple of the ranks).
        weights: ``[n]`` sampling probabilities, or None (uniform, permutation passes).
        seed: base seed.
        num_replicas: ranks (default: the world size).
        rank: this rank (default: the process's rank).
    """

    def __init__(self, n: int, num_samples: int, weights: Optional[np.ndarray] = None, seed: int = 0,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        if n <= 0 or num_samples <= 0:
            raise ValueError(f"sampler needs a non-empty dataset and num_samples > 0; got n={n}, "
                             f"num_samples={num_samples}")
        self.n, self.seed = int(n), int(seed)
        self.num_replicas = num_replicas if num_replicas is not None else get_world_size()
        self.rank = rank if rank is not None else get_rank()
        self.per_rank = math.ceil(num_samples / self.num_replicas)
        self.weights = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64).reshape(-1)
            if w.size != n or (w < 0).any() or not w.sum() > 0:
                raise ValueError(f"weights must be {n} non-negative numbers with a positive sum")
            self.weights = w / w.sum()
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip this rank's first ``start`` samples (resume)."""
        self.epoch, self.start = int(epoch), int(start)

    def global_indices(self) -> np.ndarray:
        """The epoch's draws over all ranks, ``[per_rank * num_replicas]``."""
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.per_rank * self.num_replicas
        if self.weights is not None:
            return rng.choice(self.n, size=total, replace=True, p=self.weights)
        passes = [rng.permutation(self.n) for _ in range(math.ceil(total / self.n))]
        return np.concatenate(passes)[:total]

    def __iter__(self):
        for i in self.global_indices()[self.rank::self.num_replicas][self.start:]:
            yield (int(i), self.epoch)

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


def build_train_sampler(cfg: Any, labels: np.ndarray) -> Optional[RandomEpochSampler]:
    """The sampler DOWNSTREAM.IMBALANCE / DOWNSTREAM.SAMPLES_PER_EPOCH ask for (None = the engine's full pass).

    Args:
        cfg: config.
        labels: ``[N, L]`` training targets; ``balanced_sampler`` balances the first label.
    """
    n = len(labels)
    num = int(cfg.DOWNSTREAM.SAMPLES_PER_EPOCH) or n
    if cfg.DOWNSTREAM.IMBALANCE == "balanced_sampler":
        return RandomEpochSampler(n, num, balanced_weights(np.asarray(labels)[:, 0]), seed=cfg.SEED)
    if cfg.DOWNSTREAM.SAMPLES_PER_EPOCH:
        return RandomEpochSampler(n, num, None, seed=cfg.SEED)
    return None
