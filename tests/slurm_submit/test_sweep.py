"""slurm_submit/sweep.py: the overrides of one job-array task of downstream_sweep.sbatch."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("headct_sweep", REPO / "slurm_submit" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


@pytest.fixture
def cfg(tmp_path) -> str:
    path = tmp_path / "c.yaml"
    path.write_text("OUTPUT: runs/base\n")
    return str(path)


def test_scalar_value_and_output(cfg):
    assert sweep.sweep_opts("DOWNSTREAM.FEW_SHOT_K", ["1", "2", "4"], 2, cfg) == \
        ["DOWNSTREAM.FEW_SHOT_K", "4", "OUTPUT", "runs/base/few_shot_k_4"]


def test_output_from_the_pairs(cfg):
    assert sweep.sweep_opts("DOWNSTREAM.FEW_SHOT_K", ["8"], 0, cfg, ["OUTPUT", "/abs/run", "SEED", "3"])[-1] == \
        "/abs/run/few_shot_k_8"


@pytest.mark.parametrize("raw, value, name", [("ICH", "['ICH']", "labels_ICH"),
                                              ("[SDH,EDH]", "['SDH', 'EDH']", "labels_SDH-EDH")])
def test_list_key(cfg, raw, value, name):
    out = sweep.sweep_opts("DOWNSTREAM.LABELS", [raw], 0, cfg)
    assert out[1] == value and out[3] == f"runs/base/{name}"
    # the value is one yacs accepts for the list key
    from config import get_config
    assert get_config(["--cfg", cfg, "--opts", *out]).DOWNSTREAM.LABELS == eval(value)


def test_bad_index_and_key(cfg):
    with pytest.raises(ValueError, match=r"need --array=0-1"):
        sweep.sweep_opts("DOWNSTREAM.FEW_SHOT_K", ["1", "2"], 2, cfg)
    with pytest.raises(ValueError, match="empty"):
        sweep.sweep_opts("DOWNSTREAM.FEW_SHOT_K", [], 0, cfg)
    with pytest.raises(ConfigError, match="DOWNSTREAM.NOPE"):
        sweep.sweep_opts("DOWNSTREAM.NOPE", ["1"], 0, cfg)


def test_command_line(cfg):
    r = subprocess.run([sys.executable, str(REPO / "slurm_submit" / "sweep.py"), "--key", "DOWNSTREAM.FEW_SHOT_K",
                        "--values", "1 2", "--index", "1", "--cfg", cfg, "--opts", "SEED", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:4] == ["DOWNSTREAM.FEW_SHOT_K", "2", "OUTPUT", "runs/base/few_shot_k_2"]
    r = subprocess.run([sys.executable, str(REPO / "slurm_submit" / "sweep.py"), "--key", "DOWNSTREAM.FEW_SHOT_K",
                        "--values", "1 2", "--index", "5", "--cfg", cfg], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "array task 5 has no sweep value" in r.stderr
