"""Per-token log-probabilities from logits: one online log-sum-exp pass forward, one pass backward.

Logits arrive as a [B, T, V] view (any [..., V] tensor whose leading dims collapse to two), so
row r lives at (r // T) * stride_b + (r % T) * stride_t and a sliced `logits[:, :-1]` needs no copy.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from . import TRITON_DTYPE, LaunchCase, meta

# Bytes per loop iteration of the forward pass. 16 KiB keeps 4 x 16-byte loads in flight per
# thread at 8 warps, which is enough to saturate HBM with two programs per SM.
_FWD_BLOCK_BYTES = 16384
_BWD_BLOCK_BYTES = 8192


@triton.jit
def _token_logprobs_fwd_kernel(
    p_logits,  # [B, T, V] any dtype, unit stride over V
    p_labels,  # [N] int64, N = B * T
    p_logp,  # [N] fp32 out
    p_lse,  # [N] fp32 out: logsumexp(logits / temperature)
    p_entropy,  # [N] fp32 out, if RETURN_ENTROPY
    p_argmax,  # [N] int64 out, if RETURN_ARGMAX
    p_log_sum_sq,  # [N] fp32 out: log(sum_v p_v^2), if RETURN_SUM_SQ
    p_mean,  # [N] fp32 out: mean_v z, if RETURN_MEAN
    T,
    stride_b,
    stride_t,
    V,
    ignore_index,
    inv_temperature,
    BLOCK_V: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    RETURN_ARGMAX: tl.constexpr,
    RETURN_SUM_SQ: tl.constexpr,
    RETURN_MEAN: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    p_row = p_logits + (i_n // T) * stride_b + (i_n % T) * stride_t
    label = tl.load(p_labels + i_n)
    ignored = label == ignore_index
    in_range = (label >= 0) & (label < V)
    readable = in_range & (label != ignore_index)

    # Rows with an ignored label cost nothing unless the caller wants an extra (every position gets those).
    if RETURN_ENTROPY or RETURN_ARGMAX or RETURN_SUM_SQ or RETURN_MEAN:
        v_end = V
    else:
        v_end = tl.where(ignored, 0, V)

    m = tl.full((), float("-inf"), tl.float32)  # running max of z = logits / temperature
    s = tl.zeros((), tl.float32)  # running sum of exp(z - m)
    t = tl.zeros((), tl.float32)  # running sum of exp(z - m) * z, for the entropy
    s2 = tl.zeros((), tl.float32)  # running sum of exp(2 (z - m)), for log sum p^2
    z_sum = tl.zeros((), tl.float32)  # running sum of z, for the mean
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.zeros((), tl.int64)
    for v0 in range(0, v_end, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_z = tl.load(p_row + o_v, mask=m_v, other=float("-inf")).to(tl.float32) * inv_temperature
        b_max = tl.max(b_z, 0)
        m_new = tl.maximum(m, b_max)
        # m_new is -inf only if every logit so far is -inf; keep the scale finite then.
        scale = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        b_e = tl.exp(b_z - m_new)
        s = s * scale + tl.sum(b_e, 0)
        if RETURN_ENTROPY:
            # exp(z - m) * z is 0 * -inf = NaN for -inf logits; they contribute nothing.
            t = t * scale + tl.sum(tl.where(b_e > 0, b_e * b_z, 0.0), 0)
        if RETURN_SUM_SQ:
            s2 = s2 * scale * scale + tl.sum(b_e * b_e, 0)
        if RETURN_MEAN:
            z_sum += tl.sum(tl.where(m_v, b_z, 0.0), 0)
        if RETURN_ARGMAX:
            # The block's first maximum, and strict > across blocks: the first maximum, as torch.argmax. Max skips
            # NaN (compiled and interpreted alike), so an all-NaN row keeps index 0; the interpreter's tl.argmax
            # would raise there instead.
            b_idx = tl.min(tl.where(b_z == b_max, o_v, V), 0)
            best_idx = tl.where(b_max > best, b_idx.to(tl.int64), best_idx)
            best = tl.maximum(best, b_max)
        m = m_new

    lse = tl.where(v_end > 0, m + tl.log(s), 0.0)
    # The label is read only when it is inside [0, V): a bad label can never read out of bounds.
    z_label = tl.load(p_row + label, mask=readable, other=0.0).to(tl.float32) * inv_temperature
    logp = tl.where(ignored, 0.0, tl.where(in_range, z_label - lse, float("nan")))
    tl.store(p_logp + i_n, logp)
    tl.store(p_lse + i_n, lse)
    if RETURN_ENTROPY:
        tl.store(p_entropy + i_n, lse - t / s)
    if RETURN_ARGMAX:
        tl.store(p_argmax + i_n, best_idx)
    if RETURN_SUM_SQ:
        # sum p^2 = sum exp(2 (z - m)) / s^2, in log space.
        tl.store(p_log_sum_sq + i_n, tl.log(s2) - 2.0 * tl.log(s))
    if RETURN_MEAN:
        tl.store(p_mean + i_n, z_sum / V)


@triton.jit
def _token_logprobs_bwd_kernel(
    p_logits,  # [B, T, V] input logits, unit stride over V
    p_dlogits,  # [B, T, V] out, may alias p_logits (then the strides are equal)
    p_labels,  # [N] int64
    p_lse,  # [N] fp32
    p_dlogp,  # [N] fp32: upstream gradient of the log-probs
    p_entropy,  # [N] fp32, if HAS_ENTROPY_GRAD
    p_dentropy,  # [N] fp32, if HAS_ENTROPY_GRAD
    T,
    stride_b,
    stride_t,
    stride_db,
    stride_dt,
    V,
    ignore_index,
    inv_temperature,
    BLOCK_V: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    i_b = i_n // T
    i_t = i_n % T
    label = tl.load(p_labels + i_n)
    ignored = label == ignore_index
    in_range = (label >= 0) & (label < V)
    lse = tl.load(p_lse + i_n)
    g = tl.where(ignored, 0.0, tl.load(p_dlogp + i_n))

    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_v = o_v < V
    # An ignored row reads nothing; its gradient is zero (plus the entropy term, if any).
    if HAS_ENTROPY_GRAD:
        m_read = m_v
    else:
        m_read = o_v < tl.where(ignored, 0, V)
    b_z = tl.load(p_logits + i_b * stride_b + i_t * stride_t + o_v, mask=m_read, other=0.0).to(tl.float32)
    b_z = b_z * inv_temperature
    b_p = tl.where(m_read, tl.exp(b_z - lse), 0.0)
    # d logp / dz = onehot - p
    b_dz = g * (tl.where(o_v == label, 1.0, 0.0) - b_p)
    if HAS_ENTROPY_GRAD:
        # d H / dz = -p * (log p + H) = -p * (z - lse + H)
        entropy = tl.load(p_entropy + i_n)
        gh = tl.load(p_dentropy + i_n)
        b_dz += tl.where(b_p > 0, -gh * b_p * (b_z - lse + entropy), 0.0)  # p = 0 at -inf logits
    # A label outside [0, V) made a NaN log-prob; its gradient is NaN too, never a silent wrong value.
    b_dz = tl.where(in_range | ignored, b_dz, float("nan"))
    b_dx = b_dz * inv_temperature
    tl.store(p_dlogits + i_b * stride_db + i_t * stride_dt + o_v, b_dx.to(p_dlogits.dtype.element_ty), mask=m_v)


def _block_v(V: int, elem_size: int, block_bytes: int) -> int:
    return min(triton.next_power_of_2(V), block_bytes // elem_size)


def _fwd_config(V: int, dtype: torch.dtype) -> tuple[int, int]:
    block_v = _block_v(V, dtype.itemsize, _FWD_BLOCK_BYTES)
    return block_v, 8 if block_v >= 4096 else 4


def _bwd_config(V: int, dtype: torch.dtype) -> tuple[int, int]:
    block_v = _block_v(V, dtype.itemsize, _BWD_BLOCK_BYTES)
    return block_v, 8 if block_v >= 4096 else 4


def token_logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    temperature: float,
    return_entropy: bool,
    return_argmax: bool,
    return_sum_sq: bool = False,
    return_mean: bool = False,
) -> tuple[torch.Tensor, ...]:
    """logits: [B, T, V] with stride 1 over V; labels: [B * T] int64 contiguous.

    Returns (logp [N] fp32, lse [N] fp32, entropy [N] fp32 or None, argmax [N] int64 or None,
    log_sum_sq [N] fp32 or None, mean [N] fp32 or None).
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
    block_v, num_warps = _fwd_config(V, logits.dtype)
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
        ignore_index,
        1.0 / temperature,
        BLOCK_V=block_v,
        RETURN_ENTROPY=return_entropy,
        RETURN_ARGMAX=return_argmax,
        RETURN_SUM_SQ=return_sum_sq,
        RETURN_MEAN=return_mean,
        num_warps=num_warps,
    )
    return logp, lse, entropy, argmax, log_sum_sq, mean


