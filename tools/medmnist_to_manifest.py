"""Convert a MedMNIST 3D ``.npz`` (e.g. AdrenalMNIST3D) into NIfTI volumes and manifest CSVs.

    python -m tools.medmnist_to_manifest --npz adrenalmnist3d.npz --out data/adrenalmnist3d
    python -m tools.medmnist_to_manifest --dataset adrenalmnist3d --size 64 --out data/adrenalmnist3d_64
    python main_downstream.py --cfg configs/downstream/adrenal_resnet18.yaml

MedMNIST files hold ``{train,val,test}_images`` (``[N, 28, 28, 28]`` uint8, 0..255, or
``[N, 28, 28, 28, 1]``) and ``{train,val,test}_labels`` (``[N, 1]`` class index, or ``[N, K]``
0/1 for multi-label sets). They are not CT in HU and carry no spacing, so:

* intensities are mapped linearly to a HU-like range, ``HU = -1000 + 10 * value`` (0 -> -1000 "air",
  255 -> 1550), so the reader's not-CT check accepts them; the window ``"275,2550"`` maps that range
  back to [0, 1] (= value / 255);
* voxels are written 1 mm apart with an identity orientation: use ``DATA.SPACING [1, 1, 1]`` (no
  resampling), ``DATA.HEAD_THRESHOLD -1001`` (no cropping to a "head"), ``DATA.ROI [28, 28, 28]``
  or ``[32, 32, 32]`` with ``DATA.FIT crop_pad`` (padding with -1024, i.e. 0 after windowing).

``--dataset NAME --size 28|64`` downloads the file with the ``medmnist`` package (``pip install
medmnist``; online) into ``--root`` (default ``~/.medmnist``) and converts it; ``--npz`` reads a file
already on disk (offline).

Output: ``OUT/images/<split>_<i>.nii.gz``, ``OUT/{train,val,test}.csv`` with ``img_path`` (relative
to OUT), ``id`` and the label columns: ``label`` for a binary set, ``class_<k>`` one-hot columns for
a multi-class set (train them as one-vs-rest labels), ``label_<j>`` for a multi-label set.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np

SPLITS = ("train", "val", "test")
HU_OFFSET = -1000.0  # HU of MedMNIST value 0
HU_PER_VALUE = 10.0  # HU per MedMNIST intensity step: 255 -> 1550
WINDOW = "275,2550"  # centre, width covering [-1000, 1550] HU = MedMNIST [0, 255]


def to_hu(volume: np.ndarray) -> np.ndarray:
    """MedMNIST intensities (0..255; floats in [0, 1] are scaled by 255 first) -> int16 HU-like values.

    Args:
        volume: ``[28, 28, 28]`` (or any 3D shape) array.

    Raises:
        ValueError: values outside [0, 255] or non-finite.
    """
    v = np.asarray(volume, dtype=np.float64)
    if not np.isfinite(v).all():
        raise ValueError("volume holds non-finite values")
    if v.min() < 0 or v.max() > 255:
        raise ValueError(f"MedMNIST intensities must lie in [0, 255]; got {v.min():g} .. {v.max():g}")
    if np.issubdtype(np.asarray(volume).dtype, np.floating) and v.max() <= 1.0:
        v = v * 255.0
    return np.round(HU_OFFSET + HU_PER_VALUE * v).astype(np.int16)


def label_columns(labels: dict[str, np.ndarray]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Label columns and ``[N, L]`` 0/1 matrices per split from MedMNIST label arrays.

    ``[N, 1]`` with two classes -> ``label``; ``[N, 1]`` with more classes -> one-hot ``class_<k>``;
    ``[N, K > 1]`` (multi-label) -> ``label_<j>``.
    """
    first = next(iter(labels.values()))
    if first.ndim == 2 and first.shape[1] > 1:
        names = [f"label_{j}" for j in range(first.shape[1])]
        return names, {s: (np.asarray(y) > 0).astype(np.int64) for s, y in labels.items()}
    flat = {s: np.asarray(y).reshape(-1).astype(np.int64) for s, y in labels.items()}
    n_classes = int(max(y.max() for y in flat.values())) + 1
    if n_classes <= 2:
        return ["label"], {s: y[:, None] for s, y in flat.items()}
    names = [f"class_{k}" for k in range(n_classes)]
    return names, {s: np.eye(n_classes, dtype=np.int64)[y] for s, y in flat.items()}


