"""Window geometry of convolution and pooling: the one leaf that both
:mod:`xpconv.ops` and the kernels in :mod:`xpconv.kernels` take their shapes from.

Vocabulary: N batch, C channels, H/W height/width, FN/FH/FW filters (a pool's
window is its FH x FW), SH/SW stride, PH/PW pad, OH/OW output, with
``OH = (H + 2*PH - FH)//SH + 1``.  A pooled output after a convolution is
POH/POW.  Nothing here touches an array; it imports nothing from xpconv.
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

__all__ = ["Window", "conv_output_size", "pair", "window"]


def _whole(v: Any, what: str, value: Any) -> int:
    """v as an int: ints (NumPy's too) and whole floats such as 2.0 pass; 1.5, True, "2" do not."""
    if isinstance(v, float) or (hasattr(v, "is_integer") and not hasattr(v, "__index__")):
        if math.isfinite(v) and float(v).is_integer():
            return int(v)
        raise ValueError(f"{what} must be a whole number, got {value!r} (not truncated)")
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{what} must be an int or an (h, w) pair of ints, got {value!r}")
    return operator.index(v)


def pair(value: Any, what: str = "value") -> tuple[int, int]:
    """An int or an (h, w) pair as a pair of non-negative ints; a fractional value such as
    1.5 is refused rather than truncated."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{what} must be an int or an (h, w) pair, got {value!r}")
        h, w = value
    else:
        h = w = value
    h, w = _whole(h, what, value), _whole(w, what, value)
    if h < 0 or w < 0:
        raise ValueError(f"{what} must be non-negative, got {value!r}")
    return h, w


def conv_output_size(H: int, W: int, FH: int, FW: int, stride: Any, pad: Any, where: str = "im2col") -> tuple[int, int]:
    """(OH, OW); raises ValueError quoting the numbers when either is < 1."""
    SH, SW = pair(stride, "stride")
    PH, PW = pair(pad, "pad")
    if SH < 1 or SW < 1:
        raise ValueError(f"{where}: stride must be >= 1, got {(SH, SW)}")
    if FH < 1 or FW < 1:
        raise ValueError(f"{where}: filter size must be >= 1, got FH={FH}, FW={FW}")
    OH = (H + 2 * PH - FH) // SH + 1
    OW = (W + 2 * PW - FW) // SW + 1
    if OH < 1 or OW < 1:
        raise ValueError(
            f"{where}: filter larger than the padded input: "
            f"OH = (H + 2*PH - FH)//SH + 1 = ({H} + 2*{PH} - {FH})//{SH} + 1 = {OH}, "
            f"OW = (W + 2*PW - FW)//SW + 1 = ({W} + 2*{PW} - {FW})//{SW} + 1 = {OW}; both must be >= 1"
        )
    return OH, OW


class Window(NamedTuple):
    """One sliding window over an H x W image: stride, pad and output size."""

    SH: int
    SW: int
    PH: int
    PW: int
    OH: int
    OW: int


def window(H: int, W: int, FH: int, FW: int, stride: Any, pad: Any, where: str) -> Window:
    """The validated :class:`Window` of an FH x FW filter (or pool) over H x W."""
    SH, SW = pair(stride, "stride")
    PH, PW = pair(pad, "pad")
    OH, OW = conv_output_size(H, W, FH, FW, (SH, SW), (PH, PW), where=where)
    return Window(SH, SW, PH, PW, OH, OW)
