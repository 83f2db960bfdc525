#!/usr/bin/env bash
# `make demo-segment`, after `make demo`: the demo MAE's ViT-tiny fine-tuned as a segmenter of the phantom's
# bleeds (IPH, SDH), and the same decoder on a random encoder; per-class Dice with 95% CIs of both, and the
# paired difference pretrained - random over the same test cases with one sentence saying if it is significant.
#
#   bash tools/demo_segment.sh [OUTDIR]   (default outputs/demo; needs OUTDIR/mae/backbone.pth from make demo)
#
# Knobs (environment): DEMO_N (phantom volumes, default 96, as make demo), DEMO_SEG_EPOCHS (default:
# configs/demo/segment.yaml's), DEMO_SEG_OPTS (more KEY VALUE overrides, e.g. a smaller DATA.ROI), PYTHON.
# The phantom is written again with its label maps (--masks): the same images, plus masks/ and mask_path.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-outputs/demo}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
N="${DEMO_N:-96}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
P="$OUT/phantom"
[ -f "$OUT/mae/backbone.pth" ] || { echo "demo_segment: $OUT/mae/backbone.pth is missing; run make demo first" >&2; exit 1; }
OPTS=(DATA.TRAIN_CSV "$P/train.csv" DATA.VAL_CSV "$P/val.csv" DATA.TEST_CSV "$P/test.csv")
if [ -n "${DEMO_SEG_EPOCHS:-}" ]; then
    OPTS+=(TRAIN.EPOCHS "$DEMO_SEG_EPOCHS" TRAIN.WARMUP_EPOCHS "$([ "$DEMO_SEG_EPOCHS" -gt 1 ] && echo 1 || echo 0)")
fi
read -r -a EXTRA <<< "${DEMO_SEG_OPTS:-}"
start=$(date +%s)
stamp() { echo "[demo-segment $(( $(date +%s) - start ))s] $*"; }

stamp "1/3 phantom with label maps (0 background, IPH 1, IVH 2, SDH 3, EDH 4, SAH 5, Fracture 6) -> $P"
"$PY" -m data.phantom --out "$P" --n "$N" --masks

stamp "2/3 segmenter on the MAE-pretrained encoder -> $OUT/segment"
"$PY" main_downstream.py --cfg configs/demo/segment.yaml --opts OUTPUT "$OUT/segment" "${OPTS[@]}" \
    MODEL.PRETRAINED "$OUT/mae/backbone.pth" ${EXTRA[@]+"${EXTRA[@]}"}

stamp "3/3 the same decoder on a random encoder -> $OUT/segment_random"
"$PY" main_downstream.py --cfg configs/demo/segment.yaml --opts OUTPUT "$OUT/segment_random" "${OPTS[@]}" \
    MODEL.PRETRAINED "" ${EXTRA[@]+"${EXTRA[@]}"}

elapsed=$(( $(date +%s) - start ))
"$PY" - "$OUT" "$elapsed" <<'EOF'
import json, os, sys
from evaluation.compare_segmentation import compare_per_case
out, elapsed = sys.argv[1], int(sys.argv[2])
def dice(m):
    if m["dice"] is None:
        return "n/a"
    ci = m["dice_ci95"]
    return f"{m['dice']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{m['dice']:.3f}"
runs = {"MAE-pretrained": "segment", "random init": "segment_random"}
res = {name: json.load(open(os.path.join(out, folder, "metrics.json")))["test"] for name, folder in runs.items()}
classes = list(res["MAE-pretrained"])
print("\nBleed segmentation on the phantom's test split: Dice [95% CI] per class (source grid)")
print(f"{'class':<10} {'cases':>5}  " + "  ".join(f"{n:<24}" for n in runs))
for c in classes:
    print(f"{c:<10} {res['MAE-pretrained'][c]['n_cases']:>5}  " + "  ".join(f"{dice(res[n][c]):<24}" for n in runs))
cmp = compare_per_case(os.path.join(out, "segment", "per_case.csv"), os.path.join(out, "segment_random", "per_case.csv"),
                       n_bootstrap=2000, seed=0, name_a="MAE-pretrained", name_b="random init")
print("\nPretrained - random, paired over the same test cases (bootstrap CI, Wilcoxon p):")
for c, r in cmp.items():
    ci = f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" if r["ci95"] else "[n/a]"
    p = f"p = {r['p_value']:.2g}" if r["p_value"] is not None else "identical on every case"
    print(f"  {c:<10} {r['diff']:+.3f} Dice {ci}, {p}")
print("  " + cmp["macro"]["sentence"])
print(f"\ndemo-segment finished in {elapsed // 60} min {elapsed % 60} s. Files: {out}/segment/ and "
      f"{out}/segment_random/ (predictions/<id>.nii.gz on the source grid, per_case.csv, metrics.json, "
      "segmentation.png)")
EOF
