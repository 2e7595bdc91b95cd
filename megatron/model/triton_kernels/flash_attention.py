"""FlashAttention-2 style causal / document-masked attention in Triton, forward and backward.

Why a kernel of our own: it takes GQA (query head h reads key/value head h // group,
without materialising repeated K/V) and per-document masks (packed samples) natively in
one call on any GPU that Triton targets, where the `flash_attn` package is missing or
unbuildable, and it is small enough to read.

Conventions inside the kernels:
* tensors are addressed as [b, h, s, d] through their strides, so the caller's
  "sbhd" or "bshd" memory is used without a copy; the last dim must have stride 1;
* scores live in the base-2 domain: s2 = q.k * softmax_scale * log2(e), so the
  softmax uses exp2; LSE holds log2(sum(exp2(s2 - m))) + m per query row (fp32);
* documents come as two int32 [b, s] tensors, RUN_START / RUN_END: the first position
  and one past the last position of the run of equal segment ids a token belongs to.
  A query attends key n only if RUN_START[q] <= n < RUN_END[q]; the relation is
  symmetric, so the dK/dV kernel masks with the key's own bounds. The bounds also give
  the loop limits, so key blocks outside a query block's documents are never visited;
* all accumulation (scores, softmax statistics, O, dQ, dK, dV) is fp32; operands of
  the dots keep the input dtype (fp16/bf16 on GPU, or fp32). How fp32 operands are
  multiplied is `dot_precision`: TF32 tensor cores on NVIDIA GPUs by default, IEEE fp32
  under the interpreter or when asked;
* attention dropout as in FlashAttention: O = (P * Z) V with P the softmax, Z = keep /
  (1 - p); the LSE describes P before dropout. keep comes from counter-based Philox
  (tl.rand) of a 64-bit seed and the element's index (batch, query head, query row, key
  column), so the backward kernels regenerate it instead of storing s x s bits, and
  `dropout_keep_mask` returns it for tests. The seed is an int64 device tensor drawn
  from torch's generator of q's device (`draw_seed` says why).

Backward = a delta kernel (rowsum(dO * O)), a dK/dV kernel that owns one key block of
one key/value head and loops over all query heads of its group (deterministic GQA
reduction, no atomics), and a dQ kernel that owns one query block. With dropout,
dV = (P * Z)^T dO, dP = Z * (dO V^T) and dS = P * (dP - delta): delta = rowsum(dO * O)
still equals rowsum(P * dP) because O already includes the dropout.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _wide(offs, BIG: tl.constexpr):
    """Row offsets in int64 when position x sequence stride may pass 2^31, so addresses cannot wrap."""
    if BIG:
        return offs.to(tl.int64)
    else:
        return offs


@triton.jit
def _keep_mask(q_pos, k_pos, q_ok, k_ok, run_start, run_end, partner,
               CAUSAL: tl.constexpr, HAS_RUNS: tl.constexpr):
    """Which (query, key) pairs of a tile may attend: both in range, causal, same document.

    The arguments broadcast to the tile: [M, 1] query and [1, N] key blocks in the forward
    and dQ kernels, [1, M] and [N, 1] in the dK/dV kernel. run_start / run_end are the
    document bounds of the positions the program owns (its queries in the forward and dQ
    kernels, its keys in the dK/dV kernel) and `partner` the positions it loops over;
    "same run" is symmetric, so the owner's bounds decide it. Unused unless HAS_RUNS.
    """
    keep = k_ok & q_ok
    if CAUSAL:
        keep = keep & (k_pos <= q_pos)
    if HAS_RUNS:
        keep = keep & (partner >= run_start) & (partner < run_end)
    return keep


@triton.jit
def _dropout_keep(seed, bh, q_pos, k_pos, seqlen, dropout_p):
    """Dropout's keep decision for the probabilities P[bh, q_pos, k_pos]: True with probability 1 - p.

    Philox (tl.rand) of the 64-bit seed and the element's linear index in the
    [b * hq, s, s] probability tensor: bh is the int64 index batch * hq + query head,
    q_pos / k_pos broadcast to the tile (either orientation). The index does not depend
    on tile sizes or on which kernel asks, so the backward kernels regenerate the
    forward's mask and `dropout_keep_mask` reproduces it for tests.
    """
    offs = (bh * seqlen + q_pos) * seqlen + k_pos  # int64: b * hq * s^2 passes 2^31 at long s
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _dropout_z(seed, bh, q_pos, k_pos, seqlen, dropout_p, dropout_scale):
    """The tile of Z = keep / (1 - p) in fp32, the factor dropout applies to P (and to dP in backward).

    A float factor rather than tl.where on the keep bits: the dK/dV kernel would otherwise
    move an i1 tile between layouts through shared memory, which the AMD backend rejects
    (triton 3.9, gfx90a/gfx942: "shared-memory element type bit width must be a multiple of 8").
    """
    return tl.where(_dropout_keep(seed, bh, q_pos, k_pos, seqlen, dropout_p), dropout_scale, 0.0)


@triton.jit
def _dropout_mask_kernel(SEED, MASK, seqlen, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """MASK[bh, m, n] (int8) = _dropout_keep(...): the mask the attention kernels use, for tests."""
    pid_bh = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(SEED), pid_bh, offs_m[:, None], offs_n[None, :], seqlen, dropout_p)
    ok = (offs_m < seqlen)[:, None] & (offs_n < seqlen)[None, :]
    rows = (pid_bh * seqlen + offs_m.to(tl.int64)) * seqlen
    tl.store(MASK + rows[:, None] + offs_n[None, :], keep.to(tl.int8), mask=ok)


@triton.jit
def _fwd_kernel(Q, K, V, Out, LSE, RUN_START, RUN_END, SEED,
                sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                seqlen, qk_scale, dropout_p, dropout_scale,
                HQ: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_RUNS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BIG: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = (pid_bh % HQ).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen
    d_ok = offs_d < HEAD_DIM

    q_mask = row_ok[:, None] & d_ok[None, :]
    q_rows = _wide(offs_m, BIG)[:, None]
    q = tl.load(Q + b * sqb + h * sqh + q_rows * sqs + offs_d[None, :], mask=q_mask, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    lo = 0
    hi = seqlen
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, seqlen)
    rs = offs_m  # placeholders, read only if HAS_RUNS
    re = offs_m
    if HAS_RUNS:
        rs = tl.load(RUN_START + b * seqlen + offs_m, mask=row_ok, other=0)
        re = tl.load(RUN_END + b * seqlen + offs_m, mask=row_ok, other=0)
        # runs are sorted by position: the block's first query has the earliest run start
        lo = (tl.min(tl.where(row_ok, rs, seqlen), 0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(hi, tl.max(re, 0))

    if DROPOUT:
        seed = tl.load(SEED)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seqlen
        kt = tl.load(k_base + _wide(offs_n, BIG)[None, :] * sks + offs_d[:, None],
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        keep = _keep_mask(offs_m[:, None], offs_n[None, :], row_ok[:, None], col_ok[None, :],
                          rs[:, None], re[:, None], offs_n[None, :], CAUSAL, HAS_RUNS)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no key seen yet keeps m = -inf; shift by 0 instead to avoid inf - inf
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax statistics see P before dropout
        if DROPOUT:  # O = (P * Z) V
            p = p * _dropout_z(seed, pid_bh.to(tl.int64), offs_m[:, None], offs_n[None, :], seqlen, dropout_p,
                               dropout_scale)
        v = tl.load(v_base + _wide(offs_n, BIG)[:, None] * svs + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    l_ref = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows (never stored) see no key
    out = acc / l_ref[:, None]
    tl.store(Out + b * sob + h * soh + q_rows * sos + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=q_mask)
    tl.store(LSE + pid_bh.to(tl.int64) * seqlen + offs_m, m_i + tl.log2(l_ref), mask=row_ok)


@triton.jit
def _bwd_delta_kernel(Out, DO, DELTA, sob, soh, sos, sdb, sdh, sds, seqlen,
                      HQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BIG: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = (pid_bh % HQ).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = _wide(offs_m, BIG)[:, None]
    o = tl.load(Out + b * sob + h * soh + rows * sos + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows * sds + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * seqlen + offs_m, delta, mask=offs_m < seqlen)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, RUN_START, RUN_END, SEED,
                     sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
                     sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
                     seqlen, qk_scale, sm_scale, dropout_p, dropout_scale,
                     HQ: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_RUNS: tl.constexpr, DROPOUT: tl.constexpr,
                     PRECISION: tl.constexpr, BIG: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < seqlen
    d_ok = offs_d < HEAD_DIM
    kv_mask = col_ok[:, None] & d_ok[None, :]
    kv_rows = _wide(offs_n, BIG)[:, None]
    k = tl.load(K + b * skb + hk * skh + kv_rows * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + kv_rows * svs + offs_d[None, :], mask=kv_mask, other=0.0)

    lo = 0
    hi = seqlen
    if CAUSAL:  # queries before the block's first key never see it
        lo = (start_n // BLOCK_M) * BLOCK_M
    rs = offs_n  # placeholders, read only if HAS_RUNS
    re = offs_n
    if HAS_RUNS:
        rs = tl.load(RUN_START + b * seqlen + offs_n, mask=col_ok, other=0)
        re = tl.load(RUN_END + b * seqlen + offs_n, mask=col_ok, other=0)
        lo = tl.maximum(lo, (tl.min(tl.where(col_ok, rs, seqlen), 0) // BLOCK_M) * BLOCK_M)
        hi = tl.minimum(hi, tl.max(re, 0))

    if DROPOUT:
        seed = tl.load(SEED)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(GROUP):  # the query heads h = hk * GROUP + g share this key/value head
        h = hk * GROUP + g
        bh = (b * HQ + h) * seqlen
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < seqlen
            q_mask = row_ok[:, None] & d_ok[None, :]
            rows = _wide(offs_m, BIG)[:, None]
            q = tl.load(q_base + rows * sqs + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + rows * sds + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(LSE + bh + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh + offs_m, mask=row_ok, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
            keep = _keep_mask(offs_m[None, :], offs_n[:, None], row_ok[None, :], col_ok[:, None],
                              rs[:, None], re[:, None], offs_m[None, :], CAUSAL, HAS_RUNS)
            pt = tl.where(keep, tl.exp2(st - lse[None, :]), 0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
            if DROPOUT:  # O = (P * Z) V: dV = (P * Z)^T dO, dP = Z * (dO V^T)
                zt = _dropout_z(seed, b * HQ + h, offs_m[None, :], offs_n[:, None], seqlen, dropout_p,
                                dropout_scale)  # [BLOCK_N, BLOCK_M]
                dv += tl.dot((pt * zt).to(do.dtype), do, input_precision=PRECISION)
                dpt = dpt * zt
            else:
                dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            # delta = rowsum(dO * O) = rowsum(P * dP) holds with dropout too, as O includes it
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)

    tl.store(DK + b * sdkb + hk * sdkh + kv_rows * sdks + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdvb + hk * sdvh + kv_rows * sdvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, RUN_START, RUN_END, SEED,
                   sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, sdqb, sdqh, sdqs,
                   seqlen, qk_scale, sm_scale, dropout_p, dropout_scale,
                   HQ: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_RUNS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                   BIG: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = (pid_bh % HQ).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen
    d_ok = offs_d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]
    rows = _wide(offs_m, BIG)[:, None]
    q = tl.load(Q + b * sqb + h * sqh + rows * sqs + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows * sds + offs_d[None, :], mask=q_mask, other=0.0)
    bh = pid_bh.to(tl.int64) * seqlen
    lse = tl.load(LSE + bh + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    lo = 0
    hi = seqlen
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, seqlen)
    rs = offs_m  # placeholders, read only if HAS_RUNS
    re = offs_m
    if HAS_RUNS:
        rs = tl.load(RUN_START + b * seqlen + offs_m, mask=row_ok, other=0)
        re = tl.load(RUN_END + b * seqlen + offs_m, mask=row_ok, other=0)
        lo = (tl.min(tl.where(row_ok, rs, seqlen), 0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(hi, tl.max(re, 0))

    if DROPOUT:
        seed = tl.load(SEED)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seqlen
        kv_mask = col_ok[:, None] & d_ok[None, :]
        kv_rows = _wide(offs_n, BIG)[:, None]
        k = tl.load(k_base + kv_rows * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv_rows * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        keep = _keep_mask(offs_m[:, None], offs_n[None, :], row_ok[:, None], col_ok[None, :],
                          rs[:, None], re[:, None], offs_n[None, :], CAUSAL, HAS_RUNS)
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        if DROPOUT:
            dp = dp * _dropout_z(seed, pid_bh.to(tl.int64), offs_m[:, None], offs_n[None, :], seqlen, dropout_p,
                                 dropout_scale)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(DQ + b * sdqb + h * sdqh + rows * sdqs + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _bhs_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _needs_int64(s: int, *tensors: torch.Tensor) -> bool:
    """Whether position x sequence stride can pass int32 (the kernels then index rows in int64)."""
    return (s + 256) * max(t.stride(2) for t in tensors) >= 2**31


def interpreted() -> bool:
    """Whether the kernels were defined under TRITON_INTERPRET=1 (decided when this module was imported)."""
    return not isinstance(_fwd_kernel, triton.runtime.JITFunction)


def dot_precision(dtype: torch.dtype, allow_tf32: bool | None, device: torch.device) -> str:
    """The `input_precision` of every tl.dot in the kernels.

    It matters only for fp32 operands (triton ignores it for fp16/bf16: the PTX for sm80
    and sm90 is identical with "ieee" and "tf32"), but it must name a mode the target
    has, so 16-bit inputs get "ieee", which every target accepts ("tf32" does not
    compile for AMD MI200). For fp32 inputs:
    * allow_tf32=None (default): "tf32" on an NVIDIA GPU: TF32 tensor cores on Ampere
      and newer (10 mantissa bits per product, fp32 accumulation, as cuBLAS with
      torch.backends.cuda.matmul.allow_tf32); older NVIDIA GPUs have none and triton
      computes the dot with exact fp32 FMAs. "ieee" on ROCm (TF32 exists on CDNA3 only);
    * allow_tf32=True: "tf32" (on ROCm only CDNA3 accepts it); allow_tf32=False: "ieee";
    * under the interpreter always "ieee": it multiplies in full fp32 with numpy whatever
      is asked and does not emulate TF32, so "ieee" says what is computed.
    """
    if interpreted() or dtype != torch.float32:
        return "ieee"
    if allow_tf32 is None:
        return "tf32" if device.type == "cuda" and torch.version.hip is None else "ieee"
    return "tf32" if allow_tf32 else "ieee"


# Launch option of every kernel: let the compiler contract a * b + c into FMAs (exp2 of
# s * scale - m is one). Triton 3.9 does by default but warns that 3.10 stops; pinned so
# results and speed do not change with the triton release (TRITON_FORCE_DISABLE_FP_FUSION
# still wins). The interpreter ignores launch options.
LAUNCH = dict(enable_fp_fusion=True)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels address d with stride 1; anything else is copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()


class KernelConfig:
    """Tile sizes and launch options of one call; GPU defaults, tests pass small blocks."""

    def __init__(self, head_dim: int, *, block_m: int | None, block_n: int | None,
                 bwd_block_m: int | None, bwd_block_n: int | None, num_warps: int | None,
                 num_stages: int | None, dtype: torch.dtype, allow_tf32: bool | None = None,
                 device: torch.device | str = "cuda", int64_index: bool = False) -> None:
        self.head_dim = head_dim
        self.block_d = max(16, triton.next_power_of_2(head_dim))
        self.block_m = block_m or 128
        self.block_n = block_n or (64 if head_dim <= 64 else 32)
        self.bwd_block_m = bwd_block_m or (block_m or 64)
        self.bwd_block_n = bwd_block_n or (block_n or 64)
        self.num_warps = num_warps or (4 if head_dim <= 64 else 8)
        self.num_stages = num_stages or 2
        self.precision = dot_precision(dtype, allow_tf32, torch.device(device))
        self.int64_index = int64_index  # forced on by tests; otherwise chosen per call by size


SEED_RANGE = 2**62  # seeds are drawn in [0, 2^62): non-negative, so int64 -> uint64 keeps the value


def draw_seed(device: torch.device | str) -> torch.Tensor:
    """A dropout seed: int64 [1] on `device`, drawn from torch's generator of that device.

    Why a device tensor drawn there, not a Python int: no host sync (the kernels load it),
    and it advances the same generator that F.dropout on that device would, so
    torch.manual_seed, torch.utils.checkpoint (which restores the RNG state of the
    devices of its inputs before recomputing) and CUDA-graph capture (torch's CUDA
    generator is capture-aware and the kernels read the seed from memory, so a replay
    should draw a new mask; not tried) behave as with any torch dropout. A Python int
    from the CPU generator would avoid a GPU sync too, but would be frozen into a
    captured graph and would advance the CPU stream on every layer.
    """
    return torch.randint(0, SEED_RANGE, (1,), device=device, dtype=torch.int64)


def _seed_tensor(seed: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        return seed.to(device=device, dtype=torch.int64).reshape(1)
    if not 0 <= seed < SEED_RANGE:
        raise ValueError(f"a dropout seed must be in [0, 2^62), got {seed}")
    return torch.tensor([seed], dtype=torch.int64, device=device)


def _check_dropout(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def dropout_keep_mask(seed: int | torch.Tensor, batch: int, heads: int, seqlen: int, dropout_p: float,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """bool [batch, heads, s, s]: which probabilities the kernels keep for this seed (debug/tests).

    `heads` counts query heads; device defaults to the seed's, or to where the kernels
    run (CPU under the interpreter). Element [b, h, i, j] is the decision for query i
    and key j of head h, whether or not the causal/document mask lets i see j; the
    kernels use it where it does. Built by the same @triton.jit helper the kernels call.
    """
    _check_dropout(dropout_p)
    if device is None:  # the seed's device, else where the kernels run
        device = seed.device if isinstance(seed, torch.Tensor) else "cpu" if interpreted() else "cuda"
    seed = _seed_tensor(seed, torch.device(device))
    mask = torch.empty(batch, heads, seqlen, seqlen, dtype=torch.int8, device=seed.device)
    block = 64
    grid = (triton.cdiv(seqlen, block), triton.cdiv(seqlen, block), batch * heads)
    _dropout_mask_kernel[grid](seed, mask, seqlen, dropout_p, BLOCK_M=block, BLOCK_N=block, **LAUNCH)
    return mask.bool()


def _dropout_args(dropout_p: float, seed: torch.Tensor | None, placeholder: torch.Tensor) -> dict:
    """SEED pointer, p and 1 / (1 - p); without dropout the kernels never read them."""
    if dropout_p > 0:
        return dict(seed=seed, p=dropout_p, scale=1.0 / (1.0 - dropout_p), on=True)
    return dict(seed=placeholder, p=0.0, scale=1.0, on=False)


def attention_forward(q, k, v, run_start, run_end, *, causal: bool, sm_scale: float, cfg: KernelConfig,
                      dropout_p: float = 0.0, seed: torch.Tensor | None = None):
    """q [b, hq, s, d], k/v [b, hkv, s, d] (any strides, d contiguous) -> (o like q, lse [b, hq, s] fp32).

    With dropout_p > 0, `seed` (int64 [1] on q's device) keys the dropout mask.
    """
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    o = torch.empty_like(q)  # same memory layout as q (e.g. sbhd)
    lse = torch.empty(b, hq, s, device=q.device, dtype=torch.float32)
    has_runs = run_start is not None
    if not has_runs:  # placeholders: the kernel never reads them
        run_start = run_end = lse
    drop = _dropout_args(dropout_p, seed, lse)
    grid = (triton.cdiv(s, cfg.block_m), b * hq)
    _fwd_kernel[grid](
        q, k, v, o, lse, run_start, run_end, drop["seed"],
        *_bhs_strides(q), *_bhs_strides(k), *_bhs_strides(v), *_bhs_strides(o),
        s, sm_scale * LOG2E, drop["p"], drop["scale"],
        HQ=hq, GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=cfg.block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=causal, HAS_RUNS=has_runs, DROPOUT=drop["on"], PRECISION=cfg.precision,
        BIG=cfg.int64_index or _needs_int64(s, q, k, v, o),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **LAUNCH)
    return o, lse


def attention_backward(do, q, k, v, o, lse, run_start, run_end, *, causal: bool, sm_scale: float,
                       cfg: KernelConfig, dropout_p: float = 0.0, seed: torch.Tensor | None = None):
    """Gradients (dq like q, dk like k, dv like v) of sum(o * do); the same dropout_p and seed as forward."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    do = _unit_last_stride(do)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    has_runs = run_start is not None
    if not has_runs:
        run_start = run_end = lse
    drop = _dropout_args(dropout_p, seed, lse)
    bm, bn = cfg.bwd_block_m, cfg.bwd_block_n
    big = cfg.int64_index or _needs_int64(s, q, k, v, o, do, dq, dk, dv)
    _bwd_delta_kernel[(triton.cdiv(s, bm), b * hq)](
        o, do, delta, *_bhs_strides(o), *_bhs_strides(do), s,
        HQ=hq, HEAD_DIM=d, BLOCK_D=cfg.block_d, BLOCK_M=bm, BIG=big, **LAUNCH)
    common = dict(HEAD_DIM=d, BLOCK_D=cfg.block_d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal,
                  HAS_RUNS=has_runs, DROPOUT=drop["on"], PRECISION=cfg.precision, BIG=big,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, **LAUNCH)
    _bwd_dkdv_kernel[(triton.cdiv(s, bn), b * hkv)](
        q, k, v, do, lse, delta, dk, dv, run_start, run_end, drop["seed"],
        *_bhs_strides(q), *_bhs_strides(k), *_bhs_strides(v), *_bhs_strides(do),
        *_bhs_strides(dk), *_bhs_strides(dv),
        s, sm_scale * LOG2E, sm_scale, drop["p"], drop["scale"], HQ=hq, HKV=hkv, GROUP=hq // hkv, **common)
    _bwd_dq_kernel[(triton.cdiv(s, bm), b * hq)](
        q, k, v, do, lse, delta, dq, run_start, run_end, drop["seed"],
        *_bhs_strides(q), *_bhs_strides(k), *_bhs_strides(v), *_bhs_strides(do), *_bhs_strides(dq),
        s, sm_scale * LOG2E, sm_scale, drop["p"], drop["scale"], HQ=hq, GROUP=hq // hkv, **common)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd around the kernels; saves O, the LSE and the dropout seed instead of s x s tensors."""

    @staticmethod
    def forward(ctx, q, k, v, run_start, run_end, causal, sm_scale, cfg, dropout_p=0.0, seed=None):
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        o, lse = attention_forward(q, k, v, run_start, run_end, causal=causal, sm_scale=sm_scale, cfg=cfg,
                                   dropout_p=dropout_p, seed=seed)
        ctx.save_for_backward(q, k, v, o, lse, run_start, run_end, seed)
        ctx.causal, ctx.sm_scale, ctx.cfg, ctx.dropout_p = causal, sm_scale, cfg, dropout_p
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, run_start, run_end, seed = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, run_start, run_end, causal=ctx.causal,
                                        sm_scale=ctx.sm_scale, cfg=ctx.cfg, dropout_p=ctx.dropout_p, seed=seed)
        return dq, dk, dv, None, None, None, None, None, None, None


def flash_attention(q, k, v, run_start=None, run_end=None, *, causal=True, sm_scale=None, cfg=None,
                    dropout_p=0.0, seed=None):
    """Differentiable attention on [b, h, s, d] views; see the module docstring for the conventions.

    dropout_p > 0 applies attention dropout; `seed` (int, or int64 tensor of one element)
    fixes its mask, otherwise one is drawn with `draw_seed` from the generator of q's
    device, so recomputation under torch.utils.checkpoint redraws the same seed.
    """
    _check_dropout(dropout_p)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if cfg is None:
        cfg = KernelConfig(q.shape[-1], block_m=None, block_n=None, bwd_block_m=None, bwd_block_n=None,
                           num_warps=None, num_stages=None, dtype=q.dtype, device=q.device)
    if dropout_p > 0:
        seed = draw_seed(q.device) if seed is None else _seed_tensor(seed, q.device)
    else:
        seed = None
    return FlashAttentionFunction.apply(q, k, v, run_start, run_end, causal, sm_scale, cfg, dropout_p, seed)
