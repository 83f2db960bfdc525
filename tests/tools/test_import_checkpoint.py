"""tools/import_checkpoint.py: the command writes backbone.pth, model.yaml and import.json, prints what it
dropped, and reports a checkpoint it cannot import as one line with exit status 2."""
from __future__ import annotations

import json

import pytest
import torch

from tools.import_checkpoint import cli, main


def _fmcib_file(path):
    from monai.networks.nets.resnet import ResNet

    torch.manual_seed(0)
    trunk = ResNet(block="bottleneck", layers=[3, 4, 6, 3], block_inplanes=[4, 8, 16, 32], spatial_dims=3,
                   n_input_channels=1, conv1_t_stride=2, widen_factor=2, feed_forward=False)
    torch.save({"trunk_state_dict": trunk.state_dict(), "head_state_dict": {"0.weight": torch.zeros(8, 256)}}, path)


def test_command_writes_backbone_yaml_and_report(tmp_path, capsys):
    _fmcib_file(tmp_path / "model_weights.torch")
    out = tmp_path / "fmcib" / "backbone.pth"
    assert main(["--format", "fmcib", "--in", str(tmp_path / "model_weights.torch"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dropped 1: projection head" in text and "MODEL.NAME = resnet50" in text
    assert "python -m tools.extract_features --cfg" in text
    assert out.is_file() and (out.parent / "model.yaml").is_file()
    report = json.loads((out.parent / "import.json").read_text())
    assert report["dropped"] == {"head_state_dict.0.weight": "projection head (SimCLR), not part of the trunk"}
    assert report["settings"]["MODEL.FEATURE_SIZE"] == 8 and len(report["sha256"]) == 64
    assert len(torch.load(out, weights_only=True)) == report["tensors"]


def test_command_errors_are_one_line(tmp_path, capsys):
    torch.save({"trunk_state_dict": {"conv1.weight": torch.zeros(8, 1, 7, 7, 7), "mystery": torch.zeros(2)}},
               tmp_path / "bad.torch")
    assert cli(["--format", "fmcib", "--in", str(tmp_path / "bad.torch"), "--out", str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("import_checkpoint: error: ") and err.count("\n") == 1 and "resnet" in err
    assert not (tmp_path / "o.pth").exists()
    assert cli(["--format", "fmcib", "--in", str(tmp_path / "none.torch"), "--out", str(tmp_path / "o.pth")]) == 2
    assert "none.torch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--format", "fmcib", "--in", "x", "--out", "y", "--entry", "teacher"])


def test_imported_ctfm_through_model_yaml_extracts_the_source_features(tmp_path):
    """The worked path on the phantom: import a CT-FM-layout encoder, then tools.extract_features with
    --cfg model.yaml gives the source encoder's embedding of each evaluation view."""
    import csv

    import numpy as np
    from monai.networks.nets.segresnet_ds import SegResEncoder

    import tools.extract_features as ef
    from config import get_config
    from data.datasets import VolumeDataset
    from data.manifest import Manifest
    from data.phantom import write_dataset
    from data.views import SingleView

    torch.manual_seed(0)
    enc = SegResEncoder(spatial_dims=3, init_filters=4, in_channels=1, blocks_down=(1, 2, 2, 4, 4)).eval()
    (tmp_path / "hub").mkdir()
    torch.save(enc.state_dict(), tmp_path / "hub" / "encoder.pt")
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"init_filters": 4, "blocks_down": [1, 2, 2, 4, 4]}))
    out = tmp_path / "ctfm" / "backbone.pth"
    assert main(["--format", "ct-fm", "--in", str(tmp_path / "hub" / "encoder.pt"), "--out", str(out)]) == 0

    paths = write_dataset(tmp_path / "phantom", n=3, size=32, seed=1)
    with open(paths["train"], newline="") as f:
        n_rows = sum(1 for _ in csv.DictReader(f))
    small = ["DATA.SPACING", "[8.0, 8.0, 8.0]", "DATA.ROI", "[32, 32, 32]", "DATA.NUM_WORKERS", "0",
             "DATA.TEST_CSV", str(paths["train"]), "OUTPUT", str(tmp_path / "feats")]
    ef.main(["--no-progress", "--cfg", str(out.parent / "model.yaml"), "--opts", *small])
    feats = np.load(tmp_path / "feats" / "features.npy")
    cfg = get_config(["--cfg", str(out.parent / "model.yaml"), "--opts", *small])
    ds = VolumeDataset(Manifest.read(cfg.DATA.TEST_CSV), cfg, SingleView(cfg, train=False))
    with torch.no_grad():
        spl = [ds[i]["image"][None].permute(0, 1, 4, 3, 2).flip(3, 4) for i in range(len(ds))]  # RAS -> SPL
        ref = np.stack([enc(v)[-1].mean(dim=(2, 3, 4))[0].numpy() for v in spl])
    assert feats.shape == ref.shape == (n_rows, 64)
    assert np.abs(feats - ref).max() <= 1e-5
