"""The package structure: imports go one way, and the installed layout is the documented one.

    common  <-  graphs  <-  artifacts  <-  export   <-  doctor
                                       <-  runtime  <-

A module may import its own package and the packages below it; export and runtime
never import each other (they meet only in the artifact contract); doctor, the
self-test that builds artifacts and runs them, sits above both.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

LAYERS = {"common": 0, "graphs": 1, "artifacts": 2, "export": 3, "runtime": 3, "doctor": 4}


def _dsflow_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level dsflow package) of every import in `path`, nested ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, "<relative>"))
            elif node.module and node.module.startswith("dsflow."):
                found.append((node.lineno, node.module.split(".")[1]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[1]) for a in node.names
                      if a.name.startswith("dsflow.")]
    return found


def _modules() -> list[tuple[str, Path]]:
    return [(pkg, f) for pkg in LAYERS for f in sorted((REPO / pkg).rglob("*.py"))]


def test_every_package_is_checked():
    tops = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    assert tops == set(LAYERS), "a new top-level package needs a place in LAYERS"


@pytest.mark.parametrize("pkg,path", _modules(), ids=lambda v: str(v))
def test_imports_point_down(pkg, path):
    for line, target in _dsflow_imports(path):
        where = f"{path.relative_to(REPO)}:{line}"
        assert target != "<relative>", f"{where}: use absolute dsflow.* imports"
        assert target in LAYERS, f"{where}: imports unknown package dsflow.{target}"
        if target == pkg:
            continue
        assert LAYERS[target] < LAYERS[pkg], (
            f"{where}: dsflow.{pkg} must not import dsflow.{target} "
            "(order: common < graphs < artifacts < export, runtime < doctor)")


def test_setup_discovers_every_package():
    """setup.py finds subpackages itself: every directory with an __init__.py installs."""
    tree = ast.parse((REPO / "setup.py").read_text())
    funcs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.Assign, ast.ImportFrom))]
    namespace: dict = {}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), "setup.py", "exec"), namespace)
    found = set(namespace["packages"]())
    on_disk = {"dsflow." + ".".join(p.parent.relative_to(REPO).parts)
               for pkg in LAYERS for p in (REPO / pkg).rglob("__init__.py")}
    assert found == on_disk


def test_wheel_holds_every_module(tmp_path):
    """A non-editable install (`pip install .`) gets every module: build the wheel and
    compare its files with the tree."""
    import shutil
    import subprocess
    import sys
    import zipfile
    src = tmp_path / "src"  # a copy, so that setuptools' build/ never lands in the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path), str(src)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel, = tmp_path.glob("dsflow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"dsflow/" + p.relative_to(REPO).as_posix()
                for pkg in LAYERS for p in (REPO / pkg).rglob("*.py")}
    assert expected <= names, sorted(expected - names)[:5]
    from dsflow.export.pipeline.default_model import FILES  # the embedded model is package data
    assert {f"dsflow/export/pipeline/default_model_files/{f}" for f in FILES} <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for command in ("dsexport", "dsrun", "dsserve"):
        assert f"{command} = dsflow." in text
