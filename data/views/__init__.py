"""Views: what a method sees of one preprocessed scan.

A view is a callable ``view(hu, meta, rng) -> dict[str, torch.Tensor]``:

* ``hu``: the preprocessed HU array ``[X, Y, Z]`` (an int16 memmap from the cache, or float32);
* ``meta``: ``{"spacing", "affine", "coord" (world mm [3] or None), "path", "id"}`` of that array;
* ``rng``: a ``np.random.Generator`` seeded from ``(SEED, epoch, index)`` by the dataset.

Views draw ONLY from ``rng`` (no global numpy / torch randomness), so a sample is a pure function
of ``(SEED, epoch, index)`` and resuming reproduces it exactly. To stay fast they cut their crops
from ``hu`` before converting anything (a memmap is never read whole) and window only the crops.

One module per reason to change:

==============  =====================================================================================
``single``      :class:`SingleView` (MAE, downstream), :func:`window_tensor`, :func:`random_flip`
``dino``        :class:`DINOViews`: multi-crop, global and local crops
``alice``       :class:`AliceViews`: the same anatomy in two scans, matched through a template
``simclr``      :class:`SimCLRViews`: positive pairs per ``SIMCLR.MODE``
``geometry``    random boxes and resized crops (DINO, SimCLR), seed points and negative regions
``augment``     per-crop augmentation: parameters, draw, application (:func:`filter_batch`, ...)
``intensity``   array logic of blur, noise bank and histogram shift
``device``      the device stage: batch wrappers that finish HU crops on the GPU
==============  =====================================================================================

``from data.views import X`` serves every public name of these modules.
"""
from data.views.alice import AliceViews, centered_crop
from data.views.augment import (AUG_FIELDS, CropAugment, augment_crop, draw_augment, filter_batch,
                                window_batch)
from data.views.device import crops_from_heads, dino_batch_transform, simclr_batch_transform
from data.views.dino import DINO_GLOBAL_AUGMENTS, DINO_LOCAL_AUGMENT, DINOViews
from data.views.geometry import (DINO_MAX_ASPECT, SIMCLR_MAX_TRIES, random_head_voxel, resized_crop,
                                 sample_crop_box, sample_negative_center, world_to_voxel)
from data.views.intensity import (NOISE_BANK_MARGIN, NOISE_BANK_SEED, apply_histogram_curve,
                                  draw_histogram_curve, gaussian_blur3, histogram_shift, noise_field,
                                  noise_window)
from data.views.simclr import SIMCLR_AUGMENT, SimCLRAugment, SimCLRViews, views_per_scan
from data.views.single import SingleView, random_flip, window_tensor

__all__ = [
    "AUG_FIELDS", "AliceViews", "CropAugment", "DINOViews", "DINO_GLOBAL_AUGMENTS", "DINO_LOCAL_AUGMENT",
    "DINO_MAX_ASPECT", "NOISE_BANK_MARGIN", "NOISE_BANK_SEED", "SIMCLR_AUGMENT", "SIMCLR_MAX_TRIES",
    "SimCLRAugment", "SimCLRViews", "SingleView", "apply_histogram_curve", "augment_crop", "centered_crop",
    "crops_from_heads", "dino_batch_transform", "draw_augment", "draw_histogram_curve", "filter_batch",
    "gaussian_blur3", "histogram_shift", "noise_field", "noise_window", "random_flip", "random_head_voxel",
    "resized_crop", "sample_crop_box", "sample_negative_center", "simclr_batch_transform", "views_per_scan",
    "window_batch", "window_tensor", "world_to_voxel"
]
