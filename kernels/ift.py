"""Intuitive Fine-Tuning (IFT) kernels: the relation-propagation loss and the temporal-residual embeddings.

The loss of one sequence (Hua et al. 2024, official defaults: propagation on the loss, right-to-left,
L1 norm) with x_t = -logp_t inside the mask and 0 outside, and m_t the mask:

    C_t = sum_{k >= t} gamma^(k - t) x_k          (a reverse discounted scan along T)
    loss = sum_t x_t C_t / S,   S = sum_t m_t C_t

which is the issue's sum_t l_t w_t / N with w_t = C_t N / sum C: the 1/N in the items cancels. Its gradient
needs the forward (left-to-right) scan F_j(u) = sum_{t <= j} gamma^(j - t) u_t:

    d loss / d x_j = (C_j + F_j(x - loss * m)) / S

Each program owns one sequence and walks T in blocks, carrying the scan value from block to block; inside
a block `tl.associative_scan` composes the affine maps y -> gamma * y + b. Decay products underflow to 0
gracefully, so any gamma in [0, 1] and any T are stable.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import TRITON_DTYPE, LaunchCase, meta, on_tensors_device

_MAX_BLOCK_T = 1024
_MAX_BLOCK_D = 2048


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # Applying y -> a1 * y + b1, then y -> a2 * y + b2: the linear recurrence y_j = a_j * y_{j-1} + b_j.
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _ift_fwd_kernel(
    p_logp,  # [B, T] any float dtype, strides (stride_b, stride_t)
    p_mask,  # [B, T] bool, contiguous
    p_c,  # [B, T] fp32 out, contiguous: C_t inside the mask, 0 outside
    p_loss,  # [B] fp32 out: loss of each sequence
    p_s,  # [B] fp32 out: S = sum_t m_t C_t
    p_n,  # [B] fp32 out: tokens inside the mask
    T,
    stride_b,
    stride_t,
    gamma,
    BLOCK_T: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_j = tl.arange(0, BLOCK_T)
    b_gamma = tl.zeros((BLOCK_T,), tl.float32) + gamma
    carry = tl.zeros((), tl.float32)  # C at the first position of the block to the right
    s = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)  # sum_t x_t C_t
    sx = tl.zeros((), tl.float32)  # sum_t x_t
    n = tl.zeros((), tl.float32)
    for i in range(0, tl.cdiv(T, BLOCK_T)):
        # Walk each block backwards (j = 0 is its last position), so the reverse scan is a forward one.
        o_t = T - 1 - i * BLOCK_T - o_j
        m_t = o_t >= 0
        b_m = tl.load(p_mask + i_b * T + o_t, mask=m_t, other=0) != 0
        b_logp = tl.load(p_logp + i_b * stride_b + o_t * stride_t, mask=b_m, other=0.0).to(tl.float32)
        b_x = tl.where(b_m, -b_logp, 0.0)
        b_decay, b_local = tl.associative_scan((b_gamma, b_x), 0, _affine_combine)
        b_c = b_local + b_decay * carry  # C_t everywhere: prompt positions pass the scan on
        carry = tl.sum(tl.where(o_j == BLOCK_T - 1, b_c, 0.0), 0)
        b_c = tl.where(b_m, b_c, 0.0)
        tl.store(p_c + i_b * T + o_t, b_c, mask=m_t)
        s += tl.sum(b_c, 0)
        a += tl.sum(b_x * b_c, 0)
        sx += tl.sum(b_x, 0)
        n += tl.sum(b_m.to(tl.float32), 0)
    # S = 0 with tokens in the mask only when every x is 0 (or they cancel): fall back to plain SFT then.
    loss = tl.where(s != 0, a / tl.where(s != 0, s, 1.0), sx / tl.maximum(n, 1.0))
    tl.store(p_loss + i_b, loss)
    tl.store(p_s + i_b, s)
    tl.store(p_n + i_b, n)


@triton.jit
def _ift_bwd_kernel(
    p_logp,  # [B, T] any float dtype, strides (stride_b, stride_t)
    p_mask,  # [B, T] bool, contiguous
    p_c,  # [B, T] fp32, contiguous, from the forward
    p_loss,  # [B] fp32
    p_s,  # [B] fp32
    p_n,  # [B] fp32
    p_dloss,  # [B] fp32: upstream gradient of each sequence's loss
    p_dlogp,  # [B, T] out, contiguous, in the log-probs' dtype
    T,
    stride_b,
    stride_t,
    gamma,
    BLOCK_T: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_j = tl.arange(0, BLOCK_T)
    b_gamma = tl.zeros((BLOCK_T,), tl.float32) + gamma
    g = tl.load(p_dloss + i_b)
    loss = tl.load(p_loss + i_b)
    s = tl.load(p_s + i_b)
    sft = s == 0
    inv_s = 1.0 / tl.where(sft, 1.0, s)
    inv_n = 1.0 / tl.maximum(tl.load(p_n + i_b), 1.0)
    carry = tl.zeros((), tl.float32)  # F at the last position of the block to the left
    for i in range(0, tl.cdiv(T, BLOCK_T)):
        o_t = i * BLOCK_T + o_j
        m_t = o_t < T
        b_m = tl.load(p_mask + i_b * T + o_t, mask=m_t, other=0) != 0
        b_logp = tl.load(p_logp + i_b * stride_b + o_t * stride_t, mask=b_m, other=0.0).to(tl.float32)
        b_c = tl.load(p_c + i_b * T + o_t, mask=b_m, other=0.0)
        b_u = tl.where(b_m, -b_logp - loss, 0.0)  # x - loss * m
        b_decay, b_local = tl.associative_scan((b_gamma, b_u), 0, _affine_combine)
        b_f = b_local + b_decay * carry
        carry = tl.sum(tl.where(o_j == BLOCK_T - 1, b_f, 0.0), 0)
        b_dx = tl.where(sft, inv_n, (b_c + b_f) * inv_s)
        b_dlogp = tl.where(b_m, -g * b_dx, 0.0)  # x = -logp
        tl.store(p_dlogp + i_b * T + o_t, b_dlogp.to(p_dlogp.dtype.element_ty), mask=m_t)


@triton.jit
def _ift_inputs_embeds_kernel(
    p_weight,  # [V, D] any float dtype, row stride = stride_w, unit stride over D
    p_ids,  # [B, T] int64, strides (stride_ib, stride_it)
    p_pred,  # [B, >= T - 1] int64, strides (stride_pb, stride_pt): argmax at each position
    p_labels,  # [B, T] int64, strides (stride_lb, stride_lt), aligned with p_ids
    p_out,  # [B * T, D] out, contiguous, in the weight's dtype
    T,
    D,
    V,
    stride_w,
    stride_ib,
    stride_it,
    stride_pb,
    stride_pt,
    stride_lb,
    stride_lt,
    ignore_index,
    lam,
    BLOCK_D: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1)
    i_b = i_n // T
    i_t = i_n % T
    token = tl.load(p_ids + i_b * stride_ib + i_t * stride_it)
    response = tl.load(p_labels + i_b * stride_lb + i_t * stride_lt) != ignore_index
    # The prediction made at t - 1 stands in for the token at t; position 0 keeps its own token.
    shifted = i_t > 0
    pred = tl.load(p_pred + i_b * stride_pb + (i_t - 1) * stride_pt, mask=response & shifted, other=0)
    mixed = tl.where(shifted, pred, token)
    token_ok = (token >= 0) & (token < V)
    mixed_ok = (mixed >= 0) & (mixed < V)

    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    # An id outside [0, V) is never read; its row comes out NaN, never a silent wrong embedding. (The masks
    # compare o_d with a scalar bound rather than and-ing a scalar flag into a vector: same result, and the
    # interpreter accepts it.)
    m_e = o_d < tl.where(token_ok, D, 0)
    m_p = o_d < tl.where(response & mixed_ok, D, 0)
    b_e = tl.load(p_weight + token * stride_w + o_d, mask=m_e, other=0.0).to(tl.float32)
    b_p = tl.load(p_weight + mixed * stride_w + o_d, mask=m_p, other=0.0).to(tl.float32)
    # Prompt and padding rows are copied, so they stay bit-exact ground truth.
    b_out = tl.where(response, (1.0 - lam) * b_e + lam * b_p, b_e)
    ok = token_ok & (mixed_ok | ~response)
    b_out = tl.where(ok, b_out, float("nan"))
    tl.store(p_out + i_n * D + o_d, b_out.to(p_out.dtype.element_ty), mask=m_d)


def _scan_config(T: int) -> tuple[int, int]:
    block_t = min(triton.next_power_of_2(max(T, 1)), _MAX_BLOCK_T)
    return block_t, 8 if block_t >= 1024 else 4


def _embeds_config(D: int) -> tuple[int, int]:
    block_d = min(triton.next_power_of_2(D), _MAX_BLOCK_D)
    return block_d, 8 if block_d >= 2048 else 4


@on_tensors_device
def ift_fwd(
    logp: torch.Tensor, mask: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logp: [B, T] float, any strides; mask: [B, T] bool contiguous; 0 <= gamma <= 1.

    Returns (loss [B], C [B, T], S [B], N [B]), all fp32; C, S and N are what ift_bwd needs.
    """
    B, T = logp.shape
    loss = torch.empty(B, device=logp.device, dtype=torch.float32)
    c = torch.empty(B, T, device=logp.device, dtype=torch.float32)
    s = torch.empty_like(loss)
    n = torch.empty_like(loss)
    if B == 0:
        return loss, c, s, n
    block_t, num_warps = _scan_config(T)
    _ift_fwd_kernel[(B,)](
        logp, mask, c, loss, s, n, T, logp.stride(0), logp.stride(1), gamma, BLOCK_T=block_t, num_warps=num_warps
    )
    return loss, c, s, n


