"""The docs name things that exist: every command block in README.md and docs/*.md names scripts,
modules (``python -m x.y``), config files (``--cfg path.yaml``) and make targets of this repository,
every Python block imports names that exist, and every relative markdown link resolves (file, and
the heading anchor when the target is a markdown file). The checker itself is checked on a page
with wrong names."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK_ONLY_PAGES = [ROOT / "benchmarks" / "README.md", ROOT / "datasets" / "README.md"]

FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```", re.M | re.S)
SHELL_LANGS = {"bash", "sh", "shell", "console"}
# python -m pkg.mod / torchrun ... -m pkg.mod (the first -m after the launcher)
MODULE = re.compile(r"(?:^|[\s;&|(])(?:\S*/)?(?:python3?|torchrun)\b[^\n;&|]*?\s-m\s+([A-Za-z_][\w.]*)")
CFG = re.compile(r"--cfg[ =]+(\S+)")
MAKE = re.compile(r"(?:^|[\s;&|(])make\s+([\w-]+)")
# a path into the repository's own folders, or an entry script at its root
REPO_DIRS = ("configs", "slurm_submit", "tools", "benchmarks", "notebooks", "data", "datasets", "engine",
             "evaluation", "methods", "models", "tests")
REPO_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]+\.(?:py|sh|sbatch|yaml|ipynb)|main_\w+\.py)(?![\w/])"
                       % "|".join(REPO_DIRS))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1).lower(), m.group(2)) for m in FENCE.finditer(text)]


def _strip_comments(block: str) -> str:
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in block.splitlines())


def _module_exists(name: str) -> bool:
    parts = name.split(".")
    if (ROOT / parts[0]).is_dir() or (ROOT / f"{parts[0]}.py").is_file():
        base = ROOT.joinpath(*parts)
        return (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
                or (base / "__main__.py").is_file())
    return importlib.util.find_spec(parts[0]) is not None  # pip, pytest, torch.distributed.run, ...


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w-]+):", text, re.M))


def command_problems(text: str) -> list[str]:
    """Names in the shell blocks of ``text`` that do not exist in the repository."""
    problems, targets = [], _make_targets()
    for lang, block in _blocks(text):
        if lang not in SHELL_LANGS:
            continue
        code = _strip_comments(block.replace("\\\n", " "))
        for mod in MODULE.findall(code):
            if not _module_exists(mod):
                problems.append(f"module {mod!r} does not exist")
        for cfg in CFG.findall(code):
            if not cfg.startswith(("$", "...", "/")) and not (ROOT / cfg).is_file():
                problems.append(f"--cfg {cfg!r} does not exist")
        for path in REPO_PATH.findall(code):
            if not (ROOT / path).is_file():
                problems.append(f"file {path!r} does not exist")
        for target in MAKE.findall(code):
            if target not in targets:
                problems.append(f"make target {target!r} does not exist")
    return problems


def import_problems(text: str) -> list[str]:
    """Imports in the Python blocks of ``text`` whose module or name does not exist."""
    problems = []
    for lang, block in _blocks(text):
        if lang != "python":
            continue
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module:
                try:
                    mod = importlib.import_module(node.module)
                except ImportError as e:
                    problems.append(f"from {node.module} import ...: {e}")
                    continue
                problems += [f"{node.module}.{a.name} does not exist" for a in node.names
                             if not hasattr(mod, a.name) and not _module_exists(f"{node.module}.{a.name}")]
            elif isinstance(node, ast.Import):
                problems += [f"import {a.name}: no such module" for a in node.names if not _module_exists(a.name)]
    return problems


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file (outside code blocks)."""
    text = FENCE.sub("", md.read_text())
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def link_problems(page: Path, text: str | None = None) -> list[str]:
    """Relative links of ``page`` whose file (or markdown heading anchor) does not exist."""
    text = page.read_text() if text is None else text
    problems = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"link {target!r}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"link {target!r}: no heading #{anchor} in {dest.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_name_existing_things(page):
    assert command_problems(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_import_existing_names(page):
    assert import_problems(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES + LINK_ONLY_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert link_problems(page) == []


def test_docs_pages_exist_and_readme_is_short():
    assert {p.name for p in PAGES} >= {"README.md", "data.md", "models.md", "pretraining.md", "downstream.md",
                                       "tools.md", "cluster.md", "results.md", "design-notes.md"}
    assert len((ROOT / "README.md").read_text().splitlines()) < 250


def test_checker_fails_on_wrong_names(tmp_path):
    page = tmp_path / "bad.md"
    text = """
```bash
python -m tools.preprocess --cfg configs/mae/vit_base.yaml      # exists: no problem
python -m tools.no_such_tool --cfg configs/mae/no_such.yaml
torchrun --nproc_per_node 2 -m tools.also_missing
python main_pretrain_nothing.py --opts OUTPUT runs/x   # tools/fake.py in a comment is ignored
bash slurm_submit/missing.sbatch configs/demo/mae.yaml
make no-such-target
```

```python
from evaluation.metrics import multilabel_metrics, no_such_function
```

[ok](bad.md) [missing file](nowhere.md) [missing anchor](bad.md#no-such-heading)
"""
    page.write_text(text)
    assert sorted(command_problems(text)) == sorted([
        "module 'tools.no_such_tool' does not exist",
        "--cfg 'configs/mae/no_such.yaml' does not exist",
        "module 'tools.also_missing' does not exist",
        "file 'main_pretrain_nothing.py' does not exist",
        "file 'slurm_submit/missing.sbatch' does not exist",
        "file 'configs/mae/no_such.yaml' does not exist",
        "make target 'no-such-target' does not exist",
    ])
    assert import_problems(text) == ["evaluation.metrics.no_such_function does not exist"]
    problems = link_problems(page)
    assert len(problems) == 2 and "nowhere.md" in problems[0] and "#no-such-heading" in problems[1]
