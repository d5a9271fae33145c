"""Data augmentation on the data's own namespace: random translation by padding and cropping.

    >>> dy, dx = translation_offsets(Generator(0), n=len(x), max_shift=2)
    >>> x_aug = translate(x, dy, dx, max_shift=2)

:func:`translate` moves each image of a batch (N, C, H, W) by its own whole number of
pixels, ``out[n, c, h, w] = x[n, c, h + dy[n], w + dx[n]]`` with zeros where that falls
outside the image: the batch is padded by ``max_shift`` zeros on every side and each
sample's H x W window is cut from it.  The cut is made with slicing and ``where`` alone
(2 * (2k + 1) selections over the batch), so it runs on every Array-API namespace --
immutable ones such as JAX too -- and on the device the batch lives on, and it gives
the same values everywhere: it only moves numbers, it computes none.

The offsets are host integers.  The trainer draws them per global step from the run's
seed (:func:`xpconv.training.schedule.translation_offsets_of_step`) for the whole
global batch and each rank keeps its rows, so one process and K ranks translate
every sample alike.
"""

from __future__ import annotations

from typing import Any

from .backend import Generator, asarray_in, device_of, namespace_of
from .ops import _check_4d, _pad

__all__ = ["default_max_shift", "random_translate", "translate", "translation_offsets"]


def default_max_shift(height: int, width: int) -> int:
    """The default largest shift for images of ``height`` x ``width``: one pixel per 14 of
    the shorter side, at least one (2 for 28x28 MNIST, 1 for 8x8 digits)."""
    return max(1, min(int(height), int(width)) // 14)


def _check_shift(max_shift: Any, where: str) -> int:
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"{where}: max_shift must be an integer >= 0, got {max_shift!r}")
    return int(max_shift)


def translation_offsets(rng: Generator, n: int, max_shift: int):
    """Host integer arrays (dy, dx) of ``n`` offsets each, uniform in [-max_shift, max_shift]."""
    k = _check_shift(max_shift, "translation_offsets")
    both = Generator(rng).integers(-k, k + 1, size=(2, int(n)))
    return both[0], both[1]


def _select(xp, parts: list, sel):
    """``parts[s]`` where ``sel == s`` (sel broadcast over the sample axis)."""
    out = parts[0]
    for s in range(1, len(parts)):
        out = xp.where(sel == s, parts[s], out)
    return out


def translate(x, dy, dx, max_shift: int):
    """``x`` (N, C, H, W) with sample n moved by (dy[n], dx[n]) pixels (each in
    [-max_shift, max_shift]): ``out[n, c, h, w] = x[n, c, h + dy[n], w + dx[n]]``, zero
    outside the image.  ``dy`` and ``dx``: N integers (host arrays or sequences).
    Returns a new array of ``x``'s namespace, dtype and device."""
    _check_4d(x, "translate")
    k = _check_shift(max_shift, "translate")
    xp = namespace_of(x)
    N, C, H, W = (int(s) for s in x.shape)
    host = [list(int(v) for v in a) for a in (dy, dx)]
    for name, vals in zip(("dy", "dx"), host):
        if len(vals) != N:
            raise ValueError(f"translate: expected {N} offsets in {name} (one per sample), got {len(vals)}")
        if vals and max(abs(v) for v in vals) > k:
            raise ValueError(f"translate: expected offsets in [-{k}, {k}], got {name} from {min(vals)} to {max(vals)}")
    if k == 0 or N == 0:
        return x
    dev = device_of(x)
    sel_y, sel_x = (
        xp.reshape(asarray_in([v + k for v in vals], xp, dtype=xp.int32, device=dev), (N, 1, 1, 1)) for vals in host
    )
    padded = _pad(xp, x, k, k)
    rows = _select(xp, [padded[:, :, s : s + H, :] for s in range(2 * k + 1)], sel_y)
    return _select(xp, [rows[:, :, :, s : s + W] for s in range(2 * k + 1)], sel_x)


def random_translate(x, max_shift: int, rng: Generator | int | None = None):
    """``x`` translated by offsets drawn from ``rng`` (a :class:`~xpconv.backend.Generator`
    or a seed): :func:`translation_offsets` then :func:`translate`."""
    dy, dx = translation_offsets(Generator(rng), int(x.shape[0]), max_shift)
    return translate(x, dy, dx, max_shift)