@on_tensors_device
def ift_bwd(
    logp: torch.Tensor,
    mask: torch.Tensor,
    c: torch.Tensor,
    loss: torch.Tensor,
    s: torch.Tensor,
    n: torch.Tensor,
    dloss: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """d (per-sequence loss) -> d logp: [B, T] contiguous in logp's dtype. dloss: [B] fp32 contiguous."""
    B, T = logp.shape
    dlogp = torch.empty(B, T, device=logp.device, dtype=logp.dtype)
    if B == 0:
        return dlogp
    block_t, num_warps = _scan_config(T)
    _ift_bwd_kernel[(B,)](
        logp,
        mask,
        c,
        loss,
        s,
        n,
        dloss,
        dlogp,
        T,
        logp.stride(0),
        logp.stride(1),
        gamma,
        BLOCK_T=block_t,
        num_warps=num_warps,
    )
    return dlogp


@on_tensors_device
def ift_inputs_embeds_fwd(
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    predicted_ids: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    lam: float,
) -> torch.Tensor:
    """weight: [V, D] unit stride over D; input_ids, labels: [B, T] int64; predicted_ids: [B, >= T - 1] int64.

    Returns [B, T, D] in the weight's dtype.
    """
    V, D = weight.shape
    B, T = input_ids.shape
    out = torch.empty(B, T, D, device=weight.device, dtype=weight.dtype)
    if B * T == 0 or D == 0:
        return out
    block_d, num_warps = _embeds_config(D)
    _ift_inputs_embeds_kernel[(B * T, triton.cdiv(D, block_d))](
        weight,
        input_ids,
        predicted_ids,
        labels,
        out,
        T,
        D,
        V,
        weight.stride(0),
        input_ids.stride(0),
        input_ids.stride(1),
        predicted_ids.stride(0),
        predicted_ids.stride(1),
        labels.stride(0),
        labels.stride(1),
        ignore_index,
        lam,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out


def _launch_case(dtype: torch.dtype, B: int, T: int, D: int) -> None:
    """The loss forward and backward on meta [B, T] log-probs, then the embeddings of a meta [V, D] weight."""
    logp, mask = meta(B, T, dtype=dtype), meta(B, T, dtype=torch.bool)
    loss, c, s, n = ift_fwd(logp, mask, 0.95)
    ift_bwd(logp, mask, c, loss, s, n, loss, 0.95)
    ids = meta(B, T, dtype=torch.int64)
    ift_inputs_embeds_fwd(meta(128256, D, dtype=dtype), ids, ids[:, 1:], ids, -100, 0.2)


def compile_specs() -> list[LaunchCase]:
    """Sequences of 4096 and 512 tokens (hidden 4096), odd ones (T = 257, 1) and odd hidden sizes (896, 4097)."""
    shapes = [(torch.bfloat16, 8, 4096, 4096), (torch.float32, 8, 512, 4096), (torch.float16, 8, 257, 896)]
    shapes += [(torch.bfloat16, 1, 1, 4097), (torch.float32, 8, 4096, 8192)]
    return [
        LaunchCase(f"{TRITON_DTYPE[dtype]} B={B} T={T} D={D}", functools.partial(_launch_case, dtype, B, T, D))
        for dtype, B, T, D in shapes
    ]
