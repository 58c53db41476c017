"""The distribution installs one top-level package, `corral`, mapped onto the `services/` folders."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _declared() -> list[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = data["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"corral": "services"}
    assert data["project"]["scripts"]["corral"] == "corral.cli:main"
    packages: list[str] = setuptools["packages"]
    return packages


def test_every_folder_is_a_declared_package_and_nothing_else_is() -> None:
    folders = sorted(
        "corral" + "".join("." + part for part in p.parent.relative_to(ROOT / "services").parts)
        for p in (ROOT / "services").rglob("__init__.py")
    )
    assert sorted(_declared()) == folders


@pytest.mark.slow
def test_the_wheel_holds_corral_and_no_services(tmp_path: Path) -> None:
    # built from a copy: setuptools builds in the source tree, and a build/ left there would leak
    # stale modules into the next wheel
    src = tmp_path / "src"
    shutil.copytree(ROOT / "services", src / "services", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-w", str(tmp_path), str(src)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("corral-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"corral"}
    for package in _declared():
        assert package.replace(".", "/") + "/__init__.py" in names
    assert "corral/client/__init__.py" in names
    modules = {n.removeprefix("corral/").removesuffix(".py") for n in names if n.endswith(".py")}
    sources = {
        str(p.relative_to(ROOT / "services").with_suffix("")) for p in (ROOT / "services").rglob("*.py")
    }
    assert modules == sources, "the wheel's modules differ from the source tree's"
    pages = {p.name for p in (ROOT / "services/gateway/console-static").iterdir()}
    assert {"index.html", "app.js", "charts.js", "style.css"} <= pages
    assert {
        n.removeprefix("corral/gateway/console-static/") for n in names if "console-static/" in n
    } == pages
