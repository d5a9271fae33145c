"""Every CUDA source compiles with NVRTC, the compiler CuPy uses, with CuPy's own options.

No GPU is needed: NVRTC is a library (the ``nvidia-cuda-nvrtc-cu12`` wheel of the test
extra, ~90 MB, or a CUDA toolkit's ``libnvrtc``), called here through ctypes, so a
source that nvcc accepts but NVRTC rejects fails CI, not the first GPU run.

The options are the ones a ``cupy.RawModule(code, options=cuda_source.OPTIONS)``
compile gets in CuPy 13/14 (``cupy/cuda/compiler.py``, ``_compile_with_cache_cuda`` and
``compile_using_nvrtc``): the module's own options, CuPy's include folders (left out: the
sources include nothing, tests/test_cupy_kernels.py checks that), ``-ftz=true``, and the
architecture: ``-arch=sm_XX`` (a cubin) when NVRTC knows the device, ``-arch=compute_XX``
(PTX) otherwise or with CUPY_CUDA_COMPILE_WITH_PTX=1.  Both forms are compiled for sm_80
(A100) and sm_90 (H100/H200).  A warning fails the check as an error does.

Without NVRTC these tests skip, except under CI (CI=true), where the test extra installs it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import re
import sys

import pytest

from xpconv.kernels import cuda_source

ARCHES = ("80", "90")
#: what CuPy appends to a RawModule's options (besides its -I folders), then the architecture
CUPY_OPTIONS = ("-ftz=true",)


def _candidates() -> list[str]:
    found = []
    for entry in sys.path:  # the nvidia-cuda-nvrtc-cu1x wheels: site-packages/nvidia/cuda_nvrtc/lib
        for lib in ("cuda_nvrtc/lib", "cu13/lib"):
            found += sorted(glob.glob(os.path.join(entry, "nvidia", lib, "libnvrtc.so.1[0-9]")))
    cuda = os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    found += sorted(glob.glob(os.path.join(cuda, "lib64", "libnvrtc.so*")))
    name = ctypes.util.find_library("nvrtc")
    if name:
        found.append(name)
    return found


def _load():
    errors = []
    for path in _candidates():
        try:
            return ctypes.CDLL(path), path
        except OSError as exc:
            errors.append(f"{path}: {exc}")
    return None, "; ".join(errors) or "no libnvrtc found (pip install nvidia-cuda-nvrtc-cu12)"


LIB, WHERE = _load()
if LIB is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"NVRTC is required in CI (pip install '.[test]'): {WHERE}")
    pytest.skip(f"NVRTC is not installed: {WHERE}", allow_module_level=True)

_prog_t = ctypes.c_void_p
LIB.nvrtcGetErrorString.restype = ctypes.c_char_p


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what}: {LIB.nvrtcGetErrorString(code).decode()}")


def nvrtc_version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(LIB.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def compile_source(text: str, options: tuple[str, ...], name: str = "kern.cu") -> tuple[bool, str, bytes]:
    """(accepted, log, cubin or PTX bytes) of one NVRTC compile."""
    prog = _prog_t()
    _check(LIB.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), name.encode(), 0, None, None), "nvrtcCreateProgram")
    try:
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        code = LIB.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        _check(LIB.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
        log = ctypes.create_string_buffer(size.value)
        _check(LIB.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        if code != 0:
            return False, log.value.decode(errors="replace"), b""
        kind = "CUBIN" if any(o.startswith("-arch=sm_") for o in options) else "PTX"
        _check(getattr(LIB, f"nvrtcGet{kind}Size")(prog, ctypes.byref(size)), f"nvrtcGet{kind}Size")
        out = ctypes.create_string_buffer(size.value)
        _check(getattr(LIB, f"nvrtcGet{kind}")(prog, out), f"nvrtcGet{kind}")
        return True, log.value.decode(errors="replace"), out.raw
    finally:
        LIB.nvrtcDestroyProgram(ctypes.byref(prog))


def cupy_options(arch: str) -> tuple[str, ...]:
    """A RawModule's options as CuPy hands them to NVRTC (its -I folders aside)."""
    return (*cuda_source.OPTIONS, *CUPY_OPTIONS, f"-arch={arch}")


def entry_points(text: str) -> set[str]:
    """The extern "C" kernels a source declares, its f32/f64 macros expanded."""
    plain = set(re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(', text))
    per_type = set(re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)_##SUFFIX\s*\(', text))
    suffixes = set(re.findall(r"^\s*XPC_\w+_ENTRY_POINTS\((\w+),", text, re.MULTILINE))
    return plain | {f"{k}_{s}" for k in per_type for s in suffixes}


def _arch_ids():
    return [f"{kind}_{a}" for a in ARCHES for kind in ("sm", "compute")]


def test_nvrtc_is_found_and_reports_its_version():
    major, minor = nvrtc_version()
    print(f"NVRTC {major}.{minor} from {WHERE}")
    assert major >= 12, f"NVRTC {major}.{minor}: CuPy 13/14 wheels need CUDA 12 or newer"


@pytest.mark.parametrize("arch", _arch_ids())
@pytest.mark.parametrize("source", cuda_source.SOURCES)
def test_every_source_compiles_with_cupys_options(source, arch):
    text = cuda_source.read_source(source)
    ok, log, binary = compile_source(text, cupy_options(arch), f"{source}.cu")
    assert ok, f"NVRTC rejected {source}.cu with {' '.join(cupy_options(arch))}:\n{log}"
    assert "warning" not in log.lower(), f"NVRTC warns on {source}.cu with {' '.join(cupy_options(arch))}:\n{log}"
    kernels = entry_points(text)
    assert kernels, f"found no kernels in {source}.cu"
    missing = sorted(k for k in kernels if k.encode() not in binary)
    assert not missing, f"{source}.cu compiled for {arch} lacks {missing}"
    if arch.startswith("compute_"):
        assert re.search(rf"^\.target\s+sm_{arch[-2:]}\b", binary.decode(), re.MULTILINE)


@pytest.mark.parametrize(
    "planted, message",
    [
        ("{ x[0] = undeclared_name; }", "undeclared_name"),
        ("{ double d = 1.0; float* p = &d; x[0] = *p; }", "double *"),  # C++ that C compilers let pass
    ],
    ids=["undeclared", "type-error"],
)
def test_the_check_fails_on_a_source_nvrtc_rejects(planted, message):
    # the same compile as above, on conv.cu with one bad kernel appended: it must fail
    bad = cuda_source.read_source("conv") + f'\nextern "C" __global__ void xpc_broken_f32(float* x) {planted}\n'
    ok, log, _ = compile_source(bad, cupy_options("sm_90"), "broken.cu")
    assert not ok, "NVRTC accepted a broken source: the check above could never fail"
    assert message in log and "broken.cu" in log, log


def test_a_warning_is_caught_by_the_check():
    # a warning NVRTC prints (a variable set but never used) is seen by the 'warning' test above
    text = cuda_source.read_source("conv") + '\nextern "C" __global__ void xpc_warn_f32(float* x) { int unused_local = 3; x[0] = 1.0f; }\n'
    ok, log, _ = compile_source(text, cupy_options("sm_80"), "warn.cu")
    assert ok and "warning" in log.lower() and "unused_local" in log, log


def test_entry_point_reader_expands_the_type_macros():
    assert {"xpc_im2col_f32", "xpc_im2col_f64", "xpc_max_pool_fwd_f32"} <= entry_points(
        cuda_source.read_source("conv") + cuda_source.read_source("pool")
    )
