import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from models.heads import AttentiveClassifier, DINOHead, LinearClassifier, ProjectionMLP, feature_map_to_tokens

G_KEY = "last_layer.parametrizations.weight.original0"
V_KEY = "last_layer.parametrizations.weight.original1"


def test_dino_head_shapes_keys_and_fixed_norm():
    torch.manual_seed(0)
    head = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16)
    out = head(torch.randn(4, 32))
    assert out.shape == (4, 100)
    assert set(head.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                                      "mlp.4.bias", G_KEY, V_KEY}
    g = head.last_layer.parametrizations.weight.original0
    assert g.shape == (100, 1) and not g.requires_grad and torch.equal(g, torch.ones_like(g))
    # effective weight rows have unit norm, so |logit| <= 1 for the L2-normalised bottleneck
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(100), atol=1e-5)
    assert out.abs().max() <= 1 + 1e-5
    out.sum().backward()
    assert g.grad is None and head.last_layer.parametrizations.weight.original1.grad is not None
    free = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad
    assert len(DINOHead(32, 10, nlayers=1).mlp.weight.shape) == 2


def test_dino_head_batchnorm_uses_batch_statistics_and_token_inputs():
    torch.manual_seed(0)
    head = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16, use_bn=True)
    assert not list(head.buffers())  # no running statistics: nothing to sync across ranks or EMA
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules()) == 3  # 2 hidden + bottleneck
    # features = a large shared part + a small per-sample part (a near-collapsed backbone)
    x = 5.0 * torch.randn(1, 32) + 0.01 * torch.randn(8, 32)
    plain = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16)
    spread = lambda h: h(x).std(0).mean().item()  # noqa: E731
    assert spread(head) > 100 * spread(plain)
    z = head.mlp(x)  # [8, 16] bottleneck: centred over the batch, so never one shared direction
    assert torch.allclose(z.mean(0), torch.zeros(16), atol=1e-5)
    head.eval()  # evaluation uses the batch's statistics too
    assert torch.allclose(head(x), head.train()(x), atol=1e-6)
    tokens = torch.randn(2, 5, 32)  # [B, N, D] patch tokens (iBOT): BatchNorm over all B * N
    assert head(tokens).shape == (2, 5, 100)
    assert torch.allclose(head(tokens), head(tokens.reshape(10, 32)).reshape(2, 5, 100), atol=1e-6)
    with pytest.raises(ValueError, match="DINO.HEAD_BN"):
        head(torch.randn(1, 32))  # one vector: no batch statistics (would silently give zeros)
    one = DINOHead(32, 10, nlayers=1, use_bn=True)
    assert isinstance(one.mlp[-1], torch.nn.BatchNorm1d) and one(torch.randn(3, 32)).shape == (3, 10)


def test_dino_head_deepcopy_and_state_dict_round_trip():
    torch.manual_seed(0)
    head = DINOHead(32, 50, hidden_dim=64, bottleneck_dim=16)
    x = torch.randn(3, 32)
    head(x).sum().backward()  # deepcopy must work after a forward/backward (EMA teacher)
    teacher = copy.deepcopy(head)
    for p in teacher.parameters():
        p.requires_grad = False
    assert torch.allclose(teacher(x), head(x))
    with torch.no_grad():  # EMA update through the stable parameter names
        for (n_s, p_s), (n_t, p_t) in zip(head.named_parameters(), teacher.named_parameters()):
            assert n_s == n_t
            p_t.mul_(0.5).add_(p_s + 1.0, alpha=0.5)
    assert not torch.allclose(teacher(x), head(x))
    fresh = DINOHead(32, 50, hidden_dim=64, bottleneck_dim=16)
    fresh.load_state_dict(teacher.state_dict())
    assert torch.allclose(fresh(x), teacher(x))


def test_dino_head_under_ddp(tmp_path):
    """One-process gloo group: DDP wraps the parametrized head; the fixed norm is not synchronised."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        head = DDP(DINOHead(16, 20, hidden_dim=32, bottleneck_dim=8))
        head(torch.randn(4, 16)).sum().backward()
        assert head.module.last_layer.parametrizations.weight.original1.grad is not None
        assert all(k.startswith("module.") for k in head.state_dict())
    finally:
        dist.destroy_process_group()


def test_projection_mlp():
    assert ProjectionMLP(32, 64, 16)(torch.randn(4, 32)).shape == (4, 16)
    mlp = ProjectionMLP(32, 64, 16, num_layers=3, use_bn=False)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in mlp.modules())
    assert mlp(torch.randn(1, 32)).shape == (1, 16)


def test_linear_classifier():
    clf = LinearClassifier(32, 3)
    assert not clf.bn.affine
    assert clf(torch.randn(5, 32)).shape == (5, 3)
    assert clf(torch.randn(1, 32)).shape == (1, 3)  # a lone training sample uses running statistics
    clf.eval()
    assert clf(torch.randn(1, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match=r"pooled features \[B, D\]"):
        clf(torch.randn(2, 4, 32))


def test_attentive_classifier_tokens_and_feature_maps():
    torch.manual_seed(0)
    clf = AttentiveClassifier(64, 2)
    assert clf.num_heads == 1 and AttentiveClassifier(128, 2).num_heads == 2
    tokens = torch.randn(3, 10, 64)
    out = clf(tokens)
    assert out.shape == (3, 2)
    # attention pooling ignores token order
    assert torch.allclose(clf(tokens[:, torch.randperm(10)]), out, atol=1e-5)
    fmap = torch.randn(2, 64, 2, 3, 4)
    assert feature_map_to_tokens(fmap).shape == (2, 24, 64)
    assert torch.allclose(clf(fmap), clf(feature_map_to_tokens(fmap)))
    clf(fmap).sum().backward()
    assert clf.query.grad is not None and clf.kv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="divisible"):
        AttentiveClassifier(48, 2, num_heads=5)
