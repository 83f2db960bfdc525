"""pyproject.toml: the console scripts resolve to callables, the install holds every module the
code imports, the dependencies are requirements.txt, and the entry points run from another folder.

``pip install -e .`` itself takes too long for the suite (a build backend in an isolated
environment); these checks cover what it reads from pyproject.toml.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def installed_names(pyproject: dict) -> set[str]:
    """Top-level modules and packages the install provides (py-modules + packages.find)."""
    setuptools = pytest.importorskip("setuptools")
    st = pyproject["tool"]["setuptools"]
    find = st["packages"]["find"]
    packages = setuptools.find_packages(where=str(REPO / find["where"][0]), include=find["include"])
    return set(st["py-modules"]) | {p.split(".")[0] for p in packages}


def test_console_scripts_resolve_to_callables(pyproject: dict) -> None:
    scripts = pyproject["project"]["scripts"]
    assert {"headct-pretrain-mae", "headct-pretrain-dino", "headct-pretrain-simclr", "headct-pretrain-alice",
            "headct-downstream",
            "headct-phantom"} <= set(scripts)
    names = installed_names(pyproject)
    for command, target in scripts.items():
        module, _, attr = target.partition(":")
        assert module.split(".")[0] in names, f"{command}: {module} is not part of the install"
        fn = getattr(importlib.import_module(module), attr)
        assert callable(fn), f"{command}: {target} is not callable"
        # a console script calls fn() and exits with its return value: no required arguments
        required = [p for p in inspect.signature(fn).parameters.values()
                    if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert not required, f"{command}: {target} needs arguments {required}"


def test_install_holds_every_first_party_import(pyproject: dict) -> None:
    """A module of the install importing a repository module that is not installed would break
    outside the repository (tests/ and benchmarks/ are not installed: nothing installed may need them)."""
    names = installed_names(pyproject)
    first_party = {p.stem for p in REPO.glob("*.py")} | {p.parent.name for p in REPO.glob("*/__init__.py")}
    files = [REPO / f"{m}.py" for m in pyproject["tool"]["setuptools"]["py-modules"]]
    files += [p for n in names if (REPO / n).is_dir() for p in (REPO / n).rglob("*.py")]
    missing = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            missing |= {f"{path.relative_to(REPO)} imports {t}" for t in tops if t in first_party - names}
    assert not missing, sorted(missing)
    for m in pyproject["tool"]["setuptools"]["py-modules"]:
        assert (REPO / f"{m}.py").is_file(), m


def test_dependencies_are_requirements_txt(pyproject: dict) -> None:
    requirements = pytest.importorskip("packaging.requirements")
    assert "dependencies" in pyproject["project"]["dynamic"]
    files = pyproject["tool"]["setuptools"]["dynamic"]["dependencies"]["file"]
    assert files == ["requirements.txt"]
    lines = [ln.split("#")[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    reqs = [requirements.Requirement(ln) for ln in lines if ln]
    assert {"torch", "monai", "timm", "yacs"} <= {r.name for r in reqs}


def test_entry_points_run_from_another_folder(tmp_path: Path) -> None:
    """As an installed command does: the repository on the import path, the working directory elsewhere."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    code = ("import sys; from data.phantom.cli import main; "
            "sys.exit(main(['--out', 'ph', '--n', '2', '--size', '16']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ph" / "train.csv").is_file() and len(list((tmp_path / "ph" / "images").iterdir())) == 2
    for module in ("main_pretrain_mae", "main_downstream"):
        r = subprocess.run([sys.executable, "-c", f"import {module}; {module}.main(['--help'])"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "--cfg" in r.stdout, r.stderr
