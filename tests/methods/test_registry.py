"""methods/registry.py: every registered method trains one step on the batch of its own view; the
entry scripts take method, view and evaluator from the registry (the benchmarks: tests/benchmarks);
unknown names fail."""
import numpy as np
import pytest
import torch

import main_downstream
import main_pretrain_alice
import main_pretrain_dino
import main_pretrain_mae
import main_pretrain_simclr
from config import get_config
from data.datasets import collate
from data.views import DINOViews, SimCLRViews, SingleView
from engine.launch import build_backbone_from_cfg
from methods import registry
from evaluation.knn import KNNMonitor
from methods.alice import Alice
from methods.dino import DINO
from methods.mae import MAE
from methods.registry import DOWNSTREAM_VIEW, METHODS, get_method
from methods.simclr import SimCLR

TINY = ["DATA.ROI", "[16, 16, 16]", "MODEL.NAME", "vit_tiny", "MODEL.PATCH_SIZE", "[8, 8, 8]",
        "DINO.LOCAL_CROP_SIZE", "[8, 8, 8]", "DINO.LOCAL_CROPS_NUMBER", "2", "DINO.OUT_DIM", "64",
        "DINO.HEAD_HIDDEN_DIM", "32", "DINO.HEAD_BOTTLENECK_DIM", "16", "DATA.BATCH_SIZE", "2"]
ENTRIES = {"mae": main_pretrain_mae, "dino": main_pretrain_dino, "simclr": main_pretrain_simclr,
           "alice": main_pretrain_alice}


def tiny_cfg(name: str, *extra: str):
    return get_config(["--cfg", f"configs/demo/{name}.yaml", "--opts", *TINY, *extra])


def head(seed: int) -> np.ndarray:
    """An int16 HU cube: air around a skull around brain."""
    r = np.sqrt(sum(g ** 2 for g in np.meshgrid(*[np.linspace(-1, 1, 24)] * 3, indexing="ij")))
    hu = np.where(r < 0.9, 900, -1000) + np.where(r < 0.8, 35 - 900, 0)
    return (hu + np.random.default_rng(seed).normal(0, 5, hu.shape)).astype(np.int16)


def test_registered_names_and_classes():
    assert set(METHODS) == {"mae", "dino", "simclr", "alice"}
    assert [METHODS[n].cls for n in ("mae", "dino", "simclr", "alice")] == [MAE, DINO, SimCLR, Alice]
    assert all(m.name == n for n, m in METHODS.items())
    assert get_method("dino") is METHODS["dino"]
    with pytest.raises(ValueError, match=r"unknown method 'byol'; registered: \['alice', 'dino', 'mae', 'simclr'\]"):
        get_method("byol")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_trains_on_its_own_view(name):
    cfg = tiny_cfg(name)
    method = get_method(name)
    view = method.build_view(cfg, True)
    meta = {"spacing": (1.0, 1.0, 1.0), "affine": np.eye(4), "coord": None, "path": "p", "id": "s"}
    batch = collate([dict(view(head(i), meta, np.random.default_rng(i)), index=i, id=f"s{i}", skipped=[])
                     for i in range(2)])
    torch.manual_seed(0)
    model = method.cls(cfg, build_backbone_from_cfg(cfg))
    out = model(batch)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    assert any(p.grad is not None for p in model.parameters())


def test_views_are_those_the_entry_scripts_built(monkeypatch):
    cfg = tiny_cfg("simclr")
    assert repr(METHODS["mae"].build_view(cfg, True)) == repr(SingleView(cfg, train=True))
    assert repr(METHODS["mae"].build_view(cfg, False)) == repr(SingleView(cfg, train=False))
    assert DOWNSTREAM_VIEW is registry.single_view
    assert repr(METHODS["dino"].build_view(cfg, True)) == repr(DINOViews(cfg))  # no CUDA: all in the workers
    assert repr(METHODS["simclr"].build_view(cfg, False)) == repr(SimCLRViews(cfg, train=False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # on a GPU the device stage takes over
    dino = METHODS["dino"].build_view(cfg, True)
    assert dino.device_stage and dino.device_resize
    assert METHODS["simclr"].build_view(cfg, True).device_stage


def test_dino_evaluator_follows_knn_every(tmp_path):
    from data.phantom import write_dataset
    write_dataset(tmp_path, n=4, size=16, seed=0)
    assert METHODS["dino"].evaluator(tiny_cfg("dino", "DINO.KNN_EVERY", "0")) is None
    knn = METHODS["dino"].evaluator(tiny_cfg("dino", "DINO.KNN_EVERY", "1", "DATA.VAL_CSV",
                                             str(tmp_path / "val.csv")))
    assert isinstance(knn, KNNMonitor)
    assert METHODS["mae"].evaluator(tiny_cfg("mae")) is None


def test_knn_monitor_gives_no_score_on_collapsed_features(tmp_path, monkeypatch, caplog):
    from data.phantom import write_dataset
    write_dataset(tmp_path, n=12, size=16, seed=0)
    knn = METHODS["dino"].evaluator(tiny_cfg("dino", "DINO.KNN_EVERY", "1", "DINO.KNN_K", "20", "DATA.VAL_CSV",
                                             str(tmp_path / "val.csv")))
    labels = np.array([0.0, 1.0] * 3)
    monkeypatch.setattr(knn, "rank_agreement", lambda method: {})
    monkeypatch.setattr(knn, "features", lambda method: (np.ones((6, 4)), labels))
    out = knn(None, 0)
    assert out["knn_k"] == 2 and "score" not in out and "knn_auroc" not in out
    assert "using k = 2" in caplog.text and "collapsed" in caplog.text
    monkeypatch.setattr(knn, "features", lambda method: (np.random.default_rng(0).normal(size=(6, 4)), labels))
    out = knn(None, 0)
    assert out["score"] == out["knn_auroc"]


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_entry_scripts_hand_the_registry_entry_to_the_engine(monkeypatch, name):
    seen = {}
    monkeypatch.setattr(ENTRIES[name], "pretrain", lambda cfg, cls, build_view, evaluator=None:
                        seen.update(cls=cls, build_view=build_view, evaluator=evaluator))
    ENTRIES[name].main(["--cfg", f"configs/demo/{name}.yaml", "--opts", *TINY, "DINO.KNN_EVERY", "0"])
    assert seen == {"cls": METHODS[name].cls, "build_view": METHODS[name].build_view, "evaluator": None}


def test_downstream_entry_uses_the_registry_view(monkeypatch):
    seen = {}
    monkeypatch.setattr(main_downstream, "run_downstream", lambda cfg, build_view: seen.update(view=build_view))
    main_downstream.main(["--cfg", "configs/demo/downstream.yaml"])
    assert seen["view"] is DOWNSTREAM_VIEW

