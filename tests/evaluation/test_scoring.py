"""Validation scoring: the trainer's evaluator against sklearn on the same logits and labels."""
import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score
from torch.utils.data import DataLoader

from config import get_defaults
from evaluation.scoring import ValidationScorer, sigmoid
from methods.classify import Classifier
from models.zoo import build_backbone


def backbone():
    cfg = get_defaults()
    cfg.MODEL.NAME = "vit_tiny"
    cfg.MODEL.PATCH_SIZE = [8, 8, 8]
    cfg.DATA.ROI = [16, 16, 16]
    cfg.DATA.WINDOWS = ["brain"]
    torch.manual_seed(0)
    return build_backbone(cfg)


class Rows(torch.utils.data.Dataset):
    """n 16^3 volumes: constant i (ordered logits), or random seeded by i (distinct, unordered logits)."""

    def __init__(self, n, random=False):
        self.n, self.random = n, random

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = torch.rand(1, 16, 16, 16, generator=torch.Generator().manual_seed(int(i))) if self.random \
            else torch.full((1, 16, 16, 16), float(i))
        return {"image": image, "index": i}


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
    row = ValidationScorer(DataLoader(Rows(n, random=True), batch_size=3, sampler=order), labels, ["ICH", "SDH"])(m, 0)
    m.eval()
    with torch.no_grad():  # the reference: logits row by row, in dataset order
        z = m.logits(torch.stack([Rows(n, random=True)[i]["image"] for i in range(n)])).double().numpy()  # [n, 2]
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
