"""The CUDA sources of xpconv's CuPy kernels, and the compiled modules built from them.

Kernels live in real ``.cu`` files beside this module (``conv.cu``, ``pool.cu``, ``step.cu``),
shipped as package data, with the helpers they share in ``common.cu``, which
:func:`read_source` puts in front of each (followed by a ``#line`` directive, so
compiler messages name the source's own lines).  ``function(source, name)`` compiles a source once with
NVRTC through ``cupy.RawModule`` (on first use; CuPy caches the binary per device
and on disk) and returns the kernel ``name`` from it.  Nothing here runs on
import, and CuPy is imported only when a kernel is first asked for.
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["COMMON", "SOURCES", "function", "module", "read_source", "source_path"]

#: the kernel sources of this package, by short name
SOURCES = ("conv", "pool", "step")

#: the helpers every source is compiled with (no kernels of its own)
COMMON = "common"

#: NVRTC options: the C++ standard the sources are written (and CI-compiled) for
OPTIONS = ("-std=c++14",)


def source_path(name: str):
    """A Traversable of ``<name>.cu`` inside the package (a source or :data:`COMMON`)."""
    if name not in SOURCES and name != COMMON:
        raise ValueError(f"unknown CUDA source {name!r}; expected one of {', '.join(SOURCES)}")
    return resources.files(__package__).joinpath(f"{name}.cu")


def read_source(name: str) -> str:
    """What is compiled for source ``name``: ``common.cu``, then ``<name>.cu``."""
    if name not in SOURCES:
        raise ValueError(f"unknown CUDA source {name!r}; expected one of {', '.join(SOURCES)}")
    common = source_path(COMMON).read_text(encoding="utf-8")
    own = source_path(name).read_text(encoding="utf-8")
    return f'{common}\n#line 1 "{name}.cu"\n{own}'


@functools.cache
def module(name: str):
    """``cupy.RawModule`` of ``<name>.cu`` (compiled lazily by CuPy on first use)."""
    import cupy

    return cupy.RawModule(code=read_source(name), options=OPTIONS)


@functools.cache
def function(source: str, name: str):
    """The kernel ``name`` (an ``extern "C"`` entry point) of ``<source>.cu``, as a
    ``cupy.RawKernel``: call it as ``kernel((blocks,), (threads,), args)``."""
    return module(source).get_function(name)
