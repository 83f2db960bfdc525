"""Config overrides for one task of a Slurm job array (used by slurm_submit/downstream_sweep.sbatch).

    python slurm_submit/sweep.py --key DOWNSTREAM.FEW_SHOT_K --values "1 2 4 8 16" --index 2 \\
        --cfg configs/downstream/rsna_any.yaml [--opts KEY VALUE ...]

prints four lines, the pairs to append to the task's ``--opts``::

    DOWNSTREAM.FEW_SHOT_K
    4
    OUTPUT
    <OUTPUT of the merged config>/few_shot_k_4

Values are separated by spaces. For a key whose default is a list (``DOWNSTREAM.LABELS``), a bare
item becomes a one-item list (``ICH`` -> ``['ICH']``); write a list without spaces
(``[ICH,SAH]``) to sweep over groups of labels.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for config.py

from config import ConfigError, _get, get_config, get_defaults  # noqa: E402


def sweep_opts(key: str, values: Sequence[str], index: int, cfg_path: str,
               opts: Sequence[str] = ()) -> list[str]:
    """The ``KEY VALUE OUTPUT DIR`` overrides of array task ``index``.

    Args:
        key: the swept config key, e.g. ``DOWNSTREAM.FEW_SHOT_K``.
        values: the swept values as strings, one per array task.
        index: the array task id (``SLURM_ARRAY_TASK_ID``), 0-based into ``values``.
        cfg_path: the task's config file.
        opts: the task's other ``KEY VALUE`` overrides (they may set OUTPUT).

    Returns:
        ``[key, value, "OUTPUT", "<merged OUTPUT>/<name>_<value>"]`` where ``<name>`` is the last
        part of the key in lower case.
    """
    if not values:
        raise ValueError("no sweep values given (HEADCT_SWEEP_VALUES is empty)")
    if not 0 <= index < len(values):
        raise ValueError(f"array task {index} has no sweep value: {len(values)} values {list(values)} "
                         f"need --array=0-{len(values) - 1}")
    try:
        default = _get(get_defaults(), key)
    except KeyError:
        raise ConfigError(f"unknown config key {key!r} in HEADCT_SWEEP_KEY") from None
    raw = values[index]
    value = raw
    if isinstance(default, (list, tuple)):  # yacs needs a Python literal: ICH or [ICH,SAH] -> "['ICH', 'SAH']"
        items = [i.strip().strip("'\"") for i in raw.strip("[]").split(",") if i.strip()]
        value = repr([yaml.safe_load(i) for i in items])
    base = get_config(["--cfg", cfg_path, "--opts", *opts]).OUTPUT
    name = f"{key.split('.')[-1].lower()}_{re.sub(r'[^A-Za-z0-9.+-]+', '-', raw).strip('-')}"
    return [key, value, "OUTPUT", os.path.join(base, name)]


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--key", required=True, help="config key to sweep, e.g. DOWNSTREAM.FEW_SHOT_K")
    p.add_argument("--values", required=True, help="space-separated values, one per array task")
    p.add_argument("--index", required=True, type=int, help="array task id (SLURM_ARRAY_TASK_ID)")
    p.add_argument("--cfg", required=True, help="the config file of the runs")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="the runs' other KEY VALUE pairs")
    args = p.parse_args(argv)
    try:
        out = sweep_opts(args.key, args.values.split(), args.index, args.cfg, args.opts)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
