"""Alice views: crops of the same anatomy in two scans through their template transforms, the same-scan
fallback, the padded centred crop, the size check, and the dataset's partner draw."""
import numpy as np
import pytest
import torch

from config import get_defaults
from data.datasets import VolumeDataset, collate
from data.manifest import Manifest
from data.views import AliceViews, CropAugment, centered_crop

from tests.data.test_datasets import setup_scans

NO_AUG = (CropAugment(flip_p=0.0, intensity_p=0.0, gamma_p=0.0, blur_p=0.0),) * 2


def cfg_(**alice):
    cfg = get_defaults()
    cfg.DATA.ROI = [8, 8, 8]
    cfg.DATA.WINDOWS = ["brain"]
    cfg.DATA.SPACING = [2.0, 2.0, 2.0]
    cfg.ALICE.CROP_SCALE = [1.0, 1.0]
    cfg.DATA.TEMPLATE = "identity"  # the tests hand each scan's transform in meta["template"] themselves
    for k, v in alice.items():
        cfg.ALICE[k] = v
    return cfg


def textured_head(shape=(30, 30, 30), seed=0) -> np.ndarray:
    """A ball of soft tissue (HU 0..80, a different value at every voxel) in air."""
    grid = np.indices(shape, dtype=np.float32)
    r = np.sqrt(sum((g - (n - 1) / 2) ** 2 for g, n in zip(grid, shape)))
    tex = np.random.default_rng(seed).uniform(0, 80, shape).astype(np.float32)
    return np.where(r < 0.45 * min(shape), tex, -1000.0).astype(np.float32)


def translation(offset) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = offset
    return t


def shifted_pair(offset=(3, -2, 4)):
    """Scan B holds scan A moved by ``offset`` voxels (affines = identity: 1 voxel = 1 mm); the template frame
    is A's world, so B's scan -> template transform is the translation by -offset."""
    a = textured_head()
    b = np.full((40, 40, 40), -1000.0, dtype=np.float32)
    o = np.asarray(offset) + 5
    b[o[0]:o[0] + 30, o[1]:o[1] + 30, o[2]:o[2] + 30] = a
    meta_a = {"affine": np.eye(4), "template": np.eye(4), "path": "a.nii.gz"}
    meta_b = {"affine": np.eye(4), "template": translation(-o), "path": "b.nii.gz"}
    return a, meta_a, b, meta_b


def test_centered_crop_reads_the_box_and_pads_with_air():
    hu = np.arange(10 ** 3, dtype=np.float32).reshape(10, 10, 10)
    inside = centered_crop(hu, [5, 5, 5], [3, 3, 3], [3, 3, 3])
    assert torch.equal(inside, torch.from_numpy(hu[4:7, 4:7, 4:7]))  # odd size: centred exactly
    even = centered_crop(hu, [5.2, 5.2, 4.8], [4, 4, 4], [4, 4, 4])  # box centre within half a voxel
    assert torch.equal(even, torch.from_numpy(hu[4:8, 4:8, 3:7]))
    edge = centered_crop(hu, [0, 5, 5], [3, 3, 3], [3, 3, 3])
    assert (edge[:1] == -1024).all() and torch.equal(edge[1:], torch.from_numpy(hu[0:2, 4:7, 4:7]))
    assert (centered_crop(hu, [50, 5, 5], [4, 4, 4], [4, 4, 4]) == -1024).all()  # all outside
    assert centered_crop(hu, [5, 5, 5], [6, 6, 6], [4, 4, 4]).shape == (4, 4, 4)  # resized
    with pytest.raises(ValueError, match="crop sizes"):
        centered_crop(hu, [5, 5, 5], [0, 4, 4], [4, 4, 4])


def test_cross_scan_crops_show_the_same_anatomy():
    a, meta_a, b, meta_b = shifted_pair()
    view = AliceViews(cfg_(), augments=NO_AUG)
    for seed in range(5):
        out = view(a, meta_a, np.random.default_rng(seed), partner=(b, meta_b))
        assert float(out["cross"]) == 1.0
        assert out["query"].shape == out["anchor"].shape == (1, 8, 8, 8)
        assert torch.equal(out["query"], out["anchor"])  # the centre in B is the matched point of A's centre


def test_a_wrong_transform_gives_other_anatomy():
    a, meta_a, b, meta_b = shifted_pair()
    meta_b = dict(meta_b, template=translation([-4, -4, -4]))  # off by a few voxels
    out = AliceViews(cfg_(), augments=NO_AUG)(a, meta_a, np.random.default_rng(0), partner=(b, meta_b))
    assert not torch.equal(out["query"], out["anchor"])


@pytest.mark.parametrize("case", ["no partner", "no template", "partner without template", "prob 0"])
def test_same_scan_views_when_no_match_is_possible(case):
    a, meta_a, b, meta_b = shifted_pair()
    cfg = cfg_(CROSS_SCAN_PROB=0.0 if case == "prob 0" else 1.0)
    if case == "no template":
        meta_a = dict(meta_a, template=None)
    if case == "partner without template":
        meta_b = dict(meta_b, template=None)
    partner = None if case == "no partner" else (b, meta_b)
    out = AliceViews(cfg, augments=NO_AUG)(a, meta_a, np.random.default_rng(0), partner=partner)
    assert float(out["cross"]) == 0.0
    assert out["query"].shape == out["anchor"].shape == (1, 8, 8, 8)