def token_logprobs_bwd(
    logits: torch.Tensor,
    dlogits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    dlogp: torch.Tensor,
    entropy: torch.Tensor | None,
    dentropy: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
) -> None:
    """Writes d logits into dlogits ([B, T, V], stride 1 over V; it may be logits itself).

    dlogp, lse, entropy, dentropy: [N] fp32 contiguous. The entropy term is added when dentropy is given.
    """
    B, T, V = logits.shape
    N = B * T
    if N == 0:
        return
    block_v, num_warps = _bwd_config(V, logits.dtype)
    has_entropy_grad = dentropy is not None
    _token_logprobs_bwd_kernel[(N, triton.cdiv(V, block_v))](
        logits,
        dlogits,
        labels,
        lse,
        dlogp,
        entropy if has_entropy_grad else lse,
        dentropy if has_entropy_grad else lse,
        T,
        logits.stride(0),
        logits.stride(1),
        dlogits.stride(0),
        dlogits.stride(1),
        V,
        ignore_index,
        1.0 / temperature,
        BLOCK_V=block_v,
        HAS_ENTROPY_GRAD=has_entropy_grad,
        num_warps=num_warps,
    )


_EXTRAS = ("entropy", "argmax", "sum_sq", "mean")  # token_logprobs_fwd's optional outputs, in its order


