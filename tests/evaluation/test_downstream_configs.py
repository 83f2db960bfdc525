"""The downstream YAML files load with the real config parser (unknown keys or bad values fail)."""
from pathlib import Path

import pytest

import config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "downstream").glob("*.yaml"))
EXPECTED = {"cq500_ich.yaml", "rsna_any.yaml"}


def test_expected_files_present():
    assert EXPECTED <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name in EXPECTED], ids=lambda p: p.name)
def test_downstream_config_loads(path):
    cfg = config.get_config(["--cfg", str(path)])
    assert cfg.MODEL.NAME == "vit_base" and list(cfg.MODEL.PATCH_SIZE) == [16, 16, 16]
    assert list(cfg.DATA.ROI) == [96, 96, 96] and cfg.TRAIN.AMP == "bf16"
    assert cfg.DOWNSTREAM.MODE in ("linear", "finetune") and cfg.DOWNSTREAM.LABELS[0] == "ICH"
    assert cfg.DOWNSTREAM.GROUP_COLUMN == "patient_id"
    assert cfg.DATA.TRAIN_CSV.endswith("splits/train.csv") and cfg.DATA.TEST_CSV.endswith("splits/test.csv")
