"""Affine registration of a preprocessed head CT to a head-CT template (the common frame of Alice's views).

The template (``DATA.TEMPLATE``, e.g. a brain atlas of 1 mm voxels in RAS) and every scan are mapped to the
same brain-like intensity (:func:`brain_intensity`), averaged down to about :data:`REGISTRATION_SPACING_MM`
mm, and aligned by SimpleITK: a centre-of-mass start (the best of a few shifted starts after a coarse pass),
a multi-resolution similarity stage (rotation, translation, one scale) and an affine stage (12 degrees of
freedom) at the registration resolution, driven by the correlation of the two images over the template's
head region. A scan costs about a second of CPU time (docs/data.md); ITK threads over every core unless told
otherwise (the preprocessing workers run it on one thread each).

Every physical coordinate handed to SimpleITK is a RAS world millimetre (the images' origin and direction
come from the RAS affines as they are, without the LPS flip ITK uses for DICOM): both images share that
frame, so the transform ITK finds maps template world -> scan world and its inverse is stored.

A registration is refused (``ok`` False, the reason naming the value) when the normalised cross-correlation
of the aligned scan and the template stays below the threshold, when the scan's field of view covers too
little of the template's head region, when the transform's scale or shear is not that of a head or it flips
the head, when the volume holds nothing in the brain window, or when the optimiser fails. A refused
registration is never used: the scan keeps its same-scan views.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]

# Intensity: HU clipped to [BRAIN_LOW_HU, BRAIN_HIGH_HU]; bone (above BONE_HU) set to BRAIN_LOW_HU. The
# template is a skull-stripped brain (0 outside the brain, bone clipped), so bone must look like the
# template's background, not like a bright ring: then brain, CSF and "no brain" mean the same in both images.
BRAIN_LOW_HU = 0.0
BRAIN_HIGH_HU = 80.0
BONE_HU = 150.0
REGISTRATION_SPACING_MM = 4.0  # both images are block-averaged to about this voxel size before registering
HEAD_REGION_DILATION_MM = 8.0  # the metric's region: the template's non-zero voxels grown by this (skull band)
MIN_SCALE, MAX_SCALE = 0.7, 1.4  # plausible scale of a head relative to the template, per axis
MIN_COVERAGE = 0.7  # fraction of the template's head region the scan's field of view must cover
MAX_SHEAR = 0.2  # largest |shear| (off-diagonal of the triangular factor / its diagonal) accepted
SAMPLING_FRACTION = 0.25  # fraction of the region's voxels the metric samples per iteration (fixed seed)
# starts of the coarse stage: shifts (mm, RAS) of the centre-of-mass alignment (see _best_start)
START_SHIFTS_MM = ((0, 0, 0), (0, 0, 30), (0, 0, -30), (0, 20, 0), (0, -20, 0), (0, 20, 30), (0, -20, -30))
SEED = 17  # metric sampling seed: the same scan gives the same transform


def settings() -> dict:
    """The registration settings, recorded in the cache's parameters (changing one starts a new cache)."""
    return {"method": "sitk_similarity_then_affine_correlation_v1",
            "window_hu": [BRAIN_LOW_HU, BRAIN_HIGH_HU], "bone_hu": BONE_HU,
            "spacing_mm": REGISTRATION_SPACING_MM, "region_dilation_mm": HEAD_REGION_DILATION_MM,
            "scale_range": [MIN_SCALE, MAX_SCALE], "max_shear": MAX_SHEAR, "min_coverage": MIN_COVERAGE,
            "sampling_fraction": SAMPLING_FRACTION, "seed": SEED,
            "start_shifts_mm": [list(s) for s in START_SHIFTS_MM]}


@dataclass
class Template:
    """What registration needs of a template, at the registration resolution.

    Attributes:
        path: the resolved template file.
        sha1: hash of the file's bytes.
        image: brain-intensity template ``[X, Y, Z]`` float32, block-averaged to ~REGISTRATION_SPACING_MM.
        region: bool ``[X, Y, Z]``: the head region (non-zero template voxels, dilated) on the same grid.
        affine: ``(4, 4)`` voxel -> RAS world mm of ``image``.
        full_affine: the template file's own voxel -> world affine (1 mm grid).
        full_shape: the template file's array shape.
    """

    path: str
    sha1: str
    image: np.ndarray
    region: np.ndarray
    affine: np.ndarray
    full_affine: np.ndarray
    full_shape: tuple[int, int, int]


