"""Which lesions a patient has, where they sit and how big and dense they are (per patient).

About half of the patients have a bleed, the subtypes mixed; about 25% a calvarial fracture (mostly
under an EDH, often with a scalp swelling); a quarter of the lesions are subtle (small, 45-60 HU).
A ``lesions`` dict of ``make_phantom`` fixes the kinds and may override ``OVERRIDE_KEYS``.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from data.phantom.anatomy import (DEEP_GREY, GREY, LATERAL_VENTRICLE, SULCAL, SUPRASELLAR_CISTERN,
                                  WHITE, Anatomy)
from data.phantom.geometry import _fibonacci_sphere, _random_rotation, _unit
from data.phantom.lesions import IPH_SITES, LESION_KINDS, OVERRIDE_KEYS, SUBTYPE_PROB, Lesion
from data.phantom.render import _Renderer


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


def _place_iph(rng: np.random.Generator, anatomy: Anatomy, plain: _Renderer, r: float,
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

