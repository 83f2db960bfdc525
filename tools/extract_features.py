"""Extract embeddings of every scan of DATA.TEST_CSV with a (pretrained) backbone.

    python -m tools.extract_features --cfg configs/demo/mae.yaml \
        --opts MODEL.PRETRAINED runs/mae_vit_base/backbone.pth DATA.TEST_CSV data/all.csv OUTPUT runs/feats
    python -m tools.extract_features --tokens --cfg ... --opts ...        # patch tokens too
    # a published model (CT-FM, SwinUNETR-SSL, FMCIB, HeadCT-FM) imported by tools/import_checkpoint.py:
    python -m tools.import_checkpoint --format ct-fm --in ct_fm_feature_extractor --out runs/ct_fm/backbone.pth
    python -m tools.extract_features --cfg runs/ct_fm/model.yaml --opts DATA.TEST_CSV data/all.csv \
        OUTPUT runs/ct_fm/feats
    torchrun --nproc_per_node 4 tools/extract_features.py --cfg ... --opts ...

Writes to OUTPUT: ``features.npy`` (float32 ``[N, embed_dim]``, the backbone's pooled output,
``MODEL.POOL`` for ViTs), ``features.csv`` (one row per row of features.npy: ``id``, ``img_path``,
the ``DOWNSTREAM.GROUP_COLUMN`` when set, then every other column of the manifest as it is, e.g.
the labels), ``features.json`` (shapes, model, checkpoint, timing), ``config.yaml``, ``log.txt``,
with ``--tokens`` also ``tokens.npy`` (float16 ``[N, n_tokens, token_dim]``: ViT patch tokens
without CLS and registers, or a CNN's last feature map flattened; grid in features.json), and
``skipped.csv`` when scans were skipped (``DATA.ON_ERROR skip``).

Views are the evaluation views (``SingleView(cfg, train=False)``: centred, deterministic). Every
rank embeds its share of the rows (``engine.dist.make_loader(train=False)``: no padding); rank 0
gathers them by row. Resumable: rows are cut into parts of ``--part-size`` rows, each written to
``OUTPUT/parts/`` atomically as soon as every rank has finished it; a restarted run skips the
parts already written (the same settings are required: a changed checkpoint, manifest or model
setting stops with an error instead of mixing features). When all parts exist they are assembled
and ``parts/`` is removed (``--keep-parts`` keeps it). ``--opts`` must come last.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from config import build_parser, config_from_args
from data.datasets import VolumeDataset, collate
from data.io import write_skipped
from data.manifest import Manifest
from data.views import SingleView
from engine import dist
from engine.amp import autocast
from engine.cli import run_cli
from engine.embed import embed_batch
from engine.logging import setup_console

PART_SIZE = 1024  # rows per part file (the unit of resumption)


# ----------------------------------------------------------------------------------- rows
class _Rows(Dataset):
    """The rows still to embed: position p -> dataset row ``rows[p]``; samples carry ``"pos"``."""

    def __init__(self, dataset: VolumeDataset, rows: np.ndarray):
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self, pos: int) -> str:
        return self.dataset.describe(int(self.rows[int(pos)]))

    def __getitem__(self, key):
        pos, epoch = key if isinstance(key, (tuple, list)) else (key, 0)
        sample = self.dataset[(int(self.rows[int(pos)]), int(epoch))]
        sample["pos"] = int(pos)
        return sample


# ----------------------------------------------------------------------------------- settings
def fingerprint(cfg, manifest: Manifest, tokens: bool, part_size: int) -> dict:
    """What the features depend on; parts written under another fingerprint are never reused."""
    h = hashlib.sha256()
    for arr in (manifest.ids, manifest.paths):
        h.update(arr.buffer.tobytes())
        h.update(arr.offsets.tobytes())
    ckpt = cfg.MODEL.PRETRAINED
    ckpt_stat = None
    if ckpt and os.path.isfile(ckpt):
        st = os.stat(ckpt)
        ckpt_stat = [os.path.abspath(ckpt), st.st_size, st.st_mtime_ns]
    data = {k: cfg.DATA[k] for k in ("WINDOWS", "SPACING", "ROI", "FIT", "HEAD_THRESHOLD", "ON_ERROR")}
    model = {k: v for k, v in cfg.MODEL.items()}
    return {"manifest_sha256": h.hexdigest(), "rows": len(manifest), "checkpoint": ckpt_stat,
            "model": json.loads(json.dumps(model)), "data": json.loads(json.dumps(data)),
            "amp": cfg.TRAIN.AMP, "tokens": bool(tokens), "part_size": int(part_size)}


def _part_path(out_dir: str, k: int) -> str:
    return os.path.join(out_dir, "parts", f"part_{k:06d}.npz")


def _write_npz_atomic(path: str, **arrays: np.ndarray) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _gather_to_main(obj: Any) -> Optional[list]:
    """Every rank's ``obj`` on rank 0 (rank order), None elsewhere; no copy on other ranks."""
    if dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.is_main() else None
    tdist.gather_object(obj, out, dst=0)
    return out


