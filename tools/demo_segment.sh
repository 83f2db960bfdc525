#!/usr/bin/env bash
# `make demo-segment`, after `make demo`: the demo MAE's ViT-tiny fine-tuned as a segmenter of the phantom's
# subdural bleeds (SDH), and the same decoder on a random encoder; per-class Dice with 95% CIs of both (over all
# test cases, and over the cases holding the bleed), and the paired difference pretrained - random over the same
# test cases with one sentence saying if it is significant. About 2.5 minutes on two idle cores.
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

# Both runs at once, each on half the threads: on two cores 133 s instead of 214 s one after the other (the
# small convolutions use a second thread poorly). Each run's console goes to <run>.console.txt; Ctrl-C or a
# failed run stops both.
[[ "$OMP_NUM_THREADS" =~ ^[1-9][0-9]*$ ]] || { echo "demo_segment: OMP_NUM_THREADS=$OMP_NUM_THREADS is not a thread count" >&2; exit 1; }
half=$(( (OMP_NUM_THREADS + 1) / 2 ))
stamp "2/3 segmenter on the MAE-pretrained encoder -> $OUT/segment"
stamp "3/3 the same decoder on a random encoder -> $OUT/segment_random  (both at once, $half thread(s) each)"
OMP_NUM_THREADS=$half "$PY" main_downstream.py --cfg configs/demo/segment.yaml --opts OUTPUT "$OUT/segment" \
    "${OPTS[@]}" MODEL.PRETRAINED "$OUT/mae/backbone.pth" ${EXTRA[@]+"${EXTRA[@]}"} > "$OUT/segment.console.txt" 2>&1 &
pre=$!
OMP_NUM_THREADS=$half "$PY" main_downstream.py --cfg configs/demo/segment.yaml --opts OUTPUT "$OUT/segment_random" \
    "${OPTS[@]}" MODEL.PRETRAINED "" ${EXTRA[@]+"${EXTRA[@]}"} > "$OUT/segment_random.console.txt" 2>&1 &
rnd=$!
trap 'kill $pre $rnd 2>/dev/null; exit 130' INT TERM
failed=""
wait "$pre" || failed=segment
if [ -n "$failed" ]; then
    kill "$rnd" 2>/dev/null || true
else
    wait "$rnd" || failed=segment_random
fi
if [ -n "$failed" ]; then
    echo "demo_segment: the run in $OUT/$failed failed; the end of its console:" >&2
    tail -n 30 "$OUT/$failed.console.txt" >&2
    exit 1
fi
trap - INT TERM
stamp "both segmenters trained and scored"

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
names = {"class_1": "IPH", "class_2": "IVH", "class_3": "SDH", "class_4": "EDH", "class_5": "SAH", "class_6": "Fracture"}
classes = list(res["MAE-pretrained"])
def ci(x):
    return f"[{x[0]:+.3f}, {x[1]:+.3f}]" if x else "[n/a]"
def dice_there(m):
    if m["dice_present"] is None:
        return "n/a"
    c = m["dice_present_ci95"]
    return f"{m['dice_present']:.3f} [{c[0]:.3f}, {c[1]:.3f}]" if c else f"{m['dice_present']:.3f}"
print("\nBleed segmentation on the phantom's test split, Dice [95% CI] on the source grid. All cases: a healthy\n"
      "scan predicted empty scores 1. Cases with the bleed: the Dice over the scans whose reference holds it.")
print(f"{'class':<10} {'all':>4}  " + "  ".join(f"{n:<24}" for n in runs) + f"  {'with':>4}  "
      + "  ".join(f"{n:<24}" for n in runs))
for c in classes:
    m = res["MAE-pretrained"][c]
    print(f"{names.get(c, c):<10} {m['n_cases']:>4}  " + "  ".join(f"{dice(res[n][c]):<24}" for n in runs)
          + f"  {m['n_cases_present']:>4}  " + "  ".join(f"{dice_there(res[n][c]):<24}" for n in runs))
cmp = compare_per_case(os.path.join(out, "segment", "per_case.csv"), os.path.join(out, "segment_random", "per_case.csv"),
                       n_bootstrap=2000, seed=0, name_a="MAE-pretrained", name_b="random init")
print("\nPretrained - random, paired over the same test cases (bootstrap CI, Wilcoxon p):")
for c, r in cmp.items():
    line = f"  {names.get(c, c):<10} all cases {r['diff']:+.3f} {ci(r['ci95'])}" + (
        f", p = {r['p_value']:.2g}" if r["p_value"] is not None else ", identical")
    q = r["present"]
    if q["n_cases"]:
        line += f"; the {q['n_cases']} with the bleed {q['diff']:+.3f} {ci(q['ci95'])}" + (
            f", p = {q['p_value']:.2g}" if q["p_value"] is not None else ", identical")
    print(line)
macro = cmp["macro"]["present"] if cmp["macro"]["present"]["n_cases"] else cmp["macro"]  # no bleed in the test split
print("  " + macro["sentence"])
print(f"\ndemo-segment finished in {elapsed // 60} min {elapsed % 60} s. Files: {out}/segment/ and "
      f"{out}/segment_random/ (predictions/<id>.nii.gz on the source grid, per_case.csv, metrics.json, "
      "segmentation.png)")
EOF
