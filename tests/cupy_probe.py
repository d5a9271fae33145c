"""Run inside a real CuPy wheel's environment (no device needed) by tests/test_cupy_api.py:
prints one JSON object of facts about that CuPy's API.

    PYTHONPATH=<folder with cupy installed> python tests/cupy_probe.py ATTR...

For each dotted ATTR (``cupy.cuda.runtime.memGetInfo``): whether it resolves (importing
submodules as needed) and, when it is callable, its signature or the first line of its
docstring (Cython functions carry their signature there).  Then the facts that need the
library itself: the text of ``cupy.cuda.nccl``'s compiled module (readable without
libnccl, which the module needs to import), ``MemoryHook``'s hook signatures,
``RawModule``'s and ``RawKernel.__call__``'s parameters, and what CuPy says about a
missing NCCL library (``cupy.cuda.nccl.available``).
"""

from __future__ import annotations

import glob
import importlib
import inspect
import json
import os
import pathlib
import re
import sys
import warnings


def resolve(dotted: str):
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, name in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def describe(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        doc = (getattr(obj, "__doc__", None) or "").strip()
        return doc.splitlines()[0] if doc else ""


def nccl_texts(cupy) -> dict:
    """The docstrings compiled into cupy_backends/cuda/libs/nccl*.so (Cython embeds each
    function's signature as its docstring's first line)."""
    root = os.path.dirname(os.path.dirname(cupy.__file__))
    found = glob.glob(os.path.join(root, "cupy_backends", "cuda", "libs", "nccl*.so"))
    if not found:
        return {"error": "no compiled nccl module in the wheel"}
    data = pathlib.Path(found[0]).read_bytes()
    text = data.decode("latin-1")
    comm = re.search(r"NcclCommunicator\(int ndev, [a-z]+ commId, int rank[^)]*\)", text)
    uid = re.search(r"get_unique_id\(\)\n*([^\n\x00]*)", text)
    return {"communicator": comm[0] if comm else "", "get_unique_id_doc": uid[1].strip() if uid else ""}


def main(attrs: list[str]) -> dict:
    warnings.simplefilter("ignore")  # CuPy warns that it found no NCCL library
    import cupy
    from cupy.cuda import memory_hook, nccl

    facts: dict = {"version": cupy.__version__, "attrs": {}}
    for dotted in attrs:
        try:
            obj = resolve(dotted)
        except Exception as exc:  # AttributeError, ImportError: the fact is that it is missing
            facts["attrs"][dotted] = {"ok": False, "why": f"{type(exc).__name__}: {exc}"}
            continue
        facts["attrs"][dotted] = {"ok": True, "callable": callable(obj), "describe": describe(obj) if callable(obj) else ""}
    facts["nccl_available"] = bool(getattr(nccl, "available", True))
    facts["nccl_attrs_without_lib"] = sorted(n for n in dir(nccl) if not n.startswith("_"))
    facts["nccl"] = nccl_texts(cupy)
    hook = memory_hook.MemoryHook
    facts["memory_hook"] = {name: list(inspect.signature(getattr(hook, name)).parameters) for name in
                            ("malloc_postprocess", "free_postprocess", "__enter__", "__exit__")}
    facts["raw_module"] = describe(cupy.RawModule)
    facts["raw_module_doc"] = (cupy.RawModule.__doc__ or "")[:3000]
    facts["raw_kernel_call_doc"] = (cupy.RawKernel.__call__.__doc__ or "")[:1500]
    facts["memory_pool_methods"] = sorted(n for n in dir(cupy.cuda.MemoryPool) if not n.startswith("_"))
    return facts


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
