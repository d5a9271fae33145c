"""xpconv's CuPy code against the real CuPy wheels, not a model of them.

The wheels import without a GPU.  Each is installed (``pip install --no-deps --target``,
with the one or two small packages it imports) into a cache folder outside the test
environment -- two CuPy wheels side by side break each other, and the main environment
must keep seeing no CuPy -- and ``tests/cupy_probe.py`` runs in a subprocess with that
folder on ``PYTHONPATH``.  The tests then check:

* every ``cupy.<...>`` attribute xpconv's code names resolves in the wheel;
* the signatures xpconv relies on: ``RawModule(code=..., options=tuple)``,
  ``RawKernel.__call__(grid, block, args)``, ``MemoryHook``'s ``**kwargs`` hooks,
  ``MemoryPool.free_bytes``, NCCL's ``NcclCommunicator`` argument and
  ``get_unique_id``'s return type (from the docstrings compiled into the wheel: the NCCL
  module itself needs libnccl to import), and ``nccl.available`` without the library;
* the stand-ins of tests/ (``cuda_host.fake_cupy``, ``FakeNccl`` of test_distributed.py)
  offer nothing the wheel lacks and model the NCCL signature of that CuPy: a test fails
  when they drift.

Which wheels: ``cupy-cuda13x==14.2.0`` always (the smallest download); with
``XPCONV_ALL_CUPY_WHEELS=1`` also ``cupy-cuda12x==14.2.0`` and ``cupy-cuda12x==13.6.0``.
The cache folder is ``XPCONV_CUPY_CACHE`` (default ``~/.cache/xpconv-tests/cupy``); a
folder ``<cache>/<dist>-<version>`` already holding the wheel is used as it is.  Without
network and without a cached wheel the test skips, except under CI=true, where it fails.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from . import cuda_host
from .test_distributed import FakeNccl

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: (distribution, version, the packages it imports besides numpy)
WHEELS = [("cupy-cuda13x", "14.2.0", ("cuda-pathfinder>=1.3.4,<2",))]
if os.environ.get("XPCONV_ALL_CUPY_WHEELS"):
    WHEELS += [("cupy-cuda12x", "14.2.0", ("cuda-pathfinder>=1.3.4,<2",)), ("cupy-cuda12x", "13.6.0", ("fastrlock>=0.5",))]


def _cache() -> pathlib.Path:
    return pathlib.Path(os.environ.get("XPCONV_CUPY_CACHE", pathlib.Path.home() / ".cache" / "xpconv-tests" / "cupy"))


def _site(dist: str, version: str, deps) -> pathlib.Path:
    """A folder holding ``dist==version`` and its imports, installed once (atomically: a
    temporary folder renamed into place)."""
    site = _cache() / f"{dist.replace('-', '_')}-{version}"
    if (site / "cupy" / "__init__.py").exists():
        return site
    site.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=site.name + ".", dir=site.parent))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(tmp),
           f"{dist}=={version}", *deps]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        why = f"cannot install {dist}=={version}: {(proc.stderr or proc.stdout).strip()[-500:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    try:
        tmp.rename(site)
    except OSError:  # another run put it there first
        shutil.rmtree(tmp, ignore_errors=True)
    return site


def xpconv_cupy_attributes() -> list[str]:
    """Every ``cupy.<name>...`` xpconv's GPU code names (xpconv/ and the GPU benchmark
    harness), as written: attribute chains, not calls on arrays."""
    files = [*ROOT.joinpath("xpconv").rglob("*.py"), ROOT / "benchmarks" / "harness.py",
             *ROOT.joinpath("benchmarks", "gpu").glob("*.py")]
    names = set()
    for f in files:
        for m in re.finditer(r"(?<![\w.])cupy((?:\.[A-Za-z_]\w*)+)", f.read_text()):
            chain = "cupy" + m[1]
            if chain.startswith("cupy.cuda.nccl.") or chain.startswith("cupy.py"):
                continue  # NCCL's names need libnccl to resolve (checked below); cupy_ops.py-like file names
            names.add(chain)
    # `from cupy.cuda import nccl, memory_hook` and the names used through a module alias
    names |= {"cupy.cuda.nccl", "cupy.cuda.memory_hook.MemoryHook", "cupy.cuda.MemoryPool.free_bytes",
              "cupy.cuda.runtime.getDevice", "cupy.cuda.runtime.memGetInfo", "cupy.RawKernel.__call__"}
    return sorted(names)


def stand_in_names() -> set[str]:
    """What tests/cuda_host.py's fake cupy offers, as dotted names of the real module."""
    fake = cuda_host.fake_cupy()
    offered = {f"cupy.{n}" for n in vars(fake) if not n.startswith("_")}
    offered |= {f"cupy.cuda.runtime.{n}" for n in vars(cuda_host.FakeRuntime) if not n.startswith("_") and callable(getattr(cuda_host.FakeRuntime, n))}
    offered |= {f"cupy.cuda.MemoryPool.{n}" for n in vars(cuda_host.FakeMemoryPool) if not n.startswith("_")}
    return offered


