"""Data-parallel training: xpconv.distributed.

In-process tests use a real one-rank MPI communicator (COMM_SELF) or a stand-in
for a larger one; the multi-rank tests launch tests/distributed_worker.py with
``mpiexec -n K`` (loopback only) and compare with a single process.  Every
launch has a timeout and is killed as a process group, so a hang fails the test
instead of hanging CI.  Without mpi4py these tests skip, except under CI
(CI=true), where MPI is part of the install (.[test,mpi]) and its absence fails.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from xpconv import backend, distributed
from xpconv.models import DeepConvNet, SimpleConvNet
from xpconv.optim import SGD

try:
    from mpi4py import MPI
except ImportError:  # pragma: no cover - depends on the install
    if os.environ.get("CI") == "true":
        raise RuntimeError("mpi4py is required in CI: pip install '.[test,mpi]'")
    pytest.skip("mpi4py is not installed (pip install 'xpconv[mpi]')", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT = 60  # seconds for one launch; a hang fails the test
CONFIGS = ["simple_float32", "simple_float64", "deep_float32", "deep_float64"]
TOL = {"float32": 1e-5, "float64": 1e-12}


# --------------------------------------------------------------------------- stand-ins


class FakeWorld:
    """An MPI communicator of ``size`` ranks seen from ``rank`` where every other
    rank holds the same data: Allreduce(SUM) multiplies by size, Bcast keeps."""

    def __init__(self, rank=0, size=2):
        self.rank, self.size = rank, size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Allreduce(self, sendbuf, recvbuf, op=None):
        assert sendbuf is MPI.IN_PLACE and op is MPI.SUM
        recvbuf *= self.size

    def Bcast(self, buf, root=0):
        pass

    def Allgather(self, sendbuf, recvbuf):
        recvbuf[...] = sendbuf  # every rank sent the same


class FakeNode(FakeWorld):
    """The ranks of one node seen from ``rank``; rank i's device has PCI bus id ``bus_ids[i]``."""

    def __init__(self, rank, bus_ids):
        super().__init__(rank, len(bus_ids))
        self.bus_ids = bus_ids

    def Allgather(self, sendbuf, recvbuf):
        assert bytes(sendbuf).rstrip(b"\0").decode() == self.bus_ids[self.rank]  # what this rank sent
        for i, bid in enumerate(self.bus_ids):
            recvbuf[i] = 0
            recvbuf[i, : len(bid)] = np.frombuffer(bid.encode(), dtype=np.uint8)

    def Free(self):
        pass


class NodeWorld(FakeWorld):
    """A job of one node whose ranks hold the GPUs ``bus_ids``, seen from ``rank``."""

    def __init__(self, rank, bus_ids):
        super().__init__(rank, len(bus_ids))
        self.bus_ids = bus_ids

    def Split_type(self, *args, **kwargs):
        return FakeNode(self.rank, self.bus_ids)


class FakeNccl:
    """The part of cupy.cuda.nccl that the NCCL transport uses, over host memory:
    allReduce reads and writes the buffer through its address (so a wrong pointer
    or count shows), as if every rank held the same data.

    It follows the real module of the CuPy it models (tests/test_cupy_api.py checks these
    signatures against the wheels): CuPy 14's ``get_unique_id()`` returns 128 ``bytes`` and
    ``NcclCommunicator(int ndev, bytes commId, int rank, NcclConfig config=None)`` takes
    only bytes; CuPy 13's returns a tuple of 128 C ``char`` values and
    ``NcclCommunicator(int ndev, tuple commId, int rank)`` converts each back to a
    ``char`` (Cython: OverflowError outside its range; signed on x86-64, unsigned on aarch64)."""

    NCCL_SUM, NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = 0, 6, 7, 8
    _ctypes = {7: ctypes.c_float, 8: ctypes.c_double}
    #: the signatures the stand-in models, as CuPy's docstrings give them
    SIGNATURES = {
        14: "NcclCommunicator(int ndev, bytes commId, int rank, NcclConfig config=None)",
        13: "NcclCommunicator(int ndev, tuple commId, int rank)",
    }

    class NcclError(RuntimeError):  # named like cupy.cuda.nccl's
        pass

    def __init__(self, refuse: str = "", cupy: int = 14, unsigned_char: bool = False):
        self.calls = []
        self.available = True
        self.cupy, self.unsigned_char = cupy, unsigned_char
        fake = self
        lo, hi = (0, 255) if unsigned_char else (-128, 127)

        class NcclCommunicator:
            if cupy >= 14:
                def __init__(self, ndev, commId, rank, config=None):
                    if type(ndev) is not int or type(rank) is not int:
                        raise TypeError("an integer is required")
                    if not isinstance(commId, bytes):
                        raise TypeError(f"Argument 'commId' has incorrect type (expected bytes, got {type(commId).__name__})")
                    self._init(ndev, commId, rank)
            else:
                def __init__(self, ndev, commId, rank):
                    if type(ndev) is not int or type(rank) is not int:
                        raise TypeError("an integer is required")
                    if not isinstance(commId, tuple):
                        raise TypeError(f"Argument 'commId' has incorrect type (expected tuple, got {type(commId).__name__})")
                    for v in commId:
                        if not lo <= int(v) <= hi:
                            raise OverflowError(f"value too large to convert to char: {v}")
                    self._init(ndev, commId, rank)

            def _init(self, ndev, uid, rank):
                if len(uid) != 128:
                    raise ValueError(f"commId: 128 values expected, got {len(uid)}")
                if refuse:
                    raise FakeNccl.NcclError(refuse)
                fake.calls.append(("init", ndev, uid, rank))
                self.ndev = ndev

            def allReduce(self, send, recv, count, dtype, op, stream):
                fake.calls.append(("allReduce", send, recv, count, dtype, op))
                view = np.ctypeslib.as_array((self._c(dtype) * count).from_address(recv))
                view *= self.ndev

            def bcast(self, buf, count, dtype, root, stream):
                fake.calls.append(("bcast", buf, count, dtype, root))

            @staticmethod
            def _c(dtype):
                return FakeNccl._ctypes[dtype]

        self.NcclCommunicator = NcclCommunicator

    def get_unique_id(self):
        raw = bytes((i * 7 + 200) % 256 for i in range(128))  # bytes on both sides of 127
        if self.cupy >= 14:
            return raw
        return tuple(b if self.unsigned_char or b < 128 else b - 256 for b in raw)


