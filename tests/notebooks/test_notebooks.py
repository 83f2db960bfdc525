"""Execute the starter notebooks top to bottom, unedited, and check that they show their figures.

Each notebook runs from a copy in a temporary folder (the committed files are never written), with
the repository root as working directory, in the ``python3`` kernel of this interpreter, and with
``TMPDIR`` pointing into pytest's temporary folder so the notebook's work folder is cleaned up.
``extract_feature_sample.ipynb`` runs on its embedded default (phantom + one epoch of MAE pretrained
inside the notebook); ``visualization_sample.ipynb`` then runs with ``CHECKPOINT`` set to that
notebook's backbone (the other documented way of running it; its pretraining cell is the same code),
which keeps the suite from pretraining twice. The committed notebooks must carry no outputs.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = ["extract_feature_sample.ipynb", "visualization_sample.ipynb"]


def execute(name: str, tmp: Path, env: dict[str, str]) -> nbformat.NotebookNode:
    """Run a copy of ``notebooks/<name>`` in ``tmp``; returns the executed notebook."""
    before = (REPO / "notebooks" / name).read_bytes()
    copy = tmp / name
    shutil.copy(REPO / "notebooks" / name, copy)
    nb = nbformat.read(copy, as_version=4)
    with pytest.MonkeyPatch.context() as mp:
        for var in ("CHECKPOINT", "CONFIG", "MANIFEST"):
            mp.delenv(var, raising=False)
        mp.setenv("TMPDIR", str(tmp))
        mp.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        for k, v in env.items():
            mp.setenv(k, v)
        client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
        try:
            client.execute()
        finally:
            nbformat.write(nb, tmp / f"executed_{name}")  # for inspection after a failure
    assert (REPO / "notebooks" / name).read_bytes() == before
    return nb


def images(nb: nbformat.NotebookNode) -> int:
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if o.output_type == "display_data" and "image/png" in o.get("data", {}))


def errors(nb: nbformat.NotebookNode) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


@pytest.fixture(scope="module")
def extract_run(tmp_path_factory) -> tuple[nbformat.NotebookNode, Path]:
    tmp = tmp_path_factory.mktemp("nb_extract")
    nb = execute("extract_feature_sample.ipynb", tmp, {})
    ckpts = sorted(tmp.glob("headct_nb_*/mae/backbone.pth"))
    return nb, (ckpts[0] if ckpts else tmp / "missing.pth")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name: str) -> None:
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs"


@pytest.mark.slow
def test_extract_feature_notebook_runs_on_its_default(extract_run) -> None:
    nb, ckpt = extract_run
    assert not errors(nb)
    assert images(nb) >= 2
    assert ckpt.is_file(), "the notebook should have pretrained a tiny MAE into its work folder"
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "nearest scans of other patients" in text and "mAP@5" in text and "CLS (1, 192)" in text


@pytest.mark.slow
def test_visualization_notebook_runs_with_a_checkpoint(extract_run, tmp_path) -> None:
    _, ckpt = extract_run
    nb = execute("visualization_sample.ipynb", tmp_path, {"CHECKPOINT": str(ckpt)})
    assert not errors(nb)
    assert images(nb) >= 5  # planes x windows, lesion masks, attention, patch PCA, embedding map
    assert not list(tmp_path.glob("headct_nb_*/mae"))  # no pretraining with a checkpoint given
