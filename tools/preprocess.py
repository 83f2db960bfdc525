"""Preprocess every volume of the config's manifests once into the memory-mapped cache.

    python -m tools.preprocess --cfg configs/mae/vit_base.yaml \
        --opts DATA.TRAIN_CSV my/train.csv DATA.VAL_CSV my/val.csv DATA.CACHE_DIR /scratch/cache

Reads DATA.TRAIN_CSV / DATA.VAL_CSV / DATA.TEST_CSV (those set), orients each volume to RAS,
resamples it to DATA.SPACING, crops it to the head (DATA.HEAD_THRESHOLD) and stores int16 HU under
DATA.CACHE_DIR/<key>/ (see data/cache.py) over DATA.NUM_WORKERS processes. Resumable: run it again
after an interruption and only the missing entries are done. Under DATA.ON_ERROR skip, bad inputs
go to DATA.CACHE_DIR/<key>/skipped.csv (path, reason). With DATA.TEMPLATE set, every scan is also
registered to that head-CT template (data/registration.py); the transform goes into the entry's sidecar,
refused registrations into DATA.CACHE_DIR/<key>/registration.csv (docs/data.md#registration-to-a-head-ct-template).
"""
from __future__ import annotations

import sys

from config import build_parser, config_from_args
from data.cache import preprocess_manifests
from data.io import BadInputError, TooManyBadInputs
from engine.cli import run_cli


def main(argv=None) -> int:
    """Parse ``--cfg`` / ``--opts``, fill the cache; returns the exit status (1 on bad input)."""
    parser = build_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if not cfg.DATA.CACHE_DIR:
        parser.error("DATA.CACHE_DIR is empty; give --opts DATA.CACHE_DIR <folder>")
    try:
        preprocess_manifests(cfg, progress=not args.no_progress)
    except (BadInputError, TooManyBadInputs) as e:
        print(f"preprocess: stopped: {e}", file=sys.stderr)
        if isinstance(e, BadInputError):
            print("(set DATA.ON_ERROR skip to list bad inputs in skipped.csv and go on)", file=sys.stderr)
        return 1
    return 0


def cli() -> int:
    """The ``headct-preprocess`` command: :func:`main`, a config or manifest error as one line (engine/cli.py)."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
