"""DINO: schedules over the global iteration, EMA-only teacher, centre (training
only, identical on ranks), last-layer freeze, state and backbone.pth, iBOT/KoLeo; end to end
in one process, under torchrun (Gloo, 2 ranks) and across SIGTERM + resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from config import get_defaults
from engine.checkpoint import load_state_strict
from engine.optim import param_groups
from engine.schedules import cosine
from methods.dino import DINO, random_patch_mask
from models.vit3d import VisionTransformer3D

ROOT = Path(__file__).resolve().parents[2]


def tiny_cfg(**dino):
    cfg = get_defaults()
    cfg.DATA.ROI = [16, 16, 16]
    cfg.DATA.WINDOWS = ["brain"]
    cfg.DINO.OUT_DIM = 32
    cfg.DINO.HEAD_HIDDEN_DIM = 16
    cfg.DINO.HEAD_BOTTLENECK_DIM = 8
    cfg.DINO.LOCAL_CROPS_NUMBER = 2
    cfg.TRAIN.EPOCHS = 3
    for k, v in dino.items():
        cfg.DINO[k] = v
    return cfg


def tiny_vit(mask_token=False):
    return VisionTransformer3D(img_size=16, patch_size=8, in_chans=1, width=32, depth=2, num_heads=2,
                               use_mask_token=mask_token)


def tiny_method(seed=0, **dino):
    torch.manual_seed(seed)
    cfg = tiny_cfg(**dino)
    return DINO(cfg, tiny_vit(mask_token=cfg.DINO.IBOT_WEIGHT > 0))


def batch(b=3, g=2, n_local=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {"global": torch.rand(b, g, 1, 16, 16, 16, generator=gen),
            "local": torch.rand(b, n_local, 1, 8, 8, 8, generator=gen)}


# ------------------------------------------------------------------------------------------- masks
def test_random_patch_mask_ratios():
    m = random_patch_mask(5, 8, (0.25, 0.5), torch.device("cpu"))
    assert m.shape == (5, 8) and ((m.sum(1) >= 2) & (m.sum(1) <= 4)).all()


# ------------------------------------------------------------------------------------- schedules
def test_schedules_follow_the_global_iteration_without_restart():
    m = tiny_method(WARMUP_TEACHER_TEMP_EPOCHS=2)
    epochs, ipe = 3, 4
    total = epochs * ipe
    moms, temps = [], []
    for epoch in range(epochs):
        for step in range(ipe):
            it = epoch * ipe + step
            m.on_step_start(it, epoch, total)
            moms.append(m.momentum)
            temps.append(m.teacher_temp)
    assert moms == [cosine(i, 0.996, 1.0, total) for i in range(total)]
    assert all(a < b for a, b in zip(moms, moms[1:]))  # never drops back at an epoch boundary
    assert temps[0] == pytest.approx(0.04) and temps[2 * ipe:] == [pytest.approx(0.07)] * ipe
    assert all(a < b for a, b in zip(temps[:2 * ipe], temps[1:2 * ipe + 1]))  # linear over 2 epochs of iterations


# ----------------------------------------------------------------------------------- teacher, EMA
def test_teacher_gets_no_gradient_and_changes_only_by_ema():
    m = tiny_method()
    groups = param_groups(m)
    names = [n for g in groups for n in g["names"]]
    assert names and not any(n.startswith("teacher.") for n in names)  # never optimised
    opt = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=1e-2)
    m.train()
    m.on_step_start(5, 1, 12)
    out = m(batch())
    out["loss"].backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert all(not p.requires_grad for p in m.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())
    old = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    opt.step()
    assert all(torch.equal(old[k], v) for k, v in m.teacher.state_dict().items())  # the step leaves it alone
    m.on_step_end(5)
    mom = cosine(5, 0.996, 1.0, 12)
    student = dict(m.backbone.named_parameters())
    for n, p in m.teacher["backbone"].named_parameters():
        assert torch.allclose(p, mom * old["backbone." + n] + (1 - mom) * student[n], atol=1e-7), n


def test_ddp_reduces_the_student_only():
    """DDP averages only parameters that require a gradient; the teacher has none (no private ignore hook)."""
    m = tiny_method(IBOT_WEIGHT=0.5)
    assert not hasattr(m, "_ddp_params_and_buffers_to_ignore")
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert {"center", "patch_center", "center_ready"} <= {n for n, _ in m.named_buffers()}


def test_center_updated_in_training_only_and_first_batch_sets_it():
    m = tiny_method()
    m.eval()
    with torch.no_grad():
        m(batch())
    assert torch.equal(m.center, torch.zeros_like(m.center)) and not m.center_ready  # validation: untouched
    m.train()
    x = batch()
    with torch.no_grad():
        out = m(x)
        xg = x["global"].transpose(0, 1).reshape(-1, 1, 16, 16, 16)
        t = m.teacher["head"](m.teacher["backbone"](xg))
    assert torch.allclose(m.center, t.mean(0, keepdim=True), atol=1e-6) and bool(m.center_ready)
    first = m.center.clone()
    with torch.no_grad():
        m(batch(seed=2))
    assert not torch.equal(m.center, first)
    with torch.no_grad():
        xg2 = batch(seed=2)["global"].transpose(0, 1).reshape(-1, 1, 16, 16, 16)
        t2 = m.teacher["head"](m.teacher["backbone"](xg2))
    assert torch.allclose(m.center, 0.9 * first + 0.1 * t2.mean(0, keepdim=True), atol=1e-6)
    c = m.center.clone()
    m.eval()
    with torch.no_grad():
        m(batch(seed=3))
    assert torch.equal(m.center, c)
    assert {"loss", "teacher_entropy", "kl", "teacher_temp", "momentum"} <= set(out)


def test_last_layer_frozen_for_the_first_epochs():
    m = tiny_method(FREEZE_LAST_LAYER_EPOCHS=1)
    m.train()
    m(batch())["loss"].backward()
    last = [p for p in m.head.last_layer.parameters() if p.requires_grad]
    assert last and all(p.grad is not None for p in last)
    m.on_after_backward(0)
    assert all(p.grad is None for p in m.head.last_layer.parameters())
    assert any(p.grad is not None for p in m.head.mlp.parameters())
    m.zero_grad()
    m(batch())["loss"].backward()
    m.on_after_backward(1)
    assert all(p.grad is not None for p in last)


# ------------------------------------------------------------------------------- state, backbone
def test_state_holds_student_teacher_center_and_backbone_is_teacher(tmp_path):
    from models.zoo import load_pretrained
    m = tiny_method()
    m.train()
    m.on_step_start(0, 0, 10)
    m(batch())
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)  # student != teacher
    sd = m.state_dict()
    assert any(k.startswith("teacher.backbone.") for k in sd) and any(k.startswith("teacher.head.") for k in sd)
    assert "center" in sd and "center_ready" in sd and any(k.startswith("head.") for k in sd)
    fresh = tiny_method(seed=7)
    load_state_strict(fresh, sd, "test")
    assert torch.equal(fresh.center, m.center) and bool(fresh.center_ready)
    bb = m.exported_backbone().state_dict()
    assert all(torch.equal(v, m.teacher["backbone"].state_dict()[k]) for k, v in bb.items())
    path = tmp_path / "backbone.pth"
    torch.save(bb, path)
    model = tiny_vit()
    report = load_pretrained(model, str(path), min_fraction=1.0)
    assert report["fraction"] == 1.0
    assert all(torch.equal(v, bb[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------- options, CNN
def test_ibot_and_koleo_options_train_the_mask_token():
    m = tiny_method(IBOT_WEIGHT=1.0, KOLEO_WEIGHT=0.1)
    m.train()
    out = m(batch())
    assert {"ibot_loss", "koleo", "dino_loss"} <= set(out) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert m.backbone.mask_token.grad is not None and m.backbone.mask_token.grad.abs().sum() > 0
    assert bool(m.center_ready) and m.patch_center.abs().sum() > 0


def test_ibot_needs_a_vit_with_mask_token():
    with pytest.raises(ValueError, match="mask token"):
        DINO(tiny_cfg(IBOT_WEIGHT=1.0), tiny_vit(mask_token=False))


def test_local_size_must_fit_the_patch_size():
    cfg = tiny_cfg(LOCAL_CROP_SIZE=[12, 12, 12])
    with pytest.raises(ValueError, match="DINO.LOCAL_CROP_SIZE"):
        DINO(cfg, tiny_vit())


class TinyCNN(nn.Module):
    embed_dim = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3, 4))


def test_cnn_backbone_takes_local_crops_as_they_are():
    torch.manual_seed(0)
    m = DINO(tiny_cfg(), TinyCNN())
    m.train()
    out = m(batch())
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.backbone.conv.weight.grad is not None


# ------------------------------------------------------------------------------------ end to end
E2E_OPTS = ["DATA.ROI", "[16,16,16]", "DINO.LOCAL_CROP_SIZE", "[8,8,8]", "DATA.SPACING", "[8.0,8.0,8.0]",
            "DINO.OUT_DIM", "64", "DINO.HEAD_HIDDEN_DIM", "32", "DINO.HEAD_BOTTLENECK_DIM", "16",
            "DINO.LOCAL_CROPS_NUMBER", "2", "DATA.BATCH_SIZE", "2", "DATA.NUM_WORKERS", "0",
            "TRAIN.EPOCHS", "2", "TRAIN.LOG_EVERY", "1", "TRAIN.SAVE_EVERY", "0", "DINO.KNN_EVERY", "1",
            "DINO.KNN_K", "3", "DINO.WARMUP_TEACHER_TEMP_EPOCHS", "1"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    r = subprocess.run([sys.executable, "-m", "data.phantom", "--out", str(out), "--n", "20", "--size", "32"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def run_dino(out, phantom, *opts, launcher=None, wait=True):
    cmd = (launcher or [sys.executable]) + [
        str(ROOT / "main_pretrain_dino.py"), "--cfg", str(ROOT / "configs" / "demo" / "dino.yaml"), "--opts",
        "OUTPUT", str(out), "DATA.TRAIN_CSV", str(phantom / "train.csv"), "DATA.VAL_CSV", str(phantom / "val.csv"),
        *E2E_OPTS, *opts]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# checks shared by the self-distillation methods' end-to-end tests (DINO here, Alice in test_alice_e2e.py)
def assert_backbone_pth_is_the_teacher(out: Path) -> dict:
    """``backbone.pth`` loads strictly into the run's backbone and equals the teacher's; returns the model state."""
    from config import load_config
    from models.zoo import build_backbone, load_pretrained
    sd = torch.load(out / "checkpoint_last.pth", weights_only=True)["model"]
    backbone = build_backbone(load_config(str(out / "config.yaml")))
    report = load_pretrained(backbone, str(out / "backbone.pth"), min_fraction=1.0)
    assert report["fraction"] == 1.0
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, sd["teacher.backbone." + k]), k  # backbone.pth = the teacher
    return sd


def assert_two_ranks_agree(out: Path) -> None:
    """A 2-process run: centre and teacher identical on both ranks (the k-NN monitor's checks), saved by 2."""
    assert "on 2 process(es)" in (out / "log.txt").read_text()
    epoch = [r for r in rows(out) if "epoch_s" in r][-1]
    assert epoch["rank_center_maxdiff"] == 0.0 and epoch["rank_teacher_maxdiff"] == 0.0
    state = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert state["world_size"] == 2 and bool(state["model"]["center_ready"])


def sigterm_in_epoch_1(p: subprocess.Popen, out: Path) -> None:
    """SIGTERM a run once it logs a step of epoch 1; it must checkpoint and exit with status 3, mid-epoch."""
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if (out / "metrics.jsonl").exists() and any(r.get("epoch") == 1 and "step" in r for r in rows(out)):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stdout, _ = p.communicate(timeout=300)
    assert p.returncode == 3, stdout
    cut = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert cut["epoch"] == 1 and cut["step_in_epoch"] > 0  # stopped mid-epoch


def assert_same_model_state(a: Path, b: Path) -> None:
    """Two runs' ``checkpoint_last.pth`` hold the same model state, key by key (student, teacher, centres)."""
    sa = torch.load(a / "checkpoint_last.pth", weights_only=True)["model"]
    sb = torch.load(b / "checkpoint_last.pth", weights_only=True)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def reference_run(phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("dino_ref")
    r = run_dino(out, phantom)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.mark.slow
def test_single_process_run_and_backbone_pth_loads(reference_run):
    out = reference_run
    steps = [r for r in rows(out) if "step" in r]
    assert steps and all(np.isfinite(r["loss"]) and "teacher_entropy" in r and "kl" in r for r in steps)
    epochs = [r for r in rows(out) if "epoch_s" in r]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert "val_loss" in epochs[-1] and epochs[-1]["rank_center_maxdiff"] == 0
    assert epochs[-1]["knn_k"] == min(3, max(1, (epochs[-1]["knn_n"] - 1) // 2))  # DINO.KNN_K 3, capped
    sd = assert_backbone_pth_is_the_teacher(out)
    assert "center" in sd and any(k.startswith("teacher.backbone.") for k in sd)


@pytest.mark.slow
def test_two_processes_gloo_keep_centre_and_teacher_identical(phantom, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"]
    r = run_dino(tmp_path, phantom, "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", launcher=launcher)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_two_ranks_agree(tmp_path)


@pytest.mark.slow
def test_sigterm_then_resume_restores_teacher_and_centre_exactly(phantom, reference_run, tmp_path):
    sigterm_in_epoch_1(run_dino(tmp_path, phantom, wait=False), tmp_path)
    r = run_dino(tmp_path, phantom)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout
    assert_same_model_state(reference_run, tmp_path)


def test_forward_windows_a_device_stage_batch_itself():
    """A batch of HU crops + draws (DINOViews(device_stage=True)) gives the loss of the windowed batch."""
    from data.datasets import collate
    from data.views import DINOViews
    cfg = tiny_cfg()
    hu = (np.random.default_rng(0).normal(40, 300, size=(30, 34, 28))).astype(np.int16)
    cpu, dev = DINOViews(cfg), DINOViews(cfg, device_stage=True)
    a = collate([{**cpu(hu, {}, np.random.default_rng(i)), "index": i, "id": str(i)} for i in range(3)])
    b = collate([{**dev(hu, {}, np.random.default_rng(i)), "index": i, "id": str(i)} for i in range(3)])
    m = tiny_method()
    m.eval()
    with torch.no_grad():
        la, lb = m(a)["loss"], m(b)["loss"]
    assert la.item() == pytest.approx(lb.item(), rel=1e-3)
