"""tools/demo.sh (`make demo`) end to end at a toy size: every stage runs and the table prints, with the
AUROCs of metrics.json and of the table recomputed by scikit-learn from the predictions.csv files."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

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
    scan_auc = {}
    for run in ("linear", "linear_random", "finetune"):
        metrics = json.loads((out / run / "metrics.json").read_text())
        assert {"val", "test", "test_group"} <= set(metrics)
        assert (out / run / "roc_pr.png").is_file() and (out / run / "predictions.csv").is_file()
        for section, file in (("val", "predictions_val.csv"), ("test", "predictions.csv")):
            ids, groups, y, p = read_ich(out / run / file)
            scan_auc[run, section] = dict(zip(ids, p)), dict(zip(ids, y))
            assert metrics[section]["ICH"]["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9), (run, section)
            if section == "test":
                patients = sorted(set(groups))
                gy = [max(t for t, g in zip(y, groups) if g == pid) for pid in patients]
                gp = [max(q for q, g in zip(p, groups) if g == pid) for pid in patients]
                assert metrics["test_group"]["ICH"]["auroc"] == pytest.approx(roc_auc_score(gy, gp), abs=1e-9)
                ci = metrics["test"]["ICH"]["auroc_ci95"]
                # the table prints the file's numbers
                assert f"{roc_auc_score(y, p):.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" in r.stdout
    # the paired difference it prints: pretrained - random AUROC over the same test scans, matched by id
    (pa, ya), (pb, _) = scan_auc["linear", "test"], scan_auc["linear_random", "test"]
    ids = sorted(pa)
    assert sorted(pb) == ids
    y = [ya[i] for i in ids]
    diff = roc_auc_score(y, [pa[i] for i in ids]) - roc_auc_score(y, [pb[i] for i in ids])
    assert f"scans    {diff:+.3f} AUROC" in r.stdout
    assert (out / "mae" / "backbone.pth").is_file()
    assert "MODEL.PRETRAINED is empty" in (out / "linear_random" / "log.txt").read_text()


def read_ich(path: Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """ids, patient ids, ICH targets and probabilities of a predictions file (the demo's labels have no blanks)."""
    rows = list(csv.DictReader(open(path)))
    return ([r["id"] for r in rows], [r["group"] for r in rows], np.array([float(r["ICH_target"]) for r in rows]),
            np.array([float(r["ICH_prob"]) for r in rows]))