def _broadcast_from_main(obj: Any) -> Any:
    return dist.all_gather_object(obj if dist.is_main() else None)[0]


# ----------------------------------------------------------------------------------- parts
def _plan(out_dir: str, fp: dict, n: int, part_size: int) -> tuple[list[int], str]:
    """(parts still to do, error message or ''); rank 0 reads and writes ``parts/meta.json``."""
    parts_dir = os.path.join(out_dir, "parts")
    meta_path = os.path.join(parts_dir, "meta.json")
    old = _read_json(meta_path)
    if old is not None and old != fp:
        changed = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
        return [], (f"{parts_dir} holds parts of an extraction with other settings (changed: {changed}); "
                    "delete that folder or choose another OUTPUT")
    os.makedirs(parts_dir, exist_ok=True)
    if old is None:
        _write_json_atomic(meta_path, fp)
    n_parts = (n + part_size - 1) // part_size
    return [k for k in range(n_parts) if not os.path.isfile(_part_path(out_dir, k))], ""


def _embed_parts(backbone: nn.Module, dataset: VolumeDataset, cfg, out_dir: str, todo: list[int],
                 part_size: int, tokens: bool, device: torch.device, progress: bool) -> tuple[int, ...]:
    """Embed the rows of the parts in ``todo``; rank 0 writes each part as soon as it is complete."""
    n = len(dataset)
    bounds = [(k, k * part_size, min(n, (k + 1) * part_size)) for k in todo]
    rows = np.concatenate([np.arange(a, b) for _, a, b in bounds]) if bounds else np.zeros(0, np.int64)
    starts = np.cumsum([0] + [b - a for _, a, b in bounds])  # part j covers positions starts[j]:starts[j+1]
    rank, world = dist.get_rank(), dist.get_world_size()

    def last_owned(j: int) -> int:  # this rank's last position in part j (eval sampler: rank, rank + W, ...)
        lo, hi = int(starts[j]), int(starts[j + 1])
        p = hi - 1 - ((hi - 1 - rank) % world)
        return p if p >= lo else -1

    loader = dist.make_loader(_Rows(dataset, rows), cfg, train=False, collate_fn=collate)
    buffers: dict[int, list] = {}  # part j -> [(row, pooled, tokens or None, skipped)]
    grid: tuple[int, ...] = ()
    next_part, max_pos = 0, -1
    bar = tqdm(total=len(rows), unit="scan", desc="features", disable=not (progress and dist.is_main()),
               dynamic_ncols=True)

    def flush_complete(final: bool = False) -> None:
        nonlocal next_part
        while next_part < len(bounds) and (final or last_owned(next_part) <= max_pos):
            local = buffers.pop(next_part, [])
            gathered = _gather_to_main(local)
            if gathered is not None:
                _write_part(out_dir, bounds[next_part], [x for g in gathered for x in g], tokens,
                            cfg.DATA.ON_ERROR == "skip")
            next_part += 1

    with torch.no_grad():
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            with autocast(device.type, cfg.TRAIN.AMP):
                pooled, toks, grid = embed_batch(backbone, x, tokens)
            pooled = pooled.float().cpu().numpy()
            toks = toks.to(torch.float16).cpu().numpy() if toks is not None else None
            pos = np.asarray(batch["pos"]).reshape(-1)
            idx = np.asarray(batch["index"]).reshape(-1)  # the row read (another one when a scan was skipped)
            skipped = list(batch.get("skipped", []))
            for i, p in enumerate(pos):
                j = int(np.searchsorted(starts, p, side="right") - 1)
                buffers.setdefault(j, []).append((int(idx[i]), pooled[i], None if toks is None else toks[i],
                                                  skipped if i == 0 else []))
            max_pos = max(max_pos, int(pos.max()))
            bar.update(min(len(pos) * world, bar.total - bar.n))
            flush_complete()
    flush_complete(final=True)
    bar.close()
    del loader
    return grid


