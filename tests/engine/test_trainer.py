"""The training loop on a toy method: contract files, exact resume after SIGTERM, two real
processes under torchrun (Gloo), non-finite loss; each parameter group's lr and weight decay at
every step of a fine-tuning run (layer-wise decay, head lr scale) against the cosine schedule."""
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

from config import get_config
from engine import dist
from engine.schedules import cosine
from engine.trainer import REQUEUE_EXIT_CODE, Trainer
from methods.classify import build_classifier
from models.zoo import build_backbone

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "tests" / "engine" / "toy_train.py")
BASE_OPTS = ["DATA.BATCH_SIZE", "4", "TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "1", "TRAIN.BASE_LR", "0.05",
             "TRAIN.LOG_EVERY", "2", "TRAIN.SAVE_EVERY", "1", "DATA.NUM_WORKERS", "0"]


def run_toy(out, *opts, env=None, launcher=None, wait=True):
    cmd = (launcher or [sys.executable]) + [TOY, "--opts", "OUTPUT", str(out), *BASE_OPTS, *opts]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    return torch.load(Path(out) / "backbone.pth", weights_only=True)


def test_run_writes_contract_files_and_loss_falls(tmp_path):
    r = run_toy(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "checkpoint_last.pth", "checkpoint_epoch1.pth",
                 "checkpoint_epoch3.pth", "backbone.pth"):
        assert (tmp_path / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    epochs = [r for r in rows(tmp_path) if "epoch_s" in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert "val_loss" in epochs[-1]
    steps = [r for r in rows(tmp_path) if "step" in r]
    for key in ("epoch", "step", "loss", "lr", "wd", "data_s", "step_s", "samples_per_s", "pred_mean"):
        assert key in steps[0], key
    state = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert state["epoch"] == 3 and state["iteration"] == 3 * 16
    assert not list(tmp_path.glob(".*tmp*")) and not (tmp_path / "run.lock").exists()  # the lock given back
    # a second start of a finished run does no work and changes nothing
    before = weights(tmp_path)
    r = run_toy(tmp_path)
    assert r.returncode == 0 and "nothing to do" in r.stdout
    assert all(torch.equal(before[k], v) for k, v in weights(tmp_path).items())


@pytest.mark.parametrize("workers", [2])
def test_sigterm_then_resume_equals_uninterrupted(tmp_path, workers):
    opts = ["DATA.NUM_WORKERS", str(workers), "TRAIN.LOG_EVERY", "1"]
    ref = tmp_path / "ref"
    r = run_toy(ref, *opts)
    assert r.returncode == 0, r.stdout + r.stderr

    cut = tmp_path / "cut"
    p = run_toy(cut, *opts, env={"TOY_SLEEP": "0.02"}, wait=False)
    deadline = time.time() + 120
    # wait until the run is inside epoch 1 (mid-run, after a finished epoch)
    while time.time() < deadline:
        if (cut / "metrics.jsonl").exists() and any(r.get("epoch") == 1 and "step" in r for r in rows(cut)):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == REQUEUE_EXIT_CODE, stdout
    assert "received SIGTERM" in stdout
    state = torch.load(cut / "checkpoint_last.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) != (3, 0)  # it really stopped early
    r = run_toy(cut, *opts)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout
    a, b = weights(ref), weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.load(cut / "checkpoint_last.pth", weights_only=True)["iteration"] == 48


def test_two_processes_gloo_one_log_one_checkpoint(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    r = run_toy(tmp_path, "TRAIN.EPOCHS", "2", launcher=launcher)
    assert r.returncode == 0, r.stdout + r.stderr
    log = (tmp_path / "log.txt").read_text()
    assert "on 2 process(es)" in log
    assert log.count("epoch 1 done") == 1  # rank 1 writes nothing
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")) == [
        "checkpoint_epoch1.pth", "checkpoint_epoch2.pth", "checkpoint_last.pth", "checkpoint_prev.pth"]
    state = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["iteration"] == 2 * 8  # 64 samples / (2 ranks x 4)


def test_sigkill_of_one_rank_then_the_same_command_resumes_from_the_step_checkpoint(tmp_path):
    """A rank killed without warning: the group fails; started again (a requeue, or torchrun
    --max-restarts), it resumes from the last step checkpoint (TRAIN.SAVE_MINUTES) and ends with the
    weights of an unbroken run. (The restart is a second launch here: torchrun's in-place restart of a
    2-rank Gloo group hung now and then in Gloo's connectFullMesh on this CPU VM, torch 2.15.)"""
    import psutil
    opts = ["TRAIN.LOG_EVERY", "1", "TRAIN.SAVE_MINUTES", "0.0001"]  # a checkpoint after every step
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {"TOY_RANK_WEIGHTS": "1"}
    ref = tmp_path / "ref"
    r = run_toy(ref, *opts, launcher=torchrun, env=env)
    assert r.returncode == 0, r.stdout + r.stderr

    cut = tmp_path / "cut"
    p = run_toy(cut, *opts, launcher=torchrun, env={**env, "TOY_SLEEP": "0.03"}, wait=False)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # mid-epoch 1, after a few step checkpoints
            if (cut / "metrics.jsonl").exists() and any(r.get("epoch") == 1 and r.get("step", 0) >= 3
                                                        for r in rows(cut)):
                break
            time.sleep(0.05)
        ranks = [c for c in psutil.Process(p.pid).children() if c.environ().get("RANK") == "1"]
        assert len(ranks) == 1
        ranks[0].send_signal(signal.SIGKILL)
        stdout, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:  # no launcher or rank outlives a failed test
            for c in psutil.Process(p.pid).children(recursive=True):
                c.kill()
            p.kill()
    assert p.returncode != 0, stdout
    r = run_toy(cut, *opts, launcher=torchrun, env=env)  # the same command again
    assert r.returncode == 0, r.stdout + r.stderr
    resumed = [line for line in (cut / "log.txt").read_text().splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and "at epoch 1 step 0" not in resumed[0]  # a step checkpoint, mid-epoch
    for rank in (0, 1):
        a, b = (torch.load(d / f"rank{rank}.pth", weights_only=True) for d in (ref, cut))
        assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6


def test_non_finite_loss_stops_naming_batch_and_saves_nothing_bad(tmp_path):
    r = run_toy(tmp_path, "TRAIN.SAVE_EVERY", "0", env={"TOY_NAN_AT": "20"})
    assert r.returncode != 0
    assert "non-finite loss" in r.stderr and "toy" in r.stderr
    state = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert state["epoch"] == 1 and state["iteration"] == 16  # the last good epoch, not the NaN step
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_non_finite_loss_skipped_when_asked_no_update_then_the_run_goes_on(tmp_path):
    ref = run_toy(tmp_path / "ref", "TRAIN.EPOCHS", "2")
    skip = run_toy(tmp_path / "skip", "TRAIN.EPOCHS", "2", "TRAIN.ON_NONFINITE", "skip", env={"TOY_NAN_AT": "20-21"})
    assert ref.returncode == 0 and skip.returncode == 0, skip.stdout + skip.stderr
    log = (tmp_path / "skip" / "log.txt").read_text()
    assert "non-finite loss at epoch 1 iteration 20: step skipped (no update), 1 in a row" in log
    assert "iteration 21: step skipped (no update), 2 in a row" in log and "ids toy" in log
    epochs = [r for r in rows(tmp_path / "skip") if "epoch_s" in r]
    assert "skipped_steps" not in epochs[0] and epochs[1]["skipped_steps"] == 2.0
    assert all(np.isfinite(r["loss"]) for r in rows(tmp_path / "skip") if "loss" in r)
    state = torch.load(tmp_path / "skip" / "checkpoint_last.pth", weights_only=True)
    assert state["iteration"] == 32 and state["nonfinite_streak"] == 0
    assert int(state["model"]["steps_seen"]) == 30  # on_step_end (an EMA update) skipped with the step
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "skip")
    assert all(torch.isfinite(v).all() for v in b.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two steps fewer: not the reference run


def test_non_finite_loss_skipping_stops_after_max_in_a_row(tmp_path):
    r = run_toy(tmp_path, "TRAIN.ON_NONFINITE", "skip", "TRAIN.MAX_SKIPPED_STEPS", "3", env={"TOY_NAN_AT": "5-100"})
    assert r.returncode != 0
    assert "3 steps in a row had a non-finite loss (TRAIN.MAX_SKIPPED_STEPS = 3), the last at epoch 0 " \
           "iteration 7" in r.stderr


def test_non_finite_loss_on_one_rank_every_rank_skips_the_same_step(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29565"]
    r = run_toy(tmp_path, "TRAIN.EPOCHS", "2", "TRAIN.ON_NONFINITE", "skip", launcher=launcher,
                env={"TOY_NAN_AT": "10", "TOY_NAN_RANK": "1", "TOY_RANK_WEIGHTS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    log = (tmp_path / "log.txt").read_text()
    assert log.count("step skipped") == 1
    assert "iteration 10: step skipped (no update), 1 in a row; rank 1: loss nan ids toy" in log
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1))
    assert int(w0["steps_seen"]) == int(w1["steps_seen"]) == 15  # 16 steps, one skipped on both ranks
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


def test_a_run_whose_weights_did_not_move_says_so(tmp_path):
    r = run_toy(tmp_path, "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.ON_NONFINITE", "skip",
                "TRAIN.MAX_SKIPPED_STEPS", "100", env={"TOY_NAN_AT": "0-15"})
    assert r.returncode == 0, r.stderr
    assert "the trainable weights did not change in this run (16 optimizer steps in all)" in r.stdout + r.stderr
    r = run_toy(tmp_path / "moves")
    assert r.returncode == 0 and "did not change" not in r.stdout + r.stderr


def test_a_schedule_that_never_leaves_lr_0_is_refused(tmp_path):
    r = run_toy(tmp_path, "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "1")
    assert r.returncode != 0 and "TRAIN.WARMUP_EPOCHS = 1 covers the whole run (TRAIN.EPOCHS = 1)" in r.stderr
    r = run_toy(tmp_path, "TRAIN.BASE_LR", "0.0", "TRAIN.MIN_LR", "0.0")
    assert r.returncode != 0 and "every optimizer step would have lr 0" in r.stderr
    assert not (tmp_path / "backbone.pth").exists()


class Volumes(torch.utils.data.Dataset):
    """n random 16^3 volumes with a binary label; keys are ``index`` or ``(index, epoch)``."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        g = torch.Generator().manual_seed(index)
        return {"image": torch.rand(1, 16, 16, 16, generator=g), "label": torch.tensor([float(index % 2)]),
                "index": index}


def test_each_group_gets_its_scaled_lr_and_wd_at_every_step(tmp_path):
    # 8 samples, batch 2, 2 accumulation steps: 2 optimizer steps per epoch, 6 in all, 2 of warm-up
    cfg = get_config(["--opts", "OUTPUT", str(tmp_path), "MODEL.NAME", "vit_tiny", "MODEL.PATCH_SIZE", "[8, 8, 8]",
                      "DATA.ROI", "[16, 16, 16]", "DATA.WINDOWS", "['brain']", "DATA.BATCH_SIZE", "2",
                      "DATA.NUM_WORKERS", "0", "TRAIN.ACCUM_STEPS", "2", "TRAIN.EPOCHS", "3",
                      "TRAIN.WARMUP_EPOCHS", "1", "TRAIN.BASE_LR", "0.1", "TRAIN.MIN_LR", "1e-4",
                      "TRAIN.WEIGHT_DECAY", "0.1", "TRAIN.WEIGHT_DECAY_END", "0.3", "TRAIN.LAYER_DECAY", "0.5",
                      "TRAIN.LOG_EVERY", "1", "TRAIN.SAVE_EVERY", "0", "DOWNSTREAM.LABELS", "['ICH']",
                      "DOWNSTREAM.HEAD_LR_SCALE", "7.0"])
    torch.manual_seed(0)
    method = build_classifier(cfg, build_backbone(cfg), np.array([[0.0], [1.0]]), frozen=False)
    data = Volumes(8)
    trainer = Trainer(cfg, method, dist.make_loader(data, cfg, train=True))

    # the scales written out from the layer-wise decay rule (BEiT / MAE fine-tuning): ViT depth 12,
    # embeddings at depth 0, block i at i + 1, the final norm at 13 (lr * 1), the head at HEAD_LR_SCALE
    def lr_scale(name):
        if name.startswith("head."):
            return 7.0
        if name.startswith(("backbone.patch_embed.", "backbone.cls_token")):
            return 0.5 ** 13
        if name.startswith("backbone.blocks."):
            return 0.5 ** (12 - int(name.split(".")[2]))
        return 1.0

    def wd_scale(name, p):
        return 0.0 if p.ndim <= 1 or name.endswith(".bias") or name == "backbone.cls_token" else 1.0

    params = dict(method.named_parameters())
    names = {id(p): n for n, p in params.items()}
    assert any(n.startswith("backbone.blocks.11.") for n in names.values())  # the backbone trains too
    seen = []  # per optimizer step: [(lr, weight_decay, names)] of every group, as the step used them
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(
        [(g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in opt.param_groups]))
    trainer.fit()

    lr0 = 0.1 * 2 * 1 * 2 / 256  # BASE_LR x global batch (2 x 1 rank x 2 accumulation) / 256
    assert len(seen) == 6
    covered = set()
    for it, groups in enumerate(seen):
        lr = cosine(it, lr0, 1e-4, total_iters=6, warmup_iters=2)
        wd = cosine(it, 0.1, 0.3, total_iters=6)
        for group_lr, group_wd, group_names in groups:
            for n in group_names:
                assert group_lr == pytest.approx(lr * lr_scale(n), rel=1e-12), (it, n)
                assert group_wd == pytest.approx(wd * wd_scale(n, params[n]), rel=1e-12, abs=0), (it, n)
                covered.add(n)
    assert covered == set(names.values())  # every trainable parameter, in some group, at every step
    assert seen[0][0][0] == 0.0 and [g[0] for g in seen[2]] != [g[0] for g in seen[5]]  # warm-up, decay

    steps = [r for r in rows(tmp_path) if "step" in r]
    assert [r["it"] for r in steps] == [1, 2, 3, 4, 5, 6]  # logged after each step: the lr that step used
    for r in steps:
        assert r["lr"] == pytest.approx(cosine(r["it"] - 1, lr0, 1e-4, 6, 2), rel=1e-12)
        assert r["wd"] == pytest.approx(cosine(r["it"] - 1, 0.1, 0.3, 6), rel=1e-12)


def test_keep_lock_holds_the_folder_until_the_caller_gives_it_back(tmp_path):
    import importlib.util

    from engine import lock as run_lock
    spec = importlib.util.spec_from_file_location("toy_train", TOY)
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    for keep in (True, False):
        out = tmp_path / f"keep_{keep}"
        cfg = get_config(["--opts", "OUTPUT", str(out), *BASE_OPTS, "TRAIN.EPOCHS", "2"])
        loader = dist.make_loader(toy.ToyData(16, 0), cfg, train=True, collate_fn=toy.collate)
        trainer = Trainer(cfg, toy.ToyMethod(), loader)
        trainer.fit(keep_lock=keep)
        assert (out / run_lock.NAME).exists() == keep  # evaluation after fit() still owns the folder
        trainer.release_lock()
        assert not (out / run_lock.NAME).exists()
