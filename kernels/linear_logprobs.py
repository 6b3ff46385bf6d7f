"""Per-token log-probs straight from hidden states: the logits `hidden @ weight.T` exist only as tiles.

Logit chain, per element: a = h . w_v + b_v;  y = logit_scale * a;  c = softcap * tanh(y / softcap) (or y);
z = c / temperature. Log-probs, entropy and argmax are those of softmax(z).

- Forward (`_linear_logprobs_fwd_kernel`): a program owns BLOCK_M rows and one contiguous split of the
  vocabulary. For each BLOCK_V tile it computes the [BLOCK_M, BLOCK_V] logits with tl.dot over H (bf16/fp16
  operands as loaded, fp32 accumulator) and folds them into per-row online log-sum-exp statistics. Its
  split's statistics go to a small [S, M] buffer that `_linear_logprobs_combine_kernel` reduces: no atomics,
  so the result is deterministic.
- Backward (`_linear_logprobs_bwd_kernel`): recomputes the logits tiles of one vocabulary chunk and writes
  d a = d loss / d (hidden @ weight.T + bias) for it, plus per row-tile column sums for the bias gradient.
  The caller turns each chunk into d hidden and d weight with two GEMMs that accumulate in fp32, so the
  chunk, bounded by a memory budget, is the only logits-sized buffer.

Hidden arrives as a [B, T, H] view (as `fastalign._backend.as_btv` makes it) and rows are picked by index,
so a sliced `hidden[:, :-1]` needs no copy and only the rows whose label counts are ever read.
"""

from __future__ import annotations

import functools
import itertools
import unittest.mock
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import INTERPRET, TRITON_DTYPE, LaunchCase, meta, on_tensors_device, pick_fastest

# Row tiles that sweep the vocabulary side by side, so the weight tiles they share are read from L2.
_GROUP_M = 8
# The forward aims at this many programs per SM, so the last wave leaves few SMs idle.
_FWD_PROGRAMS_PER_SM = 8
_COMBINE_BLOCK = 256
# Rows of the forward's per-split statistics buffer: running max of z, sum exp(z - max), sum exp(z - max) * z
# (entropy), sum exp(2 (z - max)) (log sum p^2), sum z (mean logit). The last two exist only when asked for.
_STAT_MAX, _STAT_SUM, _STAT_ENTROPY, _STAT_SQ, _STAT_Z_SUM = (tl.constexpr(i) for i in range(5))
# A finite stand-in for -inf on lanes past the edge of a tile: exp() of it is 0, and 0 times it is 0, not NaN.
_NEG = tl.constexpr(-1e30)
# Triton's interpreter multiplies bf16/fp16 tl.dot operands wrongly; upcast them there (the products are exact in
# fp32 either way, so the interpreted result is what the tensor cores compute).
_DOT_IN_FP32 = tl.constexpr(INTERPRET)


@triton.jit
def _grouped_tile(pid, n_m, n_v, GROUP_M: tl.constexpr):
    """(row tile, vocabulary tile) of program `pid`: GROUP_M row tiles walk the vocabulary together."""
    width = GROUP_M * n_v
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_m, (pid % width) // group_m


@triton.jit
def _row_tile(p_rows, p_labels, i_m, M, T, stride_hb, stride_ht, BLOCK_M: tl.constexpr, ALIGN: tl.constexpr):
    """(row ids in [0, M), their mask, their labels, the int64 offsets of their hidden rows) of row tile i_m.

    Rows past M point at the first row (every load stays in bounds) and get label -1, which matches nothing.
    The strides come in units of ALIGN elements and are scaled after the int64 row index multiplies them, so
    no int32 product can overflow."""
    o_m = i_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    # N = B * T < 2**31 (the launchers check): an int32 division is inline, an int64 one a subroutine call.
    rows = tl.load(p_rows + o_m, mask=m_m, other=0).to(tl.int32)
    labels = tl.load(p_labels + rows, mask=m_m, other=-1)
    i_b = rows // T
    i_t = rows - i_b * T
    return o_m, m_m, labels, (i_b.to(tl.int64) * stride_hb + i_t.to(tl.int64) * stride_ht) * ALIGN


