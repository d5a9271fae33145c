"""``xpconv info``: what this machine offers xpconv, and why a GPU is or is not used.

Prints the versions of xpconv, Python and the array libraries, which array namespaces are
usable, each CUDA device (name, memory, compute capability, driver and runtime versions) or
the exact reason none is usable, the BLAS behind NumPy with its thread count, and what
``--device auto`` picks.  ``--json`` prints the same as one JSON object.  The exit code is 0
whether or not a GPU is usable: this is a report, not a check.

    xpconv info            # or: python -m xpconv.info
    xpconv info --json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
import warnings
from typing import Any

from . import backend
from ._version import __version__

#: array namespaces xpconv runs on, in the order they are reported
NAMESPACES = ("numpy", "array_api_strict", "torch", "cupy")

#: distributions whose versions are reported (None when not installed)
PACKAGES = ("numpy", "array-api-compat", "array-api-strict", "cupy", "torch", "threadpoolctl")


def _package_version(name: str) -> str | None:
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


def _cupy_distributions() -> list[str]:
    """Installed CuPy wheels ("cupy-cuda13x 14.0.1"); two of them at once break each other."""
    found = set()
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == "cupy" or name.startswith("cupy-cuda") or name.startswith("cupy-rocm"):
            found.add(f"{name} {dist.version}")
    return sorted(found)


def _namespaces() -> dict[str, dict[str, Any]]:
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


def _cuda() -> dict[str, Any]:
    usable, reason = backend.cuda_status()
    info: dict[str, Any] = {
        "usable": usable,
        "reason": reason,
        "cupy_packages": _cupy_distributions(),
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


def _blas() -> dict[str, Any]:
    """The BLAS (and OpenMP) libraries loaded in this process, with their thread counts."""
    import numpy  # noqa: F401  (loads NumPy's BLAS so that threadpoolctl sees it)

    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {"libraries": [], "reason": "threadpoolctl is not installed: pip install threadpoolctl"}
    keys = ("internal_api", "version", "threading_layer", "num_threads", "filepath")
    libs = [{k: lib.get(k) for k in keys} for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return {"libraries": libs, "reason": None if libs else "no BLAS library found loaded by NumPy"}


def _auto_device() -> dict[str, str]:
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
        "blas": _blas,
        "packages": lambda: {name: _package_version(name) for name in PACKAGES},
        "namespaces": _namespaces,
        "cuda": _cuda,
        "auto_device": _auto_device,
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
    lines = [f"xpconv {r['xpconv']}", f"Python {py['version']} ({py['implementation']}) on {r['platform']}", ""]

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

    a = r["auto_device"]
    lines.append("")
    if "error" in a:
        lines.append(f"--device auto: could not be resolved: {a['error']}")
    else:
        lines.append(f"--device auto picks: {a['device']} ({a['namespace']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``xpconv info [--json]``; always returns 0."""
    parser = argparse.ArgumentParser(
        prog="xpconv info",
        description="Report versions, usable array namespaces, CUDA devices (or why none is usable), "
        "NumPy's BLAS and what --device auto picks.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
