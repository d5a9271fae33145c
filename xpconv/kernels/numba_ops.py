"""Compiled (Numba) kernels for square KxK stride-1 convolutions (K in KERNEL_SIZES: 3
and 5) on NumPy arrays: installed with xpconv where Numba publishes wheels.

Imported after :mod:`.numpy_ops` when ``numba`` is importable (``kernels.OPTIONAL``;
``XPCONV_NUMBA=0`` in the environment leaves it out).  Its two convolution classes register for the
``"numpy"`` namespace with ``replaces=`` the NumPy kernels of the same ops, and run
those (``self.replaces``) for every case they do not cover: another filter size or a
non-square filter, a stride, unequal pads, a pool that is not 2x2/2, a dtype other than
float32/float64.  Any equal pad >= 0 is covered, dx included.

**Per machine.**  When this module loads it decides what the kernels are compiled for
(:func:`choose_target`, :data:`TARGET`; ``xpconv info`` prints it): the instruction-set level
of Numba's target (the host's, or ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``) picks the
register blocks (:data:`BLOCKS`), and on an AVX-512 target LLVM's preference for 256-bit
vectors (its tuning for Intel's AVX-512 cores) is switched off, so that the 16 x 16 block is 16
512-bit registers instead of 32 256-bit ones, which spill.  Numba compiles for one target per
process: the feature string set here holds for all Numba code of the process, and each
target is cached apart (the feature string is part of Numba's cache key).
It also switches on LLVM's SLP vectorizer (off in Numba by default), which the micro-kernel's
write-out needs (below).  ``XPCONV_NUMBA_TARGET=numba`` leaves Numba's target and vectorizer
settings as Numba sets them.  Numba's cache key holds the feature string but not the vectorizer
setting: where both modes compile for the same features (a target without AVX-512), a kernel
cached in one mode is reused in the other.

How they are fast (benchmarks/README.md, candidates 12 and 13, has the measurements):

* **The flat-row layout.**  The input is padded and stored channel-major, (C, N, Hp, Wp),
  with some slack at the end.  Output position (oh, ow) of a sample is numbered
  p = oh*Wp + ow, so filter tap (ky, kx) of channel c reads the *contiguous* run
  x[c, n, ky*Wp + kx + p]; the Wp - OW positions per row with ow >= OW are junk, computed
  and thrown away (7-25% extra work on DeepConvNet's layers, no index arithmetic).  Where
  rows are a multiple of the block's PB positions, blocks start at each row instead
  (:func:`_block_starts`) and no junk is computed: DeepConvNet's 16 x 16 layer on every
  target, its 8 x 8 layers with AVX2's 8-position blocks.
* **Register blocking.**  The micro-kernel keeps a block of FB output channels x PB
  positions in FB accumulators (AVX-512: 16 x 16, one 512-bit register each for float32,
  the positions being the vector lanes; AVX2: 8 x 8, one 256-bit register each) over the whole reduction (C x 3 x 3), broadcasting
  one weight per FMA; the input run is loaded once per tap for all 16 channels.  The
  accumulators are stack arrays indexed by constants only, so LLVM turns them into
  registers; the 16 output channels are written out one line each (no loop over them,
  which LLVM would vectorise the wrong way).  The K*K taps are a runtime loop around
  the 16 FMAs.
* **Epilogues in the same pass.**  bias + ReLU is applied as the accumulators are written
  out, straight into the output: rows of Wp positions, junk columns included, which the
  returned view (``[:FN, :, :OH, :OW]``, strided) leaves out; dx is written the same way.
  Measured on DeepConvNet, batch 100, one thread: forward 7.1 -> 5.9 ms and dx 19.9 -> 18.2 ms
  per step, against a separate pass over a per-sample scratch.  The pooled forward keeps that
  scratch: bias + 2x2 max-pool (first arg-max, as the reference) + ReLU read it per sample.
* **Backward.**  dz (the ReLU mask and pool routing applied) is laid out like the padded
  input with a border of max(0, K-1-pad) rows and columns (:func:`_border`; pad 0 works
  too), so dx is the same micro-kernel over dz with the flipped, transposed weights, and
  dW = sum_q dz[f, q] x[c, q + tap] is a blocked reduction over the batch's output positions
  q, gathered into tiles of real positions only (each tile row carries its flat offset, so
  the junk columns and border rows, 13-36% of DeepConvNet's flat positions, cost nothing;
  FV filters as the vector lanes, a channel's taps in groups of TG accumulators: 9 on AVX-512,
  where float32 runs two blocks of 16 filters at a time, and 5 on AVX2, two blocks of 8).  A pooled layer whose dx is
  not needed (a net's first) writes no full dz: dW's tiles (whole samples) are filled
  straight from the pool's routing (:func:`_dw_pool`), which halves SimpleConvNet's
  backward.
* **Threads.**  Samples (forward, dx) and position chunks (dW) run in ``prange``; Numba's
  thread count (``numba.set_num_threads``, ``NUMBA_NUM_THREADS``) sets how many.  During a
  pass after one that ran these kernels, BLAS keeps one thread (:class:`BlasYields`), and the
  pass's large products (``xpconv.ops.matmul``: Affine's) run as one single-threaded gemm of
  NumPy's OpenBLAS per Numba thread (:class:`Matmul`), so one pool of threads does all the work.

Every result equals the reference class in :mod:`xpconv.ops` (tests/test_numba_kernels.py).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .._geometry import conv_output_size, pair
from . import UpdateKernel, numpy_ops, register, register_step_scope

__all__ = ["AdamUpdate", "BlasYields", "Conv2d", "Conv2dReluMaxPool2d", "Matmul", "covers"]

def _feature_map(features: str) -> dict[str, bool]:
    """An LLVM feature string ("+avx2,-avx512f,...") as name -> on/off (the last mention wins)."""
    out: dict[str, bool] = {}
    for tok in features.split(","):
        tok = tok.strip()
        if len(tok) > 1 and tok[0] in "+-":
            out[tok[1:]] = tok[0] == "+"
    return out


#: ISA level -> (FB output channels x PB positions per forward/dx register block: FB accumulators
#: of PB lanes; FV filters per dW block; whether float32 dW runs two filter blocks at a time;
#: TG taps per dW accumulator group).  avx512 (32 registers of 16 float32): 16 x 16, and dW
#: 2 blocks x 9 taps = 18 accumulators of 16 lanes.  avx2 (16 registers of 8 float32): 8 x 8,
#: and dW 2 blocks x 5 taps = 10 accumulators of 8 lanes (a 3x3 filter's 9 taps padded to 10;
#: 5x5 fills 5 groups); the 16 x 16 blocks spill there (DeepConvNet's layers, forced to haswell
#: on a Zen 4, 1 thread: forward 13 -> 25-32 GFLOP/s, dW 9-10 -> 15-43).  other (SSE, NEON:
#: not measured): as avx2.
BLOCKS: dict[str, tuple[int, int, int, bool, int]] = {"avx512": (16, 16, 16, True, 9), "avx2": (8, 8, 8, True, 5), "other": (8, 8, 8, True, 5)}
AVX512 = ("avx512f", "avx512bw", "avx512dq", "avx512vl")


def choose_target(cpu_name: str | None, features: str | None, host_name: str, host_features: str, mode: str = "auto") -> dict[str, Any]:
    """The compile target these kernels use, from Numba's settings (``cpu_name`` and
    ``features``: ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``, None for the host's) and the
    host's: {"cpu": LLVM CPU name, "features": the feature string to set on Numba (None: leave
    Numba's as it is), "level": a key of :data:`BLOCKS`, "wide": whether 512-bit vectors are
    asked for}.

    ``mode`` "auto" (``XPCONV_NUMBA_TARGET`` unset): on an AVX-512 target, the LLVM tuning
    that prefers 256-bit vectors (Intel's cores from Skylake-X on) is switched off with
    ``-prefer-256-bit``: with it the 16 x 16 block spills (measured: 2-3x slower training);
    a feature string that already names ``prefer-256-bit`` is left alone.  "numba": Numba's
    target as it is."""
    if mode not in ("auto", "numba"):
        raise ValueError(f"XPCONV_NUMBA_TARGET: expected 'auto' or 'numba', got {mode!r}")
    name = cpu_name or host_name
    feats = host_features if features is None else features
    fm = _feature_map(feats)
    if all(fm.get(f) for f in AVX512):
        level = "avx512"
    elif fm.get("avx2") and fm.get("fma"):
        level = "avx2"
    else:
        level = "other"
    new = None
    if mode == "auto" and level == "avx512" and "prefer-256-bit" not in fm:
        new = feats + ",-prefer-256-bit"
        fm["prefer-256-bit"] = False
    return {"cpu": name, "features": new, "level": level, "wide": level == "avx512" and fm.get("prefer-256-bit") is False}


def _set_target() -> dict[str, Any]:
    """Apply :func:`choose_target` to Numba before anything here is compiled (Numba's CPU
    target is one per process: set here, it holds for all Numba code of the process, each
    setting cached apart, the feature string being part of Numba's cache key).  When
    Numba compiled something before this module loaded its target is fixed, and left as it is."""
    import llvmlite.binding as ll
    from numba.core import config as _config
    from numba.core import registry

    config: Any = _config  # its settings are set at run time (numba.core.config.reload_config)

    mode = os.environ.get("XPCONV_NUMBA_TARGET", "").strip() or "auto"
    started = "_toplevel_target_context" in registry.cpu_target.__dict__
    t = choose_target(config.CPU_NAME, config.CPU_FEATURES, ll.get_host_cpu_name(), ll.get_host_cpu_features().flatten(), mode)
    t["mode"] = mode
    if started:
        cg = registry.cpu_target.target_context.codegen()
        feats = cg._tm_features
        t = choose_target(config.CPU_NAME, feats, ll.get_host_cpu_name(), feats, "numba")
        t["mode"] = "fixed: Numba compiled before xpconv's kernels loaded"
    elif t["features"] is not None:
        config.CPU_FEATURES = t["features"]
    t["features"] = config.CPU_FEATURES  # what Numba compiles for (None: the host's)
    # LLVM's SLP vectorizer, off in Numba by default: it turns the micro-kernel's write-out of
    # its accumulators into vector stores (forward and dx 12% faster on DeepConvNet).  Numba reads
    # the setting at each compilation, so it holds for the code compiled from here on;
    # NUMBA_SLP_VECTORIZE in the environment, or XPCONV_NUMBA_TARGET=numba, leaves it as it is.
    if mode == "auto" and "NUMBA_SLP_VECTORIZE" not in os.environ:
        config.SLP_VECTORIZE = 1
    t["slp"] = bool(config.SLP_VECTORIZE)
    return t


#: the compile target in use (:func:`choose_target`), set when this module loads
TARGET = _set_target()

#: output channels (accumulators) and positions (vector lanes) per forward/dx register block,
#: filters per dW block (its lanes), whether float32 dW pairs filter blocks
FB, PB, FV, _PAIRS, TG = BLOCKS[TARGET["level"]]
QB = 2048  # positions per dW sub-chunk (its dz transpose stays in L1/L2)
#: pooled, no dx: dW's tiles straight from the pool's routing (SimpleConvNet's backward
#: 4.96 -> 2.78 ms at batch 100).  Equal to the reference; its db and dW sums are chunked by
#: samples instead of positions, so a float32 run rounds differently from the full-dz path,
#: which moves a float32 training run as much as a thread count does (both tip a ReLU or
#: pool choice in ~1 of 10 seeds: benchmarks/prototypes/float32_tipping.py).
DIRECT_POOL = True
KERNEL_SIZES = (3, 5)  # the square filter sizes covered (any odd size works; these are tested)

# fastmath: contract to FMAs and reassociate; error_model="numpy": no division checks
_jit = njit(fastmath=True, cache=True, error_model="numpy", boundscheck=False)
_pjit = njit(parallel=True, fastmath=True, cache=True, error_model="numpy", boundscheck=False)


@intrinsic
def _stack(typingctx, like, size):
    """A pointer to ``size`` (a literal) elements of ``like``'s dtype on the stack."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    n, dt = size.literal_value, like.dtype

    def impl(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(dt), size=context.get_constant(types.intp, n))

    return types.CPointer(dt)(like, size), impl


@njit(inline="always", fastmath=True, cache=True)
def _act(v, relu):
    """v, ReLU'd if ``relu`` (loop-invariant: LLVM takes the test out of the loop)."""
    return max(v, 0.0) if relu else v


@_jit
def _conv_sample(xf, base, cstride, C, Wp, K, wk, starts, zf, zb, zs, b, relu):
    """The KxK correlation of one sample, for each block start p0 in ``starts``
    (:func:`_block_starts`) and p in p0 .. p0 + PB - 1, plus the bias and ReLU'd if ``relu``,
    written straight from the accumulators to the flat zf[zb + f*zs + p]:
    conv[f, p] = sum_{c,ky,kx} wk[f // FB, c, K*ky + kx, f % FB] * xf[base + c*cstride + ky*Wp + kx + p],
    zf[zb + f*zs + p] = _act(conv[f, p] + b[f], relu) (b: one entry per packed filter)."""
    a0 = numba.carray(_stack(xf, PB), (PB,))
    a1 = numba.carray(_stack(xf, PB), (PB,))
    a2 = numba.carray(_stack(xf, PB), (PB,))
    a3 = numba.carray(_stack(xf, PB), (PB,))
    a4 = numba.carray(_stack(xf, PB), (PB,))
    a5 = numba.carray(_stack(xf, PB), (PB,))
    a6 = numba.carray(_stack(xf, PB), (PB,))
    a7 = numba.carray(_stack(xf, PB), (PB,))
    a8 = numba.carray(_stack(xf, PB), (PB,))
    a9 = numba.carray(_stack(xf, PB), (PB,))
    a10 = numba.carray(_stack(xf, PB), (PB,))
    a11 = numba.carray(_stack(xf, PB), (PB,))
    a12 = numba.carray(_stack(xf, PB), (PB,))
    a13 = numba.carray(_stack(xf, PB), (PB,))
    a14 = numba.carray(_stack(xf, PB), (PB,))
    a15 = numba.carray(_stack(xf, PB), (PB,))
    for fb in range(wk.shape[0]):
        for bi in range(starts.shape[0]):
            p0 = starts[bi]
            for j in range(PB):
                a0[j] = a1[j] = a2[j] = a3[j] = a4[j] = a5[j] = a6[j] = a7[j] = 0.0
                a8[j] = a9[j] = a10[j] = a11[j] = a12[j] = a13[j] = a14[j] = a15[j] = 0.0
            for c in range(C):
                cb = base + c * cstride + p0
                for ky in range(K):
                    for kx in range(K):
                        off = np.uint64(cb + ky * Wp + kx)  # unsigned: no wraparound test per load
                        w = wk[fb, c, ky * K + kx]
                        w0, w1, w2, w3, w4, w5, w6, w7 = w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]
                        w8, w9, w10, w11, w12, w13, w14, w15 = w[8], w[9], w[10], w[11], w[12], w[13], w[14], w[15]
                        for j in range(PB):
                            v = xf[off + np.uint64(j)]
                            a0[j] += w0 * v
                            a1[j] += w1 * v
                            a2[j] += w2 * v
                            a3[j] += w3 * v
                            a4[j] += w4 * v
                            a5[j] += w5 * v
                            a6[j] += w6 * v
                            a7[j] += w7 * v
                            a8[j] += w8 * v
                            a9[j] += w9 * v
                            a10[j] += w10 * v
                            a11[j] += w11 * v
                            a12[j] += w12 * v
                            a13[j] += w13 * v
                            a14[j] += w14 * v
                            a15[j] += w15 * v
            f = fb * FB
            b0, b1, b2, b3, b4, b5, b6, b7 = b[f], b[f + 1], b[f + 2], b[f + 3], b[f + 4], b[f + 5], b[f + 6], b[f + 7]
            b8, b9, b10, b11, b12, b13, b14, b15 = b[f + 8], b[f + 9], b[f + 10], b[f + 11], b[f + 12], b[f + 13], b[f + 14], b[f + 15]
            q = np.uint64(zb + f * zs + p0)  # unsigned, as the loads: no wraparound test per store
            us = np.uint64(zs)
            # LLVM unrolls these loops; its SLP vectorizer (switched on: TARGET["slp"]) makes each
            # one vector add (+ max) and store.  Without it, or with a signed index (Numba's test
            # for a negative index per element), the write-out is 256 scalar stores per block:
            # ~15% of a 16-channel layer's forward and dx.
            for j in range(PB):
                zf[q + np.uint64(j)] = _act(a0[j] + b0, relu)
            for j in range(PB):
                zf[q + us + np.uint64(j)] = _act(a1[j] + b1, relu)
            for j in range(PB):
                zf[q + np.uint64(2) * us + np.uint64(j)] = _act(a2[j] + b2, relu)
            for j in range(PB):
                zf[q + np.uint64(3) * us + np.uint64(j)] = _act(a3[j] + b3, relu)
            for j in range(PB):
                zf[q + np.uint64(4) * us + np.uint64(j)] = _act(a4[j] + b4, relu)
            for j in range(PB):
                zf[q + np.uint64(5) * us + np.uint64(j)] = _act(a5[j] + b5, relu)
            for j in range(PB):
                zf[q + np.uint64(6) * us + np.uint64(j)] = _act(a6[j] + b6, relu)
            for j in range(PB):
                zf[q + np.uint64(7) * us + np.uint64(j)] = _act(a7[j] + b7, relu)
            for j in range(PB):
                zf[q + np.uint64(8) * us + np.uint64(j)] = _act(a8[j] + b8, relu)
            for j in range(PB):
                zf[q + np.uint64(9) * us + np.uint64(j)] = _act(a9[j] + b9, relu)
            for j in range(PB):
                zf[q + np.uint64(10) * us + np.uint64(j)] = _act(a10[j] + b10, relu)
            for j in range(PB):
                zf[q + np.uint64(11) * us + np.uint64(j)] = _act(a11[j] + b11, relu)
            for j in range(PB):
                zf[q + np.uint64(12) * us + np.uint64(j)] = _act(a12[j] + b12, relu)
            for j in range(PB):
                zf[q + np.uint64(13) * us + np.uint64(j)] = _act(a13[j] + b13, relu)
            for j in range(PB):
                zf[q + np.uint64(14) * us + np.uint64(j)] = _act(a14[j] + b14, relu)
            for j in range(PB):
                zf[q + np.uint64(15) * us + np.uint64(j)] = _act(a15[j] + b15, relu)


@_jit
def _conv_sample8(xf, base, cstride, C, Wp, K, wk, starts, zf, zb, zs, b, relu):
    """:func:`_conv_sample` with blocks of 8 output channels (8 accumulators: AVX2's 16
    registers hold them with the input vector and the broadcast weight)."""
    a0 = numba.carray(_stack(xf, PB), (PB,))
    a1 = numba.carray(_stack(xf, PB), (PB,))
    a2 = numba.carray(_stack(xf, PB), (PB,))
    a3 = numba.carray(_stack(xf, PB), (PB,))
    a4 = numba.carray(_stack(xf, PB), (PB,))
    a5 = numba.carray(_stack(xf, PB), (PB,))
    a6 = numba.carray(_stack(xf, PB), (PB,))
    a7 = numba.carray(_stack(xf, PB), (PB,))
    for fb in range(wk.shape[0]):
        for bi in range(starts.shape[0]):
            p0 = starts[bi]
            for j in range(PB):
                a0[j] = a1[j] = a2[j] = a3[j] = a4[j] = a5[j] = a6[j] = a7[j] = 0.0
            for c in range(C):
                cb = base + c * cstride + p0
                for ky in range(K):
                    for kx in range(K):
                        off = np.uint64(cb + ky * Wp + kx)
                        w = wk[fb, c, ky * K + kx]
                        w0, w1, w2, w3, w4, w5, w6, w7 = w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]
                        for j in range(PB):
                            v = xf[off + np.uint64(j)]
                            a0[j] += w0 * v
                            a1[j] += w1 * v
                            a2[j] += w2 * v
                            a3[j] += w3 * v
                            a4[j] += w4 * v
                            a5[j] += w5 * v
                            a6[j] += w6 * v
                            a7[j] += w7 * v
            f = fb * 8
            b0, b1, b2, b3, b4, b5, b6, b7 = b[f], b[f + 1], b[f + 2], b[f + 3], b[f + 4], b[f + 5], b[f + 6], b[f + 7]
            q = np.uint64(zb + f * zs + p0)  # unsigned, as the loads: no wraparound test per store
            us = np.uint64(zs)
            for j in range(PB):
                zf[q + np.uint64(j)] = _act(a0[j] + b0, relu)
            for j in range(PB):
                zf[q + us + np.uint64(j)] = _act(a1[j] + b1, relu)
            for j in range(PB):
                zf[q + np.uint64(2) * us + np.uint64(j)] = _act(a2[j] + b2, relu)
            for j in range(PB):
                zf[q + np.uint64(3) * us + np.uint64(j)] = _act(a3[j] + b3, relu)
            for j in range(PB):
                zf[q + np.uint64(4) * us + np.uint64(j)] = _act(a4[j] + b4, relu)
            for j in range(PB):
                zf[q + np.uint64(5) * us + np.uint64(j)] = _act(a5[j] + b5, relu)
            for j in range(PB):
                zf[q + np.uint64(6) * us + np.uint64(j)] = _act(a6[j] + b6, relu)
            for j in range(PB):
                zf[q + np.uint64(7) * us + np.uint64(j)] = _act(a7[j] + b7, relu)



