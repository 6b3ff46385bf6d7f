"""Online-merging AdamW steps (OnDARE, OnTIES) over many parameter shards per launch.

Each launch covers many parameters of one dtype. A parameter's local shard is a "slot": one row
of the int64 table `slots` [S, N_FIELDS] holding the addresses of its tensors (parameter,
gradient, moments, τ, accumulated Δ) and where it sits: its offset in the launch's flat index
space and the global element index of its first local element. The flat space concatenates the
slots, each starting on a TILE boundary, and is cut into tiles `tiles` [n_tiles, 3] int64 rows
(slot, begin, end) that never straddle two slots: one program per tile, so a bias of 4096
elements costs one program of a launch, not a launch.

- OnDARE is one pass (`_ondare_step_kernel`): moments, Δ, the random keep, the merge with τ,
  the update and the weight decay. The keep is a counter-based hash of the global element index
  under a key of (seed, parameter index, step) (`_dare_keep`), so it is the same however the
  parameter is sharded or tiled, and fastalign.optim computes the same bits in torch ops.
- OnTIES writes Δ to a flat fp32 buffer while histogramming the top digit of |Δ|
  (`_ties_delta_kernel`); radix_select.py finishes the exact top-k threshold; then one apply
  pass (`_ties_apply_kernel`) keeps the top k, elects signs against τ and updates.

Per-slot values that change every step (t, the bias-corrected step size) come in small device
arrays; a device flag `skip` (found_inf, or a non-finite gradient) turns every kernel into a
no-op without a host sync.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from . import INTERPRET, TRITON_DTYPE, LaunchCase, meta, on_tensors_device
from .radix_select import CANDIDATE_SHARE, HISTOGRAM_CANDIDATES, RADIX_DIGITS, append_candidates, radix_histogram

# Columns of the slot table.
SLOT_FIELDS = (
    "param",  # address of the local shard of the parameter
    "grad",
    "exp_avg",  # fp32
    "exp_avg_sq",  # fp32
    "ref_delta",  # τ, bf16 or fp32 (0 without τ)
    "cached_delta",  # fp32 Δ accumulated between merges (0 when online_step == 1)
    "flat_offset",  # where the slot starts in the launch's flat index space (a multiple of TILE)
    "global_offset",  # global element index of the shard's first element
    "run",  # the shard's elements are runs of this many consecutive global indices ...
    "run_stride",  # ... this far apart (one run: run == run_stride)
    "dare_key",  # 32-bit key of the parameter's random keeps: fastalign.optim's dare_key(seed, index)
)
N_FIELDS = tl.constexpr(len(SLOT_FIELDS))
(
    _PARAM,
    _GRAD,
    _EXP_AVG,
    _EXP_AVG_SQ,
    _REF_DELTA,
    _CACHED,
    _FLAT_OFFSET,
    _GLOBAL_OFFSET,
    _RUN,
    _RUN_STRIDE,
    _DARE_KEY,
) = (tl.constexpr(i) for i in range(len(SLOT_FIELDS)))

# The DARE keep hashes with triple32 (C. Wellons, hash-prospector: xorshift-multiply rounds on
# 32 bits, exhaustively measured avalanche bias 0.0209, the level of a random permutation). Its
# 32-bit multiplies keep their exact low bits in int32 torch ops, so the torch path computes the
# same bits. HASH_SHIFTS[i] precedes HASH_MULTIPLIERS[i]; the last shift ends the hash.
HASH_SHIFTS = (17, 11, 15, 14)
HASH_MULTIPLIERS = (0xED5AD4BB, 0xAC4C1B51, 0x31848BAB)
GOLDEN = 0x9E3779B9  # 2**32 / φ: spreads the high word of a global index over 32 bits
_S0, _S1, _S2, _S3 = (tl.constexpr(x) for x in HASH_SHIFTS)
_M0, _M1, _M2 = (tl.constexpr(x) for x in HASH_MULTIPLIERS)
_GOLDEN = tl.constexpr(GOLDEN)

# Elements per loop iteration and per tile. A DARE tile is short, for load balance; a TIES tile
# is long, because each of its programs adds a 1024-bin histogram into global memory with
# atomics. Under the interpreter both are small so that tests cross tile and block boundaries.
BLOCK = 128 if INTERPRET else 1024
DARE_TILE = 4 * BLOCK if INTERPRET else 16 * BLOCK
TIES_TILE = 4 * BLOCK if INTERPRET else 256 * BLOCK
_NUM_WARPS = 4


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _ptr(p_slot, FIELD: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    p = tl.load(p_slot + FIELD).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # the host checked every address: lets full blocks use 16-byte loads
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _ld(p, o, m, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(p + o, mask=m, other=0.0).to(tl.float32)
    else:
        return tl.load(p + o).to(tl.float32)


# Triton's interpreter truncates float32 -> bfloat16 where GPUs round to nearest even; under the
# interpreter the kernels round by hand, so that tests see the bits a GPU writes.
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def _bf16_round_nearest_even(x):
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _st(p, o, x, m, MASKED: tl.constexpr):
    if _ROUND_BF16_BY_HAND and p.dtype.element_ty == tl.bfloat16:
        y = _bf16_round_nearest_even(x)
    else:
        y = x.to(p.dtype.element_ty)
    if MASKED:
        tl.store(p + o, y, mask=m)
    else:
        tl.store(p + o, y)


@triton.jit
def _tile(p_tiles, p_slots, i_t, BLOCK: tl.constexpr):
    """(slot row pointer, flat offset, local begin, local end of full blocks, local end)."""
    slot = tl.load(p_tiles + i_t * 3)
    p_slot = p_slots + slot * N_FIELDS
    flat_offset = tl.load(p_slot + _FLAT_OFFSET)
    begin = tl.multiple_of(tl.load(p_tiles + i_t * 3 + 1) - flat_offset, BLOCK)
    end = tl.load(p_tiles + i_t * 3 + 2) - flat_offset
    return slot, p_slot, flat_offset, begin, begin + (end - begin) // BLOCK * BLOCK, end


@triton.jit
def _adam_delta(p_grad, p_m, p_v, o, m, inv_scale, step_size, beta1, beta2, eps, STORE: tl.constexpr, MASKED):
    """Updates the moments (stored if STORE) and returns Δ = -step_size · m / (√v + eps)."""
    g = _ld(p_grad, o, m, MASKED) * inv_scale
    b_m = beta1 * _ld(p_m, o, m, MASKED) + (1.0 - beta1) * g
    b_v = beta2 * _ld(p_v, o, m, MASKED) + (1.0 - beta2) * g * g
    if STORE:
        _st(p_m, o, b_m, m, MASKED)
        _st(p_v, o, b_v, m, MASKED)
    return -step_size * tl.div_rn(b_m, tl.sqrt_rn(b_v) + eps)


@triton.jit
def _triple32(x):
    """triple32 of uint32 x (a bijection of 32-bit words)."""
    x ^= x >> _S0
    x *= _M0
    x ^= x >> _S1
    x *= _M1
    x ^= x >> _S2
    x *= _M2
    return x ^ (x >> _S3)


@triton.jit
def _step_key(dare_key, t):
    """uint32 key of one parameter's keeps at step t (t = 0 draws τ's)."""
    return _triple32((dare_key ^ t).to(tl.uint32))


@triton.jit
def _global_index(o, first, run, run_stride):
    """int64 global row-major indices of local elements o of a shard whose elements are runs of
    `run` consecutive global indices, `run_stride` apart, from `first` (a shard of rows of a
    wider parameter is under 2**31 elements: int32 division)."""
    if run == run_stride:
        idx = first + o
    else:
        o32 = o.to(tl.int32)
        row = o32 // run.to(tl.int32)
        idx = first + row.to(tl.int64) * run_stride + (o32 - row * run.to(tl.int32)).to(tl.int64)
    return idx


@triton.jit
def _dare_keep(idx, step_key, keep_below):
    """Bernoulli keep of int64 global element indices idx: P = (keep_below + 2**30) / 2**31.

    h = triple32(low word of idx ^ step_key ^ GOLDEN · high word), read as int32 and shifted right
    by 1, is uniform on [-2**30, 2**30); the keep is h < keep_below."""
    x = idx.to(tl.uint32) ^ step_key ^ ((idx >> 32).to(tl.uint32) * _GOLDEN)
    return (_triple32(x).to(tl.int32, bitcast=True) >> 1) < keep_below


# ----------------------------------------------------------------------------- OnDARE


@triton.jit
def _ondare_block(
    p_param, p_grad, p_m, p_v, p_tau, p_c, o, end, global_offset, run, run_stride, step_key, merge,
    step_size, inv_scale, factor, bound, beta1, beta2, eps, lr_wd, alpha, inv_p, keep_below,
    HAS_TAU: tl.constexpr, DROP: tl.constexpr, RESCALE: tl.constexpr, SUMS_ONLY: tl.constexpr,
    ACCUMULATE: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    m = o < end
    d = _adam_delta(p_grad, p_m, p_v, o, m, inv_scale, step_size, beta1, beta2, eps, not SUMS_ONLY, MASKED)
    d_plain = d
    if ACCUMULATE:
        # An ordinary step applies and accumulates the plain Δ; a merge step rolls the
        # accumulated Δ back and sparsifies and merges it together with this step's Δ.
        c = _ld(p_c, o, m, MASKED)
        if not SUMS_ONLY:
            _st(p_c, o, tl.where(merge, 0.0, c + d), m, MASKED)
        d = d + c
    if DROP:
        # A NaN Δ (from a NaN or ±inf gradient) is always kept, so θ turns NaN as AdamW's would.
        keep = _dare_keep(_global_index(o, global_offset, run, run_stride), step_key, keep_below) | (d != d)
        kept = tl.where(keep, d * inv_p, 0.0)
    else:
        kept = d
    s_abs = tl.zeros((), tl.float32)
    s_kept = tl.zeros((), tl.float32)
    if SUMS_ONLY:  # the L1 norms before and after the drop, for `rescale`
        s_abs = tl.sum(tl.abs(d), 0)
        s_kept = tl.sum(tl.abs(kept), 0)
    else:
        if RESCALE:
            kept = tl.clamp(kept * factor, -bound, bound, propagate_nan=tl.PropagateNan.ALL)
        upd = (1.0 - alpha) * kept
        if HAS_TAU:
            upd += alpha * _ld(p_tau, o, m, MASKED)
        theta = _ld(p_param, o, m, MASKED)
        if ACCUMULATE:
            theta = tl.where(merge, theta - c + upd, theta + d_plain)
        else:
            theta = theta + upd
        _st(p_param, o, theta - lr_wd * theta, m, MASKED)
    return s_abs, s_kept


@triton.jit
def _ondare_step_kernel(
    p_slots,  # [S, N_FIELDS] int64
    p_tiles,  # [n_tiles, 3] int64: (slot, flat begin, flat end)
    p_step_size,  # [S] fp32: lr · sqrt(1 - beta2^t) / (1 - beta1^t)
    p_t,  # [S] int64: the step number t being taken
    p_rescale,  # [S, 2] fp32: (L1 factor, clip bound) applied to the kept Δ, if RESCALE
    p_sums,  # [n_tiles, 2] fp32 out: (sum |Δ|, sum |kept Δ / p|) over merging tiles, if SUMS_ONLY
    p_skip,  # [] fp32: nonzero makes the launch a no-op
    p_grad_scale,  # [] fp32: gradients are divided by it
    beta1,
    beta2,
    eps,
    lr_wd,  # lr · weight_decay
    alpha,
    inv_p,  # 1 / reserve_p
    keep_below,  # keep_threshold(reserve_p): the keep is hash < keep_below
    online_step,
    PARAM_DTYPE: tl.constexpr,
    TAU_DTYPE: tl.constexpr,
    HAS_TAU: tl.constexpr,
    DROP: tl.constexpr,
    RESCALE: tl.constexpr,
    SUMS_ONLY: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    ORDINARY_ONLY: tl.constexpr,  # only the slots on an ordinary (non-merge) step run
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    slot, p_slot, flat_offset, begin, full_end, end = _tile(p_tiles, p_slots, i_t, BLOCK)
    t = tl.load(p_t + slot)
    merge = (t % online_step) == 0
    run = tl.load(p_skip) == 0
    if ORDINARY_ONLY:
        run = run & (t % online_step != 0)
    if SUMS_ONLY:
        run = run & merge
    s_abs = tl.zeros((), tl.float32)
    s_kept = tl.zeros((), tl.float32)
    if run:
        p_param = _ptr(p_slot, _PARAM, PARAM_DTYPE, ALIGNED)
        p_grad = _ptr(p_slot, _GRAD, PARAM_DTYPE, ALIGNED)
        p_m = _ptr(p_slot, _EXP_AVG, tl.float32, ALIGNED)
        p_v = _ptr(p_slot, _EXP_AVG_SQ, tl.float32, ALIGNED)
        p_tau = p_m
        if HAS_TAU:
            p_tau = _ptr(p_slot, _REF_DELTA, TAU_DTYPE, ALIGNED)
        p_c = p_m
        if ACCUMULATE:
            p_c = _ptr(p_slot, _CACHED, tl.float32, ALIGNED)
        global_offset = tl.load(p_slot + _GLOBAL_OFFSET)
        run_len = tl.load(p_slot + _RUN)
        run_stride = tl.load(p_slot + _RUN_STRIDE)
        step_key = _step_key(tl.load(p_slot + _DARE_KEY), t)
        step_size = tl.load(p_step_size + slot)
        inv_scale = 1.0 / tl.load(p_grad_scale)
        factor = 1.0
        bound = float("inf")
        if RESCALE and not SUMS_ONLY:
            factor = tl.load(p_rescale + slot * 2)
            bound = tl.load(p_rescale + slot * 2 + 1)
        for b0 in range(begin, full_end, BLOCK):
            a, k = _ondare_block(
                p_param, p_grad, p_m, p_v, p_tau, p_c, b0 + tl.arange(0, BLOCK), end, global_offset, run_len,
                run_stride, step_key, merge, step_size, inv_scale, factor, bound, beta1, beta2, eps, lr_wd,
                alpha, inv_p, keep_below, HAS_TAU, DROP, RESCALE, SUMS_ONLY, ACCUMULATE, False,
            )  # fmt: skip
            s_abs += a
            s_kept += k
        if full_end < end:
            a, k = _ondare_block(
                p_param, p_grad, p_m, p_v, p_tau, p_c, full_end + tl.arange(0, BLOCK), end, global_offset,
                run_len, run_stride, step_key, merge, step_size, inv_scale, factor, bound, beta1, beta2, eps,
                lr_wd, alpha, inv_p, keep_below, HAS_TAU, DROP, RESCALE, SUMS_ONLY, ACCUMULATE, True,
            )  # fmt: skip
            s_abs += a
            s_kept += k
    if SUMS_ONLY:
        tl.store(p_sums + i_t * 2, s_abs)
        tl.store(p_sums + i_t * 2 + 1, s_kept)


# ----------------------------------------------------------------------------- OnTIES


@triton.jit
def _ties_delta_block(
    p_grad, p_m, p_v, p_c, p_delta, o, end, step_size, inv_scale, beta1, beta2, eps,
    ACCUMULATE: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Updates the moments and stores Δ; returns (the magnitude keys of Δ, the block's lanes inside the tile)."""
    m = o < end
    d = _adam_delta(p_grad, p_m, p_v, o, m, inv_scale, step_size, beta1, beta2, eps, True, MASKED)
    if ACCUMULATE:
        d += _ld(p_c, o, m, MASKED)
    _st(p_delta, o, d, m, MASKED)
    return d.to(tl.int32, bitcast=True) & 0x7FFFFFFF, m


