"""A stack of slices -> an orthogonal, uniformly spaced grid (uneven spacing, gantry tilt)."""
from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import map_coordinates

from data.dicom.geometry import SeriesGeometry
from data.io import AIR_HU


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """Voxel -> LPS affine to voxel -> RAS affine (negate world x and y)."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _snap(x: np.ndarray, n: int, tol: float = 1e-3) -> np.ndarray:
    """Move coordinates within ``tol`` voxel outside [0, n-1] onto the edge (rounding noise)."""
    x[(x < 0) & (x > -tol)] = 0.0
    x[(x > n - 1) & (x < n - 1 + tol)] = n - 1
    return x


def _uniform_axis(extent: float, step: float) -> tuple[int, float]:
    """Number of samples and spacing that cover ``extent`` exactly with a spacing close to ``step``."""
    count = max(1, int(round(extent / step))) + 1
    return count, extent / (count - 1)


def _bilinear_rows(stack: np.ndarray, kf: np.ndarray, ii: np.ndarray, valid: np.ndarray, fill: float) -> np.ndarray:
    """Whole image rows interpolated bilinearly in (slice, row): stack [K, rows, cols],
    kf / ii / valid [...] -> [..., cols] (``fill`` where not valid)."""
    k0 = np.clip(np.floor(kf).astype(np.intp), 0, stack.shape[0] - 2)
    i0 = np.clip(np.floor(ii).astype(np.intp), 0, stack.shape[1] - 2)
    wk = np.clip(kf - k0, 0.0, 1.0).astype(np.float32)[..., None]
    wi = np.clip(ii - i0, 0.0, 1.0).astype(np.float32)[..., None]
    top = stack[k0, i0] * (1 - wi) + stack[k0, i0 + 1] * wi
    bottom = stack[k0 + 1, i0] * (1 - wi) + stack[k0 + 1, i0 + 1] * wi
    vals = top * (1 - wk) + bottom * wk
    vals[~valid] = fill
    return vals


def resample_to_grid(
    stack: np.ndarray, geom: SeriesGeometry, fill: float = AIR_HU, chunk_voxels: int = 1 << 22
) -> tuple[np.ndarray, np.ndarray]:
    """Put the slices on an orthogonal, uniformly spaced grid.

    - Slices not shifted in-plane: the grid axes are (row_dir, col_dir, normal) with the pixel
      spacing in-plane; evenly spaced slices are used as they are, uneven ones are linearly
      interpolated along the normal onto a uniform spacing close to the median that spans
      the first to the last slice exactly.
    - Gantry tilt (slices shifted in-plane): the grid axes are e3 = table direction,
      e1 = row direction made orthogonal to e3, e2 = e3 x e1 (for the usual tilt about the
      left-right axis these are the world axes). The grid covers every voxel centre of the
      series (empty corners get ``fill``) and is sampled with trilinear interpolation
      (``scipy.ndimage.map_coordinates``) between neighbouring slices, each slice shifted by its
      own in-plane offset.

    Args:
        stack: float32 HU ``[K, rows, cols]`` in ``geom.slices`` order.
        geom: from ``analyse_geometry``.
        fill: value outside the scanned volume.
        chunk_voxels: output voxels computed at once (bounds memory for large series).
    Returns:
        (hu float32 ``[X, Y, Z]`` with X along e1 / row_dir (a Fortran-ordered view; it may share
        memory with ``stack``), affine (4, 4) voxel -> RAS mm).
    """
    k_count, rows, cols = stack.shape
    if k_count != len(geom.slices):
        raise ValueError(f"stack has {k_count} slices, geometry {len(geom.slices)}")
    r, c, n = geom.row_dir, geom.col_dir, geom.normal
    s = geom.offsets[:, 2]
    extent = float(s[-1] - s[0])
    lps = np.eye(4)

    # Results are built as [Z, Y, X] C-contiguous and returned as the [X, Y, Z] view (Fortran
    # order, which is also NIfTI's on-disk order: no copy when written).
    if not geom.sheared:
        if not geom.uneven:
            out = stack  # [K, rows, cols]
            step = extent / (k_count - 1)
        else:
            m_count, step = _uniform_axis(extent, geom.median_spacing)
            kf = np.interp(s[0] + step * np.arange(m_count), s, np.arange(k_count))
            k0 = np.minimum(np.floor(kf).astype(int), k_count - 2)
            w = (kf - k0).astype(np.float32)
            out = np.empty((m_count, rows, cols), dtype=np.float32)
            for m in range(m_count):  # linear blend of the two neighbouring slices
                np.multiply(stack[k0[m]], 1 - w[m], out=out[m])
                out[m] += w[m] * stack[k0[m] + 1]
        lps[:3, 0] = r * geom.col_spacing
        lps[:3, 1] = c * geom.row_spacing
        lps[:3, 2] = n * step
        lps[:3, 3] = geom.origin
        return out.transpose(2, 1, 0), lps_to_ras(lps)

    # Gantry tilt: orthogonal frame aligned with the table.
    e3 = geom.table_dir
    e1 = r - (r @ e3) * e3
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(e3, e1)
    frame = np.stack([e1, e2, e3])  # [3 axes, 3 world]
    rel = geom.offsets @ np.stack([r, c, n])  # [K, 3] slice origins relative to slice 0 (world)
    corners = np.array([[0, 0], [0, cols - 1], [rows - 1, 0], [rows - 1, cols - 1]], dtype=np.float64)
    corner_vecs = corners[:, :1] * geom.row_spacing * c + corners[:, 1:] * geom.col_spacing * r  # [4, 3]
    pts = (rel[:, None, :] + corner_vecs[None]).reshape(-1, 3) @ frame.T  # [4K, 3] in (e1, e2, e3)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    ext = hi - lo
    steps_d = np.diff(rel @ e3)
    sizes, spacing, start = [], [], []
    for axis, sp in enumerate((geom.col_spacing, geom.row_spacing)):
        count = int(math.ceil(ext[axis] / sp - 1e-3)) + 1
        sizes.append(count)
        spacing.append(sp)
        start.append(lo[axis] - ((count - 1) * sp - ext[axis]) / 2)
    count3, sp3 = _uniform_axis(float(ext[2]), float(np.median(steps_d)))
    sizes.append(count3)
    spacing.append(sp3)
    start.append(lo[2])
    start_rel = np.asarray(start) @ frame  # world offset of voxel (0,0,0) from slice 0's origin

    # Coordinates of voxel (p, q, m) along (r, c, n): base + p*A[0] + q*A[1] + m*A[2].
    axes = np.asarray(spacing)[:, None] * frame  # [3, 3] world step per voxel index
    proj = np.stack([r, c, n], axis=1)  # [3 world, 3] -> (u, v, w)
    base = start_rel @ proj  # (3,)
    step_uvw = axes @ proj  # [3 index axes, 3]
    a_off, b_off = geom.offsets[:, 0], geom.offsets[:, 1]
    nx, ny, nz = sizes
    out = np.empty((nz, ny, nx), dtype=np.float32)
    p = np.arange(nx, dtype=np.float64)[None, None, :]
    q = np.arange(ny, dtype=np.float64)[None, :, None]
    k_index = np.arange(k_count, dtype=np.float64)
    block = max(1, chunk_voxels // (nx * ny))
    # The usual tilt (about the row direction): output x = column index, and (depth, row) depend
    # on (q, m) only; drift below 1% of a pixel over the whole grid counts as none.
    drift_u = (abs(step_uvw[0, 0] - geom.col_spacing) * nx + abs(step_uvw[1, 0]) * ny + abs(step_uvw[2, 0]) * nz
               + float(np.max(np.abs(base[0] - a_off))))
    row_aligned = (
        nx == cols and rows >= 2 and drift_u < 0.01 * geom.col_spacing
        and abs(step_uvw[0, 1]) * nx < 0.01 * geom.row_spacing
        and abs(step_uvw[0, 2]) * nx < 0.01 * float(np.min(np.diff(s)))
    )
    for m0 in range(0, nz, block):
        m = np.arange(m0, min(nz, m0 + block), dtype=np.float64)[:, None, None]
        if row_aligned:
            w = (base[2] + q * step_uvw[1, 2] + m * step_uvw[2, 2])[..., 0]  # [mb, ny]
            v = (base[1] + q * step_uvw[1, 1] + m * step_uvw[2, 1])[..., 0]
            kf = np.interp(w, s, k_index)
            ii = _snap((v - np.interp(w, s, b_off)) / geom.row_spacing, rows)
            valid = (w >= s[0] - 1e-4) & (w <= s[-1] + 1e-4) & (ii >= 0) & (ii <= rows - 1)
            vals = _bilinear_rows(stack, kf, ii, valid, fill)  # [mb, ny, cols]
        else:
            # General case, computed as [m, q, p] (p fastest) so neighbouring points read
            # neighbouring pixels of a slice (cache-friendly).
            coords = np.empty((3, m.shape[0], ny, nx), dtype=np.float64)  # (k, i, j) per output voxel
            w = base[2] + p * step_uvw[0, 2] + q * step_uvw[1, 2] + m * step_uvw[2, 2]
            kf = np.interp(w, s, k_index)  # fractional slice index
            kf[(w < s[0] - 1e-4) | (w > s[-1] + 1e-4)] = -10.0  # outside the first/last plane
            coords[0] = kf
            u = base[0] + p * step_uvw[0, 0] + q * step_uvw[1, 0] + m * step_uvw[2, 0]
            coords[2] = _snap((u - np.interp(w, s, a_off)) / geom.col_spacing, cols)
            v = base[1] + p * step_uvw[0, 1] + q * step_uvw[1, 1] + m * step_uvw[2, 1]
            coords[1] = _snap((v - np.interp(w, s, b_off)) / geom.row_spacing, rows)
            vals = map_coordinates(stack, coords, order=1, mode="constant", cval=fill, output=np.float32)
        out[m0:m0 + m.shape[0]] = vals  # [mb, ny, nx]
    lps[:3, :3] = axes.T
    lps[:3, 3] = geom.origin + start_rel
    return out.transpose(2, 1, 0), lps_to_ras(lps)

