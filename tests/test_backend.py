"""backend: namespaces by name, device choice, transfers, seeded random numbers."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest

from xpconv import backend


def test_namespace_of_matches_get_namespace(xp):
    a = backend.zeros((2, 3), xp=xp)
    assert backend.namespace_of(a) is xp
    assert backend.get_namespace(backend.namespace_name(xp)) is xp


def test_get_namespace_accepts_modules_and_aliases():
    assert backend.get_namespace(np) is backend.get_namespace("numpy") is backend.get_namespace("np")
    assert backend.get_namespace(None) is backend.get_namespace("numpy")
    with pytest.raises(ValueError, match="unknown array namespace 'mxnet'; expected one of .*jax"):
        backend.get_namespace("mxnet")


def test_missing_library_names_the_pip_extra(monkeypatch):
    backend._import_by_name.cache_clear()
    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "cupy":
            raise ImportError("No module named 'cupy'")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    try:
        with pytest.raises(backend.BackendUnavailable, match=r"xpconv\[cuda12\]"):
            backend.get_namespace("cupy")
    finally:
        backend._import_by_name.cache_clear()


def test_namespace_of_refuses_mixed_libraries():
    strict = backend.get_namespace("array_api_strict")
    with pytest.raises(TypeError, match="expected arrays of one array library"):
        backend.namespace_of(np.zeros(2), strict.zeros(2))


def test_device_auto_falls_back_to_numpy_with_one_warning(monkeypatch):
    monkeypatch.setattr(backend, "cuda_status", lambda: (False, "CUDARuntimeError: cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"))
    backend._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="cudaErrorInsufficientDriver") as rec:
        assert backend.resolve_device("auto") is backend.get_namespace("numpy")
        backend.resolve_device("auto")
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    with pytest.raises(backend.BackendUnavailable, match="--device cuda was asked for but CUDA is not usable: CUDARuntimeError"):
        backend.resolve_device("cuda")


def test_device_auto_is_quiet_when_cupy_is_absent(monkeypatch):
    monkeypatch.setattr(backend, "cuda_status", lambda: (False, "CuPy is not installed; to use a GPU: ..."))
    backend._warn_once.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.resolve_device("auto") is backend.get_namespace("numpy")
    assert backend.resolve_device("cpu") is backend.get_namespace("numpy")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'cuda', got 'tpu'"):
        backend.resolve_device("tpu")


def test_transfers_round_trip(xp):
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    a = backend.asarray_in(host, xp)
    assert backend.namespace_of(a) is xp and a.dtype == xp.float32
    np.testing.assert_array_equal(backend.to_numpy(a), host)
    strict = backend.get_namespace("array_api_strict")
    b = backend.asarray_in(a, strict)
    np.testing.assert_array_equal(backend.to_numpy(b), host)


def test_one_seed_same_numbers_on_every_namespace(xp):
    a = backend.Generator(7).normal((3, 4), xp=xp, scale=0.1)
    b = backend.Generator(7).normal((3, 4), xp="numpy", scale=0.1)
    np.testing.assert_array_equal(backend.to_numpy(a), b)
    assert a.dtype == xp.float32
    m1 = backend.Generator(3).dropout_mask((100,), 0.3, xp=xp, dtype=xp.float32)
    m2 = backend.Generator(3).dropout_mask((100,), 0.3, xp="numpy", dtype=np.float32)
    np.testing.assert_array_equal(backend.to_numpy(m1), m2)
    assert 0.5 < float(np.mean(m2)) < 0.9


def test_generator_streams_advance():
    g = backend.Generator(0)
    assert not np.array_equal(g.normal((5,)), g.normal((5,)))


def test_resolve_dtype_rejects_integers():
    with pytest.raises(ValueError, match="dtype must be float32 or float64, got 'int32'"):
        backend.resolve_dtype(np, "int32")
