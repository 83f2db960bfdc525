"""methods/classify.py: masked loss, pos_weight, frozen backbone (bit-identical, BatchNorm stats),
lr scales, heads, batch of one, samplers, gathered prediction, validation scorer, logistic probe."""
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader

from config import get_defaults
from engine.optim import build_optimizer, param_groups
from methods.classify import (Classifier, FrozenBackboneError, LogisticProbe, RandomEpochSampler,
                              ValidationScorer, backbone_checksum, balanced_weights, build_classifier,
                              build_train_sampler, compute_pos_weight, masked_bce, predict_gathered, sigmoid)
from models.zoo import build_backbone


def tiny_cfg(name="vit_tiny", roi=16, chans=1, **downstream):
    cfg = get_defaults()
    cfg.MODEL.NAME = name
    cfg.MODEL.PATCH_SIZE = [8, 8, 8]
    cfg.MODEL.FEATURE_SIZE = 8
    cfg.DATA.ROI = [roi] * 3
    cfg.DATA.WINDOWS = ["brain"] * chans
    for k, v in downstream.items():
        cfg.DOWNSTREAM[k] = v
    return cfg


def backbone(name="vit_tiny", roi=16):
    torch.manual_seed(0)
    return build_backbone(tiny_cfg(name, roi))


def batch(n=4, roi=16, labels=((1.0,), (0.0,), (1.0,), (0.0,))):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(n, 1, roi, roi, roi, generator=g), "label": torch.tensor(labels[:n])}


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_steps(method, steps=3, n=4, roi=16, labels=((1.0,), (0.0,), (1.0,), (0.0,))):
    opt = build_optimizer(tiny_cfg(), param_groups(method, 1.0, method.lr_scales()))
    method.train()
    for _ in range(steps):
        out = method(batch(n, roi, labels))
        out["loss"].backward()
        method.on_after_backward(0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_step_start(0, 0, steps)
    return out


# ------------------------------------------------------------------ loss
def test_masked_bce_ignores_blank_entries_and_uses_pos_weight():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0], [-2.0, 0.0]], requires_grad=True)
    target = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [float("nan"), 0.0]])
    known = ~torch.isnan(target)
    ref = nn.functional.binary_cross_entropy_with_logits(logits[known], target[known])
    assert torch.allclose(masked_bce(logits, target), ref)
    pw = torch.tensor([3.0, 1.0])
    per = nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(target), pos_weight=pw, reduction="none")
    assert torch.allclose(masked_bce(logits, target, pw), per[known].mean())
    assert masked_bce(logits, target, pw) > masked_bce(logits, target)  # positives weigh more
    blank = masked_bce(logits, torch.full_like(target, float("nan")))
    assert blank.item() == 0.0
    blank.backward()  # still attached to the graph: DDP needs a backward on every rank
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_pos_weight_is_neg_over_pos_and_refuses_a_missing_class():
    y = np.array([[1, 0], [0, 0], [0, 1], [np.nan, 0], [0, np.nan]], dtype=np.float32)
    assert torch.allclose(compute_pos_weight(y, ["a", "b"]), torch.tensor([3.0, 3.0]))
    with pytest.raises(ValueError, match="'b'.*0 positive"):
        compute_pos_weight(np.array([[1, 0], [0, 0]], dtype=np.float32), ["a", "b"])


def test_build_classifier_passes_pos_weight_to_the_loss_only_when_asked():
    y = np.array([[1], [0], [0], [0]], dtype=np.float32)
    m = build_classifier(tiny_cfg(IMBALANCE="pos_weight"), backbone(), y, frozen=True)
    assert torch.equal(m.pos_weight, torch.tensor([3.0]))
    b = batch()
    loss_weighted = m(b)["loss"]
    m.pos_weight = None
    assert not torch.allclose(loss_weighted, m(b)["loss"])  # the weight changes the loss
    assert build_classifier(tiny_cfg(IMBALANCE="none"), backbone(), y, frozen=True).pos_weight is None
    assert "pos_weight" not in m.state_dict()  # derived from the labels, not saved


