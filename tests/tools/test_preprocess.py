import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from config import get_defaults
from data.cache import cache_root, is_done
from data.io import read_skipped
from tools.preprocess import main

REPO = Path(__file__).resolve().parents[2]


def synthetic_head(seed: int) -> np.ndarray:
    grid = np.indices((32, 32, 32), dtype=np.float32)
    r = np.sqrt(sum((g - 15.5) ** 2 for g in grid))
    hu = np.full((32, 32, 32), -1000.0, dtype=np.float32)
    hu[r < 13] = 1000.0
    hu[r < 11] = 40.0
    return hu + np.random.default_rng(seed).normal(0, 10, hu.shape).astype(np.float32)


def scans(tmp_path):
    good = []
    for i in range(3):
        p = tmp_path / "scans" / f"good{i}.nii.gz"
        p.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(synthetic_head(i), np.diag([2.0, 2.0, 2.0, 1.0])), str(p))
        good.append(p)
    bad = [tmp_path / "scans" / "missing.nii.gz", tmp_path / "scans" / "empty.nii.gz",
           tmp_path / "scans" / "nan.nii.gz"]
    bad[1].write_bytes(b"")
    hu = synthetic_head(9)
    hu[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(bad[2]))
    train = tmp_path / "train.csv"
    train.write_text("img_path\n" + "".join(f"scans/{p.name}\n" for p in good[:2] + bad[:2]))
    val = tmp_path / "val.csv"
    val.write_text("img_path\n" + "".join(f"scans/{p.name}\n" for p in good[2:] + bad[2:]))
    return good, bad, train, val


def opts(tmp_path, train, val, *extra):
    return ["--no-progress", "--opts", "DATA.TRAIN_CSV", str(train), "DATA.VAL_CSV", str(val),
            "DATA.CACHE_DIR", str(tmp_path / "cache"), "DATA.SPACING", "[2.0, 2.0, 2.0]",
            "DATA.NUM_WORKERS", "0", *extra]


def cfg_like(tmp_path):
    cfg = get_defaults()
    cfg.DATA.CACHE_DIR = str(tmp_path / "cache")
    cfg.DATA.SPACING = [2.0, 2.0, 2.0]
    return cfg


def test_raise_stops_with_the_file_and_reason(tmp_path, capsys):
    good, bad, train, val = scans(tmp_path)
    assert main(opts(tmp_path, train, val)) == 1
    err = capsys.readouterr().err
    assert f"{bad[0]}: file does not exist" in err and "DATA.ON_ERROR skip" in err


def test_skip_lists_every_broken_file_and_caches_the_good_ones(tmp_path):
    good, bad, train, val = scans(tmp_path)
    assert main(opts(tmp_path, train, val, "DATA.ON_ERROR", "skip", "DATA.MAX_BAD_FRACTION", "0.5")) == 0
    root = cache_root(cfg_like(tmp_path))
    skipped = read_skipped(root / "skipped.csv")
    assert sorted(skipped) == sorted(str(p) for p in bad)
    assert "NaN" in skipped[str(bad[2])] and "empty" in skipped[str(bad[1])]
    assert all(is_done(root, p) for p in good)
    # too many bad inputs for the allowed fraction: stopped with a summary
    assert main(opts(tmp_path, train, val, "DATA.ON_ERROR", "skip", "DATA.MAX_BAD_FRACTION", "0.1")) == 1


def test_command_line_in_parallel(tmp_path):
    good, bad, train, val = scans(tmp_path)
    args = opts(tmp_path, train, val, "DATA.ON_ERROR", "skip", "DATA.MAX_BAD_FRACTION", "0.5")
    args[args.index("DATA.NUM_WORKERS") + 1] = "2"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # as the installed package: importable from any folder
    res = subprocess.run([sys.executable, "-m", "tools.preprocess", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "3 written" in res.stdout and "3 skipped" in res.stdout
    root = cache_root(cfg_like(tmp_path))
    assert all(is_done(root, p) for p in good)
    assert len(read_skipped(root / "skipped.csv")) == 3
    res = subprocess.run([sys.executable, "-m", "tools.preprocess", "--opts", "DATA.TRAIN_CSV", str(train)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "DATA.CACHE_DIR is empty" in res.stderr
