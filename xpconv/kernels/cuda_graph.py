"""One whole training step (forward, backward, optimizer update) as a CUDA graph, replayed
each step: EXPERIMENTAL and off by default (``Trainer(..., cuda_graph=True)``,
``xpconv train --cuda-graph``) until a GPU run shows it equal to eager steps and faster.

How it works (:class:`CudaGraphStep`):

* **Warm-up.**  The first batch of a shape runs eagerly on a side stream, with the graph's
  private memory pool: kernels get compiled, cuBLAS gets its handle, the optimizer its
  slots and the pool its blocks, so the capture that follows needs none of that.
* **Capture.**  The next batch of that shape is captured on the side stream
  (``Stream.begin_capture()`` / ``end_capture()``, CuPy's stream-capture API since
  v11.0.0a1, cupy/cupy#4567; this package needs CuPy >= 13) into one ``cupy.cuda.Graph``,
  reading fixed input buffers.  Every array the step allocates comes from a private
  ``cupy.cuda.MemoryPool`` (``cupy.cuda.using_allocator(pool.malloc)``) that only the
  graph uses and that lives as long as it: CuPy's default pool is not capture-aware and
  would hand memory the graph still writes to other code once the step's temporaries are
  freed.  The step's loss is kept by this object (gradients and caches by the layers).
* **Replay.**  Each step the host runs the host half of the step -- the optimizer counts
  the update (Adam's bias-corrected ``lr_t``), each Dropout layer draws its two keys --
  writes those scalars into a small host buffer, copies it to the device with one
  host-to-device copy (a write, never a read: no device-to-host sync), copies the batch
  into the fixed input buffers and launches the graph on the current stream.  The
  kernels that read per-step scalars were captured in their ``_dev`` form (``step.cu``),
  which reads them from that buffer: a graph keeps kernel arguments by value, so an
  ``lr_t`` passed as an argument would be the capture's forever.  The ``_dev`` kernels
  compute the same values with the same code, so a replay equals an eager step bit for bit.
* **Other shapes** (a last partial batch) run eagerly on the current stream; the graph
  stays for the next batch of its shape.  The :class:`~xpconv.training.Trainer` never
  makes one: its schedule drops the remainder of each epoch.
* **Refusals and fall-back.**  A capture that fails (an operation CUDA cannot capture, a
  kernel outside this package reading a per-step scalar by value, an optimizer whose
  update is not its fused kernel) leaves the host state as it was, warns once and the
  step runs eagerly from then on.

Nothing here runs on import and CuPy is imported when a :class:`CudaGraphStep` is made
(:mod:`xpconv.kernels.cupy_ops` imports this module for :func:`recording`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["CaptureRefused", "CudaGraphStep", "DeviceScalars", "recording"]

_RECORDING: DeviceScalars | None = None


def recording() -> DeviceScalars | None:
    """The scalar buffer of the graph being captured, or None (eager: kernels take their
    scalars as arguments)."""
    return _RECORDING


class CaptureRefused(RuntimeError):
    """The captured step cannot be replayed correctly (the message says why)."""


class DeviceScalars:
    """The per-step scalars of one captured step, in one small device buffer.

    During capture each kernel that needs a per-step scalar asks for its slot
    (:meth:`keys` for a Dropout mask, :meth:`scalars` for an optimizer update) and gets a
    typed view of the device buffer to pass as a pointer; :meth:`refresh` rewrites all
    slots for the next step and copies the host buffer over in one copy."""

    #: bytes of the buffer: 8-byte aligned slots; a step with more scalars fails to capture
    CAPACITY = 4096

    def __init__(self, cupy):
        self._cupy = cupy
        self.host = np.zeros(self.CAPACITY, dtype=np.uint8)  # pageable: the copy has taken it when set() returns
        self.device = cupy.empty((self.CAPACITY,), dtype="uint8")
        self.slots: list[dict[str, Any]] = []  # {"kind", "owner", "dtype", "offset", "count", "uses"}
        self._used = 0

    def _slot(self, kind: str, owner, dtype, values: Sequence) -> Any:
        dtype = np.dtype(dtype)
        count = len(values)
        nbytes = -(-count * dtype.itemsize // 8) * 8
        if self._used + nbytes > self.CAPACITY:
            raise CaptureRefused(f"the step needs more than the {self.CAPACITY} bytes of per-step scalars a graph holds")
        slot = {"kind": kind, "owner": owner, "dtype": dtype, "offset": self._used, "count": count, "uses": 1}
        self._used += nbytes
        self.slots.append(slot)
        self._write(slot, values)
        return self._view(slot)

    def _write(self, slot, values) -> None:
        o, n, dt = slot["offset"], slot["count"], slot["dtype"]
        self.host[o : o + n * dt.itemsize].view(dt)[:] = values

    def _view(self, slot):
        o, n, dt = slot["offset"], slot["count"], slot["dtype"]
        return self.device[o : o + n * dt.itemsize].view(dt)

    def keys(self, k1: int, k2: int):
        """A uint32 device array holding a Dropout mask's two keys (its own slot)."""
        return self._slot("keys", None, np.uint32, (int(k1) & 0xFFFFFFFF, int(k2) & 0xFFFFFFFF))

    def scalars(self, owner, dtype, values: Sequence):
        """A device array holding an update kernel's trailing scalars ``values`` (of
        ``dtype``).  All parameters of one update share one slot per (kernel, dtype):
        ``owner.tail(dtype, **hyper)`` refills it before each replay."""
        for slot in self.slots:
            if slot["kind"] == "update" and slot["owner"] is owner and slot["dtype"] == np.dtype(dtype):
                o, n, dt = slot["offset"], slot["count"], slot["dtype"]
                if tuple(self.host[o : o + n * dt.itemsize].view(dt)) != tuple(dt.type(v) for v in values):
                    raise CaptureRefused(f"{type(owner).__name__}: two updates with other scalars in one captured step")
                slot["uses"] += 1
                return self._view(slot)
        return self._slot("update", owner, dtype, values)

    def count(self, kind: str) -> int:
        return sum(1 for s in self.slots if s["kind"] == kind)

    def uses(self, kind: str) -> int:
        return sum(s["uses"] for s in self.slots if s["kind"] == kind)

    def refresh(self, hyper: dict[str, float], keys: Sequence[tuple[int, int]]) -> None:
        """Fill every slot for the next replay -- each update slot with its kernel's
        ``tail(dtype, **hyper)``, the Dropout slots with ``keys`` in capture order -- and
        copy the buffer to the device (one host-to-device copy on the current stream)."""
        keys = list(keys)
        j = 0
        for slot in self.slots:
            if slot["kind"] == "keys":
                k1, k2 = keys[j]
                j += 1
                self._write(slot, (int(k1) & 0xFFFFFFFF, int(k2) & 0xFFFFFFFF))
            else:
                self._write(slot, slot["owner"].tail(slot["dtype"], **hyper))
        if j != len(keys):
            raise CaptureRefused(f"the graph has {j} Dropout masks, the step drew keys for {len(keys)}")
        self.device.set(self.host)


