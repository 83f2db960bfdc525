"""The GPU check: every figure the goals ask of a GPU, measured in one command of at most ~8 minutes.

    bash benchmarks/gpu_check.sh prepare                 # here, with network: the wheels the GPU machine lacks
    bash benchmarks/gpu_check.sh OUT                      # there: installs the wheels, then runs this script
    python -m benchmarks.gpu_check OUT --dry-run          # the same code paths on a CPU, tiny sizes, ~1 minute

Four parts, each a subprocess of the existing benchmarks with a time limit, each writing one JSON
into ``OUT`` (with ``gpu_check``: its command, exit status, wall seconds and whether it timed out):

``ddp.json``         one DDP step sequence through ``torchrun`` (NCCL on a GPU, Gloo on a CPU) with the
                     trainer's own DDP wrap (``train_step.py --ddp``): backend, world size, losses,
                     the warnings DDP raised (no FutureWarning expected) and rank agreement.
``amp.json``         the loss of the first steps in bf16 against fp32 (TF32 off), same seed
                     (``train_step.py --compare-amp``), MAE and DINO ViT-B.
``data_wait.json``   a short real DINO ViT-B run (``main_pretrain_dino.py``, the device stage on a GPU)
                     from a preprocessed phantom cache with ``--workers`` DataLoader workers (16), and
                     its data-wait fraction (``data_wait.py``); target under 5%.
``train_step.json``  the train-step benchmark of MAE and DINO ViT-B at 96^3 in bf16, SDPA restricted to
                     the flash / memory-efficient kernels, ``torch.compile`` off and on
                     (``train_step.py``): samples/s, TFLOP/s, MFU against the card's dense bf16 peak
                     and against a measured 8192^3 bf16 matrix product; targets MFU >= 45% (MAE) and
                     >= 40% (DINO) on an H100.

Then ``summary.json`` and a table on stdout; every part's output goes to ``gpu_check.log``. At most
six files, all directly in ``OUT`` (the device tool returns 8 files, 2 folders deep). Phantoms,
cache and run folder go to ``--workdir`` (default: a temporary folder). Parts run cheapest first
and share ``--budget-s``; the train-step part gets what the others leave and, cut short, keeps the
cases it finished. Exit status 0 when every part ran and the correctness checks (DDP, bf16) passed,
whether or not the speed targets were met; 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, header, write_json
from engine.cli import run_cli

PARTS = ("ddp", "amp", "data_wait", "train_step")
# seconds: (most a part may take, least kept free for it while earlier parts run)
LIMITS = {"ddp": (90, 30), "amp": (90, 30), "data_wait": (150, 60), "train_step": (600, 120)}
TARGETS = {"mfu": {"mae": 0.45, "dino": 0.40}, "data_wait": 0.05}
# the dry run: the production configs shrunk to vit_tiny at 16^3 (every other key as on the GPU)
TINY = ["DATA.ROI", "[16,16,16]", "MODEL.NAME", "vit_tiny", "MODEL.PATCH_SIZE", "[8,8,8]",
        "DINO.LOCAL_CROP_SIZE", "[8,8,8]", "DINO.LOCAL_CROPS_NUMBER", "2", "DINO.OUT_DIM", "64",
        "DINO.HEAD_HIDDEN_DIM", "32", "DINO.HEAD_BOTTLENECK_DIM", "16", "DATA.BATCH_SIZE", "2"]
DINO_CFG = "configs/dino/vit_base.yaml"


def plan(args: argparse.Namespace, out: Path, work: Path) -> dict[str, list[list[str]]]:
    """The commands of each part (a part may be several commands, run in order)."""
    py = sys.executable
    dry = args.dry_run
    tiny = TINY if dry else []
    threads = ["--threads", "1"] if dry else []

    def opts() -> list[str]:
        return ["--opts", *tiny] if tiny else []

    ts = [py, "-m", "benchmarks.train_step"]
    cmds: dict[str, list[list[str]]] = {}
    cmds["ddp"] = [[py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ddp_procs),
                    "-m", "benchmarks.train_step", "--ddp", "--preset", "h100", "--methods", "mae,dino",
                    "--compile", "off", "--steps", "3", "--warmup", "1", *threads,
                    "--json", str(out / "ddp.json"), *opts()]]
    cmds["amp"] = [ts + ["--compare-amp", "--preset", "h100", "--methods", "mae,dino", "--steps", "4",
                         *([] if dry else ["--batch-size", "8"]), *threads, "--json", str(out / "amp.json"),
                         *opts()]]
    # data wait: phantoms -> cache -> a long manifest -> one short DINO epoch -> data_wait.py
    phantom, cache, run = work / "phantom", work / "cache", work / "dino_run"
    batch = 2 if dry else 32
    steps, log_every = (8, 2) if dry else (120, 10)
    data = ["DATA.CACHE_DIR", str(cache), "DATA.VAL_CSV", "", "DATA.TEST_CSV", "",
            *(["DATA.SPACING", "[4.0,4.0,4.0]"] if dry else [])]
    long_csv = work / "train_long.csv"
    cmds["data_wait"] = [
        [py, "-m", "data.phantom", "--out", str(phantom), "--n", str(2 if dry else 8), "--size",
         str(48 if dry else 160)],
        [py, "-m", "tools.preprocess", "--cfg", DINO_CFG, "--no-progress", "--opts", *tiny,
         "DATA.TRAIN_CSV", str(phantom / "train.csv"), "DATA.NUM_WORKERS", str(args.workers), *data],
        [py, "-c", ("import sys; from benchmarks.gpu_check import write_long_manifest as w; "
                    "w(sys.argv[1], int(sys.argv[2]), sys.argv[3])"),
         str(phantom / "train.csv"), str(batch * steps), str(long_csv)],
        [py, "main_pretrain_dino.py", "--cfg", DINO_CFG, "--opts", *tiny, "OUTPUT", str(run),
         "DATA.TRAIN_CSV", str(long_csv), "DATA.NUM_WORKERS", str(args.workers), *data,
         "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.LOG_EVERY", str(log_every),
         "TRAIN.SAVE_EVERY", "0", "DINO.KNN_EVERY", "0"],
        [py, "-m", "benchmarks.data_wait", "--run", str(run), "--skip-first", "1", "--json",
         str(out / "data_wait.json")],
    ]
    steps_ts = ["--steps", "2", "--warmup", "1"] if dry else ["--steps", "10", "--warmup", "3"]
    cmds["train_step"] = [ts + ["--preset", "h100", "--methods", "mae,dino", "--compile",
                                args.compile or ("off" if dry else "both"), "--sdpa", "flash,efficient",
                                "--measure-peak", *steps_ts, *threads, "--json", str(out / "train_step.json"),
                                *opts()]]
    return cmds


def write_long_manifest(csv_path: str, rows: int, out_path: str) -> str:
    """``csv_path`` repeated until it lists at least ``rows`` rows (one epoch of that many samples)."""
    from benchmarks.data_pipeline import repeat_manifest
    with open(csv_path) as f:
        n = sum(1 for line in f if line.strip()) - 1
    if n < 1:
        raise ValueError(f"{csv_path}: no rows to repeat")
    return repeat_manifest(csv_path, "", math.ceil(rows / n), out_path)


def run_command(cmd: list[str], timeout_s: float, log, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` from the repository root in its own process group, output to ``log``.

    On time-out the whole group (torchrun's ranks, DataLoader workers) is killed.
    """
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    t = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wall = time.monotonic() - t
    log.write(f"# exit {proc.returncode}{' (timed out)' if timed_out else ''} after {wall:.1f} s\n\n")
    log.flush()
    return {"command": cmd, "returncode": proc.returncode, "wall_s": wall, "timed_out": timed_out}


