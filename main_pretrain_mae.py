"""MAE pretraining of a 3D ViT on head CT.

    python main_pretrain_mae.py --cfg configs/mae/vit_base.yaml --opts OUTPUT runs/mae DATA.TRAIN_CSV train.csv
    torchrun --nproc_per_node 4 main_pretrain_mae.py --cfg configs/mae/vit_base.yaml
"""
from config import get_config
from data.views import SingleView
from engine.launch import pretrain
from methods.mae import MAE


def main(argv=None) -> None:
    cfg = get_config(argv, description=__doc__.splitlines()[0])
    pretrain(cfg, MAE, lambda c, train: SingleView(c, train=train))


if __name__ == "__main__":
    main()
