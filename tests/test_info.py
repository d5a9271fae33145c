"""``xpconv info``: the report runs anywhere, its JSON has every section, and a CUDA failure is
explained (with exit code 0) instead of raised."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from xpconv import __version__, backend, cli, info

INSUFFICIENT = (
    "CUDARuntimeError: cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"
)


def run_info(capsys, *argv):
    rc = cli.main(["info", *argv])
    return rc, capsys.readouterr().out


def test_text_report_runs(capsys):
    rc, out = run_info(capsys)
    assert rc == 0
    assert out.startswith(f"xpconv {__version__}\n")
    for heading in ("Packages:", "Array namespaces:", "CUDA:", "BLAS used by NumPy:", "--device auto picks:"):
        assert heading in out
    assert f"CPU: {info.cpu_model()}, " in out


def test_json_report_has_every_section(capsys):
    rc, out = run_info(capsys, "--json")
    assert rc == 0
    r = json.loads(out)
    assert r["xpconv"] == __version__
    assert r["python"]["version"].count(".") == 2
    assert set(r["packages"]) >= {"numpy", "array-api-compat", "cupy", "torch"}
    assert r["packages"]["numpy"] is not None
    assert set(r["namespaces"]) == {"numpy", "array_api_strict", "torch", "cupy"}
    assert r["namespaces"]["numpy"] == {"usable": True, "reason": None}
    for ns in r["namespaces"].values():
        assert ns["usable"] or ns["reason"]  # every unusable namespace says why
    assert set(r["cuda"]) >= {"usable", "reason", "devices", "driver_cuda_version", "runtime_cuda_version"}
    if r["cuda"]["usable"]:
        for d in r["cuda"]["devices"]:
            assert set(d) >= {"name", "total_memory_bytes", "compute_capability"}
    else:
        assert r["cuda"]["reason"] and r["cuda"]["devices"] == []
    libs = r["blas"]["libraries"]
    assert libs, r["blas"]
    assert all(isinstance(lib["num_threads"], int) and lib["num_threads"] >= 1 for lib in libs)
    assert r["auto_device"]["device"] in ("cpu", "cuda")
    assert r["cpu"]["model"] == info.cpu_model() and r["cpu"]["cores"] >= 1
    assert r["thread_env"] == info.thread_env()


def test_thread_variables_are_reported(monkeypatch, capsys):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert info.thread_env()["OPENBLAS_NUM_THREADS"] == "1" and "OMP_NUM_THREADS" not in info.thread_env()
    rc, out = run_info(capsys)
    assert rc == 0 and "environment: " in out and "OPENBLAS_NUM_THREADS=1" in out


def test_info_takes_only_its_own_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["info", "--bogus"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_auto_pick_agrees_with_resolve_device(recwarn):
    picked = info.collect()["auto_device"]
    name = backend.namespace_name(backend.resolve_device("auto"))
    assert picked == {"device": "cuda" if name == "cupy" else "cpu", "namespace": name}


def test_unusable_cupy_is_explained_and_exit_code_is_zero(monkeypatch, capsys):
    monkeypatch.setattr(backend, "cuda_status", lambda: (False, INSUFFICIENT))
    rc, out = run_info(capsys)
    assert rc == 0
    assert f"no usable CUDA device: {INSUFFICIENT}" in out
    assert f"cupy              not usable: {INSUFFICIENT}" in out
    assert "--device auto picks: cpu (numpy)" in out

    rc, out = run_info(capsys, "--json")
    r = json.loads(out)
    assert rc == 0
    assert r["cuda"]["usable"] is False and r["cuda"]["reason"] == INSUFFICIENT
    assert r["namespaces"]["cupy"] == {"usable": False, "reason": INSUFFICIENT}
    assert r["auto_device"] == {"device": "cpu", "namespace": "numpy"}


class CUDARuntimeError(RuntimeError):  # named like CuPy's, so messages read as on a real machine
    pass


def _fake_cupy(driver: int, runtime: int):
    """A cupy that imports but fails at the first CUDA call, as on a machine whose driver is
    missing (driver=0) or too old for the wheel's CUDA major."""

    def fail(*args, **kwargs):
        raise CUDARuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version")

    rt = types.SimpleNamespace(
        getDeviceCount=fail, driverGetVersion=lambda: driver, runtimeGetVersion=lambda: runtime
    )
    return types.SimpleNamespace(__version__="14.0.1", cuda=types.SimpleNamespace(runtime=rt))


@pytest.fixture
def fake_cupy(monkeypatch):
    def install(driver, runtime):
        monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(driver, runtime))
        backend.cuda_status.cache_clear()

    yield install
    backend.cuda_status.cache_clear()


def test_no_driver_hint(fake_cupy, capsys):
    fake_cupy(driver=0, runtime=13000)
    rc, out = run_info(capsys)
    assert rc == 0
    assert (
        "no usable CUDA device: CUDARuntimeError: cudaErrorInsufficientDriver: CUDA driver version is "
        "insufficient for CUDA runtime version (no NVIDIA driver found: install the NVIDIA driver, or in "
        "Docker run with --gpus all and the NVIDIA Container Toolkit)"
    ) in out
    assert "CuPy built for CUDA 13.0" in out
    assert "--device auto picks: cpu (numpy)" in out


