"""``xpconv info``: what this machine offers xpconv, and why a GPU is or is not used.

Prints the versions of xpconv, Python and the array libraries, which array namespaces are
usable, each CUDA device (name, memory, compute capability, driver and runtime versions) or
the exact reason none is usable, the BLAS behind NumPy with its thread count, and what
``--device auto`` picks.  ``--json`` prints the same as one JSON object.  The exit code is 0
whether or not a GPU is usable: this is a report, not a check.

    xpconv info            # or: python -m xpconv info
    xpconv info --json

The pieces of the report (:func:`cpu_model`, :func:`thread_env`, :func:`blas`, :func:`cuda`,
:func:`package_version`) are the one machine probe of the project: the benchmark harness
(``benchmarks/machine.py``) records the machine with them too.  The command line itself is
``xpconv.cli``'s ``info`` subcommand; this module only collects and formats.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import warnings
from typing import Any

from . import backend
from ._version import __version__

#: array namespaces xpconv runs on, in the order they are reported
NAMESPACES = ("numpy", "array_api_strict", "torch", "cupy")

#: distributions whose versions are reported (None when not installed)
PACKAGES = ("numpy", "array-api-compat", "array-api-strict", "cupy", "torch", "threadpoolctl", "numba")

#: environment variables that set thread counts or kernel choices (they change speed numbers)
THREAD_ENV = ("XPCONV_NUM_THREADS", "XPCONV_NUMBA", "XPCONV_NUMBA_TARGET", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "XPCONV_COL_MIB", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE")

#: what is reported of each BLAS library threadpoolctl finds
BLAS_KEYS = ("internal_api", "version", "threading_layer", "num_threads", "architecture", "filepath")


def package_version(name: str) -> str | None:
    if name == "cupy":  # distributed as cupy-cuda12x, cupy-cuda13x, cupy, ...
        try:
            import cupy
        except Exception:
            return None
        return getattr(cupy, "__version__", None)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cupy_distributions() -> list[str]:
    """Installed CuPy wheels ("cupy-cuda13x 14.0.1"); two of them at once break each other."""
    found = set()
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == "cupy" or name.startswith("cupy-cuda") or name.startswith("cupy-rocm"):
            found.add(f"{name} {dist.version}")
    return sorted(found)


def namespaces() -> dict[str, dict[str, Any]]:
    out = {}
    for name in NAMESPACES:
        try:
            if name == "cupy":
                ok, why = backend.cuda_status()
                if not ok:
                    raise backend.BackendUnavailable(why)
            backend.get_namespace(name)
        except Exception as exc:
            out[name] = {"usable": False, "reason": str(exc)}
        else:
            out[name] = {"usable": True, "reason": None}
    return out


def _nvidia_driver_release() -> str | None:
    """The kernel driver's release ("580.65.06") on Linux, without NVML."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            line = f.readline()
    except OSError:
        return None
    for word in line.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return word
    return None


def cuda() -> dict[str, Any]:
    usable, reason = backend.cuda_status()
    info: dict[str, Any] = {
        "usable": usable,
        "reason": reason,
        "cupy_packages": cupy_distributions(),
        "driver_release": _nvidia_driver_release(),
        "driver_cuda_version": None,
        "runtime_cuda_version": None,
        "devices": [],
    }
    try:
        import cupy
    except Exception:
        return info
    runtime = cupy.cuda.runtime
    try:
        driver = runtime.driverGetVersion()
        info["driver_cuda_version"] = backend._cuda_version(driver) if driver else None
        info["runtime_cuda_version"] = backend._cuda_version(runtime.runtimeGetVersion())
    except Exception:
        pass
    if not usable:
        return info
    for i in range(runtime.getDeviceCount()):
        props = runtime.getDeviceProperties(i)
        name = props["name"]
        with cupy.cuda.Device(i):
            free, total = cupy.cuda.runtime.memGetInfo()
        info["devices"].append(
            {
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "total_memory_bytes": int(total),
                "free_memory_bytes": int(free),
                "compute_capability": f"{props['major']}.{props['minor']}",
            }
        )
    return info


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere what :mod:`platform` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu() -> dict[str, Any]:
    return {"model": cpu_model(), "cores": os.cpu_count()}