@_jit
def _block_starts(R, Wc, Wp):
    """The starts of the PB-position blocks that cover R rows of Wc positions at row stride Wp
    (position p = r * Wp + col): the flat run 0, PB, 2*PB, ... over (R-1)*Wp + Wc positions, or
    blocks aligned to each row (r*Wp, r*Wp + PB, ...), whichever is fewer.  Rows of a
    multiple of PB are then computed without the flat run's junk columns: a 16 x 16 output of
    row stride 18 takes 16 blocks instead of 18, an 8 x 8 one of stride 10 with 8-lane blocks 8
    instead of 10."""
    nflat = ((R - 1) * Wp + Wc + PB - 1) // PB
    per_row = (Wc + PB - 1) // PB
    if R * per_row < nflat:
        st = np.empty(R * per_row, np.int64)
        for r in range(R):
            for k in range(per_row):
                st[r * per_row + k] = r * Wp + k * PB
    else:
        st = np.empty(nflat, np.int64)
        for i in range(nflat):
            st[i] = i * PB
    return st


#: the micro-kernel of this target's block (a global: only it is compiled into the callers)
_sample = _conv_sample if FB == 16 else _conv_sample8

@_pjit
def _forward(xf, N, C, Hp, Wp, OH, OW, K, wk, b, relu, of, S):
    """conv(x) + b (ReLU'd if ``relu``) from the flat padded x, written by the micro-kernel
    straight into ``of``, the flat (FNp, N, S // Wp, Wp) output: sample n's position
    p = oh*Wp + ow of filter f at f*N*S + n*S + p (S >= the blocks' extent; the columns
    ow >= OW and the rows past OH hold junk, left out of the caller's view)."""
    starts = _block_starts(OH, OW, Wp)
    for n in prange(N):
        _sample(xf, n * Hp * Wp, N * Hp * Wp, C, Wp, K, wk, starts, of, n * S, N * S, b, relu)


