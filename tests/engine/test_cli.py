"""engine/cli.py: a config, manifest or input error reaches the user as its message and exit status 2,
in real processes of an entry script and a tool; HEADCT_DEBUG=1 brings the traceback back; bugs keep it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError
from data.io import BadInputError
from data.manifest import ManifestError
from engine.cli import DEBUG_ENV, debug_enabled, run_cli

ROOT = Path(__file__).resolve().parents[2]


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    full.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=300)


def test_entry_script_prints_a_bad_config_value_without_traceback(tmp_path):
    r = run(["main_pretrain_mae.py", "--cfg", "configs/demo/mae.yaml", "--opts", "TRAIN.AMP", "fp32",
             "OUTPUT", str(tmp_path / "run")], ROOT)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == ("main_pretrain_mae.py: error: TRAIN.AMP = 'fp32'; expected one of "
                                "['bf16', 'fp16', 'none']")
    assert not (tmp_path / "run").exists()


def test_debug_env_gives_the_traceback(tmp_path):
    r = run(["main_pretrain_mae.py", "--cfg", "configs/demo/mae.yaml", "--opts", "TRAIN.AMP", "fp32"], ROOT,
            **{DEBUG_ENV: "1"})
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr and "config.ConfigError: TRAIN.AMP = 'fp32'" in r.stderr


def test_tool_as_a_module_prints_a_manifest_error(tmp_path):
    missing = tmp_path / "nowhere.csv"
    r = run(["-m", "tools.preprocess", "--cfg", "configs/demo/mae.yaml", "--no-progress", "--opts",
             "DATA.TRAIN_CSV", str(missing), "DATA.VAL_CSV", "", "DATA.TEST_CSV", "",
             "DATA.CACHE_DIR", str(tmp_path / "cache")], ROOT)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == f"preprocess.py: error: {missing}: manifest file does not exist"


@pytest.mark.parametrize("error", [ConfigError("MODEL.NAME = 'x'"), ManifestError("a.csv, line 3: empty path"),
                                   BadInputError("ct.nii.gz", "4D volume")])
def test_user_errors_are_one_line_and_status_2(monkeypatch, capsys, error):
    monkeypatch.delenv(DEBUG_ENV, raising=False)

    def main(argv):
        raise error

    assert run_cli(main, [], prog="tool") == 2
    assert capsys.readouterr().err == f"tool: error: {error}\n"


def test_main_status_and_argv_pass_through(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    seen = []
    assert run_cli(lambda argv: seen.append(argv) or 3, ["--x"]) == 3  # a tool's own status
    assert seen == [["--x"]]
    assert run_cli(lambda argv: {"auroc": 0.9}) == 0  # metrics returned by a job
    assert run_cli(lambda argv: True) == 0  # a bool is not a status


def test_bugs_keep_their_traceback_and_debug_reraises(monkeypatch):
    def bug(argv):
        raise KeyError("not a user error")

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(KeyError):
        run_cli(bug)
    for value, on in (("1", True), ("yes", True), ("0", False), ("", False), ("false", False)):
        monkeypatch.setenv(DEBUG_ENV, value)
        assert debug_enabled() is on
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ConfigError):
        run_cli(lambda argv: (_ for _ in ()).throw(ConfigError("TRAIN.AMP")))
