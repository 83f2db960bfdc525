"""Tests of tools/retrieval.py: the CLI on a features folder, JSON and neighbour index, bad input."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluation.retrieval import retrieval_metrics
from tools.retrieval import main, read_feature_table

REPO = Path(__file__).resolve().parents[2]


def write_features(folder: Path, feats: np.ndarray, labels: list[list[str]], groups=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "features.npy", feats.astype(np.float32))
    with open(folder / "features.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "img_path"] + (["patient_id"] if groups is not None else []) + ["ICH", "SDH"])
        for i, lab in enumerate(labels):
            w.writerow([f"s{i}", f"/x/s{i}.nii.gz"] + ([groups[i]] if groups is not None else []) + lab)
    return folder


def signal_folder(tmp_path: Path, n: int = 80) -> tuple[Path, np.ndarray]:
    """Features = labels + noise (a supervised signal): retrieval must beat chance by far."""
    rng = np.random.default_rng(0)
    lab = (rng.random((n, 2)) < [0.4, 0.25]).astype(int)
    feats = np.concatenate([2 * lab, np.zeros((n, 4))], axis=1) + 0.4 * rng.normal(size=(n, 6))
    rows = [[str(a), str(b)] for a, b in lab]
    rows[3][1] = ""  # a blank SDH
    groups = [f"P{i // 2}" for i in range(n)]
    return write_features(tmp_path / "feats", feats, rows, groups), lab


def test_cli_writes_metrics_and_index(tmp_path: Path, capsys) -> None:
    folder, lab = signal_folder(tmp_path)
    out = tmp_path / "res" / "retrieval.json"
    index = tmp_path / "nn.csv"
    res = main(["--features", str(folder), "--labels", "ICH,SDH", "--out", str(out), "--k", "5",
                "--group-column", "patient_id", "--index", str(index)])
    saved = json.loads(out.read_text())
    assert saved["k"] == 5 and saved["grouped"] and saved["group_column"] == "patient_id"
    for name in ("ICH", "SDH"):
        e = saved["labels"][name]
        assert e["map_at_k"] > e["map_chance"] + 0.3 and e["precision_at_k"] > e["precision_chance"] + 0.3
    assert saved["labels"]["ICH"]["n_queries"] == int(lab[:, 0].sum())
    assert saved["labels"]["SDH"]["n_known"] == 79  # the blank is left out
    assert res["labels"] == saved["labels"]
    rows = list(csv.DictReader(open(index)))
    assert len(rows) == 80 * 5 == saved["index_lines"]
    by_id = {f"s{i}": f"P{i // 2}" for i in range(80)}
    assert all(by_id[r["query_id"]] != by_id[r["neighbor_id"]] for r in rows)  # never the same patient
    printed = capsys.readouterr().out
    assert "mAP@5" in printed and "ICH" in printed and "chance" in printed


def test_a_label_without_queries_prints_why(tmp_path: Path, capsys) -> None:
    """SDH's only positives are one patient's two scans: 0 queries, and the console says why."""
    rows = [["1", "1"], ["1", "1"], ["1", "0"], ["0", "0"], ["0", "0"], ["0", "0"]]
    folder = write_features(tmp_path / "f", np.eye(6), rows, groups=["P0", "P0", "P1", "P2", "P3", "P4"])
    res = main(["--features", str(folder), "--labels", "ICH,SDH", "--out", str(tmp_path / "r.json"),
                "--group-column", "patient_id", "--k", "2"])
    reason = res["labels"]["SDH"]["reason"]
    assert res["labels"]["SDH"]["n_queries"] == 0 and "outside its own group" in reason
    printed = capsys.readouterr().out.splitlines()
    assert f"SDH: no query: {reason}" in printed
    assert not any(line.startswith("ICH: no query") for line in printed)


def test_center_removes_a_shared_offset(tmp_path: Path) -> None:
    folder, _ = signal_folder(tmp_path)
    feats = np.load(folder / "features.npy")
    np.save(folder / "features.npy", feats + 100.0)  # every scan shares one huge direction
    common = ["--features", str(folder), "--labels", "ICH", "--group-column", "patient_id", "--k", "5"]
    raw = main([*common, "--out", str(tmp_path / "raw.json")])
    centred = main([*common, "--center", "--out", str(tmp_path / "c.json")])
    assert centred["centered"] and not raw["centered"]
    _, _, lab, groups = read_feature_table(str(folder), ["ICH"], "patient_id")
    expect = retrieval_metrics(feats - feats.mean(axis=0), lab, ["ICH"], k=5, groups=groups)
    for key, value in expect["labels"]["ICH"].items():
        assert centred["labels"]["ICH"][key] == pytest.approx(value, abs=1e-6)  # the offset is gone


def test_cli_as_a_module(tmp_path: Path) -> None:
    folder, _ = signal_folder(tmp_path, n=20)
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "tools.retrieval", "--features", str(folder), "--labels", "ICH",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["k"] == 10


def test_bad_tables_name_the_problem(tmp_path: Path) -> None:
    feats = np.ones((3, 2))
    folder = write_features(tmp_path / "a", feats, [["1", "0"], ["2", "0"], ["0", "0"]])
    with pytest.raises(ValueError, match=r"features.csv, line 3, column 'ICH': '2'"):
        read_feature_table(str(folder), ["ICH"])
    with pytest.raises(ValueError, match="column 'Fracture' missing"):
        read_feature_table(str(folder), ["Fracture"])
    with pytest.raises(ValueError, match="column 'patient_id' missing"):
        read_feature_table(str(folder), ["SDH"], "patient_id")
    np.save(folder / "features.npy", np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match="must align"):
        read_feature_table(str(folder), ["SDH"])
    with pytest.raises(FileNotFoundError, match="extract_features"):
        read_feature_table(str(tmp_path / "missing"), ["ICH"])
    with pytest.raises(SystemExit):
        main(["--features", str(folder), "--labels", " , ", "--out", str(tmp_path / "x.json")])