@dataclass
class Registration:
    """Result of :func:`register_to_template`.

    Attributes:
        to_template: ``(4, 4)`` float64 ``M``: ``template_world = M @ [scan_world, 1]`` (RAS mm, homogeneous).
        similarity: normalised cross-correlation of the resampled scan and the template (brain intensity,
            over the template's head region inside the scan's field of view); 1 = identical, nan when it
            could not be computed.
        ok: True when the transform may be used.
        reason: why it was refused ('' when ok).
        seconds: wall time of the registration.
    """

    to_template: np.ndarray = field(default_factory=lambda: np.eye(4))
    similarity: float = float("nan")
    ok: bool = False
    reason: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict:
        """The sidecar form: ``{"to_template": 4x4 list, "similarity", "ok", "reason", "seconds"}``."""
        sim = float(self.similarity)
        return {"to_template": np.asarray(self.to_template, dtype=np.float64).tolist(),
                "similarity": sim if np.isfinite(sim) else None, "ok": bool(self.ok),
                "reason": self.reason, "seconds": round(float(self.seconds), 3)}


def brain_intensity(hu: np.ndarray) -> np.ndarray:
    """HU -> the registration's intensity: clipped to the brain window, bone set to the window's floor.

    Args:
        hu: HU array (any shape).

    Returns:
        float32 array of the same shape in ``[BRAIN_LOW_HU, BRAIN_HIGH_HU]``.
    """
    x = np.asarray(hu, dtype=np.float32)
    out = np.clip(x, BRAIN_LOW_HU, BRAIN_HIGH_HU)
    out[x > BONE_HU] = BRAIN_LOW_HU
    return out


def _block_mean(x: np.ndarray, affine: np.ndarray, spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Average ``x`` over blocks of about ``spacing_mm`` (an integer number of voxels per axis).

    Returns:
        ``(smaller array, its affine)``: block ``i`` is centred on old voxel ``i * f + (f - 1) / 2``.
    """
    sp = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    f = np.maximum(1, np.rint(spacing_mm / sp)).astype(int)
    n = np.asarray(x.shape) // f
    if np.any(n < 1):
        raise ValueError(f"volume of shape {x.shape} is smaller than one {spacing_mm} mm block")
    x = np.asarray(x[:n[0] * f[0], :n[1] * f[1], :n[2] * f[2]], dtype=np.float32)
    x = x.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).mean(axis=(1, 3, 5))
    step = np.eye(4)
    step[:3, :3] = np.diag(f)
    step[:3, 3] = (f - 1) / 2.0
    return np.ascontiguousarray(x, dtype=np.float32), np.asarray(affine, dtype=np.float64) @ step


def _to_sitk(x: np.ndarray, affine: np.ndarray):
    """Array ``[X, Y, Z]`` + RAS affine -> SimpleITK image whose physical space is the RAS world."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(x, dtype=np.float32).transpose(2, 1, 0)))
    a = np.asarray(affine, dtype=np.float64)
    sp = np.linalg.norm(a[:3, :3], axis=0)
    img.SetSpacing([float(s) for s in sp])
    img.SetDirection([float(v) for v in (a[:3, :3] / sp).ravel()])
    img.SetOrigin([float(v) for v in a[:3, 3]])
    return img


def _file_sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=8)
def _sha1_cached(path: str, size: int, mtime: float) -> str:
    return _file_sha1(path)


def template_sha1(path: PathLike) -> str:
    """SHA-1 of the template file's bytes (cached per path, size and modification time)."""
    p = os.path.abspath(os.path.expanduser(str(path)))
    st = os.stat(p)
    return _sha1_cached(p, st.st_size, st.st_mtime)


