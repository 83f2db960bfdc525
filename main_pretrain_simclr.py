"""SimCLR pretraining of any zoo backbone on head CT (SIMCLR.MODE inter | intra | negative_mined).

    python main_pretrain_simclr.py --cfg configs/simclr/vit_base.yaml --opts OUTPUT runs/simclr DATA.TRAIN_CSV train.csv
    torchrun --nproc_per_node 4 main_pretrain_simclr.py --cfg configs/simclr/segresnet.yaml
"""
import torch

from config import get_config
from data.views import SimCLRViews
from engine.launch import pretrain
from methods.simclr import SimCLR


def build_view(cfg, train: bool) -> SimCLRViews:
    """Pairs of views; on CUDA blur, noise, windowing and histogram shift run batched on the GPU
    (``device_stage``: the workers hand over float16 HU views, SimCLR.forward finishes them)."""
    return SimCLRViews(cfg, train=train, device_stage=torch.cuda.is_available())


def main(argv=None) -> None:
    cfg = get_config(argv, description=__doc__.splitlines()[0])
    pretrain(cfg, SimCLR, build_view)


if __name__ == "__main__":
    main()
