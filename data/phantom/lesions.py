"""Lesions: their kinds and labels, and how each kind is drawn into the head.

IPH (parenchymal blob, with optional oedema), IVH (blood layering in the dependent occipital horns,
or a cast), SDH (crescent along the inner table, stops at the midline), EDH (biconvex lens), SAH
(blood in sulci/cisterns/fissures), calvarial fracture (thin gap through the skull) and a scalp
swelling (kind ``"swelling"``, no label). Large masses shift the midline (:func:`mass_effect`).

Which lesions a patient has, where and how big, is drawn in ``lesion_sampling``; the functions here
turn a drawn :class:`Lesion` into voxels for ``render._Renderer``. A new lesion kind: its name in
``LESION_KINDS``, its draw in ``lesion_sampling.sample_lesions``, its shape here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data.phantom.anatomy import (CORTICAL, DEEP_GREY, DIPLOE, EDEMA, EXTRA_AXIAL, GREY,
                                  LATERAL_VENTRICLE, SULCAL, VENTRICLE, WHITE)
from data.phantom.geometry import _dot3, _fibonacci_sphere, _sig
from data.phantom.scanner import Pose

SUBTYPES = ("IPH", "IVH", "SDH", "EDH", "SAH")  # haemorrhage subtypes; ICH = any of them
LESION_KINDS = SUBTYPES + ("Fracture",)
LABEL_COLUMNS = ("ICH",) + LESION_KINDS
# P(subtype | ICH-positive scan), drawn independently until at least one is present
SUBTYPE_PROB = {"IPH": 0.45, "IVH": 0.25, "SDH": 0.40, "EDH": 0.15, "SAH": 0.35}
LESION_BITS = {k: 1 << i for i, k in enumerate(LESION_KINDS)}  # bit of each lesion in the bit map
OVERRIDE_KEYS = ("hu", "size_mm", "side", "subtle")  # what a `lesions` dict may fix per lesion
IPH_SITES = (  # typical sites (canonical centre, weight): basal ganglia, thalamus, cerebellum
    ((22.0, 2.0, 5.0), 0.30), ((10.0, -14.0, 6.0), 0.15), ((20.0, -48.0, -30.0), 0.12),
)


@dataclass
class Lesion:
    """One lesion (or a scalp swelling, kind 'swelling', which is no label). ``params`` in mm/HU."""

    kind: str
    hu: float
    params: dict[str, Any] = field(default_factory=dict)


def mass_effect(lesions: list[Lesion], scale: np.ndarray
                ) -> tuple[tuple[float, float, float, float], dict[int, float]]:
    """Midline shift of the largest mass and the squeeze of the ventricle on its side.

    Args:
        lesions: the patient's lesions.
        scale: head-frame mm per canonical mm (``Anatomy.scale``).

    Returns:
        ``((sign, mm, canonical v, canonical w), {side: ventricle width factor})``; no shift
        ``(0, 0, 0, 0)`` and factors 1 without a large SDH, EDH or IPH.
    """
    shift = (0.0, 0.0, 0.0, 0.0)
    vent_factor = {-1: 1.0, 1: 1.0}
    best = 0.0
    for les in lesions:
        p = les.params
        if les.kind == "SDH":
            m, c = (0.5 * p["t"] if p["t"] > 6 else 0.0), p["n0"] * 70.0
        elif les.kind == "EDH":
            m, c = (0.4 * p["t"] if p["t"] > 10 else 0.0), p["n0"] * 70.0
        elif les.kind == "IPH":
            m, c = (0.35 * p["r"] if p["r"] > 12 else 0.0), p["center"]
        else:
            continue
        if m > best:
            best = min(m, 10.0)
            cc = c / scale
            s = 1.0 if cc[0] >= 0 else -1.0
            shift = (s, best, float(cc[1]), float(cc[2]))
            vent_factor = {int(s): max(0.6, 1.0 - 0.04 * best), int(-s): 1.0}
    return shift, vent_factor


def ivh_levels(lesions: list[Lesion], vent_scale: float, scale: np.ndarray, pose: Pose,
               spacing: float) -> dict[int, float]:
    """World y (anterior) of the blood-CSF level in each side's occipital horn (supine).

    Args:
        lesions: the patient's lesions (a layering IVH sets the levels; none: ``{}``).
        vent_scale: ``Anatomy.brain["vent_scale"]``.
        scale: ``Anatomy.scale``.
        pose: head frame -> world of the series.
        spacing: voxel spacing (mm); the blood is at least two voxels deep.

    Returns:
        ``{side: world y}`` for the sides with blood.
    """
    levels: dict[int, float] = {}
    for les in lesions:
        if les.kind == "IVH" and les.params["mode"] == "layer":
            levels = _ivh_levels(les, vent_scale, scale, pose, spacing)
    return levels


def _ivh_levels(les: Lesion, vent_scale: float, scale: np.ndarray, pose: Pose,
                spacing: float) -> dict[int, float]:
    vs = vent_scale
    dirs = _fibonacci_sphere()
    rot = pose.rotation
    levels = {}
    for s in les.params["sides"]:
        ys = []
        for c, semi in LATERAL_VENTRICLE[2:4]:
            cc = np.array([s * c[0] * (1 + 0.12 * (vs - 1)), c[1], c[2]])
            ss = np.array([semi[0] * vs, semi[1] * (1 + 0.25 * (vs - 1)), semi[2] * vs])
            pts = (cc + dirs * ss) * scale  # head frame
            ys.append((pts @ rot.T + pose.center)[:, 1])
        depth = max(les.params["depth"], 2.0 * spacing)
        levels[s] = float(np.min(np.concatenate(ys)) + depth)
    return levels


def scalp_swelling(lesions: list[Lesion], q: np.ndarray) -> np.ndarray:
    """Outward thickening (mm) ``[N]`` of the scalp by haematomas over the head, at points ``q [N, 3]``."""
    out = np.zeros(q.shape[0], np.float32)
    sw = [les for les in lesions if les.kind == "swelling"]
    if sw:
        nh = q / (np.linalg.norm(q, axis=1, keepdims=True) + 1e-6)
        for les in sw:
            cos = np.clip(_dot3(nh, les.params["n0"]), -1, 1)
            out += les.params["h"] * np.exp(-((np.arccos(cos) / les.params["width"]) ** 2))
    return out


def extra_axial_thickness(les: Lesion, nh: np.ndarray, qc: np.ndarray, floor: np.ndarray,
                          spacing: float) -> np.ndarray:
    """Thickness (mm) ``[N]`` of an SDH (crescent) or EDH (lens) at head-frame directions ``nh [N, 3]``.

    ``qc`` canonical points ``[N, 3]``, ``floor`` the canonical height of the cranial floor ``[N]``:
    the blood stops at the midline and above the floor.
    """
    p = les.params
    theta = np.arccos(np.clip(_dot3(nh, p["n0"]), -1.0, 1.0))
    x = theta / p["alpha"]
    if les.kind == "SDH":
        prof = np.sqrt(np.clip(1.0 - x ** 4, 0.0, None))
        t = max(p["t"], 1.3 * spacing)
    else:
        prof = np.sqrt(np.clip(1.0 - x ** 2, 0.0, None))
        t = max(p["t"], 2.0 * spacing)
    prof = prof * _sig((p["side"] * qc[:, 0] - 2.0) / 1.0) * _sig((qc[:, 2] - floor - 4.0) / 2.0)
    return (t * prof).astype(np.float32)


def fracture_mask(les: Lesion, q: np.ndarray, nh: np.ndarray, spacing: float) -> np.ndarray:
    """Points ``q [N, 3]`` (unit directions ``nh``) inside the fracture's wiggly gap: bool ``[N]``."""
    p = les.params
    along = _dot3(q, p["t"])
    off = _dot3(q, p["m"]) + p["wiggle"] * np.sin(p["freq"] * along + p["phase"])
    width = max(p["width"], 1.1 * spacing)
    r = np.linalg.norm(q, axis=1) + 1e-6
    theta = np.arccos(np.clip(_dot3(nh, p["n0"]), -1.0, 1.0))
    return (np.abs(off) < 0.5 * width) & (theta * r < max(p["half"], 3.0 * spacing))