def run_part(name: str, cmds: list[list[str]], json_path: Path, timeout_s: float, log, env: dict[str, str]
             ) -> dict[str, Any]:
    """Run a part's commands in order (stopping at the first failure) within ``timeout_s`` in all;
    returns its JSON (the benchmark's own, or an error record) with ``gpu_check`` added and saves it."""
    log.write(f"########## {name} (limit {timeout_s:.0f} s)\n")
    deadline = time.monotonic() + timeout_s
    steps = []
    for cmd in cmds:
        steps.append(run_command(cmd, deadline - time.monotonic(), log, env))
        if steps[-1]["returncode"] != 0:
            break
    info = {"returncode": steps[-1]["returncode"], "timed_out": steps[-1]["timed_out"],
            "wall_s": sum(s["wall_s"] for s in steps), "limit_s": timeout_s, "commands": steps}
    result: dict[str, Any] = {}
    if json_path.is_file():
        try:
            result = json.loads(json_path.read_text())
        except json.JSONDecodeError as e:
            result = {"error": f"{json_path}: not JSON ({e})"}
    if not result:
        last = steps[-1]
        why = "timed out" if last["timed_out"] else f"exit status {last['returncode']}"
        result = {"part": name, "error": f"{' '.join(last['command'][:3])} ...: {why}, no {json_path.name} "
                                         f"(see gpu_check.log)"}
    elif info["returncode"] != 0 and "error" not in result:
        result["error"] = ("timed out" if info["timed_out"] else f"exit status {info['returncode']}") + \
            " (the JSON holds what finished first)"
    result["gpu_check"] = info
    write_json(json_path, result)
    return result