@_pjit
def _forward_pool(xf, N, C, Hp, Wp, OH, OW, K, wk, b, out, idx, training):
    """out (FN, N, OH//2, OW//2) = relu(max-pool 2x2/2(conv(x) + b)); idx the first
    arg-max in the window (0..3, row-major) when ``training``."""
    FN, QH, QW = out.shape[0], out.shape[2], out.shape[3]
    starts = _block_starts(OH, OW, Wp)
    Lp = starts[-1] + PB
    for n in prange(N):
        z = np.empty(wk.shape[0] * FB * Lp, xf.dtype)
        _sample(xf, n * Hp * Wp, N * Hp * Wp, C, Wp, K, wk, starts, z, 0, Lp, b, False)
        for f in range(FN):
            for qy in range(QH):
                for qx in range(QW):
                    p = f * Lp + 2 * qy * Wp + 2 * qx
                    m = z[p]
                    k = 0
                    v = z[p + 1]
                    if v > m:
                        m, k = v, 1
                    v = z[p + Wp]
                    if v > m:
                        m, k = v, 2
                    v = z[p + Wp + 1]
                    if v > m:
                        m, k = v, 3
                    out[f, n, qy, qx] = max(m, 0.0)
                    if training:
                        idx[f, n, qy, qx] = k