def paint_outer_lesions(lesions: list[Lesion], tissue: np.ndarray, bits: np.ndarray,
                        hu_les: np.ndarray, vault: np.ndarray, sw: np.ndarray, q: np.ndarray,
                        nh: np.ndarray, mid0: np.ndarray, spacing: float) -> None:
    """Fractures of the vault and the density of scalp swellings, in place.

    Args (per body point, ``[n]``): ``tissue`` codes, ``bits`` lesion bit map and ``hu_les`` lesion
    HU (NaN = none), both written; ``vault`` inside the skull vault, ``sw`` inside a swelling;
    ``q``/``nh`` head-frame points and unit directions ``[n, 3]``; ``mid0`` a unit-std texture.
    """
    for les in lesions:
        if les.kind == "Fracture":
            hit = vault & np.isin(tissue, (CORTICAL, DIPLOE)) & fracture_mask(les, q, nh, spacing)
            bits[hit] |= LESION_BITS["Fracture"]
            hu_les[hit] = les.hu + 8.0 * mid0[hit]
        elif les.kind == "swelling":
            hu_les[sw & np.isnan(hu_les)] = les.hu + 4.0 * mid0[sw & np.isnan(hu_les)]


def paint_cranial_lesions(lesions: list[Lesion], tissue: np.ndarray, bits: np.ndarray,
                          hu_les: np.ndarray, q: np.ndarray, depth: np.ndarray, d4: np.ndarray,
                          t_edh: np.ndarray, t_sdh: np.ndarray, ui: np.ndarray, vi: np.ndarray,
                          yw: np.ndarray, mid0: np.ndarray, ivh_level: dict[int, float],
                          spacing: float) -> None:
    """Haemorrhages inside the skull, in place, in the order of ``lesions``.

    Args (per intracranial point, ``[n]``): ``tissue`` codes (IPH oedema and clot written),
    ``bits`` lesion bit map and ``hu_les`` lesion HU (NaN = none), written; ``q`` head-frame
    points ``[n, 3]``; ``depth`` below the scalp surface and ``d4`` of the inner table (mm);
    ``t_edh``/``t_sdh`` extra-axial thicknesses (:func:`extra_axial_thickness`); ``ui``, ``vi``
    midline-shifted canonical u and v; ``yw`` world y; ``mid0`` a unit-std texture;
    ``ivh_level`` (:func:`ivh_levels`); ``spacing`` in mm (the smallest lesions keep a voxel).
    """
    n = q.shape[0]
    for les in lesions:
        p = les.params
        if les.kind == "EDH":
            hit = (depth >= d4) & (depth < d4 + t_edh) & (t_edh > 0)
        elif les.kind == "SDH":
            hit = (depth >= d4 + t_edh) & (depth < d4 + t_edh + t_sdh) & (t_sdh > 0)
        elif les.kind == "IPH":
            d = q - p["center"].astype(np.float32)
            semi = np.maximum(p["semi"], 1.5 * spacing)
            k = np.sqrt(sum((_dot3(d, p["rot"][:, j]) / float(semi[j])) ** 2 for j in range(3)))
            k = k / (1.0 + 0.18 * mid0)
            par = np.isin(tissue, (GREY, WHITE, DEEP_GREY, SULCAL))
            ed = par & (k >= 1) & (k < 1 + p["edema"] / p["r"]) & (tissue != SULCAL)
            tissue[ed] = EDEMA
            hit = par & (k < 1)
            tissue[hit & (tissue == SULCAL)] = GREY  # the clot fills the sulcus
        elif les.kind == "IVH":
            vent = tissue == VENTRICLE
            if p["mode"] == "cast":
                r = max(p["r"], 2.0 * spacing)
                hit = vent & (np.linalg.norm(q - p["center"].astype(np.float32), axis=1) < r)
            else:
                hit = np.zeros(n, bool)
                for s, level in ivh_level.items():
                    hit |= vent & (s * ui > 0) & (vi < -12.0) & (yw < level)
        elif les.kind == "SAH":
            r = np.linalg.norm(q - p["center"].astype(np.float32), axis=1)
            hit = np.isin(tissue, (SULCAL, EXTRA_AXIAL)) & (r < p["r"] * (1 + 0.2 * mid0))
            hit &= np.isnan(hu_les)
        else:
            continue
        bits[hit] |= LESION_BITS[les.kind]
        hu_les[hit] = les.hu + (6.0 if les.kind == "EDH" else 3.0) * mid0[hit]
