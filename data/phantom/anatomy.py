"""A patient's head: tissue codes, the canonical brain atlas, and the random anatomy of one patient.

Layers are offsets of one signed distance to the scalp surface (scalp, outer table, diploe, inner
table, extra-axial CSF, cortex), so shape changes move them together; the deep structures sit at
canonical positions (below) scaled to the head. How points are classified into these tissues is
``render._Renderer``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.phantom.geometry import LOW_GRID, MID_GRID, SULCI_GRID, _random_field

# Tissue codes of the label map (anatomy; lesions are kept apart in a bit map).
(AIR, BED, SOFT, FAT, CORTICAL, DIPLOE, SPINE, EXTRA_AXIAL, SULCAL, VENTRICLE, GREY, WHITE,
 DEEP_GREY, EDEMA, FALX, CALC, AIR_CAVITY) = range(17)
N_TISSUES = 17
BRAIN_CODES = (GREY, WHITE, DEEP_GREY, EDEMA)
CSF_CODES = (EXTRA_AXIAL, SULCAL, VENTRICLE)
INTRACRANIAL_CODES = BRAIN_CODES + CSF_CODES + (FALX, CALC)

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

