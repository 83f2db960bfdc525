"""Synthetic head CT with haemorrhage and fracture labels: the embedded data of demo, tests, notebooks.

A phantom is an analytic head evaluated at every voxel centre, in a *head frame* (u = right,
v = anterior, w = superior, mm, origin at the centre of the cranial ellipsoid) that a pose (tilt +
position) maps into the scanner's RAS world. Layers are offsets of one signed distance to the
scalp surface (scalp, outer table, diploe, inner table, extra-axial CSF, cortex), so shape changes
move them together. Inside the brain: grey-matter ribbon folded along random sulci, white
matter, deep grey nuclei, lateral/third/fourth ventricles, interhemispheric and Sylvian fissures,
basal cisterns, falx, optional choroid/pineal calcification and periventricular hypodensity;
below: skull base with petrous ridges, sinuses, neck with spine and airway; outside: air and a
curved head holder separated from the head by air. A scanner point-spread blur and spatially
correlated noise come last. Lesions sit where they occur: IPH (parenchymal blob, basal ganglia,
thalamus, lobar or cerebellar, with optional oedema), IVH (blood layering in the dependent
occipital horns or a cast), SDH (crescent along the inner table, stops at the midline), EDH
(biconvex lens), SAH (blood in sulci/cisterns/fissures), calvarial fracture (thin gap through the
skull, often under an EDH and a scalp swelling). Large masses shift the midline.

Usage::

    python -m data.phantom --out DIR --n 24 [--size 64] [--seed 0] [--masks]

writes ``DIR/images/<id>.nii.gz`` and ``DIR/{train,val,test}.csv`` (see ``write_dataset``).
Volumes are int16 with ``scl_slope=1, scl_inter=-1024``: ``nibabel`` ``get_fdata()`` gives HU.
The field of view is 240 mm at every size: spacing = 240 / size mm (3.75 mm at 64, 1.5 at 160).
"""
from __future__ import annotations

import argparse
import csv
import gzip
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import nibabel as nib
import numpy as np
from scipy import ndimage

FOV_MM = 240.0  # edge of the cubic field of view; spacing = FOV_MM / size
SUBTYPES = ("IPH", "IVH", "SDH", "EDH", "SAH")  # haemorrhage subtypes; ICH = any of them
LESION_KINDS = SUBTYPES + ("Fracture",)
LABEL_COLUMNS = ("ICH",) + LESION_KINDS
CSV_COLUMNS = ("img_path", "id", "patient_id") + LABEL_COLUMNS
# seed point: world-mm centre of the largest lesion (blank for a healthy head), for seed-point crops
COORD_COLUMNS = ("coordX", "coordY", "coordZ")
# P(subtype | ICH-positive scan), drawn independently until at least one is present
SUBTYPE_PROB = {"IPH": 0.45, "IVH": 0.25, "SDH": 0.40, "EDH": 0.15, "SAH": 0.35}
LESION_BITS = {k: 1 << i for i, k in enumerate(LESION_KINDS)}  # bit of each lesion in the bit map
OVERRIDE_KEYS = ("hu", "size_mm", "side", "subtle")  # what a `lesions` dict may fix per lesion
SECOND_SERIES_PROB = 0.35  # fraction of patients with a second (re-scanned) series

# Tissue codes of the label map (anatomy; lesions are kept apart in a bit map).
(AIR, BED, SOFT, FAT, CORTICAL, DIPLOE, SPINE, EXTRA_AXIAL, SULCAL, VENTRICLE, GREY, WHITE,
 DEEP_GREY, EDEMA, FALX, CALC, AIR_CAVITY) = range(17)
N_TISSUES = 17
BRAIN_CODES = (GREY, WHITE, DEEP_GREY, EDEMA)
CSF_CODES = (EXTRA_AXIAL, SULCAL, VENTRICLE)
INTRACRANIAL_CODES = BRAIN_CODES + CSF_CODES + (FALX, CALC)


@dataclass(frozen=True)
class _Grid:
    """Regular grid holding a random texture in the head frame (mm)."""

    origin: tuple[float, float, float]
    cell: float
    shape: tuple[int, int, int]

    def index(self, q: np.ndarray) -> np.ndarray:
        """Head-frame points ``[N, 3]`` (mm) -> fractional grid indices ``[3, N]``."""
        return ((q - np.asarray(self.origin, np.float32)) / np.float32(self.cell)).T


LOW_GRID = _Grid((-128.0, -128.0, -128.0), 8.0, (33, 33, 33))  # slow variations (thickness, bias)
MID_GRID = _Grid((-120.0, -120.0, -120.0), 5.0, (49, 49, 49))  # lumps, fat marbling, heterogeneity
SULCI_GRID = _Grid((-98.0, -115.0, -84.0), 3.5, (57, 67, 55))  # sulcal sheets over the brain box

# Canonical brain (head of scalp semi-axes 78 x 96 x 88 mm): (centre u, v, w), (semi-axes) in mm;
# u is given for the right side and mirrored.
LATERAL_VENTRICLE = (
    ((9.0, 22.0, 20.0), (6.0, 14.0, 8.0)),  # frontal horn
    ((12.0, -2.0, 25.0), (7.0, 22.0, 6.5)),  # body
    ((18.0, -27.0, 14.0), (9.0, 11.0, 10.0)),  # atrium (trigone)
    ((16.0, -43.0, 12.0), (5.0, 12.0, 5.0)),  # occipital horn
    ((30.0, -2.0, -18.0), (4.0, 14.0, 4.0)),  # temporal horn
)
THIRD_VENTRICLE = ((0.0, -4.0, 2.0), (2.0, 13.0, 9.0))
FOURTH_VENTRICLE = ((0.0, -34.0, -36.0), (5.0, 3.5, 6.0))
PONS = ((0.0, -18.0, -38.0), (12.0, 10.0, 12.0))
PREPONTINE_CISTERN = ((0.0, -5.0, -36.0), (8.0, 3.5, 10.0))
DEEP_NUCLEI = (
    ((13.0, 17.0, 16.0), (5.0, 8.0, 8.0)),  # caudate head
    ((22.0, 2.0, 5.0), (6.0, 13.0, 9.0)),  # lentiform nucleus
    ((10.0, -14.0, 6.0), (7.5, 11.0, 8.0)),  # thalamus
)
SUPRASELLAR_CISTERN = ((0.0, 10.0, -18.0), (12.0, 8.0, 4.0))
IPH_SITES = (  # typical sites (canonical centre, weight): basal ganglia, thalamus, cerebellum
    ((22.0, 2.0, 5.0), 0.30), ((10.0, -14.0, 6.0), 0.15), ((20.0, -48.0, -30.0), 0.12),
)


def spacing_for_size(size: int) -> float:
    """Isotropic voxel spacing (mm) of a phantom of ``size^3`` voxels (240 mm field of view)."""
    return FOV_MM / int(size)


def phantom_affine(size: int) -> np.ndarray:
    """RAS voxel->world affine (4, 4) of a ``size^3`` phantom, the volume centred on the origin."""
    sp = spacing_for_size(size)
    aff = np.diag([sp, sp, sp, 1.0])
    aff[:3, 3] = -0.5 * (size - 1) * sp
    return aff


