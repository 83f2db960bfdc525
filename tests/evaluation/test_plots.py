import numpy as np
import pytest

from evaluation.plots import plot_roc_pr


def test_plot_roc_pr_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    y = (rng.random((60, 3)) < 0.4).astype(float)
    y[:, 2] = 0  # one class only: listed as undefined, no crash
    y[::5, 1] = np.nan
    p = np.clip(0.3 * y + rng.random((60, 3)) * 0.7, 0, 1)
    p = np.nan_to_num(p, nan=0.5)
    out = tmp_path / "sub" / "roc_pr.png"
    assert plot_roc_pr(str(out), y, p, ["ICH", "SDH", "EDH"], title="test") == str(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [f.name for f in out.parent.iterdir()] == ["roc_pr.png"]  # no temporary file left


def test_plot_roc_pr_single_label_and_shape_check(tmp_path):
    y = np.array([0, 1, 0, 1], dtype=float)
    plot_roc_pr(str(tmp_path / "one.png"), y, [0.2, 0.8, 0.4, 0.6], ["ICH"])
    assert (tmp_path / "one.png").stat().st_size > 0
    with pytest.raises(ValueError, match="do not match"):
        plot_roc_pr(str(tmp_path / "bad.png"), y, [0.2, 0.8, 0.4, 0.6], ["ICH", "SDH"])
