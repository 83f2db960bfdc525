"""Alice's cross-scan matching through a head-CT template: how far off is "the same anatomy" in two heads?

    python -m benchmarks.alice_matching --json benchmarks/results/alice_matching.json \
        --figure benchmarks/results/alice_matching.png

(a) Phantoms: ``--phantoms`` healthy phantom heads of 160^3 at 1.5 mm (data.phantom), preprocessed as the
cache does (RAS, head crop, 1.5 mm), each registered to the template (``--template``, default the shared
head-CT atlas) by :func:`data.registration.register_to_template`. For every ordered pair (A, B), random
voxels inside A's brain are mapped through the template into B (:func:`data.registration.map_voxel`) and
compared with the TRUE corresponding point. Truth: the phantom generator draws each head in its own head
frame (u right, v anterior, w superior, mm) and places it by its pose (``p = R q + c``); its deep structures
sit at canonical positions scaled per axis by the anatomy's size (``q = scale * q_canonical``). The true
partner of a point of A is the point of B with the same canonical coordinate,
``p_B = R_B (scale_B * scale_A^-1 * R_A^T (p_A - c_A)) + c_B``: exact for the ventricles and deep nuclei,
approximate near the cortex (head shapes and scalp / skull thicknesses also differ), so the statistics are
given for all brain points and for the deep ones (within 40 canonical mm of the head-frame origin). The
same is done with the phantom's template head (``data.phantom.make_template``, the Alice demo's template).

(b) Real heads: the atlas itself resampled onto a 1.5 mm grid under a known random affine (~10 deg, ~10 mm,
~5 %), the real head CT ``headsq_quarter`` (VTK sample; its header has S/I and A/P reversed, so it is
registered both as stored and with y and z flipped), and the Philips DICOM series (a stereotaxy phantom,
not a head: a refusal is the right answer). A few atlas landmarks (lateral ventricles, brain vertex,
frontal pole, brain centre) are mapped into each scan and drawn (``--figure``). Seconds per registration
(wall and CPU of this process, one core) and each scan's similarity go into the JSON.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from benchmarks.common import REPO

SHARED = REPO.parent / "shared" / "data"
ATLAS = SHARED / "head_atlas" / "ct_brain_atlas_1mm.nii.gz"
HEADSQ = SHARED / "headsq_quarter.nii.gz"
PHILIPS = SHARED / "dicom_philips_tilt"
DEEP_MM = 40.0  # "deep" points: within this canonical distance of the head-frame origin (ventricles, nuclei)


def _phantom(seed: int, size: int) -> dict[str, Any]:
    """A healthy phantom head with its pose and anatomy scale (the draws of ``make_phantom(seed, size, {})``)."""
    from data.phantom.anatomy import sample_anatomy
    from data.phantom.lesion_sampling import sample_lesions
    from data.phantom.render import render
    from data.phantom.scanner import sample_scan

    rng = np.random.default_rng(seed)
    anatomy = sample_anatomy(rng)
    lesions = sample_lesions(rng, anatomy, {})
    scan = sample_scan(rng)
    hu, affine, _, masks = render(anatomy, lesions, scan, size, rng)
    return {"hu": hu, "affine": affine, "brain": masks["brain"], "rot": scan.pose.rotation.astype(np.float64),
            "center": np.asarray(scan.pose.center, np.float64), "scale": anatomy.scale.astype(np.float64)}


def _true_partner(p_a: np.ndarray, a: dict, b: dict) -> np.ndarray:
    """World points of head A ``[N, 3]`` -> the same canonical anatomy in head B (see the module docstring)."""
    q = (p_a - a["center"]) @ a["rot"]  # R^T (p - c), row-wise
    return (q / a["scale"] * b["scale"]) @ b["rot"].T + b["center"]


def _register(hu: np.ndarray, affine: np.ndarray, template, min_similarity: float) -> dict[str, Any]:
    from data.registration import register_to_template

    t_cpu = time.process_time()
    reg = register_to_template(hu, affine, template, min_similarity=min_similarity)
    return {"reg": reg, "seconds": reg.seconds, "cpu_seconds": time.process_time() - t_cpu}


def _stats(d: np.ndarray) -> dict[str, float]:
    return {"mean_mm": float(d.mean()), "median_mm": float(np.median(d)), "p95_mm": float(np.percentile(d, 95)),
            "max_mm": float(d.max()), "n_points": int(d.size)}


def phantom_matching(heads: list[dict], regs: list, points: int, rng: np.random.Generator) -> dict[str, Any]:
    """Distances (mm) between template-mapped and true partner points over every ordered pair of heads."""
    from data.registration import map_voxel

    dists, deep = [], []
    for i, a in enumerate(heads):
        for j, b in enumerate(heads):
            if i == j or not (regs[i].ok and regs[j].ok):
                continue
            vox = np.argwhere(a["brain_pre"]).astype(np.float64)
            vox = vox[rng.choice(len(vox), size=min(points, len(vox)), replace=False)]
            got = map_voxel(vox, a["affine_pre"], regs[i].to_template, b["affine_pre"], regs[j].to_template)
            got_w = got @ b["affine_pre"][:3, :3].T + b["affine_pre"][:3, 3]
            p_a = vox @ a["affine_pre"][:3, :3].T + a["affine_pre"][:3, 3]
            d = np.linalg.norm(got_w - _true_partner(p_a, a, b), axis=1)
            dists.append(d)
            qc = ((p_a - a["center"]) @ a["rot"]) / a["scale"]  # canonical head-frame mm
            deep.append(d[np.linalg.norm(qc, axis=1) < DEEP_MM])
    if not dists:
        return {"pairs": 0}
    return {"pairs": len(dists), **_stats(np.concatenate(dists)), "deep": _stats(np.concatenate(deep))}


def _random_affine(rng: np.random.Generator) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("xyz", rng.uniform(-10, 10, 3), degrees=True).as_matrix() @ np.diag(
        rng.uniform(0.95, 1.05, 3))
    m[:3, 3] = rng.uniform(-10, 10, 3)
    return m


def _atlas_moved(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The atlas seen by a 1.5 mm axis-aligned scan whose world maps to the atlas's by a random affine ``m``."""
    import nibabel as nib
    from scipy import ndimage

    img = nib.load(str(ATLAS))
    atlas = np.asarray(img.dataobj, dtype=np.float32)
    t_aff = np.asarray(img.affine, dtype=np.float64)
    m = _random_affine(rng)
    shape = (150, 150, 135)
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    centre_t = t_aff[:3, :3] @ (np.asarray(atlas.shape) - 1) / 2 + t_aff[:3, 3]
    centre_s = np.linalg.solve(m[:3, :3], centre_t - m[:3, 3])
    aff[:3, 3] = centre_s - 1.5 * (np.asarray(shape) - 1) / 2
    vox = np.linalg.inv(t_aff) @ m @ aff  # scan voxel -> atlas voxel
    hu = ndimage.affine_transform(atlas, vox[:3, :3], vox[:3, 3], output_shape=shape, order=1, cval=0.0)
    return hu.astype(np.float32), aff, m


