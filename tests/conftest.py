"""Shared fixtures: every array namespace available here, and helpers to build
arrays in them from host NumPy data.

JAX runs in 64-bit mode in the tests (``jax_enable_x64``, set below before any JAX
array exists): the float64 gradient checks need it, and JAX would otherwise hand
back float32.  Float32 models and ops are unaffected; tests/test_jax.py also trains
with 64-bit mode off, JAX's default."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from hypothesis import settings

from xpconv import backend

# the long profile of tests/test_fuzz.py: python -m pytest -m fuzz --hypothesis-profile=long
settings.register_profile("long", max_examples=6000, deadline=None)


def _torch_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _jax_x64() -> bool:
    """True when JAX is importable, with 64-bit mode switched on for the tests."""
    if importlib.util.find_spec("jax") is None:
        return False
    import jax

    jax.config.update("jax_enable_x64", True)
    return True


def _available():
    params = [pytest.param("numpy", id="numpy")]
    if importlib.util.find_spec("array_api_strict") is not None:
        params.append(pytest.param("array_api_strict", id="array_api_strict"))
    elif os.environ.get("CI") == "true":
        raise RuntimeError("array_api_strict is required in CI: pip install '.[test]'")
    if importlib.util.find_spec("torch") is not None:
        params.append(pytest.param("torch", id="torch"))
        params.append(
            pytest.param(
                "torch-cuda",
                id="torch-cuda",
                marks=[pytest.mark.gpu, pytest.mark.skipif(not _torch_cuda(), reason="torch sees no CUDA device")],
            )
        )
    if _jax_x64():
        params.append(pytest.param("jax", id="jax"))
    elif os.environ.get("CI") == "true":
        raise RuntimeError("jax is required in CI: pip install '.[test]'")
    if importlib.util.find_spec("cupy") is not None:
        params.append(
            pytest.param(
                "cupy",
                id="cupy",
                marks=[
                    pytest.mark.gpu,
                    pytest.mark.skipif(not backend.cuda_status()[0], reason="no usable CUDA device"),
                ],
            )
        )
    return params


NAMESPACES = _available()


@pytest.fixture(params=NAMESPACES)
def xp(request):
    """The Array-API namespace of one available library (numpy, array_api_strict,
    torch and jax on the CPU, cupy and torch on CUDA when a CUDA device works).  For torch-cuda the
    default device is CUDA while the test runs, so every array a test makes lands there."""
    if request.param != "torch-cuda":
        yield backend.get_namespace(request.param)
        return
    import torch

    torch.set_default_device("cuda")
    try:
        yield backend.get_namespace("torch")
    finally:
        torch.set_default_device(None)


@pytest.fixture
def to_xp(xp):
    """Convert host NumPy data into the current namespace."""

    def convert(a, dtype=None):
        a = np.asarray(a)
        return backend.asarray_in(a, xp, dtype=getattr(xp, dtype) if isinstance(dtype, str) else dtype)

    return convert


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


def shared_dataset(name: str) -> str:
    """Path of ../shared/datasets/<name>; under CI its absence is a failure, not a skip."""
    path = os.path.abspath(os.path.join(SHARED, "datasets", name))
    if not os.path.isdir(path):
        msg = f"real dataset folder {path} is missing (expected ../shared/datasets/{name} beside the checkout)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _cuda_usable() -> bool:
    """True when CuPy or torch can really run on a CUDA device here."""
    if importlib.util.find_spec("cupy") is not None and backend.cuda_status()[0]:
        return True
    return importlib.util.find_spec("torch") is not None and _torch_cuda()


_GPU_DESELECTED: list[str] = []


def pytest_collection_modifyitems(config, items):
    """Without a usable CUDA device the gpu-marked tests are deselected, not skipped:
    they run where a GPU is (benchmarks/gpu/run.sh runs ``-m gpu`` and fails on any skip),
    and a CPU run's summary counts them apart from real skips."""
    if _cuda_usable():
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("gpu") is not None else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
        _GPU_DESELECTED.extend(item.nodeid for item in drop)


def pytest_terminal_summary(terminalreporter):
    if _GPU_DESELECTED:
        terminalreporter.write_line(
            f"{len(_GPU_DESELECTED)} gpu-marked tests deselected: no usable CUDA device here (benchmarks/gpu/run.sh runs them on a GPU)"
        )