@triton.jit
def _logits_tile(
    p_h,
    h_off,  # [BLOCK_M] int64 offsets of the rows in p_h, all inside p_h
    p_w,
    w_off,  # [BLOCK_V] int64 offsets of the weight rows in p_w, all inside p_w
    H,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """[BLOCK_M, BLOCK_V] fp32 tile of hidden @ weight.T. Operands reach tl.dot in their own dtype (tensor cores).

    Callers point out-of-range rows and columns at row 0 instead of masking them: the loads need no masks
    (when H % BLOCK_K == 0), and the epilogue discards those lanes.
    """
    o_k = tl.arange(0, BLOCK_K)
    p_hk = p_h + h_off[:, None] + o_k[None, :]  # [BLOCK_M, BLOCK_K]
    p_wk = p_w + w_off[None, :] + o_k[:, None]  # [BLOCK_K, BLOCK_V]
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            b_h = tl.load(p_hk)
            b_w = tl.load(p_wk)
        else:
            m_k = (k0 + o_k) < H
            b_h = tl.load(p_hk, mask=m_k[None, :], other=0.0)
            b_w = tl.load(p_wk, mask=m_k[:, None], other=0.0)
        if _DOT_IN_FP32:
            b_h, b_w = b_h.to(tl.float32), b_w.to(tl.float32)
        acc = tl.dot(b_h, b_w, acc, input_precision=DOT_PRECISION)
        p_hk += BLOCK_K
        p_wk += BLOCK_K
    return acc


@triton.jit
def _logit_chain(acc, b_bias, logit_scale, softcap, inv_temperature, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """z = softcap * tanh(logit_scale * (acc + bias) / softcap) / temperature, from an fp32 tile acc and the fp32 bias
    values b_bias that broadcast against it (unused unless HAS_BIAS). kernels/fused_linear_loss.py shares it."""
    y = acc
    if HAS_BIAS:
        y += b_bias
    y = y * logit_scale
    if HAS_SOFTCAP:
        # tanh(x) = 2 * sigmoid(2x) - 1, in every Triton version (the interpreter included). Its error is absolute, a
        # few fp32 ulps of 1, so z is off by up to ~softcap * 1.2e-7 (3.7e-6 measured at softcap 30), not relative to z.
        y = softcap * (2.0 * tl.sigmoid(2.0 * y / softcap) - 1.0)
    return y * inv_temperature


@triton.jit
def _linear_logprobs_fwd_kernel(
    p_h,  # [B, T, H] hidden, unit stride over H
    p_w,  # [V, H] weight, unit stride over H
    p_bias,  # [V] any float dtype, unit stride, if HAS_BIAS
    p_rows,  # [M] int64: the rows of the N = B * T that this call scores
    p_labels,  # [N] int64
    p_stats,  # [K, S, M] fp32 out, per vocabulary split: _STAT_MAX, _STAT_SUM, ... (K = 3, or 5 with the extras)
    p_split_argmax,  # [S, M] int32 out: per split, the first vocabulary id of the max z, if RETURN_ARGMAX
    p_zlabel,  # [M] fp32 out: z at the label, written by the split that holds the label
    M,
    stride_stat,  # S * M
    T,
    stride_hb,  # the three strides in units of ALIGN elements, so the compiler sees 16-byte aligned rows
    stride_ht,
    stride_wv,
    V,
    H,
    tiles_per_split,
    logit_scale,
    softcap,
    inv_temperature,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ALIGN: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    RETURN_ARGMAX: tl.constexpr,
    RETURN_LOG_SUM_SQ_PROBS: tl.constexpr,
    RETURN_MEAN_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    n_m = tl.cdiv(M, BLOCK_M)
    n_s = tl.cdiv(tl.cdiv(V, BLOCK_V), tiles_per_split)
    i_m, i_s = _grouped_tile(tl.program_id(0), n_m, n_s, GROUP_M)
    o_m, m_m, labels, h_off = _row_tile(p_rows, p_labels, i_m, M, T, stride_hb, stride_ht, BLOCK_M, ALIGN)

    v_begin = i_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    m_run = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max of z
    s_run = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp(z - m_run)
    t_run = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp(z - m_run) * z, for the entropy
    q_run = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp(2 (z - m_run)), for log(sum p^2)
    z_sum = tl.zeros((BLOCK_M,), tl.float32)  # sum of z, for the mean logit
    i_best = tl.zeros((BLOCK_M,), tl.int32)
    z_label = tl.zeros((BLOCK_M,), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        w_off = tl.where(m_v, o_v, 0).to(tl.int64) * stride_wv * ALIGN
        acc = _logits_tile(p_h, h_off, p_w, w_off, H, BLOCK_M, BLOCK_V, BLOCK_K, EVEN_K, DOT_PRECISION)
        b_bias = tl.load(p_bias + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :] if HAS_BIAS else 0.0
        z = _logit_chain(acc, b_bias, logit_scale, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP)
        if RETURN_MEAN_LOGITS:
            z_sum += tl.sum(tl.where(m_v[None, :], z, 0.0), 1)
        # Columns past V get a finite -1e30: exp() makes them 0, and 0 * z stays 0 in the entropy sum. A 1-D
        # penalty costs far fewer registers than a 2-D mask.
        z += tl.where(m_v, 0.0, _NEG)[None, :]
        b_max = tl.max(z, 1)
        # Every tile holds a real column, so m_new is finite and exp(m_run - m_new) is 0 on the first tile.
        m_new = tl.maximum(m_run, b_max)
        alpha = tl.exp(m_run - m_new)
        b_e = tl.exp(z - m_new[:, None])
        s_run = s_run * alpha + tl.sum(b_e, 1)
        if RETURN_ENTROPY:
            t_run = t_run * alpha + tl.sum(b_e * z, 1)
        if RETURN_LOG_SUM_SQ_PROBS:
            q_run = q_run * (alpha * alpha) + tl.sum(b_e * b_e, 1)
        if RETURN_ARGMAX:
            # Strict > keeps the first maximum, as torch.argmax does.
            b_first = tl.min(tl.where(z == b_max[:, None], o_v[None, :], V), 1)
            i_best = tl.where(b_max > m_run, b_first, i_best)
        z_label += tl.sum(tl.where(o_v[None, :] == labels[:, None], z, 0.0), 1)
        m_run = m_new

    tl.store(p_zlabel + o_m, z_label, mask=m_m & (labels >= v_begin) & (labels < v_end))
    o_stat = i_s.to(tl.int64) * M + o_m
    tl.store(p_stats + _STAT_MAX * stride_stat + o_stat, m_run, mask=m_m)
    tl.store(p_stats + _STAT_SUM * stride_stat + o_stat, s_run, mask=m_m)
    if RETURN_ENTROPY:
        tl.store(p_stats + _STAT_ENTROPY * stride_stat + o_stat, t_run, mask=m_m)
    if RETURN_LOG_SUM_SQ_PROBS:
        tl.store(p_stats + _STAT_SQ * stride_stat + o_stat, q_run, mask=m_m)
    if RETURN_MEAN_LOGITS:
        tl.store(p_stats + _STAT_Z_SUM * stride_stat + o_stat, z_sum, mask=m_m)
    if RETURN_ARGMAX:
        tl.store(p_split_argmax + o_stat, i_best, mask=m_m)


@triton.jit
def _linear_logprobs_combine_kernel(
    p_stats,  # [K, S, M] fp32, as the forward kernel wrote it
    p_split_argmax,  # [S, M] int32, if RETURN_ARGMAX
    p_zlabel,  # [M] fp32
    p_rows,  # [M] int64
    p_labels,  # [N] int64
    p_logp,  # [N] fp32 out at the scored rows (the caller zero-fills the others)
    p_lse,  # [M] fp32 out: logsumexp(z)
    p_entropy,  # [N] fp32 out at the scored rows, if RETURN_ENTROPY
    p_argmax,  # [N] int64 out at the scored rows, if RETURN_ARGMAX
    p_log_sum_sq_probs,  # [N] fp32 out at the scored rows, if RETURN_LOG_SUM_SQ_PROBS
    p_mean_logits,  # [N] fp32 out at the scored rows, if RETURN_MEAN_LOGITS
    M,
    S,
    stride_stat,  # S * M
    V,
    ignore_index,
    BLOCK: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    RETURN_ARGMAX: tl.constexpr,
    RETURN_LOG_SUM_SQ_PROBS: tl.constexpr,
    RETURN_MEAN_LOGITS: tl.constexpr,
):
    o_m = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_m = o_m < M
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    t = tl.zeros((BLOCK,), tl.float32)
    q = tl.zeros((BLOCK,), tl.float32)
    z_sum = tl.zeros((BLOCK,), tl.float32)
    best = tl.zeros((BLOCK,), tl.int32)
    for i_s in range(0, S):
        o_stat = i_s * M + o_m  # i_s * M < S * M, which the launcher passes as an int
        b_m = tl.load(p_stats + _STAT_MAX * stride_stat + o_stat, mask=m_m, other=0.0)
        m_new = tl.maximum(m, b_m)
        alpha = tl.exp(m - m_new)
        beta = tl.exp(b_m - m_new)
        s = s * alpha + tl.load(p_stats + _STAT_SUM * stride_stat + o_stat, mask=m_m, other=0.0) * beta
        if RETURN_ENTROPY:
            t = t * alpha + tl.load(p_stats + _STAT_ENTROPY * stride_stat + o_stat, mask=m_m, other=0.0) * beta
        if RETURN_LOG_SUM_SQ_PROBS:
            b_q = tl.load(p_stats + _STAT_SQ * stride_stat + o_stat, mask=m_m, other=0.0)
            q = q * (alpha * alpha) + b_q * (beta * beta)
        if RETURN_MEAN_LOGITS:
            z_sum += tl.load(p_stats + _STAT_Z_SUM * stride_stat + o_stat, mask=m_m, other=0.0)
        if RETURN_ARGMAX:
            best = tl.where(b_m > m, tl.load(p_split_argmax + o_stat, mask=m_m, other=0), best)
        m = m_new
    lse = m + tl.log(s)

    rows = tl.load(p_rows + o_m, mask=m_m, other=0)
    labels = tl.load(p_labels + rows, mask=m_m, other=ignore_index)
    in_range = (labels >= 0) & (labels < V)
    z_label = tl.load(p_zlabel + o_m, mask=m_m & in_range, other=0.0)
    # The caller rejects labels outside [0, V); should one get here, its log-prob is NaN, never a wrong number.
    logp = tl.where(labels == ignore_index, 0.0, tl.where(in_range, z_label - lse, float("nan")))
    tl.store(p_logp + rows, logp, mask=m_m)
    tl.store(p_lse + o_m, lse, mask=m_m)
    if RETURN_ENTROPY:
        tl.store(p_entropy + rows, lse - t / s, mask=m_m)
    if RETURN_ARGMAX:
        tl.store(p_argmax + rows, best.to(tl.int64), mask=m_m)
    if RETURN_LOG_SUM_SQ_PROBS:
        # sum_v p_v^2 = sum_v exp(2 (z_v - m)) / (sum_v exp(z_v - m))^2
        tl.store(p_log_sum_sq_probs + rows, tl.log(q) - 2.0 * tl.log(s), mask=m_m)
    if RETURN_MEAN_LOGITS:
        tl.store(p_mean_logits + rows, z_sum / V, mask=m_m)


@triton.jit
def _linear_logprobs_bwd_kernel(
    p_h,  # [B, T, H] hidden, unit stride over H
    p_w,  # [V, H] weight, unit stride over H
    p_bias,  # [V] unit stride, if HAS_BIAS
    p_rows,  # [M] int64
    p_labels,  # [N] int64
    p_lse,  # [M] fp32
    p_dlogp,  # [M] fp32: upstream gradient of the log-probs at the scored rows
    p_entropy,  # [M] fp32, if HAS_ENTROPY_GRAD
    p_dentropy,  # [M] fp32, if HAS_ENTROPY_GRAD
    p_da,  # [M, v_stop - v_start] out, row stride stride_da: d loss / d (hidden @ weight.T + bias)
    M,
    T,
    stride_hb,  # the three strides in units of ALIGN elements, so the compiler sees 16-byte aligned rows
    stride_ht,
    stride_wv,
    stride_da,
    H,
    v_start,
    v_stop,
    ignore_index,
    logit_scale,
    softcap,
    inv_temperature,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ALIGN: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    n_m = tl.cdiv(M, BLOCK_M)
    n_v = tl.cdiv(v_stop - v_start, BLOCK_V)
    i_m, i_v = _grouped_tile(tl.program_id(0), n_m, n_v, GROUP_M)
    o_m, m_m, labels, h_off = _row_tile(p_rows, p_labels, i_m, M, T, stride_hb, stride_ht, BLOCK_M, ALIGN)
    o_c = i_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column in this chunk
    o_v = v_start + o_c
    m_v = o_v < v_stop

    w_off = tl.where(m_v, o_v, 0).to(tl.int64) * stride_wv * ALIGN
    acc = _logits_tile(p_h, h_off, p_w, w_off, H, BLOCK_M, BLOCK_V, BLOCK_K, EVEN_K, DOT_PRECISION)
    b_bias = tl.load(p_bias + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :] if HAS_BIAS else 0.0
    z = _logit_chain(acc, b_bias, logit_scale, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP)
    # Rows past M get lse = 1e30 and columns past the chunk a -1e30 penalty, so p = exp(log p) is exactly 0 there:
    # no 2-D masks until the store.
    lse = tl.load(p_lse + o_m, mask=m_m, other=-_NEG)
    g = tl.where(labels == ignore_index, 0.0, tl.load(p_dlogp + o_m, mask=m_m, other=0.0))
    b_logp = z - lse[:, None] + tl.where(m_v, 0.0, _NEG)[None, :]
    # d logp / dz = onehot - p;  d H / dz = -p * (log p + H)
    if HAS_ENTROPY_GRAD:
        gh = tl.load(p_dentropy + o_m, mask=m_m, other=0.0)
        c = g + gh * tl.load(p_entropy + o_m, mask=m_m, other=0.0)
        b_dz = -tl.exp(b_logp) * (c[:, None] + gh[:, None] * b_logp)
    else:
        b_dz = -tl.exp(b_logp) * g[:, None]
    b_dz += tl.where(o_v[None, :] == labels[:, None], g[:, None], 0.0)
    # Back through temperature, softcap and logit_scale to a: dz/da = logit_scale / temperature * (1 - tanh^2),
    # with tanh = z * temperature / softcap recovered from log p rather than kept alive in registers.
    b_da = b_dz * (inv_temperature * logit_scale)
    if HAS_SOFTCAP:
        th = (b_logp + lse[:, None]) * (1.0 / (inv_temperature * softcap))
        b_da = b_da * (1.0 - th * th)
    p_out = p_da + o_m[:, None] * stride_da + o_c[None, :]
    tl.store(p_out, b_da.to(p_da.dtype.element_ty), mask=m_m[:, None] & m_v[None, :])


# ----------------------------------------------------------------------------- launch parameters


class Outputs(NamedTuple):
    """The per-token results the forward computes besides the log-probs (constexpr flags of its kernels)."""

    entropy: bool = False
    argmax: bool = False
    log_sum_sq_probs: bool = False
    mean_logits: bool = False


class Tiles(NamedTuple):
    block_m: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int


# (kernel, dtype class, 16-byte aligned rows) -> candidate tiles, the default first. On the GPU the launchers time
# the candidates once per shape bucket (`pick_fastest`). Every candidate must compile without spills, within the
# shared memory of sm_80 and sm_90, under the newest triton and triton 3.6 (`fastalign compile-check`): wider tiles
# (128 x 256) spill on both. Every bf16/fp16 tile is 64 rows or more with 4 or 8 warps, the least that wgmma takes on
# sm_90 (32-row tiles fall back to mma.sync). The aligned half-precision entries are the shapes that matter for speed.
_TILES = {
    ("fwd", "half", True): (
        Tiles(128, 128, 32, 8, 4),
        Tiles(128, 128, 64, 8, 3),
        Tiles(64, 256, 64, 8, 3),
        # One warpgroup each, 2 and 3 CTAs per SM on sm_90 (190 and 168 registers): while one CTA runs its softmax
        # epilogue another's MMAs keep the tensor cores busy; the 8-warp tiles above run 1 CTA per SM, so theirs stall.
        Tiles(64, 128, 64, 4, 3),
        Tiles(64, 128, 32, 4, 4),
    ),
    ("bwd", "half", True): (Tiles(64, 128, 64, 4, 3), Tiles(128, 128, 32, 8, 4)),
    ("fwd", "fp32", True): (Tiles(64, 64, 32, 4, 3),),
    ("bwd", "fp32", True): (Tiles(64, 64, 32, 8, 3),),
    # Rows that are not 16-byte aligned (an odd H) load element by element, through registers: smaller tiles.
    ("fwd", "half", False): (Tiles(64, 64, 32, 4, 2),),
    ("bwd", "half", False): (Tiles(64, 64, 32, 4, 2),),
    ("fwd", "fp32", False): (Tiles(64, 64, 16, 4, 2),),
    ("bwd", "fp32", False): (Tiles(64, 64, 16, 8, 2),),
    # The forward with any extra asked for keeps more running sums live in its epilogue, and the backward with the
    # entropy gradient two more row vectors and a product: next to them the default tiles above spill (8 to 176
    # bytes, on sm_80 or under triton 3.6), these do not. 64 x 128 backward tiles with the entropy gradient sit at the
    # register limit on sm_80 (w4: 16 bytes spilled under triton 3.9; w8: ptxas caps them at 128 registers for two
    # CTAs per SM and spills 8 bytes under 3.6); 64 x 64 needs about 125 to 160.
    ("fwd_extras", "half", True): (Tiles(64, 128, 64, 8, 3),),
    ("fwd_extras", "fp32", True): (Tiles(64, 32, 16, 4, 2),),
    ("fwd_extras", "half", False): (Tiles(64, 64, 32, 4, 2),),
    ("fwd_extras", "fp32", False): (Tiles(64, 64, 16, 8, 2),),
    ("bwd_entropy", "half", True): (Tiles(64, 64, 64, 4, 3),),
    ("bwd_entropy", "fp32", True): (Tiles(64, 64, 32, 8, 3),),
    ("bwd_entropy", "half", False): (Tiles(64, 64, 32, 4, 2),),
    ("bwd_entropy", "fp32", False): (Tiles(64, 64, 16, 8, 2),),
}
# The interpreter: small tiles, so small test shapes still span several tiles along every dimension.
_INTERPRETED = Tiles(64, 128, 64, 4, 1)


def tile_candidates(kernel: str, dtype: torch.dtype, aligned: bool = True) -> tuple[Tiles, ...]:
    """Candidate launch tiles of the "fwd" kernel ("fwd_extras" with any extra output) or the "bwd" kernel
    ("bwd_entropy" with the entropy gradient), the default first."""
    if INTERPRET:
        return (_INTERPRETED,)
    return _TILES[kernel, "fp32" if dtype == torch.float32 else "half", aligned]


def bwd_chunk_multiple(dtype: torch.dtype) -> int:
    """Callers cut the backward's vocabulary chunks to a multiple of this: every candidate's tile width (powers of
    two) divides it, so only the last chunk has a partial tile."""
    kernels = itertools.product(("bwd", "bwd_entropy"), (True, False))
    return max(t.block_v for kernel, aligned in kernels for t in tile_candidates(kernel, dtype, aligned))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting: exact fp32 unless the user allowed TF32.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored for bf16/fp16 operands


def _align(hidden: torch.Tensor, weight: torch.Tensor) -> int:
    """Elements per 16 bytes if every row stride of hidden and weight is a multiple of 16 bytes, else 1.

    Triton specializes such strides at launch anyway; passing the strides in these units also lets the
    compile check see the same aligned, pipelined specialization that runs."""
    align = 16 // hidden.element_size()
    strides = (hidden.stride(0), hidden.stride(1), weight.stride(0))
    return align if all(s % align == 0 for s in strides) else 1


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _vocab_splits(M: int, V: int, tiles: Tiles, device: torch.device) -> tuple[int, int]:
    """(splits, tiles per split) of the forward's vocabulary loop: enough programs to fill the GPU."""
    n_vt = triton.cdiv(V, tiles.block_v)
    if INTERPRET:
        want = 3  # several splits, so the tests exercise the combine
    else:
        want = triton.cdiv(_FWD_PROGRAMS_PER_SM * _sm_count(device), triton.cdiv(M, tiles.block_m))
    per_split = triton.cdiv(n_vt, max(1, min(want, n_vt)))
    return triton.cdiv(n_vt, per_split), per_split


def _gemm_args(hidden: torch.Tensor, weight: torch.Tensor, tiles: Tiles, align: int) -> dict:
    H = hidden.shape[2]
    return {
        "BLOCK_M": tiles.block_m,
        "BLOCK_V": tiles.block_v,
        "BLOCK_K": tiles.block_k,
        "GROUP_M": _GROUP_M,
        "ALIGN": align,
        "EVEN_K": H % tiles.block_k == 0,
        "DOT_PRECISION": _dot_precision(hidden.dtype),
        "num_warps": tiles.num_warps,
        "num_stages": tiles.num_stages,
    }


def _check_layout(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, **unit_stride) -> None:
    """The launchers' layout contract. The kernels take one stride per hidden and weight row and assume unit
    strides everywhere else, so a tensor that breaks it would be read at the wrong elements: refuse it."""
    if hidden.dim() != 3 or hidden.stride(2) != 1 or weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError("hidden [B, T, H] and weight [V, H] must have unit stride over H")
    if hidden.shape[0] * hidden.shape[1] >= 2**31:
        raise ValueError(f"hidden must have fewer than 2**31 rows (the kernels use int32 row ids); got {hidden.shape}")
    vectors = {"bias": bias, **unit_stride}
    for name, t in vectors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous; got strides {t.stride()}")


# ----------------------------------------------------------------------------- launchers


@on_tensors_device
def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
    outputs: Outputs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, ...]:
    """hidden: [B, T, H], unit stride over H; weight: [V, H], unit stride over H, hidden's dtype; bias: [V]
    contiguous, or None; rows: [M] int64 contiguous indices into the N = B * T rows; labels: [N] int64 contiguous,
    each in [0, V) or ignore_index; outputs: the extras to compute.

    Returns (logp [N] fp32, 0.0 outside `rows`; lse [M] fp32; then entropy [N] fp32, argmax [N] int64,
    log_sum_sq_probs [N] fp32, mean_logits [N] fp32, each None unless asked for in `outputs`). The extras are
    written at `rows` only: ask for them with every row in `rows`.
    """
    _check_layout(hidden, weight, bias, rows=rows, labels=labels)
    B, T, H = hidden.shape
    V = weight.shape[0]
    M = rows.numel()
    dev = hidden.device
    logp = torch.zeros(B * T, device=dev, dtype=torch.float32)
    lse = torch.empty(M, device=dev, dtype=torch.float32)
    extras = [
        torch.empty(B * T, device=dev, dtype=torch.int64 if name == "argmax" else torch.float32) if wanted else None
        for name, wanted in outputs._asdict().items()
    ]
    entropy, argmax, log_sum_sq_probs, mean_logits = extras
    if M == 0:
        return logp, lse, *extras
    align = _align(hidden, weight)
    flags = {
        "RETURN_ENTROPY": outputs.entropy,
        "RETURN_ARGMAX": outputs.argmax,
        "RETURN_LOG_SUM_SQ_PROBS": outputs.log_sum_sq_probs,
        "RETURN_MEAN_LOGITS": outputs.mean_logits,
    }

    def launch(tiles: Tiles) -> None:
        splits, tiles_per_split = _vocab_splits(M, V, tiles, dev)
        n_stats = 5 if outputs.log_sum_sq_probs or outputs.mean_logits else 3
        stats = torch.empty(n_stats, splits, M, device=dev, dtype=torch.float32)
        split_argmax = torch.empty(splits, M, device=dev, dtype=torch.int32) if outputs.argmax else None
        zlabel = torch.empty(M, device=dev, dtype=torch.float32)
        _linear_logprobs_fwd_kernel[(triton.cdiv(M, tiles.block_m) * splits,)](
            hidden,
            weight,
            weight if bias is None else bias,
            rows,
            labels,
            stats,
            stats if split_argmax is None else split_argmax,
            zlabel,
            M,
            splits * M,
            T,
            hidden.stride(0) // align,
            hidden.stride(1) // align,
            weight.stride(0) // align,
            V,
            H,
            tiles_per_split,
            logit_scale,
            1.0 if softcap is None else softcap,
            1.0 / temperature,
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None,
            **flags,
            **_gemm_args(hidden, weight, tiles, align),
        )
        _linear_logprobs_combine_kernel[(triton.cdiv(M, _COMBINE_BLOCK),)](
            stats,
            stats if split_argmax is None else split_argmax,
            zlabel,
            rows,
            labels,
            logp,
            lse,
            logp if entropy is None else entropy,
            labels if argmax is None else argmax,
            logp if log_sum_sq_probs is None else log_sum_sq_probs,
            logp if mean_logits is None else mean_logits,
            M,
            splits,
            splits * M,
            V,
            ignore_index,
            BLOCK=_COMBINE_BLOCK,
            **flags,
        )

    kernel = "fwd_extras" if any(outputs) else "fwd"
    candidates = tile_candidates(kernel, hidden.dtype, align > 1)
    key = ("linear_logprobs_fwd", dev, hidden.dtype, align > 1, H, V, triton.next_power_of_2(M), bias is not None)
    key += (softcap is not None, *outputs)
    launch(pick_fastest(key, candidates, launch))
    return logp, lse, *extras


@on_tensors_device
def linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    dlogp: torch.Tensor,
    entropy: torch.Tensor | None,
    dentropy: torch.Tensor | None,
    da: torch.Tensor,
    v_start: int,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
) -> None:
    """Writes d a = d loss / d (hidden @ weight.T + bias) for the vocabulary columns [v_start, v_start + da.shape[1])
    into da ([M, chunk], unit stride over the chunk, any float dtype). Inputs as for `linear_logprobs_fwd`; lse,
    dlogp, entropy, dentropy: [M] fp32 contiguous; the entropy term is added when dentropy is given.
    """
    vectors = {"rows": rows, "labels": labels, "lse": lse, "dlogp": dlogp, "entropy": entropy, "dentropy": dentropy}
    _check_layout(hidden, weight, bias, **vectors)
    if da.stride(1) != 1:
        raise ValueError(f"da must have unit stride over its columns; got strides {da.stride()}")
    B, T, H = hidden.shape
    M, chunk = da.shape
    if M == 0 or chunk == 0:
        return
    align = _align(hidden, weight)
    has_entropy_grad = dentropy is not None

    def launch(tiles: Tiles) -> None:
        _linear_logprobs_bwd_kernel[(triton.cdiv(M, tiles.block_m) * triton.cdiv(chunk, tiles.block_v),)](
            hidden,
            weight,
            weight if bias is None else bias,
            rows,
            labels,
            lse,
            dlogp,
            entropy if has_entropy_grad else lse,
            dentropy if has_entropy_grad else lse,
            da,
            M,
            T,
            hidden.stride(0) // align,
            hidden.stride(1) // align,
            weight.stride(0) // align,
            da.stride(0),
            H,
            v_start,
            v_start + chunk,
            ignore_index,
            logit_scale,
            1.0 if softcap is None else softcap,
            1.0 / temperature,
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None,
            HAS_ENTROPY_GRAD=has_entropy_grad,
            **_gemm_args(hidden, weight, tiles, align),
        )

    candidates = tile_candidates("bwd_entropy" if has_entropy_grad else "bwd", hidden.dtype, align > 1)
    flags = (bias is not None, softcap is not None, has_entropy_grad, da.dtype)
    key = ("linear_logprobs_bwd", hidden.device, hidden.dtype, align > 1, H, triton.next_power_of_2(M), chunk, *flags)
    launch(pick_fastest(key, candidates, launch))


# ----------------------------------------------------------------------------- compile check


def _launch_case(dtype: torch.dtype, N: int, H: int, V: int, outputs: Outputs, backward: bool = True) -> None:
    """Forward (then backward) launches on meta hidden [1, N, H] (every row scored) and weight [V, H], with bias and
    softcap whenever `outputs` asks for an extra. The backward runs over 5376-column chunks, what the default 256 MiB
    budget gives at N=16384, H=4096 in bf16."""
    hidden, weight, bias = meta(1, N, H, dtype=dtype), meta(V, H, dtype=dtype), meta(V, dtype=dtype)
    rows, labels = meta(N, dtype=torch.int64), meta(N, dtype=torch.int64)
    bias, softcap = (bias, 30.0) if any(outputs) else (None, None)
    # The forward's vocabulary splits follow the SM count: an H100's 132, not the meta device's 1.
    with unittest.mock.patch(f"{__name__}._sm_count", lambda device: 132):
        _, lse, entropy, *_ = linear_logprobs_fwd(hidden, weight, bias, rows, labels, -100, 1.0, softcap, 1.0, outputs)
    chunk = 5376
    da = meta(N, chunk, dtype=dtype)
    for v0 in range(0, V, chunk) if backward else ():
        args = (lse, lse, entropy, entropy, da[:, : min(chunk, V - v0)], v0, -100, 1.0, softcap, 1.0)
        linear_logprobs_bwd(hidden, weight, bias, rows, labels, *args)


def compile_specs() -> list[LaunchCase]:
    """The target (bf16 N=16384 H=4096 V=128256) without extras (predicted), fp16 and fp32, an odd vocabulary (32001)
    and an odd hidden size (4097: rows not 16-byte aligned, a masked last K block); each without extras, with entropy
    and argmax, and with every extra (its own tile table)."""
    N, H, V = 16384, 4096, 128256
    trips = {
        "_linear_logprobs_fwd_kernel": lambda a: (a["tiles_per_split"], triton.cdiv(a["H"], a["BLOCK_K"])),
        "_linear_logprobs_combine_kernel": lambda a: (a["S"],),
        "_linear_logprobs_bwd_kernel": lambda a: (triton.cdiv(a["H"], a["BLOCK_K"]),),
    }
    cases = [
        LaunchCase(
            f"{name} bf16 N={N} H={H} V={V}",
            functools.partial(_launch_case, torch.bfloat16, N, H, V, Outputs(), backward),
            flops=(2 if backward else 1) * 2 * N * H * V,
            trips=trips,
        )  # fmt: skip
        for name, backward in (("fwd", False), ("fwd+bwd kernels", True))
    ]
    shapes = [(torch.bfloat16, N, H, V), (torch.float16, N, H, V), (torch.float32, 4096, H, V)]
    shapes += [(torch.bfloat16, 4096, H, 32001)]
    shapes += [(dtype, 4096, 4097, 32001) for dtype in (torch.bfloat16, torch.float16, torch.float32)]
    for (dtype, n, h, v), outputs in itertools.product(shapes, (Outputs(), Outputs(True, True), Outputs(*[True] * 4))):
        if outputs == Outputs() and (dtype, n) == (torch.bfloat16, N):
            continue  # the target cases above
        extras = ",".join(name for name, on in outputs._asdict().items() if on) or "none"
        label = f"{TRITON_DTYPE[dtype]} N={n} H={h} V={v} extras={extras}"
        cases.append(LaunchCase(label, functools.partial(_launch_case, dtype, n, h, v, outputs)))
    return cases
