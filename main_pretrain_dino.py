"""DINO pretraining of a 3D backbone on head CT (multi-crop self-distillation, EMA teacher).

    python main_pretrain_dino.py --cfg configs/dino/vit_base.yaml --opts OUTPUT runs/dino DATA.TRAIN_CSV train.csv
    torchrun --nproc_per_node 4 main_pretrain_dino.py --cfg configs/dino/vit_base.yaml
"""
import torch

from config import get_config
from data.views import DINOViews
from engine.launch import pretrain
from methods.dino import DINO, KNNMonitor


def build_view(cfg, train: bool) -> DINOViews:
    """Multi-crop views (training and validation alike); on CUDA the resizing and windowing run
    batched on the GPU (``device_stage`` + ``device_resize``: the workers hand over the head and the
    crop boxes, DINO.forward cuts, resizes and windows them)."""
    cuda = torch.cuda.is_available()
    return DINOViews(cfg, device_stage=cuda, device_resize=cuda)


def main(argv=None) -> None:
    cfg = get_config(argv, description=__doc__.splitlines()[0])
    monitor = KNNMonitor(cfg) if cfg.DINO.KNN_EVERY > 0 else None  # k-NN AUROC of teacher features
    pretrain(cfg, DINO, build_view, evaluator=monitor)


if __name__ == "__main__":
    main()
