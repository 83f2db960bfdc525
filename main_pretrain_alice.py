"""Alice pretraining of a 3D ViT on head CT: DINO-style views of the same anatomy in two heads, aligned by CASA.

    python main_pretrain_alice.py --cfg configs/alice/vit_base.yaml --opts OUTPUT runs/alice DATA.TRAIN_CSV train.csv \
        DATA.CACHE_DIR cache
    torchrun --nproc_per_node 4 main_pretrain_alice.py --cfg configs/alice/vit_base.yaml

Preprocess with DATA.TEMPLATE set first: scans are matched through the template registrations stored in
the cache (docs/pretraining.md#alice). Views, the k-NN monitor (DINO.KNN_EVERY) and the objective come
from methods/registry.py.
"""
import sys

from config import get_config
from engine.cli import run_cli
from engine.launch import pretrain
from methods.registry import get_method


def main(argv=None) -> None:
    cfg = get_config(argv, description=__doc__.splitlines()[0])
    method = get_method("alice")
    pretrain(cfg, method.cls, method.build_view, evaluator=method.evaluator(cfg))


def cli() -> int:
    """The ``headct-pretrain-alice`` command: :func:`main`, a config or input error as one line (engine/cli.py)."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
