"""Views: what a method sees of one preprocessed scan.

A view is a callable ``view(hu, meta, rng) -> dict[str, torch.Tensor]``:

* ``hu``: the preprocessed HU array ``[X, Y, Z]`` (an int16 memmap from the cache, or float32);
* ``meta``: ``{"spacing", "affine", "coord" (world mm [3] or None), "path", "id"}`` of that array;
* ``rng``: a ``np.random.Generator`` seeded from ``(SEED, epoch, index)`` by the dataset.

Views draw ONLY from ``rng`` (no global numpy / torch randomness), so a sample is a pure function
of ``(SEED, epoch, index)`` and resuming reproduces it exactly. To stay fast they cut their crops
from ``hu`` before converting anything (a memmap is never read whole) and window only the crops.

:class:`SingleView` serves MAE and downstream; DINO multi-crop and SimCLR pair views live beside it
and can reuse :func:`window_tensor` and :func:`random_flip`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from data.transforms import fit_to_roi
from data.windows import apply_windows, window_specs


def window_tensor(hu: np.ndarray, specs: Sequence[tuple[float, float]], hu_shift: float = 0.0) -> torch.Tensor:
    """HU crop ``[X, Y, Z]`` -> float32 tensor ``[C, X, Y, Z]`` in [0, 1] (one channel per window).

    Args:
        hu: HU array (any dtype, may be a flipped view).
        specs: ``[(center, width)]``.
        hu_shift: HU added to every voxel (applied by moving the windows: free).
    """
    if hu_shift:
        specs = [(c - hu_shift, w) for c, w in specs]
    return torch.from_numpy(apply_windows(hu, specs))


def random_flip(hu: np.ndarray, rng: np.random.Generator, axes: Sequence[int] = (0,), p: float = 0.5
                ) -> np.ndarray:
    """Flip each of ``axes`` with probability ``p`` (a view, no copy). Axis 0 = X = left-right."""
    for ax in axes:
        if rng.random() < p:
            hu = np.flip(hu, axis=ax)
    return hu


class SingleView:
    """One ROI-sized crop of the head, windowed: ``{"image": float32 [C, *DATA.ROI]}``.

    Training: random crop/pad offset (or random padding placement with ``DATA.FIT resize``), a
    left-right flip with probability 0.5 and a small random HU shift. Evaluation: centred and
    deterministic.

    Args:
        cfg: the config (DATA.ROI, DATA.WINDOWS, DATA.FIT).
        train: random augmentation (True) or centred and deterministic (False).
        flip_p: probability of the left-right (X) flip when training.
        hu_shift: training draws a HU offset uniformly in ``[-hu_shift, hu_shift]`` (0 = none).
    """

    def __init__(self, cfg, train: bool, flip_p: float = 0.5, hu_shift: float = 5.0):
        self.roi = tuple(int(r) for r in cfg.DATA.ROI)
        self.specs = window_specs(list(cfg.DATA.WINDOWS))
        self.fit = str(cfg.DATA.FIT)
        self.train = bool(train)
        self.flip_p = float(flip_p)
        self.hu_shift = float(hu_shift)

    def __call__(self, hu: np.ndarray, meta: Optional[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        if not self.train:
            x = fit_to_roi(hu, self.roi, self.fit, rng=None)  # centred, deterministic
            return {"image": window_tensor(x, self.specs)}
        x = fit_to_roi(hu, self.roi, self.fit, rng=rng)  # only the crop is read from a memmap
        x = random_flip(x, rng, axes=(0,), p=self.flip_p)
        shift = float(rng.uniform(-self.hu_shift, self.hu_shift)) if self.hu_shift else 0.0
        return {"image": window_tensor(x, self.specs, shift)}  # [C, *ROI]

    def __repr__(self) -> str:
        return (f"SingleView(roi={self.roi}, windows={self.specs}, fit={self.fit!r}, train={self.train}, "
                f"flip_p={self.flip_p}, hu_shift={self.hu_shift})")


# ---------------------------------------------------------------------------------------------
# DINO multi-crop (issue 6)

from dataclasses import dataclass  # noqa: E402

DINO_MAX_ASPECT = 4.0 / 3.0  # per-axis crop-box aspect jitter: side ratios log-uniform in [3/4, 4/3]


def sample_crop_box(shape: Sequence[int], out_size: Sequence[int], scale: Sequence[float],
                    rng: np.random.Generator, max_aspect: float = DINO_MAX_ASPECT
                    ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A random box inside an array, for a random-resized crop.

    The box holds a fraction ``s ~ U(scale)`` of the array's voxels (the head's extent: the
    preprocessed array is already cropped to the head). Its shape follows ``out_size`` (a cube for
    a cubic crop) with each side multiplied by a log-uniform ratio in ``[1/max_aspect, max_aspect]``
    (ratios renormalised to a product of 1, so the volume is kept), then clipped to the array: a
    side longer than the array is cut to it (the box then holds less than ``s``). The position is
    uniform among the positions that keep the box inside the array; nothing is ever padded.

    Args:
        shape: array shape ``[X, Y, Z]``.
        out_size: size the crop will be resampled to ``[D, H, W]`` (sets the box's aspect).
        scale: ``[low, high]`` range of the volume fraction, ``0 < low <= high <= 1``.
        rng: the sample's generator (draws: 1 fraction, 3 ratios, 3 starts).
        max_aspect: largest per-axis side ratio (>= 1).

    Returns:
        ``(starts, sizes)``, each 3 ints, with ``0 <= start`` and ``start + size <= shape``.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"expected a non-empty 3D array shape; got {tuple(shape)}")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale {list(scale)} must be [low, high] with 0 < low <= high <= 1")
    if max_aspect < 1:
        raise ValueError(f"max_aspect = {max_aspect}; it must be >= 1")
    dims = np.asarray(shape, dtype=np.float64)
    out = np.asarray(out_size, dtype=np.float64)
    frac = rng.uniform(scale[0], scale[1])
    log_r = rng.uniform(-np.log(max_aspect), np.log(max_aspect), size=3)
    log_r -= log_r.mean()  # product of the ratios = 1: the volume stays frac * prod(shape)
    side = np.cbrt(frac * dims.prod() / out.prod()) * out * np.exp(log_r)
    sizes = np.clip(np.round(side), 1, dims).astype(int)
    starts = [int(rng.integers(0, n - s + 1)) for n, s in zip(shape, sizes)]
    return tuple(starts), tuple(int(s) for s in sizes)  # type: ignore[return-value]


def resized_crop(hu: np.ndarray, starts: Sequence[int], sizes: Sequence[int], out_size: Sequence[int],
                 flip_axes: Sequence[int] = ()) -> torch.Tensor:
    """Cut a box from ``hu`` and resample it (trilinear) to ``out_size``; float32 HU.

    Only the box is read (a memmap is never loaded whole) and cast to float32; interpolation runs
    on that box alone (``torch.nn.functional.interpolate``, ``align_corners=False``; skipped when
    the box already has the output size).

    Args:
        hu: HU ``[X, Y, Z]`` (int16 memmap or float32).
        starts: box start per axis (inside the array).
        sizes: box size per axis.
        out_size: output ``[D, H, W]``.
        flip_axes: array axes to flip (applied to the box view before the copy: free).

    Returns:
        float32 tensor ``out_size`` (contiguous, new memory).
    """
    box = hu[tuple(slice(s, s + n) for s, n in zip(starts, sizes))]
    for ax in flip_axes:
        box = np.flip(box, axis=ax)
    x = torch.from_numpy(np.array(box, dtype=np.float32, order="C"))  # always a copy: never the caller's array
    out_size = tuple(int(s) for s in out_size)
    if tuple(x.shape) == out_size:
        return x
    return torch.nn.functional.interpolate(x[None, None], size=out_size, mode="trilinear",
                                           align_corners=False)[0, 0]  # [D, H, W]


def gaussian_blur3(x: torch.Tensor, sigma) -> torch.Tensor:
    """Gaussian blur of the last three axes by repeated separable 3-tap ``[a, 1 - 2a, a]`` passes.

    ``n = ceil(sigma^2 / 0.5)`` passes with ``a = sigma^2 / (2 n)`` (<= 0.25) give the variance
    ``sigma^2`` exactly (a binomial approximation of the Gaussian, close for these small sigmas);
    borders are replicated. Several times faster on one core than ``scipy.ndimage.gaussian_filter``.

    Args:
        x: float32 ``[..., D, H, W]``.
        sigma: standard deviation in voxels, a number or a tensor ``[...]`` (one per volume of the
            leading axes; 0 = that volume is left as it is).

    Returns:
        a new blurred tensor (``x`` itself when nothing is blurred).
    """
    lead = x.shape[:-3]
    sig = torch.as_tensor(sigma, dtype=torch.float32).to(x.device).expand(lead)
    var = sig.double().cpu() ** 2
    passes = torch.ceil(var / 0.5).long()  # 0 where sigma == 0
    if not bool((passes > 0).any()):
        return x
    if var.numel() == 1 or bool((var == var.flatten()[0]).all()):  # one sigma for all: straight through
        v, n = float(var.flatten()[0]), int(passes.flatten()[0])
        return _blur_passes(x, v / (2 * n), n)
    out = x.clone()
    for n in passes.unique().tolist():
        if n == 0:
            continue
        sel = (passes == n).to(x.device)
        a = (var.to(x.device)[sel] / (2 * n)).float()  # [k]
        out[sel] = _blur_passes(x[sel], a.view(-1, 1, 1, 1), n)
    return out


def _blur_passes(x: torch.Tensor, a, n: int) -> torch.Tensor:
    """``n`` passes of ``[a, 1 - 2a, a]`` over each of the last three axes (edges replicated)."""
    for _ in range(n):
        for d in (-3, -2, -1):
            size = x.shape[d]
            if size < 2:
                continue
            z = x * (1.0 - 2.0 * a)
            if isinstance(a, torch.Tensor):
                z.narrow(d, 1, size - 1).addcmul_(x.narrow(d, 0, size - 1), a)
                z.narrow(d, 0, size - 1).addcmul_(x.narrow(d, 1, size - 1), a)
                z.narrow(d, 0, 1).addcmul_(x.narrow(d, 0, 1), a)  # replicated borders
                z.narrow(d, size - 1, 1).addcmul_(x.narrow(d, size - 1, 1), a)
            else:
                z.narrow(d, 1, size - 1).add_(x.narrow(d, 0, size - 1), alpha=a)
                z.narrow(d, 0, size - 1).add_(x.narrow(d, 1, size - 1), alpha=a)
                z.narrow(d, 0, 1).add_(x.narrow(d, 0, 1), alpha=a)
                z.narrow(d, size - 1, 1).add_(x.narrow(d, size - 1, 1), alpha=a)
            x = z
    return x


NOISE_BANK_MARGIN = 16  # a noise field is a random window of a fixed bank this much larger per axis
NOISE_BANK_SEED = 20240607  # a constant of the code: the bank is the same in every process and run
_NOISE_BANKS: dict[tuple, torch.Tensor] = {}


def noise_window(shape: Sequence[int], offsets: Sequence[int], flips: Sequence[bool],
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """Unit Gaussian noise ``shape``: the window at ``offsets`` (each in ``[0, NOISE_BANK_MARGIN]``) of
    a fixed per-shape bank, flipped along the axes where ``flips`` is true.

    Drawing fresh normals costs more than the rest of a crop's augmentation; a window of a bank
    generated once per process (and device) from a constant seed gives ``17^3 * 8`` distinct fields,
    chosen by 6 draws of the sample's generator (see :func:`draw_augment`). Do not modify the result.
    """
    shape = tuple(int(s) for s in shape)
    key = (shape, str(torch.device(device)))
    bank = _NOISE_BANKS.get(key)
    if bank is None:
        cpu = _NOISE_BANKS.get((shape, "cpu"))
        if cpu is None:
            g = np.random.default_rng(NOISE_BANK_SEED)
            cpu = torch.from_numpy(g.standard_normal(tuple(s + NOISE_BANK_MARGIN for s in shape), dtype=np.float32))
            _NOISE_BANKS[(shape, "cpu")] = cpu
        bank = _NOISE_BANKS[key] = cpu.to(device)
    field = bank[tuple(slice(int(o), int(o) + n) for o, n in zip(offsets, shape))]
    dims = [d for d in range(3) if flips[d]]
    return field.flip(dims) if dims else field


def noise_field(shape: Sequence[int], rng: np.random.Generator) -> torch.Tensor:
    """Unit Gaussian noise ``shape`` at a random window and flips of the bank (:func:`noise_window`)."""
    offsets = rng.integers(0, NOISE_BANK_MARGIN + 1, size=3)
    return noise_window(shape, offsets, [rng.random() < 0.5 for _ in range(3)])


@dataclass(frozen=True)
class CropAugment:
    """Per-view augmentation of a DINO crop (probabilities and ranges).

    Applied in this order to the resampled HU crop: flips, Gaussian blur (sigma in output voxels,
    :func:`gaussian_blur3`), Gaussian noise (std in HU, :func:`noise_window`), intensity scale and
    shift (``hu * a + b``, applied exactly and for
    free by moving the windows), windowing, gamma (``x ** g`` on the [0, 1] channels).

    Args:
        flip_p: probability of a flip of each axis in ``flip_axes``.
        flip_axes: array axes that may flip (0 = X = left-right: a head is nearly symmetric).
        intensity_p: probability of the HU scale/shift.
        hu_scale: ``a ~ U(1 - hu_scale, 1 + hu_scale)``.
        hu_shift: ``b ~ U(-hu_shift, hu_shift)`` HU.
        gamma_p: probability of the gamma.
        gamma_range: ``g`` log-uniform in this range.
        blur_p: probability of the blur.
        blur_sigma: sigma ~ U(range), output voxels.
        noise_p: probability of the noise.
        noise_std: std ~ U(range), HU.
    """

    flip_p: float = 0.5
    flip_axes: tuple[int, ...] = (0,)
    intensity_p: float = 0.8
    hu_scale: float = 0.1
    hu_shift: float = 10.0
    gamma_p: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    noise_p: float = 0.0
    noise_std: tuple[float, float] = (2.0, 10.0)


# As DINO: the first global view always blurred, the second rarely blurred but noised
# (DINO's solarisation slot), local views blurred half of the time.
DINO_GLOBAL_AUGMENTS = (CropAugment(blur_p=1.0, noise_p=0.0), CropAugment(blur_p=0.1, noise_p=0.5))
DINO_LOCAL_AUGMENT = CropAugment(blur_p=0.5, noise_p=0.0)


# per-crop augmentation parameters, the order of the columns of draw_augment's vector
AUG_FIELDS = ("blur_sigma", "noise_std", "noise_off_x", "noise_off_y", "noise_off_z", "noise_flip_x",
              "noise_flip_y", "noise_flip_z", "hu_scale", "hu_shift", "gamma")


def draw_augment(aug: CropAugment, rng: np.random.Generator) -> torch.Tensor:
    """Draw one crop's augmentation (after its flips): ``[len(AUG_FIELDS)]`` float32.

    Draw order: blur (coin, sigma), noise (coin, std, 3 window offsets, 3 flips), intensity (coin,
    scale, shift), gamma (coin, value). Not drawn = identity (sigma 0, std 0, scale 1, shift 0,
    gamma 1).
    """
    v = [0.0, 0.0, 0, 0, 0, 0, 0, 0, 1.0, 0.0, 1.0]
    if rng.random() < aug.blur_p:
        v[0] = float(rng.uniform(*aug.blur_sigma))
    if rng.random() < aug.noise_p:
        v[1] = float(rng.uniform(*aug.noise_std))
        v[2:5] = [int(o) for o in rng.integers(0, NOISE_BANK_MARGIN + 1, size=3)]
        v[5:8] = [float(rng.random() < 0.5) for _ in range(3)]
    if rng.random() < aug.intensity_p:
        v[8] = float(rng.uniform(1.0 - aug.hu_scale, 1.0 + aug.hu_scale))
        v[9] = float(rng.uniform(-aug.hu_shift, aug.hu_shift))
    if rng.random() < aug.gamma_p:
        lo, hi = aug.gamma_range
        v[10] = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    return torch.tensor(v, dtype=torch.float32)


def filter_batch(hu: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """HU stage of the augmentation for crops ``[N, D, H, W]`` (float32) with ``params [N, 11]``:
    Gaussian blur (:func:`gaussian_blur3`), then noise (``std *`` :func:`noise_window`). Any device."""
    sigma = params[:, 0]
    if bool((sigma > 0).any()):
        hu = gaussian_blur3(hu, sigma)
    noisy = (params[:, 1] > 0).nonzero().flatten().tolist()
    if noisy:
        hu = hu.clone()  # noise is added in place: never into the caller's tensor
        p = params.cpu()
        for i in noisy:
            field = noise_window(hu.shape[1:], p[i, 2:5].long().tolist(), (p[i, 5:8] > 0).tolist(), hu.device)
            hu[i] = hu[i].add(field, alpha=float(p[i, 1]))
    return hu


def window_batch(hu: torch.Tensor, params: torch.Tensor, specs: Sequence[tuple[float, float]],
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Intensity, windowing and gamma: ``clip((a * hu + b - lo_c) / w_c, 0, 1) ** gamma`` per channel.

    Args:
        hu: ``[N, D, H, W]`` HU (any float dtype).
        params: ``[N, 11]`` (:data:`AUG_FIELDS`; uses scale ``a``, shift ``b``, gamma).
        specs: windows ``[(center, width)]``; ``lo_c = center_c - w_c / 2``.
        out: optional float32 ``[N, C, D, H, W]`` written in place.

    Returns:
        float32 ``[N, C, D, H, W]`` in [0, 1].
    """
    n = hu.shape[0]
    dev = hu.device
    lo = torch.tensor([c - w / 2.0 for c, w in specs], dtype=torch.float32, device=dev).view(1, -1, 1, 1, 1)
    inv = torch.tensor([1.0 / w for _, w in specs], dtype=torch.float32, device=dev).view(1, -1, 1, 1, 1)
    p = params.to(device=dev, dtype=torch.float32).view(n, -1, 1, 1, 1)
    scale = p[:, 8:9] * inv  # [N, C, 1, 1, 1]
    offset = (p[:, 9:10] - lo) * inv
    if out is None:
        out = torch.empty((n, len(specs)) + tuple(hu.shape[1:]), dtype=torch.float32, device=dev)
    torch.addcmul(offset, hu.float().unsqueeze(1), scale, out=out).clamp_(0.0, 1.0)
    gamma = p[:, 10:11]  # [N, 1, 1, 1, 1]
    if bool((gamma != 1).any()):
        if n == 1:
            out.log2_().mul_(float(gamma)).exp2_()  # out ** gamma (0 -> 0), faster than pow_ on the CPU
        else:
            out.log2_().mul_(gamma).exp2_()
    return out


