"""The collapse monitor in real pretraining runs: rows in metrics.jsonl and TensorBoard, the numbers
recomputed from backbone.pth, the same initial value under torchrun with two processes, the warning."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from config import get_config, load_config
from engine.monitor import CollapseMonitor, exported_backbone, monitor_rows
from evaluation.collapse import effective_rank, feature_std

ROOT = Path(__file__).resolve().parents[2]


def test_monitor_rows_are_evenly_spaced_and_capped():
    assert monitor_rows(10, 256).tolist() == list(range(10))
    assert monitor_rows(1000, 5).tolist() == [0, 250, 500, 749, 999]
    assert monitor_rows(10, 0).tolist() == []


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from data.phantom import write_dataset
    out = tmp_path_factory.mktemp("phantom")
    write_dataset(out, n=16, size=32, seed=0)
    return out


def tiny_opts(out: Path, phantom: Path, *extra: str) -> list[str]:
    return ["OUTPUT", str(out), "DATA.TRAIN_CSV", str(phantom / "train.csv"), "DATA.VAL_CSV", "",
            "DATA.ROI", "[16, 16, 16]", "DATA.BATCH_SIZE", "2", "DATA.NUM_WORKERS", "0", "TRAIN.EPOCHS", "2",
            "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.LOG_EVERY", "100", "MONITOR.NUM_SCANS", "3", *extra]


def run(script: str, cfg: str, opts: list[str], launcher=None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [script, "--cfg", cfg, "--opts", *opts]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def epoch_rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "epoch_s" in r]


def recompute(out: Path) -> tuple[float, float]:
    """The monitor's numbers from backbone.pth, embedded here without the trainer."""
    from data.datasets import collate
    from engine.dist import make_loader
    from models.zoo import build_backbone, load_pretrained
    cfg = load_config(str(out / "config.yaml"))
    backbone = build_backbone(cfg)
    load_pretrained(backbone, str(out / "backbone.pth"), min_fraction=1.0)
    monitor = CollapseMonitor(cfg)
    feats = []
    with torch.no_grad():
        for batch in make_loader(monitor.dataset, cfg, train=False, collate_fn=collate):
            feats.append(backbone.eval()(batch["image"]).numpy())
    feats = np.concatenate(feats)
    assert feats.shape[0] == 3
    return effective_rank(feats), feature_std(feats)


@pytest.mark.parametrize("method", ["mae", "dino"])
def test_pretraining_logs_feature_rank_of_what_backbone_pth_holds(tmp_path, phantom, method):
    extra = ["DINO.LOCAL_CROP_SIZE", "[8, 8, 8]", "DINO.LOCAL_CROPS_NUMBER", "2", "DINO.KNN_EVERY", "0"]
    extra = extra if method == "dino" else []
    run(f"main_pretrain_{method}.py", f"configs/demo/{method}.yaml", tiny_opts(tmp_path, phantom, *extra))
    rows = epoch_rows(tmp_path)
    assert len(rows) == 2
    for r in rows:
        assert 1.0 <= r["feature_rank"] <= 3.0 and 0.0 <= r["feature_std"] <= 1.0 and r["monitor_s"] >= 0
    assert "feature_rank_init" in rows[0] and "feature_rank_init" not in rows[1]
    # backbone.pth (for DINO the teacher) after the last epoch is what the last row measured
    rank, std = recompute(tmp_path)
    assert rows[-1]["feature_rank"] == pytest.approx(rank, rel=1e-4)
    assert rows[-1]["feature_std"] == pytest.approx(std, rel=1e-4)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    scalars = acc.Tags()["scalars"]
    assert any(t.endswith("feature_rank") for t in scalars) and any(t.endswith("feature_std") for t in scalars)
    log = (tmp_path / "log.txt").read_text()
    assert f"collapse monitor: 3 scans of {phantom / 'train.csv'}" in log  # no VAL_CSV: training scans


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_measure_the_same_initial_rank_as_one(tmp_path, phantom):
    one, two = tmp_path / "one", tmp_path / "two"
    opts = ["TRAIN.EPOCHS", "1", "MONITOR.NUM_SCANS", "4"]
    run("main_pretrain_mae.py", "configs/demo/mae.yaml", tiny_opts(one, phantom, *opts))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port())]
    run("main_pretrain_mae.py", "configs/demo/mae.yaml", tiny_opts(two, phantom, *opts), launcher=torchrun)
    a, b = epoch_rows(one)[0], epoch_rows(two)[0]
    # the same seed gives the same untrained backbone; the 4 scans are split 2 + 2 and gathered
    assert b["feature_rank_init"] == pytest.approx(a["feature_rank_init"], rel=1e-5)
    assert b["feature_std_init"] == pytest.approx(a["feature_std_init"], rel=1e-5)


class _Log:
    def __init__(self):
        self.warnings = []

    def warning(self, msg):
        self.warnings.append(msg)


class _Method(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def test_warning_when_rank_falls_below_the_fraction(phantom):
    cfg = get_config(["--cfg", "configs/demo/mae.yaml", "--opts", *tiny_opts(Path("unused"), phantom),
                      "MONITOR.NUM_SCANS", "4", "MONITOR.RANK_WARN_FRACTION", "0.5"])
    torch.manual_seed(0)
    healthy = nn.Sequential(nn.Flatten(), nn.LazyLinear(8))
    monitor = CollapseMonitor(cfg)
    log = _Log()
    first = monitor(_Method(healthy), log)
    assert monitor.initial["feature_rank"] == first["feature_rank"] > 1.5 and not log.warnings
    collapsed = nn.Sequential(nn.Flatten(), nn.Linear(healthy[1].in_features, 8))
    with torch.no_grad():
        collapsed[1].weight.zero_()
        collapsed[1].bias.fill_(1.0)  # every scan -> the same vector
    row = monitor(_Method(collapsed), log)
    assert row["feature_rank"] == pytest.approx(1.0) and row["feature_std"] == pytest.approx(0.0, abs=1e-7)
    assert len(log.warnings) == 1 and "below MONITOR.RANK_WARN_FRACTION 0.5" in log.warnings[0]
    # the initial value survives a resume
    again = CollapseMonitor(cfg)
    again.load_state_dict(monitor.state_dict())
    assert again.initial == monitor.initial
    assert exported_backbone(_Method(healthy)) is healthy


def test_monitor_needs_two_scans(phantom):
    cfg = get_config(["--cfg", "configs/demo/mae.yaml", "--opts", *tiny_opts(Path("unused"), phantom),
                      "MONITOR.NUM_SCANS", "1"])
    with pytest.raises(ValueError, match="at least 2 scans"):
        CollapseMonitor(cfg)
