"""SimCLR: auxiliary-task helpers, one training step per mode and per backbone family, and
(slow) the entry script on the phantom in every mode with a loss falling below chance and a loadable
backbone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from config import get_defaults, load_config
from methods.simclr import SimCLR, block_mask, masked_l1, rotate_axial
from models.zoo import build_backbone, load_pretrained

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ auxiliary tasks
def test_rotate_axial_per_row():
    x = torch.arange(2 * 1 * 4 * 4 * 3, dtype=torch.float32).view(2, 1, 4, 4, 3)
    k = torch.tensor([1, 3])
    out = rotate_axial(x, k)
    assert torch.equal(out[0], torch.rot90(x[0], 1, dims=(1, 2)))
    assert torch.equal(out[1], torch.rot90(x[1], 3, dims=(1, 2)))
    assert torch.equal(rotate_axial(out, (4 - k) % 4), x)
    with pytest.raises(ValueError, match="D == H"):
        rotate_axial(torch.zeros(1, 1, 4, 6, 4), torch.tensor([1]))


def test_block_mask_ratio_blocks_and_l1():
    torch.manual_seed(0)
    m = block_mask(3, (16, 16, 16), (4, 4, 4), 0.25, torch.device("cpu"))
    assert m.shape == (3, 1, 16, 16, 16)
    assert m.mean(dim=(1, 2, 3, 4)).tolist() == [0.25] * 3  # 16 of 64 blocks each
    blocks = m[:, 0].reshape(3, 4, 4, 4, 4, 4, 4)  # constant inside each 4^3 block
    assert torch.equal(blocks.amax(dim=(2, 4, 6)), blocks.amin(dim=(2, 4, 6)))
    assert block_mask(1, (8, 8, 8), (4, 4, 4), 0.0, torch.device("cpu")).sum() == 64  # at least one block
    pred, target = torch.zeros(3, 2, 16, 16, 16), torch.ones(3, 2, 16, 16, 16)
    pred[m.expand_as(pred) == 0] = 5.0  # errors outside the mask do not count
    assert masked_l1(pred, target, m).item() == pytest.approx(1.0)


# --------------------------------------------------------------------------- one training step
WIDTHS = {"swin": 12, "segresnet": 4, "resnet18": 8, "resnet50": 4}


def tiny_cfg(name: str, mode: str, rotation: float = 0.0, inpaint: float = 0.0):
    cfg = get_defaults()
    cfg.MODEL.NAME = name
    cfg.DATA.ROI = [32, 32, 32]
    cfg.MODEL.PATCH_SIZE = [8, 8, 8]
    cfg.MODEL.FEATURE_SIZE = WIDTHS.get(name, 48)
    cfg.SIMCLR.MODE = mode
    cfg.SIMCLR.PATCHES_PER_SCAN = 2
    cfg.SIMCLR.PROJ_HIDDEN_DIM = 32
    cfg.SIMCLR.PROJ_DIM = 16
    cfg.SIMCLR.ROTATION_WEIGHT = rotation
    cfg.SIMCLR.INPAINT_WEIGHT = inpaint
    return cfg


# every mode on a ViT; every backbone family in some mode; the auxiliary heads on a ViT (patch
# decoder) and on CNNs of output stride 16 (segresnet) and 32 (resnet18)
STEP_CASES = [("vit_tiny", "inter", 0.0, 0.0), ("vit_tiny", "intra", 1.0, 1.0),
              ("vit_tiny", "negative_mined", 0.0, 0.0), ("swin", "inter", 0.0, 0.0),
              ("segresnet", "intra", 1.0, 1.0), ("resnet18", "negative_mined", 1.0, 1.0),
              ("resnet50", "inter", 0.0, 0.0)]


@pytest.mark.parametrize("name,mode,rotation,inpaint", STEP_CASES)
def test_one_training_step(name, mode, rotation, inpaint):
    torch.manual_seed(0)
    cfg = tiny_cfg(name, mode, rotation, inpaint)
    method = SimCLR(cfg, build_backbone(cfg))
    views = {"inter": 2, "intra": 4, "negative_mined": 4}[mode]
    assert method.num_views == views
    batch = {"views": torch.rand(2, views, 3, 32, 32, 32)}  # batch 2 (swin, resnet50 stay cheap)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    out = method(batch)
    expected = {"loss", "contrastive", "top1"} | ({"rot_loss", "rot_acc"} if rotation else set()) \
        | ({"inpaint_loss"} if inpaint else set())
    assert set(out) == expected
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    # every trainable parameter takes part (DDP without find_unused_parameters needs that)
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in method.backbone.state_dict().items())


def test_configuration_errors():
    cfg = tiny_cfg("vit_tiny", "inter")
    cfg.SIMCLR.CROP_SIZE = [36, 32, 32]
    with pytest.raises(ValueError, match="SIMCLR.CROP_SIZE"):
        SimCLR(cfg, build_backbone(cfg))
    cfg = tiny_cfg("resnet18", "inter", rotation=1.0)
    cfg.SIMCLR.CROP_SIZE = [32, 16, 32]
    with pytest.raises(ValueError, match="D == H"):
        SimCLR(cfg, build_backbone(cfg))
    method = SimCLR(tiny_cfg("resnet18", "intra"), build_backbone(tiny_cfg("resnet18", "intra")))
    with pytest.raises(ValueError, match=r"\[B, 4, C, 32, 32, 32\]"):
        method({"views": torch.rand(2, 2, 3, 32, 32, 32)})


@pytest.mark.parametrize("path", ["configs/simclr/vit_base.yaml", "configs/simclr/segresnet.yaml",
                                  "configs/demo/simclr.yaml"])
def test_shipped_configs_build(path):
    from config import get_config
    from data.views import SimCLRViews
    cfg = get_config(["--cfg", str(ROOT / path)])
    view = SimCLRViews(cfg)
    with torch.device("meta"):  # shapes only: no memory, no init time
        method = SimCLR(cfg, build_backbone(cfg))
    assert method.num_views == view.num_views and method.crop == view.crop


# ------------------------------------------------------------------------ end to end (slow)
def _epoch_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "epoch_s" in r]


def _chance_loss(mode: str, batch: int, patches: int) -> float:
    """NT-Xent when every candidate scores the same (a collapsed encoder): log(views in the batch - 1)."""
    views = {"inter": 2, "intra": 2 * patches, "negative_mined": 4}[mode]
    return float(np.log(batch * views - 1))


@pytest.fixture(scope="module")
def demo_phantom(tmp_path_factory):
    """The phantom of ``make demo`` (96 scans of 64^3, 59 for training): the data the demo config's
    claim is about."""
    from data.phantom import write_dataset
    out = tmp_path_factory.mktemp("phantom")
    write_dataset(out, n=96, size=64, seed=0)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inter", "intra", "negative_mined"])
def test_demo_config_loss_falls_below_chance_and_backbone_loads(tmp_path, demo_phantom, mode):
    """configs/demo/simclr.yaml as shipped (vit_tiny, 4 epochs of 14 steps), in every mode."""
    out = tmp_path / "run"
    opts = ["OUTPUT", str(out), "DATA.TRAIN_CSV", str(demo_phantom / "train.csv"), "DATA.VAL_CSV", "",
            "SIMCLR.MODE", mode, "DATA.NUM_WORKERS", "0", "TRAIN.LOG_EVERY", "100"]
    r = subprocess.run([sys.executable, "main_pretrain_simclr.py", "--cfg", "configs/demo/simclr.yaml", "--opts",
                        *opts], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    losses = _epoch_losses(out)
    assert len(losses) == 4 and all(np.isfinite(losses))
    # Below chance, not only below the first epoch: a loss that starts above chance also "falls"
    # when the encoder collapses to one output for every view. (Measured with seeds 0-2: inter ends
    # at 1.47-1.57 against chance 1.95; intra and negative_mined far lower.)
    run_cfg = load_config(str(out / "config.yaml"))
    chance = _chance_loss(mode, run_cfg.DATA.BATCH_SIZE, run_cfg.SIMCLR.PATCHES_PER_SCAN)
    assert losses[-1] < min(losses[0], chance) - 0.15, (losses, chance)
    report = load_pretrained(build_backbone(run_cfg), str(out / "backbone.pth"), min_fraction=1.0)
    assert report["fraction"] == 1.0 and report["prefix"] == ""
