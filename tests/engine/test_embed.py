"""engine/embed.py: embeddings of a batch (pooled and tokens), gathered prediction by row, embed();
engine/amp.py: the autocast of TRAIN.AMP."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from config import get_config
from engine.amp import autocast
from engine.embed import embed, embed_batch, predict_gathered
from engine.launch import build_backbone_from_cfg


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


def test_embed_batch_cnn_tokens_match_forward() -> None:
    cfg = get_config(["--opts", "MODEL.NAME", "resnet18", "MODEL.FEATURE_SIZE", "4"])
    torch.manual_seed(0)
    backbone = build_backbone_from_cfg(cfg).eval()
    x = torch.rand(2, 3, 32, 32, 32)
    with torch.no_grad():
        pooled, toks, grid = embed_batch(backbone, x, tokens=True)
        np.testing.assert_allclose(pooled, backbone(x), atol=1e-5)
        assert toks.shape == (2, int(np.prod(grid)), backbone.token_dim) and len(grid) == 3
        assert embed_batch(backbone, x)[1] is None


def test_embed_is_the_pooled_forward_in_row_order_and_restores_the_mode():
    cfg = get_config(["--opts", "MODEL.NAME", "vit_tiny", "MODEL.PATCH_SIZE", "[8, 8, 8]", "DATA.ROI", "[16, 16, 16]",
                      "DATA.WINDOWS", "['brain']"])
    torch.manual_seed(0)
    backbone = build_backbone_from_cfg(cfg).train()
    loader = DataLoader(Rows(5), batch_size=2, sampler=[4, 1, 0, 3, 2])
    idx, feats = embed(backbone, loader, 5)
    assert backbone.training  # given back in training mode
    backbone.eval()
    with torch.no_grad():
        want = backbone(torch.stack([Rows(5)[i]["image"] for i in range(5)])).numpy()
    assert list(idx) == list(range(5))
    np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("none", torch.float32)])
def test_autocast_follows_train_amp(amp, dtype):
    a, b = torch.rand(4, 4), torch.rand(4, 4)
    with autocast("cpu", amp):
        assert (a @ b).dtype == dtype