def _write_part(out_dir: str, bound: tuple[int, int, int], items: list, tokens: bool, skip: bool) -> None:
    """Rank 0: one part's rows (in row order, each once) -> ``parts/part_K.npz``."""
    k, lo, hi = bound
    rows = np.asarray([it[0] for it in items], dtype=np.int64)
    # under DATA.ON_ERROR skip a bad row is replaced by the next good one: keep rows of this part, once
    keep = [i for i in np.unique(rows, return_index=True)[1] if lo <= rows[i] < hi]
    keep.sort(key=lambda i: rows[i])
    missing = sorted(set(range(lo, hi)) - {int(rows[i]) for i in keep})
    if missing and not skip:
        raise RuntimeError(f"part {k}: rows {missing[:10]} were not embedded; the eval loader must cover "
                           "every row once (engine.dist.make_loader(train=False))")
    skipped = sorted({(str(p), str(r)) for it in items for p, r in it[3]})
    pooled = np.stack([items[i][1] for i in keep]) if keep else np.zeros((0, 0), np.float32)
    arrays = {"rows": rows[keep], "features": pooled.astype(np.float32),
              "skipped_paths": np.asarray([p for p, _ in skipped], dtype=str),
              "skipped_reasons": np.asarray([r for _, r in skipped], dtype=str)}
    if tokens:
        arrays["tokens"] = np.stack([items[i][2] for i in keep]) if keep else np.zeros((0, 0, 0), np.float16)
    _write_npz_atomic(_part_path(out_dir, k), **arrays)


# ----------------------------------------------------------------------------------- assembly
def _manifest_table(cfg, manifest: Manifest) -> tuple[list[str], list[list[str]]]:
    """features.csv columns and one list of cells per manifest row (the manifest's own columns)."""
    path = cfg.DATA.TEST_CSV
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        raw = [r for r in reader if r and any(c.strip() for c in r)]  # Manifest.read skips blank lines
    if len(raw) != len(manifest):
        raise RuntimeError(f"{path}: {len(raw)} rows read, the manifest holds {len(manifest)}")
    group = cfg.DOWNSTREAM.GROUP_COLUMN
    lead = ["id", "img_path"] + ([group] if group else [])
    rest = [h for h in header if h not in lead]
    cols = lead + rest
    where = {h: header.index(h) for h in rest}
    cells = []
    for i, r in enumerate(raw):
        line = [manifest.ids[i], manifest.paths[i]] + ([manifest.groups[i]] if group else [])
        cells.append(line + [r[where[h]] for h in rest])
    return cols, cells


