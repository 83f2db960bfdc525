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


def _grid_axis(extent: float, natural: float, exact: float | None) -> tuple[int, float]:
    """Number of samples and spacing of a grid axis starting at 0 and spanning ``extent``.

    With ``exact``: that spacing, as many samples as fit (the last within ``exact`` of the end).
    Otherwise: the spacing closest to ``natural`` that ends exactly at ``extent``.
    """
    if exact is not None:
        return int(math.floor(extent / exact + 1e-6)) + 1, float(exact)
    count = max(1, int(round(extent / natural))) + 1
    return count, extent / (count - 1)


def _slice_rows(stack: np.ndarray, k: np.ndarray, ii: np.ndarray) -> np.ndarray:
    """Whole image rows of slices ``k`` at fractional rows ``ii``, linear between the two nearest
    rows: stack [K, rows, cols], k / ii [...] -> [..., cols]."""
    i0 = np.clip(np.floor(ii).astype(np.intp), 0, stack.shape[1] - 2)
    wi = np.clip(ii - i0, 0.0, 1.0).astype(np.float32)[..., None]
    return stack[k, i0] * (1 - wi) + stack[k, i0 + 1] * wi


def _between_slices(kf: np.ndarray, k_count: int) -> tuple[np.ndarray, np.ndarray]:
    """(lower neighbouring slice index k0 in [0, K-2], weight of slice k0 + 1 in [0, 1]) for
    fractional slice indices ``kf``."""
    k0 = np.clip(np.floor(kf).astype(np.intp), 0, k_count - 2)
    return k0, np.clip(kf - k0, 0.0, 1.0)


def resample_to_grid(
    stack: np.ndarray,
    geom: SeriesGeometry,
    fill: float = AIR_HU,
    chunk_voxels: int = 1 << 22,
    slice_spacing: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Put the slices on an orthogonal, uniformly spaced grid.

    - Slices not shifted in-plane: the grid axes are (row_dir, col_dir, normal) with the pixel
      spacing in-plane. Evenly spaced slices are used as they are; uneven ones (jitter, missing
      slices, thickness changing part-way) are linearly interpolated along the normal, between
      slice centres, onto a uniform spacing that spans the first to the last slice exactly:
      close to the median spacing, or to the finest regular spacing when the thickness changes
      (``geom.slice_step``), so the thin part keeps its resolution.
    - Gantry tilt (slices shifted in-plane): the grid axes are e3 = table direction,
      e1 = row direction made orthogonal to e3, e2 = e3 x e1 (for the usual tilt about the
      left-right axis these are the world axes). The grid is the bounding box of every voxel
      centre of the series (empty corners get ``fill``). A grid point between two slice planes
      is projected along the normal onto each of them, interpolated bilinearly in each slice and
      linearly between the two (the slab of a slice is perpendicular to its plane; this is what
      dcm2niix's tilt correction computes too); points that fall outside either slice get ``fill``.

    Args:
        stack: float32 HU ``[K, rows, cols]`` in ``geom.slices`` order.
        geom: from ``analyse_geometry``.
        fill: value outside the scanned volume.
        chunk_voxels: output voxels computed at once (bounds memory for large series).
        slice_spacing: spacing in mm of the third grid axis (normal, or table direction with
            tilt), exactly; every series is then interpolated along it, also evenly spaced ones.
            None: the series' own spacing (see above).
    Returns:
        (hu float32 ``[X, Y, Z]`` with X along e1 / row_dir (a Fortran-ordered view; it may share
        memory with ``stack``), affine (4, 4) voxel -> RAS mm).
    Raises:
        ValueError: a stack that does not match the geometry, or ``slice_spacing`` <= 0.
    """
    if slice_spacing is not None and not slice_spacing > 0:
        raise ValueError(f"slice_spacing must be > 0 mm, got {slice_spacing}")
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
        if not geom.uneven and slice_spacing is None:
            out = stack  # [K, rows, cols]
            step = extent / (k_count - 1)
        else:
            m_count, step = _grid_axis(extent, geom.slice_step, slice_spacing)
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
    # Default spacing along the table: the median step, or the finest regular one (the normal
    # spacing of the thinnest slices, stretched by the tilt) when the thickness changes.
    natural = geom.finest_spacing / float(geom.normal @ e3) if geom.mixed_thickness else float(np.median(steps_d))
    count3, sp3 = _grid_axis(float(ext[2]), natural, slice_spacing)
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
            k0, wk = _between_slices(np.interp(w, s, k_index), k_count)
            i_lo = _snap((v - b_off[k0]) / geom.row_spacing, rows)  # the point projected onto slice k0
            i_hi = _snap((v - b_off[k0 + 1]) / geom.row_spacing, rows)  # ... and onto slice k0 + 1
            valid = ((w >= s[0] - 1e-4) & (w <= s[-1] + 1e-4) & (i_lo >= 0) & (i_lo <= rows - 1)
                     & (i_hi >= 0) & (i_hi <= rows - 1))
            wk = wk.astype(np.float32)[..., None]
            vals = _slice_rows(stack, k0, i_lo) * (1 - wk) + _slice_rows(stack, k0 + 1, i_hi) * wk  # [mb, ny, cols]
            vals[~valid] = fill
        else:
            # General case, computed as [m, q, p] (p fastest) so neighbouring points read
            # neighbouring pixels of a slice (cache-friendly): bilinear in each neighbouring slice
            # (map_coordinates at an integer slice index), then linear between the two.
            w = base[2] + p * step_uvw[0, 2] + q * step_uvw[1, 2] + m * step_uvw[2, 2]
            u = base[0] + p * step_uvw[0, 0] + q * step_uvw[1, 0] + m * step_uvw[2, 0]
            v = base[1] + p * step_uvw[0, 1] + q * step_uvw[1, 1] + m * step_uvw[2, 1]
            k0, wk = _between_slices(np.interp(w, s, k_index), k_count)
            outside = (w < s[0] - 1e-4) | (w > s[-1] + 1e-4)  # beyond the first/last plane
            vals = np.zeros(w.shape, dtype=np.float32)
            for k, weight in ((k0, 1 - wk), (k0 + 1, wk)):
                coords = np.empty((3, *w.shape), dtype=np.float64)  # (k, i, j) per output voxel
                coords[0] = np.where(outside, -10.0, k)
                coords[1] = _snap((v - b_off[k]) / geom.row_spacing, rows)
                coords[2] = _snap((u - a_off[k]) / geom.col_spacing, cols)
                # cval NaN marks points that fall outside one of the two slices
                vals += weight.astype(np.float32) * map_coordinates(
                    stack, coords, order=1, mode="constant", cval=np.nan, output=np.float32)
            vals[np.isnan(vals)] = fill
        out[m0:m0 + m.shape[0]] = vals  # [mb, ny, nx]
    lps[:3, :3] = axes.T
    lps[:3, 3] = geom.origin + start_rel
    return out.transpose(2, 1, 0), lps_to_ras(lps)

