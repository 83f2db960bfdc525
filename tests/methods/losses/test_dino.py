"""DINO's losses against hand computations: the self-distillation cross-entropy (float32 under
autocast), iBOT's masked-patch loss and KoLeo."""
import numpy as np
import pytest
import torch

from methods.losses.dino import dino_loss, ibot_patch_loss, koleo_loss


# ------------------------------------------------------------------------------------------- loss
def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    g, n_local, b, k = 2, 2, 3, 5
    t = rng.normal(size=(g, b, k)) * 2
    s = rng.normal(size=(g + n_local, b, k)) * 2
    c = rng.normal(size=(1, k))
    tt, st = 0.04, 0.1
    pt = np_softmax((t - c) / tt)
    log_ps = np.log(np_softmax(s / st))
    terms = []
    for i in range(g):
        for v in range(g + n_local):
            if v != i:
                terms.append(np.mean(-(pt[i] * log_ps[v]).sum(-1)))
    expect = np.mean(terms)
    ent = np.mean(-(pt * np.log(pt)).sum(-1))
    loss, mon = dino_loss(torch.tensor(s), torch.tensor(t), torch.tensor(c), st, tt)
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    assert mon["teacher_entropy"].item() == pytest.approx(ent, rel=1e-5)
    assert mon["kl"].item() == pytest.approx(expect - ent, rel=1e-4, abs=1e-5)
    assert mon["kl"].item() >= 0


def test_loss_stays_float32_under_bf16_autocast():
    """The cross-entropy is not rounded to bf16 (1/16 near log(K) = 11 for K = 65536)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 3, 512, generator=g), torch.randn(2, 3, 512, generator=g)
    ref, _ = dino_loss(s, t, torch.zeros(512), 0.1, 0.04)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = dino_loss(s, t, torch.zeros(512), 0.1, 0.04)
    assert low.dtype == torch.float32 and low.item() == pytest.approx(ref.item(), rel=1e-6)


def test_loss_bad_shapes():
    with pytest.raises(ValueError, match="do not match"):
        dino_loss(torch.zeros(4, 3, 5), torch.zeros(2, 2, 5), torch.zeros(1, 5), 0.1, 0.04)


def test_ibot_and_koleo_losses():
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    got = ibot_patch_loss(s, t, mask, torch.zeros(1, 1, 6), 0.1, 0.04)
    pt, lps = torch.softmax(t / 0.04, -1), torch.log_softmax(s / 0.1, -1)
    ce = -(pt * lps).sum(-1)
    expect = ((ce[0, 0] + ce[0, 3]) / 2 + ce[1, 2]) / 2
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    d = torch.nn.functional.normalize(x, dim=-1)
    nn_d = [(d[0] - d[2]).norm(), (d[1] - d[2]).norm(), (d[2] - d[0]).norm()]
    assert koleo_loss(x).item() == pytest.approx(-np.mean([np.log(v.item()) for v in nn_d]), rel=1e-4)
