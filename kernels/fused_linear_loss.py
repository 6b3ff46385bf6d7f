"""Elementwise kernels of the fast fused-linear losses, around cuBLAS GEMMs that make the fp32 logits.

The caller computes a = hidden @ weight.T in fp32 for a chunk of rows (torch.mm with out_dtype=torch.float32), then:
- `_logits_stats_kernel`: one program per row folds the row's logits z = chain(a + bias) into online statistics:
  log-sum-exp, z at the label, and on request the entropy, the argmax, log(sum p^2) and the mean of z.
- `_logits_grad_kernel`: once the loss's gradient with respect to each row's log-prob (coef) and mean log-prob
  (coef_mean) is known, writes d loss / d a = chain' * (coef * (onehot - p) + coef_mean * (1 / V - p)) in the
  GEMMs' operand dtype, over the logits buffer itself or into another one.

Logit chain, per element (as in kernels/linear_logprobs.py): y = logit_scale * (a + b); c = softcap * tanh(y /
softcap) (or y); z = c / temperature.

Give the logits buffers rows of `padded_width(V)` elements (and pass their [:, :V] views): the kernels then load and
store 16 bytes at a time at any V, an odd one included.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from . import INTERPRET, TRITON_DTYPE, LaunchCase, meta, on_tensors_device
from .linear_logprobs import Outputs, _logit_chain

# Columns per iteration: 16 KB of fp32 logits per load.
_BLOCK_V = 4096 if not INTERPRET else 256
_NUM_WARPS = 8
_NEG = tl.constexpr(-1e30)


@triton.jit
def _logits_row_tile(
    p_a,
    p_bias,
    i_m,
    stride_a,
    v0,
    V,
    width,
    logit_scale,
    softcap,
    inv_temperature,
    BLOCK_V: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """(columns o_v, their mask o_v < V, z = chain(a + bias) in fp32) of row i_m's BLOCK_V logits from column v0.

    The loads of a and bias stop at `width` >= V, not V: a padded row's width is a multiple of 16, so even at an odd
    V the mask keeps whole 16-byte vectors (o_v < V would cut them to one element). z past V is garbage: callers
    mask it."""
    o_v = v0 + tl.arange(0, BLOCK_V)
    m_v = o_v < V
    a = tl.load(p_a + i_m * stride_a + o_v, mask=o_v < width, other=0.0)
    b_bias = tl.load(p_bias + o_v, mask=o_v < width, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    return o_v, m_v, _logit_chain(a, b_bias, logit_scale, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def _logits_stats_kernel(
    p_a,  # [M, width] fp32 raw logits hidden @ weight.T in columns [0, V), padding after; row stride stride_a
    p_bias,  # [V] unit stride, if HAS_BIAS
    p_labels,  # [M] int64, each in [0, V)
    p_lse,  # [M] fp32 out
    p_zlabel,  # [M] fp32 out: z at the label
    p_entropy,  # [M] fp32 out, if RETURN_ENTROPY
    p_argmax,  # [M] int64 out: the first maximum, if RETURN_ARGMAX
    p_log_sum_sq,  # [M] fp32 out: log sum_v p_v^2, if RETURN_LOG_SUM_SQ_PROBS
    p_mean,  # [M] fp32 out: mean_v z, if RETURN_MEAN_LOGITS
    stride_a,
    V,
    width,  # V, or padded_width(V) when a's rows are padded: a padded row is read up to it
    logit_scale,
    softcap,
    inv_temperature,
    BLOCK_V: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    RETURN_ARGMAX: tl.constexpr,
    RETURN_LOG_SUM_SQ_PROBS: tl.constexpr,
    RETURN_MEAN_LOGITS: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    label = tl.load(p_labels + i_m)
    m_run = tl.full((), float("-inf"), tl.float32)
    s_run = tl.zeros((), tl.float32)
    t_run = tl.zeros((), tl.float32)
    q_run = tl.zeros((), tl.float32)
    z_sum = tl.zeros((), tl.float32)
    i_best = tl.zeros((), tl.int32)
    z_label = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        o_v, m_v, z = _logits_row_tile(
            p_a,
            p_bias,
            i_m,
            stride_a,
            v0,
            V,
            width,
            logit_scale,
            softcap,
            inv_temperature,
            BLOCK_V,
            HAS_BIAS,
            HAS_SOFTCAP,
        )
        if RETURN_MEAN_LOGITS:
            z_sum += tl.sum(tl.where(m_v, z, 0.0), 0)
        z = tl.where(m_v, z, _NEG)
        b_max = tl.max(z, 0)
        m_new = tl.maximum(m_run, b_max)
        if RETURN_ARGMAX:
            # Strict > keeps the first maximum, as torch.argmax does.
            b_first = tl.min(tl.where(z == b_max, o_v, V), 0)
            i_best = tl.where(b_max > m_run, b_first, i_best)
        z_label += tl.sum(tl.where(o_v == label, z, 0.0), 0)
        alpha = tl.exp(m_run - m_new)
        b_e = tl.exp(z - m_new)
        s_run = s_run * alpha + tl.sum(b_e, 0)
        if RETURN_ENTROPY:
            t_run = t_run * alpha + tl.sum(b_e * z, 0)
        if RETURN_LOG_SUM_SQ_PROBS:
            q_run = q_run * (alpha * alpha) + tl.sum(b_e * b_e, 0)
        m_run = m_new
    lse = m_run + tl.log(s_run)
    tl.store(p_lse + i_m, lse)
    tl.store(p_zlabel + i_m, z_label)
    if RETURN_ENTROPY:
        tl.store(p_entropy + i_m, lse - t_run / s_run)
    if RETURN_ARGMAX:
        tl.store(p_argmax + i_m, i_best.to(tl.int64))
    if RETURN_LOG_SUM_SQ_PROBS:
        tl.store(p_log_sum_sq + i_m, tl.log(q_run) - 2.0 * tl.log(s_run))
    if RETURN_MEAN_LOGITS:
        tl.store(p_mean + i_m, z_sum / V)


@triton.jit
def _logits_grad_kernel(
    p_a,  # [M, width] fp32 raw logits in columns [0, V), padding after; row stride stride_a
    p_out,  # [M, width] out, row stride stride_out, any float dtype; may be p_a (each element read, then written)
    p_bias,  # [V] unit stride, if HAS_BIAS
    p_labels,  # [M] int64
    p_lse,  # [M] fp32
    p_coef,  # [M] fp32: d loss / d log p(label)
    p_coef_mean,  # [M] fp32: d loss / d mean_v log p_v, if HAS_MEAN
    stride_a,
    stride_out,
    V,
    width,  # V, or padded_width(V) when a's and out's rows are padded: a padded row is read and written up to it
    inv_vocab,  # 1 / the size of the vocabulary the mean log-prob is over: V, or more when a holds a slice of it
    logit_scale,
    softcap,
    inv_temperature,
    BLOCK_V: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_MEAN: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    v0 = tl.program_id(1) * BLOCK_V
    o_v, m_v, z = _logits_row_tile(
        p_a, p_bias, i_m, stride_a, v0, V, width, logit_scale, softcap, inv_temperature, BLOCK_V, HAS_BIAS, HAS_SOFTCAP
    )
    p = tl.exp(z - tl.load(p_lse + i_m))
    coef = tl.load(p_coef + i_m)
    # d log p(label) / dz = onehot - p;  d mean_v log p_v / dz = 1 / vocab - p
    if HAS_MEAN:
        coef_mean = tl.load(p_coef_mean + i_m)
        dz = coef_mean * inv_vocab - (coef + coef_mean) * p
    else:
        dz = -coef * p
    dz += tl.where(o_v == tl.load(p_labels + i_m), coef, 0.0)
    # Back through temperature, softcap and logit_scale: dz/da = logit_scale / temperature * (1 - tanh^2).
    da = dz * (inv_temperature * logit_scale)
    if HAS_SOFTCAP:
        th = z * (1.0 / (inv_temperature * softcap))
        da = da * (1.0 - th * th)
    tl.store(p_out + i_m * stride_out + o_v, da.to(p_out.dtype.element_ty), mask=o_v < width)


# ----------------------------------------------------------------------------- launchers


def padded_width(V: int) -> int:
    """The row length to allocate for [M, V] logits buffers (pass their [:, :V] views): V rounded up to 16 elements.

    Triton specializes a row stride divisible by 16, and the kernels mask such rows at this width rather than at V,
    so at any V they move 16 bytes per access (V = 32001 rows would move 4). The padding columns are the kernels'
    scratch: they read them, and `logits_grad` writes them, with meaningless values."""
    return triton.cdiv(V, 16) * 16


def _width(V: int, *buffers: torch.Tensor | None) -> int:
    """padded_width(V) if every [M, V] buffer is a view of rows padded to it (each row owns its padding, and the last
    row's padding is allocated) and every [V] one (the bias) is followed by its padding, else V; None: no buffer."""
    width = padded_width(V)
    for t in buffers:
        if t is None:
            continue
        last_row = (t.shape[0] - 1) * t.stride(0) if t.dim() == 2 else 0
        end = t.storage_offset() + last_row + width
        if (t.dim() == 2 and t.stride(0) < width) or end * t.element_size() > t.untyped_storage().nbytes():
            return V
    return width


def padded_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """bias [V] copied into the [:V] view of a buffer of padded_width(V) elements, so the kernels load it 16 bytes at
    a time at any V too (once per call: V elements)."""
    if bias is None:
        return None
    return torch.empty(padded_width(bias.shape[0]), device=bias.device, dtype=bias.dtype)[: bias.shape[0]].copy_(bias)


def _check_rows(a: torch.Tensor, bias: torch.Tensor | None, **vectors: torch.Tensor | None) -> None:
    """The launchers' layout contract: fp32 logits with unit column stride, contiguous per-row vectors and bias."""
    if a.dtype != torch.float32 or a.dim() != 2 or a.stride(1) != 1:
        raise ValueError(f"a must be fp32 [M, V] with unit stride over V; got {a.dtype} strides {a.stride()}")
    for name, t in {"bias": bias, **vectors}.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous; got strides {t.stride()}")


def _chain_args(temperature: float, softcap: float | None, logit_scale: float) -> tuple[float, float, float]:
    return logit_scale, 1.0 if softcap is None else softcap, 1.0 / temperature


@on_tensors_device
def logits_stats(
    a: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
    outputs: Outputs,
) -> tuple[torch.Tensor, ...]:
    """a: [M, V] fp32 raw logits (hidden @ weight.T), best a view of rows `padded_width(V)` long; bias: [V] or None;
    labels: [M] int64 in [0, V).

    Returns (lse, z at the label, entropy, argmax, log sum p^2, mean z), each [M] (argmax int64, the rest fp32); the
    last four are None unless asked for in `outputs`."""
    _check_rows(a, bias, labels=labels)
    M, V = a.shape
    dev = a.device
    lse, z_label = torch.empty(M, device=dev), torch.empty(M, device=dev)
    entropy = torch.empty(M, device=dev) if outputs.entropy else None
    argmax = torch.empty(M, device=dev, dtype=torch.int64) if outputs.argmax else None
    log_sum_sq = torch.empty(M, device=dev) if outputs.log_sum_sq_probs else None
    mean = torch.empty(M, device=dev) if outputs.mean_logits else None
    if M:
        _logits_stats_kernel[(M,)](
            a,
            a if bias is None else bias,
            labels,
            lse,
            z_label,
            lse if entropy is None else entropy,
            labels if argmax is None else argmax,
            lse if log_sum_sq is None else log_sum_sq,
            lse if mean is None else mean,
            a.stride(0),
            V,
            _width(V, a, bias),
            *_chain_args(temperature, softcap, logit_scale),
            BLOCK_V=_BLOCK_V,
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None,
            RETURN_ENTROPY=outputs.entropy,
            RETURN_ARGMAX=outputs.argmax,
            RETURN_LOG_SUM_SQ_PROBS=outputs.log_sum_sq_probs,
            RETURN_MEAN_LOGITS=outputs.mean_logits,
            num_warps=_NUM_WARPS,
        )
    return lse, z_label, entropy, argmax, log_sum_sq, mean


@on_tensors_device
def logits_grad(
    a: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    coef_mean: torch.Tensor | None,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
    vocab: int | None = None,
) -> None:
    """Writes d loss / d a into out ([M, V], unit column stride, any float dtype; may be `a` itself) for a loss with
    d loss / d log p(label) = coef and d loss / d mean_v log p_v = coef_mean ([M] fp32, or None) at each row. When a
    and out are both views of padded rows (`padded_width`), out's padding columns are overwritten too.

    vocab: the size of the vocabulary the mean is over (default V). A vocab-parallel rank's a holds its slice, and
    labels outside the slice (-1) add no one-hot term: the slice's part of the whole vocabulary's gradient."""
    if vocab is not None and not (isinstance(vocab, int) and vocab >= a.shape[1]):
        raise ValueError(f"vocab must be an int >= a.shape[1] = {a.shape[1]}; got {vocab!r}")
    _check_rows(a, bias, labels=labels, lse=lse, coef=coef, coef_mean=coef_mean)
    if out.shape != a.shape or out.stride(1) != 1:
        raise ValueError(f"out must have a's shape {tuple(a.shape)} and unit column stride; got {tuple(out.shape)}")
    M, V = a.shape
    if M == 0:
        return
    _logits_grad_kernel[(M, triton.cdiv(V, _BLOCK_V))](
        a,
        out,
        a if bias is None else bias,
        labels,
        lse,
        coef,
        coef if coef_mean is None else coef_mean,
        a.stride(0),
        out.stride(0),
        V,
        _width(V, a, out, bias),
        1.0 / (V if vocab is None else vocab),
        *_chain_args(temperature, softcap, logit_scale),
        BLOCK_V=_BLOCK_V,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_MEAN=coef_mean is not None,
        num_warps=_NUM_WARPS,
    )


# ----------------------------------------------------------------------------- compile check


def _launch_case(dtype: torch.dtype, M: int, V: int, features: bool) -> None:
    """One chunk of the fast forward on meta tensors: the stats of M rows of fp32 logits [M, V], then d logits in the
    inputs' dtype (a buffer of its own for bf16/fp16, over the logits for fp32), both with padded rows as the fast
    path allocates them. With `features`: bias, softcap, every extra and label smoothing's mean term."""
    a, labels = meta(M, padded_width(V))[:, :V], meta(M, dtype=torch.int64)
    bias, softcap = (meta(padded_width(V), dtype=dtype)[:V], 30.0) if features else (None, None)  # as `padded_bias`
    lse, *_ = logits_stats(a, bias, labels, 1.0, softcap, 1.0, Outputs(*[features] * 4))
    out = a if dtype == torch.float32 else meta(M, padded_width(V), dtype=dtype)[:, :V]
    coef_mean = meta(M) if features else None
    logits_grad(a, out, bias, labels, lse, meta(M), coef_mean, 1.0, softcap, 1.0)


def compile_specs() -> list[LaunchCase]:
    """The target's chunk (bf16 H=4096 V=128256: 1280 rows, the bf16 weight gradient's bytes at 6 bytes per logit
    in whole 256-row tiles, as fastalign.linear_losses sizes a GPU chunk at the default budget), without and with
    every feature; fp16 and fp32 (d logits in place); each at an odd vocabulary too (32001, its rows padded to 32016:
    "V=32001+15")."""
    M, V = 1280, 128256
    trips = {"_logits_stats_kernel": lambda a: (triton.cdiv(a["V"], a["BLOCK_V"]),)}
    shapes = list(itertools.product((torch.bfloat16, torch.float16, torch.float32), (V, 32001)))
    cases = []
    for (dtype, v), features in itertools.product(shapes, (False, True)):
        # Floor: the stats read the fp32 logits; the gradient reads them again and writes d logits.
        floor = M * v * (4 + 4 + dtype.itemsize)
        padding = f"+{padded_width(v) - v}" if padded_width(v) > v else ""
        label = f"chunk {TRITON_DTYPE[dtype]} M={M} V={v}{padding} features={features}"
        target = (dtype, v, features) == (torch.bfloat16, V, False)
        launch = functools.partial(_launch_case, dtype, M, v, features)
        cases.append(LaunchCase(label, launch, bytes=floor if target else 0, trips=trips))
    return cases
