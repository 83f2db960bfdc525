"""SimCLR pretraining of any zoo backbone on head CT (SIMCLR.MODE inter | intra | negative_mined).

    python main_pretrain_simclr.py --cfg configs/simclr/vit_base.yaml --opts OUTPUT runs/simclr DATA.TRAIN_CSV train.csv
    torchrun --nproc_per_node 4 main_pretrain_simclr.py --cfg configs/simclr/segresnet.yaml
"""
import sys

from config import get_config
from engine.cli import run_cli
from engine.launch import pretrain
from methods.registry import get_method


def main(argv=None) -> None:
    cfg = get_config(argv, description=__doc__.splitlines()[0])
    method = get_method("simclr")
    pretrain(cfg, method.cls, method.build_view, evaluator=method.evaluator(cfg))


def cli() -> int:
    """The ``headct-pretrain-simclr`` command: :func:`main`, a config or input error as one line (engine/cli.py)."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
