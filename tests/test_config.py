import subprocess
import sys
from pathlib import Path

import pytest

import config
from config import ConfigError, get_config, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_validate_and_freeze():
    cfg = get_config([])
    assert cfg.is_frozen()
    with pytest.raises(AttributeError):
        cfg.SEED = 3


def test_unknown_opts_key_is_named():
    with pytest.raises(ConfigError, match=r"NOT_A\.KEY"):
        get_config(["--opts", "NOT_A.KEY", "1"])


def test_unknown_file_key_is_named(tmp_path):
    f = write(tmp_path / "a.yaml", "DATA:\n  NOT_THERE: 3\n")
    with pytest.raises(ConfigError, match=r"DATA\.NOT_THERE"):
        get_config(["--cfg", str(f)])


def test_base_inheritance_and_override_order(tmp_path):
    write(tmp_path / "base.yaml", "SEED: 1\nDATA:\n  BATCH_SIZE: 3\n  NUM_WORKERS: 7\n")
    (tmp_path / "sub").mkdir()
    f = write(tmp_path / "sub" / "child.yaml", "_BASE_: ../base.yaml\nDATA:\n  BATCH_SIZE: 5\n")
    cfg = get_config(["--cfg", str(f), "--opts", "SEED", "9"])
    assert cfg.DATA.BATCH_SIZE == 5  # child beats base
    assert cfg.DATA.NUM_WORKERS == 7  # base beats defaults
    assert cfg.SEED == 9  # opts beat files


def test_list_of_bases_later_wins(tmp_path):
    write(tmp_path / "a.yaml", "SEED: 1\n")
    write(tmp_path / "b.yaml", "SEED: 2\n")
    f = write(tmp_path / "c.yaml", "_BASE_: [a.yaml, b.yaml]\n")
    assert get_config(["--cfg", str(f)]).SEED == 2


@pytest.mark.parametrize("opts,key", [
    (["DATA.ROI", "[100,96,96]"], "DATA.ROI"),
    (["DATA.WINDOWS", "['40;80']"], "DATA.WINDOWS"),
    (["DATA.WINDOWS", "['nonsense']"], "DATA.WINDOWS"),
    (["TRAIN.EPOCHS", "-1"], "TRAIN.EPOCHS"),
    (["DATA.ON_ERROR", "ignore"], "DATA.ON_ERROR"),
    (["MODEL.NAME", "vit_huge"], "MODEL.NAME"),
    (["MAE.MASK_RATIO", "1.5"], "MAE.MASK_RATIO"),
    (["SIMCLR.CROP_ASPECT", "0.75"], "SIMCLR.CROP_ASPECT"),
])
def test_contradictions_name_key_and_value(opts, key):
    with pytest.raises(ConfigError) as e:
        get_config(["--opts", *opts])
    assert key in str(e.value)


def test_custom_window_string_accepted():
    cfg = get_config(["--opts", "DATA.WINDOWS", "['brain','60,400']"])
    assert list(cfg.DATA.WINDOWS) == ["brain", "60,400"]
    assert config.parse_window("60,400") == (60.0, 400.0)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="DATA.BATCH_SIZE"):
        get_config(["--opts", "DATA.BATCH_SIZE", "'big'"])


def test_config_yaml_round_trips(tmp_path):
    cfg = get_config(["--opts", "SEED", "4", "DATA.WINDOWS", "['stroke','10,20']", "OUTPUT", str(tmp_path)])
    path = save_config(cfg, str(tmp_path))
    again = load_config(path)
    assert again == cfg


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_shipped_configs_load(path):
    get_config(["--cfg", str(ROOT / path)])


def test_help_lists_groups():
    out = subprocess.run([sys.executable, "-c", "import config; config.get_config(['--help'])"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0
    for group in ("DATA", "MODEL", "TRAIN", "MAE", "DINO", "SIMCLR", "DOWNSTREAM"):
        assert group in out.stdout
