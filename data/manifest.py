"""The manifest CSV: read, validate, hold compactly, split by patient, sample few-shot subsets.

Format (one row per scan)::

    img_path,id,patient,ICH,fracture,coordX,coordY,coordZ
    scans/0001.nii.gz,0001,P01,1,,12.5,-30,40
    scans/0002.nii.gz,0002,P01,0,1,,,

* ``img_path`` (required): absolute, or relative to ``root`` (``DATA.ROOT``) or, without one, to the
  CSV's folder.
* ``id`` (optional): defaults to the file name without ``.nii.gz`` / ``.nii`` / ``.npy``; must be unique.
* label columns (the ones asked for): ``0`` / ``1``, blank = unknown (excluded for that label).
* a group column (optional, e.g. patient): for patient-level splits and metrics.
* ``coordX, coordY, coordZ`` (optional, all three): a world point in mm (blank = none).
* ``mask_path`` (optional): an integer label map for segmentation, absolute or relative as ``img_path``
  (blank = none); read and checked against its image by :mod:`data.masks`.

Other columns are ignored. Errors name the file, the 1-based line of the CSV and the column.

The rows live in a few numpy arrays (strings packed into one byte buffer with offsets), so 400,000
rows cost tens of megabytes and no per-row Python objects that DataLoader workers would copy.
"""
from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]
COORD_COLUMNS = ("coordX", "coordY", "coordZ")
_TRUE = ("1", "1.0")
_FALSE = ("0", "0.0")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, line and column."""


class StringArray:
    """Immutable array of strings packed as UTF-8 into one ``uint8`` buffer plus ``int64`` offsets.

    Behaves like a read-only sequence: ``a[i] -> str``, ``a[idx_array or slice] -> StringArray``,
    ``len(a)``, iteration, ``a.tolist()``, and ``np.asarray(a)`` (a numpy ``str_`` array).

    Args:
        strings: the values.
    """

    __slots__ = ("buffer", "offsets")

    def __init__(self, strings: Iterable[str] = ()):
        data = bytearray()
        offsets = [0]
        for s in strings:
            data += str(s).encode("utf-8")
            offsets.append(len(data))
        self.buffer = np.frombuffer(bytes(data), dtype=np.uint8)  # [total bytes]
        self.offsets = np.asarray(offsets, dtype=np.int64)  # [N + 1]

    @classmethod
    def _from_parts(cls, buffer: np.ndarray, offsets: np.ndarray) -> "StringArray":
        obj = cls.__new__(cls)
        obj.buffer, obj.offsets = buffer, offsets
        return obj

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            n = len(self)
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"index {key} out of range for {n} strings")
            return self.buffer[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")
        idx = np.arange(len(self))[key]  # slices, integer and boolean arrays
        return StringArray(self[int(i)] for i in idx)

    def __iter__(self) -> Iterator[str]:
        raw = self.buffer.tobytes()
        for a, b in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist()):
            yield raw[a:b].decode("utf-8")

    def tolist(self) -> list[str]:
        return list(self)

    def __array__(self, dtype=None, copy=None):
        arr = np.array(self.tolist(), dtype=str) if len(self) else np.zeros(0, dtype="<U1")
        return arr if dtype is None else arr.astype(dtype)

    def __eq__(self, other):  # elementwise, as numpy
        return np.asarray(self) == other

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in list(self[:3]))
        return f"StringArray([{head}{', ...' if len(self) > 3 else ''}], n={len(self)})"

    @property
    def nbytes(self) -> int:
        """Bytes held by the two arrays."""
        return int(self.buffer.nbytes + self.offsets.nbytes)


def default_id(path: str) -> str:
    """File name without ``.nii.gz`` / ``.nii`` / ``.npy`` (a DICOM folder: its name)."""
    name = os.path.basename(os.path.normpath(path))
    for suffix in (".nii.gz", ".nii", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def resolve_path(img_path: str, base: str) -> str:
    """``img_path`` made absolute against ``base`` (``~`` expanded), normalised, symlinks kept."""
    p = os.path.expanduser(img_path)
    if not os.path.isabs(p):
        p = os.path.join(base, p)
    return os.path.abspath(p)


def _parse_label(value: str, where: str) -> float:
    v = value.strip()
    if v == "":
        return np.nan
    if v in _TRUE:
        return 1.0
    if v in _FALSE:
        return 0.0
    raise ManifestError(f"{where}: label value {value!r}; expected 0, 1 or blank")


class Manifest:
    """Rows of a manifest as compact arrays (read with :meth:`Manifest.read`).

    Attributes:
        ids: :class:`StringArray` ``[N]`` of unique ids.
        paths: :class:`StringArray` ``[N]`` of absolute image paths.
        labels: float32 ``[N, L]``, 1 / 0, NaN = blank.
        label_names: the L label columns.
        groups: :class:`StringArray` ``[N]``: the group column, or the ids when there is none (each
            scan its own group).
        group_column: name of the group column ('' when none).
        coords: float64 ``[N, 3]`` world mm, NaN when absent.
        masks: :class:`StringArray` ``[N]`` of absolute ``mask_path`` entries ('' = none), or None when
            the CSV has no ``mask_path`` column.
        source: the CSV file ('' when built in memory).
    """

    def __init__(self, ids: StringArray, paths: StringArray, labels: np.ndarray,
                 label_names: Sequence[str], groups: Optional[StringArray] = None,
                 coords: Optional[np.ndarray] = None, group_column: str = "", source: str = "",
                 masks: Optional[StringArray] = None):
        n = len(paths)
        self.ids = ids
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.float32).reshape(n, len(label_names))
        self.label_names = tuple(label_names)
        self.groups = groups if groups is not None else ids
        self.group_column = group_column
        self.coords = (np.full((n, 3), np.nan) if coords is None else np.asarray(coords, np.float64))
        self.source = str(source)
        self.masks = masks
        if not (len(ids) == n == len(self.groups) == len(self.coords)) or (masks is not None and len(masks) != n):
            raise ValueError("manifest arrays differ in length")

    # ------------------------------------------------------------------ reading
    @classmethod
    def read(cls, csv_path: PathLike, root: PathLike = "", label_columns: Sequence[str] = (),
             group_column: str = "") -> "Manifest":
        """Read and validate a manifest CSV.

        Args:
            csv_path: the CSV file.
            root: prefix of relative ``img_path`` entries (``DATA.ROOT``); '' = the CSV's folder.
            label_columns: label columns to read (each must exist; values 0 / 1 / blank).
            group_column: the group (patient/study) column; '' = none.

        Raises:
            ManifestError: naming the file, the 1-based line and the column of the first problem.
        """
        csv_path = str(csv_path)
        if not os.path.isfile(csv_path):
            raise ManifestError(f"{csv_path}: manifest file does not exist")
        base = os.path.abspath(os.path.expanduser(str(root))) if str(root) else \
            os.path.dirname(os.path.abspath(csv_path))
        label_columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise ManifestError(f"{csv_path}: the file is empty; expected a header with img_path") from None
            col = {}
            for j, h in enumerate(header):
                if h in col:
                    raise ManifestError(f"{csv_path}, line 1, column {h!r}: duplicate column name")
                col[h] = j
            if "img_path" not in col:
                raise ManifestError(f"{csv_path}, line 1, column 'img_path': required column missing "
                                    f"(header: {header})")
            for name in label_columns:
                if name not in col:
                    raise ManifestError(f"{csv_path}, line 1, column {name!r}: label column missing "
                                        f"(header: {header})")
            if group_column and group_column not in col:
                raise ManifestError(f"{csv_path}, line 1, column {group_column!r}: group column missing "
                                    f"(header: {header})")
            present = [c for c in COORD_COLUMNS if c in col]
            if present and len(present) != 3:
                missing = [c for c in COORD_COLUMNS if c not in col]
                raise ManifestError(f"{csv_path}, line 1, column {missing[0]!r}: coordinates need all of "
                                    f"{list(COORD_COLUMNS)}")
            has_id, has_coords = "id" in col, bool(present)
            i_path, i_id = col["img_path"], col.get("id")
            i_labels = [col[c] for c in label_columns]
            i_group = col.get(group_column) if group_column else None
            i_coords = [col[c] for c in COORD_COLUMNS] if has_coords else []
            i_mask = col.get("mask_path")

            ids, paths, groups, masks = _Packer(), _Packer(), _Packer(), _Packer()
            labels = _Growable(len(label_columns), np.float32)
            coords = _Growable(3, np.float64) if has_coords else None
            first_line: dict[str, int] = {}
            line = 1
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue  # blank line
                where = f"{csv_path}, line {line}"
                if len(row) != len(header):
                    raise ManifestError(f"{where}: {len(row)} fields, header has {len(header)}")
                img = row[i_path].strip()
                if not img:
                    raise ManifestError(f"{where}, column 'img_path': empty path")
                sid = row[i_id].strip() if has_id else ""
                if has_id and not sid:
                    raise ManifestError(f"{where}, column 'id': empty id")
                sid = sid or default_id(img)
                if sid in first_line:
                    col_name = "id" if has_id else "img_path"
                    raise ManifestError(f"{where}, column {col_name!r}: id {sid!r} already used on line "
                                        f"{first_line[sid]}" + ("" if has_id else
                                        " (ids default to file names; add a unique 'id' column)"))
                first_line[sid] = line
                lab = [_parse_label(row[j], f"{where}, column {c!r}") for j, c in zip(i_labels, label_columns)]
                if i_group is not None:
                    g = row[i_group].strip()
                    if not g:
                        raise ManifestError(f"{where}, column {group_column!r}: empty group")
                    groups.add(g)
                if has_coords:
                    xyz = []
                    for j, c in zip(i_coords, COORD_COLUMNS):
                        v = row[j].strip()
                        try:
                            xyz.append(float(v) if v else np.nan)
                        except ValueError:
                            raise ManifestError(f"{where}, column {c!r}: {v!r} is not a number (mm)") from None
                    if np.isnan(xyz).any() and not np.isnan(xyz).all():
                        raise ManifestError(f"{where}, column {COORD_COLUMNS[int(np.isnan(xyz).argmax())]!r}: "
                                            "give all three coordinates or none")
                    coords.add(xyz)
                if i_mask is not None:
                    m = row[i_mask].strip()
                    masks.add(resolve_path(m, base) if m else "")
                ids.add(sid)
                paths.add(resolve_path(img, base))
                labels.add(lab)
            del first_line
        if len(paths) == 0:
            raise ManifestError(f"{csv_path}: no rows after the header")
        id_arr = ids.finish()
        return cls(ids=id_arr, paths=paths.finish(), labels=labels.finish(), label_names=label_columns,
                   groups=groups.finish() if i_group is not None else None,
                   coords=coords.finish() if coords is not None else None,
                   group_column=group_column, source=csv_path,
                   masks=masks.finish() if i_mask is not None else None)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (f"Manifest({self.source or '<memory>'}: {len(self)} rows, labels {list(self.label_names)}, "
                f"group column {self.group_column!r})")

    def row(self, i: int) -> dict:
        """Row ``i`` as a dict: id, img_path, group, one entry per label (float, NaN = blank), coord,
        mask_path ('' = none)."""
        i = int(i)
        d = {"id": self.ids[i], "img_path": self.paths[i], "group": self.groups[i],
             "mask_path": self.masks[i] if self.masks is not None else ""}
        for j, name in enumerate(self.label_names):
            d[name] = float(self.labels[i, j])
        c = self.coords[i]
        d["coord"] = None if np.isnan(c).any() else c.copy()
        return d

    def label_index(self, label: Union[str, int]) -> int:
        """Column index of a label given by name or index; ValueError naming it otherwise."""
        if isinstance(label, (int, np.integer)):
            if not 0 <= int(label) < len(self.label_names):
                raise ValueError(f"label index {label} out of range for labels {list(self.label_names)}")
            return int(label)
        if label not in self.label_names:
            raise ValueError(f"label {label!r} is not among the manifest's labels {list(self.label_names)}")
        return self.label_names.index(label)

    def subset(self, indices: Union[Sequence[int], np.ndarray]) -> "Manifest":
        """The rows at ``indices`` (ints or a boolean mask), in that order."""
        idx = np.arange(len(self))[np.asarray(indices)] if len(indices) else np.zeros(0, dtype=np.int64)
        return Manifest(ids=self.ids[idx], paths=self.paths[idx], labels=self.labels[idx],
                        label_names=self.label_names,
                        groups=self.groups[idx] if self.group_column else None,
                        coords=self.coords[idx], group_column=self.group_column, source=self.source,
                        masks=self.masks[idx] if self.masks is not None else None)

    @property
    def nbytes(self) -> int:
        """Bytes held by the row arrays."""
        n = self.ids.nbytes + self.paths.nbytes + self.labels.nbytes + self.coords.nbytes
        return int(n + (self.groups.nbytes if self.groups is not self.ids else 0))

    def write(self, csv_path: PathLike) -> None:
        """Write the rows as a manifest CSV (absolute paths; img_path, id, group, labels, coords, mask_path)."""
        cols = ["img_path", "id"] + ([self.group_column] if self.group_column else []) + list(self.label_names)
        has_coords = not np.isnan(self.coords).all()
        cols += list(COORD_COLUMNS) if has_coords else []
        cols += ["mask_path"] if self.masks is not None else []
        tmp = f"{csv_path}.{os.getpid()}.tmp"
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for i in range(len(self)):
                r = [self.paths[i], self.ids[i]] + ([self.groups[i]] if self.group_column else [])
                r += ["" if np.isnan(v) else str(int(v)) for v in self.labels[i]]
                if has_coords:
                    r += ["" if np.isnan(v) else repr(float(v)) for v in self.coords[i]]
                if self.masks is not None:
                    r.append(self.masks[i])
                w.writerow(r)
        os.replace(tmp, csv_path)


class _Packer:
    """Accumulates strings into one bytearray (no per-row objects kept)."""

    def __init__(self):
        self.data = bytearray()
        self.offsets = _Growable(None, np.int64)
        self.offsets.add(0)

    def add(self, s: str) -> None:
        self.data += s.encode("utf-8")
        self.offsets.add(len(self.data))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def finish(self) -> StringArray:
        return StringArray._from_parts(np.frombuffer(bytes(self.data), dtype=np.uint8), self.offsets.finish())


class _Growable:
    """A numpy array grown by doubling: rows of ``width`` values (width None = scalars)."""

    def __init__(self, width: Optional[int], dtype):
        self.width, self.n = width, 0
        self.buf = np.empty((1024,) if width is None else (1024, width), dtype=dtype)

    def add(self, value) -> None:
        if self.n == len(self.buf):
            self.buf = np.concatenate([self.buf, np.empty_like(self.buf)])
        self.buf[self.n] = value
        self.n += 1

    def __len__(self) -> int:
        return self.n

    def finish(self) -> np.ndarray:
        return self.buf[: self.n].copy()


# ---------------------------------------------------------------------------------------------
# Splits and few-shot draws


def _allocate(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over strata proportionally to ``sizes`` (largest remainder), at most sizes[s] each."""
    n = sum(sizes.values())
    if n == 0:
        return {s: 0 for s in sizes}
    quota = {s: total * k / n for s, k in sizes.items()}
    alloc = {s: int(math.floor(q)) for s, q in quota.items()}
    for s in sorted(sizes, key=lambda s: (-(quota[s] - alloc[s]), s))[:total - sum(alloc.values())]:
        alloc[s] += 1
    return {s: min(a, sizes[s]) for s, a in alloc.items()}