def atlas_landmarks() -> dict[str, np.ndarray]:
    """Template world points (mm): lateral ventricles, brain centre, vertex and frontal pole on the midline."""
    import nibabel as nib
    from scipy import ndimage

    img = nib.load(str(ATLAS))
    a = np.asarray(img.dataobj, dtype=np.float32)
    aff = np.asarray(img.affine, dtype=np.float64)
    brain = a > 0
    inner = ndimage.binary_erosion(brain, iterations=15)
    csf = inner & (a < 15)
    lab, n = ndimage.label(csf)
    sizes = ndimage.sum(csf, lab, range(1, n + 1))
    vox = {}
    big = np.argsort(sizes)[::-1][:2] + 1
    cents = sorted((ndimage.center_of_mass(lab == k) for k in big), key=lambda c: c[0])
    vox["left_ventricle"], vox["right_ventricle"] = (np.asarray(c) for c in cents)
    bc = np.asarray(ndimage.center_of_mass(brain))
    vox["brain_centre"] = bc
    mid = int(round(bc[0]))
    zs = np.flatnonzero(brain[mid, int(round(bc[1]))])
    vox["vertex"] = np.array([mid, bc[1], zs.max() - 5.0])
    ys = np.flatnonzero(brain[mid, :, int(round(bc[2]))])
    vox["frontal_pole"] = np.array([mid, ys.max() - 5.0, bc[2]])
    return {k: aff[:3, :3] @ v + aff[:3, 3] for k, v in vox.items()}