def template_from_array(array: np.ndarray, affine: np.ndarray, path: str = "<array>", sha1: str = "") -> Template:
    """A :class:`Template` from an in-memory volume (template value 0 = outside the head region).

    Args:
        array: template intensities ``[X, Y, Z]`` in HU (a brain atlas, or a head CT whose background is air).
        affine: its voxel -> RAS world affine.
        path, sha1: recorded as given.
    """
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(f"template must be 3D, got shape {array.shape}")
    img = brain_intensity(array)
    if not np.any(img > BRAIN_LOW_HU):
        raise ValueError(f"template {path} holds no voxel in the brain window "
                         f"[{BRAIN_LOW_HU}, {BRAIN_HIGH_HU}] HU")
    small, small_aff = _block_mean(img, affine, REGISTRATION_SPACING_MM)
    from scipy import ndimage

    sp = float(np.mean(np.linalg.norm(small_aff[:3, :3], axis=0)))
    inside = small > BRAIN_LOW_HU + 1.0
    r = max(1, int(round(HEAD_REGION_DILATION_MM / sp)))
    ball = np.linalg.norm(np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1], axis=0) <= r
    region = ndimage.binary_dilation(inside, structure=ball)
    return Template(path=path, sha1=sha1, image=small, region=region, affine=small_aff,
                    full_affine=np.asarray(affine, dtype=np.float64), full_shape=tuple(array.shape))


def load_template(path: PathLike) -> Template:
    """Read a template NIfTI once and keep what registration needs (see :class:`Template`).

    Raises:
        ValueError: naming the file when it is missing, not 3D or empty in the brain window.
    """
    import nibabel as nib

    p = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(p):
        raise ValueError(f"template {p} does not exist (DATA.TEMPLATE)")
    img = nib.load(p)
    array = np.asarray(img.dataobj, dtype=np.float32)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    from data.io import Volume
    from data.transforms import orient_ras

    vol = orient_ras(Volume(array=array, affine=np.asarray(img.affine, dtype=np.float64), spacing=(1.0, 1.0, 1.0)))
    return template_from_array(vol.array, vol.affine, path=p, sha1=template_sha1(p))


@lru_cache(maxsize=2)
def cached_template(path: str, sha1: str) -> Template:
    """:func:`load_template` once per process and template content (preprocessing workers call this)."""
    return load_template(path)


