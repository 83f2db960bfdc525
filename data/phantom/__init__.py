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

Modules, in the order they build on each other:

=====================  ====================================================================
``geometry``           field of view, spacing and affine, texture grids, vector helpers
``anatomy``            tissue codes, canonical brain atlas, a patient's random anatomy
``scanner``            pose, head holder, point-spread blur and noise of a series
``lesions``            lesion kinds and labels, and the shape of each kind in the head
``render``             head-frame points -> tissues, lesions, HU; a series -> a volume
``lesion_sampling``    which lesions a patient has, where and how big
``nifti``              int16 NIfTI files in HU
``dataset``            ``make_phantom`` (one volume), ``write_dataset`` (volumes + manifests), ``make_template``
``cli``                ``python -m data.phantom`` (``__main__``)
=====================  ====================================================================
"""
from data.phantom.anatomy import Anatomy, sample_anatomy, tissue_masks_of
from data.phantom.cli import main
from data.phantom.dataset import (COORD_COLUMNS, CSV_COLUMNS, LESION_VALUES, SECOND_SERIES_PROB, TEMPLATE_SEED,
                                  make_phantom, make_template,
                                  plan_dataset, write_dataset)
from data.phantom.geometry import FOV_MM, phantom_affine, spacing_for_size
from data.phantom.lesion_sampling import sample_lesion_kinds, sample_lesions
from data.phantom.lesions import (LABEL_COLUMNS, LESION_BITS, LESION_KINDS, OVERRIDE_KEYS,
                                  SUBTYPE_PROB, SUBTYPES, Lesion)
from data.phantom.nifti import save_nifti
from data.phantom.render import render
from data.phantom.scanner import Pose, Scan, sample_pose, sample_scan

__all__ = [
    "Anatomy", "COORD_COLUMNS", "CSV_COLUMNS", "FOV_MM", "LABEL_COLUMNS", "LESION_BITS", "LESION_KINDS",
    "LESION_VALUES", "Lesion", "OVERRIDE_KEYS", "Pose", "SECOND_SERIES_PROB", "SUBTYPES", "SUBTYPE_PROB", "Scan",
    "TEMPLATE_SEED", "main", "make_phantom", "make_template", "phantom_affine", "plan_dataset", "render",
    "sample_anatomy", "sample_lesion_kinds",
    "sample_lesions", "sample_pose", "sample_scan", "save_nifti", "spacing_for_size", "tissue_masks_of",
    "write_dataset",
]