def augment_crop(x: torch.Tensor, specs: Sequence[tuple[float, float]], aug: CropAugment,
                 rng: np.random.Generator, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Blur, noise, intensity, windowing and gamma of one resampled HU crop (flips come earlier).

    Args:
        x: float32 HU crop ``[D, H, W]``.
        specs: windows ``[(center, width)]``.
        aug: probabilities and ranges.
        rng: the sample's generator (the only source of randomness; see :func:`draw_augment`).
        out: optional float32 ``[C, D, H, W]`` tensor written in place (saves a stacking copy).

    Returns:
        float32 ``[C, D, H, W]`` in [0, 1] (``out`` when given).
    """
    params = draw_augment(aug, rng)[None]  # [1, 11]
    x = filter_batch(x[None], params)  # [1, D, H, W]
    return window_batch(x, params, specs, None if out is None else out[None])[0]


class DINOViews:
    """DINO multi-crop: ``{"global": [G, C, *DATA.ROI], "local": [L, C, *DINO.LOCAL_CROP_SIZE]}``.

    ``G = DINO.GLOBAL_CROPS`` crops of ``DINO.GLOBAL_CROP_SCALE`` and ``L = DINO.LOCAL_CROPS_NUMBER``
    of ``DINO.LOCAL_CROP_SCALE`` (volume fractions of the head's extent), each a random box
    (:func:`sample_crop_box`) cut straight from the cached array and resampled to its crop size
    (:func:`resized_crop`); no padded canvas, so every voxel of a crop comes from the scan. Each
    view gets its own augmentation draw (:func:`augment_crop`): global view 1 always blurred,
    global view 2 rarely blurred but often noised (further global views alternate), local views
    as :data:`DINO_LOCAL_AUGMENT`. Only the crops are read, cast and windowed. After
    ``data.datasets.collate``: ``[B, G, C, ...]`` and ``[B, L, C, ...]``.

    Device stage (``device_stage=True``, for GPU training): the workers stop after the resize and
    return HU crops as float16 with their augmentation draws, ``{"global": [G, *ROI], "global_aug":
    [G, 11], "local": [L, *local], "local_aug": [L, 11]}`` (:func:`draw_augment`);
    :meth:`batch_transform` (or :func:`dino_batch_transform`, which the DINO method applies itself
    to such a batch) then blurs, noises and windows the whole batch on the GPU into exactly the
    format above. Same random draws, same code, same numbers up to the float16 rounding of HU
    (< 0.5 HU); 6x fewer bytes per sample through the loader and a fraction of the worker CPU time.

    Device resize (``device_stage=True, device_resize=True``; issue 11): the workers do not even
    resize. They draw every box, flip and augmentation as above and ship the part of the cached
    array that the boxes cover, once, in its own dtype: ``{"hu": [X', Y', Z'], "global_box": [G, 12],
    "global_aug": [G, 11], "local_box": [L, 12], "local_aug": [L, 11]}`` (a box row: start, size,
    flips, output size; ``data.datasets.collate`` keeps the ragged ``"hu"`` as a list);
    :func:`dino_batch_transform` cuts, flips and resizes the crops on the GPU
    (:func:`crops_from_heads`) before the stage above. The same numbers as without a device stage
    (no float16 step), and a worker's work per sample is one copy of the head.

    The same callable serves training and validation: with the dataset's ``(SEED, epoch, index)``
    generator a validation pass (epoch 0) sees the same crops every time.

    Args:
        cfg: the config (DATA.ROI, DATA.WINDOWS, DINO.GLOBAL_CROPS, DINO.LOCAL_CROPS_NUMBER,
            DINO.LOCAL_CROP_SIZE, DINO.GLOBAL_CROP_SCALE, DINO.LOCAL_CROP_SCALE).
        device_stage: leave windowing to a batched device stage (attribute; may be changed later).
        device_resize: with ``device_stage``, leave the resizing to it too (attribute).
        global_augments: augmentation of global view i is ``global_augments[i % len]``.
        local_augment: augmentation of every local view.
        max_aspect: per-axis box aspect jitter (see :func:`sample_crop_box`).
    """

    def __init__(self, cfg, device_stage: bool = False,
                 global_augments: Sequence[CropAugment] = DINO_GLOBAL_AUGMENTS,
                 local_augment: CropAugment = DINO_LOCAL_AUGMENT, max_aspect: float = DINO_MAX_ASPECT,
                 device_resize: bool = False):
        self.specs = window_specs(list(cfg.DATA.WINDOWS))
        self.global_size = tuple(int(r) for r in cfg.DATA.ROI)
        local = list(cfg.DINO.LOCAL_CROP_SIZE) or [max(1, r // 2) for r in self.global_size]
        self.local_size = tuple(int(r) for r in local)
        self.n_global = int(cfg.DINO.GLOBAL_CROPS)
        self.n_local = int(cfg.DINO.LOCAL_CROPS_NUMBER)
        if self.n_global < 1 or self.n_local < 0:
            raise ValueError(f"DINO.GLOBAL_CROPS = {self.n_global} must be >= 1 and DINO.LOCAL_CROPS_NUMBER = "
                             f"{self.n_local} >= 0")
        self.global_scale = tuple(float(s) for s in cfg.DINO.GLOBAL_CROP_SCALE)
        self.local_scale = tuple(float(s) for s in cfg.DINO.LOCAL_CROP_SCALE)
        if not global_augments:
            raise ValueError("global_augments is empty")
        self.global_augments = tuple(global_augments)
        self.local_augment = local_augment
        self.max_aspect = float(max_aspect)
        self.device_stage = bool(device_stage)
        self.device_resize = bool(device_resize)

    def _crop_hu(self, hu: np.ndarray, out_size: Sequence[int], scale: Sequence[float], aug: CropAugment,
                 rng: np.random.Generator) -> torch.Tensor:
        """Box, flips, trilinear resize: float32 HU ``out_size``."""
        starts, sizes = sample_crop_box(hu.shape, out_size, scale, rng, self.max_aspect)
        flips = [ax for ax in aug.flip_axes if rng.random() < aug.flip_p]
        return resized_crop(hu, starts, sizes, out_size, flips)  # float32 HU [D, H, W]

    def crop(self, hu: np.ndarray, out_size: Sequence[int], scale: Sequence[float], aug: CropAugment,
             rng: np.random.Generator, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One augmented view ``[C, *out_size]`` of ``hu`` (written into ``out`` when given)."""
        return augment_crop(self._crop_hu(hu, out_size, scale, aug, rng), self.specs, aug, rng, out)

    def _views(self, hu: np.ndarray, rng: np.random.Generator, n: int, size: tuple[int, ...],
               scale: Sequence[float], augs: Sequence[CropAugment]) -> dict[str, torch.Tensor]:
        if not self.device_stage:
            out = torch.empty((n, len(self.specs)) + size)  # [n, C, *size], written in place
            for i in range(n):
                self.crop(hu, size, scale, augs[i % len(augs)], rng, out=out[i])
            return {"": out}
        params = torch.empty((n, len(AUG_FIELDS)))  # [n, 11]
        if self.device_resize:  # boxes only: the device cuts and resizes (crops_from_heads)
            boxes = torch.empty((n, 12), dtype=torch.int64)  # start, size, flips, output size
            for i in range(n):
                aug = augs[i % len(augs)]
                starts, sizes = sample_crop_box(hu.shape, size, scale, rng, self.max_aspect)  # as _crop_hu
                flipped = [ax for ax in aug.flip_axes if rng.random() < aug.flip_p]
                boxes[i] = torch.tensor([*starts, *sizes, *(int(ax in flipped) for ax in range(3)), *size])
                params[i] = draw_augment(aug, rng)
            return {"_box": boxes, "_aug": params}
        crops = torch.empty((n,) + size, dtype=torch.float16)  # [n, *size] HU, resized, not yet filtered
        for i in range(n):
            aug = augs[i % len(augs)]
            crops[i].copy_(self._crop_hu(hu, size, scale, aug, rng))
            params[i] = draw_augment(aug, rng)
        return {"": crops, "_aug": params}

    def __call__(self, hu: np.ndarray, meta: Optional[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        if hu.ndim != 3 or min(hu.shape) < 1:
            where = (meta or {}).get("path", "the scan")
            raise ValueError(f"{where}: DINO views need a non-empty 3D array; got shape {tuple(hu.shape)}")
        out = {}
        for name, n, size, scale, augs in (
                ("global", self.n_global, self.global_size, self.global_scale, self.global_augments),
                ("local", self.n_local, self.local_size, self.local_scale, (self.local_augment,))):
            out.update({name + k: v for k, v in self._views(hu, rng, n, size, scale, augs).items()})
        if self.device_stage and self.device_resize:
            boxes = torch.cat([out["global_box"], out["local_box"]])  # [G + L, 12]
            lo = boxes[:, 0:3].min(0).values
            hi = (boxes[:, 0:3] + boxes[:, 3:6]).max(0).values
            for key in ("global_box", "local_box"):
                out[key][:, 0:3] -= lo  # relative to the shipped part
            region = hu[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]  # only this part is read
            out["hu"] = torch.from_numpy(np.array(region))  # [X', Y', Z'], a copy in the cache's dtype
        return out  # {"global": [G, C, *ROI], "local": [L, C, *local]} (+ "_aug" entries on the device path)

    def batch_transform(self, batch: dict) -> dict:
        """The device stage (a no-op unless the batch came from ``device_stage=True``)."""
        return dino_batch_transform(batch, self.specs)

    def __repr__(self) -> str:
        return (f"DINOViews(global={self.n_global}x{self.global_size} scale {self.global_scale}, "
                f"local={self.n_local}x{self.local_size} scale {self.local_scale}, windows={self.specs}, "
                f"device_stage={self.device_stage}, device_resize={self.device_resize})")


def crops_from_heads(heads: Sequence[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
    """Cut, flip and resize (trilinear) the crops of a device-resize batch where the heads lie.

    The same operations as :func:`resized_crop`, so the same numbers on the CPU.

    Args:
        heads: ``B`` HU tensors ``[X_b, Y_b, Z_b]`` (any dtype, any device).
        boxes: ``[B, N, 12]`` integers: start (3), size (3), flips (3, 0/1), output size (3).

    Returns:
        float32 ``[B, N, D, H, W]`` HU on the heads' device.
    """
    b, n = boxes.shape[:2]
    rows = boxes.cpu().tolist()
    size = tuple(rows[0][0][9:12]) if b * n else (1, 1, 1)
    out = torch.empty((b, n) + size, dtype=torch.float32, device=heads[0].device if b else "cpu")
    for i in range(b):
        for j in range(n):
            s, z, f = rows[i][j][0:3], rows[i][j][3:6], rows[i][j][6:9]
            x = heads[i][s[0]:s[0] + z[0], s[1]:s[1] + z[1], s[2]:s[2] + z[2]]
            dims = [d for d in range(3) if f[d]]
            x = (x.flip(dims) if dims else x).float()
            if tuple(x.shape) != size:
                x = torch.nn.functional.interpolate(x[None, None], size=size, mode="trilinear",
                                                    align_corners=False)[0, 0]
            out[i, j] = x
    return out


def dino_batch_transform(batch: dict, specs: Sequence[tuple[float, float]]) -> dict:
    """Window a device-stage DINO batch in place of its HU crops (see :class:`DINOViews`).

    ``batch["global"] [B, G, D, H, W]`` HU + ``batch["global_aug"] [B, G, 11]`` (:data:`AUG_FIELDS`)
    -> ``batch["global"] [B, G, C, D, H, W]`` float32 (likewise ``"local"``): blur, noise,
    intensity, windowing and gamma, batched; a batch without ``"_aug"`` entries (windowed by the
    workers) is returned unchanged. A device-resize batch (``"hu"`` heads and ``"*_box"`` rows
    instead of crops) is cut and resized first (:func:`crops_from_heads`).

    Args:
        batch: a collated batch (on the device where the windowing should run).
        specs: windows ``[(center, width)]`` (``DATA.WINDOWS``).
    """
    if not any(k.endswith("_aug") for k in batch):
        return batch
    out = dict(batch)
    if "hu" in out:  # device resize: cut and resize the crops first
        heads = out.pop("hu")
        for name in ("global", "local"):
            if name + "_box" in out:
                out[name] = crops_from_heads(heads, out.pop(name + "_box"))  # [B, N, D, H, W] float32
    for name in ("global", "local"):
        if name + "_aug" in out:
            hu, params = out[name], out.pop(name + "_aug")  # [B, N, D, H, W], [B, N, 11]
            b, n = hu.shape[:2]
            if b * n == 0:
                out[name] = torch.zeros((b, n, len(specs)) + tuple(hu.shape[2:]), device=hu.device)
                continue
            flat, p = hu.reshape(b * n, *hu.shape[2:]).float(), params.reshape(b * n, -1)
            out[name] = window_batch(filter_batch(flat, p), p, specs).reshape(b, n, len(specs), *hu.shape[2:])
    return out


# ---------------------------------------------------------------------------------------------
# SimCLR views (issue 7): pairs of views of a region; the region depends on SIMCLR.MODE

from typing import Callable  # noqa: E402

from data.io import AIR_HU, BadInputError  # noqa: E402
from data.transforms import crop_pad, crop_pad_offsets  # noqa: E402


@dataclass(frozen=True)
class SimCLRAugment(CropAugment):
    """Per-view augmentation of a SimCLR crop: :class:`CropAugment` plus a histogram shift.

    Order: flips, Gaussian blur, Gaussian noise, HU scale and shift, windowing, (gamma), then the
    histogram shift of the [0, 1] channels (:func:`histogram_shift`).

    Args:
        hist_p: probability of the histogram shift.
        hist_points: ``(low, high)`` number of control points (inclusive, >= 3); fewer points
            move each one further (stronger distortion).
        (the other fields as :class:`CropAugment`)
    """

    hist_p: float = 0.5
    hist_points: tuple[int, int] = (5, 5)


# CT-FM-like: left-right flips only (a head is left-right symmetric, and a flip of another axis of
# the axial plane would make the optional 90-degree rotation task ambiguous: rot180 = flip X + flip Y),
# histogram shift with 5 control points, blur, noise, and a mild HU scale/shift.
SIMCLR_AUGMENT = SimCLRAugment(flip_p=0.5, flip_axes=(0,), intensity_p=0.8, hu_scale=0.1, hu_shift=10.0,
                               gamma_p=0.0, blur_p=0.5, blur_sigma=(0.1, 1.0), noise_p=0.5,
                               noise_std=(2.0, 10.0), hist_p=0.5, hist_points=(5, 5))
SIMCLR_MAX_TRIES = 32  # random draws when looking for a head voxel / a distant negative centre


def histogram_shift(x: torch.Tensor, num_points: int, rng: np.random.Generator) -> torch.Tensor:
    """Monotone non-linear remap of [0, 1] intensities (the logic of MONAI ``RandHistogramShift``).

    ``num_points`` control points evenly spaced over [0, 1]; each inner point moves to a uniform
    draw between its left neighbour (already moved) and its right neighbour (not yet moved), so the
    curve stays non-decreasing and maps 0 -> 0 and 1 -> 1; voxels follow the piecewise-linear
    curve. The range is the fixed [0, 1] of the windowed channels (not the crop's min/max), so the
    remap does not depend on what the crop happens to contain. One curve for all channels.

    Args:
        x: float32 ``[C, D, H, W]`` in [0, 1].
        num_points: control points (>= 3).
        rng: the sample's generator (``num_points - 2`` draws).

    Returns:
        float32 tensor of the shape of ``x``, in [0, 1].
    """
    return apply_histogram_curve(x, draw_histogram_curve(num_points, rng))


def draw_histogram_curve(num_points: int, rng: np.random.Generator) -> np.ndarray:
    """The moved control points ``[num_points]`` of :func:`histogram_shift` (``num_points - 2`` draws)."""
    if num_points < 3:
        raise ValueError(f"histogram shift needs >= 3 control points; got {num_points}")
    moved = np.linspace(0.0, 1.0, num_points)
    for i in range(1, num_points - 1):
        moved[i] = rng.uniform(moved[i - 1], moved[i + 1])
    return moved


def apply_histogram_curve(x: torch.Tensor, moved, use_numpy: Optional[bool] = None) -> torch.Tensor:
    """Map [0, 1] values through the piecewise-linear curve from evenly spaced inputs to ``moved``.

    Args:
        x: float tensor in [0, 1] (any shape, any device).
        moved: ``[k]`` outputs of the ``k`` control points at ``linspace(0, 1, k)`` (k >= 2).
        use_numpy: compute with ``numpy.interp`` (default: on the CPU) or with torch ops (default
            elsewhere: the batch stays on its GPU).

    Returns:
        float32 tensor of the shape of ``x``: ``numpy.interp(x, linspace(0, 1, k), moved)``.
    """
    moved = np.asarray(moved.cpu() if isinstance(moved, torch.Tensor) else moved, dtype=np.float64)
    if use_numpy if use_numpy is not None else x.device.type == "cpu":
        ref = np.linspace(0.0, 1.0, len(moved))
        return torch.from_numpy(np.interp(x.numpy(), ref, moved).astype(np.float32))
    m = torch.as_tensor(moved, dtype=torch.float32).to(x.device)
    k = m.numel()
    pos = x.float().clamp(0.0, 1.0) * (k - 1)
    seg = pos.floor().clamp_(max=k - 2)
    t = pos - seg  # position inside the segment, [0, 1]
    seg = seg.long()
    lo = m[seg]
    return lo.add_(t.mul_(m[seg + 1] - lo))


def world_to_voxel(affine: np.ndarray, point: Sequence[float]) -> np.ndarray:
    """World point (mm) -> continuous voxel coordinate: ``inv(affine) @ [x, y, z, 1]``.

    Args:
        affine: ``(4, 4)`` voxel -> world of the (preprocessed) array.
        point: ``[x, y, z]`` mm.

    Returns:
        float64 ``[3]`` voxel indices (array axis order).
    """
    h = np.append(np.asarray(point, dtype=np.float64), 1.0)
    return (np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ h)[:3]


def random_head_voxel(hu: np.ndarray, threshold: float, rng: np.random.Generator,
                      tries: int = SIMCLR_MAX_TRIES) -> np.ndarray:
    """A uniform random voxel with HU above ``threshold`` (inside the head).

    Rejection sampling that reads one voxel per draw (a memmap is never read whole); the
    preprocessed array is cropped to the head, so about half the draws hit. After ``tries``
    misses the array centre is returned.

    Args:
        hu: HU ``[X, Y, Z]``.
        threshold: ``DATA.HEAD_THRESHOLD``.
        rng: the sample's generator.
        tries: number of draws.

    Returns:
        int64 ``[3]`` voxel index.
    """
    shape = np.asarray(hu.shape)
    for _ in range(tries):
        v = rng.integers(0, shape)
        if float(hu[tuple(v)]) > threshold:
            return v.astype(np.int64)
    return (shape // 2).astype(np.int64)


def sample_negative_center(shape: Sequence[int], seed: Sequence[int], crop: Sequence[int],
                           rng: np.random.Generator, accept: Optional[Callable[[np.ndarray], bool]] = None,
                           tries: int = SIMCLR_MAX_TRIES) -> np.ndarray:
    """The centre of a crop elsewhere in the scan: its box does not overlap the seed's box.

    Two boxes of size ``crop`` centred at ``c`` and ``s`` are disjoint when ``|c_i - s_i| >= crop_i``
    on some axis ``i``. Candidates are drawn uniformly from that set (a slab per axis and side,
    chosen with probability proportional to its volume, then a uniform voxel inside it) until
    ``accept`` (e.g. "inside the head") holds, for at most ``tries`` draws (then the last draw).
    When the array is too small for any disjoint box (shorter than about two crops on every axis),
    the centre goes to the far end of the axis with the most room: as far away as the scan allows.

    Args:
        shape: array shape ``[X, Y, Z]``.
        seed: seed voxel ``[3]``.
        crop: crop size ``[D, H, W]`` in voxels.
        rng: the sample's generator.
        accept: optional predicate on a candidate voxel.
        tries: number of draws.

    Returns:
        int64 ``[3]`` voxel index inside the array.
    """
    shape, seed, crop = (np.asarray(a, dtype=np.int64) for a in (shape, seed, crop))
    slabs = []  # (axis, low, high) inclusive ranges of the centre along that axis
    for i in range(3):
        if seed[i] - crop[i] >= 0:
            slabs.append((i, 0, int(seed[i] - crop[i])))
        if seed[i] + crop[i] <= shape[i] - 1:
            slabs.append((i, int(seed[i] + crop[i]), int(shape[i] - 1)))
    if not slabs:  # no disjoint box fits: the farthest end of the roomiest axis
        room = np.maximum(seed, shape - 1 - seed) / crop
        i = int(np.argmax(room))
        end = 0 if seed[i] > shape[i] - 1 - seed[i] else int(shape[i] - 1)
        slabs.append((i, end, end))
    sizes = np.array([(hi - lo + 1) * np.prod(shape) / shape[i] for i, lo, hi in slabs], dtype=np.float64)
    c = seed.copy()
    for _ in range(tries):
        i, lo, hi = slabs[int(rng.choice(len(slabs), p=sizes / sizes.sum()))]
        c = rng.integers(0, shape)
        c[i] = rng.integers(lo, hi + 1)
        if accept is None or accept(c):
            break
    return c.astype(np.int64)


class SimCLRViews:
    """SimCLR views of one scan: ``{"views": float32 [V, C, *SIMCLR.CROP_SIZE]}``.

    Views come in positive pairs: views ``2k`` and ``2k + 1`` are two augmented views of the same
    *region* (so the positive of view ``i`` is view ``i ^ 1``). Per ``SIMCLR.MODE``:

    * ``inter`` (V = 2): the region is the whole preprocessed head.
    * ``intra`` (V = 2 * SIMCLR.PATCHES_PER_SCAN): ``PATCHES_PER_SCAN`` regions of ``CROP_SIZE``
      voxels at uniform random positions (CT-FM: patches may overlap; they are padded with air
      where they reach past the array), pair k = region k.
    * ``negative_mined`` (V = 4): views 0, 1 of a ``CROP_SIZE`` region centred at the seed point
      (``meta["coord"]``, world mm, mapped to a voxel with ``inv(meta["affine"])``; a random head
      voxel (HU > DATA.HEAD_THRESHOLD) when the row has no coordinate); views 2, 3 of a region of
      the same size elsewhere in the scan whose box does not overlap the seed's
      (:func:`sample_negative_center`). A coordinate outside the array raises BadInputError.

    Each view is a random resized crop of its region (:func:`sample_crop_box` with
    ``SIMCLR.CROP_SCALE`` = volume fraction of the region and ``SIMCLR.CROP_ASPECT`` = largest
    per-axis side ratio), cut from the HU array (int16 memmap: only that box is read; air outside
    the array), flipped, resampled to ``CROP_SIZE`` (trilinear, the crop only), blurred, noised,
    intensity scaled and shifted, windowed (``DATA.WINDOWS``) and histogram shifted (``augment``).
    With ``CROP_SCALE [1, 1]`` and ``CROP_ASPECT 1`` a view is its whole region (the seed voxel at
    index ``CROP_SIZE // 2``). Only ``rng`` is drawn from. After ``data.datasets.collate``:
    ``[B, V, C, D, H, W]``.

    Device stage (``device_stage=True``, for GPU training; issue 11): the workers stop after the
    resize and return ``{"views": float16 HU [V, *CROP_SIZE], "views_aug": [V, 11], "views_hist":
    [V, 1 + P]}`` (the same draws in the same order); :func:`simclr_batch_transform` (which
    :class:`methods.simclr.SimCLR` applies first in its forward) blurs, noises, windows and
    histogram-shifts the whole batch on the GPU: the same views up to the float16 rounding of HU.

    The same callable serves training and validation (``train`` is accepted for the entry-script
    signature): the dataset's generator for epoch 0 makes validation views identical every pass.

    Args:
        cfg: the config (SIMCLR.MODE, SIMCLR.CROP_SIZE ([] = DATA.ROI), SIMCLR.CROP_SCALE,
            SIMCLR.CROP_ASPECT, SIMCLR.PATCHES_PER_SCAN, DATA.WINDOWS, DATA.HEAD_THRESHOLD).
        train: unused (see above).
        augment: per-view augmentation.
        device_stage: leave filtering and windowing to :func:`simclr_batch_transform` (attribute).
    """

    def __init__(self, cfg, train: bool = True, augment: SimCLRAugment = SIMCLR_AUGMENT,
                 device_stage: bool = False):
        self.device_stage = bool(device_stage)
        self.mode = str(cfg.SIMCLR.MODE)
        if self.mode not in ("inter", "intra", "negative_mined"):
            raise ValueError(f"SIMCLR.MODE = {self.mode!r}; expected 'inter', 'intra' or 'negative_mined'")
        self.crop = tuple(int(s) for s in (list(cfg.SIMCLR.CROP_SIZE) or list(cfg.DATA.ROI)))
        if len(self.crop) != 3 or min(self.crop) < 1:
            raise ValueError(f"SIMCLR.CROP_SIZE = {list(cfg.SIMCLR.CROP_SIZE)}; expected [] or 3 positive sizes")
        self.scale = tuple(float(s) for s in cfg.SIMCLR.CROP_SCALE)
        self.patches = int(cfg.SIMCLR.PATCHES_PER_SCAN)
        if self.patches < 1:
            raise ValueError(f"SIMCLR.PATCHES_PER_SCAN = {self.patches}; it must be >= 1")
        self.specs = window_specs(list(cfg.DATA.WINDOWS))
        self.head_threshold = float(cfg.DATA.HEAD_THRESHOLD)
        self.augment = augment
        self.max_aspect = float(cfg.SIMCLR.CROP_ASPECT)
        if self.max_aspect < 1:
            raise ValueError(f"SIMCLR.CROP_ASPECT = {self.max_aspect}; it must be >= 1 (1 = no stretching)")
        self.num_views = views_per_scan(self.mode, self.patches)

    def regions(self, hu: np.ndarray, meta: Optional[dict], rng: np.random.Generator
                ) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
        """``[(start [3] (may be negative), size)]`` of the regions, one per positive pair."""
        if self.mode == "inter":
            return [(np.zeros(3, dtype=np.int64), tuple(hu.shape))]
        half = np.asarray(self.crop) // 2
        if self.mode == "intra":
            return [(np.asarray(crop_pad_offsets(hu.shape, self.crop, rng)), self.crop) for _ in range(self.patches)]
        seed = self.seed_voxel(hu, meta, rng)
        neg = sample_negative_center(hu.shape, seed, self.crop, rng, accept=self._in_head(hu))
        return [(seed - half, self.crop), (neg - half, self.crop)]

    def _in_head(self, hu: np.ndarray) -> Callable[[np.ndarray], bool]:
        return lambda v: float(hu[tuple(v)]) > self.head_threshold

    def seed_voxel(self, hu: np.ndarray, meta: Optional[dict], rng: np.random.Generator) -> np.ndarray:
        """Voxel of ``meta["coord"]`` (world mm) through ``meta["affine"]``, else a random head voxel.

        Raises:
            BadInputError: the coordinate maps outside the array (wrong coordinate or frame).
        """
        coord = (meta or {}).get("coord")
        if coord is None:
            return random_head_voxel(hu, self.head_threshold, rng)
        if meta.get("affine") is None:
            raise ValueError(f"{meta.get('path', 'the scan')}: a seed coordinate needs meta['affine']")
        v = np.rint(world_to_voxel(meta["affine"], coord)).astype(np.int64)
        if (v < 0).any() or (v >= np.asarray(hu.shape)).any():
            raise BadInputError(str(meta.get("path", "?")),
                                f"seed point {[float(c) for c in coord]} mm (coordX/Y/Z) maps to voxel "
                                f"{v.tolist()}, outside the preprocessed array of shape {list(hu.shape)}")
        return v

    def view_hu(self, hu: np.ndarray, start: np.ndarray, size: Sequence[int], rng: np.random.Generator
                ) -> torch.Tensor:
        """Box, flips and trilinear resize of one view of the region: float32 HU ``CROP_SIZE``."""
        aug = self.augment
        sub_start, sub_size = sample_crop_box(size, self.crop, self.scale, rng, self.max_aspect)
        flips = [ax for ax in aug.flip_axes if rng.random() < aug.flip_p]
        box = crop_pad(hu, sub_size, np.asarray(start) + np.asarray(sub_start), AIR_HU)  # only the box is read
        return resized_crop(box, (0, 0, 0), box.shape, self.crop, flips)  # float32 HU [D, H, W]

    def draw_histogram(self, rng: np.random.Generator) -> np.ndarray:
        """float64 ``[1 + hist_points[1]]``: the number k of control points (0 = no shift), then the k
        moved points."""
        aug = self.augment
        row = np.zeros(1 + int(aug.hist_points[1]))
        if rng.random() < aug.hist_p:
            lo, hi = aug.hist_points
            k = int(rng.integers(lo, hi + 1))
            row[0] = k
            row[1:1 + k] = draw_histogram_curve(k, rng)
        return row

    def view(self, hu: np.ndarray, start: np.ndarray, size: Sequence[int], rng: np.random.Generator
             ) -> torch.Tensor:
        """One augmented view ``[C, *CROP_SIZE]`` of the region ``[start, start + size)``."""
        x = self.view_hu(hu, start, size, rng)
        out = augment_crop(x, self.specs, self.augment, rng)  # [C, D, H, W] in [0, 1]
        hist = self.draw_histogram(rng)
        return apply_histogram_curve(out, hist[1:1 + int(hist[0])]) if hist[0] > 0 else out

    def __call__(self, hu: np.ndarray, meta: Optional[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        if hu.ndim != 3 or min(hu.shape) < 1:
            where = (meta or {}).get("path", "the scan")
            raise ValueError(f"{where}: SimCLR views need a non-empty 3D array; got shape {tuple(hu.shape)}")
        regions = [r for r in self.regions(hu, meta, rng) for _ in range(2)]
        if not self.device_stage:
            return {"views": torch.stack([self.view(hu, start, size, rng) for start, size in regions])}  # [V, C, *CROP]
        n = len(regions)
        crops = torch.empty((n,) + self.crop, dtype=torch.float16)  # [V, *CROP_SIZE] HU, resized, not filtered
        params = torch.empty((n, len(AUG_FIELDS)))
        hist = torch.empty((n, 1 + int(self.augment.hist_points[1])), dtype=torch.float64)
        for i, (start, size) in enumerate(regions):  # the draws of view(), in its order
            crops[i].copy_(self.view_hu(hu, start, size, rng))
            params[i] = draw_augment(self.augment, rng)
            hist[i] = torch.from_numpy(self.draw_histogram(rng))
        return {"views": crops, "views_aug": params, "views_hist": hist}

    def batch_transform(self, batch: dict) -> dict:
        """The device stage (a no-op unless the batch came from ``device_stage=True``)."""
        return simclr_batch_transform(batch, self.specs)

    def __repr__(self) -> str:
        return (f"SimCLRViews(mode={self.mode!r}, views={self.num_views}, crop={self.crop}, scale={self.scale}, "
                f"windows={self.specs}, device_stage={self.device_stage})")


def simclr_batch_transform(batch: dict, specs: Sequence[tuple[float, float]]) -> dict:
    """Finish a device-stage SimCLR batch (see :class:`SimCLRViews`) where it lies (the GPU).

    ``batch["views"] [B, V, D, H, W]`` HU + ``"views_aug" [B, V, 11]`` (:data:`AUG_FIELDS`) +
    ``"views_hist" [B, V, 1 + P]`` -> ``batch["views"] [B, V, C, D, H, W]`` float32: blur, noise,
    intensity, windowing (:func:`filter_batch`, :func:`window_batch`) and histogram shift, as the
    workers do without a device stage. A batch without ``"views_aug"`` is returned unchanged.

    Args:
        batch: a collated batch (on the device where the work should run).
        specs: windows ``[(center, width)]`` (``DATA.WINDOWS``).
    """
    if "views_aug" not in batch:
        return batch
    out = dict(batch)
    hu, params, hist = out["views"], out.pop("views_aug"), out.pop("views_hist")
    b, v = hu.shape[:2]
    spatial = tuple(hu.shape[2:])
    p = params.reshape(b * v, -1)
    x = window_batch(filter_batch(hu.reshape((b * v,) + spatial).float(), p), p, specs)  # [N, C, *S]
    h = hist.reshape(b * v, -1).cpu()
    for i in torch.nonzero(h[:, 0] > 0).flatten().tolist():
        x[i] = apply_histogram_curve(x[i], h[i, 1:1 + int(h[i, 0])])
    out["views"] = x.reshape((b, v, len(specs)) + spatial)
    return out


def views_per_scan(mode: str, patches_per_scan: int = 1) -> int:
    """V of :class:`SimCLRViews`: 2 (inter), 2 * patches (intra), 4 (negative_mined)."""
    if mode == "inter":
        return 2
    if mode == "intra":
        return 2 * int(patches_per_scan)
    if mode == "negative_mined":
        return 4
    raise ValueError(f"SIMCLR.MODE = {mode!r}; expected 'inter', 'intra' or 'negative_mined'")
