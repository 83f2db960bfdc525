"""Registration to a head-CT template (data/registration.py) and its place in the preprocessing cache.

Small volumes (one phantom of 120^3 at 2 mm, registered at 4 mm) keep each test to a few seconds on one core.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from data.registration import (Registration, load_template, map_voxel, register_to_template, scale_and_shear,
                               template_from_array)

SIZE = 120  # phantom voxels per edge: 2 mm (block-averaged to 4 mm for registration)


def _rotation(deg: tuple[float, float, float]) -> np.ndarray:
    rx, ry, rz = np.radians(deg)
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return z @ y @ x


def _known_affine(rng: np.random.Generator) -> np.ndarray:
    """A random template_world <- scan_world map: ~10 deg, ~10 mm, ~5 % scale per axis."""
    m = np.eye(4)
    m[:3, :3] = _rotation(tuple(rng.uniform(-10, 10, 3))) @ np.diag(rng.uniform(0.95, 1.05, 3))
    m[:3, 3] = rng.uniform(-10, 10, 3)
    return m


def _moved(hu: np.ndarray, affine: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The head seen by a scan on the same grid whose world is mapped to the template's by ``m``."""
    vox = np.linalg.inv(affine) @ m @ affine  # scan voxel -> template voxel
    return ndimage.affine_transform(hu, vox[:3, :3], vox[:3, 3], order=1, cval=-1024.0).astype(np.float32)


@pytest.fixture(scope="module")
def phantom():
    from data.phantom import make_phantom

    hu, affine, _, masks = make_phantom(3, SIZE, {})
    return hu, affine, masks["brain"]


