"""One phantom (:func:`make_phantom`) and a dataset of them with patient-level manifests
(:func:`write_dataset`)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Union

import numpy as np

from data.phantom.anatomy import sample_anatomy
from data.phantom.lesion_sampling import sample_lesion_kinds, sample_lesions
from data.phantom.lesions import LABEL_COLUMNS, LESION_KINDS
from data.phantom.nifti import save_mask, save_nifti
from data.phantom.render import render
from data.phantom.scanner import Pose, sample_scan

CSV_COLUMNS = ("img_path", "id", "patient_id") + LABEL_COLUMNS
# values of the lesion kinds in the label maps (masks/<id>.nii.gz, the manifests' mask_path): 0 background,
# IPH 1, IVH 2, SDH 3, EDH 4, SAH 5, Fracture 6; where lesions overlap, the later kind in this order wins
LESION_VALUES = {kind: i + 1 for i, kind in enumerate(LESION_KINDS)}
# seed point: world-mm centre of the largest lesion (blank for a healthy head), for seed-point crops
COORD_COLUMNS = ("coordX", "coordY", "coordZ")
SECOND_SERIES_PROB = 0.35  # fraction of patients with a second (re-scanned) series


def _as_rng(rng_or_seed: Union[int, np.random.Generator, None]) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def make_phantom(rng_or_seed: Union[int, np.random.Generator] = 0, size: int = 64,
                 lesions: Optional[dict] = None, pose: Optional[Pose] = None
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, int], dict[str, np.ndarray]]:
    """One synthetic head CT.

    Args:
        rng_or_seed: seed or ``np.random.Generator`` (same seed -> identical output).
        size: voxels per edge; spacing = 240 / size mm (3.75 at 64, 1.5 at 160).
        lesions: None draws lesions with the dataset's prevalence; a dict fixes them exactly:
            ``{}`` healthy, ``{"IPH": True, "Fracture": {"size_mm": 30}}`` (see ``sample_lesions``
            for the override keys).
        pose: the head's pose (head frame -> world); None draws one (``sample_scan``).

    Returns:
        hu: float32 ``[X, Y, Z]`` integer-valued HU (RAS array order).
        affine: (4, 4) voxel -> world mm (RAS).
        labels: ``{"ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "Fracture": 0/1}`` (1 = visible voxels).
        masks: bool ``[X, Y, Z]`` per lesion kind (all present, empty when absent) and per tissue
            (see ``tissue_masks_of``).
    """
    if int(size) < 16:
        raise ValueError(f"size must be >= 16 voxels per edge, got {size}")
    rng = _as_rng(rng_or_seed)
    anatomy = sample_anatomy(rng)
    kinds = sample_lesion_kinds(rng) if lesions is None else lesions
    les = sample_lesions(rng, anatomy, kinds)
    scan = sample_scan(rng)
    if pose is not None:
        scan.pose = pose
    return render(anatomy, les, scan, size, rng)


TEMPLATE_SEED = 12345  # the phantom template's head (any seed gives a plausible one)


def make_template(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The phantom's template head: healthy, in the neutral pose (no tilt, centred), as a head-CT atlas is.

    A common frame for the phantom's heads (``DATA.TEMPLATE`` of the Alice demo): registering each
    head to it maps the same anatomy to the same template coordinates. Deterministic.

    Returns:
        hu: float32 ``[X, Y, Z]`` HU; affine: (4, 4) voxel -> world mm (RAS).
    """
    hu, affine, _, _ = make_phantom(TEMPLATE_SEED, size, lesions={}, pose=Pose(np.zeros(3), np.zeros(3)))
    return hu, affine


def _allocate(group: list[int]) -> dict[str, list[int]]:
    """Split one stratum of patients ~60/20/20, at least one in val and test when >= 3."""
    g = len(group)
    if g >= 3:
        n_val = n_test = max(1, int(round(0.2 * g)))
    else:
        n_val, n_test = (1 if g == 2 else 0), 0
    return {"val": group[:n_val], "test": group[n_val:n_val + n_test],
            "train": group[n_val + n_test:]}


def plan_dataset(n: int, seed: int = 0) -> list[dict]:
    """Patients of a dataset: ``[{"patient", "n_series", "ich", "split"}]`` (deterministic).

    Half the patients (rounded down, or up at random for odd counts) are ICH-positive; splits are
    drawn per ICH stratum so every split has positives and negatives once there are >= 3 of each.
    """
    rng = np.random.default_rng([seed, 0])
    counts = []
    left = n
    while left > 0:
        c = 2 if (left >= 2 and rng.random() < SECOND_SERIES_PROB) else 1
        counts.append(c)
        left -= c
    p = len(counts)
    n_pos = p // 2 + (int(rng.random() < 0.5) if p % 2 else 0)
    order = rng.permutation(p)
    ich = np.zeros(p, bool)
    ich[order[:n_pos]] = True
    split = [""] * p
    for stratum in (np.flatnonzero(ich), np.flatnonzero(~ich)):
        for name, members in _allocate(list(rng.permutation(stratum))).items():
            for i in members:
                split[int(i)] = name
    return [dict(patient=i, n_series=counts[i], ich=bool(ich[i]), split=split[i]) for i in range(p)]


def _seed_point(lmasks: dict[str, np.ndarray], affine: np.ndarray) -> dict[str, str]:
    """World-mm centroid of the largest lesion, as CSV strings (blank when there is none)."""
    sizes = {k: int(lmasks[k].sum()) for k in LESION_KINDS if k in lmasks}
    kind = max(sizes, key=sizes.get) if sizes else None
    if kind is None or sizes[kind] == 0:
        return dict.fromkeys(COORD_COLUMNS, "")
    centre = np.argwhere(lmasks[kind]).mean(axis=0)  # voxel [x, y, z]
    world = affine[:3, :3] @ centre + affine[:3, 3]
    return {c: f"{v:.2f}" for c, v in zip(COORD_COLUMNS, world)}


def write_dataset(out_dir: Union[str, Path], n: int, size: int = 64, seed: int = 0,
                  masks: bool = False, verbose: bool = False, label_maps: bool = False) -> dict[str, Path]:
    """Generate ``n`` phantom series and patient-level split manifests.

    Writes ``out_dir/images/<id>.nii.gz`` and ``out_dir/{train,val,test}.csv`` with columns
    ``img_path`` (relative to ``out_dir``), ``id``, ``patient_id``, ``ICH``, ``IPH``, ``IVH``,
    ``SDH``, ``EDH``, ``SAH``, ``Fracture``, ``coordX``, ``coordY``, ``coordZ`` (world-mm centre of
    the largest lesion, blank when healthy: seed points for SimCLR's negative_mined mode); with ``masks`` also
    ``out_dir/masks/<id>_<kind>.nii.gz`` (uint8) for each lesion present; with ``label_maps`` also one
    uint8 label map per scan, ``out_dir/masks/<id>.nii.gz`` (values :data:`LESION_VALUES`, all 0 on a healthy
    scan), named by a ``mask_path`` column of the manifests (segmentation).

    Args:
        out_dir: output folder (created; existing files of the same names are overwritten).
        n: number of series (volumes); patients have 1 or 2 series.
        size: voxels per edge (spacing 240 / size mm).
        seed: dataset seed (same seed -> byte-identical files).
        masks: also write lesion masks.
        label_maps: also write one label map per scan and the ``mask_path`` column.
        verbose: print one line per volume.

    Returns:
        ``{"train": path, "val": path, "test": path}`` of the CSV files.
    """
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if int(size) < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if masks or label_maps:
        (out / "masks").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for pat in plan_dataset(int(n), seed):
        prng = np.random.default_rng([seed, 1, pat["patient"]])
        anatomy = sample_anatomy(prng)
        lesions = sample_lesions(prng, anatomy, sample_lesion_kinds(prng, pat["ich"]))
        pid = f"P{pat['patient']:04d}"
        scan = None
        for k in range(pat["n_series"]):
            srng = np.random.default_rng([seed, 2, pat["patient"], k])
            scan = sample_scan(srng, scan)
            hu, affine, labels, lmasks = render(anatomy, lesions, scan, size, srng,
                                                tissue_masks=False)
            sid = f"{pid}_S{k + 1}"
            save_nifti(out / "images" / f"{sid}.nii.gz", hu, affine)
            if masks:
                for kind in LESION_KINDS:
                    if labels[kind]:
                        save_mask(out / "masks" / f"{sid}_{kind}.nii.gz", lmasks[kind], affine)
            row = dict(img_path=f"images/{sid}.nii.gz", id=sid, patient_id=pid, **labels,
                       **_seed_point(lmasks, affine))
            if label_maps:
                lab = np.zeros(hu.shape, dtype=np.uint8)
                for kind in LESION_KINDS:
                    if kind in lmasks:
                        lab[lmasks[kind]] = LESION_VALUES[kind]
                save_mask(out / "masks" / f"{sid}.nii.gz", lab, affine)
                row["mask_path"] = f"masks/{sid}.nii.gz"
            rows[pat["split"]].append(row)
            if verbose:
                pos = [k for k in LESION_KINDS if labels[k]]
                print(f"{sid} {pat['split']:5s} {' '.join(pos) or '-'}", flush=True)
    paths = {}
    for split, items in rows.items():
        paths[split] = out / f"{split}.csv"
        with open(paths[split], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS + COORD_COLUMNS + (("mask_path",) if label_maps else ()),
                               lineterminator="\n")
            w.writeheader()
            w.writerows(sorted(items, key=lambda r: r["id"]))
    return paths