def test_same_seed_same_views_and_augmentations_differ_between_views():
    a, meta_a, b, meta_b = shifted_pair()
    view = AliceViews(cfg_(CROP_SCALE=[0.75, 1.25]))
    x = view(a, meta_a, np.random.default_rng(7), partner=(b, meta_b))
    y = view(a, meta_a, np.random.default_rng(7), partner=(b, meta_b))
    assert all(torch.equal(x[k], y[k]) for k in x)
    z = view(a, meta_a, np.random.default_rng(8), partner=(b, meta_b))
    assert not torch.equal(x["query"], z["query"])


def test_a_crop_larger_than_the_scan_names_the_keys_and_a_small_partner_is_not_used():
    from data.io import BadInputError
    small = textured_head((6, 30, 30))
    with pytest.raises(BadInputError, match=r"a.nii.gz.*DATA.ROI \[8, 8, 8\] x ALICE.CROP_SCALE\[0\] 1.0"):
        AliceViews(cfg_())(small, {"affine": np.eye(4), "template": None, "path": "a.nii.gz"},
                           np.random.default_rng(0))
    a, meta_a, _, meta_b = shifted_pair()
    out = AliceViews(cfg_())(a, meta_a, np.random.default_rng(0), partner=(small, meta_b))
    assert float(out["cross"]) == 0.0


def test_a_config_that_can_never_match_is_refused():
    from config import ConfigError
    cfg = cfg_()
    cfg.DATA.TEMPLATE = ""
    with pytest.raises(ConfigError, match="DATA.TEMPLATE = ''"):
        AliceViews(cfg)
    cfg.DATA.TEMPLATE, cfg.DATA.CACHE_DIR = "template.nii.gz", ""
    with pytest.raises(ConfigError, match="DATA.CACHE_DIR = ''"):
        AliceViews(cfg)
    cfg.ALICE.CROSS_SCAN_PROB = 0.0  # same-scan views on purpose: no partner is even loaded
    assert not AliceViews(cfg).needs_partner
    cfg.DATA.TEMPLATE = "identity"
    cfg.ALICE.CROSS_SCAN_PROB = 1.0
    assert AliceViews(cfg).needs_partner


class PartnerSpy:
    """A view that records which partner the dataset handed over."""

    needs_partner = True

    def __call__(self, hu, meta, rng, partner=None):
        return {"partner_id": partner[1]["id"] if partner is not None else "", "x": torch.zeros(1)}


def test_dataset_draws_a_partner_from_another_row(tmp_path):
    csv = setup_scans(tmp_path, n=4)
    cfg = get_defaults()
    cfg.DATA.SPACING = [6.0, 6.0, 6.0]
    ds = VolumeDataset(Manifest.read(csv), cfg, PartnerSpy())
    seen = {}
    for epoch in range(3):
        for i in range(4):
            s = ds[(i, epoch)]
            assert s["partner_id"] and s["partner_id"] != s["id"]
            seen.setdefault(s["id"], set()).add(s["partner_id"])
            assert ds[(i, epoch)]["partner_id"] == s["partner_id"]  # a function of (SEED, epoch, index)
    assert any(len(v) > 1 for v in seen.values())


def test_a_scan_the_view_refuses_is_skipped_like_an_unreadable_one(tmp_path):
    csv = setup_scans(tmp_path, n=3)
    cfg = get_defaults()
    cfg.DATA.SPACING = [6.0, 6.0, 6.0]  # 32 voxels of 3 mm -> about 16: smaller than a 24^3 crop
    cfg.DATA.TEMPLATE, cfg.DATA.ROI, cfg.ALICE.CROP_SCALE = "identity", [24, 24, 24], [1.0, 1.0]
    from data.io import BadInputError
    with pytest.raises(BadInputError, match="ct0.nii.gz.*smaller than the smallest Alice crop"):
        VolumeDataset(Manifest.read(csv), cfg, AliceViews(cfg))[0]
    cfg.DATA.ON_ERROR, cfg.DATA.MAX_BAD_FRACTION = "skip", 1.0
    from data.io import TooManyBadInputs
    with pytest.raises(TooManyBadInputs, match="3 consecutive rows"):  # every row refused: listed, then stopped
        VolumeDataset(Manifest.read(csv), cfg, AliceViews(cfg))[0]


def test_a_bad_partner_is_skipped_and_listed_or_raises(tmp_path):
    csv = setup_scans(tmp_path, n=2, broken=(1,))
    cfg = get_defaults()
    cfg.DATA.SPACING = [6.0, 6.0, 6.0]
    from data.io import BadInputError
    with pytest.raises(BadInputError, match="ct1.nii.gz"):
        VolumeDataset(Manifest.read(csv), cfg, PartnerSpy())[0]
    cfg.DATA.ON_ERROR = "skip"
    s = VolumeDataset(Manifest.read(csv), cfg, PartnerSpy())[0]
    assert s["partner_id"] == "" and [p for p, _ in s["skipped"]] == [str(tmp_path / "ct1.nii.gz")]
    assert collate([s])["skipped"] == s["skipped"]