@pytest.fixture(scope="module", params=WHEELS, ids=[f"{d}-{v}" for d, v, _ in WHEELS])
def facts(request):
    dist, version, deps = request.param
    site = _site(dist, version, deps)
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    names = sorted(set(xpconv_cupy_attributes()) | stand_in_names())
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cupy_probe.py"), *names],
                          capture_output=True, text=True, env=env, timeout=300, cwd=site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data["version"] == version, f"{site} holds CuPy {data['version']}, expected {version}"
    return data


def _major(facts) -> int:
    return int(facts["version"].split(".")[0])


def test_the_attribute_scan_sees_what_xpconv_calls():
    names = xpconv_cupy_attributes()
    for must in ("cupy.RawModule", "cupy.cuda.runtime.getDeviceCount", "cupy.cuda.get_current_stream", "cupy.get_default_memory_pool"):
        assert must in names, must


def test_every_cupy_attribute_xpconv_names_exists(facts):
    missing = {k: facts["attrs"][k]["why"] for k in xpconv_cupy_attributes() if not facts["attrs"][k]["ok"]}
    assert not missing, f"CuPy {facts['version']} lacks: {missing}"


def test_the_signatures_xpconv_calls_with(facts):
    a = facts["attrs"]
    # cuda_source.module: cupy.RawModule(code=<str>, options=<tuple>) -- options must be a tuple
    raw = facts["raw_module"]
    assert re.search(r"\bcode=None, \*", raw) and "tuple options=()" in raw, raw
    from xpconv.kernels import cuda_source

    assert isinstance(cuda_source.OPTIONS, tuple) and all(isinstance(o, str) for o in cuda_source.OPTIONS)
    # cupy_ops._launch: kernel(grid, block, args) with tuples
    assert "__call__(self, grid, block, args, \\*, shared_mem=0)" in facts["raw_kernel_call_doc"]
    # the probes and the slice budget: device queries take no argument and return ints / (free, total)
    assert a["cupy.cuda.runtime.getDevice"]["describe"] == "getDevice() -> int"
    assert a["cupy.cuda.runtime.getDeviceCount"]["describe"].startswith("getDeviceCount()")
    assert a["cupy.cuda.runtime.memGetInfo"]["describe"] == "memGetInfo()"
    assert a["cupy.cuda.runtime.deviceGetPCIBusId"]["describe"].startswith("deviceGetPCIBusId(int device)")
    assert "free_bytes" in facts["memory_pool_methods"]
    # benchmarks.harness.CupyPeak: hooks called with keyword arguments only
    hooks = facts["memory_hook"]
    assert hooks["malloc_postprocess"] == ["self", "kwargs"] and hooks["free_postprocess"] == ["self", "kwargs"]


def test_nccl_id_and_communicator_are_what_xpconv_passes(facts):
    """CuPy 14: get_unique_id() gives bytes and NcclCommunicator takes bytes; CuPy 13: a
    tuple both ways.  xpconv.distributed rebuilds the id in the form rank 0's CuPy gave."""
    nccl = facts["nccl"]
    from xpconv import distributed

    if _major(facts) >= 14:
        assert nccl["communicator"] == "NcclCommunicator(int ndev, bytes commId, int rank, NcclConfig config=None)"
        assert nccl["get_unique_id_doc"] == "Fetch the NCCL unique ID as a Python bytes object."
        raw, form = distributed._nccl_id_to_wire(bytes(range(128)))
        assert type(distributed._nccl_id_from_wire(raw, form)) is bytes
    else:
        assert nccl["communicator"] == "NcclCommunicator(int ndev, tuple commId, int rank)"
        raw, form = distributed._nccl_id_to_wire(tuple(range(-64, 64)))
        assert type(distributed._nccl_id_from_wire(raw, form)) is tuple
    # the stand-in test_distributed.py trains against models this very signature
    assert FakeNccl.SIGNATURES[_major(facts)] == nccl["communicator"]


def test_without_libnccl_cupy_says_so_only_through_available(facts):
    """This machine has no libnccl: the module imports, ``available`` is False and there is no
    get_unique_id -- the case xpconv.distributed turns into a clear message."""
    assert facts["nccl_available"] is False
    assert "get_unique_id" not in facts["nccl_attrs_without_lib"] and "available" in facts["nccl_attrs_without_lib"]
    assert facts["attrs"]["cupy.cuda.nccl"]["ok"]


def test_the_host_stand_in_offers_nothing_the_real_cupy_lacks(facts):
    """tests/cuda_host.py's fake cupy: each name it offers exists in the wheel (a stand-in
    that grew an API CuPy does not have would let xpconv call it)."""
    offered = stand_in_names()
    assert len(offered) > 10 and offered <= set(facts["attrs"])
    missing = {n: facts["attrs"][n]["why"] for n in offered if not facts["attrs"][n]["ok"]}
    assert not missing, f"the stand-in offers what CuPy {facts['version']} lacks: {missing}"
    # and its launch check models CuPy's call: (grid, block, args) positionally, no options
    with pytest.raises(TypeError, match="unexpected launch options"):
        kernel = object.__new__(cuda_host.HostKernel)
        kernel.name = "xpc_any"
        kernel((1,), (1,), (), shared_mem=0)
