"""backend: namespaces by name, device choice, transfers, seeded random numbers."""

from __future__ import annotations

import importlib
import re
import sys
import types
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


# --------------------------------------------------------------------------- the CUDA probe


class CompileException(Exception):  # named like CuPy's, so reasons read as on a real machine
    pass


class CUBLASError(RuntimeError):
    pass


def _fake_cupy(*, compile_error: str = "", matmul_error: str = "", im2col=None):
    """A cupy over host NumPy arrays with the parts the probe touches: arange/zeros,
    matmul, asnumpy, the runtime and a RawModule whose xpc_im2col_f32 runs ``im2col``
    (default: the 1x1-window copy the real kernel does)."""
    launches = []

    def default_im2col(x, col, total, *rest):
        col[: int(total)] = x.reshape(-1)[: int(total)]

    class RawModule:
        def __init__(self, code, options=()):
            self.code, self.options = code, options

        def compile(self):
            if compile_error:
                raise CompileException(compile_error)

        def get_function(self, name):
            def kernel(grid, block, args):
                launches.append((name, grid, block))
                (im2col or default_im2col)(*args)

            return kernel

    def matmul(a, b):
        if matmul_error:
            raise CUBLASError(matmul_error)
        return np.matmul(a, b)

    rt = types.SimpleNamespace(getDeviceCount=lambda: 1, getDevice=lambda: 0, driverGetVersion=lambda: 12040, runtimeGetVersion=lambda: 12040)
    cupy = types.SimpleNamespace(
        float32=np.float32, arange=np.arange, zeros=np.zeros, matmul=matmul, asnumpy=np.asarray,
        RawModule=RawModule, cuda=types.SimpleNamespace(runtime=rt),
    )
    return cupy, launches


@pytest.fixture
def fake_cupy(monkeypatch):
    """Installs a fake cupy; the caches of the probe and of the compiled modules are
    emptied before and after (a real GPU run must not meet the fake's modules)."""
    from xpconv.kernels import cuda_source

    def clear():
        backend.cuda_status.cache_clear()
        backend._warn_once.cache_clear()
        cuda_source.module.cache_clear()
        cuda_source.function.cache_clear()

    def install(**kwargs):
        clear()
        cupy, launches = _fake_cupy(**kwargs)
        monkeypatch.setitem(sys.modules, "cupy", cupy)
        return launches

    yield install
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    clear()


def test_the_probe_compiles_and_launches_xpconvs_own_kernels_and_a_cublas_product(fake_cupy):
    launches = fake_cupy()
    assert backend.cuda_status() == (True, "1 CUDA device(s)")
    assert launches == [("xpc_im2col_f32", (1,), (32,))]
    from xpconv.kernels import cuda_source

    assert cuda_source.module("conv").code == cuda_source.read_source("conv")  # xpconv's own source ...
    assert cuda_source.module("conv").options == cuda_source.OPTIONS  # ... with its own options


def test_the_probe_answers_for_the_current_device_not_the_first_one_asked_about(fake_cupy):
    """A rank may ask (xpconv info, a model built early) before it selects its own GPU:
    the answer is cached per device, so selecting another device probes that one."""
    launches = fake_cupy()
    cupy = sys.modules["cupy"]
    current = {"device": 0}
    cupy.cuda.runtime.getDeviceCount = lambda: 2
    cupy.cuda.runtime.getDevice = lambda: current["device"]
    assert backend.cuda_status() == (True, "2 CUDA device(s)")
    assert backend.cuda_status() == (True, "2 CUDA device(s)")
    assert len(launches) == 1  # device 0 probed once
    current["device"] = 1
    assert backend.cuda_status() == (True, "2 CUDA device(s)")
    assert len(launches) == 2  # device 1 probed on its own
    current["device"] = 0
    backend.cuda_status()
    assert len(launches) == 2


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"matmul_error": "CUBLAS_STATUS_NOT_INITIALIZED"},
         "a cuBLAS matrix product failed: CUBLASError: CUBLAS_STATUS_NOT_INITIALIZED"),
        ({"compile_error": "catastrophic error: cannot open source file \"cuda_fp16.h\"\n\n1 catastrophic error detected"},
         ("compiling xpconv's CUDA source conv.cu (NVRTC, options -std=c++14) failed: CompileException: "
          "catastrophic error: cannot open source file \"cuda_fp16.h\" 1 catastrophic error detected")),
        ({"im2col": lambda x, col, *rest: None},
         "xpconv's im2col kernel gave [0.0, 0.0, 0.0, 0.0], expected [0.0, 1.0, 2.0, 3.0]"),
        ({"im2col": lambda *args: (_ for _ in ()).throw(RuntimeError("cudaErrorNoKernelImageForDevice"))},
         "a launch of xpconv's im2col kernel failed: RuntimeError: cudaErrorNoKernelImageForDevice"),
    ],
    ids=["cublas", "nvrtc", "wrong-result", "launch"],
)
def test_a_failing_probe_step_is_the_reason_cuda_is_not_usable(fake_cupy, kwargs, reason):
    fake_cupy(**kwargs)
    ok, why = backend.cuda_status()
    assert not ok and why == reason
    with pytest.raises(backend.BackendUnavailable, match=re.escape(f"CUDA is not usable: {reason}")):
        backend.resolve_device("cuda")
    with pytest.warns(RuntimeWarning, match=re.escape(f"CUDA is not usable ({reason})")):
        assert backend.resolve_device("auto") is backend.get_namespace("numpy")