def _non_head(size: int = SIZE) -> np.ndarray:
    """A plastic cylinder with a denser box inside (soft-tissue and bone-like values, no head)."""
    x, y, z = np.mgrid[:size, :size, :size].astype(np.float32) - size / 2
    box = np.full((size, size, size), -1000.0, np.float32)
    box[(x ** 2 + y ** 2 < (size * 0.18) ** 2) & (np.abs(z) < size * 0.42)] = 40.0
    box[size // 3:size // 2, size // 2:size * 7 // 12, size // 6:size * 5 // 6] = 300.0
    return box


def _surface_world(brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    edge = brain & ~ndimage.binary_erosion(brain)
    vox = np.argwhere(edge).astype(np.float64)
    return vox @ affine[:3, :3].T + affine[:3, 3]  # [N, 3] world mm


def test_phantom_recovers_a_known_affine_within_2mm_at_the_brain_surface(phantom):
    hu, affine, brain = phantom
    template = template_from_array(hu, affine)
    rng = np.random.default_rng(0)
    for _ in range(1):
        truth = _known_affine(rng)
        reg = register_to_template(_moved(hu, affine, truth), affine, template)
        assert reg.ok, reg.reason
        assert reg.similarity > 0.75
        surface_t = _surface_world(brain, affine)  # brain surface, template world
        surface_s = (surface_t - truth[:3, 3]) @ np.linalg.inv(truth[:3, :3]).T  # the same points, scan world
        got = surface_s @ reg.to_template[:3, :3].T + reg.to_template[:3, 3]
        err = np.linalg.norm(got - surface_t, axis=1)
        assert err.max() < 2.0, (err.mean(), err.max())


def test_identity_and_scale_decomposition(phantom):
    hu, affine, _ = phantom
    reg = register_to_template(hu, affine, template_from_array(hu, affine))
    assert reg.ok and reg.similarity > 0.97
    assert np.allclose(reg.to_template[:3, :3], np.eye(3), atol=0.02)
    assert np.allclose(reg.to_template[:3, 3], 0, atol=1.0)
    scales, shears, det = scale_and_shear(np.diag([1.1, 0.9, 1.0, 1.0]))
    assert np.allclose(scales, [1.1, 0.9, 1.0]) and np.allclose(shears, 0) and det > 0


def test_empty_and_non_head_volumes_are_refused(phantom):
    hu, affine, _ = phantom
    template = template_from_array(hu, affine)
    air = np.full((48, 48, 40), -1024.0, np.float32)
    reg = register_to_template(air, affine, template)
    assert not reg.ok and "brain window" in reg.reason
    reg = register_to_template(_non_head(), affine, template)
    assert not reg.ok and reg.reason, reg
    assert isinstance(reg, Registration) and reg.to_json()["ok"] is False


def test_bad_arguments_raise(phantom):
    hu, affine, _ = phantom
    template = template_from_array(hu, affine)
    with pytest.raises(ValueError, match="3D"):
        register_to_template(hu[0], affine, template)
    with pytest.raises(ValueError, match="4x4"):
        register_to_template(hu, affine[:3], template)
    with pytest.raises(ValueError, match="brain window"):
        template_from_array(np.full((20, 20, 20), -1000.0), affine)


def test_map_voxel_round_trip():
    rng = np.random.default_rng(1)
    aff_a = np.diag([1.2, 1.0, 1.5, 1.0])
    aff_a[:3, 3] = [-80, -90, -60]
    aff_b = np.diag([1.0, 1.1, 1.0, 1.0])
    aff_b[:3, 3] = [-70, -100, -50]
    m_a, m_b = _known_affine(rng), _known_affine(rng)
    vox = rng.uniform(0, 100, (20, 3))
    in_b = map_voxel(vox, aff_a, m_a, aff_b, m_b)
    back = map_voxel(in_b, aff_b, m_b, aff_a, m_a)
    assert in_b.shape == (20, 3) and np.allclose(back, vox)
    one = map_voxel(vox[0], aff_a, m_a, aff_b, m_b)
    assert one.shape == (3,) and np.allclose(one, in_b[0])
    # both scans at the same template place: the same world point
    world_a = aff_a[:3, :3] @ vox[0] + aff_a[:3, 3]
    world_b = aff_b[:3, :3] @ map_voxel(vox[0], aff_a, np.eye(4), aff_b, np.eye(4)) + aff_b[:3, 3]
    assert np.allclose(world_a, world_b)
    with pytest.raises(ValueError):
        map_voxel(np.zeros((2, 2)), aff_a, m_a, aff_b, m_b)


# ---------------------------------------------------------------------------------------------
# the preprocessing cache with DATA.TEMPLATE

ATLAS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "head_atlas" / "ct_brain_atlas_1mm.nii.gz"
KEY_WITHOUT_TEMPLATE = "2e84bcf9d29ab337"  # cache key of the defaults at DATA.SPACING 2 mm, before registration existed


def _cfg(tmp_path, csv_path, template=""):
    from config import get_defaults

    cfg = get_defaults()
    cfg.DATA.TRAIN_CSV = str(csv_path)
    cfg.DATA.CACHE_DIR = str(tmp_path / "cache")
    cfg.DATA.SPACING = [2.0, 2.0, 2.0]
    cfg.DATA.NUM_WORKERS = 0
    cfg.DATA.TEMPLATE = str(template)
    return cfg


def test_cache_key_without_template_is_unchanged_and_with_one_differs(tmp_path, phantom):
    from data.cache import cache_key, preprocess_params
    from data.phantom import save_nifti

    cfg = _cfg(tmp_path, "x.csv")
    assert cache_key(cfg) == KEY_WITHOUT_TEMPLATE and "template" not in preprocess_params(cfg)
    hu, affine, _ = phantom
    save_nifti(tmp_path / "t.nii.gz", hu, affine)
    with_t = _cfg(tmp_path, "x.csv", tmp_path / "t.nii.gz")
    params = preprocess_params(with_t)
    assert params["template"]["path"] == str(tmp_path / "t.nii.gz") and len(params["template"]["sha1"]) == 40
    assert cache_key(with_t) != KEY_WITHOUT_TEMPLATE
    stricter = with_t.clone()
    stricter.DATA.TEMPLATE_MIN_SIMILARITY = 0.9
    assert cache_key(stricter) != cache_key(with_t)
    with pytest.raises(ValueError, match="DATA.TEMPLATE"):
        preprocess_params(_cfg(tmp_path, "x.csv", tmp_path / "missing.nii.gz"))
    import shutil
    (tmp_path / "moved").mkdir()
    shutil.copy(tmp_path / "t.nii.gz", tmp_path / "moved" / "t.nii.gz")  # the same bytes elsewhere: the same key
    assert cache_key(_cfg(tmp_path, "x.csv", tmp_path / "moved" / "t.nii.gz")) == cache_key(with_t)
    identity = _cfg(tmp_path, "x.csv", "identity")  # nothing registered: the key of a cache without a template
    assert cache_key(identity) == KEY_WITHOUT_TEMPLATE


def test_preprocess_registers_lists_refused_and_resumes(tmp_path, phantom):
    from data.cache import REGISTRATION_CSV, preprocess_manifests, read_template
    from data.phantom import save_nifti

    hu, affine, _ = phantom
    save_nifti(tmp_path / "template.nii.gz", hu, affine)
    rng = np.random.default_rng(2)
    truth = _known_affine(rng)
    save_nifti(tmp_path / "head.nii.gz", _moved(hu, affine, truth), affine)
    save_nifti(tmp_path / "cylinder.nii.gz", _non_head(), affine)
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("img_path\nhead.nii.gz\ncylinder.nii.gz\n")
    cfg = _cfg(tmp_path, csv_path, tmp_path / "template.nii.gz")
    lines = []
    summary = preprocess_manifests(cfg, progress=False, log=lines.append)
    assert summary["done"] == 2 and summary["bad"] == 0
    assert summary["registered"] == 1 and summary["registration_refused"] == 1
    assert "1 accepted, 1 refused" in lines[-1] and REGISTRATION_CSV in lines[-1]
    root = Path(summary["root"])
    head, cylinder = str(tmp_path / "head.nii.gz"), str(tmp_path / "cylinder.nii.gz")
    m = read_template(root, head)
    assert m.shape == (4, 4) and np.allclose(m[:3, 3], truth[:3, 3], atol=2.0)
    assert read_template(root, cylinder) is None
    from data.cache import entry_path
    meta = json.loads(entry_path(root, head).with_suffix(".json").read_text())
    assert set(meta["template"]) == {"to_template", "similarity", "ok", "reason", "seconds"}
    assert meta["template"]["ok"] and meta["template"]["similarity"] > 0.5
    with open(root / REGISTRATION_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [cylinder] and rows[0]["reason"]
    # resumed: nothing redone, the refused scan still listed and counted
    again = preprocess_manifests(cfg, progress=False, log=lines.append)
    assert again["already_done"] == 2 and again["done"] == 0
    assert again["registered"] == 1 and again["registration_refused"] == 1
    with open(root / REGISTRATION_CSV, newline="") as f:
        assert [r["path"] for r in csv.DictReader(f)] == [cylinder]
    # without a template: another cache folder, entries without registration
    plain = preprocess_manifests(_cfg(tmp_path, csv_path), progress=False, log=lines.append)
    assert "registered" not in plain and read_template(plain["root"], head) is None
    assert not (Path(plain["root"]) / REGISTRATION_CSV).exists()


@pytest.mark.skipif(not ATLAS.exists(), reason="the head-CT atlas of the shared data is not here")
def test_load_template_of_the_atlas():
    t = load_template(ATLAS)
    assert t.full_shape == (202, 202, 179) and len(t.sha1) == 40
    assert t.image.shape == (50, 50, 44) and 0.1 < t.region.mean() < 0.6
    np.testing.assert_allclose(np.linalg.norm(t.affine[:3, :3], axis=0), 4.0)
