import copy

import torch
from torch import nn

from config import get_config
from engine.optim import build_optimizer, optimizer_step, param_groups, scaled_lr


class Layered(nn.Module):
    """A backbone with layer ids: embed (0), two blocks (1, 2), norm (3)."""

    num_layers = 2

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 8))
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.norm = nn.LayerNorm(8)

    def no_weight_decay(self):
        return {"pos_embed"}

    def layer_id(self, name):
        if name.startswith(("embed", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers + 1


class Method(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = Layered()
        self.head = nn.Linear(8, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def by_name(groups):
    return {n: g for g in groups for n in g["names"]}


def test_no_decay_on_norms_biases_pos_embed_and_frozen_left_out():
    groups = by_name(param_groups(Method()))
    assert groups["backbone.embed.weight"]["wd_scale"] == 1.0
    assert groups["backbone.embed.bias"]["wd_scale"] == 0.0
    assert groups["backbone.norm.weight"]["wd_scale"] == 0.0
    assert groups["backbone.pos_embed"]["wd_scale"] == 0.0
    assert groups["head.weight"]["wd_scale"] == 1.0
    assert "frozen.weight" not in groups


def test_layer_decay_and_head_scale():
    groups = by_name(param_groups(Method(), layer_decay=0.5, lr_scales={"head.": 10.0}))
    assert groups["backbone.embed.weight"]["lr_scale"] == 0.5 ** 3
    assert groups["backbone.blocks.0.weight"]["lr_scale"] == 0.5 ** 2
    assert groups["backbone.blocks.1.weight"]["lr_scale"] == 0.5
    assert groups["backbone.norm.weight"]["lr_scale"] == 1.0
    assert groups["head.weight"]["lr_scale"] == 10.0


def test_optimizer_and_lr_scaling():
    cfg = get_config(["--opts", "DATA.BATCH_SIZE", "16", "TRAIN.ACCUM_STEPS", "2", "TRAIN.BASE_LR", "1e-3"])
    assert scaled_lr(cfg, world_size=4) == 1e-3 * 16 * 4 * 2 / 256
    m = Method()
    groups = param_groups(m, layer_decay=0.5, lr_scales={"head.": 10.0})
    opt = build_optimizer(cfg, groups)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == tuple(cfg.TRAIN.BETAS)
    # every optimizer group holds the same parameters with the same scales as the group it came from
    assert len(opt.param_groups) == len(groups)
    for g, built in zip(groups, opt.param_groups):
        assert [id(p) for p in built["params"]] == [id(p) for p in g["params"]]
        assert (built["lr_scale"], built["wd_scale"], built["lr"]) == (g["lr_scale"], g["wd_scale"], 1e-3)
        assert "names" not in built
    scale = {n: (g["lr_scale"], g["wd_scale"]) for g in groups for n in g["names"]}
    assert scale["head.weight"] == (10.0, 1.0) and scale["head.bias"] == (10.0, 0.0)
    assert scale["backbone.pos_embed"] == (0.5 ** 3, 0.0) and scale["backbone.blocks.1.weight"] == (0.5, 1.0)
    sgd = build_optimizer(get_config(["--opts", "TRAIN.OPTIMIZER", "sgd"]), param_groups(m))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9


def scaled_backward(model: nn.Module, scaler: torch.amp.GradScaler, x: torch.Tensor) -> None:
    scaler.scale((model(x) ** 2).sum()).backward()


def test_optimizer_step_unscales_hooks_clips_steps_and_zeroes():
    torch.manual_seed(0)
    model, x = nn.Linear(4, 3), torch.randn(5, 4)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)  # as under fp16: gradients arrive times 8
    scaled_backward(model, scaler, x)
    seen = []
    norm = optimizer_step(opt, scaler, clip_grad=0.5, before_clip=lambda: seen.append(model.weight.grad.clone()))
    # the reference: plain backward, norm, clip by hand, SGD step
    (ref(x) ** 2).sum().backward()
    grads = [p.grad for p in ref.parameters()]
    true_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    torch.testing.assert_close(seen[0], ref.weight.grad)  # the hook saw unscaled, unclipped gradients
    torch.testing.assert_close(norm, true_norm)
    assert true_norm > 0.5
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad * (0.5 / (true_norm + 1e-6))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
        assert p.grad is None


def test_optimizer_step_without_clipping_and_with_disabled_scaler():
    torch.manual_seed(0)
    model, x = nn.Linear(4, 3), torch.randn(5, 4)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # bf16 / fp32 runs
    scaled_backward(model, scaler, x)
    assert optimizer_step(opt, scaler, clip_grad=0.0) is None
    (ref(x) ** 2).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q - 0.1 * q.grad)


def test_optimizer_step_skips_a_non_finite_fp16_step():
    model = nn.Linear(2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaled_backward(model, scaler, torch.tensor([[float("inf"), 1.0]]))
    optimizer_step(opt, scaler, clip_grad=1.0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # step skipped
    assert scaler.get_scale() == 4.0  # and the scale backed off
