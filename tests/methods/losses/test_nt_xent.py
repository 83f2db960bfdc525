"""NT-Xent against a hand computation; negatives gathered across two real processes equal one big batch."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from methods.losses.nt_xent import nt_xent, nt_xent_logits, pair_positives

ROOT = Path(__file__).resolve().parents[3]
WORKER = ROOT / "tests" / "methods" / "losses" / "nt_xent_gather_worker.py"


# ------------------------------------------------------------------------------------------ loss
def numpy_nt_xent(z: np.ndarray, positive: list[int], t: float) -> float:
    """Written out term by term: anchors i with positive p(i) >= 0, candidates = every other row."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    losses = []
    for i, p in enumerate(positive):
        if p < 0:
            continue
        sims = {k: float(z[i] @ z[k]) / t for k in range(len(z)) if k != i}
        denom = sum(np.exp(s) for s in sims.values())
        losses.append(-np.log(np.exp(sims[p]) / denom))
    return float(np.mean(losses))


def test_nt_xent_matches_hand_computation_two_views():
    z = np.random.default_rng(0).normal(size=(6, 4))  # 3 samples x 2 views, rows b*2 + v
    positive = pair_positives(3, 2, 2)
    assert positive.tolist() == [1, 0, 3, 2, 5, 4]
    got = nt_xent(torch.tensor(z), positive, 0.5).item()
    assert got == pytest.approx(numpy_nt_xent(z, positive.tolist(), 0.5), rel=1e-5)


def test_nt_xent_candidates_only_rows_are_negatives_not_anchors():
    # negative_mined layout: views 0, 1 = seed crop (anchors), 2, 3 = distant crop (negatives only)
    positive = pair_positives(2, 4, 2)
    assert positive.tolist() == [1, 0, -1, -1, 5, 4, -1, -1]
    z = np.random.default_rng(1).normal(size=(8, 3))
    got = nt_xent(torch.tensor(z), positive, 0.2).item()
    assert got == pytest.approx(numpy_nt_xent(z, positive.tolist(), 0.2), rel=1e-5)
    logits, target = nt_xent_logits(torch.tensor(z), positive, 0.2)
    assert logits.shape == (4, 8) and target.tolist() == [1, 0, 5, 4]
    assert torch.isinf(logits[[0, 1, 2, 3], [0, 1, 4, 5]]).all()  # an anchor never scores itself


def test_nt_xent_perfect_pairs_give_low_loss():
    z = torch.eye(4).repeat_interleave(2, dim=0)  # two identical views per sample, samples orthogonal
    assert nt_xent(z, pair_positives(4, 2, 2), 0.05).item() < 1e-6


def test_nt_xent_rejects_bad_arguments():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(z, pair_positives(2, 2, 2), 0.0)
    with pytest.raises(ValueError, match="another row"):
        nt_xent(z, torch.tensor([0, 0, 3, 2]), 0.1)
    with pytest.raises(ValueError, match="no anchors"):
        nt_xent(z, torch.full((4,), -1), 0.1)
    with pytest.raises(ValueError, match="even"):
        pair_positives(2, 3, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    """One torchrun launch of two Gloo processes computing every case of GATHER_CASES."""
    out = tmp_path_factory.mktemp("gather") / "gathered.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(WORKER), str(out), *[f"{v},{a}" for v, a in GATHER_CASES]]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    return torch.load(out, weights_only=True)


GATHER_CASES = [(2, 2), (4, 2)]  # inter / intra layout; negative_mined layout (views 2, 3 negatives only)


@pytest.mark.parametrize("views,anchor_views", GATHER_CASES)
def test_gathered_negatives_equal_one_big_batch(gathered, views, anchor_views):
    """Two processes: averaged loss and gradients (as DDP) equal one process on the whole batch."""
    sys.path.insert(0, str(WORKER.parent))
    try:
        from nt_xent_gather_worker import SAMPLES_PER_RANK, TEMPERATURE, inputs
    finally:
        sys.path.remove(str(WORKER.parent))
    assert gathered["world"] == 2
    got = gathered[f"{views},{anchor_views}"]
    enc, x = inputs(2, views)  # one process, the concatenated batch
    x.requires_grad_(True)
    loss = nt_xent(enc(x), pair_positives(2 * SAMPLES_PER_RANK, views, anchor_views), TEMPERATURE)
    loss.backward()
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(got["grad_weight"], enc.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["grad_bias"], enc.bias.grad, rtol=1e-5, atol=1e-6)
    # the gradient reaches every row, also through the other rank's gathered copy of it
    torch.testing.assert_close(got["input_grad"], x.grad, rtol=1e-5, atol=1e-6)
    assert x.grad.abs().sum() > 0
