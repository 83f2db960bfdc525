"""DINO pretraining of a 3D backbone on head CT (multi-crop self-distillation, EMA teacher).

    python main_pretrain_dino.py --cfg configs/dino/vit_base.yaml --opts OUTPUT runs/dino DATA.TRAIN_CSV train.csv
    torchrun --nproc_per_node 4 main_pretrain_dino.py --cfg configs/dino/vit_base.yaml

Views, the k-NN monitor (DINO.KNN_EVERY) and the objective come from methods/registry.py.
"""
import sys

from config import get_config
from engine.cli import run_cli
from engine.launch import pretrain
from methods.registry import get_method


def main(argv=None) -> None:
    cfg = get_config(argv, description=__doc__.splitlines()[0])
    method = get_method("dino")
    pretrain(cfg, method.cls, method.build_view, evaluator=method.evaluator(cfg))


def cli() -> int:
    """The ``headct-pretrain-dino`` command: :func:`main`, a config or input error as one line (engine/cli.py)."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
