"""Import a published foundation model's checkpoint into the zoo: ``backbone.pth`` + ``model.yaml``.

    python -m tools.import_checkpoint --format ct-fm --in ct_fm_feature_extractor/ --out runs/ct_fm/backbone.pth
    python -m tools.import_checkpoint --format swinunetr-ssl --in model_swinvit.pt --out runs/swin_ssl/backbone.pth
    python -m tools.import_checkpoint --format fmcib --in model_weights.torch --out runs/fmcib/backbone.pth
    python -m tools.import_checkpoint --format headct-fm --in dino_checkpoint.pt --entry teacher \
        --out runs/headct_fm/backbone.pth

Writes, beside ``--out``: ``model.yaml`` (the ``MODEL.*`` / ``DATA.*`` settings the source model expects,
with ``MODEL.PRETRAINED`` pointing at the new backbone.pth; use it as ``--cfg`` or as a ``_BASE_``) and
``import.json`` (source, SHA-256, every dropped and filled tensor with the reason, preprocessing
notes). The import is strict (``models.import_checkpoint``): a tensor of unknown role, a missing
tensor or a shape mismatch stops with the key names and shapes; nothing loads partially.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from engine.cli import USER_ERROR_STATUS, debug_enabled, run_cli
from models.import_checkpoint import ENTRIES, FORMATS, CheckpointImportError, import_checkpoint


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.import_checkpoint",
                                 description="Convert a CT-FM, SwinUNETR-SSL, FMCIB or HeadCT-FM checkpoint into "
                                             "backbone.pth + model.yaml, strictly.")
    ap.add_argument("--format", required=True, choices=FORMATS, help="layout of the source checkpoint")
    ap.add_argument("--in", dest="src", required=True,
                    help="the published file (ct-fm: the hub folder with model.safetensors + config.json, a "
                         ".safetensors file, or a SegResNetDS checkpoint)")
    ap.add_argument("--out", required=True, help="backbone.pth to write (model.yaml, import.json go beside it)")
    ap.add_argument("--entry", choices=ENTRIES, default=None,
                    help="headct-fm training checkpoints: teacher (momentum_model_state_dict, the default when "
                         "present) or student (state_dict)")
    ap.add_argument("--roi", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                    help="headct-fm: input size the ViT was trained at, when its position table is not a cube")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, import, print what was written; returns 0."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.format != "headct-fm" and (args.entry or args.roi):
        ap.error(f"--entry and --roi apply to --format headct-fm only, not to {args.format}")
    report = import_checkpoint(args.format, args.src, args.out, entry=args.entry, roi=args.roi)
    print(f"{args.format}: {report['tensors']} backbone tensors from {args.src} "
          f"(entry {report['entry'] or '<top level>'}) -> {args.out}")
    for label in ("dropped", "filled"):
        counts: dict[str, int] = {}
        for why in report[label].values():
            counts[why] = counts.get(why, 0) + 1
        for why, n in counts.items():
            print(f"  {label} {n}: {why}")
    for key, value in report["settings"].items():
        print(f"  {key} = {value}")
    for note in report["notes"]:
        print(f"  note: {note}")
    folder = os.path.dirname(report["model_yaml"])
    print(f"wrote {args.out}, {report['model_yaml']}, {os.path.join(folder, 'import.json')}")
    print(f"probe it: python -m tools.extract_features --cfg {report['model_yaml']} --opts DATA.TEST_CSV <manifest> "
          "OUTPUT <folder>")
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``main`` with a checkpoint that cannot be imported reported as one line, exit status 2."""
    try:
        return run_cli(main, argv, prog="import_checkpoint")
    except (CheckpointImportError, FileNotFoundError) as e:
        if debug_enabled():
            raise
        print(f"import_checkpoint: error: {e}", file=sys.stderr, flush=True)
        return USER_ERROR_STATUS


if __name__ == "__main__":
    sys.exit(cli())