class StepHost:
    """The host half of a training step, duck-typed: ``optimizer.host_step()`` (the
    update's scalars) and ``layer.rng.dropout_keys()`` of each Dropout layer in forward
    order; ``snapshot``/``restore`` undo what a capture drew."""

    def __init__(self, optimizer, dropouts: Sequence[Any] = ()):
        self.optimizer = optimizer
        self.dropouts = list(dropouts)

    def advance(self) -> tuple[dict[str, float], list[tuple[int, int]]]:
        return self.optimizer.host_step(), [layer.rng.dropout_keys() for layer in self.dropouts]

    def snapshot(self):
        return self.optimizer.iter, getattr(self.optimizer, "_lr_t", None), [copy.deepcopy(layer.rng) for layer in self.dropouts]

    def restore(self, token) -> None:
        self.optimizer.iter, lr_t, rngs = token
        if lr_t is not None:
            self.optimizer._lr_t = lr_t
        for layer, rng in zip(self.dropouts, rngs):
            layer.rng = rng


class CudaGraphStep:
    """``step(x, t) -> loss`` run as a captured CUDA graph (see the module's notes).

    ``step`` is the eager step (gradients, update; returns the loss array); ``optimizer``
    and ``dropouts`` (the model's Dropout layers, forward order) give the host half;
    ``n_params`` is how many parameters the update must write through its fused kernel.
    Calling it runs one step and returns the loss as a fresh array (a replay overwrites
    the graph's own loss array, so it is copied, on the device)."""

    def __init__(self, step: Callable[[Any, Any], Any], *, optimizer, dropouts: Sequence[Any] = (), n_params: int):
        import cupy

        self._cupy = cupy
        self.step = step
        self.host = StepHost(optimizer, dropouts)
        self.n_params = int(n_params)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.pool = cupy.cuda.MemoryPool()  # only the graph allocates from it; it lives as long as the graph
        self.graph = None
        self.key: tuple | None = None  # (x shape, x dtype, t shape, t dtype) of the graph
        self.warmed: set[tuple] = set()
        self.disabled = False
        self.counts = {"warmup": 0, "capture": 0, "replay": 0, "eager": 0}
        self._x = self._t = self._loss = self._scalars = None

    # ---------------------------------------------------------------- running

    def __call__(self, x, t):
        key = (tuple(x.shape), str(x.dtype), tuple(t.shape), str(t.dtype))
        if self.disabled or (self.graph is not None and key != self.key):
            return self._eager(x, t)
        if self.graph is None:
            if key not in self.warmed:
                return self._warm_up(key, x, t)
            if not self._capture(key, x, t):
                return self._eager(x, t)
        return self._replay(x, t)

    def _eager(self, x, t):
        self.counts["eager"] += 1
        return self.step(x, t)

    def _on_side_stream(self, fn):
        """Run ``fn()`` on the side stream with the private pool, ordered after the current
        stream's work, and the current stream after it."""
        cp = self._cupy
        current = cp.cuda.get_current_stream()
        self.stream.wait_event(current.record())
        try:
            with cp.cuda.using_allocator(self.pool.malloc), self.stream:
                return fn()
        finally:
            current.wait_event(self.stream.record())

    def _warm_up(self, key, x, t):
        self.counts["warmup"] += 1
        loss = self._on_side_stream(lambda: self.step(x, t))
        self.warmed.add(key)
        return loss

    def _capture(self, key, x, t) -> bool:
        """Capture the step on fixed inputs; False (one warning, eager from now on) when
        it cannot be captured.  The host state the capture drew is given back, so the
        first replay is this step."""
        global _RECORDING
        cp = self._cupy
        token = self.host.snapshot()
        stream = self.stream

        def capture():
            global _RECORDING
            self._x = cp.empty(tuple(x.shape), dtype=x.dtype)
            self._t = cp.empty(tuple(t.shape), dtype=t.dtype)
            self._scalars = scalars = DeviceScalars(cp)
            stream.begin_capture()
            try:
                _RECORDING = scalars
                loss = self.step(self._x, self._t)
            except BaseException:
                _RECORDING = None
                try:
                    stream.end_capture()
                except Exception:  # the capture is already invalid: ending it is all that is left
                    pass
                raise
            _RECORDING = None
            return stream.end_capture(), loss

        try:
            graph, loss = self._on_side_stream(capture)
            self._check(scalars=self._scalars)
        except Exception as exc:
            _RECORDING = None
            self.host.restore(token)
            self.disabled = True
            self.graph = self._x = self._t = self._scalars = None
            warnings.warn(f"cuda_graph: the training step could not be captured ({exc}); running it eagerly", RuntimeWarning, stacklevel=3)
            return False
        self.host.restore(token)
        self.graph, self._loss, self.key = graph, loss, key
        self.counts["capture"] += 1
        return True

    def _check(self, scalars: DeviceScalars | None) -> None:
        assert scalars is not None
        dropouts = len(self.host.dropouts)
        if scalars.count("keys") != dropouts:
            raise CaptureRefused(f"expected {dropouts} Dropout masks read from the graph's buffer, got {scalars.count('keys')}")
        if scalars.uses("update") != self.n_params:
            raise CaptureRefused(
                f"expected all {self.n_params} parameters updated by the optimizer's fused kernel, "
                f"got {scalars.uses('update')} (its generic update would keep this step's scalars forever)"
            )

    def _replay(self, x, t):
        cp = self._cupy
        hyper, keys = self.host.advance()
        self._scalars.refresh(hyper, keys)
        for static, new in ((self._x, x), (self._t, t)):
            if isinstance(new, cp.ndarray):
                cp.copyto(static, new)
            else:  # host data: one more host-to-device copy
                static.set(new)
        self.graph.launch(cp.cuda.get_current_stream())
        self.counts["replay"] += 1
        return self._loss.copy()
