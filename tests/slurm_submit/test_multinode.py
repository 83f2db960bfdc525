"""Multi-node training without Slurm: two torchrun launchers ("nodes") on this machine meet through
c10d rendezvous and train MAE together on CPU (Gloo), as the README's multi-node commands do."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["DATA.ROI", "[32,32,32]", "DATA.SPACING", "[7.5,7.5,7.5]", "DATA.BATCH_SIZE", "2",
        "DATA.VAL_CSV", "", "DATA.NUM_WORKERS", "0", "MAE.VIS_EVERY", "0", "TRAIN.LOG_EVERY", "1",
        "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_c10d_rendezvous(tmp_path):
    phantom, run = tmp_path / "phantom", tmp_path / "run"
    subprocess.run([sys.executable, "-m", "data.phantom", "--out", str(phantom), "--n", "8", "--size", "32"],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    endpoint = f"127.0.0.1:{_free_port()}"
    launchers = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "headct-test",
               "--max_restarts", "0", "main_pretrain_mae.py", "--cfg", "configs/demo/mae.yaml", "--opts",
               "OUTPUT", str(run), "DATA.TRAIN_CSV", str(phantom / "train.csv"), *TINY]
        log = open(tmp_path / f"node{node}.log", "w")
        launchers.append(subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    try:
        codes = [p.wait(timeout=400) for p in launchers]
    finally:
        for p in launchers:
            if p.poll() is None:
                p.kill()
    logs = "\n".join((tmp_path / f"node{i}.log").read_text() for i in range(2))
    assert codes == [0, 0], logs
    assert (run / "checkpoint_last.pth").is_file() and (run / "backbone.pth").is_file(), logs
    log = (run / "log.txt").read_text()
    assert "on 2 process(es)" in log and "global batch 4" in log, log
    assert log.count("training MAE for 1 epochs") == 1, "one log, written by rank 0 only"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["epoch"] for r in rows if "epoch_s" in r] == [0]
