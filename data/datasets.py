"""Torch datasets over a manifest: read (cache or source), apply a view, attach id / label.

A sample is a pure function of ``(cfg.SEED, epoch, index)``: the view draws only from
``np.random.default_rng([SEED, epoch, index])``. Ask for ``dataset[(index, epoch)]`` (a sampler
yielding such pairs) or ``dataset[index]`` (epoch 0).

Bad scans: under ``DATA.ON_ERROR raise`` the :class:`~data.io.BadInputError` propagates. Under
``skip`` the next good row of the manifest takes the scan's place and the sample carries
``"skipped": [(path, reason), ...]``; the trainer gathers them from ``batch["skipped"]`` into the
run's ``skipped.csv`` (:class:`SkipTracker`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from data import cache as cache_lib
from data.io import BadInputError, TooManyBadInputs, read_skipped, read_volume, write_skipped
from data.manifest import Manifest
from data.transforms import preprocess_volume

__all__ = ["VolumeDataset", "build_dataset", "collate", "SkipTracker", "write_skipped", "read_skipped"]

View = Callable[[np.ndarray, dict, np.random.Generator], dict]
log = logging.getLogger(__name__)


class VolumeDataset(Dataset):
    """Scans of a manifest passed through a view.

    Args:
        manifest: the rows (:class:`data.manifest.Manifest`).
        cfg: the config (SEED, DATA.CACHE_DIR, DATA.SPACING, DATA.HEAD_THRESHOLD, DATA.ON_ERROR,
            DATA.MAX_BAD_FRACTION).
        view: ``view(hu, meta, rng) -> dict[str, Tensor]`` (see :mod:`data.views`).
        masks: segmentation: read each row's ``mask_path`` too and hand the label map, on the grid of the
            HU array, to the view as ``meta["mask"]`` (integer ``[X, Y, Z]``); a missing, mismatched or
            non-integer mask is a bad input of that row (:mod:`data.masks`).

    ``__getitem__`` returns the view's dict plus ``"index"`` (int, the row actually read), ``"id"``
    (str), ``"skipped"`` (list of ``(path, reason)``, empty unless rows were skipped) and, when the
    manifest has label columns, ``"label"`` float32 ``[L]`` (NaN = blank).
    """

    def __init__(self, manifest: Manifest, cfg, view: View, masks: bool = False):
        if masks and manifest.masks is None:
            from data.manifest import ManifestError
            raise ManifestError(f"{manifest.source or 'the manifest'}: no mask_path column; segmentation needs a "
                                "label map per row")
        self.masks = bool(masks)
        self.manifest = manifest
        self.view = view
        self.seed = int(cfg.SEED)
        self.spacing = [float(s) for s in cfg.DATA.SPACING]
        self.head_threshold = float(cfg.DATA.HEAD_THRESHOLD)
        self.skip = cfg.DATA.ON_ERROR == "skip"
        self.cache_root = str(cache_lib.cache_root(cfg)) if cfg.DATA.CACHE_DIR else ""
        self.template = str(cfg.DATA.TEMPLATE)
        # consecutive bad rows that prove more than MAX_BAD_FRACTION are bad
        self.max_consecutive_bad = max(10, int(np.ceil(cfg.DATA.MAX_BAD_FRACTION * len(manifest))) + 1)
        self._skipped_at_preprocessing: Optional[dict[str, str]] = None  # loaded lazily, per worker

    def __len__(self) -> int:
        return len(self.manifest)

    def describe(self, index: int) -> str:
        """Row ``index`` as loader errors name it: ``id (path)``."""
        return f"{self.manifest.ids[index]} ({self.manifest.paths[index]})"

    # ------------------------------------------------------------------ reading
    def load(self, index: int) -> tuple[np.ndarray, dict]:
        """HU array ``[X, Y, Z]`` (int16 memmap from the cache, float32 from a source) and its meta.

        Raises:
            BadInputError: naming the source file.
        """
        path = self.manifest.paths[index]
        mask_path = self.manifest.masks[index] if self.masks else ""
        where = self.row_name(index)
        if self.masks and not mask_path:
            raise BadInputError(path, f"{where} has no mask_path; segmentation needs a label map per row")
        labels = None
        if self.cache_root:
            if self._skipped_at_preprocessing is None:
                self._skipped_at_preprocessing = cache_lib.skipped_reasons(self.cache_root)
            vol = cache_lib.read_entry(self.cache_root, path, self._skipped_at_preprocessing)
            if mask_path:
                labels, _ = cache_lib.read_mask_entry(self.cache_root, path, mask_path)
        else:
            vol = read_volume(path)
            try:
                if mask_path:
                    from data.masks import align_mask, preprocess_pair, read_mask
                    aligned = align_mask(read_mask(mask_path, where), vol, mask_path, where)
                    vol, labels = preprocess_pair(vol, aligned, self.spacing, self.head_threshold)
                else:
                    vol = preprocess_volume(vol, self.spacing, self.head_threshold)
            except ValueError as e:
                if isinstance(e, BadInputError):
                    raise
                raise BadInputError(path, f"preprocessing failed: {e}") from None
        coord = self.manifest.coords[index]
        meta = {"spacing": tuple(vol.spacing), "affine": vol.affine,
                "coord": None if np.isnan(coord).any() else coord.copy(),
                "path": path, "id": self.manifest.ids[index],
                # scan -> template world transform (4, 4) of a cache built with DATA.TEMPLATE; None when the
                # scan was not registered or its registration was refused (data/registration.py)
                "template": self._template(path)}
        if self.masks:
            meta["mask"], meta["mask_path"] = labels, mask_path
        return vol.array, meta

    def _template(self, path: str) -> Optional[np.ndarray]:
        """The scan -> template world transform of ``path`` (DATA.TEMPLATE), or None."""
        if self.template == cache_lib.IDENTITY_TEMPLATE:
            return np.eye(4)
        if self.template and self.cache_root:
            return cache_lib.read_template(self.cache_root, path)
        return None

    def row_name(self, index: int) -> str:
        """``"row 3 (id s03) of train.csv"``: a manifest row as errors name it (1-based data row)."""
        return f"row {index + 1} (id {self.manifest.ids[index]}) of {self.manifest.source or 'the manifest'}"

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict[str, Any]:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        n = len(self.manifest)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} rows")
        index %= n
        rng = np.random.default_rng([self.seed, epoch, index])
        skipped: list[tuple[str, str]] = []
        row = index
        while True:
            try:
                hu, meta = self.load(row)
                if getattr(self.view, "needs_partner", False):  # e.g. Alice: a second scan, drawn from the same rng
                    sample = dict(self.view(hu, meta, rng, partner=self._partner(row, rng, skipped)))
                else:
                    sample = dict(self.view(hu, meta, rng))
                break
            except BadInputError as e:  # unreadable, or refused by the view (e.g. a scan smaller than its crop)
                if not self.skip:
                    raise
                skipped.append((e.path, e.reason))
                if len(skipped) >= min(n, self.max_consecutive_bad):
                    source = self.manifest.source or "the manifest"
                    raise TooManyBadInputs(f"{len(skipped)} consecutive rows of {source} from row {index} "
                                           f"are bad (last: {e}); more than DATA.MAX_BAD_FRACTION are "
                                           "bad") from None
                row = (row + 1) % n
        sample["index"] = row
        sample["id"] = self.manifest.ids[row]
        sample["skipped"] = skipped
        if self.manifest.label_names:
            sample["label"] = torch.from_numpy(self.manifest.labels[row].copy())  # [L]
        return sample

    def _partner(self, row: int, rng: np.random.Generator, skipped: list[tuple[str, str]]
                 ) -> Optional[tuple[np.ndarray, dict]]:
        """Another row's ``(hu, meta)``, uniform over the manifest; None for a one-row manifest or, under
        ``DATA.ON_ERROR skip``, a bad partner (listed in ``skipped`` like any bad row; the view then falls
        back to views of ``row`` alone)."""
        n = len(self.manifest)
        if n < 2:
            return None
        other = int(rng.integers(n - 1))
        other += other >= row
        try:
            return self.load(other)
        except BadInputError as e:
            if not self.skip:
                raise
            skipped.append((e.path, e.reason))
            return None


RAGGED_KEYS = ("hu",)  # tensors whose shape differs between samples (device-resize heads): kept as lists


def collate(samples: Sequence[dict]) -> dict[str, Any]:
    """DataLoader ``collate_fn``: tensors default-collated (``[B, ...]``), ``"id"`` a list of str,
    ``"skipped"`` one flat list of ``(path, reason)`` over the batch, :data:`RAGGED_KEYS` lists of
    tensors.

    Args:
        samples: dicts from :class:`VolumeDataset`.
    """
    lists = ("id", "skipped") + RAGGED_KEYS
    batch = default_collate([{k: v for k, v in s.items() if k not in lists} for s in samples])
    batch["id"] = [s["id"] for s in samples]
    batch["skipped"] = [tuple(x) for s in samples for x in s.get("skipped", ())]
    for key in RAGGED_KEYS:
        if key in samples[0]:
            batch[key] = [s[key] for s in samples]
    return batch


def build_dataset(cfg, csv_path: Union[str, os.PathLike], view: View, label_columns: Sequence[str] = (),
                  group_column: str = "") -> VolumeDataset:
    """Read a manifest (with ``DATA.ROOT``) and wrap it in a :class:`VolumeDataset`.

    Args:
        cfg: the config.
        csv_path: manifest CSV.
        view: the view callable.
        label_columns: label columns to read (``"label"`` in samples when non-empty).
        group_column: group column to read ('' = none).
    """
    manifest = Manifest.read(csv_path, root=cfg.DATA.ROOT, label_columns=label_columns,
                             group_column=group_column)
    return VolumeDataset(manifest, cfg, view)


class SkipTracker:
    """Collects skipped inputs of a run into ``skipped.csv`` and enforces ``DATA.MAX_BAD_FRACTION``.

    Each path is logged once. Call :meth:`add` with ``batch["skipped"]`` (on rank 0 after gathering
    the ranks' lists) and :meth:`check` with the number of inputs so far.

    Args:
        path_csv: the run's ``skipped.csv``.
        max_bad_fraction: ``DATA.MAX_BAD_FRACTION``.
        total: inputs in the manifest (the denominator).
        logger: where "skipped PATH: REASON" lines go (default: this module's logger).
    """

    def __init__(self, path_csv: Union[str, os.PathLike], max_bad_fraction: float, total: int,
                 logger: Optional[Callable[[str], None]] = None):
        self.path_csv = Path(path_csv)
        self.max_bad_fraction = float(max_bad_fraction)
        self.total = int(total)
        self.log = logger or log.warning
        self.seen: dict[str, str] = read_skipped(self.path_csv)

    def add(self, rows: Sequence[tuple[str, str]]) -> int:
        """Record ``(path, reason)`` rows; new ones are logged and merged into the CSV. Returns new count."""
        new = [(str(p), str(r)) for p, r in rows if str(p) not in self.seen]
        uniq = dict(new)
        for p, r in uniq.items():
            self.seen[p] = r
            self.log(f"skipped {p}: {r}")
        if uniq:
            write_skipped(self.path_csv, uniq.items())
        self.check()
        return len(uniq)

    def check(self) -> None:
        """Raise :class:`TooManyBadInputs` when more than the allowed fraction of inputs are bad."""
        if self.total and len(self.seen) > self.max_bad_fraction * self.total:
            raise TooManyBadInputs(f"{len(self.seen)} of {self.total} inputs are bad, more than "
                                   f"DATA.MAX_BAD_FRACTION = {self.max_bad_fraction}; see {self.path_csv}")
