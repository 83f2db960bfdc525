"""Smoke tests of the benchmarks: each runs for a second or two on tiny inputs and writes valid JSON.

No timing is asserted (the numbers depend on the machine); only that every script runs end to end
through the project's real code paths and reports what its README section promises.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import data_pipeline, data_wait, manifest_scale, preprocess, reference_dino, train_step

@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread during each test, restored after (two threads spin badly on a busy 2-core box)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = ["DATA.ROI", "[16,16,16]", "MODEL.NAME", "vit_tiny", "MODEL.PATCH_SIZE", "[8,8,8]"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Two small synthetic heads (4 mm), a manifest and their preprocessing cache."""
    import nibabel as nib

    from config import get_defaults
    from data.cache import preprocess_manifests
    root = tmp_path_factory.mktemp("bench_data")
    rows = ["img_path,id,ICH"]
    for i in range(2):
        hu = train_step.synthetic_head((28, 28, 24), seed=i)
        nib.save(nib.Nifti1Image(hu, np.diag([4.0, 4.0, 4.0, 1.0])), str(root / f"h{i}.nii.gz"))
        rows.append(f"h{i}.nii.gz,h{i},{i}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = get_defaults()
    cfg.DATA.SPACING = [4.0, 4.0, 4.0]
    cfg.DATA.CACHE_DIR = str(root / "cache")
    preprocess_manifests(cfg, [str(root / "m.csv")], num_workers=0, progress=False, log=lambda s: None)
    return root


def pipeline_opts(root, *extra):
    return ["--opts", "DATA.TRAIN_CSV", str(root / "m.csv"), "DATA.CACHE_DIR", str(root / "cache"),
            "DATA.SPACING", "[4.0,4.0,4.0]", "DATA.NUM_WORKERS", "0", "DATA.BATCH_SIZE", "2",
            "DINO.LOCAL_CROP_SIZE", "[8,8,8]", "DINO.LOCAL_CROPS_NUMBER", "2", "SIMCLR.CROP_SIZE", "[16,16,16]",
            *TINY, *extra]


def test_infer_method_from_config_path():
    assert data_pipeline.infer_method("configs/dino/vit_base.yaml") == "dino"
    assert data_pipeline.infer_method("configs/demo/simclr.yaml") == "simclr"
    assert data_pipeline.infer_method("configs/downstream/cq500_ich.yaml") == "downstream"
    assert data_pipeline.infer_method("x.yaml", "mae") == "mae"
    with pytest.raises(ValueError, match="--method"):
        data_pipeline.infer_method("configs/other.yaml")


@pytest.mark.parametrize("method", ["mae", "dino", "simclr"])
def test_data_pipeline_writes_json(tiny_data, tmp_path, method):
    out = tmp_path / "r.json"
    data_pipeline.main(["--method", method, "--seconds", "0.3", "--warmup", "0", "--repeat", "2",
                        "--workdir", str(tmp_path / "w"), "--device", "cpu", "--json", str(out),
                        *pipeline_opts(tiny_data)])
    r = json.loads(out.read_text())
    for key in ("samples_per_s", "method", "num_workers", "batch_size", "cpu_cores", "seconds", "machine", "date",
                "samples_per_cpu_s", "voxels_per_sample"):
        assert key in r, key
    assert r["method"] == method and r["samples"] > 0 and r["samples_per_s"] > 0


def test_data_pipeline_reference_baseline_ratio(tiny_data, tmp_path, monkeypatch):
    # the reference geometry shrunk 7x so the test takes a second (canvas 32, crops 16..32 / 8..16, out 16)
    for name, value in (("CANVAS", 32), ("GLOBAL_SIZE", (16, 32)), ("LOCAL_SIZE", (8, 16)), ("LOCAL_REGION", 24),
                        ("OUT", 16)):
        monkeypatch.setattr(reference_dino, name, value)
    out = tmp_path / "r.json"
    data_pipeline.main(["--method", "dino", "--baseline", "reference", "--seconds", "0.3", "--warmup", "0",
                        "--repeat", "2", "--workdir", str(tmp_path / "w"), "--device", "cpu", "--json", str(out),
                        *pipeline_opts(tiny_data)])
    r = json.loads(out.read_text())
    assert r["baseline"]["name"] == "reference" and r["baseline"]["samples"] > 0
    assert r["ratio"] == pytest.approx(r["samples_per_s"] / r["baseline"]["samples_per_s"])
    assert r["baseline"]["shapes"]["global"] == [2, 2, 3, 16, 16, 16]


def test_reference_views_shapes_and_padding():
    x = np.random.default_rng(0).random((3, 96, 96, 96)).astype(np.float16)
    import torch
    out = reference_dino.reference_views(torch.from_numpy(x).float(), np.random.default_rng(0))
    assert out["global"].shape == (2, 3, 96, 96, 96) and out["local"].shape == (2, 3, 96, 96, 96)


def test_train_step_writes_json(tmp_path):
    out = tmp_path / "t.json"
    train_step.main(["--cfg", "configs/demo/mae.yaml", "--compile", "off", "--steps", "1", "--warmup", "0",
                     "--batch-size", "1", "--device", "cpu", "--json", str(out), "--opts", *TINY])
    r = json.loads(out.read_text())
    (case,) = r["cases"]
    assert case["method"] == "mae" and case["samples_per_s"] > 0 and case["flops_per_step"] > 0
    assert case["step_s"]["n"] == 1 and "peak_rss_gb" in case and case.get("mfu") is None  # no peak on CPU


@pytest.mark.parametrize("method,cfg,extra", [
    ("dino", "configs/demo/dino.yaml", ["DINO.LOCAL_CROP_SIZE", "[8,8,8]", "DINO.LOCAL_CROPS_NUMBER", "2",
                                        "DINO.OUT_DIM", "64", "DINO.HEAD_HIDDEN_DIM", "32",
                                        "DINO.HEAD_BOTTLENECK_DIM", "16"]),
    ("simclr", "configs/demo/simclr.yaml", ["SIMCLR.CROP_SIZE", "[16,16,16]", "SIMCLR.PROJ_HIDDEN_DIM", "32"]),
    ("finetune", "configs/demo/mae.yaml", []),
])
def test_train_step_other_methods(tmp_path, method, cfg, extra):
    out = tmp_path / "t.json"
    train_step.main(["--method", method, "--cfg", cfg, "--compile", "off", "--steps", "1", "--warmup", "0",
                     "--batch-size", "2", "--device", "cpu", "--json", str(out), "--opts", *TINY, *extra])
    (case,) = json.loads(out.read_text())["cases"]
    assert "error" not in case, case.get("error")
    assert case["method"] == method and case["samples_per_s"] > 0


def test_data_wait_fraction(tmp_path):
    rows = [{"epoch": 0, "step": 10, "data_s": 1.0, "step_s": 1.0},  # first window: 10 steps, start-up
            {"epoch": 0, "step": 20, "data_s": 0.1, "step_s": 0.9},
            {"epoch": 0, "step": 25, "data_s": 0.0, "step_s": 1.0},  # last window of the epoch: 5 steps
            {"epoch": 0, "it": 25, "loss": 1.0},  # an epoch row: no data_s, ignored
            {"epoch": 1, "step": 10, "data_s": 0.5, "step_s": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "w.json"
    r = data_wait.main(["--run", str(tmp_path), "--json", str(out)])
    data = 10 * 1.0 + 10 * 0.1 + 0 + 10 * 0.5
    total = 10 * 2 + 10 * 1 + 5 * 1 + 10 * 1
    assert r["all"]["wait_fraction"] == pytest.approx(data / total)
    assert r["all"]["steps"] == 35
    assert r["steady"]["wait_fraction"] == pytest.approx(1.0 / 15.0)  # rows at step 20 and 25 of epoch 0
    assert json.loads(out.read_text())["all"]["wait_fraction"] == pytest.approx(data / total)


def test_data_wait_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        data_wait.main(["--run", str(tmp_path / "nope")])


def test_manifest_scale_writes_json(tmp_path):
    out = tmp_path / "m.json"
    manifest_scale.main(["--rows", "500", "--volumes", "1", "--workers", "1", "--batches", "1",
                         "--workdir", str(tmp_path / "w"), "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["rows"] == 500 and r["manifest_read_s"] > 0 and r["startup_s"] > 0
    assert r["compact"]["n_workers"] == 1 and r["compact"]["uss_mb_mean"] > 0
    assert r["baseline_list_of_dicts"]["n_workers"] == 1


def test_preprocess_writes_json(tmp_path):
    out = tmp_path / "p.json"
    preprocess.main(["--volumes", "1", "--shape", "40", "40", "24", "--spacing", "6", "6", "10",
                     "--phantom-size", "24", "--target-spacing", "8", "--processes", "0", "--in-process",
                     "--workdir", str(tmp_path / "w"), "--json", str(out)])
    r = json.loads(out.read_text())
    (run,) = r["runs"]
    assert run["processes"] == 0 and run["cpu_s_per_volume"] > 0 and r["cache_entry"]["shape"]


def test_data_pipeline_counts_the_device_stage_apart(tiny_data, tmp_path):
    """--device-stage on: the DINO view defers windowing; its CPU time is counted and also reported apart."""
    out = tmp_path / "r.json"
    data_pipeline.main(["--method", "dino", "--device-stage", "on", "--seconds", "0.3", "--warmup", "0",
                        "--repeat", "2", "--workdir", str(tmp_path / "w"), "--device", "cpu", "--json", str(out),
                        *pipeline_opts(tiny_data)])
    r = json.loads(out.read_text())
    assert r["device_stage"] is True and r["device_stage_cpu_seconds"] > 0
    assert r["shapes"]["global"] == [2, 2, 3, 16, 16, 16] and r["dtypes"]["global"] == "float32"  # model-ready
    assert r["samples_per_cpu_s_without_device_stage"] >= r["samples_per_cpu_s"]


def test_benchmarks_build_the_registry_views():
    """The view and method of each benchmarked pipeline come from methods/registry.py."""
    from config import get_config
    from methods.dino import DINO
    from methods.registry import DOWNSTREAM_VIEW, METHODS
    cfg = get_config(["--cfg", "configs/demo/dino.yaml", "--opts", "DATA.ROI", "[16, 16, 16]", "MODEL.NAME",
                      "vit_tiny", "MODEL.PATCH_SIZE", "[8, 8, 8]", "DINO.LOCAL_CROP_SIZE", "[8, 8, 8]"])
    assert repr(data_pipeline.build_view(cfg, "dino")) == repr(METHODS["dino"].build_view(cfg, True))
    assert repr(data_pipeline.build_view(cfg, "downstream")) == repr(DOWNSTREAM_VIEW(cfg, True))
    assert repr(train_step.build_view(cfg, "finetune")) == repr(DOWNSTREAM_VIEW(cfg, True))
    assert isinstance(train_step.build_method(cfg, "dino"), DINO)
    assert set(data_pipeline.METHODS) == set(METHODS) | {"downstream"}
    assert set(train_step.METHODS) == set(METHODS) | {"finetune"}
    assert train_step.infer_method("configs/downstream/cq500_ich.yaml") == "finetune"
    assert train_step.infer_method("configs/demo/simclr.yaml") == "simclr"


def test_train_step_views_finish_their_crops_in_the_workers(monkeypatch):
    """On a GPU the entry scripts' DINO / SimCLR views defer work to the device; the step benchmark
    times the model alone, on finished crops."""
    import torch

    from config import get_config
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = get_config(["--cfg", "configs/demo/dino.yaml"])
    dino = train_step.build_view(cfg, "dino")
    assert not dino.device_stage and not dino.device_resize
    assert not train_step.build_view(cfg, "simclr").device_stage


ATLAS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "head_atlas" / "ct_brain_atlas_1mm.nii.gz"


@pytest.mark.slow
@pytest.mark.skipif(not ATLAS.is_file(), reason=f"{ATLAS} (shared data) not present")
def test_alice_matching_writes_json_and_figure(tmp_path):
    from benchmarks import alice_matching
    doc = alice_matching.main(["--phantoms", "2", "--size", "96", "--points", "50", "--json", str(tmp_path / "m.json"),
                               "--figure", str(tmp_path / "m.png")])
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["phantom_matching_via_phantom_template"]["pairs"] == 2  # both ordered pairs of 2 registered heads
    assert saved["phantom_matching_via_phantom_template"]["mean_mm"] < 15
    atlas = [r for r in saved["real_scans"] if r["scan"] == "atlas_random_affine"][0]
    assert atlas["ok"] and atlas["error_at_brain_voxels"]["max_mm"] < 2  # a known affine, recovered
    assert doc["cpu_seconds_per_registration"]["mean"] > 0 and (tmp_path / "m.png").stat().st_size > 10_000