def test_wrong_cupy_wheel_hint(fake_cupy, capsys):
    fake_cupy(driver=12040, runtime=13000)
    rc, out = run_info(capsys, "--json")
    r = json.loads(out)
    assert rc == 0
    assert r["packages"]["cupy"] == "14.0.1"
    assert r["cuda"]["driver_cuda_version"] == "12.4" and r["cuda"]["runtime_cuda_version"] == "13.0"
    assert r["cuda"]["reason"].endswith(
        "(the NVIDIA driver supports CUDA 12.4 but this CuPy is built for CUDA 13.0: "
        "pip uninstall cupy-cuda13x && pip install 'xpconv[cuda12]', or upgrade the driver)"
    )
    fake_cupy(driver=11080, runtime=12000)
    assert "upgrade the driver (>= 525 for xpconv[cuda12], >= 580 for xpconv[cuda13])" in backend.cuda_status()[1]


@pytest.mark.parametrize("argv", [["-m", "xpconv", "info", "--json"], ["-m", "xpconv.info", "--json"]])
def test_python_dash_m_works(argv):
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["xpconv"] == __version__


def _docs() -> str:
    root = Path(__file__).resolve().parents[1]
    text = "".join(p.read_text(encoding="utf-8") for p in (root / "README.md", root / "docs" / "install.md"))
    return " ".join(text.split())


def _quoted(message: str) -> bool:
    return " ".join(message.split()) in _docs()


def test_troubleshooting_quotes_the_messages_xpconv_prints(fake_cupy):
    """The install guide's troubleshooting (docs/install.md) quotes these messages verbatim; keep them in step."""
    assert _quoted(f"CuPy is not installed; to use a GPU: {backend._EXTRAS['cupy']}")
    for driver in (0, 12040):  # no driver; a CUDA 12.4 driver under cupy-cuda13x
        fake_cupy(driver=driver, runtime=13000)
        with pytest.raises(backend.BackendUnavailable) as err:
            backend.resolve_device("cuda")
        assert _quoted(str(err.value)), str(err.value)
    fake_cupy(driver=0, runtime=13000)
    backend._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning) as rec:
        backend.resolve_device("auto")
    assert _quoted(f"RuntimeWarning: {rec[0].message}"), str(rec[0].message)


def test_report_names_the_convolution_kernels(capsys):
    """The kernel section says which convolution kernels run and, compiled, for which target."""
    pytest.importorskip("numba")
    from xpconv.kernels import numba_ops

    rc, out = run_info(capsys)
    assert rc == 0
    t = numba_ops.TARGET
    assert "Convolution kernels (NumPy arrays):" in out
    assert f"compiled (Numba) for 3x3 and 5x5 stride 1: target {t['cpu']} ({t['level']}" in out
    r = info.collect()["cpu_kernels"]
    assert r["conv2d"] == "xpconv.kernels.numba_ops.Conv2d"
    assert r["numba"]["active"] and r["numba"]["block"]["forward_dx"] == f"16 channels x {numba_ops.PB} positions"
    assert r["numba"]["products"]["split"], r["numba"]["products"]
    assert "Affine products in a pass: one single-threaded gemm per Numba thread (" in out


def test_report_says_why_the_compiled_kernels_are_off():
    code = "from xpconv import info; print(info.format_report(info.collect()))"
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "XPCONV_NUMBA": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert "Convolution kernels (NumPy arrays):\n  NumPy (im2col + BLAS): off: XPCONV_NUMBA=0\n" in out


def test_a_missing_numba_is_explained_with_where_it_is_installed(monkeypatch):
    import importlib.util

    from xpconv import kernels

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    why = kernels._why_missing("numba", ImportError("No module named 'numba'"))
    assert why.startswith("numba is not installed: xpconv installs it where Numba publishes wheels (Linux x86_64/aarch64")
    assert why.endswith(f"Python {sys.version_info[0]}.{sys.version_info[1]}")


def test_numba_is_a_dependency_exactly_where_numba_publishes_wheels():
    """pyproject.toml's markers against the platforms and Pythons of kernels.NUMBA_WHEELS (the
    sentence `xpconv info` shows where numba is missing)."""
    import tomllib

    from packaging.requirements import Requirement

    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
        deps = [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]
    numba = [r for r in deps if r.name == "numba"]
    assert numba and all(str(r.specifier) == ">=0.61" for r in numba)

    def installs(system, machine, py):
        return any(r.marker.evaluate({"sys_platform": system, "platform_machine": machine, "python_version": py}) for r in numba)

    for py in ("3.10", "3.11", "3.12", "3.13", "3.14"):
        assert installs("linux", "x86_64", py) and installs("linux", "aarch64", py) and installs("win32", "AMD64", py)
        assert installs("win32", "ARM64", py) == (py >= "3.12")
        assert installs("darwin", "arm64", py) == installs("darwin", "x86_64", py) == (py != "3.14")
        assert not installs("linux", "ppc64le", py) and not installs("linux", "s390x", py)
    assert not installs("linux", "x86_64", "3.15")
