"""Tests of tools/extract_features.py: aligned outputs, tokens, resume, settings guard, bad rows, DDP,
and the end-to-end pretrain -> extract -> retrieve path on the phantom."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tools.extract_features as ef
from config import get_config
from data.datasets import VolumeDataset
from data.io import BadInputError
from data.manifest import Manifest
from data.phantom import write_dataset
from data.views import SingleView
from engine import dist
from engine.launch import build_backbone_from_cfg

REPO = Path(__file__).resolve().parents[2]
TINY = ["DATA.ROI", "[24, 24, 24]", "DATA.SPACING", "[8.0, 8.0, 8.0]", "DATA.NUM_WORKERS", "0",
        "DATA.BATCH_SIZE", "3", "MODEL.NAME", "vit_tiny", "MODEL.PATCH_SIZE", "[8, 8, 8]",
        "DOWNSTREAM.GROUP_COLUMN", "patient_id"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> dict:
    """8 phantom scans of 32^3 in one manifest, and a random-init vit_tiny checkpoint."""
    root = tmp_path_factory.mktemp("phantom")
    paths = write_dataset(root, n=8, size=32, seed=3)
    rows = []
    for split in ("train", "val", "test"):
        with open(paths[split], newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            rows += list(reader)
    all_csv = root / "all.csv"
    with open(all_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    cfg = get_config(["--cfg", "configs/demo/mae.yaml", "--opts", *TINY])
    torch.manual_seed(0)
    ckpt = root / "backbone.pth"
    torch.save(build_backbone_from_cfg(cfg).state_dict(), ckpt)
    return {"root": root, "csv": all_csv, "ckpt": ckpt, "ids": [r["id"] for r in rows], "train": paths["train"]}


def opts(phantom: dict, out: Path, *extra: str) -> list[str]:
    return ["--cfg", "configs/demo/mae.yaml", "--opts", *TINY, "MODEL.PRETRAINED", str(phantom["ckpt"]),
            "DATA.TEST_CSV", str(phantom["csv"]), "OUTPUT", str(out), *extra]


def read_table(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


@pytest.fixture(scope="module")
def reference(phantom) -> np.ndarray:
    """The backbone applied to each eval view, one scan at a time, without the tool."""
    cfg = get_config(opts(phantom, phantom["root"] / "unused"))
    backbone = build_backbone_from_cfg(cfg).eval()
    ds = VolumeDataset(Manifest.read(cfg.DATA.TEST_CSV), cfg, SingleView(cfg, train=False))
    with torch.no_grad():
        return np.stack([backbone(ds[i]["image"][None])[0].numpy() for i in range(len(ds))])


def test_features_aligned_with_table_and_equal_to_direct_forward(phantom, reference, tmp_path) -> None:
    out = tmp_path / "feats"
    info = ef.main(["--no-progress", *opts(phantom, out)])
    feats = np.load(out / "features.npy")
    assert feats.dtype == np.float32 and feats.shape == (8, 192)
    cols, rows = read_table(out / "features.csv")
    assert cols[:3] == ["id", "img_path", "patient_id"] and "ICH" in cols and "coordX" in cols
    assert [r["id"] for r in rows] == phantom["ids"]
    assert all(os.path.isabs(r["img_path"]) and r["img_path"].endswith(f"{r['id']}.nii.gz") for r in rows)
    np.testing.assert_allclose(feats, reference, atol=2e-5)
    saved = json.loads((out / "features.json").read_text())
    assert saved["n"] == 8 and saved["embed_dim"] == 192 and saved["tokens"] is None and saved["pool"] == "cls"
    assert info["n"] == 8 and (out / "config.yaml").is_file() and not (out / "parts").exists()
    # the same command again finds the features up to date and leaves them alone
    mtime = (out / "features.npy").stat().st_mtime_ns
    ef.main(["--no-progress", *opts(phantom, out)])
    assert (out / "features.npy").stat().st_mtime_ns == mtime
    assert "nothing to do" in (out / "log.txt").read_text()


def test_tokens_with_mean_pool(phantom, tmp_path) -> None:
    out = tmp_path / "tok"
    ef.main(["--tokens", "--no-progress", *opts(phantom, out, "MODEL.POOL", "mean")])
    feats, toks = np.load(out / "features.npy"), np.load(out / "tokens.npy")
    assert toks.dtype == np.float16 and toks.shape == (8, 27, 192)
    np.testing.assert_allclose(feats, toks.astype(np.float32).mean(axis=1), atol=2e-2)
    info = json.loads((out / "features.json").read_text())
    assert info["tokens"]["grid"] == [3, 3, 3] and info["tokens"]["shape"] == [8, 27, 192]


def test_resume_skips_written_parts_and_refuses_other_settings(phantom, reference, tmp_path, monkeypatch) -> None:
    out = tmp_path / "resume"
    written = []
    real = ef._write_part

    def write_then_stop(out_dir, bound, *a, **kw):
        if written:
            raise KeyboardInterrupt("simulated preemption")
        real(out_dir, bound, *a, **kw)
        written.append(bound[0])

    monkeypatch.setattr(ef, "_write_part", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        ef.main(["--no-progress", "--part-size", "3", *opts(phantom, out)])
    monkeypatch.setattr(ef, "_write_part", real)
    parts = sorted((out / "parts").glob("part_*.npz"))
    assert [p.name for p in parts] == ["part_000000.npz"] and not list((out / "parts").glob("*.tmp"))
    first = parts[0].stat().st_mtime_ns
    assert not (out / "features.npy").exists()

    with pytest.raises(RuntimeError, match=r"other settings \(changed: \['model'\]\)"):
        ef.main(["--no-progress", "--part-size", "3", *opts(phantom, out, "MODEL.POOL", "mean")])

    ef.main(["--no-progress", "--part-size", "3", "--keep-parts", *opts(phantom, out)])
    assert (out / "parts" / "part_000000.npz").stat().st_mtime_ns == first  # not redone
    assert "3 parts of 3; 2 to do, 1 done" in (out / "log.txt").read_text()
    np.testing.assert_allclose(np.load(out / "features.npy"), reference, atol=2e-5)
    assert [r["id"] for r in read_table(out / "features.csv")[1]] == phantom["ids"]


def test_bad_rows_skipped_or_raised(phantom, tmp_path) -> None:
    cols, rows = read_table(phantom["csv"])
    bad = dict(rows[2], img_path=str(phantom["root"] / "images" / "gone.nii.gz"), id="gone")
    manifest = tmp_path / "with_bad.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows([{**r, "img_path": str(phantom["root"] / r["img_path"])} for r in rows[:3]] + [bad]
                    + [{**r, "img_path": str(phantom["root"] / r["img_path"])} for r in rows[3:5]])
    base = opts(phantom, tmp_path / "skip")
    base[base.index("DATA.TEST_CSV") + 1] = str(manifest)
    ef.main(["--no-progress", "--part-size", "2", *base, "DATA.ON_ERROR", "skip"])
    out = tmp_path / "skip"
    ids = [r["id"] for r in read_table(out / "features.csv")[1]]
    assert ids == [r["id"] for r in rows[:5]] and len(np.load(out / "features.npy")) == 5
    assert "gone.nii.gz" in (out / "skipped.csv").read_text()
    assert json.loads((out / "features.json").read_text())["n_skipped"] == 1
    base[base.index("OUTPUT") + 1] = str(tmp_path / "raise")
    with pytest.raises(BadInputError, match="gone.nii.gz"):
        ef.main(["--no-progress", *base])


def test_test_csv_is_required(phantom, tmp_path) -> None:
    with pytest.raises(SystemExit):
        ef.main(["--cfg", "configs/demo/mae.yaml", "--opts", "DATA.TEST_CSV", "", "OUTPUT", str(tmp_path)])
    cfg = get_config(["--opts", "DATA.TEST_CSV", "", "OUTPUT", str(tmp_path)])
    with pytest.raises(ValueError, match="DATA.TEST_CSV is empty"):
        ef.extract_features(cfg)


@pytest.mark.slow
def test_two_processes_give_the_single_process_result(phantom, tmp_path) -> None:
    one = tmp_path / "one"
    ef.main(["--no-progress", "--tokens", *opts(phantom, one)])
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tools.extract_features", "--no-progress", "--tokens", "--part-size", "3", *opts(phantom, two)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(two / "features.npy"), np.load(one / "features.npy"), atol=2e-5)
    np.testing.assert_allclose(np.load(two / "tokens.npy").astype(np.float32),
                               np.load(one / "tokens.npy").astype(np.float32), atol=2e-2)
    assert (two / "features.csv").read_text() == (one / "features.csv").read_text()
    assert "2 process(es)" in (two / "log.txt").read_text()


@pytest.mark.slow
def test_pretrain_extract_retrieve_end_to_end(phantom, tmp_path) -> None:
    """Mechanics after a tiny MAE pretraining; then a supervised-signal sanity case on the same table."""
    import main_pretrain_mae
    from tools.retrieval import main as retrieval_main

    run = tmp_path / "mae"
    main_pretrain_mae.main(["--cfg", "configs/demo/mae.yaml", "--opts", *TINY, "DATA.TRAIN_CSV", str(phantom["csv"]),
                            "DATA.VAL_CSV", "", "TRAIN.EPOCHS", "2", "TRAIN.WARMUP_EPOCHS", "1",
                            "DATA.BATCH_SIZE", "4", "MAE.VIS_EVERY", "0", "OUTPUT", str(run)])
    dist.cleanup()
    feats_dir = tmp_path / "feats"
    argv = opts(phantom, feats_dir)
    argv[argv.index("MODEL.PRETRAINED") + 1] = str(run / "backbone.pth")
    ef.main(["--no-progress", *argv])
    res = retrieval_main(["--features", str(feats_dir), "--labels", "ICH,Fracture", "--k", "3",
                          "--group-column", "patient_id", "--out", str(tmp_path / "r.json"),
                          "--index", str(tmp_path / "nn.csv")])
    ich = res["labels"]["ICH"]
    assert ich["n_queries"] >= 1 and 0 <= ich["map_at_k"] <= 1 and 0 < ich["map_chance"] < 1
    assert 0 <= ich["precision_at_k"] <= 1 and 0 < ich["precision_chance"] < 1

    # sanity: features carrying the label (plus noise) must retrieve far above chance
    rows = read_table(feats_dir / "features.csv")[1]
    y = np.array([float(r["ICH"]) for r in rows])
    noise = np.random.default_rng(0).normal(scale=0.3, size=(len(y), 4))
    np.save(feats_dir / "features.npy", np.concatenate([y[:, None], 1 - y[:, None], np.zeros((len(y), 2))], 1)
            .astype(np.float32) + noise.astype(np.float32))
    sane = retrieval_main(["--features", str(feats_dir), "--labels", "ICH", "--k", "3", "--group-column",
                           "patient_id", "--out", str(tmp_path / "s.json")])["labels"]["ICH"]
    assert sane["map_at_k"] > sane["map_chance"] + 0.3


def test_missing_checkpoint_fails_before_writing_parts(phantom, tmp_path) -> None:
    argv = opts(phantom, tmp_path / "x")
    argv[argv.index("MODEL.PRETRAINED") + 1] = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ef.main(["--no-progress", *argv])
    assert not (tmp_path / "x" / "parts").exists()
