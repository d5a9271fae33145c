"""Preflight of a GPU run: can this machine run xpconv's CuPy path at all?

Prints the NVRTC version, the CUDA header folder CuPy compiles with and the installed
``nvidia-*`` wheels, then runs xpconv's own CUDA probe (``xpconv.backend.cuda_status``:
an elementwise kernel, a cuBLAS product, NVRTC compiles of xpconv's RawModule sources,
one launch of the im2col kernel, copies back, each checked).  Exit 0 when all of it
works; else exit 3 after one line ``PREFLIGHT FAILED: CUDA not usable: <reason>``.
``--dry-run`` prints what it can and skips the device checks (the CPU test of run.sh).
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def nvidia_packages() -> list[str]:
    return sorted(f"{d.metadata['Name']} {d.version}" for d in importlib.metadata.distributions()
                  if (d.metadata["Name"] or "").lower().startswith("nvidia-"))


def header_folders(cupy) -> list[str]:
    """Folders holding cuda_runtime.h / cuda_fp16.h that CuPy may pass to NVRTC (-I)."""
    found = []
    try:
        path = cupy.cuda.get_cuda_path()
        if path and os.path.isdir(os.path.join(path, "include")):
            found.append(os.path.join(path, "include"))
    except Exception:  # noqa: BLE001 - a report, not a check
        pass
    for entry in sys.path:
        found += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "include")))
    return [f for f in dict.fromkeys(found) if glob.glob(os.path.join(f, "cuda_*.h"))]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    dry = "--dry-run" in argv
    print("nvidia-* packages: " + (", ".join(nvidia_packages()) or "none"))
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001
        cupy = None
        print(f"cupy: cannot be imported ({type(exc).__name__}: {exc})")
    if cupy is not None:
        try:
            print("NVRTC: {}.{}".format(*cupy.cuda.nvrtc.getVersion()))
        except Exception as exc:  # noqa: BLE001
            print(f"NVRTC: not found ({type(exc).__name__}: {exc})")
        print("CUDA header folders: " + (", ".join(header_folders(cupy)) or "none found"))
        print(f"CUPY_CACHE_DIR: {os.environ.get('CUPY_CACHE_DIR', '(unset: ~/.cupy/kernel_cache)')}")
    if dry:
        print("preflight: --dry-run, device checks skipped")
        return 0
    from xpconv import backend

    ok, why = backend.cuda_status()
    if not ok:
        print(f"PREFLIGHT FAILED: CUDA not usable: {why}")
        return 3
    print(f"preflight: ok ({why}: elementwise kernel, cuBLAS product, xpconv's RawModule compiled and launched, copies back)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
