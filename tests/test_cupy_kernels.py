"""The CuPy fast paths (xpconv/kernels/cupy_ops.py + conv.cu, pool.cu).

Without a GPU:

* every .cu source defines exactly the ``extern "C"`` kernels cupy_ops launches
  (read without a compiler), and compiles with ``nvcc --ptx`` for sm_80 and sm_90
  with every warning an error (when nvcc is on PATH; a planted error and a
  planted warning prove the check fails);
* every op of xpconv.ops has a kernel class in cupy_ops, registered for "cupy",
  whose forward and backward have the reference class's parameters (inspect on a
  copy imported against a stand-in ``cupy``);
* every op equals the generic path on fresh random inputs (odd sizes, strides
  1-3, pads 0-2, float32 and float64), with the .cu sources built for the CPU
  and cupy_ops' real launch code run against the stand-in (tests/cuda_host.py).

With a GPU (marked ``gpu``): the same equality tests on real CuPy arrays against
the generic path on CuPy (``impl=ops.GENERIC``), and whole-model
training on CuPy against NumPy.

Random inputs are drawn from a fresh seed each run; a failure names it, and
XPCONV_TEST_SEED=<seed> replays it.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from xpconv import backend, kernels, ops, optim
from xpconv.kernels import cuda_source

from . import cuda_host

KERNEL_DIR = pathlib.Path(cuda_source.__file__).parent
CUPY_OPS = KERNEL_DIR / "cupy_ops.py"
DTYPES = ("float32", "float64")
HAS_CUPY_SPEC = importlib.util.find_spec("cupy") is not None
NVCC = shutil.which("nvcc")
#: the GPU architectures the sources are compiled for in CI: A100 (sm_80) and H100 (sm_90)
ARCHES = ("sm_80", "sm_90")


#: every op a kernel can be registered for: the reference classes of xpconv.ops
GENERIC_OPS = tuple(sorted(ops.REFERENCE))


#: kernels of a training step whose reference is not an op of xpconv.ops: the Dropout
#: mask (xpconv.backend.keep_mask) and each optimizer's update (its generic ``_step``)
STEP_OPS = ("dropout_mask", *sorted(cls._kernel_op for cls in optim.OPTIMIZERS.values()))


def test_every_optimizer_names_an_update_kernel_cupy_ops_has():
    module = _load_cupy_ops_with(cuda_host.fake_cupy())
    classes = _kernel_classes(module)
    for cls in optim.OPTIMIZERS.values():
        kernel = classes[cls._kernel_op]
        opt = cls(lr=0.1)
        opt._lr_t = 0.1  # Adam's step size of the current update
        keywords = [p.name for p in inspect.signature(kernel().step).parameters.values() if p.kind is p.KEYWORD_ONLY]
        assert sorted(keywords) == sorted(opt._kernel_scalars()), cls.__name__
        assert kernel.slots == cls._slots, cls.__name__


def test_ops_dispatches_the_ops_this_file_checks():
    # guards the list above: if it came out empty, every check below would pass vacuously
    assert {"im2col", "conv2d", "conv2d_relu_max_pool2d", "max_pool2d", "avg_pool2d"} <= set(GENERIC_OPS)


# ====================================================================== sources, nvcc


def _launched_kernels() -> set[tuple[str, str]]:
    """(source, kernel) of every ``_launch("source", "kernel", ...)`` in cupy_ops.py."""
    found = set()
    for node in ast.walk(ast.parse(CUPY_OPS.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_launch":
            src, name = node.args[0], node.args[1]
            assert isinstance(src, ast.Constant) and isinstance(name, ast.Constant), ast.unparse(node)
            found.add((src.value, name.value))
    return found


def _expected_entry_points(source: str) -> set[str]:
    return {f"xpc_{k}_{sfx}" for s, k in _launched_kernels() if s == source for sfx in ("f32", "f64")}


_EXTERN_C = re.compile(r'extern\s+"C"\s+__global__\s+void\s+([\w#]+)\s*\(')


def _declared_entry_points(text: str) -> set[str]:
    """The ``extern "C"`` kernel names a .cu source defines, read without a compiler:
    declared directly, or by a function-like macro (``xpc_im2col_##SUFFIX``) expanded
    at each of its top-level uses (``XPC_CONV_ENTRY_POINTS(f32, float)``)."""
    text = text.replace("\\\n", " ")
    macros, plain = {}, []
    for line in text.splitlines():
        m = re.match(r"\s*#\s*define\s+(\w+)\(([^)]*)\)(.*)$", line)
        if m:
            macros[m.group(1)] = ([a.strip() for a in m.group(2).split(",")], m.group(3))
        elif not line.lstrip().startswith("#"):
            plain.append(line)
    names = set()
    for line in plain:
        names.update(n for n in _EXTERN_C.findall(line) if "#" not in n)
        m = re.match(r"\s*(\w+)\(([^)]*)\)\s*;?\s*$", line)
        if m and m.group(1) in macros:
            params, body = macros[m.group(1)]
            args = dict(zip(params, (a.strip() for a in m.group(2).split(","))))
            for name in _EXTERN_C.findall(body):
                names.add("".join(args.get(piece.strip(), piece.strip()) for piece in name.split("##")))
    return names


def test_every_cu_file_is_a_listed_source():
    assert sorted(p.stem for p in KERNEL_DIR.glob("*.cu")) == sorted((*cuda_source.SOURCES, cuda_source.COMMON))
    assert not _declared_entry_points(cuda_source.source_path(cuda_source.COMMON).read_text()), "common.cu holds helpers only"
    assert {s for s, _ in _launched_kernels()} == set(cuda_source.SOURCES)


@pytest.mark.parametrize("source", cuda_source.SOURCES)
def test_sources_define_exactly_the_kernels_cupy_ops_launches(source):
    # no compiler needed: a kernel renamed on one side only fails here, in any CI
    declared = _declared_entry_points(cuda_source.read_source(source))
    expected = _expected_entry_points(source)
    assert expected, f"cupy_ops launches nothing from {source}.cu"
    assert not expected - declared, f"{source}.cu lacks kernels that cupy_ops launches: {sorted(expected - declared)}"
    assert not declared - expected, f"{source}.cu defines kernels nothing launches: {sorted(declared - expected)}"


def test_entry_point_reader_expands_macros():
    text = (
        '#define ENTRIES(SUFFIX, T) \\\n  extern "C" __global__ void xpc_a_##SUFFIX(T* x) {} \\\n'
        '  extern "C" __global__ void xpc_b_##SUFFIX(T* x) {}\n'
        'extern "C" __global__ void xpc_plain(int n) {}\nENTRIES(f32, float)\nENTRIES(f64, double)\n'
    )
    assert _declared_entry_points(text) == {"xpc_plain", "xpc_a_f32", "xpc_b_f32", "xpc_a_f64", "xpc_b_f64"}


@pytest.mark.parametrize("source", cuda_source.SOURCES)
def test_sources_include_no_headers(source):
    # NVRTC (what cupy.RawModule compiles with) has no host headers
    text = cuda_source.read_source(source)
    assert not re.search(r"^\s*#\s*include", text, re.M), f"{source}.cu must not #include anything (NVRTC)"


def _nvcc_ptx(src: pathlib.Path, arch: str | None, ptx: pathlib.Path) -> subprocess.CompletedProcess:
    """``nvcc --ptx`` with NVRTC's options, every warning an error."""
    cmd = [NVCC, "--ptx", *cuda_source.OPTIONS, "-Werror", "all-warnings"]
    if arch:
        cmd.append(f"-arch={arch}")
    cmd += ["-o", str(ptx), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    proc.command = " ".join(cmd)
    return proc


needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc is not on PATH: cannot compile the CUDA sources (install the CUDA toolkit to run this check)"
)


@needs_nvcc
@pytest.mark.parametrize("arch", [None, *ARCHES], ids=["default-arch", *ARCHES])
@pytest.mark.parametrize("source", cuda_source.SOURCES)
def test_nvcc_compiles_source_to_ptx(source, arch, tmp_path):
    src, ptx = tmp_path / f"{source}.cu", tmp_path / f"{source}.ptx"
    src.write_text(cuda_source.read_source(source))  # what NVRTC gets: common.cu + <source>.cu
    proc = _nvcc_ptx(src, arch, ptx)
    assert proc.returncode == 0, f"{proc.command}\n{proc.stdout}{proc.stderr}"
    text = ptx.read_text()
    if arch:
        assert re.search(rf"^\.target\s+{arch}\b", text, re.M), f"{source}.ptx is not for {arch}"
    entries = set(re.findall(r"\.entry\s+(\w+)\s*\(", text))
    missing = _expected_entry_points(source) - entries
    assert not missing, f"{source}.cu lacks kernels that cupy_ops launches: {sorted(missing)}"
    # the compiler agrees with the compiler-free reader above
    assert entries == _declared_entry_points(cuda_source.read_source(source))


@needs_nvcc
@pytest.mark.parametrize(
    "planted, message",
    [
        ("{ x[0] = undeclared_name; }", "undeclared_name"),  # a syntax/semantic error
        ("{ int unused_local = 3; x[0] = 1.0f; }", "unused_local"),  # a warning: -Werror makes it fail
    ],
    ids=["error", "warning"],
)
def test_nvcc_check_fails_on_a_broken_source(planted, message, tmp_path):
    # the compile check above can fail: the same command on conv.cu with one bad kernel appended
    src = tmp_path / "broken.cu"
    src.write_text(cuda_source.read_source("conv") + f'\nextern "C" __global__ void xpc_broken_f32(float* x) {planted}\n')
    proc = _nvcc_ptx(src, ARCHES[-1], tmp_path / "broken.ptx")
    assert proc.returncode != 0, f"{proc.command} accepted a broken source"
    assert message in proc.stdout + proc.stderr


# ====================================================================== signatures


def _load_cupy_ops_with(fake_cupy):
    """A private copy of cupy_ops imported against ``fake_cupy`` (the real module,
    its registrations and a real cupy, if installed, are left untouched)."""
    saved = sys.modules.get("cupy")
    registered = dict(kernels.REGISTRY)
    sys.modules["cupy"] = fake_cupy
    try:
        return _fresh("cupy_ops", "xpconv.kernels._host_cupy_ops")
    finally:
        kernels.REGISTRY.clear()
        kernels.REGISTRY.update(registered)
        if saved is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved


def _kernel_classes(module) -> dict:
    """op -> the kernel class ``module`` registers for it."""
    return {cls.op: cls for cls in vars(module).values() if isinstance(cls, type) and cls.__module__ == module.__name__ and hasattr(cls, "op")}


def _public_functions(module) -> dict:
    return {
        name: fn
        for name, fn in vars(module).items()
        if inspect.isfunction(fn) and fn.__module__ == module.__name__ and not name.startswith("_")
    }


def _parameters(fn) -> list:
    """(name, kind, default) of each parameter: what a caller relies on (annotations aside)."""
    return [(p.name, p.kind.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_cupy_ops_has_the_generic_ops_signatures():
    # cupy_ops imported against the stand-in cupy: no CuPy, GPU or compiler needed
    module = _load_cupy_ops_with(cuda_host.fake_cupy())
    every = _kernel_classes(module)
    classes = {op: cls for op, cls in every.items() if op not in STEP_OPS}
    assert sorted(classes) == sorted(GENERIC_OPS), "cupy_ops should have a kernel for every op of xpconv.ops"
    assert sorted(set(every) - set(classes)) == sorted(STEP_OPS)
    for op, cls in classes.items():
        ref = ops.REFERENCE[op]
        assert cls.namespace == "cupy" and cls.__name__ == type(ref).__name__, op
        for method in ("forward", "backward"):
            want, got = _parameters(getattr(ref, method)), _parameters(getattr(cls(), method))
            assert got == want, f"cupy_ops.{cls.__name__}.{method} parameters {got} differ from the reference's {want}"
    assert sorted(module.__all__) == sorted(cls.__name__ for cls in every.values())
    assert not _public_functions(module), "cupy_ops' public face is its kernel classes"
    # loading the copy left the registry as it was
    assert all(type(k).__module__ != module.__name__ for k in kernels.REGISTRY.values())


_REAL_CUPY_OPS = """
from tests.test_cupy_kernels import STEP_OPS, _kernel_classes, _parameters
from xpconv import kernels, ops
from xpconv.kernels import cupy_ops  # importing needs CuPy installed, not a working device

classes = _kernel_classes(cupy_ops)
assert sorted(set(classes) - set(STEP_OPS)) == sorted(ops.REFERENCE), sorted(classes)
for op, cls in classes.items():
    assert type(kernels.find("cupy", op)) is cls, op
    if op in STEP_OPS:  # the fused step kernels have no generic op to match
        continue
    for method in ("forward", "backward"):
        assert _parameters(getattr(cls(), method)) == _parameters(getattr(ops.REFERENCE[op], method)), (op, method)
print(len(classes), "cupy kernels")
"""


def test_real_cupy_ops_imports_without_a_gpu_and_is_what_the_registry_returns():
    """With the real CuPy wheel on the path (tests/test_cupy_api.py installs it once into a
    cache folder; no device is needed to import it), cupy_ops imports and is what the
    registry returns for every op, with the reference's signatures."""
    from .test_cupy_api import WHEELS, _site

    dist, version, deps = WHEELS[0]
    site = _site(dist, version, deps)
    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(site)]), PYTHONNOUSERSITE="1")
    r = subprocess.run([sys.executable, "-c", _REAL_CUPY_OPS], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cupy kernels" in r.stdout, r.stdout


# ====================================================================== implementations


class KernelOps:
    """xpconv.ops' functions, each run with ``impl=`` one kernel of a cupy_ops module
    (the reference where the kernel does not accept the inputs, as xpconv.ops does)."""

    def __init__(self, module):
        self.kernels = {op: cls() for op, cls in _kernel_classes(module).items()}

    def im2col(self, x, *args, **kwargs):
        return ops.im2col(x, *args, impl=self.kernels["im2col"], **kwargs)

    def col2im(self, col, *args, **kwargs):
        return ops.col2im(col, *args, impl=self.kernels["im2col"], **kwargs)

    def conv2d_forward(self, *args, **kwargs):
        return ops.conv2d_forward(*args, impl=self.kernels["conv2d"], **kwargs)

    def conv2d_relu_max_pool2d_forward(self, *args, **kwargs):
        return ops.conv2d_relu_max_pool2d_forward(*args, impl=self.kernels["conv2d_relu_max_pool2d"], **kwargs)

    def max_pool2d_forward(self, *args, **kwargs):
        return ops.max_pool2d_forward(*args, impl=self.kernels["max_pool2d"], **kwargs)

    def avg_pool2d_forward(self, *args, **kwargs):
        return ops.avg_pool2d_forward(*args, impl=self.kernels["avg_pool2d"], **kwargs)

    # a backward runs the kernel its cache names
    conv2d_backward = staticmethod(ops.conv2d_backward)
    conv2d_relu_max_pool2d_backward = staticmethod(ops.conv2d_relu_max_pool2d_backward)
    max_pool2d_backward = staticmethod(ops.max_pool2d_backward)
    avg_pool2d_backward = staticmethod(ops.avg_pool2d_backward)


class Impl:
    """cupy_ops over one kind of array: 'host' (the .cu built for the CPU, NumPy
    arrays, a stand-in cupy) or 'cupy' (a real GPU).  ``module`` is the cupy_ops
    module, ``ops`` xpconv.ops' functions run with its kernels."""

    def __init__(self, name, module, asarray, to_host):
        self.name, self.module, self.ops = name, module, KernelOps(module)
        self.asarray, self.to_host = asarray, to_host

    def __repr__(self):
        return f"Impl({self.name})"


def _fresh(module_name: str, alias: str):
    spec = importlib.util.spec_from_file_location(alias, KERNEL_DIR / f"{module_name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.lru_cache(maxsize=None)
def _host_impl() -> Impl:
    """A private copy of cupy_ops bound to cuda_host's stand-in cupy, whose kernels
    are the .cu sources built for the CPU."""
    src = _fresh("cuda_source", "xpconv.kernels._host_cuda_source")
    src.module = functools.lru_cache(maxsize=None)(lambda name: cuda_host.HostModule(src.read_source(name), src.OPTIONS))
    mod = _load_cupy_ops_with(cuda_host.fake_cupy())
    mod.cuda_source = src
    return Impl("host", mod, np.asarray, np.asarray)


def _cupy_impl() -> Impl:
    import cupy

    from xpconv.kernels import cupy_ops

    return Impl("cupy", cupy_ops, cupy.asarray, cupy.asnumpy)


needs_cuda = pytest.mark.skipif(not (HAS_CUPY_SPEC and backend.cuda_status()[0]), reason="no usable CUDA device (CuPy)")
needs_cxx = pytest.mark.skipif(cuda_host.compiler() is None, reason="no host C++ compiler (g++/clang++) to build the .cu sources for the CPU")


@pytest.fixture(
    params=[
        pytest.param("host", marks=needs_cxx),
        pytest.param("cupy", marks=[pytest.mark.gpu, needs_cuda]),
    ]
)
def impl(request) -> Impl:
    return _host_impl() if request.param == "host" else _cupy_impl()


@pytest.fixture
def seeded():
    """(rng, seed): fresh each run unless XPCONV_TEST_SEED is set."""
    seed = int(os.environ.get("XPCONV_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    return np.random.default_rng(seed), seed


def generic(op, *args, on_host=None, **kwargs):
    """The generic ``xpconv.ops.<op>``: on the arrays' own namespace, or with
    ``on_host=impl`` on NumPy copies of them -- the reference where libraries may
    differ (which of tied maxima or NaNs ``argmax`` picks: NumPy's first one is the spec)."""
    if on_host is not None:
        args = tuple(on_host.to_host(a) if hasattr(a, "shape") and hasattr(a, "dtype") else a for a in args)
    if not op.endswith("_backward"):  # a backward runs its cache's kernel: the reference's here
        kwargs["impl"] = ops.GENERIC
    return getattr(ops, op)(*args, **kwargs)


def geometries(rng, count, *, max_filter=5):
    """Random (N, C, H, W, FH, FW, (SH, SW), (PH, PW)) with odd sizes, strides 1-3, pads 0-2."""
    for _ in range(count):
        N, C = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        H, W = (int(v) for v in rng.choice([3, 5, 6, 7, 9, 11, 13], size=2))
        SH, SW = (int(v) for v in rng.integers(1, 4, size=2))
        PH, PW = (int(v) for v in rng.integers(0, 3, size=2))
        FH = int(rng.integers(1, min(max_filter, H + 2 * PH) + 1))
        FW = int(rng.integers(1, min(max_filter, W + 2 * PW) + 1))
        yield N, C, H, W, FH, FW, (SH, SW), (PH, PW)


def check(impl, got, want, what, seed, *, exact=False, dtype="float32"):
    got, want = impl.to_host(got), impl.to_host(want)
    msg = f"{impl.name}: {what} (XPCONV_TEST_SEED={seed})"
    assert got.shape == want.shape, msg
    assert got.dtype == want.dtype, msg
    if exact:
        np.testing.assert_array_equal(got, want, err_msg=msg)
    else:
        # sums in another order (cuBLAS, another transposition): errors scale with the
        # largest terms, not with each (possibly cancelled) result
        eps = 1e-5 if dtype == "float32" else 1e-12
        scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
        np.testing.assert_allclose(got, want, rtol=eps, atol=eps * scale, err_msg=msg)


def randn(impl, rng, shape, dtype):
    return impl.asarray(rng.standard_normal(shape).astype(dtype))


# ====================================================================== op equality


@pytest.mark.parametrize("dtype", DTYPES)
def test_im2col_and_col2im_equal_generic(impl, seeded, dtype):
    rng, seed = seeded
    for N, C, H, W, FH, FW, stride, pad in geometries(rng, 25):
        what = f"N={N} C={C} H={H} W={W} FH={FH} FW={FW} stride={stride} pad={pad} {dtype}"
        x = randn(impl, rng, (N, C, H, W), dtype)
        for pad_value in (0.0, -float("inf")):
            want = generic("im2col", x, FH, FW, stride, pad, pad_value=pad_value)
            got = impl.ops.im2col(x, FH, FW, stride, pad, pad_value=pad_value)
            check(impl, got, want, f"im2col {what} pad_value={pad_value}", seed, exact=True)
        col = randn(impl, rng, tuple(want.shape), dtype)
        want = generic("col2im", col, (N, C, H, W), FH, FW, stride, pad)
        got = impl.ops.col2im(col, (N, C, H, W), FH, FW, stride, pad)
        check(impl, got, want, f"col2im {what}", seed, dtype=dtype)


def check_backward(impl, op, dout, gcache, wcache, what, seed, dtype, on_host=None):
    """``op`` (a convolution backward) from the kernel's cache against the generic one,
    with and without dx."""
    for need_dx in (True, False):
        got = getattr(impl.ops, op)(dout, gcache, need_dx=need_dx)
        want = generic(op, dout, wcache, need_dx=need_dx, on_host=on_host)
        check_grads(impl, got, want, f"{op} need_dx={need_dx} {what}", seed, dtype, need_dx)


def check_grads(impl, got, want, what, seed, dtype, need_dx=True):
    assert (got[0] is None) == (not need_dx), f"{impl.name}: {what}: dx must be None exactly when need_dx=False"
    for name, g, w in zip(("dx", "dW", "db"), got, want):
        if w is not None:
            check(impl, g, w, f"{name} of {what}", seed, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True], ids=["conv", "conv+relu"])
def test_conv_forward_backward_equal_generic(impl, seeded, dtype, relu):
    rng, seed = seeded
    for N, C, H, W, FH, FW, stride, pad in geometries(rng, 15):
        FN = int(rng.integers(1, 6))
        what = f"N={N} C={C} H={H} W={W} FN={FN} FH={FH} FW={FW} stride={stride} pad={pad} relu={relu} {dtype}"
        x = randn(impl, rng, (N, C, H, W), dtype)
        Wt = randn(impl, rng, (FN, C, FH, FW), dtype)
        b = randn(impl, rng, (FN,), dtype)
        want, wcache = generic("conv2d_forward", x, Wt, b, stride, pad, relu=relu)
        got, gcache = impl.ops.conv2d_forward(x, Wt, b, stride, pad, relu=relu)
        check(impl, got, want, f"conv2d_forward {what}", seed, dtype=dtype)
        dout = randn(impl, rng, tuple(want.shape), dtype)
        check_backward(impl, "conv2d_backward", dout, gcache, wcache, what, seed, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("values", ["normal", "ties"])
def test_conv_relu_maxpool_equals_generic(impl, seeded, dtype, values):
    rng, seed = seeded
    done = 0
    for N, C, H, W, FH, FW, stride, pad in geometries(rng, 60):
        OH, OW = ops.conv_output_size(H, W, FH, FW, stride, pad)
        KH, KW = int(rng.integers(1, min(3, OH + 1) + 1)), int(rng.integers(1, min(3, OW + 1) + 1))
        pstride = tuple(int(v) for v in rng.integers(1, 4, size=2))
        ppad = (int(rng.integers(0, min(2, KH // 2) + 1)), int(rng.integers(0, min(2, KW // 2) + 1)))
        if OH + 2 * ppad[0] < KH or OW + 2 * ppad[1] < KW:
            continue
        FN = int(rng.integers(1, 6))
        what = (
            f"N={N} C={C} H={H} W={W} FN={FN} FH={FH} FW={FW} stride={stride} pad={pad} "
            f"pool={KH}x{KW} pool_stride={pstride} pool_pad={ppad} {dtype} {values}"
        )
        if values == "ties":  # integer data and weights: many equal maxima, and many <= 0
            x = impl.asarray(rng.integers(-1, 2, size=(N, C, H, W)).astype(dtype))
            Wt = impl.asarray(rng.integers(-1, 2, size=(FN, C, FH, FW)).astype(dtype))
            b = impl.asarray(rng.integers(-1, 2, size=(FN,)).astype(dtype))
        else:
            x, Wt, b = (randn(impl, rng, s, dtype) for s in ((N, C, H, W), (FN, C, FH, FW), (FN,)))
        args = (x, Wt, b, stride, pad, KH, KW, pstride, ppad)
        spec = impl if values == "ties" else None  # ties: NumPy's argmax is the reference
        want, wcache = generic("conv2d_relu_max_pool2d_forward", *args, on_host=spec)
        got, gcache = impl.ops.conv2d_relu_max_pool2d_forward(*args)
        check(impl, got, want, f"conv2d_relu_max_pool2d_forward {what}", seed, dtype=dtype)
        inference, none = impl.ops.conv2d_relu_max_pool2d_forward(*args, training=False)
        assert none is None
        check(impl, inference, got, f"conv2d_relu_max_pool2d_forward training=False {what}", seed, exact=True)
        dout = randn(impl, rng, tuple(want.shape), dtype)
        check_backward(impl, "conv2d_relu_max_pool2d_backward", dout, gcache, wcache, what, seed, dtype, spec)
        done += 1
    assert done >= 10
    with pytest.raises(RuntimeError, match="training=False"):
        impl.ops.conv2d_relu_max_pool2d_backward(dout, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, values", [("max", "normal"), ("max", "ties"), ("avg", "normal")])
def test_pooling_equals_generic(impl, seeded, dtype, kind, values):
    # max pooling with ties: the first maximum of each window wins, as xp.argmax's
    rng, seed = seeded
    fwd, bwd = f"{kind}_pool2d_forward", f"{kind}_pool2d_backward"
    for N, C, H, W, KH, KW, stride, pad in geometries(rng, 20, max_filter=4):
        what = f"N={N} C={C} H={H} W={W} pool={KH}x{KW} stride={stride} pad={pad} {dtype} {values}"
        host = rng.integers(0, 3, size=(N, C, H, W)) if values == "ties" else rng.standard_normal((N, C, H, W))
        x = impl.asarray(host.astype(dtype))
        spec = impl if values == "ties" else None  # ties: NumPy's argmax is the reference
        want, wcache = generic(fwd, x, KH, KW, stride, pad, on_host=spec)
        got, gcache = getattr(impl.ops, fwd)(x, KH, KW, stride, pad)
        check(impl, got, want, f"{fwd} {what}", seed, exact=kind == "max", dtype=dtype)
        dout = randn(impl, rng, tuple(want.shape), dtype)
        got = getattr(impl.ops, bwd)(dout, gcache)
        check(impl, got, generic(bwd, dout, wcache, on_host=spec), f"{bwd} {what}", seed, dtype=dtype)


def test_max_pool_nan_and_infinities_route_like_argmax(impl, seeded):
    rng, seed = seeded
    host = np.array([[[[1.0, np.nan, 3.0, -np.inf], [np.nan, 5.0, -np.inf, -np.inf], [np.inf, 2.0, 0.0, 0.0]]]], dtype="float32")
    x = impl.asarray(host)
    for stride, pad in ((1, 0), (1, 1), (2, 1)):  # the reference: NumPy's argmax (the first NaN wins)
        want, wcache = generic("max_pool2d_forward", x, 2, 2, stride, pad, on_host=impl)
        got, gcache = impl.ops.max_pool2d_forward(x, 2, 2, stride, pad)
        check(impl, got, want, f"max_pool2d_forward stride={stride} pad={pad}", seed, exact=True)
        dout = randn(impl, rng, tuple(want.shape), "float32")
        got = impl.ops.max_pool2d_backward(dout, gcache)
        want = generic("max_pool2d_backward", dout, wcache, on_host=impl)
        check(impl, got, want, f"max_pool2d_backward stride={stride} pad={pad}", seed)


@pytest.mark.gpu
@needs_cuda
def test_large_launches_wrap_their_grid_stride_loops(seeded):
    # the random geometries above fit in a few blocks; these launches need more threads
    # than one grid has (256 x 65536), so every thread goes round its loop several times
    impl = _cupy_impl()
    rng, seed = seeded
    x = randn(impl, rng, (48, 16, 61, 67), "float32")  # 3.1 M elements
    col = impl.ops.im2col(x, 3, 3, 1, 1)  # 28 M elements: ~2 rounds
    check(impl, col, generic("im2col", x, 3, 3, 1, 1), "large im2col", seed, exact=True)
    dcol = randn(impl, rng, tuple(col.shape), "float32")
    del col
    check(impl, impl.ops.col2im(dcol, x.shape, 3, 3, 1, 1), generic("col2im", dcol, x.shape, 3, 3, 1, 1), "large col2im", seed)
    del dcol
    Wt, b = randn(impl, rng, (32, 16, 3, 3), "float32"), randn(impl, rng, (32,), "float32")
    args = (x, Wt, b, 1, 1, 2, 2, 2)
    want, wcache = generic("conv2d_relu_max_pool2d_forward", *args)
    got, gcache = impl.ops.conv2d_relu_max_pool2d_forward(*args)
    check(impl, got, want, "large conv2d_relu_max_pool2d_forward", seed)
    dout = randn(impl, rng, tuple(want.shape), "float32")
    check_backward(impl, "conv2d_relu_max_pool2d_backward", dout, gcache, wcache, "large", seed, "float32")
    xs = randn(impl, rng, (128, 64, 64, 64), "float32")  # 33.5 M elements: 2 rounds
    for kind in ("max", "avg"):
        want, wcache = generic(f"{kind}_pool2d_forward", xs, 3, 3, 1, 1)
        got, gcache = getattr(impl.ops, f"{kind}_pool2d_forward")(xs, 3, 3, 1, 1)
        check(impl, got, want, f"large {kind}_pool2d_forward", seed, exact=kind == "max")
        dout = randn(impl, rng, tuple(want.shape), "float32")
        got = getattr(impl.ops, f"{kind}_pool2d_backward")(dout, gcache)
        check(impl, got, generic(f"{kind}_pool2d_backward", dout, wcache), f"large {kind}_pool2d_backward", seed)


def test_launches_split_over_the_batch_give_the_same_result(impl, seeded, monkeypatch):
    # a tiny index limit forces one launch per sample or two
    rng, seed = seeded
    N, C, H, W, FN = 5, 2, 9, 9, 4
    x = randn(impl, rng, (N, C, H, W), "float32")
    Wt = randn(impl, rng, (FN, C, 3, 3), "float32")
    b = randn(impl, rng, (FN,), "float32")
    dout_conv = randn(impl, rng, (N, FN, 9, 9), "float32")
    whole = impl.ops.conv2d_forward(x, Wt, b, 1, 1)
    whole_grads = impl.ops.conv2d_backward(dout_conv, whole[1])
    pooled = impl.ops.max_pool2d_forward(x, 2, 2, 2, 1)
    monkeypatch.setattr(impl.module, "_INDEX_LIMIT", 81 * 18 + 1)  # P*K of one sample
    split = impl.ops.conv2d_forward(x, Wt, b, 1, 1)
    check(impl, split[0], whole[0], "split conv2d_forward", seed, exact=True)
    for name, g, w in zip(("dx", "dW", "db"), impl.ops.conv2d_backward(dout_conv, split[1]), whole_grads):
        check(impl, g, w, f"split conv2d_backward {name}", seed)
    split_pool = impl.ops.max_pool2d_forward(x, 2, 2, 2, 1)
    check(impl, split_pool[0], pooled[0], "split max_pool2d_forward", seed, exact=True)
    dpool = randn(impl, rng, tuple(pooled[0].shape), "float32")
    check(impl, impl.ops.max_pool2d_backward(dpool, split_pool[1]), impl.ops.max_pool2d_backward(dpool, pooled[1]), "split max_pool2d_backward", seed, exact=True)
    monkeypatch.setattr(impl.module, "_INDEX_LIMIT", 1000)
    with pytest.raises(ValueError, match="32-bit index limit"):
        impl.ops.im2col(x, 3, 3, 1, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_convolutions_in_batch_slices_equal_the_whole_batch(impl, seeded, monkeypatch, dtype):
    # a slice budget below one sample's im2col matrix makes every sample its own slice;
    # three samples' worth makes slices of 3, 3 and 1 (N = 7)
    rng, seed = seeded
    N, C, H, W, FN = 7, 3, 9, 8, 4
    x = randn(impl, rng, (N, C, H, W), dtype)
    Wt = randn(impl, rng, (FN, C, 3, 3), dtype)
    b = randn(impl, rng, (FN,), dtype)
    per_sample = 9 * 8 * C * 9 * np.dtype(dtype).itemsize  # P * K * itemsize, stride 1, pad 1
    for budget in (1, 3 * per_sample):
        assert len(impl.module._chunks(N, per_sample)) == 1  # the default budget: one piece
        monkeypatch.setattr(impl.module, "_col_budget", lambda: budget)
        pieces = len(impl.module._chunks(N, per_sample))
        assert pieces == (7 if budget == 1 else 3)
        what = f"{pieces} slices {dtype}"
        want, wcache = generic("conv2d_forward", x, Wt, b, 1, 1, relu=True)
        got, gcache = impl.ops.conv2d_forward(x, Wt, b, 1, 1, relu=True)
        check(impl, got, want, f"conv2d_forward {what}", seed, dtype=dtype)
        check_backward(impl, "conv2d_backward", randn(impl, rng, tuple(want.shape), dtype), gcache, wcache, what, seed, dtype)
        want, wcache = generic("conv2d_relu_max_pool2d_forward", x, Wt, b, 1, 1, 2, 2, 2)
        got, gcache = impl.ops.conv2d_relu_max_pool2d_forward(x, Wt, b, 1, 1, 2, 2, 2)
        check(impl, got, want, f"conv2d_relu_max_pool2d_forward {what}", seed, dtype=dtype)
        dout = randn(impl, rng, tuple(want.shape), dtype)
        check_backward(impl, "conv2d_relu_max_pool2d_backward", dout, gcache, wcache, what, seed, dtype)
        monkeypatch.undo()


def test_other_dtypes_and_generic_caches_use_the_generic_path(impl, seeded):
    rng, seed = seeded
    xi = impl.asarray(rng.integers(-5, 5, size=(2, 3, 6, 5)).astype("int32"))
    check(impl, impl.ops.im2col(xi, 3, 2, 2, 1), generic("im2col", xi, 3, 2, 2, 1), "int32 im2col", seed, exact=True)
    xh = impl.asarray(rng.standard_normal((2, 3, 6, 5)).astype("float16"))
    out, cache = impl.ops.max_pool2d_forward(xh, 2, 2, 2, 0)
    check(impl, out, generic("max_pool2d_forward", xh, 2, 2, 2, 0)[0], "float16 max pool", seed, exact=True)
    # a cache from the generic forward goes to the generic backward
    x = randn(impl, rng, (2, 3, 6, 5), "float64")
    Wt = randn(impl, rng, (2, 3, 3, 3), "float64")
    b = randn(impl, rng, (2,), "float64")
    out, wcache = generic("conv2d_forward", x, Wt, b, 1, 1)
    dout = randn(impl, rng, tuple(out.shape), "float64")
    for g, w in zip(impl.ops.conv2d_backward(dout, wcache), generic("conv2d_backward", dout, wcache)):
        check(impl, g, w, "generic cache", seed, exact=True, dtype="float64")
    # a cache of another op is refused, not misread
    _, pool_cache = impl.ops.avg_pool2d_forward(x, 2, 2, 2, 0)
    with pytest.raises(TypeError, match="max_pool2d_backward: expected the cache of max_pool2d_forward"):
        impl.ops.max_pool2d_backward(dout, pool_cache)
    _, conv_cache = impl.ops.conv2d_forward(x, Wt, b, 1, 1)
    with pytest.raises(TypeError, match="conv2d_relu_max_pool2d_backward: expected the cache of conv2d_relu_max_pool2d_forward"):
        impl.ops.conv2d_relu_max_pool2d_backward(dout, conv_cache)


def test_errors_name_the_op_and_the_shapes(impl):
    x = impl.asarray(np.zeros((1, 1, 4, 4), dtype="float32"))
    with pytest.raises(ValueError, match=r"im2col: filter larger than the padded input"):
        impl.ops.im2col(x, 7, 3, 1, 1)
    with pytest.raises(ValueError, match=r"Pooling: filter larger"):
        impl.ops.max_pool2d_forward(x, 5, 5, 1, 0)
    out, cache = impl.ops.conv2d_forward(x, impl.asarray(np.ones((2, 1, 3, 3), "float32")), impl.asarray(np.zeros(2, "float32")))
    with pytest.raises(ValueError, match=r"Convolution backward: expected dout of shape \(1, 2, 2, 2\), got \(1, 2, 3, 2\)"):
        impl.ops.conv2d_backward(impl.asarray(np.zeros((1, 2, 3, 2), "float32")), cache)
    with pytest.raises(ValueError, match=r"col2im: expected col of shape"):
        impl.ops.col2im(impl.asarray(np.zeros((3, 9), "float32")), (1, 1, 4, 4), 3, 3, 1, 1)


# ====================================================================== host-only checks


@needs_cxx
def test_each_op_is_one_kernel_launch():
    impl = _host_impl()
    launches = cuda_host.HostModule.launches
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 8)).astype("float32")

    def count(fn, *args):
        before = len(launches)
        result = fn(*args)
        return [name for name, _, _ in launches[before:]], result

    names, col = count(impl.ops.im2col, x, 5, 4, 1, 2)
    assert names == ["xpc_im2col_f32"]
    names, _ = count(impl.ops.col2im, col, x.shape, 5, 4, 1, 2)
    assert names == ["xpc_col2im_f32"]
    names, (out, cache) = count(impl.ops.max_pool2d_forward, x, 3, 3, 2, 1)
    assert names == ["xpc_max_pool_fwd_f32"]
    names, _ = count(impl.ops.max_pool2d_backward, np.ones_like(out), cache)
    assert names == ["xpc_max_pool_bwd_f32"]
    names, (out, cache) = count(impl.ops.avg_pool2d_forward, x.astype("float64"), 3, 3, 2, 1)
    assert names == ["xpc_avg_pool_fwd_f64"]
    names, _ = count(impl.ops.avg_pool2d_backward, np.ones_like(out), cache)
    assert names == ["xpc_avg_pool_bwd_f64"]
    Wt, b = np.ones((4, 3, 3, 3), "float32"), np.zeros(4, "float32")
    names, (out, cache) = count(impl.ops.conv2d_forward, x, Wt, b, 1, 1)
    assert names == ["xpc_im2col_f32", "xpc_bias_nhwc_to_nchw_f32"]
    names, _ = count(impl.ops.conv2d_backward, np.ones_like(out), cache)
    assert names == ["xpc_nchw_to_nhwc_f32", "xpc_im2col_f32", "xpc_col2im_f32"]  # col rebuilt from x, not held
    names, _ = count(functools.partial(impl.ops.conv2d_backward, need_dx=False), np.ones_like(out), cache)
    assert names == ["xpc_nchw_to_nhwc_f32", "xpc_im2col_f32"]
    names, (out, cache) = count(impl.ops.conv2d_relu_max_pool2d_forward, x, Wt, b, 1, 1, 2, 2, 2)
    assert names == ["xpc_im2col_f32", "xpc_bias_relu_maxpool_f32"]
    names, _ = count(impl.ops.conv2d_relu_max_pool2d_backward, np.ones_like(out), cache)
    assert names == ["xpc_maxpool_bwd_nhwc_f32", "xpc_im2col_f32", "xpc_col2im_f32"]


@needs_cxx
def test_stand_in_arrays_start_poisoned_so_unwritten_elements_fail_the_comparisons():
    impl = _host_impl()
    assert np.isnan(impl.module.cupy.empty((2, 3), dtype=np.float32)).all()
    assert (impl.module.cupy.empty((4,), dtype=np.int32) == cuda_host.POISON["i"]).all()
    # a launch that covers only part of its output leaves the rest poisoned
    x = np.ones((1, 1, 4, 4), "float32")
    out = impl.module.cupy.empty((1, 1, 2, 2), dtype=np.float32)
    k = impl.module.cuda_source.function("pool", "xpc_avg_pool_fwd_f32")
    k((1,), (256,), (x, out, *(np.int32(v) for v in (3, 4, 4, 2, 2, 2, 2, 0, 0, 2, 2))))
    np.testing.assert_array_equal(out.ravel(), [1.0, 1.0, 1.0, np.nan])


@needs_cxx
def test_launch_arguments_are_checked_like_a_gpu_would_need():
    # the stand-in refuses what would silently break on a GPU
    impl = _host_impl()
    k = impl.module.cuda_source.function("conv", "xpc_col2im_f32")
    col, x = np.zeros((4, 9), "float32"), np.zeros((1, 1, 4, 4), "float32")
    ints = [np.int32(v) for v in (16, 1, 4, 4, 3, 3, 1, 1, 0, 0, 2, 2)]
    with pytest.raises(TypeError, match="int32"):
        k((1,), (256,), (col, x, 16, *ints[1:]))  # a Python int would reach the GPU as int64
    with pytest.raises(TypeError, match="float32 array"):
        k((1,), (256,), (col.astype("float64"), x, *ints))
    with pytest.raises(ValueError, match="C-contiguous"):
        k((1,), (256,), (np.zeros((9, 4), "float32").T, x, *ints))
    with pytest.raises(TypeError, match="takes 14 arguments"):
        k((1,), (256,), (col, x, *ints[:-1]))


# ====================================================================== whole model


def _train_losses(net, x, t, steps=10):
    from xpconv.optim import Adam

    opt = Adam(lr=0.001)
    losses = []
    for _ in range(steps):
        grads = net.gradient(x, t)
        opt.update(net.params, grads)
        losses.append(float(net.loss(x, t)))
    return losses


@needs_cxx
def test_simple_convnet_trains_the_same_through_host_built_kernels(monkeypatch):
    """SimpleConvNet on NumPy with every conv/pool op routed to the host-built cupy_ops."""
    from xpconv.models import SimpleConvNet

    impl = _host_impl()
    rng = np.random.default_rng(1)
    x = rng.random((6, 1, 12, 12)).astype("float32")
    t = rng.integers(0, 10, 6)
    ref = SimpleConvNet(input_dim=(1, 12, 12), seed=3)
    for layer in ref.layers:
        if hasattr(layer, "impl"):
            layer.impl = ops.GENERIC
    want = _train_losses(ref, x, t)
    kernels.find("numpy", "conv2d")  # the NumPy kernels are registered; the host-built ones replace them here
    for op, kernel in impl.ops.kernels.items():
        monkeypatch.setitem(kernels.REGISTRY, ("numpy", op), kernel)
    launches = len(cuda_host.HostModule.launches)
    got = _train_losses(SimpleConvNet(input_dim=(1, 12, 12), seed=3), x, t)
    assert len(cuda_host.HostModule.launches) > launches
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("model", ["SimpleConvNet", "DeepConvNet"])
def test_model_trains_the_same_on_cupy_and_numpy(model):
    """10 Adam steps from one seed: CuPy (fast kernels) and NumPy losses within 1e-5
    (SimpleConvNet) / 1e-4 (DeepConvNet, float32 through six convolutions)."""
    from xpconv import models

    rng = np.random.default_rng(2)
    x = rng.random((20, 1, 28, 28)).astype("float32")
    t = rng.integers(0, 10, 20)
    cls = getattr(models, model)
    kwargs = {"dropout_ratio": 0.0} if model == "DeepConvNet" else {}
    want = _train_losses(cls(seed=5, xp="numpy", **kwargs), x, t)
    ns = backend.get_namespace("cupy")
    assert kernels.find("cupy", "conv2d") is not None
    got = _train_losses(cls(seed=5, xp=ns, **kwargs), x, t)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 if model == "SimpleConvNet" else 1e-4)


@pytest.mark.gpu
@needs_cuda
def test_ops_dispatch_cupy_arrays_to_the_kernels():
    from xpconv.kernels import cupy_ops

    x = cupy_ops.cupy.zeros((1, 1, 4, 4), dtype="float32")
    for op, cls in _kernel_classes(cupy_ops).items():
        assert type(kernels.find("cupy", op)) is cls
    assert ops.max_pool2d_forward(x, 2, 2, 2)[1].kernel is kernels.find("cupy", "max_pool2d")