def _sig(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _random_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise, zero mean and unit std (float32)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    f -= f.mean()
    f /= f.std() + 1e-8
    return f


def _sample(tex: np.ndarray, grid: _Grid, q: np.ndarray) -> np.ndarray:
    """Trilinear lookup of a texture at head-frame points ``q [N, 3]`` -> ``[N]``."""
    if q.shape[0] == 0:
        return np.zeros(0, np.float32)
    return ndimage.map_coordinates(tex, grid.index(q), order=1, mode="nearest")


def _k(q: np.ndarray, center, semi) -> np.ndarray:
    """Normalised ellipsoid radius |(q - center) / semi| (< 1 inside) for points ``[N, 3]``."""
    d0 = (q[:, 0] - center[0]) / semi[0]
    d1 = (q[:, 1] - center[1]) / semi[1]
    d2 = (q[:, 2] - center[2]) / semi[2]
    return np.sqrt(d0 * d0 + d1 * d1 + d2 * d2)


def _dot3(q: np.ndarray, vec) -> np.ndarray:
    """Row-wise dot product of points ``[N, 3]`` with a 3-vector (no BLAS: cheap and thread-free)."""
    return (q[:, 0] * float(vec[0]) + q[:, 1] * float(vec[1]) + q[:, 2] * float(vec[2]))


def _rotation(pitch: float, roll: float, yaw: float) -> np.ndarray:
    """Rotation (3, 3) from angles in degrees about x (pitch), y (roll), z (yaw): Rz @ Ry @ Rx."""
    a, b, c = np.deg2rad([pitch, roll, yaw])
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def _fibonacci_sphere(n: int = 162) -> np.ndarray:
    """``n`` near-uniform unit vectors ``[n, 3]``."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], 1)


# ---------------------------------------------------------------------------------------------
# Parameters: anatomy (per patient), lesions (per patient), scan (per series)


@dataclass
class Anatomy:
    """Patient-level anatomy (mm, HU), shared by every series of the patient."""

    axes: np.ndarray  # scalp semi-axes (right, anterior, superior, inferior) mm
    egg: float  # relative narrowing of the head towards the front (< 0)
    bumps: np.ndarray  # [8] coefficients of low-order shape harmonics
    thickness: dict[str, float]  # scalp, temporalis, outer, diploe, inner, csf, grey, base
    brain: dict[str, float]  # sulcus_width/depth, fissure/sylvian/cistern width, vent_scale, ...
    neck: tuple[float, float, float, float]  # (centre v, semi u, semi v, top w) mm
    hu: dict[str, float]  # tissue densities
    extras: dict[str, float]  # calcification radii (0 = absent), frontal sinus, pvwm drop
    tex_low: np.ndarray  # [3, *LOW_GRID.shape] unit-std fields: scalp, bone, brain bias
    tex_mid: np.ndarray  # [2, *MID_GRID.shape] unit-std fields: lumps/fat, width/heterogeneity
    sulci: np.ndarray  # [*SULCI_GRID.shape] signed distance (mm) to the sulcal sheets

    @property
    def scale(self) -> np.ndarray:
        """Head-frame mm per canonical-brain mm along (u, v, w)."""
        return np.array([self.axes[0] / 78.0, self.axes[1] / 96.0, self.axes[2] / 88.0], np.float32)

    @property
    def brain_depth(self) -> float:
        """Nominal depth (mm) of the brain surface below the scalp surface."""
        t = self.thickness
        return t["scalp"] + t["outer"] + t["diploe"] + t["inner"] + t["csf"]


@dataclass
class Lesion:
    """One lesion (or a scalp swelling, kind 'swelling', which is no label). ``params`` in mm/HU."""

    kind: str
    hu: float
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pose:
    """Head frame -> world: ``p = rotation @ q + center``; angles (pitch, roll, yaw) in degrees."""

    angles: np.ndarray
    center: np.ndarray

    @property
    def rotation(self) -> np.ndarray:
        return _rotation(*self.angles)


@dataclass
class Scan:
    """Series-level acquisition: head pose, noise level, head holder."""

    pose: Pose
    noise_sigma: float  # HU, std of the noise in the brain
    bed: dict[str, float]  # gap, thickness, hu, arc (deg), shift (mm)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw a patient's head: shape, layer thicknesses, atrophy, densities and textures.

    Args:
        rng: random generator (the only source of randomness).
    """
    U = rng.uniform
    atrophy = float(rng.beta(1.5, 2.5))  # 0 young ... 1 old: CSF spaces and ventricles grow
    axes = np.array([U(148, 176) / 2, U(180, 205) / 2, U(82, 94), U(64, 76)])
    bumps = rng.normal(0, 1, 8) * np.array([0.006, 0.01, 0.008, 0.01, 0.015, 0.01, 0.015, 0.012])
    thickness = dict(
        scalp=U(3.5, 6.5), temporalis=U(3.0, 9.0), outer=U(1.6, 2.6), diploe=U(2.2, 5.0),
        inner=U(1.3, 2.2), csf=1.0 + 3.0 * atrophy * U(0.6, 1.2), grey=U(2.5, 3.5),
        base=U(6.0, 11.0),
    )
    brain = dict(
        sulcus_width=1.0 + 2.2 * atrophy + U(0, 0.5), sulcus_depth=U(10.0, 18.0),
        fissure_width=1.5 + 3.0 * atrophy, sylvian_width=2.0 + 3.0 * atrophy,
        cistern_width=2.0 + 2.0 * atrophy, vent_scale=0.8 + 0.7 * atrophy + U(-0.1, 0.1),
        floor_shift=U(-3, 3), midline_bend=U(-1.5, 1.5),
    )
    grey = U(33.5, 36.5)
    white = grey - U(5.5, 8.0)
    hu = dict(
        soft=U(30, 45), fat=U(-110, -80), cortical=U(1250, 1650), diploe=U(450, 800),
        spine=U(250, 400), csf=U(3, 10), grey=grey, white=white, deep=grey + U(-0.5, 1.5),
        edema=white - U(6, 12), falx=U(45, 75), calc=U(150, 400),
    )
    extras = dict(
        choroid_r=U(1.8, 3.5) if rng.random() < 0.5 + 0.4 * atrophy else 0.0,
        pineal_r=U(2.0, 3.5) if rng.random() < 0.5 else 0.0,
        frontal_sinus=float(rng.random() < 0.8),
        pvwm=U(2.0, 6.0) if rng.random() < 0.6 * atrophy else 0.0,
    )
    tex_low = np.stack([_random_field(rng, LOW_GRID.shape, 2.5) for _ in range(3)])
    tex_mid = np.stack([_random_field(rng, MID_GRID.shape, 1.2) for _ in range(2)])
    s = _random_field(rng, SULCI_GRID.shape, 0.9)  # zero set = sulci every ~12-15 mm
    grad = np.gradient(s, SULCI_GRID.cell)
    gnorm = np.sqrt(grad[0] ** 2 + grad[1] ** 2 + grad[2] ** 2)
    sulci = np.clip(s / np.maximum(gnorm, 1e-3), -8.0, 8.0).astype(np.float32)
    return Anatomy(axes, float(U(-0.10, -0.02)), bumps, thickness, brain,
                   (float(U(-25, -12)), float(U(42, 55)), float(U(40, 52)), -25.0), hu, extras,
                   tex_low, tex_mid, sulci)


def sample_lesion_kinds(rng: np.random.Generator, ich: Optional[bool] = None) -> dict[str, bool]:
    """Draw which lesions a patient has: ICH in half (or as given), subtypes mixed, fracture ~25%.

    Args:
        rng: random generator.
        ich: force an ICH-positive (True) or negative (False) patient; None draws it (p = 0.5).
    """
    if ich is None:
        ich = bool(rng.random() < 0.5)
    kinds: dict[str, bool] = {}
    while ich and not kinds:
        kinds = {k: True for k, p in SUBTYPE_PROB.items() if rng.random() < p}
    p_fracture = 0.8 if kinds.get("EDH") else (0.3 if ich else 0.12)
    if rng.random() < p_fracture:
        kinds["Fracture"] = True
    return kinds


def _check_request(lesions: dict) -> dict[str, dict]:
    out = {}
    for kind, value in lesions.items():
        if kind not in LESION_KINDS:
            raise ValueError(f"lesions: unknown kind {kind!r}; expected some of {LESION_KINDS}")
        if value is False or value is None:
            continue
        if value is True:
            value = {}
        if not isinstance(value, dict):
            raise ValueError(f"lesions[{kind!r}] must be bool or dict, got {value!r}")
        bad = set(value) - set(OVERRIDE_KEYS)
        if bad:
            raise ValueError(f"lesions[{kind!r}]: unknown keys {sorted(bad)}; allowed {OVERRIDE_KEYS}")
        if "side" in value and value["side"] not in (-1, 1):
            raise ValueError(f"lesions[{kind!r}]['side'] must be -1 (left) or 1 (right), got {value['side']!r}")
        out[kind] = dict(value)
    return out


def _surface_point(anatomy: Anatomy, n0: np.ndarray, depth: float) -> np.ndarray:
    """Head-frame point along direction ``n0`` lying ``depth`` mm below the scalp surface."""
    r = np.linspace(5.0, 130.0, 501, dtype=np.float32)
    pts = r[:, None] * np.asarray(n0, np.float32)[None]
    d = -_Renderer(anatomy, [], None, 1.0).head_sdf(pts)
    i = int(np.argmin(np.abs(d - depth)))
    return pts[i].astype(np.float64)


def sample_lesions(rng: np.random.Generator, anatomy: Anatomy, kinds: dict) -> list[Lesion]:
    """Place and size the requested lesions in a patient's anatomy.

    Args:
        rng: random generator.
        anatomy: the patient's anatomy (lesions are placed where they occur in it).
        kinds: ``{kind: True | {override: value}}`` for kinds in ``LESION_KINDS``; overrides:
            ``hu`` (lesion density), ``size_mm`` (IPH radius, SDH/EDH maximal thickness, SAH
            region radius, IVH blood depth or cast radius, fracture half-length), ``side``
            (-1 left, 1 right), ``subtle`` (bool: small and low-contrast).
    """
    req = _check_request(kinds)
    U = rng.uniform
    plain = _Renderer(anatomy, [], None, 1.0)
    out: list[Lesion] = []

    def pick(o: dict, key: str, default: Any) -> Any:
        return o[key] if key in o else default

    def side_of(o: dict) -> int:
        return int(pick(o, "side", 1 if rng.random() < 0.5 else -1))

    edh_n0 = None
    for kind in LESION_KINDS:
        if kind not in req:
            continue
        o = req[kind]
        subtle = bool(pick(o, "subtle", rng.random() < 0.25))
        if kind == "IPH":
            r = float(pick(o, "size_mm", U(4.0, 7.0) if subtle else math.exp(U(math.log(7), math.log(22)))))
            hu = float(pick(o, "hu", U(54, 60) if subtle else U(58, 88)))
            semi = r * np.array([1.0, U(0.7, 1.1), U(0.6, 1.0)])
            center = _place_iph(rng, anatomy, plain, r, side_of(o))
            out.append(Lesion(kind, hu, dict(center=center, semi=semi, rot=_random_rotation(rng),
                                             edema=0.0 if subtle else r * U(0.0, 0.5), r=r)))
        elif kind == "IVH":
            layer = rng.random() < 0.6
            hu = float(pick(o, "hu", U(48, 56) if subtle else U(58, 85)))
            s = side_of(o)
            if layer:
                depth = float(pick(o, "size_mm", U(3.0, 5.0) if subtle else U(4.0, 12.0)))
                sides = [s] if (subtle or rng.random() < 0.4) else [-1, 1]
                out.append(Lesion(kind, hu, dict(mode="layer", depth=depth, sides=sides)))
            else:
                r = float(pick(o, "size_mm", U(4.0, 7.0) if subtle else U(7.0, 14.0)))
                c, _ = LATERAL_VENTRICLE[int(rng.integers(0, 3))]
                center = np.array([s * c[0], c[1], c[2]]) * anatomy.scale + rng.normal(0, 2, 3)
                out.append(Lesion(kind, hu, dict(mode="cast", center=center, r=r)))
        elif kind in ("SDH", "EDH"):
            s = side_of(o)
            if kind == "SDH":
                n0 = _unit([s * U(0.5, 1.0), U(-0.8, 0.8), U(-0.1, 0.8)])
                t = float(pick(o, "size_mm", U(2.5, 5.0) if subtle else U(5.0, 16.0)))
                alpha = math.radians(U(35, 70))
                hu = float(pick(o, "hu", U(46, 56) if subtle else U(55, 80)))
            else:
                n0 = _unit([s * U(0.7, 1.0), U(-0.5, 0.6), U(-0.2, 0.5)])
                edh_n0 = n0
                t = float(pick(o, "size_mm", U(4.0, 7.0) if subtle else U(7.0, 22.0)))
                alpha = math.radians(U(16, 28))
                hu = float(pick(o, "hu", U(50, 58) if subtle else U(58, 90)))
            out.append(Lesion(kind, hu, dict(n0=n0, t=t, alpha=alpha, side=s)))
        elif kind == "SAH":
            hu = float(pick(o, "hu", U(45, 52) if subtle else U(50, 75)))
            r = float(pick(o, "size_mm", U(12.0, 20.0) if subtle else U(20.0, 45.0)))
            if rng.random() < 0.4 and not subtle:  # basal: cisterns and Sylvian fissures
                c0 = np.array(SUPRASELLAR_CISTERN[0]) * anatomy.scale
                center = c0 + rng.normal(0, 3, 3)
            else:  # convexity: sulci near a point of the brain surface
                s = side_of(o)
                n0 = _unit([s * U(0.3, 1.0), U(-0.8, 0.8), U(0.0, 0.9)])
                center = _surface_point(anatomy, n0, anatomy.brain_depth + 3.0)
            out.append(Lesion(kind, hu, dict(center=center, r=r)))
        elif kind == "Fracture":
            if edh_n0 is not None:  # under the epidural haematoma
                n0 = _unit(edh_n0 + rng.normal(0, 0.08, 3))
            else:
                n0 = _unit([side_of(o) * U(0.0, 1.0), U(-1, 1), U(0.0, 1.0)])
            t = _unit(np.cross(n0, rng.standard_normal(3)))
            half = float(pick(o, "size_mm", U(10.0, 18.0) if subtle else U(15.0, 40.0)))
            out.append(Lesion(kind, float(pick(o, "hu", U(10, 60))), dict(
                n0=n0, m=_unit(np.cross(n0, t)), t=t, half=half, width=U(1.0, 2.5),
                wiggle=U(0.3, 1.5), freq=U(0.1, 0.3), phase=U(0, 2 * math.pi))))
            if rng.random() < 0.6:
                out.append(Lesion("swelling", U(40, 65), dict(n0=n0, h=U(4, 12), width=U(0.2, 0.4))))
    if "Fracture" not in req and rng.random() < 0.08:  # a bump on the head without fracture
        n0 = _unit([U(-1, 1), U(-1, 1), U(0.0, 1.0)])
        out.append(Lesion("swelling", U(40, 65), dict(n0=n0, h=U(3, 10), width=U(0.2, 0.4))))
    return out


def _place_iph(rng: np.random.Generator, anatomy: Anatomy, plain: "_Renderer", r: float,
               side: int) -> np.ndarray:
    """Centre (head frame) of a parenchymal haematoma of radius ``r``: mostly in brain tissue."""
    probes = _fibonacci_sphere(26) * 0.8
    for attempt in range(60):
        rr = r if attempt < 40 else r * 0.6
        x = rng.random()
        if x < 0.57:  # deep or cerebellar sites
            w = np.array([s[1] for s in IPH_SITES])
            c, _ = IPH_SITES[int(rng.choice(len(IPH_SITES), p=w / w.sum()))]
            center = np.array([side * c[0], c[1], c[2]]) * anatomy.scale + rng.normal(0, 4, 3)
        else:  # lobar: below the cortex of a hemisphere
            n0 = _unit([side * rng.uniform(0.2, 1.0), rng.uniform(-0.9, 0.9), rng.uniform(-0.1, 0.9)])
            center = _surface_point(anatomy, n0, anatomy.brain_depth + rr + rng.uniform(4, 12))
        pts = (center[None] + rr * probes).astype(np.float32)
        tissue = plain.classify(np.concatenate([center[None].astype(np.float32), pts]))[0]
        inside = np.isin(tissue, (GREY, WHITE, DEEP_GREY, SULCAL))
        if inside[0] and inside[1:].mean() >= 0.85:
            return center
    return center  # unreachable in practice: the last candidate, still inside the head


def sample_pose(rng: np.random.Generator, base: Optional[Pose] = None) -> Pose:
    """Head tilt and position; with ``base``, a small re-positioning of it (second series)."""
    if base is None:
        angles = np.array([rng.uniform(-12, 12), rng.uniform(-5, 5), rng.uniform(-6, 6)])
        center = np.array([rng.uniform(-8, 8), rng.uniform(0, 10), rng.uniform(-6, 8)])
    else:
        angles = base.angles + rng.uniform(-3, 3, 3)
        center = base.center + rng.uniform(-4, 4, 3)
    return Pose(angles, center)


def sample_scan(rng: np.random.Generator, base: Optional[Scan] = None) -> Scan:
    """Pose, noise level and head holder of one series (``base``: re-scan of the same patient)."""
    pose = sample_pose(rng, None if base is None else base.pose)
    if base is None:
        sigma = rng.uniform(5.0, 10.0)
        bed = dict(gap=rng.uniform(6, 15), thickness=rng.uniform(3, 8), hu=rng.uniform(-150, 150),
                   arc=rng.uniform(50, 75), shift=rng.uniform(-5, 5))
    else:
        sigma = float(np.clip(base.noise_sigma + rng.uniform(-1, 1), 5.0, 10.0))
        bed = dict(base.bed, gap=base.bed["gap"] + rng.uniform(-2, 2))
    return Scan(pose, float(sigma), bed)


# ---------------------------------------------------------------------------------------------
# Rendering


class _Renderer:
    """Classifies head-frame points into tissues and lesions for one anatomy/lesions/pose."""

    def __init__(self, anatomy: Anatomy, lesions: list[Lesion], pose: Optional[Pose],
                 spacing: float):
        self.A = anatomy
        self.lesions = lesions
        self.sp = float(spacing)
        self.scale = anatomy.scale
        self.shift = (0.0, 0.0, 0.0, 0.0)  # midline shift: (sign, mm, canonical v, w)
        self.vent_factor = {-1: 1.0, 1: 1.0}
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
                cc = c / self.scale
                s = 1.0 if cc[0] >= 0 else -1.0
                self.shift = (s, best, float(cc[1]), float(cc[2]))
                self.vent_factor = {int(s): max(0.6, 1.0 - 0.04 * best), int(-s): 1.0}
        self.table = self.hu_table()
        self.ivh_level: dict[int, float] = {}
        if pose is not None:
            for les in lesions:
                if les.kind == "IVH" and les.params["mode"] == "layer":
                    self.ivh_level = self._ivh_levels(les, pose)

    # -- geometry ------------------------------------------------------------------------
    def head_sdf(self, q: np.ndarray) -> np.ndarray:
        """Approximate signed distance (mm, < 0 inside) to the scalp surface, without swelling."""
        ax, ay, azu, azd = (float(a) for a in self.A.axes)
        u, v, w = q[:, 0], q[:, 1], q[:, 2]
        a = ax * (1.0 + self.A.egg * np.clip(v / ay, -1.0, 1.0))
        c = np.where(w >= 0, np.float32(azu), np.float32(azd))
        x, y, z = u / a, v / ay, w / c
        k0 = np.sqrt(x * x + y * y + z * z)
        k1 = np.sqrt((x / a) ** 2 + (y / ay) ** 2 + (z / c) ** 2)
        r = np.sqrt(u * u + v * v + w * w) + 1e-6
        nu, nv, nw = u / r, v / r, w / r
        b = [float(x) for x in self.A.bumps]
        bump = (b[0] * nu + b[1] * nv + b[2] * nw + b[3] * nu * nv + b[4] * nv * nw
                + b[5] * nu * nw + b[6] * (nu * nu - nv * nv) + b[7] * (3 * nw * nw - 1))
        return ((k0 * (1.0 + bump) - 1.0) * k0 / np.maximum(k1, 1e-6)).astype(np.float32)

    def neck_sdf(self, q: np.ndarray) -> np.ndarray:
        v0, ru, rv, wtop = self.A.neck
        k = np.sqrt((q[:, 0] / ru) ** 2 + ((q[:, 1] - v0) / rv) ** 2)
        return np.maximum((k - 1.0) * min(ru, rv), q[:, 2] - wtop)

    def swelling(self, q: np.ndarray) -> np.ndarray:
        """Outward thickening (mm) of the scalp by haematomas over the head."""
        out = np.zeros(q.shape[0], np.float32)
        sw = [les for les in self.lesions if les.kind == "swelling"]
        if sw:
            nh = q / (np.linalg.norm(q, axis=1, keepdims=True) + 1e-6)
            for les in sw:
                cos = np.clip(_dot3(nh, les.params["n0"]), -1, 1)
                out += les.params["h"] * np.exp(-((np.arccos(cos) / les.params["width"]) ** 2))
        return out

    def floor(self, qc: np.ndarray) -> np.ndarray:
        """Canonical height w of the cranial floor: anterior fossa, sella, middle fossae, clivus.

        Behind the clivus the floor drops below the skull, whose shell then forms the bowl of the
        posterior fossa.
        """
        uc, vc = qc[:, 0], qc[:, 1]
        f = -22.0 - 8.0 * _sig((12.0 - vc) / 6.0) - 42.0 * _sig((-12.0 - vc) / 8.0)
        f = f - 14.0 * np.exp(-((vc - 2.0) / 16.0) ** 2) * _sig((np.abs(uc) - 16.0) / 4.0)
        f = f + 6.0 * np.exp(-((np.abs(uc) - 24.0) / 11.0) ** 2) * _sig((vc - 22.0) / 5.0)  # orbital roofs
        return f + self.A.brain["floor_shift"]

    def base_thickness(self, qc: np.ndarray) -> np.ndarray:
        """Skull-base thickness (mm): thin orbital roofs and fossae, thick sphenoid body/clivus."""
        tb = self.A.thickness["base"]
        central = np.exp(-(qc[:, 0] / 14.0) ** 2) * _sig((15.0 - qc[:, 1]) / 5.0)
        return 3.0 + (tb - 3.0) * central

    def internal(self, qc: np.ndarray) -> np.ndarray:
        """Canonical coordinates of the deep structures, displaced by a midline shift."""
        s, m, v0, w0 = self.shift
        if m == 0.0:
            return qc
        qi = qc.copy()
        qi[:, 0] += s * m * np.exp(-((qc[:, 1] - v0) ** 2 + (qc[:, 2] - w0) ** 2) / (2 * 45.0 ** 2))
        return qi

    def ventricles(self, qi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inside ventricle, normalised distance to the lateral ventricles) of canonical points."""
        vs = self.A.brain["vent_scale"]
        kmin = np.full(qi.shape[0], np.inf, np.float32)
        for s in (-1, 1):
            f = self.vent_factor[s]
            for c, semi in LATERAL_VENTRICLE:
                cc = (s * c[0] * (1 + 0.12 * (vs - 1)), c[1], c[2])
                ss = (semi[0] * vs * f, semi[1] * (1 + 0.25 * (vs - 1)), semi[2] * vs * f)
                kmin = np.minimum(kmin, _k(qi, cc, ss))
        inside = (kmin < 1) & (np.abs(qi[:, 0]) > 0.8)  # septum pellucidum between the two
        c3, s3 = THIRD_VENTRICLE
        c4, s4 = FOURTH_VENTRICLE
        inside |= _k(qi, c3, (s3[0] * vs, s3[1], s3[2])) < 1
        inside |= _k(qi, c4, (s4[0] * vs ** 0.5, s4[1] * vs ** 0.5, s4[2])) < 1
        return inside, kmin

    def _ivh_levels(self, les: Lesion, pose: Pose) -> dict[int, float]:
        """World y (anterior) of the blood-CSF level in each side's occipital horn (supine)."""
        vs = self.A.brain["vent_scale"]
        dirs = _fibonacci_sphere()
        rot = pose.rotation
        levels = {}
        for s in les.params["sides"]:
            ys = []
            for c, semi in LATERAL_VENTRICLE[2:4]:
                cc = np.array([s * c[0] * (1 + 0.12 * (vs - 1)), c[1], c[2]])
                ss = np.array([semi[0] * vs, semi[1] * (1 + 0.25 * (vs - 1)), semi[2] * vs])
                pts = (cc + dirs * ss) * self.scale  # head frame
                ys.append((pts @ rot.T + pose.center)[:, 1])
            depth = max(les.params["depth"], 2.0 * self.sp)
            levels[s] = float(np.min(np.concatenate(ys)) + depth)
        return levels

    def _extra_axial(self, les: Lesion, nh: np.ndarray, qc: np.ndarray,
                     floor: np.ndarray) -> np.ndarray:
        """Thickness (mm) of an SDH (crescent) or EDH (lens) at head-frame directions ``nh``."""
        p = les.params
        theta = np.arccos(np.clip(_dot3(nh, p["n0"]), -1.0, 1.0))
        x = theta / p["alpha"]
        if les.kind == "SDH":
            prof = np.sqrt(np.clip(1.0 - x ** 4, 0.0, None))
            t = max(p["t"], 1.3 * self.sp)
        else:
            prof = np.sqrt(np.clip(1.0 - x ** 2, 0.0, None))
            t = max(p["t"], 2.0 * self.sp)
        prof = prof * _sig((p["side"] * qc[:, 0] - 2.0) / 1.0) * _sig((qc[:, 2] - floor - 4.0) / 2.0)
        return (t * prof).astype(np.float32)

    # -- classification ------------------------------------------------------------------
    def classify(self, q: np.ndarray, yw: Optional[np.ndarray] = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Head-frame points ``[N, 3]`` -> (tissue code uint8 [N], lesion bits uint8 [N], HU [N]).

        ``yw`` [N] is the world anterior coordinate (gravity is -y for a supine patient).
        """
        n = q.shape[0]
        tissue = np.zeros(n, np.uint8)
        bits = np.zeros(n, np.uint8)
        hu = np.full(n, -1000.0, np.float32)
        if yw is None:
            yw = np.zeros(n, np.float32)
        # cheap culling: only points near the head or in the neck can be body
        ax, ay, azu, _ = (float(x) for x in self.A.axes)
        swell_max = max([les.params["h"] for les in self.lesions if les.kind == "swelling"] + [0.0])
        rmax = max(ax * (1 + abs(self.A.egg)), ay, azu) * 1.12 + swell_max
        v0, ru, rv, wtop = self.A.neck
        near = (q[:, 0] ** 2 + q[:, 1] ** 2 + q[:, 2] ** 2 < rmax * rmax) | (
            (q[:, 2] < wtop) & ((q[:, 0] / ru) ** 2 + ((q[:, 1] - v0) / rv) ** 2 < 1.0))
        ic = np.flatnonzero(near)
        qn = q[ic]
        swell = self.swelling(qn)
        sd_head = self.head_sdf(qn) - swell
        inb = (sd_head < 0) | (self.neck_sdf(qn) < 0)
        ib = ic[inb]
        if ib.size:
            t, b, h = self._body(q[ib], -sd_head[inb], swell[inb], yw[ib])
            tissue[ib], bits[ib], hu[ib] = t, b, h
        return tissue, bits, hu

    def _body(self, q: np.ndarray, depth: np.ndarray, swell: np.ndarray, yw: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Body points: q [n, 3] head frame, depth [n] below the scalp surface (< 0 = neck only),
        swell [n] scalp swelling, yw [n] world y -> (tissue [n], lesion bits [n], HU [n])."""
        A, T = self.A, self.A.thickness
        n = q.shape[0]
        qc = q / self.scale
        wc = qc[:, 2]
        low = np.stack([_sample(A.tex_low[i], LOW_GRID, q) for i in range(3)])
        mid0 = _sample(A.tex_mid[0], MID_GRID, q)
        nh = q / (np.linalg.norm(q, axis=1, keepdims=True) + 1e-6)
        anu = np.abs(nh[:, 0])
        in_head = depth > 0
        temporal = anu ** 4 * np.exp(-((wc - 5.0) / 30.0) ** 2)
        d1 = T["scalp"] * (1 + 0.15 * low[0]) + T["temporalis"] * temporal + swell
        fs = (1 + 0.2 * low[1]) * (1 - 0.4 * anu ** 3 * np.exp(-((wc + 5.0) / 25.0) ** 2))
        d2 = d1 + T["outer"] * fs
        d3 = d2 + T["diploe"] * fs
        d4 = d3 + T["inner"] * fs  # inner skull surface
        floor = self.floor(qc)
        tb = self.base_thickness(qc)
        above_base = wc >= floor - tb
        tissue = np.full(n, SOFT, np.uint8)
        dhu = np.zeros(n, np.float32)
        # scalp with its fat layer; swelling is a haematoma under the scalp
        tissue[in_head & (depth > 0.35 * d1) & (depth < 0.6 * d1) & (swell < 0.5)] = FAT
        sw = in_head & (swell > 0.5) & (depth > 1.0) & (depth < d1 - T["scalp"] * 0.5)
        # skull vault and base
        vault = in_head & above_base & (depth >= d1) & (depth < d4)
        tissue[vault & ((depth < d2) | (depth >= d3))] = CORTICAL
        tissue[vault & (depth >= d2) & (depth < d3)] = DIPLOE
        inside = in_head & (depth >= d4)
        cranial = inside & (wc >= floor)
        base = inside & above_base & (wc < floor)
        tissue[base] = DIPLOE
        tissue[base & ((wc > floor - 1.2) | (wc < floor - tb + 1.2))] = CORTICAL
        # below the base (face, neck): muscle with fat, spine, airway, sphenoid sinus
        lower = ~in_head | (~above_base & (depth >= d1))
        tissue[lower & (mid0 > 1.0)] = FAT
        tissue[~in_head & (self.neck_sdf(q) > -5.0) & (self.neck_sdf(q) < -1.5)] = FAT
        kv = np.sqrt((qc[:, 0] / 11.0) ** 2 + ((qc[:, 1] + 12.0) / 10.0) ** 2)
        spine = lower & (kv < 1) & (wc < -35.0)
        tissue[spine] = SPINE
        dhu[spine] = np.where(kv[spine] > 0.78, 700.0, 0.0)
        kc = np.sqrt((qc[:, 0] / 7.0) ** 2 + ((qc[:, 1] + 30.0) / 7.0) ** 2)
        tissue[lower & (kc < 1) & (wc < -40.0)] = SOFT  # spinal canal (cord)
        magnum = (kc < 1) & (wc < -50.0) & (depth < d4) & in_head  # foramen magnum
        tissue[magnum & np.isin(tissue, (CORTICAL, DIPLOE))] = SOFT
        ka = np.sqrt((qc[:, 0] / 9.0) ** 2 + ((qc[:, 1] - 14.0) / 6.0) ** 2)
        tissue[lower & (ka < 1) & (wc < -40.0)] = AIR_CAVITY  # pharynx
        sph = _k(qc, (0.0, 12.0, -44.0), (11.0, 10.0, 7.0)) < 1
        tissue[lower & in_head & sph] = AIR_CAVITY
        # petrous ridges, mastoid air cells, frontal sinus
        for s in (-1, 1):
            a = math.radians(40.0 * s)
            ca, sa = math.cos(a), math.sin(a)
            pu, pv = qc[:, 0] - s * 27.0, qc[:, 1] + 16.0
            ru, rv = ca * pu + sa * pv, -sa * pu + ca * pv
            pet = np.sqrt((ru / 6.0) ** 2 + (rv / 18.0) ** 2 + ((wc - floor - 1.0) / 5.0) ** 2) < 1
            tissue[inside & pet] = CORTICAL
            dhu[inside & pet] = 200.0
            mast = (_k(qc, (s * 58.0, -20.0, -40.0), (9.0, 11.0, 10.0)) < 1) & in_head & ~cranial
            mast &= np.isin(tissue, (CORTICAL, DIPLOE, SOFT, FAT))
            tissue[mast & (mid0 > 0.0)] = AIR_CAVITY
            tissue[mast & (mid0 <= 0.0)] = CORTICAL
        if A.extras["frontal_sinus"]:
            fsin = (_k(qc, (0.0, 82.0, -10.0), (16.0, 9.0, 10.0)) < 1) & vault
            tissue[fsin & ~((depth < d2) | (depth >= d3))] = AIR_CAVITY
        tissue[sw] = SOFT
        # intracranial space
        bits = np.zeros(n, np.uint8)
        hu_les = np.full(n, np.nan, np.float32)
        ic = np.flatnonzero(cranial & (tissue != CORTICAL))
        if ic.size:
            t_ic, d_ic, b_ic, h_ic = self._cranial(q[ic], qc[ic], nh[ic], depth[ic], d4[ic],
                                                   floor[ic], low[2][ic], mid0[ic], yw[ic])
            tissue[ic], dhu[ic], bits[ic], hu_les[ic] = t_ic, d_ic, b_ic, h_ic
        # skull modulation, fracture, swelling haematoma density
        bone = np.isin(tissue, (CORTICAL, DIPLOE))
        dhu[bone] += np.where(tissue[bone] == CORTICAL, 150.0, 100.0) * low[1][bone]
        for les in self.lesions:
            if les.kind == "Fracture":
                hit = vault & np.isin(tissue, (CORTICAL, DIPLOE)) & self._fracture(les, q, nh)
                bits[hit] |= LESION_BITS["Fracture"]
                hu_les[hit] = les.hu + 8.0 * mid0[hit]
            elif les.kind == "swelling":
                hu_les[sw & np.isnan(hu_les)] = les.hu + 4.0 * mid0[sw & np.isnan(hu_les)]
        hu = self.table[tissue] + dhu
        hu[tissue == SOFT] += 5.0 * mid0[tissue == SOFT]
        les_px = ~np.isnan(hu_les)
        hu[les_px] = hu_les[les_px]
        return tissue, bits, hu

    def hu_table(self) -> np.ndarray:
        H = self.A.hu
        table = np.zeros(N_TISSUES, np.float32)
        for code, val in ((AIR, -1000.0), (BED, 0.0), (SOFT, H["soft"]), (FAT, H["fat"]),
                          (CORTICAL, H["cortical"]), (DIPLOE, H["diploe"]), (SPINE, H["spine"]),
                          (EXTRA_AXIAL, H["csf"]), (SULCAL, H["csf"]), (VENTRICLE, H["csf"]),
                          (GREY, H["grey"]), (WHITE, H["white"]), (DEEP_GREY, H["deep"]),
                          (EDEMA, H["edema"]), (FALX, H["falx"]), (CALC, H["calc"]),
                          (AIR_CAVITY, -990.0)):
            table[code] = val
        return table

    def _fracture(self, les: Lesion, q: np.ndarray, nh: np.ndarray) -> np.ndarray:
        p = les.params
        along = _dot3(q, p["t"])
        off = _dot3(q, p["m"]) + p["wiggle"] * np.sin(p["freq"] * along + p["phase"])
        width = max(p["width"], 1.1 * self.sp)
        r = np.linalg.norm(q, axis=1) + 1e-6
        theta = np.arccos(np.clip(_dot3(nh, p["n0"]), -1.0, 1.0))
        return (np.abs(off) < 0.5 * width) & (theta * r < max(p["half"], 3.0 * self.sp))

    def _cranial(self, q, qc, nh, depth, d4, floor, low2, mid0, yw):
        """Points inside the inner table above the skull base: CSF spaces, brain, lesions.

        All arguments are per point ``[n]`` (``q``, ``qc`` head-frame and canonical ``[n, 3]``,
        ``nh`` unit directions ``[n, 3]``); returns (tissue, HU offset, lesion bits, lesion HU
        with NaN where no lesion), each ``[n]``.
        """
        T, B = self.A.thickness, self.A.brain
        n = q.shape[0]
        wc = qc[:, 2]
        tissue = np.full(n, EXTRA_AXIAL, np.uint8)
        dhu = np.zeros(n, np.float32)
        bits = np.zeros(n, np.uint8)
        hu_les = np.full(n, np.nan, np.float32)
        ext = {les.kind: self._extra_axial(les, nh, qc, floor)
               for les in self.lesions if les.kind in ("SDH", "EDH")}
        t_edh = ext.get("EDH", np.zeros(n, np.float32))
        t_sdh = ext.get("SDH", np.zeros(n, np.float32))
        d5 = d4 + T["csf"] * (1 + 0.3 * low2) + t_edh + t_sdh  # brain surface (pushed by masses)
        db = np.minimum(depth - d5, (wc - floor) * self.scale[2] - T["csf"])
        qi = self.internal(qc)
        ui, vi, wi = qi[:, 0], qi[:, 1], qi[:, 2]
        amid = np.abs(ui - B["midline_bend"] * np.sin(vi / 40.0))
        fzone = wi > 32.0 - 90.0 * _sig((np.abs(vi) - 42.0) / 5.0)  # fissure above the callosum
        tissue[(amid < 0.5) & (wi > -10.0)] = FALX
        ib = np.flatnonzero(db > 0)
        if ib.size:
            tb, dh = self._brain(q[ib], qi[ib], db[ib], low2[ib], amid[ib], fzone[ib])
            tissue[ib], dhu[ib] = tb, dh
        # lesions
        for les in self.lesions:
            p = les.params
            if les.kind == "EDH":
                hit = (depth >= d4) & (depth < d4 + t_edh) & (t_edh > 0)
            elif les.kind == "SDH":
                hit = (depth >= d4 + t_edh) & (depth < d4 + t_edh + t_sdh) & (t_sdh > 0)
            elif les.kind == "IPH":
                d = q - p["center"].astype(np.float32)
                semi = np.maximum(p["semi"], 1.5 * self.sp)
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
                    r = max(p["r"], 2.0 * self.sp)
                    hit = vent & (np.linalg.norm(q - p["center"].astype(np.float32), axis=1) < r)
                else:
                    hit = np.zeros(n, bool)
                    for s, level in self.ivh_level.items():
                        hit |= vent & (s * ui > 0) & (vi < -12.0) & (yw < level)
            elif les.kind == "SAH":
                r = np.linalg.norm(q - p["center"].astype(np.float32), axis=1)
                hit = np.isin(tissue, (SULCAL, EXTRA_AXIAL)) & (r < p["r"] * (1 + 0.2 * mid0))
                hit &= np.isnan(hu_les)
            else:
                continue
            bits[hit] |= LESION_BITS[les.kind]
            hu_les[hit] = les.hu + (6.0 if les.kind == "EDH" else 3.0) * mid0[hit]
        return tissue, dhu, bits, hu_les

    def _brain(self, q, qi, db, low2, amid, fzone):
        """Parenchyma and deep structures of brain points at depth ``db`` (mm) below the surface.

        ``q`` head frame and ``qi`` midline-shifted canonical coordinates ``[n, 3]``; ``amid``
        distance to the midline plane, ``fzone`` above the corpus callosum; -> (tissue, HU offset).
        """
        A, T, B, E = self.A, self.A.thickness, self.A.brain, self.A.extras
        n = q.shape[0]
        ui, vi, wi = qi[:, 0], qi[:, 1], qi[:, 2]
        au = np.abs(ui)
        tissue = np.full(n, WHITE, np.uint8)
        sul = np.abs(_sample(A.sulci, SULCI_GRID, q))
        half = 0.5 * B["sulcus_width"] * (1 + 0.35 * _sample(A.tex_mid[1], MID_GRID, q))
        depth_s = B["sulcus_depth"] * (1 + 0.3 * low2)
        g = T["grey"]
        grey = (db < g) | ((sul < half + g) & (db < depth_s + 0.5 * g))
        sulcal = (sul < half) & (db < depth_s)
        hf = 0.5 * B["fissure_width"]
        grey |= fzone & (amid < hf + g)
        sulcal |= fzone & (amid < hf)
        hs = 0.5 * B["sylvian_width"]
        wsyl = np.abs(wi - (-4.0 - 0.3 * vi))
        band = (vi > -30) & (vi < 28) & (au > 34)
        ins = (vi > -15) & (vi < 22) & (wsyl < 12)
        grey |= (band & (wsyl < hs + g)) | (ins & (np.abs(au - 34.0) < hs + g))
        sulcal |= (band & (wsyl < hs)) | (ins & (np.abs(au - 34.0) < hs))
        tissue[grey] = GREY
        tissue[sulcal] = SULCAL
        deep = np.zeros(n, bool)
        for s in (-1, 1):
            for c, semi in DEEP_NUCLEI:
                deep |= _k(qi, (s * c[0], c[1], c[2]), semi) < 1
        tissue[deep] = DEEP_GREY
        rmb = np.sqrt(ui ** 2 + (vi + 10.0) ** 2)
        wband = (wi > -27.0) & (wi < -6.0)
        cis = ((rmb >= 10.0) & (rmb < 10.0 + B["cistern_width"]) & wband)
        cis |= (_k(qi, *SUPRASELLAR_CISTERN) < 1) | (_k(qi, *PREPONTINE_CISTERN) < 1)
        tissue[cis] = SULCAL
        stem = ((rmb < 10.0) & wband) | (_k(qi, *PONS) < 1)  # midbrain, pons, medulla
        stem |= (np.sqrt(ui ** 2 + (vi + 26.0) ** 2) < 7.0) & (wi < -45.0)
        tissue[stem] = WHITE
        vent, kv = self.ventricles(qi)
        tissue[vent] = VENTRICLE
        tissue[fzone & (amid < 0.5) & ~vent] = FALX
        vs = B["vent_scale"]
        if E["choroid_r"] > 0:
            for s in (-1, 1):
                c = (s * 18.0 * (1 + 0.12 * (vs - 1)), -27.0, 12.0)
                r = E["choroid_r"]
                tissue[_k(qi, c, (r, r, r)) < 1] = CALC
        if E["pineal_r"] > 0:
            r = E["pineal_r"]
            tissue[_k(qi, (0.0, -22.0, 6.0), (r, r, r)) < 1] = CALC
        # intensity: slow bias, brighter next to the skull (beam hardening), periventricular lucency
        dhu = 0.8 * low2 + 1.5 * np.exp(-db / 6.0)
        if E["pvwm"] > 0:
            pv = (tissue == WHITE) & (kv < 1.6)
            dhu[pv] -= E["pvwm"] * np.clip((1.6 - kv[pv]) / 0.5, 0, 1)
        dhu[~np.isin(tissue, (GREY, WHITE, DEEP_GREY))] = 0.0
        return tissue, dhu.astype(np.float32)


def render(anatomy: Anatomy, lesions: list[Lesion], scan: Scan, size: int,
           rng: np.random.Generator, tissue_masks: bool = True
           ) -> tuple[np.ndarray, np.ndarray, dict[str, int], dict[str, np.ndarray]]:
    """Voxelise one series: see ``make_phantom`` for the outputs.

    Args:
        anatomy: patient anatomy.
        lesions: patient lesions (``sample_lesions``).
        scan: pose, noise and head holder of this series.
        size: voxels per edge (spacing = 240 mm / size).
        rng: random generator of the noise.
        tissue_masks: also return tissue masks (else only the lesion masks).
    """
    if int(size) < 16:
        raise ValueError(f"size must be >= 16 voxels per edge, got {size}")
    size = int(size)
    sp = spacing_for_size(size)
    affine = phantom_affine(size)
    pose = scan.pose
    rot = pose.rotation.astype(np.float32)
    ren = _Renderer(anatomy, lesions, pose, sp)
    axis = (affine[0, 3] + sp * np.arange(size)).astype(np.float32)  # world mm of voxel centres
    tissue = np.zeros((size, size, size), np.uint8)
    bits = np.zeros_like(tissue)
    hu = np.zeros((size, size, size), np.float32)
    slab = max(1, 1_000_000 // (size * size))  # x-slabs per chunk bound the memory
    yy, zz = np.meshgrid(axis, axis, indexing="ij")
    for i0 in range(0, size, slab):
        xs = axis[i0:i0 + slab]
        p = np.empty((len(xs), size, size, 3), np.float32)  # world points of this slab
        p[..., 0] = xs[:, None, None]
        p[..., 1] = yy[None]
        p[..., 2] = zz[None]
        p = p.reshape(-1, 3)
        d = p - pose.center.astype(np.float32)
        q = np.stack([_dot3(d, rot[:, j]) for j in range(3)], 1)  # head frame: q = R^T (p - c)
        t, b, h = ren.classify(q, p[:, 1])
        shape = (len(xs), size, size)
        tissue[i0:i0 + slab], bits[i0:i0 + slab], hu[i0:i0 + slab] = (
            t.reshape(shape), b.reshape(shape), h.reshape(shape))
    _add_holder(tissue, hu, axis, scan, sp)
    # scanner: point-spread blur (~0.6 mm), then correlated noise, stronger in the head's centre
    psf = 0.6 / sp
    if psf >= 0.25:
        hu = ndimage.gaussian_filter(hu, psf, mode="nearest")
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, float(np.clip(1.0 / sp, 0.45, 1.2)), mode="wrap")
    noise /= noise.std() + 1e-8
    c = pose.center.astype(np.float32)
    r2 = ((axis - c[0])[:, None, None] ** 2 + (axis - c[1])[None, :, None] ** 2
          + (axis - c[2])[None, None, :] ** 2)
    hu += noise * (scan.noise_sigma * (0.8 + 0.35 * np.exp(-r2 / (2 * 55.0 ** 2))))
    hu = np.clip(np.round(hu), -1024, 3071).astype(np.float32)
    labels = {k: int(bool((bits & LESION_BITS[k]).any())) for k in LESION_KINDS}
    labels = {"ICH": int(any(labels[k] for k in SUBTYPES)), **labels}
    masks = {k: (bits & LESION_BITS[k]) > 0 for k in LESION_KINDS}
    if tissue_masks:
        masks.update(tissue_masks_of(tissue, bits))
    return hu, affine, labels, masks


def tissue_masks_of(tissue: np.ndarray, bits: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks of a tissue label map.

    Density masks (air, bed, soft_tissue, fat, cortical, diploe, csf, grey, white) hold voxels
    of that tissue not replaced by a lesion; anatomical masks (skull, ventricles, brain,
    intracranial) include lesions (e.g. IPH is inside ``brain``, IVH inside ``ventricles``).
    """
    clean = bits == 0
    return {
        "air": tissue == AIR, "bed": tissue == BED,
        "soft_tissue": np.isin(tissue, (SOFT, FAT)) & clean, "fat": (tissue == FAT) & clean,
        "cortical": (tissue == CORTICAL) & clean, "diploe": (tissue == DIPLOE) & clean,
        "csf": np.isin(tissue, CSF_CODES) & clean,
        "grey": np.isin(tissue, (GREY, DEEP_GREY)) & clean, "white": (tissue == WHITE) & clean,
        "skull": np.isin(tissue, (CORTICAL, DIPLOE)), "ventricles": tissue == VENTRICLE,
        "brain": np.isin(tissue, BRAIN_CODES), "intracranial": np.isin(tissue, INTRACRANIAL_CODES),
    }


def _add_holder(tissue: np.ndarray, hu: np.ndarray, axis: np.ndarray, scan: Scan,
                sp: float) -> None:
    """Paint a curved head holder (cylindrical shell, axis along z) below the head, in place."""
    bed = scan.bed
    xc = float(scan.pose.center[0])
    yc = float(scan.pose.center[1] + bed["shift"])
    body_xy = (tissue != AIR).any(axis=2)  # [X, Y]
    r = np.sqrt((axis[:, None] - xc) ** 2 + (axis[None, :] - yc) ** 2)
    below = axis[None, :] < yc
    r_max = float(r[body_xy & below].max()) if (body_xy & below).any() else 80.0
    r_in = r_max + max(bed["gap"], 2.5 * sp)
    thick = max(bed["thickness"], 1.2 * sp)
    cos_arc = math.cos(math.radians(bed["arc"]))
    shell = (r >= r_in) & (r < r_in + thick) & (yc - axis[None, :] >= r * cos_arc)
    shell3 = np.broadcast_to(shell[:, :, None], tissue.shape) & (tissue == AIR)
    tissue[shell3] = BED
    hu[shell3] = bed["hu"]


def _as_rng(rng_or_seed: Union[int, np.random.Generator, None]) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def make_phantom(rng_or_seed: Union[int, np.random.Generator] = 0, size: int = 64,
                 lesions: Optional[dict] = None
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, int], dict[str, np.ndarray]]:
    """One synthetic head CT.

    Args:
        rng_or_seed: seed or ``np.random.Generator`` (same seed -> identical output).
        size: voxels per edge; spacing = 240 / size mm (3.75 at 64, 1.5 at 160).
        lesions: None draws lesions with the dataset's prevalence; a dict fixes them exactly:
            ``{}`` healthy, ``{"IPH": True, "Fracture": {"size_mm": 30}}`` (see ``sample_lesions``
            for the override keys).

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
    return render(anatomy, les, scan, size, rng)


# ---------------------------------------------------------------------------------------------
# Files


def save_nifti(path: Union[str, Path], hu: np.ndarray, affine: np.ndarray) -> None:
    """Write HU ``[X, Y, Z]`` as int16 NIfTI (slope 1, intercept -1024), gzip with no timestamp.

    Args:
        path: output ``.nii.gz`` (or ``.nii``) path.
        hu: HU array (rounded, clipped to [-1024, 3071]).
        affine: (4, 4) voxel -> world mm.
    """
    raw = (np.clip(np.round(hu), -1024, 3071) + 1024).astype(np.int16)
    img = nib.Nifti1Image(raw, affine)
    img.header.set_slope_inter(1.0, -1024.0)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header["descrip"] = b"synthetic head CT phantom (HU)"
    data = img.to_bytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data, compresslevel=4, mtime=0) if path.suffix == ".gz" else data)


def _save_mask(path: Path, mask: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(mask.astype(np.uint8), affine)
    img.header.set_xyzt_units("mm", "sec")
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=4, mtime=0))


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
                  masks: bool = False, verbose: bool = False) -> dict[str, Path]:
    """Generate ``n`` phantom series and patient-level split manifests.

    Writes ``out_dir/images/<id>.nii.gz`` and ``out_dir/{train,val,test}.csv`` with columns
    ``img_path`` (relative to ``out_dir``), ``id``, ``patient_id``, ``ICH``, ``IPH``, ``IVH``,
    ``SDH``, ``EDH``, ``SAH``, ``Fracture``, ``coordX``, ``coordY``, ``coordZ`` (world-mm centre of
    the largest lesion, blank when healthy: seed points for SimCLR's negative_mined mode); with ``masks`` also
    ``out_dir/masks/<id>_<kind>.nii.gz`` (uint8) for each lesion present.

    Args:
        out_dir: output folder (created; existing files of the same names are overwritten).
        n: number of series (volumes); patients have 1 or 2 series.
        size: voxels per edge (spacing 240 / size mm).
        seed: dataset seed (same seed -> byte-identical files).
        masks: also write lesion masks.
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
    if masks:
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
                        _save_mask(out / "masks" / f"{sid}_{kind}.nii.gz", lmasks[kind], affine)
            rows[pat["split"]].append(dict(img_path=f"images/{sid}.nii.gz", id=sid,
                                           patient_id=pid, **labels, **_seed_point(lmasks, affine)))
            if verbose:
                pos = [k for k in LESION_KINDS if labels[k]]
                print(f"{sid} {pat['split']:5s} {' '.join(pos) or '-'}", flush=True)
    paths = {}
    for split, items in rows.items():
        paths[split] = out / f"{split}.csv"
        with open(paths[split], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS + COORD_COLUMNS, lineterminator="\n")
            w.writeheader()
            w.writerows(sorted(items, key=lambda r: r["id"]))
    return paths


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.phantom", description=(
        "Write synthetic head CTs (NIfTI, HU) with ICH subtype and fracture labels and "
        "patient-level train/val/test manifests."))
    ap.add_argument("--out", required=True, help="output folder (images/, train.csv, val.csv, test.csv)")
    ap.add_argument("--n", type=int, required=True, help="number of volumes (series)")
    ap.add_argument("--size", type=int, default=64, help="voxels per edge; spacing = 240/size mm (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    ap.add_argument("--masks", action="store_true", help="also write masks/<id>_<lesion>.nii.gz")
    ap.add_argument("--verbose", action="store_true", help="one line per volume")
    args = ap.parse_args(argv)
    if args.n < 1 or args.size < 16:
        ap.error(f"--n must be >= 1 and --size >= 16 (got --n {args.n} --size {args.size})")
    t0 = time.perf_counter()
    paths = write_dataset(args.out, args.n, args.size, args.seed, args.masks, args.verbose)
    counts = {}
    for split, p in paths.items():
        with open(p) as f:
            rows = list(csv.DictReader(f))
        counts[split] = (len(rows), sum(int(r["ICH"]) for r in rows))
    summary = ", ".join(f"{s} {n} ({k} ICH+)" for s, (n, k) in counts.items())
    print(f"wrote {args.n} volumes of {args.size}^3 at {spacing_for_size(args.size):.2f} mm to "
          f"{args.out} in {time.perf_counter() - t0:.1f} s: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
