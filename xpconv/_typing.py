"""Names for the types xpconv passes around: ``Array`` and the ``Layer`` protocol.

``Array`` is any Array-API array (NumPy, CuPy, torch, jax, array-api-strict); the
standard has no common base class, so it is an alias of ``Any`` that documents
intent in signatures.  ``Layer`` is what :class:`xpconv.models.Sequential` runs.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["Array", "Layer", "Namespace"]

#: an array of any Array-API library
Array = Any

#: an Array-API namespace module (``numpy``, ``cupy``, ``array_api_strict``, ...)
Namespace = Any


@runtime_checkable
class Layer(Protocol):
    """A step of a network: ``forward`` keeps what ``backward`` needs.

    ``train_flg`` is False for inference (Dropout scales, BatchNormalization uses
    its running statistics, a fused block keeps nothing); layers that do not care
    ignore it.  ``param_names()`` lists the attributes holding trainable arrays
    (gradients on ``d<name>``), in the book's order; ``describe()`` is its one-line
    summary.  ``can_skip_dx``: ``backward(dout, need_dx=False)`` skips dL/dx.
    :class:`xpconv.layers.LayerBase` gives the defaults."""

    can_skip_dx: bool

    def forward(self, x: Array, train_flg: bool = True) -> Array: ...

    def backward(self, dout: Array) -> Array: ...

    def param_names(self) -> tuple[str, ...]: ...

    def describe(self) -> str: ...
