"""A reference-style DINO input path, the baseline of ``benchmarks/data_pipeline.py --baseline reference``.

Written from the description of the best-known head-CT foundation model's pipeline (issue 11), NOT
used for training; it exists to measure how much faster this project's pipeline is on the same
volumes, workers and loader:

* preprocessing, once per volume (not timed): 1 mm linear resample and head crop (the project's
  preprocessing cache already holds exactly that), three HU windows, then a non-uniform trilinear
  resize of the whole head to ``3 x 96^3``, stored as float16 ``.npy``;
* per sample: load the file whole and convert to float32 (``torch``), zero-pad to a ``224^3``
  canvas, cut 2 global random-size crops (each side uniform in 112..224, anywhere in the canvas)
  and 2 local ones (64..112, inside the central ``192^3``), resize each crop to ``96^3`` with
  ``torch.nn.functional.interpolate(mode="trilinear")`` on the CPU, then light augmentation: a
  left-right flip (p 0.5), an intensity shift of the [0, 1] channels (U(-0.1, 0.1), p 0.8) and a
  Gaussian blur (MONAI ``GaussianSmooth``, sigma U(0.5, 1.0); p 1.0 / 0.1 for the two global
  crops, 0.5 for local crops, as DINO).

The choices give the reference its fastest plausible form (plain torch ops, no MONAI MetaTensor
book-keeping), so the measured speed-up is, if anything, an under-estimate.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from data.windows import apply_windows

CANVAS = 224  # zero-padded canvas edge
GLOBAL_SIZE = (112, 224)  # global crop side range (voxels of the 96^3 preprocessed head, padded)
LOCAL_SIZE = (64, 112)  # local crop side range
LOCAL_REGION = 192  # local crops lie inside the central LOCAL_REGION^3 of the canvas
OUT = 96  # every crop is resized to OUT^3
N_GLOBAL, N_LOCAL = 2, 2
GLOBAL_BLUR_P = (1.0, 0.1)  # blur probability of global crop 1 and 2
LOCAL_BLUR_P = 0.5
FLIP_P = 0.5
SHIFT_P, SHIFT = 0.8, 0.1
SIGMA = (0.5, 1.0)


def preprocess_reference(hu: np.ndarray, specs: Sequence[tuple[float, float]], size: int = 0) -> np.ndarray:
    """Head HU ``[X, Y, Z]`` (1 mm, cropped to the head) -> float16 ``[C, size, size, size]``.

    Windows first, then a non-uniform trilinear resize of the whole head to ``size^3``.

    Args:
        hu: preprocessed HU array (int16 memmap or float).
        specs: windows ``[(center, width)]``.
        size: output edge (0 = :data:`OUT`).
    """
    size = size or OUT
    x = torch.from_numpy(apply_windows(np.asarray(hu, dtype=np.float32), specs))  # [C, X, Y, Z]
    x = F.interpolate(x[None], size=(size,) * 3, mode="trilinear", align_corners=False)[0]
    return x.half().numpy()


def build_reference_files(load: Callable[[int], np.ndarray], paths: Sequence[str],
                          specs: Sequence[tuple[float, float]], out_dir: Union[str, os.PathLike],
                          log: Callable[[str], None] = print) -> dict[str, str]:
    """Preprocess every distinct source path once; returns ``{source path: .npy file}``.

    Args:
        load: ``load(row) -> HU array`` for a manifest row (the project dataset's reader).
        paths: source path of each manifest row.
        specs: windows.
        out_dir: where the float16 ``.npy`` files go.
        log: progress messages.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for row, path in enumerate(paths):
        if path in files:
            continue
        dst = out_dir / f"ref_{len(files):06d}.npy"
        np.save(dst, preprocess_reference(load(row), specs))
        files[path] = str(dst)
    log(f"reference: preprocessed {len(files)} volumes to {out_dir} (3 x {OUT}^3 float16)")
    return files


def _crop_box(rng: np.random.Generator, size_range: tuple[int, int], lo: int, hi: int) -> tuple[slice, ...]:
    """Random per-axis sizes in ``size_range`` and a uniform position inside ``[lo, hi)``."""
    box = []
    for _ in range(3):
        s = int(rng.integers(size_range[0], size_range[1] + 1))
        start = int(rng.integers(lo, hi - s + 1))
        box.append(slice(start, start + s))
    return tuple(box)


def _augment(x: torch.Tensor, rng: np.random.Generator, blur_p: float) -> torch.Tensor:
    """Flip, intensity shift and blur of one ``[C, 96, 96, 96]`` crop."""
    from monai.transforms import GaussianSmooth

    if rng.random() < FLIP_P:
        x = torch.flip(x, dims=(1,))  # left-right
    if rng.random() < SHIFT_P:
        x = x + float(rng.uniform(-SHIFT, SHIFT))
    if rng.random() < blur_p:
        x = GaussianSmooth(sigma=float(rng.uniform(*SIGMA)))(x)
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
    return x


def reference_views(canvas_src: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """The per-sample work: pad, 2 global + 2 local crops, resize to 96^3, augment.

    Args:
        canvas_src: float32 ``[C, 96, 96, 96]`` preprocessed head.
        rng: the sample's generator.

    Returns:
        ``{"global": [2, C, 96, 96, 96], "local": [2, C, 96, 96, 96]}`` float32.
    """
    c, *spatial = canvas_src.shape
    pad = []
    for n in reversed(spatial):  # F.pad lists the last axis first
        before = (CANVAS - n) // 2
        pad += [before, CANVAS - n - before]
    canvas = F.pad(canvas_src, pad, value=0.0)  # [C, 224, 224, 224], materialised
    out = {}
    for name, n, size_range, (lo, hi), blur in (
            ("global", N_GLOBAL, GLOBAL_SIZE, (0, CANVAS), GLOBAL_BLUR_P),
            ("local", N_LOCAL, LOCAL_SIZE, ((CANVAS - LOCAL_REGION) // 2, (CANVAS + LOCAL_REGION) // 2),
             (LOCAL_BLUR_P,))):
        crops = []
        for i in range(n):
            box = _crop_box(rng, size_range, lo, hi)
            crop = canvas[(slice(None),) + box]  # [C, d, h, w] view
            crop = F.interpolate(crop[None], size=(OUT,) * 3, mode="trilinear", align_corners=False)[0]
            crops.append(_augment(crop, rng, blur[i % len(blur)]))
        out[name] = torch.stack(crops)  # [n, C, 96, 96, 96]
    return out


class ReferenceDINODataset(Dataset):
    """Reference-style DINO samples over the rows of a project manifest.

    Args:
        ids: id of each row.
        paths: source path of each row.
        files: ``{source path: reference .npy}`` from :func:`build_reference_files`.
        seed: base seed; a sample is a function of ``(seed, epoch, index)`` as in the project.

    ``__getitem__((index, epoch))`` returns ``{"global", "local", "index", "id", "skipped"}``
    (the project's ``data.datasets.collate`` batches it).
    """

    def __init__(self, ids: Sequence[str], paths: Sequence[str], files: dict[str, str], seed: int = 0):
        self.ids = list(ids)
        self.files = [files[p] for p in paths]
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict[str, Any]:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        rng = np.random.default_rng([self.seed, epoch, index])
        x = torch.from_numpy(np.load(self.files[index])).float()  # [3, 96, 96, 96], read whole
        sample: dict[str, Any] = dict(reference_views(x, rng))
        sample.update(index=index, id=self.ids[index], skipped=[])
        return sample


def build_reference_dataset(dataset, out_dir: Union[str, os.PathLike], specs: Sequence[tuple[float, float]],
                            log: Callable[[str], None] = print) -> ReferenceDINODataset:
    """The reference dataset over the same rows (and volumes) as a project ``VolumeDataset``.

    Args:
        dataset: ``data.datasets.VolumeDataset`` (its ``load(row)`` reads the cache or the source).
        out_dir: where the reference's preprocessed files go.
        specs: windows (``data.windows.window_specs(cfg.DATA.WINDOWS)``).
        log: progress messages.
    """
    m = dataset.manifest
    paths = [m.paths[i] for i in range(len(m))]
    files = build_reference_files(lambda row: dataset.load(row)[0], paths, specs, out_dir, log)
    return ReferenceDINODataset([m.ids[i] for i in range(len(m))], paths, files, seed=dataset.seed)


def output_voxels(n_channels: int = 3) -> int:
    """Voxels (all channels) of one reference sample: 4 crops x C x 96^3."""
    return (N_GLOBAL + N_LOCAL) * n_channels * OUT ** 3


__all__ = ["preprocess_reference", "build_reference_files", "reference_views", "ReferenceDINODataset",
           "build_reference_dataset", "output_voxels"]