def _assemble(cfg, manifest: Manifest, out_dir: str, n_parts: int, tokens: bool, grid: Sequence[int],
              backbone: nn.Module, keep_parts: bool, log) -> dict:
    """Rank 0: parts -> features.npy, tokens.npy, features.csv, skipped.csv, features.json."""
    rows_all, dims, tok_shape, skipped = [], None, None, {}
    for k in range(n_parts):
        with np.load(_part_path(out_dir, k)) as z:
            rows_all.append(z["rows"])
            if len(z["rows"]):
                dims = z["features"].shape[1]
                if tokens:
                    tok_shape = z["tokens"].shape[1:]
            skipped.update(zip(z["skipped_paths"].tolist(), z["skipped_reasons"].tolist()))
    rows = np.concatenate(rows_all) if rows_all else np.zeros(0, np.int64)
    if len(rows) == 0:
        raise RuntimeError("no scan could be embedded (all were skipped); see skipped.csv")
    feat_path = os.path.join(out_dir, "features.npy")
    tok_path = os.path.join(out_dir, "tokens.npy")
    tmp_f = f"{feat_path}.{os.getpid()}.tmp.npy"
    feats = np.lib.format.open_memmap(tmp_f, mode="w+", dtype=np.float32, shape=(len(rows), dims))
    toks = None
    if tokens:
        tmp_t = f"{tok_path}.{os.getpid()}.tmp.npy"
        toks = np.lib.format.open_memmap(tmp_t, mode="w+", dtype=np.float16, shape=(len(rows),) + tuple(tok_shape))
    at = 0
    for k in range(n_parts):
        with np.load(_part_path(out_dir, k)) as z:
            m = len(z["rows"])
            if m == 0:  # every row of the part was skipped
                continue
            feats[at:at + m] = z["features"]
            if toks is not None:
                toks[at:at + m] = z["tokens"]
            at += m
    feats.flush()
    del feats
    os.replace(tmp_f, feat_path)
    if toks is not None:
        toks.flush()
        del toks
        os.replace(tmp_t, tok_path)
    elif os.path.exists(tok_path):
        os.remove(tok_path)  # from an earlier run with --tokens: it would not match these rows

    cols, cells = _manifest_table(cfg, manifest)
    csv_path = os.path.join(out_dir, "features.csv")
    tmp = f"{csv_path}.{os.getpid()}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow(cells[int(r)])
    os.replace(tmp, csv_path)
    if skipped:
        write_skipped(os.path.join(out_dir, "skipped.csv"), skipped.items())
        log.warning(f"{len(skipped)} scans skipped (DATA.ON_ERROR skip): see {os.path.join(out_dir, 'skipped.csv')}")
    info = {"n": int(len(rows)), "n_manifest": len(manifest), "n_skipped": len(skipped),
            "embed_dim": int(dims), "model": cfg.MODEL.NAME,
            "pool": cfg.MODEL.POOL if hasattr(backbone, "pool_tokens") else "mean",
            "pretrained": os.path.abspath(cfg.MODEL.PRETRAINED) if cfg.MODEL.PRETRAINED else "",
            "test_csv": os.path.abspath(cfg.DATA.TEST_CSV), "group_column": cfg.DOWNSTREAM.GROUP_COLUMN,
            "features": "features.npy", "table": "features.csv",
            "tokens": ({"file": "tokens.npy", "shape": [int(len(rows))] + [int(s) for s in tok_shape],
                        "grid": [int(g) for g in grid], "dtype": "float16",
                        "prefix_tokens_removed": int(getattr(backbone, "num_prefix_tokens", 0))}
                       if tokens else None)}
    if not keep_parts:
        shutil.rmtree(os.path.join(out_dir, "parts"), ignore_errors=True)
    return info