@triton.jit
def _guessed_digit_block(key, m, guess, p_region, capacity, written, above, SHIFT: tl.constexpr, MASKED: tl.constexpr):
    """Appends the keys whose top digit is the guess to the tile's region; returns (candidates counted so far, keys
    above the guess so far)."""
    digit = key >> SHIFT
    m_eq = digit == guess
    m_above = digit > guess
    if MASKED:
        m_eq &= m
        m_above &= m
    return append_candidates(key, m_eq, p_region, capacity, written), above + tl.sum(m_above.to(tl.int32), 0)


@triton.jit
def _ties_delta_kernel(
    p_slots,  # [S, N_FIELDS] int64
    p_tiles,  # [n_tiles, 3] int64: (slot, flat begin, flat end)
    p_step_size,  # [S] fp32
    p_t,  # [S] int64
    p_delta,  # [flat] fp32 out: Δ (plus the accumulated Δ) of merging slots, then the tiles' candidate regions
    p_hist,  # [S, 2**BITS] int64, accumulated into: the top digit of |Δ| (GUESS: see p_guess)
    p_guess,  # [S] int64, if GUESS: a guess of the threshold's top digit (< 0: none)
    p_regions,  # [n_tiles, 2] int64, if GUESS: (offset in p_delta, capacity) of each tile's candidate region
    p_count,  # [n_tiles] int64 out, if GUESS: keys at the guessed digit in the region, -1 where they did not fit
    p_skip,  # [] fp32
    p_grad_scale,  # [] fp32
    beta1,
    beta2,
    eps,
    online_step,
    PARAM_DTYPE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    ALIGNED: tl.constexpr,
    # Instead of the top digit's histogram: copy the keys at the guessed digit to the tile's candidate region, and
    # count them in p_hist's bin of the guess and the keys above it in its top bin (radix_select.py).
    GUESS: tl.constexpr,
    SHIFT: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    slot, p_slot, flat_offset, begin, full_end, end = _tile(p_tiles, p_slots, i_t, BLOCK)
    t = tl.load(p_t + slot)
    if (tl.load(p_skip) == 0) & (t % online_step == 0):
        p_grad = _ptr(p_slot, _GRAD, PARAM_DTYPE, ALIGNED)
        p_m = _ptr(p_slot, _EXP_AVG, tl.float32, ALIGNED)
        p_v = _ptr(p_slot, _EXP_AVG_SQ, tl.float32, ALIGNED)
        p_c = p_m
        if ACCUMULATE:
            p_c = _ptr(p_slot, _CACHED, tl.float32, ALIGNED)
        p_d = p_delta + tl.multiple_of(flat_offset, BLOCK)  # slots start on BLOCKs of the Δ buffer: 16-byte accesses
        step_size = tl.load(p_step_size + slot)
        inv_scale = 1.0 / tl.load(p_grad_scale)
        b_hist = tl.zeros([2**BITS], dtype=tl.int32)
        guess = tl.zeros((), tl.int64) - 1
        p_region = p_delta
        capacity = tl.zeros((), tl.int32)
        if GUESS:
            guess = tl.load(p_guess + slot)
            p_region = p_delta + tl.multiple_of(tl.load(p_regions + i_t * 2), BLOCK)
            capacity = tl.load(p_regions + i_t * 2 + 1).to(tl.int32)
        written = tl.zeros((), tl.int32)
        above = tl.zeros((), tl.int32)
        for b0 in range(begin, full_end, BLOCK):
            key, m = _ties_delta_block(
                p_grad, p_m, p_v, p_c, p_d, b0 + tl.arange(0, BLOCK), end, step_size, inv_scale, beta1, beta2,
                eps, ACCUMULATE, False,
            )  # fmt: skip
            if GUESS:
                written, above = _guessed_digit_block(key, m, guess, p_region, capacity, written, above, SHIFT, False)
            else:
                b_hist += tl.histogram(key >> SHIFT, 2**BITS)
        if full_end < end:
            key, m = _ties_delta_block(
                p_grad, p_m, p_v, p_c, p_d, full_end + tl.arange(0, BLOCK), end, step_size, inv_scale, beta1,
                beta2, eps, ACCUMULATE, True,
            )  # fmt: skip
            if GUESS:
                written, above = _guessed_digit_block(key, m, guess, p_region, capacity, written, above, SHIFT, True)
            else:
                b_hist += tl.histogram(key >> SHIFT, 2**BITS, mask=m)
        if GUESS:
            tl.store(p_count + i_t, tl.where((guess >= 0) & (written <= capacity), written, -1))
            if guess >= 0:
                tl.atomic_add(p_hist + slot * 2**BITS + guess, written.to(tl.int64), sem="relaxed")
                tl.atomic_add(p_hist + slot * 2**BITS + 2**BITS - 1, above.to(tl.int64), sem="relaxed")
        else:
            tl.atomic_add(p_hist + slot * 2**BITS + tl.arange(0, 2**BITS), b_hist.to(tl.int64), sem="relaxed")


@triton.jit
def _ties_apply_block(
    p_param, p_tau, p_c, p_delta, o, end, threshold, budget, taken, lr_wd, alpha,
    HAS_TAU: tl.constexpr, ACCUMULATE: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    m = o < end
    d = _ld(p_delta, o, m, MASKED)
    key = (d.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
    # Top k: keys above the threshold, and the first `budget` copies of it in index order. A NaN Δ
    # (a NaN or ±inf gradient) ranks above every magnitude and survives the election: θ turns NaN
    # there, as AdamW's would, instead of silently freezing.
    nan = d != d
    tie = m & (key == threshold)
    rank = tl.cumsum(tie.to(tl.int32), 0) - 1  # among this block's copies; `taken` came before
    d = tl.where((key > threshold) | (tie & (rank < budget - taken)) | nan, d, 0.0)
    if HAS_TAU:
        # Elect the sign of τ + Δ (≥ 0 counts as +) and zero what disagrees with it.
        tau = _ld(p_tau, o, m, MASKED)
        positive = tau + d >= 0
        tau = tl.where(tl.where(positive, tau > 0, tau < 0), tau, 0.0)
        d = tl.where(tl.where(positive, d > 0, d < 0) | nan, d, 0.0)
        upd = alpha * tau + (1.0 - alpha) * d
    else:
        upd = (1.0 - alpha) * d
    theta = _ld(p_param, o, m, MASKED)
    if ACCUMULATE:  # roll back the Δ applied since the last merge: it is part of d
        theta -= _ld(p_c, o, m, MASKED)
        _st(p_c, o, tl.zeros_like(d), m, MASKED)
    theta = theta + upd
    _st(p_param, o, theta - lr_wd * theta, m, MASKED)
    return taken + tl.sum(tie.to(tl.int32), 0)


@triton.jit
def _ties_apply_kernel(
    p_slots,  # [S, N_FIELDS] int64
    p_tiles,  # [n_tiles, 3] int64: (slot, flat begin, flat end)
    p_delta,  # [flat] fp32: from _ties_delta_kernel
    p_threshold,  # [S] int64: key of the k-th largest |Δ|; < 0 skips the slot (an ordinary step)
    p_budget,  # [n_tiles] int64: how many copies of the threshold key this tile keeps
    p_skip,  # [] fp32
    lr_wd,
    alpha,
    PARAM_DTYPE: tl.constexpr,
    TAU_DTYPE: tl.constexpr,
    HAS_TAU: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    slot, p_slot, flat_offset, begin, full_end, end = _tile(p_tiles, p_slots, i_t, BLOCK)
    threshold = tl.load(p_threshold + slot)
    if (tl.load(p_skip) == 0) & (threshold >= 0):
        p_param = _ptr(p_slot, _PARAM, PARAM_DTYPE, ALIGNED)
        p_tau = p_param
        if HAS_TAU:
            p_tau = _ptr(p_slot, _REF_DELTA, TAU_DTYPE, ALIGNED)
        p_c = p_param
        if ACCUMULATE:
            p_c = _ptr(p_slot, _CACHED, tl.float32, ALIGNED)
        p_d = p_delta + tl.multiple_of(flat_offset, BLOCK)  # slots start on BLOCKs of the Δ buffer: 16-byte accesses
        budget = tl.load(p_budget + i_t)
        taken = tl.zeros((), tl.int64)
        for b0 in range(begin, full_end, BLOCK):
            taken = _ties_apply_block(
                p_param, p_tau, p_c, p_d, b0 + tl.arange(0, BLOCK), end, threshold, budget, taken, lr_wd, alpha,
                HAS_TAU, ACCUMULATE, False,
            )  # fmt: skip
        if full_end < end:
            taken = _ties_apply_block(
                p_param, p_tau, p_c, p_d, full_end + tl.arange(0, BLOCK), end, threshold, budget, taken, lr_wd,
                alpha, HAS_TAU, ACCUMULATE, True,
            )  # fmt: skip


# ----------------------------------------------------------------------------- gradient check


@triton.jit
def _nonfinite_block(p_grad, o, end, MASKED: tl.constexpr):
    g = _ld(p_grad, o, o < end, MASKED)  # masked lanes read 0
    return tl.sum(tl.where(tl.abs(g) < float("inf"), 0, 1), 0)  # NaN fails the comparison too


@triton.jit
def _nonfinite_kernel(
    p_slots,  # [S, N_FIELDS] int64
    p_tiles,  # [n_tiles, 3] int64
    p_flag,  # [] fp32: set to 1 if any gradient element is NaN or ±inf
    PARAM_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    slot, p_slot, flat_offset, begin, full_end, end = _tile(p_tiles, p_slots, i_t, BLOCK)
    p_grad = _ptr(p_slot, _GRAD, PARAM_DTYPE, ALIGNED)
    n_bad = tl.zeros((), tl.int32)
    for b0 in range(begin, full_end, BLOCK):
        n_bad += _nonfinite_block(p_grad, b0 + tl.arange(0, BLOCK), end, False)
    if full_end < end:
        n_bad += _nonfinite_block(p_grad, full_end + tl.arange(0, BLOCK), end, True)
    if n_bad > 0:
        tl.store(p_flag, 1.0)


# ----------------------------------------------------------------------------- launchers

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def keep_threshold(reserve_p: float) -> int:
    """The int32 `keep_below` of _dare_keep: P(keep) = reserve_p to 2**-31 (never 0 or 1)."""
    return min(max(round(reserve_p * 2**31), 1), 2**31 - 1) - 2**30


@on_tensors_device
def ondare_step(
    slots: torch.Tensor,
    tiles: torch.Tensor,
    step_size: torch.Tensor,
    t: torch.Tensor,
    skip: torch.Tensor,
    grad_scale: torch.Tensor,
    *,
    param_dtype: torch.dtype,
    tau_dtype: torch.dtype | None,
    beta1: float,
    beta2: float,
    eps: float,
    lr_wd: float,
    alpha: float,
    reserve_p: float,
    online_step: int,
    rescale: torch.Tensor | None = None,
    sums_only: bool = False,
    ordinary_only: bool = False,
    aligned: bool = True,
) -> torch.Tensor | None:
    """One OnDARE step over every tile, in place; see _ondare_step_kernel for the arguments.

    With sums_only=True nothing is written and the [n_tiles, 2] fp32 L1 sums are returned.
    """
    n_tiles = tiles.shape[0]
    sums = torch.empty(n_tiles, 2, device=tiles.device, dtype=torch.float32) if sums_only else None
    if n_tiles == 0:
        return sums
    drop = reserve_p < 1.0
    _ondare_step_kernel[(n_tiles,)](
        slots,
        tiles,
        step_size,
        t,
        rescale if rescale is not None else step_size,
        sums if sums_only else step_size,
        skip,
        grad_scale,
        beta1,
        beta2,
        eps,
        lr_wd,
        alpha,
        1.0 / reserve_p,
        keep_threshold(reserve_p) if drop else 0,
        online_step,
        PARAM_DTYPE=_TL_DTYPE[param_dtype],
        TAU_DTYPE=_TL_DTYPE[tau_dtype or torch.float32],
        HAS_TAU=tau_dtype is not None,
        DROP=drop,
        RESCALE=rescale is not None,
        SUMS_ONLY=sums_only,
        ACCUMULATE=online_step > 1,
        ORDINARY_ONLY=ordinary_only,
        ALIGNED=aligned,
        BLOCK=BLOCK,
        num_warps=_NUM_WARPS,
    )
    return sums


@on_tensors_device
def ties_delta(
    slots: torch.Tensor,
    tiles: torch.Tensor,
    step_size: torch.Tensor,
    t: torch.Tensor,
    skip: torch.Tensor,
    grad_scale: torch.Tensor,
    delta_numel: int,
    *,
    param_dtype: torch.dtype,
    beta1: float,
    beta2: float,
    eps: float,
    online_step: int,
    aligned: bool = True,
    guess: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments and Δ of the merging slots: returns (Δ [delta_numel] fp32: the flat space, then room for the radix
    passes' candidate regions; [S, 1024] int64 counts of the top radix digit of |Δ|). The ordinary-step slots of
    online_step > 1 are left alone.

    guess: ([S] int64 guessed top digit of each slot's threshold, < 0 for none; [n_tiles, 2] int64 candidate regions;
    [n_tiles] int64 counts, out): the keys at the guessed digit go to each tile's region (count -1 where they do not
    fit, or without a guess), and a slot's row of counts holds them in the guess's bin and the keys above it in the
    top bin, instead of the whole histogram."""
    delta = torch.empty(delta_numel, device=tiles.device, dtype=torch.float32)
    shift, bits = RADIX_DIGITS[0]
    hist = torch.zeros(slots.shape[0], 2**bits, device=tiles.device, dtype=torch.int64)
    guesses, regions, count = guess if guess is not None else (hist, hist, hist)
    if tiles.shape[0]:
        _ties_delta_kernel[(tiles.shape[0],)](
            slots,
            tiles,
            step_size,
            t,
            delta,
            hist,
            guesses,
            regions,
            count,
            skip,
            grad_scale,
            beta1,
            beta2,
            eps,
            online_step,
            PARAM_DTYPE=_TL_DTYPE[param_dtype],
            ACCUMULATE=online_step > 1,
            ALIGNED=aligned,
            GUESS=guess is not None,
            SHIFT=shift,
            BITS=bits,
            BLOCK=BLOCK,
            num_warps=_NUM_WARPS,
        )
    return delta, hist


@on_tensors_device
def ties_apply(
    slots: torch.Tensor,
    tiles: torch.Tensor,
    delta: torch.Tensor,
    threshold: torch.Tensor,
    budget: torch.Tensor,
    skip: torch.Tensor,
    *,
    param_dtype: torch.dtype,
    tau_dtype: torch.dtype | None,
    lr_wd: float,
    alpha: float,
    online_step: int,
    aligned: bool = True,
) -> None:
    """Keeps the top k of Δ, elects signs against τ, merges and decays, in place."""
    if tiles.shape[0] == 0:
        return
    _ties_apply_kernel[(tiles.shape[0],)](
        slots,
        tiles,
        delta,
        threshold,
        budget,
        skip,
        lr_wd,
        alpha,
        PARAM_DTYPE=_TL_DTYPE[param_dtype],
        TAU_DTYPE=_TL_DTYPE[tau_dtype or torch.float32],
        HAS_TAU=tau_dtype is not None,
        ACCUMULATE=online_step > 1,
        ALIGNED=aligned,
        BLOCK=BLOCK,
        num_warps=8,  # with 4, triton 3.6 spills on sm_80 and loads Δ 32 bits at a time
    )


@on_tensors_device
def nonfinite(
    slots: torch.Tensor, tiles: torch.Tensor, flag: torch.Tensor, *, param_dtype: torch.dtype, aligned: bool
) -> None:
    """Sets flag (a [] fp32 tensor) to 1 if any gradient element in the tiles is NaN or ±inf."""
    if tiles.shape[0]:
        _nonfinite_kernel[(tiles.shape[0],)](
            slots, tiles, flag, PARAM_DTYPE=_TL_DTYPE[param_dtype], ALIGNED=aligned, BLOCK=BLOCK, num_warps=_NUM_WARPS
        )


# ----------------------------------------------------------------------------- compile check


def _decoder_1b() -> list[int]:
    """Sizes of a 1B decoder's parameters (fastalign.bench.optim's model): embedding, 14 layers, final norm."""
    hidden, ffn = 2048, 8192
    layer = [hidden * hidden] * 4 + [ffn * hidden] * 3 + [hidden] * 2
    return [32000 * hidden] + layer * 14 + [hidden]


def _launch_case(method: str, param_dtype, tau_dtype, rescale=False, online_step=1, aligned=True, guess=True) -> None:
    """One optimizer step over `_decoder_1b`'s tables, launched as fastalign.optim._launch.kernel_step does (with the
    skip_nonfinite check when rescale is on); OnTIES with the first digit guessed (every merge after the first) or
    not (the first)."""
    numels = _decoder_1b()
    S, flat = len(numels), sum(triton.cdiv(n, BLOCK) * BLOCK for n in numels)
    slots = meta(S, len(SLOT_FIELDS), dtype=torch.int64)
    dare_tiles = meta(sum(triton.cdiv(n, DARE_TILE) for n in numels), 3, dtype=torch.int64)
    ties_tiles = meta(sum(triton.cdiv(n, TIES_TILE) for n in numels), 3, dtype=torch.int64)
    step_size, t, flag, per_slot = meta(S), meta(S, dtype=torch.int64), meta(), meta(S, dtype=torch.int64)
    adam = dict(beta1=0.9, beta2=0.999, eps=1e-8, online_step=online_step, aligned=aligned)
    if rescale:
        nonfinite(slots, dare_tiles, flag, param_dtype=param_dtype, aligned=aligned)
    if method == "ondare":
        dare = dict(adam, param_dtype=param_dtype, tau_dtype=tau_dtype, lr_wd=1e-7, alpha=0.2, reserve_p=0.3)
        if rescale:
            ondare_step(slots, dare_tiles, step_size, t, flag, flag, sums_only=True, **dare)
        ondare_step(slots, dare_tiles, step_size, t, flag, flag, rescale=meta(S, 2) if rescale else None, **dare)
        return
    if online_step > 1:
        ondare_step(slots, dare_tiles, step_size, t, flag, flag, param_dtype=param_dtype, tau_dtype=None, lr_wd=1e-7,
                    alpha=0.0, reserve_p=1.0, ordinary_only=True, **adam)  # fmt: skip
    n_tiles = ties_tiles.shape[0]
    regions, candidates = meta(n_tiles, 2, dtype=torch.int64), meta(n_tiles, dtype=torch.int64)
    delta_numel = flat + triton.cdiv(flat, CANDIDATE_SHARE)  # about candidate_regions' size: meta tensors hold nothing
    guessed = (per_slot, regions, candidates) if guess else None
    delta, _ = ties_delta(
        slots, ties_tiles, step_size, t, flag, flag, delta_numel, param_dtype=param_dtype, guess=guessed, **adam
    )
    copied = meta(S, dtype=torch.bool) if guess else None
    if guess:  # the first digit again where the guess missed (fastalign.optim._select.radix_select)
        radix_histogram(delta, ties_tiles, regions, candidates, per_slot, *RADIX_DIGITS[0])
    for shift, bits in RADIX_DIGITS[1:-1]:
        radix_histogram(delta, ties_tiles, regions, candidates, per_slot, shift, bits, copied=copied)
    shift, bits = RADIX_DIGITS[-1]
    tile_hist = meta(n_tiles, 2**bits, dtype=torch.int64)
    radix_histogram(delta, ties_tiles, regions, candidates, per_slot, shift, bits, tile_hist)
    ties_apply(slots, ties_tiles, delta, per_slot, meta(ties_tiles.shape[0], dtype=torch.int64), flag,
               param_dtype=param_dtype, tau_dtype=tau_dtype, lr_wd=1e-7, alpha=0.2, online_step=online_step,
               aligned=aligned)  # fmt: skip


def compile_specs() -> list[LaunchCase]:
    """The targets (a 1B-parameter fp32 model, τ in bf16: OnDARE and OnTIES steps), then every parameter dtype and τ
    dtype with rescale and online_step > 1, an unaligned shard, and OnTIES's first merge (no guessed digit)."""
    numel = sum(_decoder_1b())

    # Every program loops over the BLOCKs of one tile (a few tiles of small parameters are shorter).
    def per_tile(tile: int):
        return lambda args: (tile // args["BLOCK"],)

    dare_trips = {"_ondare_step_kernel": per_tile(DARE_TILE)}
    # A merge after the first: the Δ pass copies each tile's keys at the guessed top digit to its region, and the
    # histogram passes of the second and later digits read the regions (radix_select.py), counted here at the most
    # that fit: 1/CANDIDATE_SHARE of the tile's keys. AdamW's Δ fills 6-11% (CANDIDATE_SHARE's comment); the first
    # step's fills it all, and then costs what no regions would. Where a slot's guess missed (MISSED of them: its
    # threshold's top digit moved between merges in 8-11% of them on a GPT-2 run), the first digit is histogrammed
    # again and the copy pass reads its tiles.
    candidates, missed = TIES_TILE // CANDIDATE_SHARE, 0.1

    def radix_trips(args):
        if args["PASS"] != HISTOGRAM_CANDIDATES.value:  # the missed slots' passes over their tiles
            return (missed * TIES_TILE / args["BLOCK"],)
        return per_tile(candidates)(args)

    ties_trips = dict.fromkeys(("_ties_delta_kernel", "_ties_apply_kernel"), per_tile(TIES_TILE))
    ties_trips["_radix_histogram_kernel"] = radix_trips
    ties_stores = dict.fromkeys(("_radix_histogram_kernel", "_ties_delta_kernel"), lambda args: 1 / CANDIDATE_SHARE)
    # What a step must move per parameter: read gradient, θ, both moments and τ (bf16); write θ and both moments.
    floor = numel * (4 + 4 + 4 + 16 + 2)
    cases = [
        LaunchCase(
            f"{method} step fp32 params={numel / 1e9:.2f}B tau=bf16",
            functools.partial(_launch_case, method, torch.float32, torch.bfloat16),
            bytes=floor,
            target=target,
            trips=trips,
            store_share=stores,
        )
        for method, target, trips, stores in (("ondare", 70, dare_trips, {}), ("onties", 50, ties_trips, ties_stores))
    ]
    for method, param_dtype, tau_dtype in itertools.product(
        ("ondare", "onties"), (torch.float32, torch.bfloat16, torch.float16), (torch.bfloat16, torch.float32, None)
    ):
        label = f"{method} {TRITON_DTYPE[param_dtype]} tau={TRITON_DTYPE.get(tau_dtype, 'none')} rescale online_step=2"
        run = functools.partial(_launch_case, method, param_dtype, tau_dtype, rescale=True, online_step=2)
        cases.append(LaunchCase(label, run))
    for method in ("ondare", "onties"):
        run = functools.partial(_launch_case, method, torch.bfloat16, torch.bfloat16, aligned=False)
        cases.append(LaunchCase(f"{method} bf16 unaligned shard", run))
    for param_dtype in (torch.float32, torch.bfloat16, torch.float16):  # the first merge: no guess yet
        run = functools.partial(_launch_case, "onties", param_dtype, torch.bfloat16, rescale=True, guess=False)
        cases.append(LaunchCase(f"onties {TRITON_DTYPE[param_dtype]} tau=bf16 first merge", run))
    return cases
