"""Fraction of a training run's wall time spent waiting for data, from its metrics.jsonl.

    python -m benchmarks.data_wait --run runs/dino_vit_base [--skip-first 1] [--json wait.json]

Every logged step row of ``OUTPUT/metrics.jsonl`` carries ``data_s`` (mean seconds the loop waited
for the next batch) and ``step_s`` (mean seconds of the step itself: transfer, forward, backward,
optimizer) over the optimizer steps since the previous row of the same epoch. The wait fraction is

    sum(data_s * n) / sum((data_s + step_s) * n)

with ``n`` the steps each row covers. ``--skip-first K`` leaves out the first K logged rows of
every epoch (worker start-up and the pipeline refill at an epoch boundary); both figures are given.
Target on a GPU: under 5%.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterable

from benchmarks.common import header, write_json
from engine.cli import run_cli


def read_step_rows(path: str) -> list[dict]:
    """Step rows (those with ``data_s`` and ``step_s``) of a metrics.jsonl, in file order.

    Raises:
        FileNotFoundError: naming the file when it is missing.
        ValueError: naming the line of a row that is not JSON.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is --run the OUTPUT folder of a training run?)")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e})") from None
            if isinstance(row, dict) and row.get("data_s") is not None and row.get("step_s") is not None:
                rows.append(row)
    return rows


def with_step_counts(rows: Iterable[dict]) -> list[tuple[dict, int, int]]:
    """``(row, steps covered, position within its epoch)`` for each step row.

    A row logged at ``step`` s of an epoch covers the steps since the previous row of that epoch (a
    resumed run may log a row twice; a repeated (epoch, step) counts once).
    """
    out = []
    prev: dict[int, int] = {}
    pos: dict[int, int] = {}
    seen = set()
    for r in rows:
        epoch, step = int(r.get("epoch", 0)), int(r.get("step", 0))
        if (epoch, step) in seen:
            continue
        seen.add((epoch, step))
        n = max(1, step - prev.get(epoch, 0))
        out.append((r, n, pos.get(epoch, 0)))
        prev[epoch] = step
        pos[epoch] = pos.get(epoch, 0) + 1
    return out


def wait_fraction(rows: list[dict], skip_first: int = 0) -> dict[str, Any]:
    """Summed data and step seconds and the wait fraction, skipping the first rows of each epoch."""
    data = step = 0.0
    steps = n_rows = 0
    for r, n, p in with_step_counts(rows):
        if p < skip_first:
            continue
        data += float(r["data_s"]) * n
        step += float(r["step_s"]) * n
        steps += n
        n_rows += 1
    total = data + step
    return {"data_s": data, "step_s": step, "steps": steps, "rows": n_rows,
            "wait_fraction": data / total if total > 0 else None}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--run", required=True, help="OUTPUT folder of a training run (holds metrics.jsonl)")
    p.add_argument("--skip-first", type=int, default=1,
                   help="logged rows left out at the start of each epoch for the steady-state figure (default 1)")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    rows = read_step_rows(os.path.join(args.run, "metrics.jsonl"))
    if not rows:
        raise SystemExit(f"{args.run}/metrics.jsonl has no step rows with data_s and step_s")
    result = header(run=os.path.abspath(args.run), skip_first=args.skip_first)
    result["all"] = wait_fraction(rows)
    result["steady"] = wait_fraction(rows, args.skip_first)
    sps = [float(r["samples_per_s"]) for r in rows if r.get("samples_per_s") is not None]
    result["all"]["samples_per_s_mean"] = sum(sps) / len(sps) if sps else None
    cfg_path = os.path.join(args.run, "config.yaml")
    if os.path.isfile(cfg_path):
        import yaml
        with open(cfg_path) as f:
            c = yaml.safe_load(f) or {}
        d = c.get("DATA", {})
        result.update(num_workers=d.get("NUM_WORKERS"), batch_size=d.get("BATCH_SIZE"),
                      model=c.get("MODEL", {}).get("NAME"), amp=c.get("TRAIN", {}).get("AMP"))
    a, s = result["all"], result["steady"]
    fmt = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print(f"{args.run}: waited for data {fmt(a['wait_fraction'])} of {a['data_s'] + a['step_s']:.1f} s over "
          f"{a['steps']} steps; {fmt(s['wait_fraction'])} without the first {args.skip_first} logged row(s) of "
          f"each epoch")
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
