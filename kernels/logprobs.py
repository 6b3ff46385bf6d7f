"""Per-token log-probabilities from logits: one online log-sum-exp pass forward, one pass backward.

Logits arrive as a [B, T, V] view (any [..., V] tensor whose leading dims collapse to two), so
row r lives at (r // T) * stride_b + (r % T) * stride_t and a sliced `logits[:, :-1]` needs no copy.

One program walks one row, a tile of REPS x THREADS x VEC logits per iteration, thread t of the program owning
[:, t, :]. Forward keeps a running max and sum of exponentials per thread, so its loop has no cross-thread
reduction and no barrier: per logit it costs a convert, a max, an FMA, an exp2 and an add; the threads combine once
at the end of the row. When rows are 16-byte aligned (ALIGNED), each thread's VEC logits per rep are consecutive, one
128-bit load; otherwise thread t takes every THREADS-th logit, so the (scalar) loads stay coalesced and the groups
stay inside one thread. Both loops load the next tile before they reduce (or write) the current one, so the loads of
one iteration are in flight while the previous one computes. Exponentials are exp2 of logits pre-scaled by
log2(e) / temperature. Aligned 16-bit logits (PAIRS) are loaded as 32-bit words, two logits each, and unpacked in
registers: a tile of 16-bit values carried from one iteration to the next is repacked by the compiler at the end
of the iteration, which waits for the loads just issued; words are carried as they are.

Vocabulary-parallel use: the row is a shard of a wider vocabulary, its first logit at `vocab_offset` of
`vocab_total`. Labels are global ids: the shard owning the label reads its logit; a label in another shard gives
log-prob 0 here (the combine across shards adds the owner's); only a label outside [0, vocab_total) gives NaN.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from . import TRITON_DTYPE, LaunchCase, meta, on_tensors_device

_LOAD_BYTES = 16  # one 128-bit load
_REPS = 4  # 16-byte loads per thread per iteration: 16 KiB tiles at 8 warps
_MAX_WARPS = 8
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# exp2 of this is 0 in float32: clamping there keeps e * d an exact 0 where a logit is -inf (not 0 * -inf).
EXP2_FLOOR: tl.constexpr = tl.constexpr(-150.0)


@triton.jit
def _row_start(p_x, i_n, T, stride_b, stride_t):
    """Pointer to row i_n of a [B, T, V] view: 32-bit division (the row index fits), int64 offsets (a 16k x 128k
    logits tensor overflows int32)."""
    i_b = i_n // T
    i_t = i_n - i_b * T
    return p_x + i_b.to(tl.int64) * stride_b + i_t.to(tl.int64) * stride_t


@triton.jit
def _label_state(p_labels, i_n, ignore_index, v_offset, V, vocab_total):
    """(label in this shard's coordinates, ignored, owned by this shard, valid anywhere in the vocabulary)."""
    label = tl.load(p_labels + i_n)
    local = label - v_offset
    ignored = label == ignore_index
    owned = (local >= 0) & (local < V) & ~ignored
    valid = (label >= 0) & (label < vocab_total)
    return local, ignored, owned, valid


@triton.jit
def _tile_offsets(REPS: tl.constexpr, THREADS: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    """Logit offsets of a tile in the 2-D shape it is loaded in, from which Triton lays it out with each thread
    owning REPS x VEC logits: ALIGNED [REPS * THREADS, VEC], VEC consecutive logits per thread and rep (one 16-byte
    load); else [REPS * VEC, THREADS], thread t taking every THREADS-th logit (scalar loads, coalesced across
    threads). Both shapes are unambiguous to Triton 3.6 and 3.9 (a 3-D tile was not: 3.6 spread its reps over
    lanes)."""
    if ALIGNED:
        return tl.arange(0, REPS * THREADS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    else:
        return tl.arange(0, REPS * VEC)[:, None] * THREADS + tl.arange(0, THREADS)[None, :]


@triton.jit
def _per_thread(b, REPS: tl.constexpr, THREADS: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    """A tile in its load shape -> [THREADS, REPS * VEC], row t what thread t holds (no data moves)."""
    if ALIGNED:
        return tl.reshape(tl.permute(tl.reshape(b, (REPS, THREADS, VEC)), (1, 0, 2)), (THREADS, REPS * VEC))
    else:
        return tl.trans(b)


@triton.jit
def _load_tile(p_row, v0, o_t, mask, PAIRS: tl.constexpr):
    """The raw tile at logit v0: 32-bit words of two logits (o_t in words) when PAIRS, else logits (o_t in logits).
    Masked-off values are 0."""
    if PAIRS:
        p_tile = p_row.to(tl.pointer_type(tl.int32)) + v0 // 2 + o_t
    else:
        p_tile = p_row + v0 + o_t
    if mask is None:
        return tl.load(p_tile)
    else:
        return tl.load(p_tile, mask=mask, other=0)


@triton.jit
def _both(mask, other_mask):
    """mask & other_mask, where other_mask None means all true."""
    if other_mask is None:
        return mask
    else:
        return mask & other_mask


@triton.jit
def _unpack(b_raw, DTYPE: tl.constexpr, PAIRS: tl.constexpr):
    """A raw tile as fp32 logits in its load shape ([R, VEC] from [R, VEC / 2] words: a word holds its
    lower-addressed logit low)."""
    if PAIRS:
        if DTYPE == tl.bfloat16:  # bf16 is the top half of an fp32
            lo = (b_raw << 16).to(tl.float32, bitcast=True)
            hi = (b_raw & -65536).to(tl.float32, bitcast=True)
        else:
            lo = b_raw.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = (b_raw >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return tl.reshape(tl.join(lo, hi), (b_raw.shape[0], 2 * b_raw.shape[1]))
    else:
        return b_raw.to(tl.float32)


@triton.jit
def _fold_tile(b_x, v0, m, s, t, s2, best, c, REPS: tl.constexpr, THREADS: tl.constexpr, VEC: tl.constexpr,
               ALIGNED: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr, SUM_SQ: tl.constexpr):  # fmt: skip
    """Folds a [THREADS, REPS * VEC] tile of raw fp32 logits b_x at logit v0 (-inf where masked), row t held by thread
    t, into each thread's running statistics: max m of the raw logits, s = sum 2^d with d = x c - ref and ref = m c
    (0 while m is -inf), t = sum 2^d d, s2 = sum 2^(2d), best = position of the first maximum. No value crosses
    threads."""
    b_max = tl.max(b_x, 1)  # skips NaN, compiled and interpreted alike
    if ARGMAX:
        # The thread's first maximum: its column q (a constant per register, so no offsets are kept live), then
        # its logit, which grows with q.
        q = tl.min(tl.where(b_x == b_max[:, None], tl.arange(0, REPS * VEC)[None, :], REPS * VEC), 1)
        o_t = tl.arange(0, THREADS)
        if ALIGNED:
            first = ((q // VEC) * THREADS + o_t) * VEC + q % VEC
        else:
            first = q * THREADS + o_t
        best = tl.where(b_max > m, v0 + first, best)  # strict: the first maximum
    m_new = tl.maximum(m, b_max)
    ref = tl.where(m_new == float("-inf"), 0.0, m_new * c)
    delta = tl.where(m == float("-inf"), 0.0, m * c - ref)  # <= 0; 0 while nothing was summed
    alpha = tl.exp2(delta)
    b_d = b_x * c - ref[:, None]
    if ENTROPY:
        b_d = tl.maximum(b_d, EXP2_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    b_e = tl.exp2(b_d)
    if ENTROPY:
        t = alpha * (t + delta * s) + tl.sum(b_e * b_d, 1)
    if SUM_SQ:
        s2 = alpha * alpha * s2 + tl.sum(b_e * b_e, 1)
    s = alpha * s + tl.sum(b_e, 1)
    return m_new, s, t, s2, best


@triton.jit
def _token_logprobs_fwd_kernel(
    p_logits,  # [B, T, V] any dtype, unit stride over V
    p_labels,  # [N] int64, N = B * T: global ids
    p_logp,  # [N] fp32 out
    p_lse,  # [N] fp32 out: logsumexp(logits / temperature) over this shard
    p_entropy,  # [N] fp32 out, if RETURN_ENTROPY
    p_argmax,  # [N] int64 out, if RETURN_ARGMAX: index in this shard
    p_log_sum_sq,  # [N] fp32 out: log(sum_v p_v^2), if RETURN_SUM_SQ
    p_mean,  # [N] fp32 out: mean_v z, if RETURN_MEAN
    T,
    stride_b,
    stride_t,
    V,  # this shard's vocabulary
    v_offset,  # global id of its first logit
    vocab_total,
    ignore_index,
    inv_temperature,
    REPS: tl.constexpr,
    THREADS: tl.constexpr,  # 32 * num_warps
    VEC: tl.constexpr,  # logits per 16 bytes
    ALIGNED: tl.constexpr,  # rows 16-byte aligned: 128-bit loads
    PAIRS: tl.constexpr,  # 16-bit logits loaded as 32-bit words
    RETURN_ENTROPY: tl.constexpr,
    RETURN_ARGMAX: tl.constexpr,
    RETURN_SUM_SQ: tl.constexpr,
    RETURN_MEAN: tl.constexpr,
):
    TILE: tl.constexpr = REPS * THREADS * VEC
    DTYPE: tl.constexpr = p_logits.dtype.element_ty
    i_n = tl.program_id(0)
    p_row = _row_start(p_logits, i_n, T, stride_b, stride_t)
    local, ignored, owned, valid = _label_state(p_labels, i_n, ignore_index, v_offset, V, vocab_total)
    c = inv_temperature * LOG2E

    # Rows with an ignored label cost nothing unless the caller wants an extra (every position gets those).
    if RETURN_ENTROPY or RETURN_ARGMAX or RETURN_SUM_SQ or RETURN_MEAN:
        v_end = V
    else:
        v_end = tl.where(ignored, 0, V)
    v_full = v_end // TILE * TILE

    o_load = _tile_offsets(REPS, THREADS, VEC, ALIGNED)  # logits, load shape
    o_t = _tile_offsets(REPS, THREADS, VEC // 2, ALIGNED) if PAIRS else o_load  # what is loaded: words when PAIRS
    o_x = _per_thread(o_load, REPS, THREADS, VEC, ALIGNED)  # for the masks of the last tile
    m = tl.full((THREADS,), float("-inf"), tl.float32)
    s = tl.zeros((THREADS,), tl.float32)
    t = tl.zeros((THREADS,), tl.float32)
    s2 = tl.zeros((THREADS,), tl.float32)
    x_sum = tl.zeros((THREADS,), tl.float32)
    best = tl.zeros((THREADS,), tl.int32)

    # Software-pipelined: each iteration loads the next tile, then folds the one the previous iteration loaded, so the
    # loads stay in flight across the loop's back edge. (The backward loads after its stores: in that order the
    # compiler keeps its loads in flight too; here this order uses fewer registers on an unaligned row.)
    b_next = _load_tile(p_row, 0, o_t, o_t < v_full // (2 if PAIRS else 1), PAIRS)
    for v0 in range(0, v_full - TILE, TILE):
        b_x = _per_thread(_unpack(b_next, DTYPE, PAIRS), REPS, THREADS, VEC, ALIGNED)
        b_next = _load_tile(p_row, v0 + TILE, o_t, None, PAIRS)
        m, s, t, s2, best = _fold_tile(
            b_x, v0, m, s, t, s2, best, c, REPS, THREADS, VEC, ALIGNED, RETURN_ENTROPY, RETURN_ARGMAX, RETURN_SUM_SQ
        )
        if RETURN_MEAN:
            x_sum += tl.sum(b_x, 1)
    if v_full > 0:
        b_x = _per_thread(_unpack(b_next, DTYPE, PAIRS), REPS, THREADS, VEC, ALIGNED)
        m, s, t, s2, best = _fold_tile(
            b_x, v_full - TILE, m, s, t, s2, best, c, REPS, THREADS, VEC, ALIGNED, RETURN_ENTROPY, RETURN_ARGMAX,
            RETURN_SUM_SQ,
        )  # fmt: skip
        if RETURN_MEAN:
            x_sum += tl.sum(b_x, 1)
    if v_full < v_end:  # the last, partial tile
        m_t = o_t < (v_end - v_full) // (2 if PAIRS else 1)  # V is even when PAIRS
        b_x = _unpack(_load_tile(p_row, v_full, o_t, m_t, PAIRS), DTYPE, PAIRS)
        b_x = _per_thread(b_x, REPS, THREADS, VEC, ALIGNED)
        m_x = o_x < v_end - v_full
        b_x = tl.where(m_x, b_x, float("-inf"))
        m, s, t, s2, best = _fold_tile(
            b_x, v_full, m, s, t, s2, best, c, REPS, THREADS, VEC, ALIGNED, RETURN_ENTROPY, RETURN_ARGMAX, RETURN_SUM_SQ
        )
        if RETURN_MEAN:
            x_sum += tl.sum(tl.where(m_x, b_x, 0.0), 1)

    # Combine the threads: each one's sums are relative to its own reference.
    row_max = tl.max(m, 0)
    ref = tl.where(row_max == float("-inf"), 0.0, row_max * c)
    delta = tl.where(m == float("-inf"), 0.0, m * c - ref)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(delta))
    total = tl.sum(w * s, 0)
    log2_total = tl.log2(total)
    lse = (ref + log2_total) * LN2  # -inf when nothing was read
    # The label is read only when this shard owns it: a bad label can never read out of bounds.
    # Relative to the row's max, not through lse: exact 0 minus ln(total) when the label is the max, whose log-prob
    # near 0 would otherwise carry lse's rounding (1e-6 absolute at lse ~ 10).
    x_label = tl.load(p_row + local, mask=owned, other=0.0).to(tl.float32)
    logp = (x_label - row_max) * inv_temperature - log2_total * LN2
    logp = tl.where(owned, logp, tl.where(valid | ignored, 0.0, float("nan")))
    tl.store(p_logp + i_n, logp)
    tl.store(p_lse + i_n, lse)
    if RETURN_ENTROPY:
        # H = -sum p ln p with ln p = (d - log2 total) ln 2
        tl.store(p_entropy + i_n, (log2_total - tl.sum(w * (t + delta * s), 0) / total) * LN2)
    if RETURN_ARGMAX:
        # The first maximum; a thread that saw only -inf or NaN holds 0, as does an all -inf or all-NaN row. Where
        # the max propagated a NaN (triton 3.6's interpreter does) no thread matches: 0 then too, never V.
        first = tl.min(tl.where(m == row_max, best, V), 0)
        tl.store(p_argmax + i_n, tl.where(first < V, first, 0).to(tl.int64))
    if RETURN_SUM_SQ:
        tl.store(p_log_sum_sq + i_n, (tl.log2(tl.sum(w * w * s2, 0)) - 2.0 * log2_total) * LN2)
    if RETURN_MEAN:
        tl.store(p_mean + i_n, tl.sum(x_sum, 0) * inv_temperature / V)


@triton.jit
def _dlogits_tile(b_x, c, ref, k0, k1, ENTROPY_GRAD: tl.constexpr):
    """d logits / temperature of raw logits b_x, the label term left out: -p (k0 + k1 d) with p = 2^d."""
    b_d = b_x * c - ref
    if ENTROPY_GRAD:
        b_d = tl.maximum(b_d, EXP2_FLOOR, propagate_nan=tl.PropagateNan.ALL)  # p = 0 at -inf: 0, not 0 * inf
        return -tl.exp2(b_d) * (k0 + k1 * b_d)
    else:
        return -tl.exp2(b_d) * k0


@triton.jit
def _token_logprobs_bwd_kernel(
    p_logits,  # [B, T, V] input logits, unit stride over V
    p_dlogits,  # [B, T, V] out, may alias p_logits (then the strides are equal)
    p_labels,  # [N] int64: global ids
    p_lse,  # [N] fp32: logsumexp over the whole vocabulary
    p_logp,  # [N] fp32: the label log-probs over the whole vocabulary
    p_dlogp,  # [N] fp32: upstream gradient of the log-probs
    p_entropy,  # [N] fp32, if HAS_ENTROPY_GRAD: entropy over the whole vocabulary
    p_dentropy,  # [N] fp32, if HAS_ENTROPY_GRAD
    T,
    stride_b,
    stride_t,
    stride_db,
    stride_dt,
    V,
    v_offset,
    vocab_total,
    ignore_index,
    inv_temperature,
    REPS: tl.constexpr,
    THREADS: tl.constexpr,
    VEC: tl.constexpr,
    ALIGNED: tl.constexpr,
    PAIRS: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
):
    TILE: tl.constexpr = REPS * THREADS * VEC
    DTYPE: tl.constexpr = p_logits.dtype.element_ty
    i_n = tl.program_id(0)
    p_row = _row_start(p_logits, i_n, T, stride_b, stride_t)
    p_drow = _row_start(p_dlogits, i_n, T, stride_db, stride_dt)
    local, ignored, owned, valid = _label_state(p_labels, i_n, ignore_index, v_offset, V, vocab_total)
    c = inv_temperature * LOG2E
    o_x = _tile_offsets(REPS, THREADS, VEC, ALIGNED)  # the backward stays in the load shape: nothing is reduced
    o_t = _tile_offsets(REPS, THREADS, VEC // 2, ALIGNED) if PAIRS else o_x
    # d/dz of g logp + gh H = g onehot - p (g + gh (ln p + H)); d/dx = d/dz / temperature. A label outside the
    # vocabulary made a NaN log-prob: its gradient is NaN too, never a silent wrong value.
    g = tl.where(ignored, 0.0, tl.load(p_dlogp + i_n))
    g = tl.where(valid | ignored, g, float("nan")) * inv_temperature
    if HAS_ENTROPY_GRAD:
        gh = tl.load(p_dentropy + i_n) * inv_temperature
        entropy = tl.load(p_entropy + i_n)
        k0 = g + gh * entropy
        k1 = gh * LN2  # ln p = d ln 2
        read = None  # every row is read
        ref = tl.load(p_lse + i_n) * LOG2E  # p = 2^(x c - ref)
    else:
        k0 = g
        k1 = 0.0
        # An ignored row's gradient is 0: its loads are predicated off by a mask that is the same in every iteration,
        # so it reads nothing, and its tiles are 2^0 * 0. One loop for every row (a separate loop of zero stores is a
        # second loop in SASS). (A scalar mask would do, but the interpreter rejects a loaded scalar's as a mask.)
        read = o_t < tl.where(ignored, 0, TILE)
        ref = tl.where(ignored, 0.0, tl.load(p_lse + i_n) * LOG2E)
    v_full = V // TILE * TILE
    # The label's 1 - p comes from its log-prob (the forward's, relative to the row max), not from 2^(x c - ref),
    # which carries the rounding of lse: 1e-6 absolute at lse ~ 10, all of 1 - p when p is near 1.
    logp_label = tl.load(p_logp + i_n)

    b_next = _load_tile(p_row, 0, o_t, _both(o_t < v_full // (2 if PAIRS else 1), read), PAIRS)  # pipelined
    for v0 in range(0, v_full - TILE, TILE):
        b_dx = _dlogits_tile(_unpack(b_next, DTYPE, PAIRS), c, ref, k0, k1, HAS_ENTROPY_GRAD)
        tl.store(p_drow + v0 + o_x, b_dx.to(p_dlogits.dtype.element_ty))
        b_next = _load_tile(p_row, v0 + TILE, o_t, read, PAIRS)  # after the store: dlogits may alias the logits
    if v_full > 0:
        b_dx = _dlogits_tile(_unpack(b_next, DTYPE, PAIRS), c, ref, k0, k1, HAS_ENTROPY_GRAD)
        tl.store(p_drow + (v_full - TILE) + o_x, b_dx.to(p_dlogits.dtype.element_ty))
    if v_full < V:  # the last, partial tile
        m_t = _both(o_t < (V - v_full) // (2 if PAIRS else 1), read)
        b_x = _unpack(_load_tile(p_row, v_full, o_t, m_t, PAIRS), DTYPE, PAIRS)
        b_dx = _dlogits_tile(b_x, c, ref, k0, k1, HAS_ENTROPY_GRAD)
        tl.store(p_drow + v_full + o_x, b_dx.to(p_dlogits.dtype.element_ty), mask=o_x < V - v_full)

    # The label's term, once per row instead of a compare per logit: after every thread's tile stores.
    tl.debug_barrier()
    d_label = g * (1.0 - tl.exp(logp_label))  # g (1 - p) - gh p (ln p + H)
    if HAS_ENTROPY_GRAD:
        logp_floor = tl.maximum(logp_label, EXP2_FLOOR, propagate_nan=tl.PropagateNan.ALL)  # p = 0: 0, not 0 * -inf
        d_label -= tl.exp(logp_floor) * gh * (logp_floor + entropy)
    tl.store(p_drow + local, d_label.to(p_dlogits.dtype.element_ty), mask=owned)


def _config(logits: torch.Tensor) -> dict:
    """Tile constexprs and warps: 16-byte vectors, 16 KiB tiles (4 vectors per thread at 8 warps), fewer warps and
    reps for a small vocabulary; ALIGNED when Triton's launch specialization can prove 16-byte aligned rows (it
    hints integers divisible by 16 and 16-byte aligned pointers), PAIRS for 16-bit logits then."""
    B, T, V = logits.shape
    vec = _LOAD_BYTES // logits.element_size()
    vectors = triton.next_power_of_2(triton.cdiv(max(V, 1), vec))  # 16-byte vectors in a row, rounded up
    num_warps = max(1, min(_MAX_WARPS, vectors // (32 * _REPS)))
    reps = max(1, min(_REPS, vectors // (32 * num_warps)))
    aligned = logits.data_ptr() % 16 == 0 and logits.stride(0) % 16 == 0 and logits.stride(1) % 16 == 0
    pairs = aligned and logits.element_size() == 2 and V % 2 == 0
    return dict(REPS=reps, THREADS=32 * num_warps, VEC=vec, ALIGNED=aligned, PAIRS=pairs, num_warps=num_warps)


@on_tensors_device
def token_logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    temperature: float,
    return_entropy: bool,
    return_argmax: bool,
    return_sum_sq: bool = False,
    return_mean: bool = False,
    vocab_offset: int = 0,
    vocab_total: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """logits: [B, T, V] with stride 1 over V (a vocabulary shard starting at global id `vocab_offset` of
    `vocab_total`, default V); labels: [B * T] int64 contiguous, global ids.

    Returns (logp [N] fp32, lse [N] fp32, entropy [N] fp32 or None, argmax [N] int64 or None,
    log_sum_sq [N] fp32 or None, mean [N] fp32 or None), all over this shard.
    """
    B, T, V = logits.shape
    N = B * T
    logp = torch.empty(N, device=logits.device, dtype=torch.float32)
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    entropy = torch.empty(N, device=logits.device, dtype=torch.float32) if return_entropy else None
    argmax = torch.empty(N, device=logits.device, dtype=torch.int64) if return_argmax else None
    log_sum_sq = torch.empty(N, device=logits.device, dtype=torch.float32) if return_sum_sq else None
    mean = torch.empty(N, device=logits.device, dtype=torch.float32) if return_mean else None
    if N == 0:
        return logp, lse, entropy, argmax, log_sum_sq, mean
    _token_logprobs_fwd_kernel[(N,)](
        logits,
        labels,
        logp,
        lse,
        entropy if return_entropy else lse,
        argmax if return_argmax else labels,
        log_sum_sq if return_sum_sq else lse,
        mean if return_mean else lse,
        T,
        logits.stride(0),
        logits.stride(1),
        V,
        vocab_offset,
        V if vocab_total is None else vocab_total,
        ignore_index,
        1.0 / temperature,
        RETURN_ENTROPY=return_entropy,
        RETURN_ARGMAX=return_argmax,
        RETURN_SUM_SQ=return_sum_sq,
        RETURN_MEAN=return_mean,
        **_config(logits),
    )
    return logp, lse, entropy, argmax, log_sum_sq, mean


@on_tensors_device
def token_logprobs_bwd(
    logits: torch.Tensor,
    dlogits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    logp: torch.Tensor,
    dlogp: torch.Tensor,
    entropy: torch.Tensor | None,
    dentropy: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
    vocab_offset: int = 0,
    vocab_total: int | None = None,
) -> None:
    """Writes d logits into dlogits ([B, T, V], stride 1 over V; it may be logits itself).

    lse, logp, dlogp, entropy, dentropy: [N] fp32 contiguous, lse, the label log-probs and entropy over the whole
    vocabulary. The entropy term is added when dentropy is given. A vocabulary shard: see `token_logprobs_fwd`.
    """
    B, T, V = logits.shape
    N = B * T
    if N == 0:
        return
    has_entropy_grad = dentropy is not None
    _token_logprobs_bwd_kernel[(N,)](
        logits,
        dlogits,
        labels,
        lse,
        logp,
        dlogp,
        entropy if has_entropy_grad else lse,
        dentropy if has_entropy_grad else lse,
        T,
        logits.stride(0),
        logits.stride(1),
        dlogits.stride(0),
        dlogits.stride(1),
        V,
        vocab_offset,
        V if vocab_total is None else vocab_total,
        ignore_index,
        1.0 / temperature,
        HAS_ENTROPY_GRAD=has_entropy_grad,
        **_config(logits),
    )


_EXTRAS = ("entropy", "argmax", "sum_sq", "mean")  # token_logprobs_fwd's optional outputs, in its order


def _launch_case(
    dtype: torch.dtype, B: int, T: int, V: int, extras: tuple, backward: bool, pad_t: int = 0, shard: tuple = ()
) -> None:
    """Forward (then backward) launches on meta logits [B, T, V], sliced from [B, T + pad_t, V] when pad_t > 0, with
    the optional outputs named in `extras` (of _EXTRAS); shard = (vocab_offset, vocab_total) of a vocabulary slice."""
    logits = meta(B, T + pad_t, V, dtype=dtype)[:, :T]
    labels = meta(B * T, dtype=torch.int64)
    flags = (name in extras for name in _EXTRAS)
    logp, lse, entropy, *_ = token_logprobs_fwd(logits, labels, -100, 1.0, *flags, *shard)
    if backward:
        dlogits = meta(B, T, V, dtype=dtype)
        token_logprobs_bwd(logits, dlogits, labels, lse, logp, logp, entropy, entropy, -100, 1.0, *shard)


def _tiles(args: dict) -> tuple[int]:
    """Trip count of either kernel's loop over a row: its whole tiles but the last (which, like a partial one, is
    folded after the loop)."""
    return (max(args["V"] // (args["REPS"] * args["THREADS"] * args["VEC"]) - 1, 0),)


def compile_specs() -> list[LaunchCase]:
    """The target (bf16 N=16384 V=128256, which fastalign.logprobs views as [1, N, V]) with no extras and with entropy
    and argmax; every extra, fp16/fp32 at that V and at an odd one, a sliced logits[:, :-1] (B=8, T=257), a single
    token (N = T = 1 specializes) and a vocabulary slice."""
    N, V = 16384, 128256
    trips = {"_token_logprobs_fwd_kernel": _tiles, "_token_logprobs_bwd_kernel": _tiles}
    cases = [
        LaunchCase(
            f"{name} {'fwd+bwd' if bwd else 'fwd'} bf16 N={N} V={V}",
            functools.partial(_launch_case, torch.bfloat16, 1, N, V, extras, bwd),
            bytes=(3 if bwd else 1) * N * V * 2,
            target=75 if bwd else 85,
            trips=trips,
        )
        for extras, name in (((), "token_logprobs"), (_EXTRAS[:2], "token_stats(entropy, argmax)"))
        for bwd in (False, True)
    ]
    shapes = [(torch.bfloat16, V), (torch.float16, V), (torch.float32, V)]
    shapes += [(dtype, 32001) for dtype in (torch.bfloat16, torch.float16, torch.float32)]
    for (dtype, v), extras in itertools.product(shapes, ((), _EXTRAS)):
        label = f"fwd+bwd {TRITON_DTYPE[dtype]} N=4096 V={v} extras={','.join(extras) or 'none'}"
        cases.append(LaunchCase(label, functools.partial(_launch_case, dtype, 1, 4096, v, extras, True)))
    sliced = functools.partial(_launch_case, torch.bfloat16, 8, 257, 50257, _EXTRAS, True, 1)
    one_token = functools.partial(_launch_case, torch.bfloat16, 1, 1, V, _EXTRAS, True)
    # Shard(-1) logits: rank 2 of 4's slice of V (the offset and total are runtime arguments).
    vocab_shard = functools.partial(_launch_case, torch.bfloat16, 1, 4096, V // 4, _EXTRAS, True, 0, (V // 2, V))
    cases += [LaunchCase("sliced [:, :-1] bf16 B=8 T=257 V=50257", sliced), LaunchCase("one token", one_token)]
    return cases + [LaunchCase(f"vocab shard bf16 N=4096 V={V // 4} of {V}", vocab_shard)]
