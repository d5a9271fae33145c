"""The machine a benchmark ran on, its peak-memory probe and its thread settings.

:func:`report` records the machine in the result JSON from the pieces of
:mod:`xpconv.info` (the one machine probe: CPU, BLAS and its threads, thread variables,
CUDA devices), adding what only a benchmark needs: the load average and torch's thread
count.  :class:`HostMemory` measures a call's peak resident-set growth (Linux);
:func:`thread_limit` pins NumPy's BLAS and torch's intra-op threads for a run.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import os
import platform
from collections.abc import Callable
from typing import Any

from xpconv import info

__all__ = ["HostMemory", "report", "thread_limit"]

#: the keys of each BLAS library that the result JSON records
BLAS_KEYS = ("internal_api", "version", "num_threads", "threading_layer", "architecture")


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_LIBC: Any = None


def _malloc_trim() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


class HostMemory:
    """Peak resident-set growth of one call (Linux), in bytes; None elsewhere."""

    def __init__(self):
        self.works = self._reset() is not None

    @staticmethod
    def _reset() -> int | None:
        gc.collect()
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current VmRSS
        except OSError:
            return None
        return _proc_status_kib("VmRSS")

    def peak(self, fn: Callable[[], Any]) -> int | None:
        if not self.works:
            fn()
            return None
        base = self._reset()
        fn()
        hwm = _proc_status_kib("VmHWM")
        if base is None or hwm is None:
            return None
        return max(0, hwm - base) * 1024


def report(device: str, threads: int | None) -> dict:
    """The machine section of a result: platform, CPU, library versions, BLAS threads,
    thread variables, the load average at the start and, with ``device="cuda"``, the GPU."""
    import numpy as np

    out: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": info.cpu_model(),
        "cores": os.cpu_count(),
        "numpy": np.__version__,
        "threads_requested": threads,
        "env": info.thread_env(),  # thread and kernel settings that change the numbers
    }
    try:
        out["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    blas = info.blas()
    out["blas"] = [{k: lib.get(k) for k in BLAS_KEYS} for lib in blas.get("libraries", [])]
    if importlib.util.find_spec("torch") is not None:
        import torch

        out["torch"] = torch.__version__
        out["torch_threads"] = torch.get_num_threads()
        if device == "cuda" and torch.cuda.is_available():
            out["torch_cuda_device"] = torch.cuda.get_device_name()
            out["torch_tf32"] = "off (cudnn.allow_tf32 = cuda.matmul.allow_tf32 = False)"
    if device == "cuda" and importlib.util.find_spec("cupy") is not None:
        try:
            import cupy

            out["cupy"] = cupy.__version__
            current = cupy.cuda.Device().id
            dev = [d for d in info.cuda()["devices"] if d["index"] == current]
            out["cuda_device"] = dev[0]["name"] if dev else "unavailable: no usable CUDA device"
        except Exception as exc:  # report, do not crash the benchmark
            out["cuda_device"] = f"unavailable: {exc}"
    return out


@contextlib.contextmanager
def thread_limit(n: int | None):
    """BLAS threads of NumPy (threadpoolctl), torch's intra-op threads and Numba's
    threads (the optional kernels of xpconv[numba]) set to n."""
    if n is None:
        yield
        return
    # Numba first: its OpenMP threading layer shares the process's libgomp with torch, and
    # numba.set_num_threads sets that runtime's thread count, which torch then reads
    numba = None
    if importlib.util.find_spec("numba") is not None:  # the optional compiled kernels' threads
        import numba

        old_numba = numba.get_num_threads()
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    torch = None
    if importlib.util.find_spec("torch") is not None:
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    try:
        if threadpool_limits is None:
            yield
        else:
            with threadpool_limits(limits=n, user_api="blas"):
                yield
    finally:
        if numba is not None:
            numba.set_num_threads(old_numba)
        if torch is not None:
            torch.set_num_threads(old)