def _matrix_of(transform) -> np.ndarray:
    """4x4 homogeneous matrix of a SimpleITK affine-like transform (fixed point -> moving point)."""
    a = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(transform.GetCenter(), dtype=np.float64)
    t = np.asarray(transform.GetTranslation(), dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = t + c - a @ c
    return m


def scale_and_shear(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-axis scales and shears of a 4x4 (or 3x3) linear part: ``A = Q @ U`` (QR, ``diag(U) > 0``).

    Returns:
        ``(scales [3], shears [3]: U01/U00, U02/U00, U12/U11, det(A))``.
    """
    a = np.asarray(matrix, dtype=np.float64)[:3, :3]
    q, u = np.linalg.qr(a)
    sign = np.sign(np.diag(u))
    sign[sign == 0] = 1.0
    u = sign[:, None] * u
    scales = np.diag(u).copy()
    shears = np.array([u[0, 1] / u[0, 0], u[0, 2] / u[0, 0], u[1, 2] / u[1, 1]])
    return scales, shears, float(np.linalg.det(a))


def similarity_of(scan_img, template: Template, to_scan) -> tuple[float, float]:
    """Normalised cross-correlation of the scan resampled onto the template grid, and the scan's coverage.

    Args:
        scan_img: the scan's SimpleITK image (brain intensity, registration resolution).
        template: the template.
        to_scan: SimpleITK transform template world -> scan world.

    Returns:
        ``(ncc, coverage)``: the correlation over the template's head region inside the scan's field of
        view, and the fraction of that region the field of view covers.
    """
    import SimpleITK as sitk

    fixed = _to_sitk(template.image, template.affine)
    warped = sitk.Resample(scan_img, fixed, to_scan, sitk.sitkLinear, BRAIN_LOW_HU, sitk.sitkFloat32)
    ones = sitk.Image(scan_img.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(scan_img)
    seen = sitk.Resample(ones, fixed, to_scan, sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
    inside = template.region & (sitk.GetArrayViewFromImage(seen).transpose(2, 1, 0) > 0.5)
    coverage = float(inside.sum() / max(1, template.region.sum()))
    w = sitk.GetArrayViewFromImage(warped).transpose(2, 1, 0)[inside].astype(np.float64)
    t = template.image[inside].astype(np.float64)
    if w.size < 10:
        return float("nan"), coverage
    w, t = w - w.mean(), t - t.mean()
    den = np.sqrt((w * w).sum() * (t * t).sum())
    return (float((w * t).sum() / den) if den > 0 else float("nan")), coverage


def _stage(fixed, moving, mask, initial, shrink: list[int], sigmas: list[float], iterations: int):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricFixedMask(mask)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(SAMPLING_FRACTION, SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=0.01, numberOfIterations=iterations,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    out = reg.Execute(fixed, moving)
    return out, reg


def _unwrap(transform):
    """The one transform inside a composite that ``ImageRegistrationMethod.Execute`` may return."""
    import SimpleITK as sitk

    if transform.GetName() == "CompositeTransform":
        return sitk.CompositeTransform(transform).GetNthTransform(0)
    return transform


def _best_start(fixed, moving, mask, init):
    """The best of a few coarse similarity registrations started at shifted centres of mass.

    The scan's centre of mass is not the brain's when the scan holds much face or neck (or lacks the
    vertex); starting also 30 mm above and below, and 20 mm in front and behind, and keeping the
    start whose coarse (8 mm) registration correlates best, gives the fine stages a start near the brain.
    """
    import SimpleITK as sitk

    t0 = np.asarray(init.GetTranslation(), dtype=np.float64)
    best, best_value = None, np.inf
    for shift in START_SHIFTS_MM:
        tf = sitk.Similarity3DTransform(init)
        tf.SetTranslation((t0 + np.asarray(shift, dtype=np.float64)).tolist())
        try:
            out, reg = _stage(fixed, moving, mask, tf, [2], [4.0], 60)
        except RuntimeError:
            continue
        value = reg.GetMetricValue()  # -NCC of the sampled points: lower is better
        if np.isfinite(value) and value < best_value:
            best, best_value = sitk.Similarity3DTransform(_unwrap(out)), value
    if best is None:
        raise RuntimeError("no start of the coarse registration converged")
    return best


def register_to_template(hu: np.ndarray, affine: np.ndarray, template: Template,
                         min_similarity: float = 0.5) -> Registration:
    """Align a preprocessed head CT to the template: affine, 12 degrees of freedom.

    Args:
        hu: HU ``[X, Y, Z]`` in RAS (as ``data.transforms.preprocess_volume`` returns it; any spacing).
        affine: its ``(4, 4)`` voxel -> RAS world mm.
        template: from :func:`load_template`.
        min_similarity: refuse below this normalised cross-correlation (``DATA.TEMPLATE_MIN_SIMILARITY``).

    Returns:
        A :class:`Registration`; ``ok`` False (with the reason) for an implausible or failed alignment.

    Raises:
        ValueError: ``hu`` not 3D or ``affine`` not 4x4 (a caller's error, not a refused scan).
    """
    import time

    import SimpleITK as sitk

    t0 = time.perf_counter()
    hu = np.asarray(hu)
    affine = np.asarray(affine, dtype=np.float64)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3D array [X, Y, Z], got shape {hu.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")

    def refuse(reason: str, sim: float = float("nan"), m: Optional[np.ndarray] = None) -> Registration:
        return Registration(np.eye(4) if m is None else m, sim, False, reason, time.perf_counter() - t0)

    img = brain_intensity(hu)
    try:
        small, small_aff = _block_mean(img, affine, REGISTRATION_SPACING_MM)
    except ValueError as e:
        return refuse(f"registration failed: {e}")
    if not np.any(small > BRAIN_LOW_HU + 1.0):
        return refuse(f"no voxel in the brain window [{BRAIN_LOW_HU:g}, {BRAIN_HIGH_HU:g}] HU (empty volume?)")
    if small.std() < 1e-3:
        return refuse("constant volume in the brain window")
    fixed = _to_sitk(template.image, template.affine)
    mask = sitk.Cast(_to_sitk(template.region.astype(np.float32), template.affine), sitk.sitkUInt8)
    moving = _to_sitk(small, small_aff)
    try:
        init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Similarity3DTransform(),
                                                 sitk.CenteredTransformInitializerFilter.MOMENTS)
        sim_tf = _best_start(fixed, moving, mask, sitk.Similarity3DTransform(init))
        sim_tf, _ = _stage(fixed, moving, mask, sim_tf, [1], [2.0], 100)
        sim_tf = sitk.Similarity3DTransform(_unwrap(sim_tf))
        aff = sitk.AffineTransform(3)
        aff.SetCenter(sim_tf.GetCenter())
        aff.SetMatrix(sim_tf.GetMatrix())
        aff.SetTranslation(sim_tf.GetTranslation())
        aff_tf, reg = _stage(fixed, moving, mask, aff, [1], [0.0], 100)
        to_scan = _matrix_of(_unwrap(aff_tf))
    except RuntimeError as e:  # ITK: e.g. all samples mapped outside the moving image
        return refuse(f"registration failed: {str(e).strip().splitlines()[-1][:200]}")
    if not np.all(np.isfinite(to_scan)) or abs(np.linalg.det(to_scan[:3, :3])) < 1e-6:
        return refuse("registration failed: singular or non-finite transform")
    m = np.linalg.inv(to_scan)
    scales, shears, det = scale_and_shear(m)
    sim, coverage = similarity_of(moving, template, sitk.AffineTransform(to_scan[:3, :3].ravel().tolist(),
                                                                to_scan[:3, 3].tolist()))
    if det <= 0:
        return refuse(f"transform flips the head (determinant {det:.3f})", sim, m)
    if np.any(scales < MIN_SCALE) or np.any(scales > MAX_SCALE):
        return refuse(f"implausible scale {np.round(scales, 3).tolist()} (accepted {MIN_SCALE}..{MAX_SCALE})", sim, m)
    if np.any(np.abs(shears) > MAX_SHEAR):
        return refuse(f"implausible shear {np.round(shears, 3).tolist()} (accepted |shear| <= {MAX_SHEAR})", sim, m)
    if coverage < MIN_COVERAGE:
        return refuse(f"the scan covers {coverage:.2f} of the template's head region (accepted >= {MIN_COVERAGE})",
                      sim, m)
    if not np.isfinite(sim) or sim < min_similarity:
        return refuse(f"similarity {sim:.3f} below {min_similarity:g}", sim, m)
    return Registration(m, sim, True, "", time.perf_counter() - t0)


def map_voxel(voxel_a: np.ndarray, affine_a: np.ndarray, to_template_a: np.ndarray, affine_b: np.ndarray,
              to_template_b: np.ndarray) -> np.ndarray:
    """Continuous voxel of scan A -> continuous voxel of scan B, through the template.

    ``voxel_b = inv(affine_b) @ inv(to_template_b) @ to_template_a @ affine_a @ [voxel_a, 1]``.

    Args:
        voxel_a: ``[3]`` or ``[N, 3]`` voxel coordinates of scan A.
        affine_a, affine_b: ``(4, 4)`` voxel -> world of the two scans.
        to_template_a, to_template_b: their :attr:`Registration.to_template`.

    Returns:
        float64 voxel coordinates of scan B, of ``voxel_a``'s shape.
    """
    v = np.asarray(voxel_a, dtype=np.float64)
    if v.shape[-1] != 3 or v.ndim not in (1, 2):
        raise ValueError(f"voxel_a must be [3] or [N, 3], got shape {v.shape}")
    m = (np.linalg.inv(np.asarray(affine_b, dtype=np.float64)) @ np.linalg.inv(np.asarray(to_template_b))
         @ np.asarray(to_template_a, dtype=np.float64) @ np.asarray(affine_a, dtype=np.float64))
    pts = np.atleast_2d(v)
    out = pts @ m[:3, :3].T + m[:3, 3]
    return out[0] if v.ndim == 1 else out