def tiny_simple(seed=0, dtype="float32", xp="numpy"):
    return SimpleConvNet((1, 8, 8), {"filter_num": 3, "filter_size": 3}, hidden_size=5, output_size=3,
                         xp=xp, dtype=dtype, seed=seed)


@pytest.fixture
def comm1():
    """A real one-rank communicator."""
    return distributed.Communicator(MPI.COMM_SELF)


# --------------------------------------------------------------------------- sharding and seeding


def test_shard_takes_each_ranks_rows_of_the_global_batch():
    batch = np.arange(12)
    parts = [distributed.Communicator(FakeWorld(r, 4)).shard(batch) for r in range(4)]
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


@pytest.mark.parametrize("B, K, hint", [(10, 4, "8 or 12"), (3, 4, "4")])
def test_indivisible_global_batch_names_the_numbers(B, K, hint):
    comm = distributed.Communicator(FakeWorld(0, K))
    with pytest.raises(ValueError, match=rf"global batch size {B} is not divisible by {K} ranks.*{hint}"):
        comm.local_batch_size(B)
    with pytest.raises(ValueError, match=f"global batch size {B}"):
        comm.shard(np.zeros((B, 2)))


def test_evaluation_shards_cover_every_sample_once():
    for n in (0, 1, 7, 10):
        ranges = [distributed.Communicator(FakeWorld(r, 3)).shard_range(n) for r in range(3)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_global_batches_are_seeded_by_epoch_and_the_same_for_any_rank_count():
    a = list(distributed.global_batches(10, 4, seed=3, epoch=0))
    assert [len(b) for b in a] == [4, 4]  # drop_last
    assert [b.tolist() for b in a] == [b.tolist() for b in distributed.global_batches(10, 4, seed=3, epoch=0)]
    other = np.concatenate(list(distributed.global_batches(10, 5, seed=3, epoch=1)))
    assert sorted(other.tolist()) == list(range(10)) and other.tolist() != np.concatenate(a).tolist()[:10]
    assert [len(b) for b in distributed.global_batches(10, 4, seed=3, epoch=0, drop_last=False)] == [4, 4, 2]


@pytest.mark.parametrize("K", [1, 2, 4])
def test_dropout_masks_of_the_shards_are_the_single_process_mask(xp, K):
    """Union over K ranks of the masks each draws for its B/K rows == the mask one
    process draws for all B rows (same seed and step)."""
    B = 8
    x = backend.asarray_in(np.ones((B, 5)), xp, dtype=xp.float32)
    full = distributed.Communicator(FakeWorld(0, 1))
    net = DeepConvNet((1, 8, 8), conv_params=[{"filter_num": 2, "filter_size": 3, "pad": p} for p in (1, 1, 1, 2, 1, 1)],
                      hidden_size=5, output_size=5, xp="numpy", seed=0)
    drop = [layer for layer in net.layers if type(layer).__name__ == "Dropout"][0]
    full.seed_dropout(net, seed=7, step=3)
    want = backend.to_numpy(drop.forward(x))
    got = []
    for r in range(K):
        distributed.Communicator(FakeWorld(r, K)).seed_dropout(net, seed=7, step=3)
        got.append(backend.to_numpy(drop.forward(x[r * B // K : (r + 1) * B // K, ...])))
    np.testing.assert_array_equal(np.concatenate(got), want)
    assert 0 < want.sum() < want.size  # a real mask
    distributed.Communicator(FakeWorld(0, 1)).seed_dropout(net, seed=7, step=4)
    assert not np.array_equal(backend.to_numpy(drop.forward(x)), want)  # a new mask each step


def test_the_mpi_communicator_has_the_local_communicators_interface(comm1):
    from xpconv.training import Communicator, LocalCommunicator

    for comm in (comm1, distributed.Communicator(FakeWorld(1, 2)), LocalCommunicator()):
        assert isinstance(comm, Communicator)
    assert distributed.global_batches is __import__("xpconv.training.schedule", fromlist=["x"]).global_batches  # one schedule


@pytest.mark.parametrize("kind", ["simple", "deep"])
def test_trainer_on_a_one_rank_mpi_job_is_the_single_process_trainer(comm1, kind):
    """The loop has one path: one process (LocalCommunicator) and a real one-rank MPI
    communicator give bit-identical runs (Dropout included)."""
    from xpconv.datasets import load_digits
    from xpconv.training import Trainer

    (x, t), (xt, tt) = load_digits(normalize=True, flatten=False)
    data = x[:200], t[:200], xt[:50], tt[:50]

    def run(comm):
        net = SimpleConvNet((1, 8, 8), {"filter_num": 3, "filter_size": 3}, hidden_size=5, seed=2) if kind == "simple" else DeepConvNet(input_dim=(1, 8, 8), hidden_size=8, xp="numpy", seed=2)
        tr = Trainer(net, *data, epochs=2, mini_batch_size=50, optimizer="Adam", optimizer_param={"lr": 0.01},
                     verbose=False, seed=3, comm=comm)
        tr.train()
        return tr, {k: backend.to_numpy(v) for k, v in net.params.items()}

    (a, pa), (b, pb) = run(None), run(comm1)
    assert a.train_loss_list == b.train_loss_list and a.history[-1]["test_acc"] == b.history[-1]["test_acc"]
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


# --------------------------------------------------------------------------- collectives in one process


def test_allreduce_mean_uses_one_reused_buffer_per_dtype(xp):
    comm = distributed.Communicator(FakeWorld(0, 4))
    rng = np.random.default_rng(0)
    host = {"W1": rng.standard_normal((3, 2)), "b1": rng.standard_normal(2), "W2": rng.standard_normal((2, 2))}
    dtypes = {"W1": xp.float32, "b1": xp.float32, "W2": xp.float64}
    for step in range(2):
        grads = {k: backend.asarray_in(v, xp, dtype=dtypes[k]) for k, v in host.items()}
        out = comm.allreduce_mean(grads)
        assert out is grads
        for k, v in host.items():
            assert backend.namespace_of(grads[k]) is xp and grads[k].dtype == dtypes[k]
            np.testing.assert_allclose(backend.to_numpy(grads[k]), v, rtol=1e-6)  # 4 equal ranks: mean == own
        if step == 0:
            buffers = dict(comm._grad_buffers)
    assert sorted(buffers) == ["float32", "float64"]
    assert all(comm._grad_buffers[k] is buffers[k] for k in buffers)  # reused, not reallocated
    assert comm.stats.collective_calls == 4 and comm.stats.allreduce_calls == 2
    assert comm.stats.allreduce_bytes == 2 * (8 * 4 + 4 * 8)


def test_broadcast_and_allreduce_over_a_real_one_rank_communicator(comm1):
    net = tiny_simple(seed=1)
    before = net.state_arrays()
    comm1.broadcast_params(net.params)
    for k, v in net.state_arrays().items():
        np.testing.assert_array_equal(v, before[k])
    grads = net.gradient(np.ones((2, 1, 8, 8), np.float32), np.array([0, 2]))
    want = {k: np.array(v) for k, v in grads.items()}
    comm1.allreduce_mean(grads)
    for k in want:
        np.testing.assert_array_equal(grads[k], want[k])
    assert comm1.allreduce_sum([3, 4.5]) == [3.0, 4.5]
    assert comm1.params_in_sync(net.params)


def test_distributed_optimizer_averages_then_steps_and_forwards_attributes(comm1):
    opt = distributed.DistributedOptimizer(SGD(lr=0.5), comm1)
    params = {"W": np.ones(3)}
    opt.update(params, {"W": np.full(3, 2.0)})
    np.testing.assert_array_equal(params["W"], np.zeros(3))
    assert opt.iter == 1 and opt.lr == 0.5
    opt.lr = 0.1
    assert opt.optimizer.lr == 0.1 and opt.state_dict()["iter"] == 1
    assert comm1.stats.allreduce_calls == 1


def test_sharded_evaluation_equals_accuracy(comm1):
    net = tiny_simple(seed=2)
    rng = np.random.default_rng(1)
    x, t = rng.standard_normal((23, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, 23)
    assert comm1.evaluate(net, x, t, batch_size=5) == net.accuracy(x, t)


def test_nccl_transport_wiring_without_a_gpu(monkeypatch):
    """The NCCL path with a stand-in for cupy.cuda.nccl over host memory (this CI has
    no GPU): the id goes over MPI, one allReduce per dtype covers every gradient
    through the buffer's address, and the mean is taken."""
    nccl = FakeNccl()
    monkeypatch.setattr(distributed, "_stream_ptr", lambda: 0)
    world = FakeWorld(0, 2)
    comm = distributed.Communicator(world)
    comm._nccl = distributed._NCCLTransport(world, nccl=nccl)
    comm._device_namespace = "numpy"  # route host arrays through the stand-in
    assert comm.backend == "nccl" and nccl.calls[0][0] == "init" and nccl.calls[0][1:] == (2, nccl.get_unique_id(), 0)
    grads = {"W1": np.full((4, 3), 2.0, np.float32), "b1": np.ones(3, np.float32), "W2": np.ones(5)}
    comm.allreduce_mean(grads)
    reduces = [c for c in nccl.calls if c[0] == "allReduce"]
    assert sorted((c[3], c[4]) for c in reduces) == [(5, FakeNccl.NCCL_FLOAT64), (15, FakeNccl.NCCL_FLOAT32)]
    assert all(c[1] == c[2] for c in reduces)  # in place
    np.testing.assert_array_equal(grads["W1"], np.full((4, 3), 2.0))  # (2 ranks x same) / 2
    params = {"W": np.arange(3.0)}
    comm.broadcast_params(params)
    assert [c[0] for c in nccl.calls].count("bcast") == 1
    with pytest.raises(TypeError, match="unsupported dtype int32"):
        comm._nccl.allreduce_sum_(np.zeros(2, np.int32))


class WireWorld(FakeWorld):
    """A rank of a 2-rank world whose Bcast delivers what rank 0 sent (``wire``: rank 0's
    buffer is recorded there, a later rank reads it), as MPI would."""

    def __init__(self, rank, size, wire):
        super().__init__(rank, size)
        self.wire = wire

    def Bcast(self, buf, root=0):
        if self.rank == root:
            self.wire.append(np.array(buf, copy=True))
        else:
            buf[...] = self.wire[-1]


@pytest.mark.parametrize("cupy, unsigned_char", [(14, False), (13, False), (13, True)],
                         ids=["cupy14-bytes", "cupy13-x86-signed-char", "cupy13-aarch64-unsigned-char"])
def test_every_rank_builds_the_nccl_id_in_the_form_its_cupy_takes(cupy, unsigned_char):
    """The id rank 0's NCCL made reaches every rank's NcclCommunicator unchanged: bytes on
    CuPy 14, CuPy 13's tuple of C chars (values above 127 where char is unsigned)."""
    wire = []
    made = []
    for rank in (0, 1):
        nccl = FakeNccl(cupy=cupy, unsigned_char=unsigned_char)
        distributed._NCCLTransport(WireWorld(rank, 2, wire), nccl=nccl)
        made.append(nccl.calls[0])
    uid = FakeNccl(cupy=cupy, unsigned_char=unsigned_char).get_unique_id()
    assert type(uid) is (bytes if cupy >= 14 else tuple)
    assert made == [("init", 2, uid, 0), ("init", 2, uid, 1)]
    assert type(made[1][2]) is type(uid)


def test_the_nccl_stand_in_refuses_what_cupy_refuses():
    """The stand-in is only worth its tests if it refuses the old mistakes: a tuple passed
    to CuPy 14, 0..255 values where char is signed."""
    with pytest.raises(TypeError, match="expected bytes, got tuple"):
        FakeNccl(cupy=14).NcclCommunicator(2, tuple(range(128)), 0)
    with pytest.raises(OverflowError):
        FakeNccl(cupy=13).NcclCommunicator(2, tuple(range(128, 256)), 0)
    with pytest.raises(ValueError, match="expected 128 bytes, got 5"):
        distributed._nccl_id_to_wire(b"12345")
    with pytest.raises(ValueError, match="C char values"):
        distributed._nccl_id_to_wire(tuple([300] * 128))


def test_cupy_without_the_nccl_library_says_what_to_install():
    """``from cupy.cuda import nccl`` succeeds without libnccl (``nccl.available`` is False,
    and the module has no get_unique_id): every rank says so instead of an AttributeError."""
    import types

    no_lib = types.SimpleNamespace(available=False)
    with pytest.raises(backend.BackendUnavailable,
                       match=r"NCCL is not available through CuPy on 1 of 1 ranks \(here: CuPy found no NCCL library "
                             r"\(cupy.cuda.nccl.available is False; pip install nvidia-nccl-cu12 or nvidia-nccl-cu13"):
        distributed._NCCLTransport(FakeWorld(0, 1), nccl=no_lib)


def test_without_cupy_the_module_imports_and_setup_falls_back_to_mpi_on_the_cpu(monkeypatch):
    """No CuPy (this CI): importing xpconv.distributed pulls in neither CuPy nor MPI,
    device='auto' gives a CPU job over MPI, and asking for CUDA or NCCL says why not."""
    code = ("import sys; import xpconv.distributed; "
            "assert not {'cupy', 'mpi4py'} & set(sys.modules), sorted(m for m in sys.modules if m in ('cupy', 'mpi4py'))")
    rc, log, _ = run_job([sys.executable, "-c", code])
    assert rc == 0, log
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    monkeypatch.setattr(distributed, "_COMM", None)
    assert distributed._cuda_device_count() == 0
    comm = distributed.setup(device="auto", excepthook=False)
    assert (comm.device, comm.backend, comm.size) == ("cpu", "mpi", 1) and distributed.current() is comm
    monkeypatch.setattr(distributed, "_COMM", None)
    with pytest.raises(backend.BackendUnavailable,
                       match="rank 0: --device cuda was asked for but CUDA is usable on 0 of 1 ranks; here: no CUDA device is visible"):
        distributed.setup(device="cuda")
    monkeypatch.setattr(distributed, "_COMM", None)
    with pytest.raises(backend.BackendUnavailable, match="backend 'nccl' needs CUDA devices"):
        distributed.setup(device="cpu", backend="nccl")
    with pytest.raises(backend.BackendUnavailable, match="NCCL is not available through CuPy on 1 of 1 ranks .here: cupy.cuda.nccl cannot"):
        distributed._NCCLTransport(FakeWorld(0, 1))


def pretend_cuda(monkeypatch, n_gpus: int) -> None:
    """Stand-ins: n_gpus visible CUDA devices that work, and no setup() done yet."""
    monkeypatch.setattr(distributed, "_cuda_device_count", lambda: n_gpus)
    monkeypatch.setattr(distributed, "_use_cuda_device", lambda index: None)
    monkeypatch.setattr(distributed, "cuda_status", lambda: (True, ""))
    monkeypatch.setattr(distributed, "_pci_bus_id", lambda: "")  # unknown: not compared
    monkeypatch.setattr(distributed, "_COMM", None)


def test_a_gpu_job_without_nccl_reduces_over_mpi_with_a_warning_or_fails_when_nccl_was_asked_for(monkeypatch):
    """CUDA works (stand-ins) but CuPy has no NCCL: backend 'auto' falls back to MPI
    through the host and says so; backend 'nccl' is an error.  A NCCL whose id
    cannot be made fails the same way on every rank."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    pretend_cuda(monkeypatch, n_gpus=1)
    with pytest.warns(UserWarning, match="NCCL is not available.*gradients go through the host over MPI"):
        comm = distributed.setup(device="auto", excepthook=False)
    assert (comm.device, comm.backend) == ("cuda", "mpi")
    monkeypatch.setattr(distributed, "_COMM", None)
    with pytest.raises(backend.BackendUnavailable, match="NCCL is not available"):
        distributed.setup(device="cuda", backend="nccl", excepthook=False)

    class BrokenNccl(FakeNccl):
        def get_unique_id(self):
            raise RuntimeError("libnccl.so.2: cannot open shared object file")

    with pytest.raises(backend.BackendUnavailable, match="rank 0 could not create an NCCL communicator id .RuntimeError: libnccl"):
        distributed._NCCLTransport(FakeWorld(0, 2), nccl=BrokenNccl())


def test_cuda_on_only_some_ranks_puts_every_rank_on_the_cpu(monkeypatch):
    """Seen from rank 0 of 2 where only rank 0 has CUDA: the ranks agree (one
    allreduce) and all train on the CPU, with a warning; --device cuda fails."""

    class HalfWorld(FakeWorld):
        def Allreduce(self, sendbuf, recvbuf, op=None):  # the other rank has no CUDA: adds 0
            assert sendbuf is MPI.IN_PLACE and op is MPI.SUM

        def Split_type(self, *args, **kwargs):  # the node communicator: this rank alone
            node = FakeWorld(0, 1)
            node.Free = lambda: None
            return node

    monkeypatch.setattr(MPI, "COMM_WORLD", HalfWorld(0, 2), raising=False)
    pretend_cuda(monkeypatch, n_gpus=2)
    with pytest.warns(UserWarning, match="CUDA is usable on only 1 of 2 ranks: every rank trains on the CPU"):
        comm = distributed.setup(device="auto", excepthook=False)
    assert comm.device == "cpu" and comm.backend == "mpi"
    monkeypatch.setattr(distributed, "_COMM", None)
    with pytest.raises(backend.BackendUnavailable, match="rank 0: --device cuda was asked for but CUDA is usable on 1 of 2 ranks"):
        distributed.setup(device="cuda", excepthook=False)


def test_more_ranks_than_gpus_on_a_node_trains_on_the_cpu_with_a_warning_or_fails_with_device_cuda(monkeypatch):
    class CrowdedWorld(FakeWorld):  # rank 3 of 4 ranks on one node with 2 GPUs (every rank alike)
        def Split_type(self, *args, **kwargs):
            node = FakeWorld(3, 4)
            node.Free = lambda: None
            return node

    monkeypatch.setattr(MPI, "COMM_WORLD", CrowdedWorld(3, 4), raising=False)
    pretend_cuda(monkeypatch, n_gpus=2)
    with warnings.catch_warnings(record=True) as record:  # rank 3 trains on the CPU without a word: rank 0 warns
        warnings.simplefilter("always")
        comm = distributed.setup(device="auto", excepthook=False)
    assert comm.device == "cpu" and not record
    monkeypatch.setattr(MPI, "COMM_WORLD", CrowdedWorld(0, 4), raising=False)
    pretend_cuda(monkeypatch, n_gpus=2)
    with pytest.warns(UserWarning, match="CUDA is usable on only 0 of 4 ranks.*rank 0: .*4 ranks on this node but 2 CUDA devices"):
        distributed.setup(device="auto", excepthook=False)
    pretend_cuda(monkeypatch, n_gpus=2)
    with pytest.raises(backend.BackendUnavailable, match="usable on 0 of 4 ranks; here: .*4 ranks on this node but 2 CUDA devices"):
        distributed.setup(device="cuda", excepthook=False)


def test_one_gpu_per_rank_is_checked():
    assert distributed._gpu_for_rank(3, 3, 4, 4) == 3
    # each rank sees one GPU: its own (the launcher hands them out) or one they all share;
    # which of the two only the PCI bus ids tell (test_ranks_sharing_a_gpu_...)
    assert distributed._gpu_for_rank(3, 3, 4, 1) == 0
    with pytest.raises(ValueError, match="4 ranks on this node but 2 CUDA devices"):
        distributed._gpu_for_rank(3, 3, 4, 2)


BUS = "0000:3B:00.0"


def test_shared_gpus_are_found_from_the_bus_ids_of_a_node():
    assert distributed._shared_gpus(FakeNode(0, ["0000:3B:00.0", "0000:86:00.0"]), "0000:3B:00.0") == []
    node = FakeNode(1, ["0000:3B:00.0", "0000:3B:00.0", "0000:86:00.0", "0000:86:00.0", "0000:AF:00.0"])
    assert distributed._shared_gpus(node, "0000:3B:00.0") == [("0000:3B:00.0", [0, 1]), ("0000:86:00.0", [2, 3])]
    assert distributed._shared_gpus(FakeNode(0, ["", ""]), "") == []  # ids that could not be read are not compared


def test_the_bus_id_is_read_from_cupys_runtime(monkeypatch):
    rt = types.SimpleNamespace(getDevice=lambda: 2, deviceGetPCIBusId=lambda dev: f"0000:3b:0{dev}.0")
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=rt)))
    assert distributed._pci_bus_id() == "0000:3B:02.0"
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert distributed._pci_bus_id() == ""


def _no_nccl(world):
    raise AssertionError("NCCL must not be set up on a shared GPU")


@pytest.mark.parametrize("rank", [0, 1])
def test_ranks_sharing_a_gpu_reduce_over_mpi_with_one_warning_or_fail_when_nccl_was_asked_for(monkeypatch, rank):
    """Two ranks on a one-GPU node both take GPU 0: NCCL would refuse ("duplicate GPU") and
    abort the job, so the bus ids are compared first. Rank 0 warns once; rank 1 is quiet."""
    monkeypatch.setattr(MPI, "COMM_WORLD", NodeWorld(rank, [BUS, BUS]), raising=False)
    pretend_cuda(monkeypatch, n_gpus=1)
    monkeypatch.setattr(distributed, "_pci_bus_id", lambda: BUS)
    monkeypatch.setattr(distributed, "_NCCLTransport", _no_nccl)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        comm = distributed.setup(device="auto", excepthook=False)
    assert (comm.device, comm.backend) == ("cuda", "mpi")
    messages = [str(w.message) for w in record]
    if rank == 0:
        assert len(messages) == 1, messages
        assert re.search(r"NCCL needs one GPU per rank, but 2 ranks share a GPU with another rank "
                         r"\(on this node: local ranks 0, 1 share GPU 0000:3B:00.0\).*gradients go through the host over MPI",
                         messages[0]), messages[0]
    else:
        assert messages == []
    monkeypatch.setattr(distributed, "_COMM", None)
    with pytest.raises(backend.BackendUnavailable, match=rf"rank {rank}: NCCL needs one GPU per rank, but 2 ranks share a GPU"):
        distributed.setup(device="cuda", backend="nccl", excepthook=False)
    monkeypatch.setattr(distributed, "_COMM", None)
    comm = distributed.setup(device="cuda", backend="mpi", excepthook=False)  # no comparison needed
    assert (comm.device, comm.backend) == ("cuda", "mpi")


def test_ranks_with_their_own_gpus_set_up_nccl(monkeypatch):
    monkeypatch.setattr(MPI, "COMM_WORLD", NodeWorld(0, [BUS, "0000:86:00.0"]), raising=False)
    pretend_cuda(monkeypatch, n_gpus=2)
    monkeypatch.setattr(distributed, "_pci_bus_id", lambda: BUS)
    real = distributed._NCCLTransport
    nccl = FakeNccl()
    monkeypatch.setattr(distributed, "_NCCLTransport", lambda world: real(world, nccl=nccl))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        comm = distributed.setup(device="auto", excepthook=False)
    assert (comm.device, comm.backend) == ("cuda", "nccl") and nccl.calls[0][0] == "init"


def test_an_nccl_error_during_set_up_means_nccl_is_unavailable(monkeypatch):
    """NcclError from NCCL's own set-up (here "duplicate GPU", as NCCL says it when the bus
    ids could not be read) is "unavailable": 'auto' falls back to MPI, 'nccl' fails, both clearly."""
    refuse = "NCCL_ERROR_INVALID_USAGE: invalid usage (run with NCCL_DEBUG=WARN for details): Duplicate GPU detected"
    world = FakeWorld(0, 2)
    with pytest.raises(backend.BackendUnavailable,
                       match=r"rank 0: NCCL could not set up its communicator on 2 of 2 ranks .here: NcclError: NCCL_ERROR_INVALID_USAGE"):
        distributed._NCCLTransport(world, nccl=FakeNccl(refuse))
    monkeypatch.setattr(MPI, "COMM_WORLD", NodeWorld(0, ["", ""]), raising=False)
    pretend_cuda(monkeypatch, n_gpus=1)
    real = distributed._NCCLTransport
    monkeypatch.setattr(distributed, "_NCCLTransport", lambda world: real(world, nccl=FakeNccl(refuse)))
    with pytest.warns(UserWarning, match="NCCL could not set up its communicator.*Duplicate GPU.*gradients go through the host over MPI"):
        comm = distributed.setup(device="auto", excepthook=False)
    assert (comm.device, comm.backend) == ("cuda", "mpi")
    monkeypatch.setattr(distributed, "_COMM", None)
    with pytest.raises(backend.BackendUnavailable, match="NCCL could not set up its communicator on 2 of 2 ranks"):
        distributed.setup(device="cuda", backend="nccl", excepthook=False)


def test_one_ranks_nccl_error_fails_every_rank_and_frees_the_others_communicators():
    """Seen from a rank whose NCCL set-up worked while another's failed: it learns so
    (one allreduce), destroys its communicator and raises like the failing rank."""
    destroyed = []

    class DestroyableNccl(FakeNccl):
        def __init__(self):
            super().__init__()
            base = self.NcclCommunicator

            class NcclCommunicator(base):
                def destroy(self):
                    destroyed.append(self)

            self.NcclCommunicator = NcclCommunicator

    class OtherFailed(FakeWorld):
        calls = 0

        def Allreduce(self, sendbuf, recvbuf, op=None):
            OtherFailed.calls += 1
            if OtherFailed.calls > 1:  # the first allreduce is the import check: all ranks fine
                recvbuf += 1  # then the other rank reports that its set-up failed

    with pytest.raises(backend.BackendUnavailable, match=r"rank 0: NCCL could not set up its communicator on 1 of 2 ranks$"):
        distributed._NCCLTransport(OtherFailed(0, 2), nccl=DestroyableNccl())
    assert len(destroyed) == 1


# --------------------------------------------------------------------------- multi-rank jobs


def _mpiexec() -> list[str]:
    exe = shutil.which("mpiexec") or str(Path(sys.executable).with_name("mpiexec"))
    if not Path(exe).exists():
        if os.environ.get("CI") == "true":
            pytest.fail("mpiexec not found (pip install '.[test,mpi]' provides Open MPI's)")
        pytest.skip("mpiexec not found")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    return [exe, "--oversubscribe"] if "Open MPI" in version else [exe]


def run_job(cmd: list, timeout: float = TIMEOUT, cwd=None):
    """Run ``cmd`` (a plain process or an mpiexec job) with MPI allowed as root,
    loopback networking and one BLAS thread per process.  Returns (returncode,
    stdout+stderr, seconds); a job still running after ``timeout`` is killed with
    its whole process group and fails the test."""
    cmd = [str(c) for c in cmd]
    env = dict(os.environ)
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_btl_tcp_if_include="lo",  # loopback only (same-node ranks use shared memory anyway)
        OMPI_MCA_mpi_yield_when_idle="1",  # waiting ranks yield the core (CI machines are small and shared)
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {timeout} s (a hang):\n{out[-3000:]}")
    return proc.returncode, out, time.monotonic() - t0


def launch(n: int, *args, timeout: float = TIMEOUT):
    """Run the worker on n ranks (n=0: a plain single process, no mpiexec)."""
    cmd = [sys.executable, str(WORKER), *args]
    return run_job([*_mpiexec(), "-n", n, *cmd] if n else cmd, timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Final parameters after 20 steps: one plain process, K = 1, 2, 4 ranks (the
    2-rank job also checkpoints after step 10), and 1 rank resuming that checkpoint."""
    d = tmp_path_factory.mktemp("dist")
    out = {}
    for name, n, extra in [
        ("ref", 0, []),
        (1, 1, []),
        (2, 2, ["--save-at", 10, d / "ck2.npz"]),
        (4, 4, []),
        ("resume", 0, ["--resume", d / "ck2.npz"]),
    ]:
        rc, log, _ = launch(n, d / f"{name}.npz", *extra)
        assert rc == 0, f"run {name} failed:\n{log[-3000:]}"
        with np.load(d / f"{name}.npz") as z:
            out[name] = {k: z[k] for k in z.files}
    return out


def max_rel_diff(a: dict, b: dict, config: str) -> float:
    """max over the parameters of one model of max|a - b| / max|b|."""
    keys = [k for k in b if k.startswith(config + "/") and not k.endswith("accuracy")]
    return max(float(np.max(np.abs(a[k] - b[k])) / np.max(np.abs(b[k]))) for k in keys)


@pytest.mark.slow
@pytest.mark.parametrize("K", [1, 2, 4])
def test_K_ranks_give_the_single_process_parameters(runs, K, record_property, capsys):
    """The differences are printed (also without -s) and recorded as junit properties."""
    got, ref = runs[K], runs["ref"]
    assert int(got["size"]) == K and float(got["in_sync"]) == 1.0  # every rank bit-identical
    diffs = {config: max_rel_diff(got, ref, config) for config in CONFIGS}
    with capsys.disabled():
        print(f"\n[distributed] K={K}, 20 steps, max relative difference to 1 process: "
              + ", ".join(f"{c} {d:.2e}" for c, d in diffs.items()))
    for config, diff in diffs.items():
        record_property(f"max_rel_diff_K{K}_{config}", diff)
        assert diff <= TOL[config.split("_")[1]], (config, diff)
        assert float(got[f"{config}/accuracy"]) == float(ref[f"{config}/accuracy"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_models_of_another_namespace_are_reduced_through_the_host(runs, tmp_path):
    """torch CPU models on 2 ranks: their gradients go through the host buffers over
    MPI (the path GPU arrays take without NCCL) and end where NumPy's 1 process ends."""
    rc, log, _ = launch(2, tmp_path / "torch.npz", "--xp", "torch")
    assert rc == 0, log[-3000:]
    with np.load(tmp_path / "torch.npz") as z:
        got = {k: z[k] for k in z.files}
    assert str(got["backend"]) == "mpi" and float(got["in_sync"]) == 1.0
    for config in CONFIGS:
        assert max_rel_diff(got, runs["ref"], config) <= TOL[config.split("_")[1]], config


@pytest.mark.slow
def test_checkpoint_from_2_ranks_resumes_on_1(runs):
    """Exact equality cannot hold: steps 1-10 summed the gradient over two shards
    and then over ranks (a different rounding order from one process), so the
    resumed run matches to floating-point tolerance, like any K-rank run."""
    for config in CONFIGS:
        diff = max_rel_diff(runs["resume"], runs["ref"], config)
        print(f"2 ranks -> checkpoint at step 10 -> 1 rank, {config}: max relative difference {diff:.2e}")
        assert diff <= TOL[config.split("_")[1]], (config, diff)


@pytest.mark.slow
def test_a_rank_that_raises_ends_the_job_naming_the_rank(tmp_path):
    rc, log, secs = launch(2, tmp_path / "x.npz", "--fail-rank", 1, "--fail-step", 3, "--fail-mode", "raise")
    assert rc != 0 and secs < TIMEOUT
    assert "rank 1 failed: RuntimeError: injected failure at step 3" in log


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exit", "kill"])
def test_a_rank_that_dies_ends_the_job(tmp_path, mode):
    """A rank gone without a word (os._exit, SIGKILL) while the other waits in an
    allreduce: mpiexec notices and ends the job, non-zero, well within the timeout."""
    rc, log, secs = launch(2, tmp_path / "x.npz", "--fail-rank", 1, "--fail-step", 3, "--fail-mode", mode)
    assert rc != 0 and secs < TIMEOUT, log[-2000:]
    assert not (tmp_path / "x.npz").exists()
    # the launcher names the rank: Open MPI "process rank 1" / "[prterun-...@1,1]" / "[[job,1],1]", MPICH "RANK 1"
    assert re.search(r"rank 1\b|@1,1\]|\[\[\d+,1\],1\]", log, re.IGNORECASE), log[-2000:]


# --------------------------------------------------------------------------- the xpconv command


CLI = [sys.executable, "-c", "import sys; from xpconv.cli import main; sys.exit(main())", "train",
       "--device", "cpu", "--no-plots"]
CLI_TOL_FLOAT64 = 1e-9  # float64, 28 steps an epoch: the K-rank sums round differently (measured ~1e-14)


def _in_dir(directory) -> list[str]:
    """argv prefix running the rest of the command in ``directory`` (one rank of an MPMD job)."""
    return ["sh", "-c", 'cd "$0" && exec "$@"', str(directory)]


def _ckpt(run_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(run_dir / "last.safetensors")


def _metrics(run_dir: Path) -> dict:
    import json

    return json.loads((run_dir / "metrics.json").read_text())


def _ckpt_diff(a: dict, b: dict) -> float:
    """max over the floating arrays (weights and optimizer state) of max|a - b| / max|b|."""
    keys = [k for k in b if b[k].dtype.kind == "f" and b[k].size]
    assert keys and sorted(a) == sorted(b)
    return max(float(np.max(np.abs(a[k] - b[k])) / max(float(np.max(np.abs(b[k]))), 1e-30)) for k in keys)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """``xpconv train`` on the bundled digits (SimpleConvNet, the recipe's global batch
    50): 1 process for 2 and 3 epochs; 2 ranks for 2 epochs, launched as an MPMD job
    whose ranks run in different folders with a relative --out (as on two nodes
    without a shared disk), so a file written by rank 1 would land in its own folder;
    and the two checkpoints of epoch 2 resumed to epoch 3 on the other rank count.
    Also DeepConvNet (dropout) for 1 epoch on 1 process and on 2 ranks."""
    d = tmp_path_factory.mktemp("cli")
    (d / "rank0").mkdir()
    (d / "rank1").mkdir()
    logs = {}

    def job(name, cmd):
        rc, log, _ = run_job(cmd)
        assert rc == 0, f"{name} failed:\n{log[-3000:]}"
        logs[name] = log

    # float64: in float32 any change of summation order (K-rank sums, a thread count, a
    # kernel's chunking) tips a ReLU or a max-pool choice in about 1 of 10 seeds within 2
    # epochs and grows from there (seen: 3e-4 .. 1e-1 for SimpleConvNet, 3e-4 after 28 steps
    # for DeepConvNet; benchmarks/prototypes/float32_tipping.py); in float64 the comparison
    # shows the masks and the step alone.  Resumed runs keep the checkpoint's float64.
    f64 = ["--dtype", "float64"]
    job("one2", [*CLI, *f64, "--epochs", 2, "--out", d / "one2"])
    job("one3", [*CLI, *f64, "--epochs", 3, "--out", d / "one3"])
    two = [*CLI, *f64, "--distributed", "--epochs", 2, "--out", "two2"]
    job("two2", [*_mpiexec(), "-n", 1, *_in_dir(d / "rank0"), *two, ":", "-n", 1, *_in_dir(d / "rank1"), *two])
    job("two2_to_one3", [*CLI, "--resume", d / "rank0" / "two2" / "last.safetensors", "--epochs", 3, "--out", d / "two2_to_one3"])
    job("one2_to_two3", [*_mpiexec(), "-n", 2, *CLI, "--distributed", "--resume", d / "one2" / "last.safetensors",
                         "--epochs", 3, "--out", d / "one2_to_two3"])
    job("deep_one1", [*CLI, "--model", "deep", *f64, "--epochs", 1, "--out", d / "deep_one1"])
    job("deep_two1", [*_mpiexec(), "-n", 2, *CLI, "--distributed", "--model", "deep", *f64, "--epochs", 1, "--out", d / "deep_two1"])
    return d, logs


@pytest.mark.slow
def test_cli_two_ranks_train_like_one_process_and_only_rank_0_prints_and_writes(cli_runs):
    d, logs = cli_runs
    two, one = d / "rank0" / "two2", d / "one2"
    log = logs["two2"]
    assert "2 ranks" in log
    for line in ("epoch 1/2 ", "epoch 2/2 ", "test accuracy ", "results in two2"):
        assert log.count(line) == 1, (line, log)  # rank 1 prints nothing
    assert sorted(os.listdir(d / "rank1")) == []  # and writes nothing
    assert {"last.safetensors", "metrics.json"} <= set(os.listdir(two))
    diff = _ckpt_diff(_ckpt(two), _ckpt(one))
    print(f"xpconv train --dtype float64, 2 ranks vs 1 process, digits, 2 epochs: max relative difference {diff:.2e}")
    assert diff <= CLI_TOL_FLOAT64
    m2, m1 = _metrics(two), _metrics(one)
    assert (m2["config"]["ranks"], m1["config"]["ranks"]) == (2, 1)
    acc2, acc1 = [r["test_acc"] for r in m2["epochs"]], [r["test_acc"] for r in m1["epochs"]]
    assert len(acc2) == 2 and np.allclose(acc2, acc1, atol=1.5 / 359)  # at most one test sample apart
    # the reported train loss is the global batch's (summed over ranks), not rank 0's shard's
    np.testing.assert_allclose([r["train_loss"] for r in m2["epochs"]], [r["train_loss"] for r in m1["epochs"]], rtol=1e-5)


@pytest.mark.slow
def test_cli_dropout_model_on_two_ranks_trains_like_one_process(cli_runs):
    """DeepConvNet's dropout masks come from (seed, global step, layer) in one process
    and in K ranks alike, so --distributed changes nothing but rounding."""
    d, _ = cli_runs
    diff = _ckpt_diff(_ckpt(d / "deep_two1"), _ckpt(d / "deep_one1"))
    print(f"xpconv train --model deep --dtype float64, 2 ranks vs 1 process, digits, 1 epoch: max relative difference {diff:.2e}")
    assert diff <= CLI_TOL_FLOAT64
    assert _metrics(d / "deep_two1")["epochs"][0]["test_acc"] == pytest.approx(_metrics(d / "deep_one1")["epochs"][0]["test_acc"], abs=1.5 / 359)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["two2_to_one3", "one2_to_two3"])
def test_cli_checkpoint_resumes_on_a_different_number_of_ranks(cli_runs, run):
    """Epochs 1-2 on 2 ranks and epoch 3 on 1 process (and the reverse) end where
    3 uninterrupted epochs on 1 process end."""
    d, logs = cli_runs
    assert "after epoch 2" in logs[run] and logs[run].count("epoch 3/3 ") == 1
    assert "the checkpoint was trained on" in logs[run]  # the rank count changed, and the command says so
    m = _metrics(d / run)
    assert [r["epoch"] for r in m["epochs"]] == [1, 2, 3]
    diff = _ckpt_diff(_ckpt(d / run), _ckpt(d / "one3"))
    print(f"xpconv train {run}: max relative difference to 3 epochs on 1 process {diff:.2e}")
    assert diff <= CLI_TOL_FLOAT64
    ref = _metrics(d / "one3")["epochs"]
    assert abs(m["epochs"][-1]["test_acc"] - ref[-1]["test_acc"]) <= 1.5 / 359


@pytest.mark.slow
def test_cli_an_error_on_one_rank_only_ends_the_job_naming_the_rank(tmp_path):
    """MNIST under --data-dir data exists on rank 0's node only (MPMD job, a folder per
    rank): rank 1's dataset error, met after MPI is up, must end the whole job instead
    of leaving rank 0 waiting in the first broadcast."""
    from .conftest import shared_dataset

    mnist = shared_dataset("mnist")
    for r in (0, 1):
        (tmp_path / f"rank{r}").mkdir()
    (tmp_path / "rank0" / "data").symlink_to(mnist, target_is_directory=True)
    cmd = [*CLI, "--distributed", "--dataset", "mnist", "--data-dir", "data", "--no-download", "--epochs", 1, "--out", "run"]
    rc, log, secs = run_job([*_mpiexec(), "-n", 1, *_in_dir(tmp_path / "rank0"), *cmd, ":", "-n", 1, *_in_dir(tmp_path / "rank1"), *cmd])
    assert rc != 0 and secs < TIMEOUT, log[-3000:]
    assert "xpconv.distributed: rank 1 failed: MNIST files missing from data" in log, log[-3000:]


@pytest.mark.slow
def test_the_python_example_of_docs_distributed_runs_on_two_ranks(tmp_path):
    """docs/DISTRIBUTED.md's "From Python" example, as written, under mpiexec -n 2."""
    import re

    text = (ROOT / "docs" / "DISTRIBUTED.md").read_text()
    code = re.search(r"## From Python\n\n```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "example.py").write_text(code)
    rc, log, _ = run_job([*_mpiexec(), "-n", 2, sys.executable, tmp_path / "example.py"], cwd=tmp_path)
    assert rc == 0, log[-3000:]
    assert log.count("test accuracy ") == 1 and log.count("epoch 5/5") == 1  # rank 0 only
    assert (tmp_path / "runs" / "dp" / "last.safetensors").exists()


# --------------------------------------------------------------------------- NCCL on a GPU


def _cuda_why_not() -> str:
    """'' when CuPy and a CUDA device work, else why not."""
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed"
    ok, why = backend.cuda_status()
    return "" if ok else f"no usable CUDA device: {why}"


CUDA_WHY_NOT = _cuda_why_not()


@pytest.mark.gpu
@pytest.mark.skipif(bool(CUDA_WHY_NOT), reason=CUDA_WHY_NOT or "CUDA works")
def test_nccl_one_rank_communicator_on_a_gpu():
    """A real 1-rank NCCL communicator (id over MPI COMM_SELF): allreduce_mean of
    CuPy gradients of two dtypes, one NCCL call per dtype, leaves them equal and on
    the GPU; broadcast keeps the parameters."""
    import cupy

    comm = distributed.Communicator(MPI.COMM_SELF, device="cuda", nccl=distributed._NCCLTransport(MPI.COMM_SELF))
    assert comm.backend == "nccl"
    rng = np.random.default_rng(0)
    host = {"W1": rng.standard_normal((30, 1, 5, 5)).astype(np.float32), "b1": rng.standard_normal(30).astype(np.float32),
            "W2": rng.standard_normal((7, 3))}
    for _ in range(2):
        grads = {k: cupy.asarray(v) for k, v in host.items()}
        comm.allreduce_mean(grads)
        cupy.cuda.get_current_stream().synchronize()
        for k, v in host.items():
            assert isinstance(grads[k], cupy.ndarray) and grads[k].dtype == v.dtype
            np.testing.assert_array_equal(cupy.asnumpy(grads[k]), v)
    assert comm.stats.collective_calls == 4 and comm.stats.allreduce_calls == 2
    net = SimpleConvNet((1, 8, 8), {"filter_num": 3, "filter_size": 3}, hidden_size=5, output_size=3, xp="cupy", seed=1)
    before = net.state_arrays()
    comm.broadcast_params(net.params)
    cupy.cuda.get_current_stream().synchronize()
    for k, v in net.state_arrays().items():
        np.testing.assert_array_equal(v, before[k])
    with pytest.raises(TypeError, match="unsupported dtype int32"):
        comm._nccl.allreduce_sum_(cupy.zeros(2, cupy.int32))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(bool(CUDA_WHY_NOT), reason=CUDA_WHY_NOT or "CUDA works")
def test_nccl_job_of_one_rank_trains_like_the_mpi_path_and_the_cpu(runs, tmp_path):
    """``mpiexec -n 1`` worker with --device cuda (setup() picks NCCL) against the
    same job reducing through the host over MPI: equal; the dropout-free
    models also match the CPU run (CuPy kernels sum in another order)."""
    got = {}
    for name, extra in [("nccl", []), ("mpi", ["--backend", "mpi"])]:
        rc, log, _ = launch(1, tmp_path / f"{name}.npz", "--device", "cuda", *extra)
        assert rc == 0, log[-3000:]
        with np.load(tmp_path / f"{name}.npz") as z:
            got[name] = {k: z[k] for k in z.files}
        assert str(got[name]["backend"]) == name
    assert float(got["nccl"]["in_sync"]) == 1.0
    for config in CONFIGS:  # the same kernels, one rank: the transports agree (bit-equal unless cuBLAS varies)
        assert max_rel_diff(got["nccl"], got["mpi"], config) <= TOL[config.split("_")[1]], config
        assert float(got["nccl"][f"{config}/accuracy"]) == float(got["mpi"][f"{config}/accuracy"])
    for config in ("simple_float32", "simple_float64"):
        diff = max_rel_diff(got["nccl"], runs["ref"], config)
        print(f"GPU NCCL 1 rank vs CPU 1 process, {config}: max relative difference {diff:.2e}")
        assert diff <= {"float32": 1e-4, "float64": 1e-10}[config.split("_")[1]], (config, diff)
