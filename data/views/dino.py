"""DINO multi-crop views: global and local random-resized crops, each with its own augmentation."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from data.views.augment import AUG_FIELDS, CropAugment, augment_crop, draw_augment
from data.views.device import dino_batch_transform
from data.views.geometry import DINO_MAX_ASPECT, resized_crop, sample_crop_box
from data.windows import window_specs

# As DINO: the first global view always blurred, the second rarely blurred but noised
# (DINO's solarisation slot), local views blurred half of the time.
DINO_GLOBAL_AUGMENTS = (CropAugment(blur_p=1.0, noise_p=0.0), CropAugment(blur_p=0.1, noise_p=0.5))
DINO_LOCAL_AUGMENT = CropAugment(blur_p=0.5, noise_p=0.0)


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
