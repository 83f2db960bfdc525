"""DINO device resize (issue 11): workers ship the head once with the crop boxes and draws; the
batched stage (dino_batch_transform, run by DINO.forward) cuts, resizes and windows the crops into
the views the workers would have made."""
import numpy as np
import pytest
import torch

from config import get_defaults
from data.datasets import collate
from data.views import DINOViews, crops_from_heads, dino_batch_transform


def make_cfg(n_local=3):
    cfg = get_defaults()
    cfg.DATA.ROI = [16, 16, 16]
    cfg.DATA.WINDOWS = ["brain", "subdural", "bone"]
    cfg.DINO.LOCAL_CROPS_NUMBER = n_local
    cfg.DINO.LOCAL_CROP_SIZE = [8, 8, 8]
    return cfg


def head(shape=(30, 36, 26), seed=0):
    rng = np.random.default_rng(seed)
    hu = rng.normal(40, 20, size=shape)
    hu[::3] = 300  # structure, so blur and noise matter
    return hu.astype(np.int16)


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_device_resize_gives_the_same_views(dtype):
    cfg = make_cfg()
    cpu = DINOViews(cfg)
    dev = DINOViews(cfg, device_stage=True, device_resize=True)
    heads = [head(seed=i).astype(dtype) for i in range(3)]
    samples = [dev(h, {}, np.random.default_rng([0, 0, i])) for i, h in enumerate(heads)]
    s = samples[0]
    assert set(s) == {"hu", "global_box", "global_aug", "local_box", "local_aug"}
    assert s["hu"].dtype == torch.from_numpy(heads[0]).dtype and s["global_box"].shape == (2, 12)
    assert all(a <= b for a, b in zip(s["hu"].shape, heads[0].shape))
    batch = collate([{**x, "index": i, "id": str(i)} for i, x in enumerate(samples)])
    assert isinstance(batch["hu"], list) and len(batch["hu"]) == 3  # ragged: kept as a list
    out = dev.batch_transform(batch)
    assert set(out) >= {"global", "local"} and not any(k.endswith(("_aug", "_box")) or k == "hu" for k in out)
    assert out["global"].shape == (3, 2, 3, 16, 16, 16) and out["local"].shape == (3, 3, 3, 8, 8, 8)
    for i, h in enumerate(heads):
        ref = cpu(h, {}, np.random.default_rng([0, 0, i]))
        for k in ("global", "local"):
            assert torch.allclose(out[k][i], ref[k], atol=1e-5), k  # no float16 step: the same numbers


def test_only_the_part_the_boxes_cover_is_shipped():
    cfg = make_cfg(n_local=0)
    cfg.DINO.GLOBAL_CROP_SCALE = [0.05, 0.05]
    dev = DINOViews(cfg, device_stage=True, device_resize=True)
    s = dev(head((60, 60, 60)), {}, np.random.default_rng(1))
    assert s["local_box"].shape == (0, 12) and np.prod(s["hu"].shape) < 60 ** 3
    boxes = s["global_box"]
    assert (boxes[:, 0:3] >= 0).all() and (boxes[:, 0:3] + boxes[:, 3:6] <= torch.tensor(s["hu"].shape)).all()
    out = dino_batch_transform(collate([{**s, "index": 0, "id": "0"}]), dev.specs)
    assert out["global"].shape == (1, 2, 3, 16, 16, 16) and out["local"].shape[:3] == (1, 0, 3)


def test_crops_from_heads_flips_and_identity():
    h = torch.arange(6 * 7 * 8, dtype=torch.int16).reshape(6, 7, 8)
    boxes = torch.tensor([[[1, 2, 3, 4, 5, 5, 0, 0, 0, 4, 5, 5], [1, 2, 3, 4, 5, 5, 1, 0, 1, 4, 5, 5]]])
    out = crops_from_heads([h], boxes)
    assert out.dtype == torch.float32 and out.shape == (1, 2, 4, 5, 5)
    assert torch.equal(out[0, 0], h[1:5, 2:7, 3:8].float())
    assert torch.equal(out[0, 1], h[1:5, 2:7, 3:8].flip([0, 2]).float())


def test_dino_forward_takes_a_device_resize_batch():
    from methods.dino import DINO
    from models.zoo import build_backbone
    cfg = make_cfg(n_local=2)
    cfg.MODEL.NAME, cfg.MODEL.PATCH_SIZE = "vit_tiny", [8, 8, 8]
    cfg.DINO.OUT_DIM, cfg.DINO.HEAD_HIDDEN_DIM, cfg.DINO.HEAD_BOTTLENECK_DIM = 64, 32, 16
    torch.manual_seed(0)
    method = DINO(cfg, build_backbone(cfg)).eval()
    cpu, dev = DINOViews(cfg), DINOViews(cfg, device_stage=True, device_resize=True)
    b_dev = collate([{**dev(head(seed=i), {}, np.random.default_rng(i)), "index": i, "id": str(i)} for i in range(2)])
    b_cpu = collate([{**cpu(head(seed=i), {}, np.random.default_rng(i)), "index": i, "id": str(i)} for i in range(2)])
    with torch.no_grad():
        a, b = method(b_dev)["loss"], method(b_cpu)["loss"]
    assert torch.isfinite(a) and abs(float(a) - float(b)) < 1e-4