def kernel_names(ops: list[str]) -> str:
    """``['_scaled_dot_product_flash_attention', '..._backward']`` -> ``'flash_attention'`` (``'math'``
    when attention ran as plain matrix products)."""
    short = sorted({o.replace("_scaled_dot_product_", "").removesuffix("_backward").strip("_") for o in ops})
    return ",".join(short) or "math"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summarize_parts(parts: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per figure: ``part``, ``what``, ``value``, ``target``, ``status``.

    ``status``: ``ok`` / ``FAILED`` for correctness checks, ``meets`` / ``below`` for speed targets,
    ``measured`` where there is no target, ``error`` when the part did not run to its end.
    """
    rows: list[dict[str, Any]] = []

    def add(part, what, value, target="-", status="measured"):
        rows.append({"part": part, "what": what, "value": value, "target": target, "status": status})

    r = parts.get("ddp")
    if r is not None:
        for c in r.get("cases", []):
            good = c.get("losses_finite") and c.get("future_warnings") == 0 and c.get("rank_param_maxdiff") == 0
            add("ddp", f"{c['method']} DDP {c.get('backend')} x{c.get('world_size')}",
                f"{c['step_s']['median'] * 1000:.0f} ms/step, {c.get('future_warnings')} FutureWarning(s), "
                f"rank diff {c.get('rank_param_maxdiff')}", "no warning, ranks equal", "ok" if good else "FAILED")
        if r.get("error"):
            add("ddp", "run", r["error"], status="error")
    r = parts.get("amp")
    if r is not None:
        for c in r.get("cases", []):
            if "error" in c:
                add("amp", f"{c['method']} bf16 vs fp32", c["error"], status="error")
                continue
            add("amp", f"{c['method']} bf16 vs fp32 ({c['steps']} steps)",
                f"rel. diff {c['rel_diff'][0]:.1e} first, {max(c['rel_diff']):.1e} max",
                f"<= {c['rtol_first']:g} first, <= {c['rtol']:g}", "ok" if c.get("ok") else "FAILED")
        if r.get("error"):
            add("amp", "run", r["error"], status="error")
    r = parts.get("data_wait")
    if r is not None:
        if r.get("steady"):
            w = r["steady"]["wait_fraction"]
            tgt = TARGETS["data_wait"]
            add("data_wait", f"DINO {r.get('model')}, {r.get('num_workers')} workers, batch {r.get('batch_size')}",
                f"{_pct(w)} steady, {_pct(r['all']['wait_fraction'])} all, {r['all']['steps']} steps, "
                f"{r['all'].get('samples_per_s_mean') or 0:.1f} samples/s",
                f"< {_pct(tgt)}", "meets" if w is not None and w < tgt else "below")
        if r.get("error"):
            add("data_wait", "run", r["error"], status="error")
    r = parts.get("train_step")
    if r is not None:
        if r.get("matmul_tflops"):
            add("train_step", f"bf16 {r.get('matmul_n')}^3 matmul", f"{r['matmul_tflops']:.1f} TFLOP/s",
                f"datasheet {r.get('peak_tflops')}" if r.get("peak_tflops") else "-")
        for c in r.get("cases", []):
            what = f"{c['method']} {c.get('model', '')} compile={'on' if c.get('compile') else 'off'}"
            if "error" in c:
                add("train_step", what, c["error"], status="error")
                continue
            mfu, tgt = c.get("mfu"), TARGETS["mfu"].get(c["method"])
            add("train_step", what,
                f"{c['samples_per_s']:.1f} samples/s, {c.get('tflops_per_s') or 0:.1f} TFLOP/s, MFU {_pct(mfu)}"
                f" ({_pct(c.get('mfu_of_matmul'))} of matmul)"
                + (f", attention {kernel_names(c['sdpa_kernels'])}" if c.get("sdpa_kernels") is not None
                   else ""),
                f">= {_pct(tgt)} MFU" if tgt else "-",
                "measured" if mfu is None or tgt is None else ("meets" if mfu >= tgt else "below"))
        if r.get("error"):
            add("train_step", "run", r["error"], status="error")
    return rows


def print_table(rows: list[dict[str, Any]], dry: bool) -> None:
    cols = ("part", "what", "value", "target", "status")
    width = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in cols}
    line = "  ".join(c.ljust(width[c]) for c in cols)
    print("\n" + line + "\n" + "-" * len(line))
    for r in rows:
        print("  ".join(str(r[c]).ljust(width[c]) for c in cols))
    if dry:
        print("(dry run on tiny sizes: code paths checked, figures mean nothing)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("out", help="folder for the JSONs, summary and log (created)")
    p.add_argument("--dry-run", action="store_true", help="the same code paths on this CPU with tiny sizes")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default all)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="seconds for all parts together (default 450: 8 minutes with the start-up and install)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the real run (default 16; 2 dry)")
    p.add_argument("--ddp-procs", type=int, default=1, help="torchrun processes of the DDP part (default 1)")
    p.add_argument("--compile", choices=("", "off", "on", "both"), default="",
                   help="torch.compile in the train-step part (default both; off in a dry run)")
    p.add_argument("--workdir", default="", help="phantoms, cache and run folder (default: a new temporary folder)")
    args = p.parse_args(argv)
    args.workers = args.workers or (2 if args.dry_run else 16)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad or not parts:
        p.error(f"--parts {args.parts!r}: unknown {bad}; expected a comma list of {', '.join(PARTS)}")
    args.parts = [x for x in PARTS if x in parts]
    if args.ddp_procs < 1 or args.budget_s <= 0:
        p.error("--ddp-procs must be >= 1 and --budget-s > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    if (work / "dino_run").exists():  # a previous run's folder would be resumed, not rerun
        shutil.rmtree(work / "dino_run")
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.dry_run:
        env["OMP_NUM_THREADS"] = "1"
    cmds = plan(args, out, work)
    parts: dict[str, dict] = {}
    with open(out / "gpu_check.log", "a") as log:
        for i, name in enumerate(args.parts):
            left = args.budget_s - (time.monotonic() - t0)
            later = sum(LIMITS[n][1] for n in args.parts[i + 1:])
            timeout = min(LIMITS[name][0], left - later) if name != "train_step" else left - later
            if timeout < 10:
                parts[name] = {"part": name, "error": f"not run: {left:.0f} s of the budget left"}
                write_json(out / f"{name}.json", parts[name])
                continue
            print(f"[gpu_check] {name}: up to {timeout:.0f} s", flush=True)
            parts[name] = run_part(name, cmds[name], out / f"{name}.json", timeout, log, env)
            if name == "data_wait":
                parts[name]["device_stage"] = _cuda()  # methods.registry.dino_views: on with CUDA
                write_json(out / f"{name}.json", parts[name])
    rows = summarize_parts(parts)
    ok = all(r["status"] not in ("FAILED", "error") for r in rows) and \
        all("error" not in parts[n] for n in args.parts)
    summary = header(dry_run=args.dry_run, parts=args.parts, budget_s=args.budget_s,
                     wall_s=time.monotonic() - t0, workdir=str(work), targets=TARGETS, rows=rows, ok=ok)
    write_json(out / "summary.json", summary)
    print_table(rows, args.dry_run)
    print(f"[gpu_check] {'all parts ran, checks passed' if ok else 'SOME PARTS FAILED'} in "
          f"{summary['wall_s']:.0f} s; JSONs in {out}")
    return 0 if ok else 1


def _cuda() -> bool:
    """Whether the entry script's DINO view runs its device stage (it does on CUDA)."""
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(run_cli(main))
