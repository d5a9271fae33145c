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
import os
import shutil
import signal
import subprocess
import sys
import time
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


class FakeNccl:
    """The part of cupy.cuda.nccl that the NCCL transport uses, over host memory:
    allReduce reads and writes the buffer through its address (so a wrong pointer
    or count shows), as if every rank held the same data."""

    NCCL_SUM, NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = 0, 6, 7, 8
    _ctypes = {7: ctypes.c_float, 8: ctypes.c_double}

    def __init__(self):
        self.calls = []
        fake = self

        class NcclCommunicator:
            def __init__(self, ndev, uid, rank):
                assert len(uid) == 128
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

    @staticmethod
    def get_unique_id():
        return tuple((i * 7) % 256 - 128 for i in range(128))


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
    net = DeepConvNet((1, 8, 8), [{"filter_num": 2, "filter_size": 3, "pad": p} for p in (1, 1, 1, 2, 1, 1)],
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
    assert comm.backend == "nccl" and nccl.calls[0][0] == "init" and nccl.calls[0][1:] == (2, FakeNccl.get_unique_id(), 0)
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


def test_one_gpu_per_rank_is_checked():
    assert distributed._gpu_for_rank(3, 3, 4, 4) == 3
    assert distributed._gpu_for_rank(3, 3, 4, 1) == 0  # launcher shows each rank its own GPU
    with pytest.raises(ValueError, match="4 ranks on this node but 2 CUDA devices"):
        distributed._gpu_for_rank(3, 3, 4, 2)


# --------------------------------------------------------------------------- multi-rank jobs


def _mpiexec() -> list[str]:
    exe = shutil.which("mpiexec") or str(Path(sys.executable).with_name("mpiexec"))
    if not Path(exe).exists():
        if os.environ.get("CI") == "true":
            pytest.fail("mpiexec not found (pip install '.[test,mpi]' provides Open MPI's)")
        pytest.skip("mpiexec not found")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    return [exe, "--oversubscribe"] if "Open MPI" in version else [exe]


def launch(n: int, *args, timeout: float = TIMEOUT):
    """Run the worker on n ranks (n=0: a plain single process, no mpiexec).
    Returns (returncode, stdout+stderr, seconds); a job still running after
    ``timeout`` is killed with its whole process group and fails the test."""
    cmd = [sys.executable, str(WORKER), *map(str, args)]
    if n:
        cmd = [*_mpiexec(), "-n", str(n), *cmd]
    env = dict(os.environ)
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_btl_tcp_if_include="lo",  # loopback only (same-node ranks use shared memory anyway)
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {timeout} s (a hang):\n{out[-3000:]}")
    return proc.returncode, out, time.monotonic() - t0


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
def test_K_ranks_give_the_single_process_parameters(runs, K):
    got, ref = runs[K], runs["ref"]
    assert int(got["size"]) == K and float(got["in_sync"]) == 1.0  # every rank bit-identical
    for config in CONFIGS:
        diff = max_rel_diff(got, ref, config)
        print(f"K={K} {config}: max relative difference {diff:.2e} after 20 steps")
        assert diff <= TOL[config.split("_")[1]], (config, diff)
        assert float(got[f"{config}/accuracy"]) == float(ref[f"{config}/accuracy"])


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