def _real_heads(rng: np.random.Generator) -> list[dict[str, Any]]:
    from data.dicom import read_dicom_series
    from data.io import Volume, read_volume, spacing_from_affine

    out = []
    hu, aff, m = _atlas_moved(rng)
    out.append({"name": "atlas_random_affine", "hu": hu, "affine": aff, "truth": m})
    v = read_volume(HEADSQ)
    out.append({"name": "headsq_as_stored", "hu": v.array, "affine": v.affine})
    flip = v.affine.copy()
    flip[:, 1:3] *= -1
    flip[1, 3] = (v.array.shape[1] - 1) * v.spacing[1]
    flip[2, 3] = (v.array.shape[2] - 1) * v.spacing[2]
    out.append({"name": "headsq_yz_flipped", "hu": v.array, "affine": flip})
    hu, aff = read_dicom_series(PHILIPS)
    out.append({"name": "philips_stereotaxy_phantom", "hu": hu, "affine": aff})
    for r in out:
        r["volume"] = Volume(np.asarray(r["hu"], np.float32), r["affine"], spacing_from_affine(r["affine"]))
    return out


def _figure(path: Path, rows: list[dict[str, Any]], landmarks: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(landmarks)
    fig, axes = plt.subplots(len(rows), 3, figsize=(10.5, 3.4 * len(rows)), squeeze=False)
    for r, row in zip(axes, rows):
        hu, aff, reg = row["hu"], row["affine"], row["reg"]
        world = np.stack([landmarks[n] for n in names])
        pts_w = (world - reg.to_template[:3, 3]) @ np.linalg.inv(reg.to_template[:3, :3]).T
        pts = (pts_w - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T  # [L, 3] scan voxels
        c = np.clip(np.rint(pts[names.index("left_ventricle")]).astype(int), 0, np.asarray(hu.shape) - 1)
        sp = np.linalg.norm(aff[:3, :3], axis=0)
        views = [("axial", hu[:, :, c[2]].T, (0, 1), 2, sp[1] / sp[0]),
                 ("coronal", hu[:, c[1], :].T, (0, 2), 1, sp[2] / sp[0]),
                 ("sagittal", hu[c[0], :, :].T, (1, 2), 0, sp[2] / sp[1])]
        for ax, (title, img, (i, j), k, aspect) in zip(r, views):
            ax.imshow(img, origin="lower", cmap="gray", vmin=-20, vmax=100, aspect=aspect)
            near = np.abs(pts[:, k] - c[k]) * sp[k] < 12.0  # landmarks within 12 mm of the slice
            ax.scatter(pts[near, i], pts[near, j], s=40, c=np.arange(len(names))[near], cmap="tab10", vmin=0,
                       vmax=9, marker="+", linewidths=2)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=8)
        status = "ok" if reg.ok else f"REFUSED: {reg.reason}"
        r[0].set_ylabel(f"{row['name']}\nsim {reg.similarity:.2f}\n{status[:60]}", fontsize=7)
    fig.suptitle("atlas landmarks mapped into each scan (+): " + ", ".join(
        f"{i}={n}" for i, n in enumerate(names)), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)


def run(phantoms: int, size: int, points: int, seed: int, min_similarity: float, figure: Optional[Path]
        ) -> dict[str, Any]:
    from data.registration import load_template, template_from_array
    from data.transforms import preprocess_volume
    from data.io import Volume

    rng = np.random.default_rng(seed)
    template = load_template(ATLAS)
    spacing = [240.0 / size] * 3
    heads, regs, per_scan = [], [], []
    for k in range(phantoms):
        h = _phantom(seed + 1 + k, size)
        pre = preprocess_volume(Volume(h["hu"], h["affine"], tuple(spacing)), spacing, -300.0)
        # same spacing: preprocessing only crops; the brain mask on the cropped grid from the crop's offset
        off = np.rint(np.linalg.solve(h["affine"][:3, :3], pre.affine[:3, 3] - h["affine"][:3, 3])).astype(int)
        h["brain_pre"] = h["brain"][off[0]:off[0] + pre.array.shape[0], off[1]:off[1] + pre.array.shape[1],
                                    off[2]:off[2] + pre.array.shape[2]]
        h["affine_pre"], h["hu_pre"] = pre.affine, pre.array
        r = _register(pre.array, pre.affine, template, min_similarity)
        heads.append(h)
        regs.append(r["reg"])
        per_scan.append({"scan": f"phantom_{seed + 1 + k}", "similarity": r["reg"].similarity, "ok": r["reg"].ok,
                         "reason": r["reg"].reason, "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"]})
        print(f"phantom {k}: similarity {r['reg'].similarity:.3f} {r['reg'].reason or 'ok'} "
              f"{r['seconds']:.2f} s ({r['cpu_seconds']:.2f} s CPU)", flush=True)
    via_atlas = phantom_matching(heads, regs, points, rng)
    print(f"phantom matching via the atlas: {via_atlas}", flush=True)

    # the phantom's own template head (data.phantom.make_template: healthy, neutral pose; the Alice demo's)
    from data.phantom import make_template
    t_hu, t_aff = make_template(size)
    t_pre = preprocess_volume(Volume(t_hu, t_aff, tuple(spacing)), spacing, -300.0)
    t0 = template_from_array(t_pre.array, t_pre.affine, path="phantom_template")
    regs_p = [_register(h["hu_pre"], h["affine_pre"], t0, min_similarity)["reg"] for h in heads]
    via_phantom = phantom_matching(heads, regs_p, points, rng)
    via_phantom["similarity"] = [r.similarity for r in regs_p]
    print(f"phantom matching via the phantom template: {via_phantom}", flush=True)

    landmarks = atlas_landmarks()
    rows = [{"name": f"phantom_{seed + 1 + k}", "hu": heads[k]["hu_pre"], "affine": heads[k]["affine_pre"],
             "reg": regs[k]} for k in range(min(2, phantoms))]
    real = []
    for r in _real_heads(rng):
        pre = preprocess_volume(r["volume"], [1.5, 1.5, 1.5], -300.0)
        got = _register(pre.array, pre.affine, template, min_similarity)
        reg = got["reg"]
        item = {"scan": r["name"], "similarity": reg.similarity, "ok": reg.ok, "reason": reg.reason,
                "seconds": got["seconds"], "cpu_seconds": got["cpu_seconds"]}
        if "truth" in r:  # error of the recovered transform at the atlas's brain voxels (every 4th voxel)
            import nibabel as nib

            img = nib.load(str(ATLAS))
            vox = np.argwhere(np.asarray(img.dataobj)[::4, ::4, ::4] > 0) * 4.0
            p_t = vox @ img.affine[:3, :3].T + img.affine[:3, 3]
            p_s = (p_t - r["truth"][:3, 3]) @ np.linalg.inv(r["truth"][:3, :3]).T
            err = np.linalg.norm(p_s @ reg.to_template[:3, :3].T + reg.to_template[:3, 3] - p_t, axis=1)
            item["error_at_brain_voxels"] = _stats(err)
        real.append(item)
        rows.append({"name": r["name"], "hu": pre.array, "affine": pre.affine, "reg": reg})
        print(f"{r['name']}: similarity {reg.similarity:.3f} {reg.reason or 'ok'} {got['seconds']:.2f} s "
              f"({got['cpu_seconds']:.2f} s CPU)" + (f" error {item['error_at_brain_voxels']}"
                                                      if "error_at_brain_voxels" in item else ""), flush=True)
    if figure is not None:
        _figure(figure, rows, landmarks)
    secs = [s["cpu_seconds"] for s in per_scan + real]
    return {"template": str(ATLAS), "phantom_size": size, "phantom_spacing_mm": spacing[0],
            "phantom_scans": per_scan, "phantom_matching_via_atlas": via_atlas,
            "phantom_matching_via_phantom_template": via_phantom, "real_scans": real,
            "landmarks_template_world_mm": {k: v.tolist() for k, v in landmarks.items()},
            "cpu_seconds_per_registration": {"mean": float(np.mean(secs)), "max": float(np.max(secs))},
            "correspondence": "same canonical head-frame coordinate: p_B = R_B (s_B / s_A * R_A^T (p_A - c_A)) + c_B"}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from benchmarks.common import header, write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phantoms", type=int, default=4, help="phantom heads (every ordered pair is matched)")
    ap.add_argument("--size", type=int, default=160, help="phantom voxels per edge (240 mm field of view)")
    ap.add_argument("--points", type=int, default=500, help="random brain points per pair")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-similarity", type=float, default=0.5, help="DATA.TEMPLATE_MIN_SIMILARITY")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--figure", default=None, help="write the landmark figure here (PNG)")
    args = ap.parse_args(argv)
    if not ATLAS.exists():
        ap.error(f"template {ATLAS} not found")
    t = time.perf_counter()
    results = run(args.phantoms, args.size, args.points, args.seed, args.min_similarity,
                  Path(args.figure) if args.figure else None)
    doc = {**header(benchmark="alice_matching", phantoms=args.phantoms, points=args.points, seed=args.seed,
                    min_similarity=args.min_similarity), **results, "total_seconds": time.perf_counter() - t}
    if args.json:
        write_json(args.json, doc)
    return doc


if __name__ == "__main__":
    main()
    sys.exit(0)
