"""Backend-specific fast paths with the generic ops' names and signatures.

``lookup(namespace_name, op)`` returns the fast version of ``xpconv.ops.<op>`` for
one array library, or None.  A backend's kernels live in ``<name>_ops.py`` here
(``numpy_ops.py``, ``cupy_ops.py``) and define any subset of the op names; each one
is tested equal to the generic implementation.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

_MODULES = {"numpy": "numpy_ops", "cupy": "cupy_ops"}


@functools.lru_cache(maxsize=None)
def _module(namespace_name: str):
    mod = _MODULES.get(namespace_name)
    if mod is None:
        return None
    full = f"{__name__}.{mod}"
    if importlib.util.find_spec(full) is None:
        return None
    return importlib.import_module(full)


def lookup(namespace_name: str, op: str):
    mod = _module(namespace_name)
    return None if mod is None else getattr(mod, op, None)
