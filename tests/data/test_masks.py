"""Label maps: reading and refusing bad ones, aligning to the image grid, preprocessing with the image,
mapping back to the source grid (RAS and LPS), the cache storing masks beside images, the segmentation view."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data import cache as cache_lib
from data.datasets import VolumeDataset
from data.io import BadInputError, Volume
from data.manifest import Manifest
from data.masks import align_mask, labels_to_grid, preprocess_pair, read_mask, world_box
from data.views.segment import SegmentView, map_classes


def save(path: Path, arr: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return str(path)


def head(shape=(20, 18, 16)) -> tuple[np.ndarray, np.ndarray]:
    """A box 'head' of 40 HU in air and a label map with two classes inside it."""
    hu = np.full(shape, -1000, np.int16)
    hu[3:17, 3:15, 2:14] = 40
    lab = np.zeros(shape, np.uint8)
    lab[5:9, 6:10, 4:8] = 1
    lab[10:12, 5:7, 9:12] = 2
    return hu, lab


LPS = np.array([[-2.0, 0, 0, 30], [0, -2.0, 0, 40], [0, 0, 3.0, -20], [0, 0, 0, 1]])


def test_read_mask_refuses_missing_and_non_integer(tmp_path):
    with pytest.raises(BadInputError, match="does not exist .row 4 \\(id x\\) of a.csv"):
        read_mask(tmp_path / "nope.nii.gz", "row 4 (id x) of a.csv")
    bad = np.zeros((4, 4, 4), np.float32)
    bad[1, 1, 1] = 0.5
    p = save(tmp_path / "f.nii.gz", bad, np.eye(4))
    with pytest.raises(BadInputError, match=r"non-integer voxels .*\[0\.5\]") as e:
        read_mask(p, "row 1 (id f) of b.csv")
    assert e.value.path == p and "row 1 (id f) of b.csv" in str(e.value)
    ok = save(tmp_path / "i.nii.gz", np.full((4, 4, 4), 2.0, np.float32), np.eye(4))
    assert read_mask(ok).array.dtype == np.int32 and (read_mask(ok).array == 2).all()


def test_align_mask_same_grid_coarser_grid_and_refusals(tmp_path):
    hu, lab = head()
    image = Volume(hu.astype(np.float32), LPS, (2.0, 2.0, 3.0))
    assert align_mask(Volume(lab.astype(np.int32), LPS, (2, 2, 3)), image, "m") is not None
    # the same labels stored at half the resolution along x, same world box: nearest neighbour gives them back
    coarse_aff = LPS @ np.diag([2.0, 1, 1, 1])
    coarse_aff[:3, 3] = LPS[:3, 3] + LPS[:3, 0] * 0.5  # first coarse voxel centre between fine voxels 0 and 1
    coarse = lab[::2]
    got = align_mask(Volume(coarse.astype(np.int32), coarse_aff, (4, 2, 3)), image, "m")
    np.testing.assert_array_equal(got, np.repeat(coarse, 2, axis=0))
    # orientation differs (RAS storage of an LPS image): refused, both named
    ras = np.diag([2.0, 2.0, 3.0, 1])
    with pytest.raises(BadInputError, match="orientation RAS differs from its image's LPS .row 2"):
        align_mask(Volume(lab.astype(np.int32), ras, (2, 2, 3)), image, "m.nii.gz", "row 2")
    # shifted by 0.75 voxel along z: beyond half a voxel
    shifted = LPS.copy()
    shifted[2, 3] += 0.75 * 3.0
    with pytest.raises(BadInputError, match="world box .* more than half a voxel"):
        align_mask(Volume(lab.astype(np.int32), shifted, (2, 2, 3)), image, "m.nii.gz")
    # a shift of a quarter voxel is within tolerance (nearest neighbour)
    ok = LPS.copy()
    ok[2, 3] += 0.25 * 3.0
    assert align_mask(Volume(lab.astype(np.int32), ok, (2, 2, 3)), image, "m").shape == lab.shape


def test_preprocess_pair_and_back_to_the_lps_source_grid():
    hu, lab = head()
    vol = Volume(hu.astype(np.float32), LPS, (2.0, 2.0, 3.0))
    out, lab_p = preprocess_pair(vol, lab, [1.0, 1.0, 1.5], -300)
    assert out.array.shape == lab_p.shape
    assert np.allclose(np.diag(out.affine)[:3], [1.0, 1.0, 1.5])  # RAS, resampled
    # every preprocessed label voxel lies where the source label is, in world coordinates
    idx = np.argwhere(lab_p == 2)
    world = idx @ out.affine[:3, :3].T + out.affine[:3, 3]
    src = np.rint((world - LPS[:3, 3]) @ np.linalg.inv(LPS[:3, :3]).T).astype(int)
    assert (lab[tuple(src.T)] == 2).all()
    back = labels_to_grid(lab_p, out.affine, hu.shape, LPS)  # nearest neighbour back: exact
    np.testing.assert_array_equal(back, lab)
    lo, hi = world_box(hu.shape, LPS)
    np.testing.assert_allclose(hi - lo, [40, 36, 48])


def test_cache_stores_masks_beside_images_and_dataset_reads_them(tmp_path):
    from config import get_defaults
    hu, lab = head()
    img = save(tmp_path / "a.nii.gz", hu, LPS)
    coarse_aff = LPS @ np.diag([2.0, 1, 1, 1])
    coarse_aff[:3, 3] = LPS[:3, 3] + LPS[:3, 0] * 0.5
    msk = save(tmp_path / "a_mask.nii.gz", lab[::2], coarse_aff)  # another grid, same world box
    (tmp_path / "m.csv").write_text(f"img_path,mask_path\n{img},{msk}\n")
    cfg = get_defaults()
    cfg.DATA.SPACING, cfg.DATA.CACHE_DIR, cfg.DATA.TRAIN_CSV = [1.0, 1.0, 1.5], str(tmp_path / "cache"), \
        str(tmp_path / "m.csv")
    cfg.DATA.ROI, cfg.DATA.WINDOWS, cfg.DOWNSTREAM.SEG_CLASSES = [16, 16, 16], ["brain"], [2]
    m = Manifest.read(tmp_path / "m.csv")
    cfg.DATA.CACHE_DIR = ""
    direct = VolumeDataset(m, cfg, lambda h, meta, rng: meta, masks=True)[0]
    cfg.DATA.CACHE_DIR = str(tmp_path / "cache")
    summary = cache_lib.preprocess_manifests(cfg, num_workers=0, progress=False, log=lambda s: None)
    assert summary["done"] == 1
    root = cache_lib.cache_root(cfg)
    npy = cache_lib.mask_entry_path(root, img, msk)
    assert npy.parent == cache_lib.entry_path(root, img).parent and npy.exists()
    assert cache_lib.read_mask_entry(root, img, msk)[1] == [0, 1, 2]
    cached = VolumeDataset(m, cfg, lambda h, meta, rng: meta, masks=True)[0]
    np.testing.assert_array_equal(np.asarray(cached["mask"]), direct["mask"])
    np.testing.assert_allclose(cached["affine"], direct["affine"])
    # a view of that row: the whole volume for evaluation, a foreground-centred crop for training
    view = SegmentView(cfg, train=False)
    sample = view(np.zeros(direct["mask"].shape, np.float32), direct, np.random.default_rng(0))
    assert set(np.unique(sample["target"].numpy())) == {0, 1}  # value 2 -> class 1, value 1 -> background
    cfg.DOWNSTREAM.SEG_FOREGROUND_PROB = 1.0
    train = SegmentView(cfg, train=True)
    for seed in range(5):
        s = train(np.zeros(direct["mask"].shape, np.float32), direct, np.random.default_rng(seed))
        assert s["image"].shape == (1, 16, 16, 16) and s["target"].shape == (1, 16, 16, 16)
        assert (s["target"] == 1).any()  # the small class is always in the crop


def test_dataset_names_the_row_of_a_missing_or_mismatched_mask(tmp_path):
    from config import get_defaults
    hu, lab = head()
    img = save(tmp_path / "a.nii.gz", hu, LPS)
    wrong = save(tmp_path / "w.nii.gz", lab, np.diag([2.0, 2.0, 3.0, 1]))  # RAS: orientation differs
    (tmp_path / "m.csv").write_text(f"img_path,id,mask_path\n{img},one,{tmp_path / 'gone.nii.gz'}\n"
                                    f"{img},two,{wrong}\n{img},three,\n")
    cfg = get_defaults()
    cfg.DATA.CACHE_DIR = ""
    ds = VolumeDataset(Manifest.read(tmp_path / "m.csv"), cfg, lambda h, meta, rng: meta, masks=True)
    with pytest.raises(BadInputError, match=r"gone.nii.gz: mask file does not exist \(row 1 \(id one\) of .*m.csv"):
        ds.load(0)
    with pytest.raises(BadInputError, match=r"w.nii.gz: mask orientation RAS differs .*row 2 \(id two\)"):
        ds.load(1)
    with pytest.raises(BadInputError, match=r"row 3 \(id three\) .* has no mask_path"):
        ds.load(2)


def test_map_classes():
    lab = np.array([0, 1, 3, 7, 3, -1])
    np.testing.assert_array_equal(map_classes(lab, [3, 1]), [0, 2, 1, 0, 1, 0])
