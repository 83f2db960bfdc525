"""Downstream classification on labelled head CTs: fine-tuning, linear probing, few-shot.

    python main_downstream.py --cfg configs/downstream/cq500_ich.yaml \
        --opts MODEL.PRETRAINED runs/mae_vit_base/backbone.pth
    torchrun --nproc_per_node 4 main_downstream.py --cfg configs/downstream/rsna_any.yaml

DOWNSTREAM.MODE finetune trains backbone and head; linear freezes the backbone (and, with
DOWNSTREAM.FEATURE_CACHE, fits a scikit-learn logistic regression on features extracted once);
fewshot draws FEW_SHOT_K positives and negatives per label for each of FEW_SHOT_SEEDS seeds and
trains each draw as FEW_SHOT_BASE into OUTPUT/seed_<s>/. Every run writes predictions.csv,
metrics.json (thresholds by Youden's J on validation, AUROC with bootstrap CIs, patient level with
DOWNSTREAM.GROUP_COLUMN) and roc_pr.png beside the engine's files, and prints a results table.
The run itself is downstream/run.py; the view is methods/registry.py's DOWNSTREAM_VIEW.
DOWNSTREAM.TASK segment trains a decoder around the encoder on the manifests' mask_path label maps
instead (downstream/segment.py): predictions/<id>.nii.gz on the source grid, per_case.csv, metrics.json.
"""
import sys
from typing import Optional

from config import get_config
from engine.cli import run_cli
from downstream.run import run_downstream
from methods.registry import DOWNSTREAM_VIEW


def main(argv=None) -> Optional[dict]:
    cfg = get_config(argv, description=__doc__.splitlines()[0])
    return run_downstream(cfg, DOWNSTREAM_VIEW)


def cli() -> int:
    """The ``headct-downstream`` command: runs :func:`main`; exit status 0 (the metrics are in OUTPUT), or
    a config or input error as one line (engine/cli.py)."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
