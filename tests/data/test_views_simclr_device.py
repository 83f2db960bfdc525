"""SimCLR device stage (issue 11): workers hand over float16 HU views plus their draws; the
batched stage (simclr_batch_transform, run by SimCLR.forward) finishes them into the same views."""
import numpy as np
import pytest
import torch

from config import get_defaults
from data.datasets import collate
from data.views import SimCLRViews, apply_histogram_curve, draw_histogram_curve, simclr_batch_transform


def cfg_for(mode: str, crop=(16, 16, 16)):
    cfg = get_defaults()
    cfg.SIMCLR.MODE = mode
    cfg.SIMCLR.CROP_SIZE = list(crop)
    cfg.SIMCLR.PATCHES_PER_SCAN = 2
    cfg.DATA.WINDOWS = ["brain", "subdural", "bone"]
    return cfg


def head(shape=(40, 44, 36), seed=0) -> np.ndarray:
    """An ellipsoid of noisy tissue with a bright shell in air, int16."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(sum(g ** 2 for g in grid))
    hu = np.where(r < 0.95, 900, -1000) + 0.0
    hu[r < 0.85] = 35.0
    return (hu + rng.normal(0, 8, size=shape)).astype(np.int16)


META = {"spacing": (1.0, 1.0, 1.0), "affine": np.eye(4), "coord": None, "path": "scan.nii.gz", "id": "scan"}


@pytest.mark.parametrize("mode", ["inter", "intra", "negative_mined"])
def test_device_stage_gives_the_same_views(mode):
    cfg = cfg_for(mode)
    cpu, dev = SimCLRViews(cfg), SimCLRViews(cfg, device_stage=True)
    hu = head()
    samples = [dev(hu, META, np.random.default_rng([0, 0, i])) for i in range(3)]
    v = cpu.num_views
    assert samples[0]["views"].shape == (v, 16, 16, 16) and samples[0]["views"].dtype == torch.float16
    assert samples[0]["views_aug"].shape[0] == v and samples[0]["views_hist"].shape == (v, 6)
    batch = dev.batch_transform(collate([{**s, "index": i, "id": str(i)} for i, s in enumerate(samples)]))
    assert "views_aug" not in batch and "views_hist" not in batch
    assert batch["views"].shape == (3, v, 3, 16, 16, 16) and batch["views"].dtype == torch.float32
    for i in range(3):
        ref = cpu(hu, META, np.random.default_rng([0, 0, i]))["views"]
        assert (batch["views"][i] - ref).abs().max() < 2e-3  # float16 rounding of HU only


def test_windowed_batch_passes_through():
    cfg = cfg_for("inter")
    cpu = SimCLRViews(cfg)
    plain = collate([{**cpu(head(), META, np.random.default_rng(0)), "index": 0, "id": "0"}])
    assert simclr_batch_transform(plain, cpu.specs) is plain


def test_histogram_curve_torch_matches_numpy():
    x = torch.rand(2, 5, 6, 7)
    moved = draw_histogram_curve(5, np.random.default_rng(3))
    a = apply_histogram_curve(x, moved, use_numpy=True)
    b = apply_histogram_curve(x, moved, use_numpy=False)  # the GPU code path, run on the CPU
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(apply_histogram_curve(torch.tensor([0.0, 1.0]), moved, use_numpy=False),
                       torch.tensor([0.0, 1.0]))


def test_simclr_forward_takes_a_device_stage_batch():
    from methods.simclr import SimCLR
    from models.zoo import build_backbone
    cfg = cfg_for("inter")
    cfg.MODEL.NAME, cfg.MODEL.PATCH_SIZE, cfg.DATA.ROI = "vit_tiny", [8, 8, 8], [16, 16, 16]
    cfg.SIMCLR.PROJ_HIDDEN_DIM, cfg.SIMCLR.PROJ_DIM = 32, 16
    torch.manual_seed(0)
    method = SimCLR(cfg, build_backbone(cfg)).eval()
    cpu, dev = SimCLRViews(cfg), SimCLRViews(cfg, device_stage=True)
    rngs = [np.random.default_rng([1, 0, i]) for i in range(2)]
    b_dev = collate([{**dev(head(seed=i), META, r), "index": i, "id": str(i)} for i, r in enumerate(rngs)])
    rngs = [np.random.default_rng([1, 0, i]) for i in range(2)]
    b_cpu = collate([{**cpu(head(seed=i), META, r), "index": i, "id": str(i)} for i, r in enumerate(rngs)])
    with torch.no_grad():
        a, b = method(b_dev)["loss"], method(b_cpu)["loss"]
    assert torch.isfinite(a) and abs(float(a) - float(b)) < 1e-2