def split_groups(groups: Iterable[str], strata: dict[str, str], val_frac: float, test_frac: float,
                 seed: int = 0) -> dict[str, str]:
    """Assign whole groups (patients) to 'train' / 'val' / 'test', stratified.

    Each stratum (e.g. ICH positive / negative / blank) gives test and val its share, rounded so
    that the totals are ``round(test_frac * G)`` and ``round(val_frac * G)`` groups.

    Args:
        groups: group ids (duplicates ignored).
        strata: group id -> stratum name (missing = one common stratum "").
        val_frac: fraction of groups for validation.
        test_frac: fraction of groups for test.
        seed: shuffling seed (same inputs and seed, same split).

    Returns:
        ``{group: split}``.
    """
    if val_frac < 0 or test_frac < 0 or val_frac + test_frac >= 1:
        raise ValueError(f"val_frac = {val_frac}, test_frac = {test_frac}: each must be >= 0 and their sum < 1")
    uniq = sorted(set(groups))
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for g in uniq:
        by_stratum[strata.get(g, "")].append(g)
    sizes = {s: len(v) for s, v in by_stratum.items()}
    n_test = _allocate(sizes, int(round(test_frac * len(uniq))))
    rest = {s: sizes[s] - n_test[s] for s in sizes}
    n_val = _allocate(rest, min(int(round(val_frac * len(uniq))), sum(rest.values())))
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for s in sorted(by_stratum):
        members = [by_stratum[s][i] for i in rng.permutation(len(by_stratum[s]))]
        for k, g in enumerate(members):
            out[g] = "test" if k < n_test[s] else "val" if k < n_test[s] + n_val[s] else "train"
    return out


def few_shot_indices(manifest: Manifest, label: Union[str, int], k: int, seed: int) -> np.ndarray:
    """K positives and K negatives of ``label``, drawn without replacement (seeded).

    Rows where the label is blank are never drawn.

    Args:
        manifest: rows with the label column.
        label: label name (or column index).
        k: draws per class.
        seed: the draw's seed (same seed -> same rows).

    Returns:
        int64 ``[2k]``: the positives' row indices then the negatives', each sorted.

    Raises:
        ValueError: naming the label when it has fewer than ``k`` positives or negatives.
    """
    j = manifest.label_index(label)
    name = manifest.label_names[j]
    if k <= 0:
        raise ValueError(f"few-shot k = {k}; it must be > 0")
    y = manifest.labels[:, j]
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    for kind, idx in (("positives", pos), ("negatives", neg)):
        if len(idx) < k:
            raise ValueError(f"label {name!r} has {len(idx)} {kind} in {manifest.source or 'the manifest'}; "
                             f"few-shot k = {k} needs at least {k}")
    rng = np.random.default_rng([int(seed), j])
    return np.concatenate([np.sort(rng.choice(pos, size=k, replace=False)),
                           np.sort(rng.choice(neg, size=k, replace=False))]).astype(np.int64)