def _launch_case(dtype: torch.dtype, B: int, T: int, V: int, extras: tuple, backward: bool, pad_t: int = 0) -> None:
    """Forward (then backward) launches on meta logits [B, T, V], sliced from [B, T + pad_t, V] when pad_t > 0, with
    the optional outputs named in `extras` (of _EXTRAS)."""
    logits = meta(B, T + pad_t, V, dtype=dtype)[:, :T]
    labels = meta(B * T, dtype=torch.int64)
    logp, lse, entropy, *_ = token_logprobs_fwd(logits, labels, -100, 1.0, *(name in extras for name in _EXTRAS))
    if backward:
        dlogits = meta(B, T, V, dtype=dtype)
        token_logprobs_bwd(logits, dlogits, labels, lse, logp, entropy, entropy, -100, 1.0)


def compile_specs() -> list[LaunchCase]:
    """The target (bf16 N=16384 V=128256, which fastalign.logprobs views as [1, N, V]) with no extras and with entropy
    and argmax; every extra, fp16/fp32 at that V and at an odd one, a sliced logits[:, :-1] (B=8, T=257) and a single
    token (N = T = 1 specializes)."""
    N, V = 16384, 128256
    trips = {"_token_logprobs_fwd_kernel": lambda a: (triton.cdiv(a["V"], a["BLOCK_V"]),)}
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
    return cases + [LaunchCase("sliced [:, :-1] bf16 B=8 T=257 V=50257", sliced), LaunchCase("one token", one_token)]