def convert(npz_path: str, out_dir: str, spacing: float = 1.0, limit: Optional[int] = None) -> dict[str, Path]:
    """Write NIfTI volumes and train/val/test manifests from a MedMNIST 3D ``.npz``.

    Args:
        npz_path: the ``.npz`` file (e.g. ``adrenalmnist3d.npz``).
        out_dir: output folder (created).
        spacing: voxel size written into the NIfTI affine (mm; MedMNIST gives none).
        limit: convert at most this many volumes per split (quick tries).

    Returns:
        ``{split: csv path}``.
    """
    import nibabel as nib
    if not os.path.isfile(npz_path):
        raise FileNotFoundError(f"{npz_path}: no such file (MedMNIST data: https://zenodo.org/records/10519652)")
    data = np.load(npz_path)
    missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in data.files]
    if missing:
        raise ValueError(f"{npz_path}: missing arrays {missing}; a MedMNIST file holds "
                         f"{[f'{s}_{k}' for s in SPLITS for k in ('images', 'labels')]} (found {data.files})")
    images = {s: data[f"{s}_images"] for s in SPLITS}
    for s, x in images.items():
        if x.ndim == 5 and x.shape[-1] == 1:
            images[s] = x[..., 0]
        if images[s].ndim != 4:
            raise ValueError(f"{npz_path}: {s}_images has shape {x.shape}; expected [N, D, H, W] (3D MedMNIST)")
        if len(images[s]) != len(data[f"{s}_labels"]):
            raise ValueError(f"{npz_path}: {len(images[s])} {s} images but {len(data[f'{s}_labels'])} labels")
    names, labels = label_columns({s: data[f"{s}_labels"] for s in SPLITS})
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    affine = np.diag([float(spacing)] * 3 + [1.0])
    paths = {}
    for s in SPLITS:
        n = len(images[s]) if limit is None else min(limit, len(images[s]))
        rows = []
        for i in range(n):
            sid = f"{s}_{i:05d}"
            hu = to_hu(images[s][i])
            if hu.min() == hu.max():
                print(f"warning: {sid} is constant ({hu.min()} HU); the reader refuses it (DATA.ON_ERROR skip "
                      "lists it in skipped.csv)", file=sys.stderr)
            img = nib.Nifti1Image(hu, affine)
            img.header.set_xyzt_units("mm")
            img.header.set_qform(affine, code=1)
            img.header.set_sform(affine, code=1)
            nib.save(img, str(out / "images" / f"{sid}.nii.gz"))
            rows.append([f"images/{sid}.nii.gz", sid] + [int(v) for v in labels[s][i]])
        paths[s] = out / f"{s}.csv"
        with open(paths[s], "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["img_path", "id"] + names)
            w.writerows(rows)
        pos = labels[s][:n].sum(axis=0)
        print(f"{s}: {n} volumes -> {paths[s]} (positives per column: "
              + ", ".join(f"{c} {int(p)}" for c, p in zip(names, pos)) + ")")
    print(f"label columns: {names}; use DATA.WINDOWS ['{WINDOW}'], DATA.SPACING [{spacing:g}, {spacing:g}, "
          f"{spacing:g}], DATA.HEAD_THRESHOLD -1001 (see configs/downstream/adrenal_resnet18.yaml)")
    return paths


def download(dataset: str, size: int, root: str) -> str:
    """Fetch ``dataset`` at ``size`` with the ``medmnist`` package; returns the ``.npz`` path.

    Args:
        dataset: MedMNIST flag, e.g. ``adrenalmnist3d`` (a key of ``medmnist.INFO``).
        size: 28 or 64 (3D sets).
        root: download folder (created).

    Raises:
        ImportError: ``medmnist`` is not installed.
        ValueError: unknown dataset or size.
    """
    try:
        import medmnist
    except ImportError as e:
        raise ImportError("--dataset needs the medmnist package (pip install medmnist) and network access; "
                          "offline, give the downloaded file with --npz") from e
    flag = dataset.lower()
    if flag not in medmnist.INFO:
        known = sorted(k for k in medmnist.INFO if k.endswith("3d"))
        raise ValueError(f"--dataset {dataset!r} is not a MedMNIST set; 3D sets: {known}")
    if size not in (28, 64):
        raise ValueError(f"--size {size}: 3D MedMNIST comes at 28 or 64")
    os.makedirs(root, exist_ok=True)
    cls = getattr(medmnist, medmnist.INFO[flag]["python_class"])
    for split in SPLITS:  # each split's constructor downloads (once) and checks the file's md5
        cls(split=split, download=True, size=size, root=root)
    path = os.path.join(root, f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"medmnist downloaded {dataset} at {size} but {path} is missing")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--npz", help="MedMNIST 3D .npz file on disk (e.g. adrenalmnist3d_64.npz); offline")
    src.add_argument("--dataset", help="MedMNIST 3D set to download with the medmnist package, e.g. adrenalmnist3d")
    ap.add_argument("--size", type=int, default=28, help="with --dataset: 28 or 64")
    ap.add_argument("--root", default=os.path.join(os.path.expanduser("~"), ".medmnist"),
                    help="with --dataset: download folder")
    ap.add_argument("--out", required=True, help="output folder (images/, train.csv, val.csv, test.csv)")
    ap.add_argument("--spacing", type=float, default=1.0, help="voxel size written to the NIfTI files (mm)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many volumes per split")
    args = ap.parse_args(argv)
    npz = args.npz if args.npz else download(args.dataset, args.size, args.root)
    convert(npz, args.out, args.spacing, args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