# ------------------------------------------------------------------ frozen backbone
def test_linear_probe_leaves_resnet_backbone_bit_identical_including_batchnorm_stats():
    bb = backbone("resnet18", roi=32)
    before = state(bb)
    m = Classifier(bb, ["ICH"], freeze_backbone=True)
    assert all(not p.requires_grad for p in m.backbone.parameters())
    m.train()
    assert m.training and m.head.training and not m.backbone.training
    assert any(isinstance(x, nn.BatchNorm3d) for x in bb.modules())
    head_before = state(m.head)
    train_steps(m, steps=3, roi=32)
    after = state(m.backbone)
    assert before.keys() == after.keys()
    for k in before:  # weights and BatchNorm running_mean / running_var / num_batches_tracked
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(head_before[k], v) for k, v in state(m.head).items())  # the head learned
    m.check_frozen()
    names = {n for g in param_groups(m) for n in g["names"]}
    assert names and all(n.startswith("head.") for n in names)  # the optimizer never sees the backbone


def test_frozen_backbone_violations_raise():
    m = Classifier(backbone(), ["ICH"], freeze_backbone=True)
    with torch.no_grad():
        next(m.backbone.parameters()).add_(1e-3)
    with pytest.raises(FrozenBackboneError, match="changed"):
        m.check_frozen()
    m = Classifier(backbone(), ["ICH"], freeze_backbone=True)
    next(m.backbone.parameters()).requires_grad_(True)
    with pytest.raises(FrozenBackboneError, match="requires grad"):
        m.on_step_start(0, 0, 1)


def test_checksum_sees_buffers():
    bb = backbone("resnet18", roi=32)
    c = backbone_checksum(bb)
    bn = next(x for x in bb.modules() if isinstance(x, nn.BatchNorm3d))
    bn.running_mean[0] += 1e-6
    assert backbone_checksum(bb) != c


def test_finetune_trains_backbone_with_head_lr_scale_and_layer_decay():
    m = Classifier(backbone(), ["ICH"], freeze_backbone=False, head_lr_scale=10.0)
    assert m.lr_scales() == {"head.": 10.0}
    groups = param_groups(m, layer_decay=0.5, lr_scales=m.lr_scales())
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    depth = m.backbone.num_layers + 1
    assert scale["head.fc.weight"] == pytest.approx(10.0)
    assert scale["backbone.patch_embed.proj.weight"] == pytest.approx(0.5 ** depth)
    assert scale["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.5 ** (depth - 1))
    before = state(m.backbone)
    train_steps(m, steps=1)
    assert any(not torch.equal(before[k], v) for k, v in state(m.backbone).items())
    assert Classifier(backbone(), ["ICH"], freeze_backbone=True, head_lr_scale=10.0).lr_scales() == {}


@pytest.mark.parametrize("name,roi", [("vit_tiny", 16), ("resnet18", 32)])
def test_attentive_head_over_tokens_or_feature_map(name, roi):
    m = Classifier(backbone(name, roi), ["ICH", "SDH"], head="attentive", freeze_backbone=(name == "resnet18"))
    m.eval()
    logits = m.logits(torch.rand(2, 1, roi, roi, roi))
    assert logits.shape == (2, 2)
    out = train_steps(m, steps=1, n=2, roi=roi, labels=((1.0, float("nan")), (0.0, 1.0)))
    assert math.isfinite(out["loss"].item())


def test_batch_of_one_trains_with_batchnorm_head_and_clear_error_for_backbone_batchnorm():
    m = Classifier(backbone(), ["ICH"], head="linear")
    out = train_steps(m, steps=2, n=1)  # LinearClassifier's BatchNorm1d with one sample
    assert math.isfinite(out["loss"].item())
    m = Classifier(backbone("resnet18", 32), ["ICH"], head="linear", freeze_backbone=True)
    assert math.isfinite(train_steps(m, steps=1, n=1, roi=32)["loss"].item())  # frozen BN: fine
    m = Classifier(backbone("resnet18", 32), ["ICH"], head="linear", freeze_backbone=False)
    with pytest.raises(ValueError, match="DATA.BATCH_SIZE"):
        train_steps(m, steps=1, n=1, roi=32)  # 1^3 feature map: BatchNorm3d cannot train


@pytest.mark.parametrize("name,roi,patch", [("vit_tiny", 28, 4), ("vit_tiny", 96, 16), ("resnet18", 28, 8)])
def test_small_and_large_inputs(name, roi, patch):
    cfg = tiny_cfg(name, roi)
    cfg.MODEL.PATCH_SIZE = [patch] * 3
    torch.manual_seed(0)
    m = Classifier(build_backbone(cfg), ["ICH"], head="attentive")
    m.eval()
    assert m.logits(torch.rand(2, 1, roi, roi, roi)).shape == (2, 1)


def test_forward_without_labels_says_so():
    m = Classifier(backbone(), ["ICH"])
    with pytest.raises(ValueError, match="no 'label'"):
        m({"image": torch.rand(2, 1, 16, 16, 16)})


# ------------------------------------------------------------------ sampling
def test_balanced_weights_give_classes_equal_mass():
    y = np.array([1, 0, 0, 0, 0, 0, 0, np.nan, 0, 0])
    w = balanced_weights(y)
    assert w.sum() == pytest.approx(1.0)
    assert w[y == 1].sum() == pytest.approx(w[y == 0].sum())
    assert w[np.isnan(y)].sum() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="positives and negatives"):
        balanced_weights(np.zeros(5))