# ----------------------------------------------------------------------------------- main
def extract_features(cfg, tokens: bool = False, part_size: int = PART_SIZE, keep_parts: bool = False,
                     progress: bool = True) -> Optional[dict]:
    """Embed every row of ``DATA.TEST_CSV`` into ``OUTPUT`` (see the module docstring).

    Call in every process of a (torchrun) job; the process group is set up here when needed.

    Args:
        cfg: the frozen config (DATA.TEST_CSV, OUTPUT, MODEL.*, DATA.*, TRAIN.AMP).
        tokens: also write ``tokens.npy``.
        part_size: rows per part file (the unit of resumption).
        keep_parts: keep ``OUTPUT/parts/`` after assembly.
        progress: tqdm bar on rank 0.

    Returns:
        The content of ``features.json`` on rank 0, None on the other ranks.

    Raises:
        ValueError: DATA.TEST_CSV is empty, or bad ``part_size``.
        RuntimeError: parts of another extraction in ``OUTPUT/parts``.
    """
    if not cfg.DATA.TEST_CSV:
        raise ValueError("DATA.TEST_CSV is empty: tools/extract_features.py embeds the rows of DATA.TEST_CSV; "
                         "set it with --opts DATA.TEST_CSV <manifest.csv>")
    if int(part_size) < 1:
        raise ValueError(f"part_size = {part_size}; it must be >= 1")
    from engine.launch import build_backbone_from_cfg  # models import only when used
    t0 = time.perf_counter()
    out_dir = cfg.OUTPUT
    info_dist = dist.init_distributed()
    try:
        main = dist.is_main()
        if main:
            os.makedirs(out_dir, exist_ok=True)
        dist.barrier()
        log = setup_console(out_dir, main, name="extract_features")
        manifest = Manifest.read(cfg.DATA.TEST_CSV, root=cfg.DATA.ROOT, group_column=cfg.DOWNSTREAM.GROUP_COLUMN)
        fp = fingerprint(cfg, manifest, tokens, int(part_size))
        done = _read_json(os.path.join(out_dir, "features.json")) if main else None
        up_to_date = bool(done and done.get("fingerprint") == fp
                          and os.path.isfile(os.path.join(out_dir, "features.npy")))
        if _broadcast_from_main(up_to_date):
            log.info(f"{out_dir}: features of these settings already exist; nothing to do")
            return done
        dist.seed_everything(cfg.SEED)
        backbone = build_backbone_from_cfg(cfg, log).to(info_dist.device).eval()  # fails before any file is written
        for p in backbone.parameters():
            p.requires_grad_(False)
        todo, error = _plan(out_dir, fp, len(manifest), int(part_size)) if main else ([], "")
        todo, error = _broadcast_from_main((todo, error))
        if error:
            raise RuntimeError(error)
        if main:
            from config import save_config
            save_config(cfg, out_dir)
        n_parts = (len(manifest) + int(part_size) - 1) // int(part_size)
        log.info(f"{cfg.DATA.TEST_CSV}: {len(manifest)} scans, {n_parts} parts of {part_size}; "
                 f"{len(todo)} to do, {n_parts - len(todo)} done; {dist.get_world_size()} process(es)")
        dataset = VolumeDataset(manifest, cfg, SingleView(cfg, train=False))
        grid = _embed_parts(backbone, dataset, cfg, out_dir, todo, int(part_size), tokens, info_dist.device,
                            progress)
        if tokens and main and not grid:  # every part was done before this run: the grid of one input
            roi = [int(r) for r in cfg.DATA.ROI]
            with torch.no_grad():
                x = torch.zeros([1, len(cfg.DATA.WINDOWS)] + roi, device=info_dist.device)
                grid = embed_batch(backbone, x, True)[2]
        dist.barrier()  # every part is written
        if not main:
            return None  # no collective after this point: a long assembly cannot time out the others
        info = _assemble(cfg, manifest, out_dir, n_parts, tokens, grid, backbone, keep_parts, log)
        info["fingerprint"] = fp
        info["seconds"] = round(time.perf_counter() - t0, 2)
        _write_json_atomic(os.path.join(out_dir, "features.json"), info)
        log.info(f"wrote {info['n']} x {info['embed_dim']} features to {os.path.join(out_dir, 'features.npy')}"
                 + (f" and tokens {info['tokens']['shape']} to tokens.npy" if tokens else "")
                 + f" in {info['seconds']:.1f} s")
        return info
    finally:
        dist.cleanup()


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    """Parse ``[--tokens] [--part-size N] [--keep-parts] [--no-progress] --cfg ... --opts ...`` and extract."""
    parser = build_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--tokens", action="store_true", help="also write tokens.npy (patch tokens, float16)")
    parser.add_argument("--part-size", type=int, default=PART_SIZE,
                        help=f"rows per resumable part file (default {PART_SIZE})")
    parser.add_argument("--keep-parts", action="store_true", help="keep OUTPUT/parts/ after assembly")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if not cfg.DATA.TEST_CSV:
        parser.error("DATA.TEST_CSV is empty; give --opts DATA.TEST_CSV <manifest.csv> (the scans to embed)")
    if args.part_size < 1:
        parser.error(f"--part-size must be >= 1 (got {args.part_size})")
    return extract_features(cfg, tokens=args.tokens, part_size=args.part_size, keep_parts=args.keep_parts,
                            progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(run_cli(main))