def thread_env() -> dict[str, str]:
    """The :data:`THREAD_ENV` variables that are set, with their values."""
    return {k: os.environ[k] for k in THREAD_ENV if k in os.environ}


def blas() -> dict[str, Any]:
    """The BLAS (and OpenMP) libraries loaded in this process, with their thread counts."""
    import numpy  # noqa: F401  (loads NumPy's BLAS so that threadpoolctl sees it)

    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {"libraries": [], "reason": "threadpoolctl is not installed: pip install threadpoolctl"}
    libs = [{k: lib.get(k) for k in BLAS_KEYS} for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return {"libraries": libs, "reason": None if libs else "no BLAS library found loaded by NumPy"}


def cpu_kernels() -> dict[str, Any]:
    """The NumPy convolution kernels that run here: the module of each op's kernel, and for
    the compiled (Numba) ones the target they are compiled for and their register blocks, or
    why they are not used.  Loads the kernel modules (compiles nothing)."""
    from . import kernels

    conv = kernels.find("numpy", "conv2d")
    out: dict[str, Any] = {"conv2d": f"{type(conv).__module__}.{type(conv).__qualname__}" if conv is not None else None}
    if "numba_ops" in kernels.SKIPPED:
        out["numba"] = {"active": False, "reason": kernels.SKIPPED["numba_ops"]}
    elif conv is not None and type(conv).__module__.endswith("numba_ops"):
        from .kernels import numba_ops

        t = numba_ops.TARGET
        out["numba"] = {
            "active": True,
            "cpu": t["cpu"],
            "level": t["level"],
            "vector_bits": 512 if t["wide"] else None,
            "mode": t["mode"],
            "features": t["features"] or "the host's",
            "slp_vectorize": t["slp"],
            "block": {"forward_dx": f"{numba_ops.FB} channels x {numba_ops.PB} positions", "dw": f"{numba_ops.FV} filters x {numba_ops.TG} taps"},
            "kernel_sizes": list(numba_ops.KERNEL_SIZES),
        }
        gemm = numba_ops.Matmul.blas()
        out["numba"]["products"] = {"split": False, "reason": gemm} if isinstance(gemm, str) else {"split": True, "gemm": gemm[2]}
    return out


def auto_device() -> dict[str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback is reported under "cuda" already
        xp = backend.resolve_device("auto")
    name = backend.namespace_name(xp)
    return {"device": "cuda" if name == "cupy" else "cpu", "namespace": name}


def collect() -> dict[str, Any]:
    """Everything ``xpconv info`` reports, as a JSON-ready dict."""
    report: dict[str, Any] = {
        "xpconv": __version__,
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": platform.platform(),
    }
    sections = {  # BLAS first: before torch is imported, NumPy's is the only one loaded
        "blas": blas,
        "cpu": cpu,
        "thread_env": thread_env,
        "packages": lambda: {name: package_version(name) for name in PACKAGES},
        "namespaces": namespaces,
        "cuda": cuda,
        "cpu_kernels": cpu_kernels,
        "auto_device": auto_device,
    }
    for key, fn in sections.items():
        try:
            report[key] = fn()
        except Exception as exc:  # a report must not crash on the machine it diagnoses
            report[key] = {"error": f"{type(exc).__name__}: {exc}"}
    return report


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def format_report(r: dict[str, Any]) -> str:
    """The human-readable form of :func:`collect`'s report."""
    py = r["python"]
    lines = [f"xpconv {r['xpconv']}", f"Python {py['version']} ({py['implementation']}) on {r['platform']}"]
    c = r.get("cpu") or {}
    if "model" in c:
        lines.append(f"CPU: {c['model']}, {c['cores']} cores")
    lines.append("")

    lines.append("Packages:")
    for name, version in r["packages"].items():
        lines.append(f"  {name:<18}{version or 'not installed'}")

    lines += ["", "Array namespaces:"]
    for name, ns in r["namespaces"].items():
        lines.append(f"  {name:<18}{'usable' if ns.get('usable') else 'not usable: ' + str(ns.get('reason'))}")

    c = r["cuda"]
    lines += ["", "CUDA:"]
    if "error" in c:
        lines.append(f"  could not be queried: {c['error']}")
    else:
        versions = [
            f"NVIDIA driver {c['driver_release']}" if c["driver_release"] else None,
            f"driver supports CUDA {c['driver_cuda_version']}" if c["driver_cuda_version"] else None,
            f"CuPy built for CUDA {c['runtime_cuda_version']}" if c["runtime_cuda_version"] else None,
        ]
        if any(versions):
            lines.append("  " + ", ".join(v for v in versions if v))
        if c["cupy_packages"]:
            lines.append(f"  CuPy wheels: {', '.join(c['cupy_packages'])}")
        if c["usable"]:
            for d in c["devices"]:
                lines.append(
                    f"  device {d['index']}: {d['name']}, {_gib(d['total_memory_bytes'])} "
                    f"({_gib(d['free_memory_bytes'])} free), compute capability {d['compute_capability']}"
                )
        else:
            lines.append(f"  no usable CUDA device: {c['reason']}")

    b = r["blas"]
    lines += ["", "BLAS used by NumPy:"]
    if "error" in b:
        lines.append(f"  could not be queried: {b['error']}")
    for lib in b.get("libraries", []):
        layer = f", {lib['threading_layer']}" if lib.get("threading_layer") else ""
        lines.append(
            f"  {lib['internal_api']} {lib['version'] or ''}{layer}: {lib['num_threads']} threads  {lib['filepath']}"
        )
    if b.get("reason"):
        lines.append(f"  {b['reason']}")
    env = r.get("thread_env")
    if env and "error" not in env:
        lines.append("  environment: " + " ".join(f"{k}={v}" for k, v in env.items()))

    k = r.get("cpu_kernels") or {}
    lines += ["", "Convolution kernels (NumPy arrays):"]
    if "error" in k:
        lines.append(f"  could not be queried: {k['error']}")
    else:
        nb = k.get("numba") or {}
        if nb.get("active"):
            wide = (", 512-bit vectors" if nb["vector_bits"] else "") + (", SLP vectorizer" if nb.get("slp_vectorize") else "")
            sizes = " and ".join(f"{s}x{s}" for s in nb["kernel_sizes"])
            lines.append(f"  compiled (Numba) for {sizes} stride 1: target {nb['cpu']} ({nb['level']}{wide}; {nb['mode']}), "
                         f"blocks {nb['block']['forward_dx']}, dW {nb['block']['dw']}")
            lines.append("  other convolutions: NumPy (im2col + BLAS)")
            pr = nb.get("products") or {}
            if pr.get("split"):
                lines.append(f"  Affine products in a pass: one single-threaded gemm per Numba thread ({pr['gemm']})")
            elif pr:
                lines.append(f"  Affine products: NumPy (BLAS's own threads): {pr['reason']}")
        else:
            lines.append(f"  NumPy (im2col + BLAS): {nb.get('reason', 'no compiled kernels')}")
    a = r["auto_device"]
    lines.append("")
    if "error" in a:
        lines.append(f"--device auto: could not be resolved: {a['error']}")
    else:
        lines.append(f"--device auto picks: {a['device']} ({a['namespace']})")
    return "\n".join(lines)


def print_report(as_json: bool = False) -> int:
    """Print the report (text, or one JSON object); ``xpconv info [--json]``. Returns 0:
    this is a report, not a check."""
    report = collect()
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    return 0


if __name__ == "__main__":  # python -m xpconv.info [--json]: the same as python -m xpconv info
    import runpy

    sys.argv[1:1] = ["info"]
    runpy.run_module("xpconv", run_name="__main__", alter_sys=True)