def test_balanced_sampler_balances_is_seeded_and_distributed():
    y = np.array([1.0] * 10 + [0.0] * 90)
    w = balanced_weights(y)
    ranks = [RandomEpochSampler(100, 4000, w, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for s in ranks:
        s.set_epoch(1)
    draws = [np.array([i for i, e in s]) for s in ranks]
    assert all(len(d) == 2000 == len(s) for d, s in zip(draws, ranks))
    assert all(e == 1 for _, e in ranks[0])
    both = np.concatenate(draws)
    assert 0.45 < (y[both] == 1).mean() < 0.55  # balanced although 10% are positive
    again = RandomEpochSampler(100, 4000, w, seed=3, num_replicas=2, rank=0)
    again.set_epoch(1, start=5)
    assert [i for i, _ in again] == list(draws[0][5:])  # same stream, resumable
    again.set_epoch(2)
    assert [i for i, _ in again] != list(draws[0])  # another epoch, another draw


def test_samples_per_epoch_without_weights_is_a_permutation_pass():
    s = RandomEpochSampler(50, 20, None, seed=0, num_replicas=1, rank=0)
    idx = [i for i, _ in s]
    assert len(idx) == 20 and len(set(idx)) == 20  # a random subset, no repeats
    s = RandomEpochSampler(10, 30, None, seed=0, num_replicas=1, rank=0)
    idx = [i for i, _ in s]
    assert sorted(idx) == sorted(list(range(10)) * 3)  # three full passes


def test_build_train_sampler_follows_the_config():
    y = np.array([[1.0], [0.0], [0.0], [0.0]])
    assert build_train_sampler(tiny_cfg(IMBALANCE="pos_weight"), y) is None  # the engine's full pass
    s = build_train_sampler(tiny_cfg(IMBALANCE="none", SAMPLES_PER_EPOCH=12), y)
    assert s.weights is None and len(s) == 12
    s = build_train_sampler(tiny_cfg(IMBALANCE="balanced_sampler"), y)
    assert s.weights is not None and len(s) == 4


# ------------------------------------------------------------------ prediction and scoring
class Rows(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": torch.full((1, 16, 16, 16), float(i)), "index": i}


def test_predict_gathered_returns_every_row_once_in_order():
    loader = DataLoader(Rows(7), batch_size=3, sampler=[6, 0, 3, 1, 5, 2, 4])
    idx, vals = predict_gathered(lambda x: x.mean(dim=(1, 2, 3, 4))[:, None], loader, 7, torch.device("cpu"))
    assert list(idx) == list(range(7))
    assert np.allclose(vals[:, 0], np.arange(7))
    dup = DataLoader(Rows(7), batch_size=3, sampler=[0, 0, 1])
    with pytest.raises(RuntimeError, match="more than once"):
        predict_gathered(lambda x: x[:, 0, 0, 0, :1], dup, 7, torch.device("cpu"))


class RandomRows(torch.utils.data.Dataset):
    """n random 16^3 volumes (seeded by index): distinct, unordered logits."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": torch.rand(1, 16, 16, 16, generator=torch.Generator().manual_seed(int(i))), "index": i}


def test_validation_scorer_reports_auroc_and_score():
    m = Classifier(backbone(), ["ICH"])
    loader = DataLoader(Rows(6), batch_size=4)
    labels = np.array([[0], [0], [1], [1], [0], [1]], dtype=np.float32)
    m.train()
    row = ValidationScorer(loader, labels, ["ICH"])(m, 0)
    assert m.training  # restored
    assert set(row) == {"val_loss", "val_auroc_macro", "score"}
    assert row["score"] == row["val_auroc_macro"]


@pytest.mark.parametrize("pos_weight", [None, (2.0, 0.5)])
def test_validation_scorer_equals_sklearn_on_the_same_logits_and_labels(pos_weight):
    m = Classifier(backbone(), ["ICH", "SDH"], pos_weight=pos_weight)
    n = 10
    labels = np.array([[0, 1], [1, 0], [0, np.nan], [1, 1], [0, 0], [1, 0], [0, 1], [np.nan, 0], [1, 1], [0, 0]])
    order = [7, 2, 9, 0, 4, 1, 8, 3, 6, 5]  # the loader sees the rows shuffled; the labels are in dataset order
    row = ValidationScorer(DataLoader(RandomRows(n), batch_size=3, sampler=order), labels, ["ICH", "SDH"])(m, 0)
    m.eval()
    with torch.no_grad():  # the reference: logits row by row, in dataset order
        z = m.logits(torch.stack([RandomRows(n)[i]["image"] for i in range(n)])).double().numpy()  # [n, 2]
    prob = 1 / (1 + np.exp(-z))
    aucs = []
    for j, name in enumerate(["ICH", "SDH"]):
        keep = ~np.isnan(labels[:, j])
        aucs.append(roc_auc_score(labels[keep, j], z[keep, j]))
        assert row[f"val_auroc_{name}"] == pytest.approx(aucs[-1], abs=1e-12)
        # rows in the loader's order would score otherwise: the check can see a misalignment
        assert roc_auc_score(labels[keep, j], z[order][keep, j]) != pytest.approx(aucs[-1])
    assert row["val_auroc_macro"] == row["score"] == pytest.approx(np.mean(aucs), abs=1e-12)
    known = ~np.isnan(labels)
    y, p = labels[known], prob[known]
    pw = np.broadcast_to(np.asarray(pos_weight or (1.0, 1.0)), labels.shape)[known]
    bce = -(pw * y * np.log(p) + (1 - y) * np.log(1 - p)).mean()  # mean over the labelled entries
    assert row["val_loss"] == pytest.approx(bce, rel=1e-5)
    if pos_weight is None:
        assert row["val_loss"] == pytest.approx(log_loss(y, p), rel=1e-5)


def test_sigmoid_is_stable():
    assert np.allclose(sigmoid(np.array([-1000.0, 0.0, 1000.0])), [0.0, 0.5, 1.0])


def sklearn_fit(x_train, y_train, C, x_eval):
    """The reference probe: StandardScaler on all training rows, then one LogisticRegression per label on
    its labelled rows (the probe's solver settings).

    Returns:
        The fits, their logits ``[N, L]`` and probabilities ``[N, L]`` on ``x_eval``. AUROCs are taken
        on probabilities, as the probe and metrics.json take them: a logit above ~37 gives exactly 1.0
        in float64, so strongly separated scores can tie where their logits do not.
    """
    scaler = StandardScaler().fit(x_train)
    fits, logits, probs = [], [], []
    for j in range(y_train.shape[1]):
        keep = ~np.isnan(y_train[:, j])
        clf = LogisticRegression(C=C, class_weight="balanced", max_iter=5000, random_state=0)
        fits.append(clf.fit(scaler.transform(x_train[keep]), y_train[keep, j].astype(int)))
        logits.append(clf.decision_function(scaler.transform(x_eval)))
        probs.append(clf.predict_proba(scaler.transform(x_eval))[:, 1])
    return fits, np.stack(logits, 1), np.stack(probs, 1)


def macro_auroc(y, scores):
    keep = [~np.isnan(y[:, j]) for j in range(y.shape[1])]
    return np.mean([roc_auc_score(y[k, j], scores[k, j]) for j, k in enumerate(keep)])


def assert_probe_equals_sklearn(probe, x_train, y_train, x_eval):
    fits, logits, _ = sklearn_fit(x_train, y_train, probe.C, x_eval)
    np.testing.assert_allclose(probe.coef, np.stack([f.coef_[0] for f in fits]), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(probe.intercept, [f.intercept_[0] for f in fits], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(probe.decision_function(x_eval), logits, rtol=1e-6, atol=1e-8)


def test_logistic_probe_sweeps_C_on_validation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 5))
    y = np.stack([(x[:, 0] > 0), (x[:, 1] + 0.8 * rng.normal(size=80) > 0.3)], 1).astype(np.float64)
    y[::7, 1] = np.nan  # blank labels are left out per label
    y[62::5, 0] = np.nan  # in validation too
    Cs = (0.001, 0.01, 0.1, 1.0)
    probe = LogisticProbe(["a", "b"], Cs=Cs).fit(x[:60], y[:60], x[60:], y[60:])
    # every C scored by the validation macro AUROC of sklearn's own fit
    want = [macro_auroc(y[60:], sklearn_fit(x[:60], y[:60], C, x[60:])[2]) for C in Cs]
    assert [r["C"] for r in probe.sweep] == list(Cs)
    np.testing.assert_allclose([r["val_auroc_macro"] for r in probe.sweep], want, atol=1e-12)
    assert probe.C == Cs[int(np.argmax(want))]  # the best (the first of equals: the smaller C)
    assert_probe_equals_sklearn(probe, x[:60], y[:60], x[60:])
    p = probe.predict_proba(x[60:])
    assert p.shape == (20, 2) and np.allclose(p, 1 / (1 + np.exp(-probe.decision_function(x[60:]))))
    sd = probe.state_dict()
    assert sd["coef"].shape == (2, 5) and sd["labels"] == ["a", "b"] and sd["C"] == probe.C
    with pytest.raises(ValueError, match="one class"):
        LogisticProbe(["a"]).fit(x[:10], np.zeros((10, 1)))


def nuisance_data(n, rng, proxy_holds):
    """Label = sign of s. x0 = s + nu (the signal behind a large nuisance), x1 = nu (a proxy that lets a
    weakly regularised fit subtract the nuisance) or, when ``proxy_holds`` is False, fresh noise of the
    same size (the proxy broke: subtracting it adds noise)."""
    s, nu = rng.normal(size=n), 2 * rng.normal(size=n)
    x1 = nu if proxy_holds else 2 * rng.normal(size=n)
    return np.stack([s + nu, x1], 1), (s > 0).astype(np.float64)[:, None]


@pytest.mark.parametrize("proxy_holds,best_C", [(True, 10.0), (False, 1e-4)])
def test_logistic_probe_chooses_the_C_validation_prefers(proxy_holds, best_C):
    # C = 10 learns x0 - x1 = s (AUROC ~1 where the proxy holds); C = 1e-4 shrinks to the marginal
    # correlations, x0 alone (AUROC ~0.7), which wins where subtracting x1 only adds noise
    rng = np.random.default_rng(0)
    x, y = nuisance_data(200, rng, True)
    xv, yv = nuisance_data(2000, rng, proxy_holds)
    probe = LogisticProbe(["a"], Cs=(1e-4, 10.0)).fit(x, y, xv, yv)
    assert probe.C == best_C
    aucs = {r["C"]: r["val_auroc_macro"] for r in probe.sweep}
    assert aucs[best_C] > aucs[10.0 if best_C == 1e-4 else 1e-4] + 0.03  # a clear preference
    for C, auc in aucs.items():
        assert auc == pytest.approx(roc_auc_score(yv[:, 0], sklearn_fit(x, y, C, xv)[2][:, 0]), abs=1e-12)
    assert_probe_equals_sklearn(probe, x, y, xv)


def test_logistic_probe_tie_takes_the_smaller_C():
    # one feature: every C ranks validation alike, so every C has the same AUROC
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 1))
    y = (x[:, :1] + rng.normal(size=(60, 1)) > 0).astype(np.float64)
    probe = LogisticProbe(["a"]).fit(x[:40], y[:40], x[40:], y[40:])
    assert len({r["val_auroc_macro"] for r in probe.sweep}) == 1
    assert probe.C == min(probe.Cs) == 0.001
    assert_probe_equals_sklearn(probe, x[:40], y[:40], x[40:])


def test_logistic_probe_falls_back_to_C_1_when_validation_has_one_class():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4))
    y = (x[:, :1] > 0).astype(np.float32)
    probe = LogisticProbe(["a"], Cs=(0.01, 10.0)).fit(x[:40], y[:40], x[40:], np.zeros((10, 1)))
    assert probe.C == 1.0 and all(r["val_auroc_macro"] is None for r in probe.sweep)
    ref = LogisticProbe(["a"]).fit(x[:40], y[:40])
    assert np.allclose(probe.coef, ref.coef) and np.allclose(probe.intercept, ref.intercept)
