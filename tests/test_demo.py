"""tools/demo.sh (`make demo`) end to end at a toy size: every stage runs and the table prints."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_script_runs_every_stage_and_prints_the_table(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "DEMO_N": "16", "DEMO_MAE_EPOCHS": "1", "DEMO_FT_EPOCHS": "1", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "tools" / "demo.sh"), str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for stage in ("1/4 phantom", "2/4 MAE", "3/4 linear probes", "4/4 fine-tuning"):
        assert stage in r.stdout
    assert "ICH on the phantom's test split" in r.stdout and "demo finished in" in r.stdout
    assert "Pretrained - random, linear probe, paired" in r.stdout
    assert "significant" in r.stdout or "not comparable" in r.stdout
    for run in ("linear", "linear_random", "finetune"):
        metrics = json.loads((out / run / "metrics.json").read_text())
        assert {"val", "test", "test_group"} <= set(metrics)
        assert (out / run / "roc_pr.png").is_file() and (out / run / "predictions.csv").is_file()
    assert (out / "mae" / "backbone.pth").is_file()
    assert "MODEL.PRETRAINED is empty" in (out / "linear_random" / "log.txt").read_text()
