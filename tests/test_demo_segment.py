"""tools/demo_segment.sh (`make demo-segment`) end to end at a toy size: every stage runs, the Dice table of both
runs and the paired sentence print, and the printed Dice are those of the runs' metrics.json."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_segment_runs_every_stage_and_prints_the_comparison(tmp_path):
    from config import get_defaults, merge_file
    from models.zoo import build_backbone
    out = tmp_path / "demo"
    (out / "mae").mkdir(parents=True)
    cfg = get_defaults()
    merge_file(cfg, str(ROOT / "configs" / "demo" / "mae.yaml"))
    torch.save(build_backbone(cfg).state_dict(), out / "mae" / "backbone.pth")  # stands in for make demo's MAE
    env = {**os.environ, "DEMO_N": "12", "DEMO_SEG_EPOCHS": "1", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "DEMO_SEG_OPTS": "DATA.SPACING [15.0,15.0,15.0] DATA.ROI [16,16,16] DATA.NUM_WORKERS 0 "
                            "DOWNSTREAM.SEG_CLASSES [3] DOWNSTREAM.BOOTSTRAP 50"}
    r = subprocess.run(["bash", str(ROOT / "tools" / "demo_segment.sh"), str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for stage in ("1/3 phantom", "2/3 segmenter", "3/3 the same decoder"):
        assert stage in r.stdout
    assert "Pretrained - random, paired over the same test cases" in r.stdout
    assert "significant" in r.stdout and "demo-segment finished in" in r.stdout
    for folder in ("segment", "segment_random"):
        m = json.load(open(out / folder / "metrics.json"))["test"]["class_3"]
        assert f"{m['dice']:.3f} [" in r.stdout
    assert "loaded" in (out / "segment" / "log.txt").read_text()
    assert "random weights" in (out / "segment_random" / "log.txt").read_text()
    bad = {**env, "DEMO_SEG_OPTS": env["DEMO_SEG_OPTS"] + " DOWNSTREAM.NO_SUCH_KEY 1"}  # both runs fail at start-up
    r = subprocess.run(["bash", str(ROOT / "tools" / "demo_segment.sh"), str(out)], cwd=tmp_path, env=bad,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "failed; the end of its console" in r.stderr and "NO_SUCH_KEY" in r.stderr
    r = subprocess.run(["bash", str(ROOT / "tools" / "demo_segment.sh"), str(tmp_path / "none")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "run make demo first" in r.stderr