@_pjit
def _dz(d, out, idx, relu, pool, Hp, Wp, B, dzf, db):
    """dz, the gradient at the conv output (the ReLU mask and the pool's routing
    applied), into dzf: (FN, N, Hp, Wp) flat, dz[f, n, oh, ow] at [f, n, B + oh, B + ow]
    (B, the border: :func:`_border`), zero elsewhere (dzf comes in zeroed).
    db[f] = the sum of dz[f].

    The mask is applied as the reference does, a multiplication by (out > 0), and every
    routed position is written: a branch on the mask's random signs mispredicts half the
    time, and LLVM turns a select into that branch on AVX2 targets (measured on a Zen 4
    forced to haswell: 8.0 ms against 1.1 ms for DeepConvNet's 28 x 28 layer at batch 100)."""
    FN, N = d.shape[0], d.shape[1]
    cs = N * Hp * Wp
    for f in prange(FN):
        s = 0.0
        for n in range(N):
            o = f * cs + n * Hp * Wp + B * (Wp + 1)
            dn = d[f, n]
            on = out[f, n]
            if pool:
                kn = idx[f, n]
                for qy in range(d.shape[2]):
                    for qx in range(d.shape[3]):
                        g = dn[qy, qx] * (on[qy, qx] > 0)
                        k = kn[qy, qx]
                        dzf[o + (2 * qy + k // 2) * Wp + 2 * qx + k % 2] = g
                        s += g
            else:
                for oh in range(d.shape[2]):
                    r = o + oh * Wp
                    for ow in range(d.shape[3]):
                        g = dn[oh, ow]
                        if relu:
                            g = g * (on[oh, ow] > 0)
                        dzf[r + ow] = g
                        s += g
        db[f] = s


@_pjit
def _dx(dzf, N, FN, Hp, Wp, H, W, P, K, B, wd, zb, dxf, S):
    """dx = the full correlation of dz (layout of :func:`_dz`, border B) with the flipped
    KxK filters wd (packed as :func:`_pack`), for pad P on both sides:
    dx[y, x] = sum_{ky,kx} dz[y + P - (K-1) + ky, x + P - (K-1) + kx] wflip[ky, kx],
    which starts at flat offset (P - (K-1) + B) * (Wp + 1) >= 0; written as :func:`_forward`
    writes (zb: zeros, one per packed channel) into the flat (Cp, N, S // Wp, Wp) dxf."""
    starts = _block_starts(H, W, Wp)
    shift = (P - (K - 1) + B) * (Wp + 1)
    for n in prange(N):
        _sample(dzf, n * Hp * Wp + shift, N * Hp * Wp, FN, Wp, K, wd, starts, dxf, n * S, N * S, zb, False)


@_jit
def _dw_tile(dT, m, qi, xf, C, Q, offs, pairs, nfb, part, k):
    """part[k, f, c, t] += sum_{i < m} dT[i, f] x[c, qi[i] + offs[t]] for the nfb blocks of
    FV filters (the first ``pairs`` pairs of them two blocks at a time): row i of the tile is
    the output position qi[i] (flat, in x's padded layout), so only real positions are
    summed, none of the flat layout's junk columns and border rows."""
    a0 = numba.carray(_stack(dT, FV), (FV,))
    a1 = numba.carray(_stack(dT, FV), (FV,))
    a2 = numba.carray(_stack(dT, FV), (FV,))
    a3 = numba.carray(_stack(dT, FV), (FV,))
    a4 = numba.carray(_stack(dT, FV), (FV,))
    a5 = numba.carray(_stack(dT, FV), (FV,))
    a6 = numba.carray(_stack(dT, FV), (FV,))
    a7 = numba.carray(_stack(dT, FV), (FV,))
    a8 = numba.carray(_stack(dT, FV), (FV,))
    b0 = numba.carray(_stack(dT, FV), (FV,))
    b1 = numba.carray(_stack(dT, FV), (FV,))
    b2 = numba.carray(_stack(dT, FV), (FV,))
    b3 = numba.carray(_stack(dT, FV), (FV,))
    b4 = numba.carray(_stack(dT, FV), (FV,))
    b5 = numba.carray(_stack(dT, FV), (FV,))
    b6 = numba.carray(_stack(dT, FV), (FV,))
    b7 = numba.carray(_stack(dT, FV), (FV,))
    b8 = numba.carray(_stack(dT, FV), (FV,))
    for fp in range(pairs):
        for c in range(C):
            for t0 in range(0, offs.shape[0], 9):
                for j in range(FV):
                    a0[j] = a1[j] = a2[j] = a3[j] = a4[j] = a5[j] = a6[j] = a7[j] = a8[j] = 0.0
                    b0[j] = b1[j] = b2[j] = b3[j] = b4[j] = b5[j] = b6[j] = b7[j] = b8[j] = 0.0
                o0, o1, o2, o3, o4 = offs[t0], offs[t0 + 1], offs[t0 + 2], offs[t0 + 3], offs[t0 + 4]
                o5, o6, o7, o8 = offs[t0 + 5], offs[t0 + 6], offs[t0 + 7], offs[t0 + 8]
                xb = np.uint64(c * Q)
                for i in range(m):
                    dq = dT[i, 2 * fp * FV : 2 * fp * FV + FV]
                    dr = dT[i, 2 * fp * FV + FV : 2 * fp * FV + 2 * FV]
                    o = xb + qi[i]
                    x0 = xf[o + o0]
                    x1 = xf[o + o1]
                    x2 = xf[o + o2]
                    x3 = xf[o + o3]
                    x4 = xf[o + o4]
                    x5 = xf[o + o5]
                    x6 = xf[o + o6]
                    x7 = xf[o + o7]
                    x8 = xf[o + o8]
                    for j in range(FV):
                        g = dq[j]
                        h = dr[j]
                        a0[j] += x0 * g
                        a1[j] += x1 * g
                        a2[j] += x2 * g
                        a3[j] += x3 * g
                        a4[j] += x4 * g
                        a5[j] += x5 * g
                        a6[j] += x6 * g
                        a7[j] += x7 * g
                        a8[j] += x8 * g
                        b0[j] += x0 * h
                        b1[j] += x1 * h
                        b2[j] += x2 * h
                        b3[j] += x3 * h
                        b4[j] += x4 * h
                        b5[j] += x5 * h
                        b6[j] += x6 * h
                        b7[j] += x7 * h
                        b8[j] += x8 * h
                for j in range(FV):
                    f = 2 * fp * FV + j
                    part[k, f, c, t0] += a0[j]
                    part[k, f, c, t0 + 1] += a1[j]
                    part[k, f, c, t0 + 2] += a2[j]
                    part[k, f, c, t0 + 3] += a3[j]
                    part[k, f, c, t0 + 4] += a4[j]
                    part[k, f, c, t0 + 5] += a5[j]
                    part[k, f, c, t0 + 6] += a6[j]
                    part[k, f, c, t0 + 7] += a7[j]
                    part[k, f, c, t0 + 8] += a8[j]
                    f += FV
                    part[k, f, c, t0] += b0[j]
                    part[k, f, c, t0 + 1] += b1[j]
                    part[k, f, c, t0 + 2] += b2[j]
                    part[k, f, c, t0 + 3] += b3[j]
                    part[k, f, c, t0 + 4] += b4[j]
                    part[k, f, c, t0 + 5] += b5[j]
                    part[k, f, c, t0 + 6] += b6[j]
                    part[k, f, c, t0 + 7] += b7[j]
                    part[k, f, c, t0 + 8] += b8[j]
    for fb in range(2 * pairs, nfb):
        for c in range(C):
            for t0 in range(0, offs.shape[0], 9):
                for j in range(FV):
                    a0[j] = a1[j] = a2[j] = a3[j] = a4[j] = a5[j] = a6[j] = a7[j] = a8[j] = 0.0
                o0, o1, o2, o3, o4 = offs[t0], offs[t0 + 1], offs[t0 + 2], offs[t0 + 3], offs[t0 + 4]
                o5, o6, o7, o8 = offs[t0 + 5], offs[t0 + 6], offs[t0 + 7], offs[t0 + 8]
                xb = np.uint64(c * Q)
                for i in range(m):
                    dq = dT[i, fb * FV : fb * FV + FV]
                    o = xb + qi[i]
                    x0 = xf[o + o0]
                    x1 = xf[o + o1]
                    x2 = xf[o + o2]
                    x3 = xf[o + o3]
                    x4 = xf[o + o4]
                    x5 = xf[o + o5]
                    x6 = xf[o + o6]
                    x7 = xf[o + o7]
                    x8 = xf[o + o8]
                    for j in range(FV):
                        g = dq[j]
                        a0[j] += x0 * g
                        a1[j] += x1 * g
                        a2[j] += x2 * g
                        a3[j] += x3 * g
                        a4[j] += x4 * g
                        a5[j] += x5 * g
                        a6[j] += x6 * g
                        a7[j] += x7 * g
                        a8[j] += x8 * g
                for j in range(FV):
                    f = fb * FV + j
                    part[k, f, c, t0] += a0[j]
                    part[k, f, c, t0 + 1] += a1[j]
                    part[k, f, c, t0 + 2] += a2[j]
                    part[k, f, c, t0 + 3] += a3[j]
                    part[k, f, c, t0 + 4] += a4[j]
                    part[k, f, c, t0 + 5] += a5[j]
                    part[k, f, c, t0 + 6] += a6[j]
                    part[k, f, c, t0 + 7] += a7[j]
                    part[k, f, c, t0 + 8] += a8[j]


@_jit
def _dw_tile5(dT, m, qi, xf, C, Q, offs, pairs, nfb, part, k):
    """:func:`_dw_tile` for 16-register targets (AVX2): the taps in groups of 5, the first
    ``pairs`` pairs of FV-filter blocks two at a time (10 accumulators, 7 loads per 10 FMAs
    against 10 loads per 9 FMAs for one block of 9 taps: 18 accumulators would not fit)."""
    a0 = numba.carray(_stack(dT, FV), (FV,))
    a1 = numba.carray(_stack(dT, FV), (FV,))
    a2 = numba.carray(_stack(dT, FV), (FV,))
    a3 = numba.carray(_stack(dT, FV), (FV,))
    a4 = numba.carray(_stack(dT, FV), (FV,))
    b0 = numba.carray(_stack(dT, FV), (FV,))
    b1 = numba.carray(_stack(dT, FV), (FV,))
    b2 = numba.carray(_stack(dT, FV), (FV,))
    b3 = numba.carray(_stack(dT, FV), (FV,))
    b4 = numba.carray(_stack(dT, FV), (FV,))
    for fp in range(pairs):
        f0 = 2 * fp * FV
        for c in range(C):
            for t0 in range(0, offs.shape[0], 5):
                for j in range(FV):
                    a0[j] = a1[j] = a2[j] = a3[j] = a4[j] = 0.0
                    b0[j] = b1[j] = b2[j] = b3[j] = b4[j] = 0.0
                o0, o1, o2, o3, o4 = offs[t0], offs[t0 + 1], offs[t0 + 2], offs[t0 + 3], offs[t0 + 4]
                xb = np.uint64(c * Q)
                for i in range(m):
                    dq = dT[i, f0 : f0 + FV]
                    dr = dT[i, f0 + FV : f0 + 2 * FV]
                    o = xb + qi[i]
                    x0 = xf[o + o0]
                    x1 = xf[o + o1]
                    x2 = xf[o + o2]
                    x3 = xf[o + o3]
                    x4 = xf[o + o4]
                    for j in range(FV):
                        g = dq[j]
                        h = dr[j]
                        a0[j] += x0 * g
                        a1[j] += x1 * g
                        a2[j] += x2 * g
                        a3[j] += x3 * g
                        a4[j] += x4 * g
                        b0[j] += x0 * h
                        b1[j] += x1 * h
                        b2[j] += x2 * h
                        b3[j] += x3 * h
                        b4[j] += x4 * h
                for j in range(FV):
                    f = f0 + j
                    part[k, f, c, t0] += a0[j]
                    part[k, f, c, t0 + 1] += a1[j]
                    part[k, f, c, t0 + 2] += a2[j]
                    part[k, f, c, t0 + 3] += a3[j]
                    part[k, f, c, t0 + 4] += a4[j]
                    f += FV
                    part[k, f, c, t0] += b0[j]
                    part[k, f, c, t0 + 1] += b1[j]
                    part[k, f, c, t0 + 2] += b2[j]
                    part[k, f, c, t0 + 3] += b3[j]
                    part[k, f, c, t0 + 4] += b4[j]
    for fb in range(2 * pairs, nfb):
        for c in range(C):
            for t0 in range(0, offs.shape[0], 5):
                for j in range(FV):
                    a0[j] = a1[j] = a2[j] = a3[j] = a4[j] = 0.0
                o0, o1, o2, o3, o4 = offs[t0], offs[t0 + 1], offs[t0 + 2], offs[t0 + 3], offs[t0 + 4]
                xb = np.uint64(c * Q)
                for i in range(m):
                    dq = dT[i, fb * FV : fb * FV + FV]
                    o = xb + qi[i]
                    x0 = xf[o + o0]
                    x1 = xf[o + o1]
                    x2 = xf[o + o2]
                    x3 = xf[o + o3]
                    x4 = xf[o + o4]
                    for j in range(FV):
                        g = dq[j]
                        a0[j] += x0 * g
                        a1[j] += x1 * g
                        a2[j] += x2 * g
                        a3[j] += x3 * g
                        a4[j] += x4 * g
                for j in range(FV):
                    f = fb * FV + j
                    part[k, f, c, t0] += a0[j]
                    part[k, f, c, t0 + 1] += a1[j]
                    part[k, f, c, t0 + 2] += a2[j]
                    part[k, f, c, t0 + 3] += a3[j]
                    part[k, f, c, t0 + 4] += a4[j]


#: this target's dW tile (a global: only it is compiled into the callers) and its tap group
_tile = _dw_tile if TG == 9 else _dw_tile5


@_pjit
def _dw(dzf, xf, N, C, FN, Hp, Wp, OH, OW, B, offs, pairs, part):
    """part[k] (FNp, C, T9) = chunk k's share of dW[f, c, t] = sum_q dz[f, q] x[c, q + offs[t]]
    over the batch's N * OH output rows of OW positions each (the flat layout's junk columns
    and border rows, where dz = 0, are skipped: 13-36% of the flat positions on DeepConvNet's
    layers), the taps in groups of 9 (T9 = 9 * groups; the offsets past the last tap are 0
    and their sums dropped by the caller).  The first ``pairs`` pairs of filter blocks run two
    blocks at a time (18 accumulators: each tap's x broadcast serves 32 filters, 11 loads per
    18 FMAs instead of 10 per 9; float32 only, float64's would not fit in the registers)."""
    K = part.shape[0]
    FNp = part.shape[1]
    S = Hp * Wp
    Q = N * S
    R = N * OH
    uQ = np.uint64(Q)
    rt = max(1, QB // OW)  # output rows per tile
    step = (R + K - 1) // K
    for k in prange(K):
        r0 = k * step
        r1 = min(R, r0 + step)
        dT = np.zeros((rt * OW, FNp), dzf.dtype)
        qi = np.empty(rt * OW, np.uint64)
        buf = np.empty((FN, 16), dzf.dtype)
        for t0 in range(r0, r1, rt):
            t1 = min(r1, t0 + rt)
            m = 0
            for r in range(t0, t1):
                q = (r // OH) * S + (r % OH) * Wp
                for ow in range(OW):
                    qi[m] = q + ow
                    m += 1
            # dz transposed into the tile by row segments of up to 16 positions: the segment of
            # every filter read into buf (contiguous loads), then written a tile row at a time
            # (contiguous stores): 2x faster than a store per element at a stride of FNp
            i = 0
            for r in range(t0, t1):
                q = np.uint64((r // OH) * S + (r % OH) * Wp + B * (Wp + 1))
                for ow0 in range(0, OW, 16):
                    L = min(16, OW - ow0)
                    o = q + np.uint64(ow0)
                    for f in range(FN):
                        of = o + np.uint64(f) * uQ
                        for j in range(L):
                            buf[f, j] = dzf[of + np.uint64(j)]
                    for j in range(L):
                        row = dT[i + j]
                        for f in range(FN):
                            row[f] = buf[f, j]
                    i += L
            _tile(dT, m, qi, xf, C, Q, offs, pairs, FNp // FV, part, k)


@_pjit
def _dw_pool(d, out, idx, xf, N, C, Hp, Wp, offs, pairs, part, pdb):
    """:func:`_dw` and db for a pooled ReLU conv without dx, dz built straight into each
    chunk's transposed tile from the pool's gradient, routing and mask (no full dz
    buffer): chunks of whole samples, each sample's 2*QH x 2*QW pooled window only (the
    positions the pool can route to); pdb[k, f] chunk k's share of db."""
    K = part.shape[0]
    FNp = part.shape[1]
    FN, QH, QW = d.shape[0], d.shape[2], d.shape[3]
    S = Hp * Wp
    Q = N * S
    PW2 = 2 * QW
    S2 = 2 * QH * PW2  # routed-to positions per sample
    nc = max(1, QB // S2)  # samples per tile
    step = (N + K - 1) // K
    for k in prange(K):
        n0 = k * step
        n1 = min(N, n0 + step)
        dT = np.empty((nc * S2, FNp), d.dtype)
        qi = np.empty(nc * S2, np.uint64)
        for m0 in range(n0, n1, nc):
            m1 = min(n1, m0 + nc)
            M = (m1 - m0) * S2
            dT[:M] = 0.0
            i = 0
            for n in range(m0, m1):
                for y in range(2 * QH):
                    for x in range(PW2):
                        qi[i] = n * S + y * Wp + x
                        i += 1
            for f in range(FN):
                s = 0.0
                for n in range(m0, m1):
                    o = (n - m0) * S2
                    dn, on, kn = d[f, n], out[f, n], idx[f, n]
                    for qy in range(QH):
                        for qx in range(QW):
                            g = dn[qy, qx] * (on[qy, qx] > 0)  # as in _dz: no branch on the mask
                            kk = kn[qy, qx]
                            dT[o + (2 * qy + kk // 2) * PW2 + 2 * qx + kk % 2, f] = g
                            s += g
                pdb[k, f] += s
            _tile(dT, M, qi, xf, C, Q, offs, pairs, FNp // FV, part, k)


# --------------------------------------------------------------------------- host side


class _Scratch:
    """Reused buffers for the kernels' large working arrays (the padded input, dz).

    A fresh multi-megabyte NumPy array is fresh memory from the system: glibc gives a freed
    one back (its heap trimmed, or the mapping unmapped) and the next step takes page faults
    to touch it again.  Measured on DeepConvNet, batch 100, one thread: ~2,700 faults and
    6-7 ms of system time per 80 ms training step.  Buffers here are kept and handed out
    again once nothing else refers to them (``sys.getrefcount``: a view's ``base`` is the
    buffer itself, so a live view keeps it taken); at most :attr:`KEEP` are kept, and one is
    reused only for a request of at least half its size, so nothing much larger than asked
    for stays alive behind a small result."""

    KEEP = 12
    LIMIT = 64 << 20  # bytes: larger requests are not pooled

    def __init__(self) -> None:
        self._bufs: list[np.ndarray] = []
        self._lock = threading.Lock()

    def zeros(self, n: int, dt) -> np.ndarray:
        """A zeroed 1-D array of n elements of dtype dt."""
        out = self.empty(n, dt)
        out.fill(0)
        return out

    def empty(self, n: int, dt) -> np.ndarray:
        """An uninitialised 1-D array of n elements of dtype dt."""
        dt = np.dtype(dt)
        nbytes = n * dt.itemsize
        if nbytes > self.LIMIT or nbytes < (256 << 10):
            return np.empty(n, dt)
        with self._lock:
            bufs = self._bufs
            # a buffer nothing else refers to has 2 references here: the list's and
            # getrefcount's argument (indexing, not a loop variable, which would be a third)
            for i in range(len(bufs)):
                if sys.getrefcount(bufs[i]) == 2 and nbytes <= bufs[i].nbytes <= 2 * nbytes:
                    return bufs[i][:nbytes].view(dt)
            if len(bufs) >= self.KEEP:
                free = [i for i in range(len(bufs)) if sys.getrefcount(bufs[i]) == 2]
                if not free:
                    return np.empty(n, dt)
                del bufs[free[0]]
            bufs.append(np.empty(nbytes, np.uint8))
            return bufs[-1].view(dt)


_SCRATCH = _Scratch()


def _pack(W: np.ndarray, dt) -> np.ndarray:
    """(FN, C, K, K) filters -> (ceil(FN/FB), C, K*K, FB): the FB filters of a block side
    by side for each (channel, tap), zero filters filling the last block."""
    FN, C, K = W.shape[:3]
    nb = -(-FN // FB)
    wk = np.zeros((nb * FB, C, K * K), dt)
    wk[:FN] = W.reshape(FN, C, K * K)
    return np.ascontiguousarray(wk.reshape(nb, FB, C, K * K).transpose(0, 2, 3, 1))


def _slack(Wp: int, K: int) -> int:
    """Elements after a flat (A, N, Hp, Wp) buffer that the junk positions may read."""
    return (K + 1) * (Wp + 1) + 2 * PB + 8


def _border(K: int, P: int) -> int:
    """Where dz starts in its (Hp, Wp) grid (rows and columns): dx reads it from row
    P - (K-1) + B >= 0, and OH + B <= Hp = OH + K - 1 leaves it in the grid; every read
    outside dz's OH x OW window (past a row: the next row's border columns; past the
    last row: the next sample's border rows) is a zero."""
    return max(0, K - 1 - P)


def _taps(K: int, Wp: int) -> np.ndarray:
    """The flat offsets ky*Wp + kx of a KxK filter's taps, zeros to a multiple of dW's tap
    group TG (9, or 5 on 16-register targets)."""
    offs = np.zeros(-(-K * K // TG) * TG, np.uint64)
    offs[: K * K] = (np.arange(K)[:, None] * Wp + np.arange(K)).ravel()
    return offs


def _flat(x: np.ndarray, PH: int, PW: int, K: int, dt) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, H, W) -> (flat zero-padded (C, N, Hp, Wp) + slack, its 4-D view)."""
    N, C, H, W = x.shape
    Hp, Wp = H + 2 * PH, W + 2 * PW
    flat = _SCRATCH.zeros(C * N * Hp * Wp + _slack(Wp, K), dt)
    view = flat[: C * N * Hp * Wp].reshape(C, N, Hp, Wp)
    view[:, :, PH : PH + H, PW : PW + W] = np.asarray(x).transpose(1, 0, 2, 3)
    return flat, view


def _rows(R: int, Wc: int, Wp: int) -> int:
    """Rows of Wp positions per sample in a flat output written by the micro-kernel
    (:func:`_forward`, :func:`_dx`): enough for every block that covers R x Wc outputs."""
    return -(-(int(_block_starts(R, Wc, Wp)[-1]) + PB) // Wp)


def _padded(v: np.ndarray, n: int, dt) -> np.ndarray:
    """v (1-D) in dtype dt, zeros after it to n entries (one per packed filter)."""
    out = np.zeros(n, dt)
    out[: v.shape[0]] = v
    return out


def _threads() -> int:
    return numba.get_num_threads()


def covers(x, W, b, stride, pad) -> bool:
    """Whether these kernels compute this convolution themselves (else the NumPy
    kernels do): float32/float64 4-D NumPy arrays, square filters of a size in
    KERNEL_SIZES, stride 1, the same pad >= 0 on every side."""
    if not all(isinstance(a, np.ndarray) for a in (x, W, b)):
        return False
    dt = np.result_type(x, W, b)
    if dt not in (np.float32, np.float64) or x.ndim != 4 or W.ndim != 4:
        return False
    if W.shape[2] != W.shape[3] or W.shape[2] not in KERNEL_SIZES or x.shape[1] != W.shape[1] or b.shape != (W.shape[0],):
        return False
    PH, PW = pair(pad, "pad")
    return pair(stride, "stride") == (1, 1) and PH == PW >= 0


@register_step_scope("numpy")
class BlasYields:
    """A model's pass (``kernels.step_scope``) during which BLAS keeps one thread, when
    the previous pass ran these kernels and Numba has more than one thread.

    Numba's threads (its OpenMP layer) and OpenBLAS's own threads are two pools on the
    same cores: OpenBLAS's workers keep spinning after each matrix product, the small
    affine products of a net whose convolutions run here, and take the cores from the
    next compiled kernel.  Measured on DeepConvNet, batch 100, 2 cores
    (benchmarks/README.md, candidate 12): a training step 2x faster with BLAS on one
    thread during the pass than with both pools on two.  A pass that ran none of these
    kernels (a net whose convolutions they do not cover) leaves BLAS alone the next time,
    so a net of 7x7 convolutions keeps its im2col products' threads.  Nested passes act once."""

    ran = False  # set by the kernels when they compute a convolution themselves
    #: whether BLAS is held to one thread now (:class:`Matmul` then splits a pass's products)
    limited = False
    _used_last = False
    _depth = 0
    _controller: Any = None

    def __enter__(self):
        cls = type(self)
        cls._depth += 1
        self._limiter = None
        if cls._depth == 1:
            cls.ran = False
            if cls._used_last and numba.get_num_threads() > 1:
                if cls._controller is None:
                    from threadpoolctl import ThreadpoolController

                    cls._controller = ThreadpoolController()
                self._limiter = cls._controller.limit(limits=1, user_api="blas")
                cls.limited = True
        return self

    def __exit__(self, *exc):
        cls = type(self)
        cls._depth -= 1
        if self._limiter is not None:
            self._limiter.restore_original_limits()
            cls.limited = False
        if cls._depth == 0:
            cls._used_last = cls.ran
        return False


class _State:
    """What the backward needs: the flat padded input, the filters, the forward's output
    (the ReLU mask: the pooled output, or the micro-kernel's whole (FNp, N, rows, Wp) buffer,
    indexed [f, n, oh, ow] alike), the pool arg-max."""

    __slots__ = ("xf", "N", "C", "H", "W", "PH", "PW", "W4", "out", "idx", "relu", "pool", "dtype")

    def __init__(self, xf, shape, PH, PW, W4, out, idx, relu, pool, dtype):
        self.xf, (self.N, self.C, self.H, self.W) = xf, shape
        self.PH, self.PW, self.W4, self.out, self.idx = PH, PW, W4, out, idx
        self.relu, self.pool, self.dtype = relu, pool, dtype


def _backward(dout, st: _State, need_dx: bool):
    """(dx, dW, db) of a forward of this module."""
    BlasYields.ran = True
    dt = np.result_type(dout, st.dtype)
    N, C, H, W, PH, PW = st.N, st.C, st.H, st.W, st.PH, st.PW
    Hp, Wp = H + 2 * PH, W + 2 * PW
    FN = st.W4.shape[0]
    d = np.asarray(dout, dt).transpose(1, 0, 2, 3)  # (FN, N, ., .): a view of channel-major memory
    K = st.W4.shape[2]
    B = _border(K, PH)
    FNp = -(-FN // FV) * FV
    offs = _taps(K, Wp)
    pairs = FNp // (2 * FV) if dt == np.float32 and _PAIRS else 0  # dW: two filter blocks at a time
    part = np.zeros((max(1, min(_threads(), N)), FNp, C, offs.shape[0]), dt)
    if st.pool and not need_dx and DIRECT_POOL:  # no full dz: straight from the pool's routing
        pdb = np.zeros((part.shape[0], FN), dt)
        _dw_pool(d, st.out, st.idx, st.xf, N, C, Hp, Wp, offs, pairs, part, pdb)
        return None, np.ascontiguousarray(part.sum(0)[:FN, :, : K * K]).reshape(st.W4.shape), pdb.sum(0)
    dzf = _SCRATCH.zeros(FN * N * Hp * Wp + _slack(Wp, K), dt)
    db = np.empty(FN, dt)
    idx = st.idx if st.pool else np.zeros((1, 1, 1, 1), np.uint8)
    _dz(d, st.out, idx, st.relu, st.pool, Hp, Wp, B, dzf, db)
    _dw(dzf, st.xf, N, C, FN, Hp, Wp, Hp - K + 1, Wp - K + 1, B, offs, pairs, part)
    dW = np.ascontiguousarray(part.sum(0)[:FN, :, : K * K]).reshape(st.W4.shape)
    if not need_dx:
        return None, dW, db
    wd = _pack(np.ascontiguousarray(st.W4[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)), dt)
    Cp, Rs = wd.shape[0] * FB, _rows(H, W, Wp)
    dxb = np.empty((Cp, N, Rs, Wp), dt)
    _dx(dzf, N, FN, Hp, Wp, H, W, PH, K, B, wd, np.zeros(Cp, dt), dxb.reshape(-1), Rs * Wp)
    return dxb[:C, :, :H, :W].transpose(1, 0, 2, 3), dW, db


@register("numpy", "conv2d", replaces=numpy_ops.Conv2d)
class Conv2d:
    """KxK stride-1 convolution (+ ReLU) as a register-blocked direct kernel; other
    cases go to :class:`.numpy_ops.Conv2d`.  Reference: :class:`xpconv.ops.Conv2d`."""

    replaces: numpy_ops.Conv2d  # set by register(): the kernel for the cases not covered

    def accepts(self, *arrays) -> bool:
        return True

    def forward(self, x, W, b, stride=1, pad=0, *, relu=False):
        """ops.conv2d_forward: (N, FN, OH, OW) as a view of channel-major memory."""
        if not covers(x, W, b, stride, pad):
            return self.replaces.forward(x, W, b, stride, pad, relu=relu)
        BlasYields.ran = True
        dt = np.result_type(x, W, b)
        N, C, H, Wd = x.shape
        P = pair(pad, "pad")[0]
        K = W.shape[2]
        OH, OW = conv_output_size(H, Wd, K, K, (1, 1), (P, P), where="Convolution")
        xf, _ = _flat(x, P, P, K, dt)
        FN, Wp = W.shape[0], Wd + 2 * P
        wk = _pack(np.asarray(W), dt)
        FNp, Rs = wk.shape[0] * FB, _rows(OH, OW, Wp)
        full = np.empty((FNp, N, Rs, Wp), dt)  # the micro-kernel's rows, junk columns included
        _forward(xf, N, C, H + 2 * P, Wp, OH, OW, K, wk, _padded(np.asarray(b), FNp, dt), relu, full.reshape(-1), Rs * Wp)
        st = _State(xf, (N, C, H, Wd), P, P, np.array(W, dt), full, None, relu, False, dt)
        return full[:FN, :, :OH, :OW].transpose(1, 0, 2, 3), st

    def backward(self, dout, state, *, need_dx=True):
        """ops.conv2d_backward for a state of :meth:`forward`."""
        if not isinstance(state, _State):
            return self.replaces.backward(dout, state, need_dx=need_dx)
        return _backward(dout, state, need_dx)


@register("numpy", "conv2d_relu_max_pool2d", replaces=numpy_ops.Conv2dReluMaxPool2d)
class Conv2dReluMaxPool2d:
    """KxK stride-1 convolution + bias + ReLU + 2x2/2 max-pool in one compiled pass;
    other cases go to :class:`.numpy_ops.Conv2dReluMaxPool2d`.  Reference:
    :class:`xpconv.ops.Conv2dReluMaxPool2d`."""

    replaces: numpy_ops.Conv2dReluMaxPool2d  # set by register()

    def accepts(self, *arrays) -> bool:
        return True

    def forward(self, x, W, b, stride, pad, pool_h, pool_w, pool_stride, pool_pad=0, *, training=True):
        """ops.conv2d_relu_max_pool2d_forward."""
        pool_ok = (int(pool_h), int(pool_w)) == (2, 2) and pair(pool_stride, "Pooling stride") == (2, 2) and pair(pool_pad, "Pooling pad") == (0, 0)
        if not (pool_ok and covers(x, W, b, stride, pad)):
            return self.replaces.forward(x, W, b, stride, pad, pool_h, pool_w, pool_stride, pool_pad, training=training)
        BlasYields.ran = True
        dt = np.result_type(x, W, b)
        N, C, H, Wd = x.shape
        P = pair(pad, "pad")[0]
        K = W.shape[2]
        OH, OW = conv_output_size(H, Wd, K, K, (1, 1), (P, P), where="Convolution")
        QH, QW = conv_output_size(OH, OW, 2, 2, (2, 2), (0, 0), where="Pooling")
        xf, _ = _flat(x, P, P, K, dt)
        FN = W.shape[0]
        out = np.empty((FN, N, QH, QW), dt)
        idx = np.empty((FN, N, QH, QW), np.uint8) if training else np.empty((1, 1, 1, 1), np.uint8)
        wk = _pack(np.asarray(W), dt)
        _forward_pool(xf, N, C, H + 2 * P, Wd + 2 * P, OH, OW, K, wk, _padded(np.asarray(b), wk.shape[0] * FB, dt), out, idx, training)
        st = _State(xf, (N, C, H, Wd), P, P, np.array(W, dt), out, idx, True, True, dt) if training else None
        return out.transpose(1, 0, 2, 3), st

    def backward(self, dout, state, *, need_dx=True):
        """ops.conv2d_relu_max_pool2d_backward for a state of :meth:`forward`."""
        if not isinstance(state, _State):
            return self.replaces.backward(dout, state, need_dx=need_dx)
        return _backward(dout, state, need_dx)


# no fastmath: the update is rounded as the reference's float32 (or float64) NumPy operations
_ejit = njit(cache=True, error_model="numpy", boundscheck=False)
_epjit = njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
_PAR_UPDATE = 1 << 16  # elements from which the update runs on Numba's threads


@_ejit
def _adam_body(p, g, m, v, i0, i1, wd, lr_t, omb1, omb2, eps):
    for i in range(i0, i1):
        gi = g[i] + wd * p[i] if wd != 0 else g[i]
        mi = m[i] + omb1 * (gi - m[i])
        vi = v[i] + omb2 * (gi * gi - v[i])
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - (lr_t * mi) / (np.sqrt(vi) + eps)


@_ejit
def _adam(p, g, m, v, wd, lr_t, omb1, omb2, eps):
    _adam_body(p, g, m, v, 0, p.shape[0], wd, lr_t, omb1, omb2, eps)


@_epjit
def _adam_par(p, g, m, v, wd, lr_t, omb1, omb2, eps, K):
    n = p.shape[0]
    step = (n + K - 1) // K
    for k in prange(K):
        _adam_body(p, g, m, v, k * step, min(n, (k + 1) * step), wd, lr_t, omb1, omb2, eps)


@register("numpy", "adam_update")
class AdamUpdate(UpdateKernel):
    """:class:`xpconv.optim.Adam`'s update of one parameter in one compiled pass over it (the
    reference, ``Adam._step``, makes about ten NumPy passes; SimpleConvNet's training step at
    batch 100 on 2 threads: 9.5 -> 9.2 ms); the same float32/float64 operations in the same
    order, so the same numbers.  Parameters of 2^16 elements and more are split over Numba's
    threads."""

    def accepts(self, p, g, *slots) -> bool:
        arrays = (p, g, *slots)
        return (
            all(type(a) is np.ndarray for a in arrays)
            and p.dtype in (np.float32, np.float64)
            and all(a.dtype == p.dtype and a.shape == p.shape and a.flags.c_contiguous for a in arrays)
            and all(a.flags.writeable for a in (p, *slots))
        )

    def step(self, p, g, slots, weight_decay=0.0, *, lr_t, beta1, beta2):
        t = p.dtype.type
        args = (p.reshape(-1), g.reshape(-1), slots["m"].reshape(-1), slots["v"].reshape(-1),
                t(weight_decay), t(lr_t), t(1.0 - beta1), t(1.0 - beta2), t(1e-7))
        K = _threads()
        if p.size >= _PAR_UPDATE and K > 1:
            _adam_par(*args, K)
        else:
            _adam(*args)


# --------------------------------------------------------------------------- products

_NOTRANS, _TRANS = 111, 112  # CBLAS_TRANSPOSE
_PAR_GEMM = 1 << 21  # multiply-adds from which a product is split over Numba's threads


def _blas_gemm() -> tuple[Any, Any, str] | str:
    """(sgemm, dgemm, what they are): CBLAS's ``?gemm`` of the OpenBLAS NumPy uses, as ctypes
    functions, or a string saying why there are none (another BLAS, several OpenBLAS libraries
    loaded)."""
    import ctypes

    from threadpoolctl import ThreadpoolController

    blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
    mine = [lib for lib in blas if lib.internal_api == "openblas" and "numpy" in lib.filepath]
    if len(mine) != 1:
        if len(blas) != 1 or blas[0].internal_api != "openblas":
            return f"NumPy's BLAS is not one OpenBLAS library: {sorted(lib.internal_api for lib in blas)}"
        mine = blas
    lib = ctypes.CDLL(mine[0].filepath)
    for prefix in ("", "scipy_"):
        for suffix in ("", "64_", "_64"):
            names = (f"{prefix}cblas_sgemm{suffix}", f"{prefix}cblas_dgemm{suffix}", f"{prefix}openblas_get_config{suffix}")
            if all(hasattr(lib, n) for n in names):
                config = getattr(lib, names[2])
                config.restype = ctypes.c_char_p
                I = ctypes.c_int64 if b"USE64BITINT" in (config() or b"") else ctypes.c_int32  # noqa: E741
                P, E = ctypes.c_void_p, ctypes.c_int
                s, d = (ctypes.CFUNCTYPE(None, E, E, E, I, I, I, ct, P, I, P, I, ct, P, I)((n, lib)) for n, ct in zip(names[:2], (ctypes.c_float, ctypes.c_double)))
                return s, d, f"{names[0]}/{names[1]} of {os.path.basename(mine[0].filepath)}, {8 * ctypes.sizeof(I)}-bit integers"
    return f"no CBLAS gemm in {mine[0].filepath}"


@njit(parallel=True, cache=True, boundscheck=False)
def _gemm(f, ta, tb, a, b, c, M, N, K, T):
    """c (M x N, row-major, flat) = op(a) @ op(b) (flat row-major operands; op: transposed
    when ta / tb is _TRANS) as T calls of CBLAS gemm ``f``, one per thread, each a band of
    columns of c (or of rows, when c is taller than wide).  Each element is one call's own
    reduction over K, as in one call for the whole product."""
    lda = M if ta == _TRANS else K
    ldb = K if tb == _TRANS else N
    one, zero = c.dtype.type(1), c.dtype.type(0)
    wide = N >= M
    step = ((N if wide else M) + T - 1) // T
    for t in prange(T):
        s = t * step
        if wide:
            n = min(N, s + step) - s
            if n > 0:
                f(101, ta, tb, M, n, K, one, a.ctypes, lda, b[s * K if tb == _TRANS else s :].ctypes, ldb, zero, c[s:].ctypes, N)
        else:
            m = min(M, s + step) - s
            if m > 0:
                f(101, ta, tb, m, N, K, one, a[s if ta == _TRANS else s * K :].ctypes, lda, b.ctypes, ldb, zero, c[s * N :].ctypes, N)


def _operand(a: np.ndarray) -> tuple[int, np.ndarray]:
    """(CBLAS transpose flag, flat row-major storage) of a 2-D operand that is contiguous in
    either order (a transpose of a C-contiguous array is F-contiguous)."""
    return (_NOTRANS, a.reshape(-1)) if a.flags.c_contiguous else (_TRANS, a.T.reshape(-1))


@register("numpy", "matmul")
class Matmul:
    """A 2-D product ``a @ b`` of a model's pass, split over Numba's threads when BLAS is held
    to one thread (:class:`BlasYields`): one single-threaded gemm per Numba thread, on the same
    pool as the convolutions, so neither library's idle workers take the cores of the other.
    Measured on SimpleConvNet's 4320 x 100 Affine, batch 100, 2 cores: 0.91 -> 0.51 ms per
    product (BLAS on both threads: 0.70).  Covers float32/float64 NumPy arrays, each
    contiguous or the transpose of a contiguous one, of at least 2^21 multiply-adds, where
    NumPy's BLAS is one OpenBLAS library; ``a @ b`` (``xpconv.ops.matmul``) is the reference."""

    _gemm: tuple[Any, Any, str] | str | None = None  # (sgemm, dgemm, what), or why not; found at first use

    def accepts(self, a, b) -> bool:
        if not BlasYields.limited or type(a) is not np.ndarray or type(b) is not np.ndarray:
            return False
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or a.dtype != b.dtype or a.dtype not in (np.float32, np.float64):
            return False
        if a.shape[0] * b.shape[1] * a.shape[1] < _PAR_GEMM or _threads() < 2:
            return False
        # each operand contiguous, or the transpose of a contiguous one (:func:`_operand`)
        layouts = (a.flags.c_contiguous or a.flags.f_contiguous) and (b.flags.c_contiguous or b.flags.f_contiguous)
        return layouts and not isinstance(Matmul.blas(), str)

    @staticmethod
    def blas() -> tuple[Any, Any, str] | str:
        """(sgemm, dgemm, what they are) the split products call, or why there are none (found once)."""
        if Matmul._gemm is None:
            Matmul._gemm = _blas_gemm()
        return Matmul._gemm

    def forward(self, a, b):
        """(a @ b, None)."""
        (ta, A), (tb, B) = _operand(a), _operand(b)
        M, K, N = a.shape[0], a.shape[1], b.shape[1]
        c = np.empty((M, N), a.dtype)
        f = Matmul._gemm[a.dtype == np.float64]
        _gemm(f, ta, tb, A, B, c.reshape(-1), M, N, K, _threads())
        return c, None

    def backward(self, *args, **kwargs):
        raise TypeError("Matmul: a product has no backward of its own (Affine's backward is two products)")

