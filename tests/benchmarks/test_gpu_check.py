"""The GPU check (benchmarks/gpu_check.{sh,py}): its dry run end to end on the CPU, its pieces alone.

The dry run goes through the shell wrapper, the four parts (two-process Gloo DDP through torchrun,
bf16 vs fp32, a real DINO run from a phantom cache, the train-step benchmark) and the summary, on
vit_tiny at 16^3; no figure is asserted, only that every part ran and reported what it promises.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check, train_step
from benchmarks.common import bf16_peak_tflops

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "benchmarks" / "gpu_check.sh")


def run_script(*args, env=None, timeout=600):
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    (tmp / "no_wheels").mkdir()
    r = run_script(str(tmp / "out"), "--dry-run", "--workdir", str(tmp / "work"), "--ddp-procs", "2",
                   env={"PYTHON": sys.executable, "GPU_CHECK_WHEELS": str(tmp / "no_wheels")})
    return r, tmp / "out"


def load(out, name):
    return json.loads((out / name).read_text())


@pytest.mark.slow
def test_dry_run_writes_one_json_per_part_a_summary_and_a_log(dry_run):
    r, out = dry_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["amp.json", "data_wait.json", "ddp.json", "gpu_check.log", "summary.json", "train_step.json"]
    summary = load(out, "summary.json")
    assert summary["ok"] and summary["dry_run"] and summary["parts"] == list(gpu_check.PARTS)
    assert {row["part"] for row in summary["rows"]} == set(gpu_check.PARTS)
    assert "status" in r.stdout and "dry run" in r.stdout  # the table
    for name in gpu_check.PARTS:
        info = load(out, f"{name}.json")["gpu_check"]
        assert info["returncode"] == 0 and not info["timed_out"] and info["commands"], name


@pytest.mark.slow
def test_dry_run_ddp_two_gloo_processes_without_future_warning(dry_run):
    _, out = dry_run
    cases = load(out, "ddp.json")["cases"]
    assert [c["method"] for c in cases] == ["mae", "dino"]
    for c in cases:
        assert c["backend"] == "gloo" and c["world_size"] == 2 and c["ddp"]
        assert c["future_warnings"] == 0, c["warnings"]
        assert c["rank_param_maxdiff"] == 0.0  # student averaged, teacher followed it on both ranks
        assert c["losses_finite"] and len(c["losses"]) == 3


@pytest.mark.slow
def test_dry_run_amp_data_wait_and_train_step(dry_run):
    _, out = dry_run
    amp = load(out, "amp.json")
    assert amp["ok"] and [c["method"] for c in amp["cases"]] == ["mae", "dino"]
    assert all(len(c["loss_fp32"]) == len(c["loss_bf16"]) == 4 for c in amp["cases"])
    wait = load(out, "data_wait.json")
    assert wait["num_workers"] == 2 and wait["model"] == "vit_tiny" and wait["all"]["steps"] == 8
    assert 0 <= wait["steady"]["wait_fraction"] < 1 and wait["device_stage"] is torch.cuda.is_available()
    ts = load(out, "train_step.json")
    assert ts["sdpa"] == "flash,efficient" and ts["matmul_tflops"] > 0
    assert [(c["method"], c["compile"]) for c in ts["cases"]] == [("mae", False), ("dino", False)]
    for c in ts["cases"]:
        assert c["samples_per_s"] > 0 and c["flops_per_step"] > 0 and c["mfu_of_matmul"] > 0
        assert c["sdpa_kernels"] and all("flash" in k for k in c["sdpa_kernels"])  # not the math path


def test_script_names_what_is_missing(tmp_path):
    bare = shutil.which("python3", path="/usr/bin:/bin")
    if not bare or subprocess.run([bare, "-c", "import torch, monai, yacs"], capture_output=True,
                                   check=False).returncode == 0:
        pytest.skip("no system python3 without the project's packages")
    r = run_script(str(tmp_path / "out"), env={"PYTHON": bare, "GPU_CHECK_WHEELS": str(tmp_path / "none")})
    assert r.returncode == 2 and "prepare" in r.stderr and str(tmp_path / "none") in r.stderr
    assert not (tmp_path / "out").exists()
    assert run_script().returncode == 2  # no OUT: usage


def test_run_part_stops_a_part_at_its_limit_and_kills_its_processes(tmp_path):
    pidfile = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(pidfile)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    t = time.monotonic()
    with open(tmp_path / "log", "w") as log:
        r = gpu_check.run_part("ddp", [[sys.executable, "-c", code]], tmp_path / "ddp.json", 3, log, dict(os.environ))
    assert time.monotonic() - t < 30
    assert r["gpu_check"]["timed_out"] and "timed out" in r["error"]
    assert json.loads((tmp_path / "ddp.json").read_text())["gpu_check"]["timed_out"]
    pid = int(pidfile.read_text())
    time.sleep(0.5)
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "zombie" in status.read_text()  # the grandchild went with the group


def test_run_part_keeps_a_partial_json_and_stops_at_a_failing_command(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"cases": [{"method": "mae"}]}))
    with open(tmp_path / "log", "w") as log:
        r = gpu_check.run_part("train_step", [[sys.executable, "-c", "raise SystemExit(3)"],
                                              [sys.executable, "-c", "print('never')"]],
                               tmp_path / "t.json", 30, log, dict(os.environ))
    assert r["cases"] == [{"method": "mae"}] and "exit status 3" in r["error"]
    assert len(r["gpu_check"]["commands"]) == 1
    assert "never" not in (tmp_path / "log").read_text().split("$")[-1]


def test_summary_statuses_against_the_targets():
    step = {"median": 0.1}
    parts = {
        "ddp": {"cases": [{"method": "dino", "backend": "nccl", "world_size": 1, "step_s": step,
                           "losses_finite": True, "future_warnings": 1, "rank_param_maxdiff": 0.0}]},
        "amp": {"cases": [{"method": "mae", "steps": 4, "rel_diff": [1e-3, 0.2], "rtol": 0.1, "rtol_first": 0.02,
                           "ok": False}]},
        "data_wait": {"steady": {"wait_fraction": 0.03}, "all": {"wait_fraction": 0.06, "steps": 100},
                      "model": "vit_base", "num_workers": 16, "batch_size": 32},
        "train_step": {"cases": [
            {"method": "mae", "model": "vit_base", "compile": True, "samples_per_s": 900.0, "tflops_per_s": 450.0,
             "mfu": 0.455, "sdpa_kernels": ["_scaled_dot_product_flash_attention"]},
            {"method": "dino", "model": "vit_base", "compile": False, "samples_per_s": 200.0, "tflops_per_s": 300.0,
             "mfu": 0.30, "sdpa_kernels": []},
            {"method": "dino", "compile": True, "error": "OutOfMemoryError: CUDA out of memory"}]},
    }
    rows = gpu_check.summarize_parts(parts)
    status = [(r["part"], r["status"]) for r in rows]
    assert status == [("ddp", "FAILED"), ("amp", "FAILED"), ("data_wait", "meets"), ("train_step", "meets"),
                      ("train_step", "below"), ("train_step", "error")]
    assert "attention flash_attention" in rows[3]["value"] and "attention math" in rows[4]["value"]


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["out", "--parts", "ddp,mfu"])
    args = gpu_check.parse_args(["out", "--parts", "train_step,ddp"])
    assert args.parts == ["ddp", "train_step"] and args.workers == 16  # run in the fixed order
    assert gpu_check.parse_args(["out", "--dry-run"]).workers == 2


def test_sdpa_backends_and_card_peaks():
    from torch.nn.attention import SDPBackend
    assert train_step.sdpa_backends("auto") is None and train_step.sdpa_backends("") is None
    assert train_step.sdpa_backends("flash, efficient") == [SDPBackend.FLASH_ATTENTION,
                                                             SDPBackend.EFFICIENT_ATTENTION]
    with pytest.raises(ValueError, match="fast"):
        train_step.sdpa_backends("flash,fast")
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bf16_peak_tflops("NVIDIA H200") == 989.0 and bf16_peak_tflops("Tesla T4") is None


def test_ddp_case_records_a_deprecated_ddp_argument(tmp_path, monkeypatch):
    """The check would see the old ``broadcast_buffers`` FutureWarning: the recorder is not blind."""
    import inspect

    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import engine.trainer
    if "forward_sync_buffers" not in inspect.signature(DDP.__init__).parameters:
        pytest.skip("this torch does not deprecate broadcast_buffers")
    monkeypatch.setattr(engine.trainer, "wrap_ddp", lambda m, device: DDP(m, broadcast_buffers=False))
    tdist.init_process_group("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        row = train_step.run_case("mae", "configs/demo/mae.yaml", list(gpu_check.TINY), False, "none", 1, 0,
                                  torch.device("cpu"), 1, None, ddp=True)
    finally:
        tdist.destroy_process_group()
    assert row["future_warnings"] >= 1 and any("broadcast_buffers" in w for w in row["warnings"])
