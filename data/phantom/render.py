"""Rendering: head-frame points -> tissue codes, lesion bits and HU; a whole series -> a volume.

:class:`_Renderer` classifies points of the head frame for one anatomy, lesions and pose: scalp
with fat and temporal muscles, skull vault with cortical tables around a diploe, skull base with
petrous ridges and sinuses, neck with spine and airway; inside, CSF spaces, a grey-matter ribbon
folded along random sulci, white matter, deep grey nuclei, ventricles, fissures, cisterns, falx and
calcifications, the lesions painted by ``lesions``. :func:`render` evaluates it at every voxel
centre, then adds the head holder and the scanner (``scanner``).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from data.phantom.anatomy import (AIR, AIR_CAVITY, BED, CALC, CORTICAL, DEEP_GREY, DEEP_NUCLEI,
                                  DIPLOE, EDEMA, EXTRA_AXIAL, FALX, FAT, FOURTH_VENTRICLE, GREY,
                                  LATERAL_VENTRICLE, N_TISSUES, PONS, PREPONTINE_CISTERN, SOFT,
                                  SPINE, SULCAL, SUPRASELLAR_CISTERN, THIRD_VENTRICLE, VENTRICLE,
                                  WHITE, Anatomy, tissue_masks_of)
from data.phantom.geometry import (LOW_GRID, MID_GRID, SULCI_GRID, _dot3, _k, _sample, _sig,
                                   phantom_affine, spacing_for_size)
from data.phantom.lesions import (LESION_BITS, LESION_KINDS, SUBTYPES, Lesion, extra_axial_thickness,
                                  ivh_levels, mass_effect, paint_cranial_lesions, paint_outer_lesions,
                                  scalp_swelling)
from data.phantom.scanner import Pose, Scan, acquire, add_holder


class _Renderer:
    """Classifies head-frame points into tissues and lesions for one anatomy/lesions/pose."""

    def __init__(self, anatomy: Anatomy, lesions: list[Lesion], pose: Optional[Pose],
                 spacing: float):
        self.A = anatomy
        self.lesions = lesions
        self.sp = float(spacing)
        self.scale = anatomy.scale
        self.shift, self.vent_factor = mass_effect(lesions, self.scale)  # shift: (sign, mm, canonical v, w)
        self.table = self.hu_table()
        self.ivh_level: dict[int, float] = ({} if pose is None else
                                            ivh_levels(lesions, anatomy.brain["vent_scale"], self.scale, pose, self.sp))

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
        swell = scalp_swelling(self.lesions, qn)
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
        # skull modulation, then fractures and the density of scalp swellings
        bone = np.isin(tissue, (CORTICAL, DIPLOE))
        dhu[bone] += np.where(tissue[bone] == CORTICAL, 150.0, 100.0) * low[1][bone]
        paint_outer_lesions(self.lesions, tissue, bits, hu_les, vault, sw, q, nh, mid0, self.sp)
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
        ext = {les.kind: extra_axial_thickness(les, nh, qc, floor, self.sp)
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
        paint_cranial_lesions(self.lesions, tissue, bits, hu_les, q, depth, d4, t_edh, t_sdh, ui, vi, yw,
                              mid0, self.ivh_level, self.sp)
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
    add_holder(tissue, hu, axis, scan, sp)
    hu = acquire(hu, axis, scan, sp, rng)
    labels = {k: int(bool((bits & LESION_BITS[k]).any())) for k in LESION_KINDS}
    labels = {"ICH": int(any(labels[k] for k in SUBTYPES)), **labels}
    masks = {k: (bits & LESION_BITS[k]) > 0 for k in LESION_KINDS}
    if tissue_masks:
        masks.update(tissue_masks_of(tissue, bits))
    return hu, affine, labels, masks
