"""Packaging: `python -m build` makes an sdist and a wheel (the wheel built from the sdist, so
the sdist is complete); both carry the package with its bundled data, the version comes from
xpconv/_version.py alone, the extras name the right CuPy wheels, and the MIT LICENSE
and the ``py.typed`` marker travel in both. (That the wheel installs
and runs in a fresh venv is shown by tests/test_docker.py, which installs the CPU image's wheel.)"""

from __future__ import annotations

import email
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from xpconv import __version__

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

pytest.importorskip("build", reason="pip install '.[test]' (build)")

ROOT = Path(__file__).resolve().parents[1]
JUNK = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "runs", ".venv", ".whl",
                              ".pytest_cache", ".hypothesis")


def package_files() -> set[str]:
    """Every file of the package as it stands in the source tree (xpconv/...)."""
    return {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "xpconv").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    }


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=JUNK)
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, text=True, timeout=600)
    wheels = list((tmp / "dist").glob("*.whl"))
    sdists = list((tmp / "dist").glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list((tmp / "dist").iterdir())
    return wheels[0], sdists[0]


def test_version_is_single_sourced():
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "xpconv._version.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:\.?(?:a|b|rc|dev|post)\d+)?", __version__)


def test_extras_name_the_cupy_wheel_of_their_cuda_major():
    with open(ROOT / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    for major in ("12", "13"):
        cupy = [r for r in extras[f"cuda{major}"] if r.startswith("cupy")]
        assert cupy and all(re.match(rf"cupy-cuda{major}x\b", r) for r in cupy), extras[f"cuda{major}"]


@pytest.mark.slow
def test_wheel_holds_the_package_data_and_metadata(dist):
    wheel, _ = dist
    assert wheel.name == f"xpconv-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = f"xpconv-{__version__}.dist-info"
        meta = email.message_from_bytes(z.read(f"{info}/METADATA"))
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    missing = package_files() - names
    assert not missing, f"files of xpconv/ missing from the wheel: {sorted(missing)}"
    assert "xpconv/data/digits.csv.gz" in names, "the bundled digits dataset is not in the wheel"
    assert not any(n.startswith("tests/") for n in names)
    assert meta["Version"] == __version__
    assert {"cuda12", "cuda13", "test"} <= set(meta.get_all("Provides-Extra"))
    requires = meta.get_all("Requires-Dist")
    for major in ("12", "13"):
        assert any(r.startswith(f"cupy-cuda{major}x") and f'extra == "cuda{major}"' in r for r in requires), requires
    assert re.search(r"^xpconv\s*=\s*xpconv\.cli:main$", entry_points, re.M), entry_points
    assert "xpconv/py.typed" in names, "the typing marker is not in the wheel"
    assert "xpconv/__main__.py" in names, "python -m xpconv would not run from the wheel"
    assert not any(n.startswith(("benchmarks/", "xpconv/bench")) for n in names), "the benchmark harness is in the wheel"


def test_license_is_mit_at_the_root():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "Copyright (c) 2026 the xpconv developers" in text
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]


@pytest.mark.slow
def test_license_is_in_the_wheel_and_the_sdist(dist):
    wheel, sdist = dist
    want = (ROOT / "LICENSE").read_bytes()
    info = f"xpconv-{__version__}.dist-info"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        licenses = [n for n in names if n.startswith(f"{info}/") and n.rsplit("/", 1)[-1] == "LICENSE"]
        assert licenses, f"no LICENSE in the wheel: {[n for n in names if n.startswith(info)]}"
        assert all(z.read(n) == want for n in licenses)
        meta = email.message_from_bytes(z.read(f"{info}/METADATA"))
    assert meta["License-Expression"] == "MIT" and "LICENSE" in (meta.get_all("License-File") or [])
    top = f"xpconv-{__version__}/"
    with tarfile.open(sdist) as t:
        assert t.extractfile(top + "LICENSE").read() == want


@pytest.mark.slow
def test_sdist_is_complete(dist):
    _, sdist = dist
    assert sdist.name == f"xpconv-{__version__}.tar.gz"
    top = f"xpconv-{__version__}/"
    with tarfile.open(sdist) as t:
        names = {n[len(top):] for n in t.getnames() if n.startswith(top)}
        pkg_info = email.message_from_bytes(t.extractfile(top + "PKG-INFO").read())
    assert {"pyproject.toml", "PKG-INFO"} <= names
    missing = package_files() - names
    assert not missing, f"files of xpconv/ missing from the sdist: {sorted(missing)}"
    assert pkg_info["Version"] == __version__
