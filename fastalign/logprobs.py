"""Per-token log-probabilities from logits, with optional entropy and argmax from the same pass."""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastalign._backend import (
    as_btv,
    backend_for,
    check_float,
    check_label_range,
    check_labels,
    check_positive,
    row_chunks,
)
from fastalign.kernels.logprobs import token_logprobs_bwd, token_logprobs_fwd


class TokenStats(NamedTuple):
    """Per-token results, each shaped like the labels. A field is None when it was not requested."""

    logprobs: torch.Tensor  # float32, 0.0 where label == ignore_index
    entropy: torch.Tensor | None  # float32 entropy of softmax(logits / temperature), every position
    argmax: torch.Tensor | None  # int64 greedy token, every position
    # Extras of the same pass, not differentiable (TRL's fused head and WPO weighting read them):
    log_sum_sq_probs: torch.Tensor | None = None  # float32 log(sum_v p_v^2), every position
    mean_logits: torch.Tensor | None = None  # float32 mean over the vocabulary of logits / temperature


# ---------------------------------------------------------------------------------------------
# Torch path: the same math, a chunk of rows at a time, for CPU tensors outside the interpreter.


def _log_softmax_fp32(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature == 1.0:
        return torch.log_softmax(chunk, -1, dtype=torch.float32)  # upcasts inside the fused op
    return torch.log_softmax(chunk.float() / temperature, -1)  # .float() may alias the logits


def _torch_fwd(x, labels, ignore_index, temperature, return_entropy, return_argmax, return_sum_sq, return_mean):
    N = labels.numel()
    V = x.shape[-1]
    logp = torch.empty(N, device=x.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if return_entropy else None
    argmax = torch.empty(N, device=x.device, dtype=torch.int64) if return_argmax else None
    log_sum_sq = torch.empty_like(logp) if return_sum_sq else None
    mean = torch.empty_like(logp) if return_mean else None
    for r0, chunk in row_chunks(x, 3 * 4 * V):
        r1 = r0 + chunk.shape[0]
        lab = labels[r0:r1]
        ls = _log_softmax_fp32(chunk, temperature)
        ls_label = ls.gather(-1, lab.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
        logp[r0:r1] = torch.where(lab == ignore_index, 0.0, ls_label)
        # lse = z - log_softmax(z) at the max, where log_softmax is in [-log V, 0]: well conditioned.
        z_max, i_max = chunk.max(-1)
        nan_rows = z_max.isnan()
        if nan_rows.any():  # torch.max takes NaN for the maximum; the kernels' max skips NaN, as compiled Triton's
            i_max[nan_rows] = chunk[nan_rows].masked_fill(chunk[nan_rows].isnan(), float("-inf")).argmax(-1)
        lse[r0:r1] = z_max.float() / temperature - ls.gather(-1, i_max.unsqueeze(-1)).squeeze(-1)
        if return_entropy:
            # Clamping -inf log-probs makes their p * log p an exact 0 instead of 0 * -inf = NaN.
            entropy[r0:r1] = -(ls.exp() * ls.clamp(min=torch.finfo(torch.float32).min)).sum(-1)
        if return_argmax:
            argmax[r0:r1] = i_max
        if return_sum_sq:
            log_sum_sq[r0:r1] = torch.logsumexp(2 * ls, -1)
        if return_mean:
            mean[r0:r1] = chunk.mean(-1, dtype=torch.float32) / temperature
    return logp, lse, entropy, argmax, log_sum_sq, mean


def _torch_bwd(x, dx, labels, lse, dlogp, entropy, dentropy, ignore_index, temperature):
    T, V = x.shape[1:]
    for r0, chunk in row_chunks(x, 3 * 4 * V):
        r1 = r0 + chunk.shape[0]
        lab = labels[r0:r1]
        ls = _log_softmax_fp32(chunk, temperature)
        g = torch.where(lab == ignore_index, 0.0, dlogp[r0:r1]).unsqueeze(-1)
        # d logp / dz = onehot - p;  d H / dz = -p * (log p + H)
        if dentropy is None:
            dz = ls.exp().mul_(-g)
        else:
            gh = dentropy[r0:r1].unsqueeze(-1)
            p = ls.exp()
            # p = 0 at -inf logits, where log p + H is -inf: their gradient is 0, not NaN.
            dz = torch.where(p > 0, p * (-g - gh * (ls + entropy[r0:r1].unsqueeze(-1))), 0.0)
        dz.scatter_add_(-1, lab.clamp(0, V - 1).unsqueeze(-1), g)
        if temperature != 1.0:
            dz /= temperature
        b, t0 = divmod(r0, T)
        dx[b, t0 : t0 + chunk.shape[0]] = dz


# ---------------------------------------------------------------------------------------------


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, temperature, extras, inplace_backward):
        x = as_btv(logits)
        flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
        use_kernels = backend_for(logits) != "torch"
        fwd = token_logprobs_fwd if use_kernels else _torch_fwd
        logp, lse, entropy, argmax, log_sum_sq, mean = fwd(x, flat_labels, ignore_index, temperature, *extras)

        ctx.save_for_backward(logits, flat_labels, lse, entropy)
        ctx.ignore_index, ctx.temperature = ignore_index, temperature
        ctx.inplace_backward, ctx.use_kernels = inplace_backward, use_kernels
        ctx.set_materialize_grads(False)
        logp, entropy, argmax, log_sum_sq, mean = (
            None if t is None else t.view(labels.shape) for t in (logp, entropy, argmax, log_sum_sq, mean)
        )
        ctx.mark_non_differentiable(*(t for t in (argmax, log_sum_sq, mean) if t is not None))
        return logp, entropy, argmax, log_sum_sq, mean

    @staticmethod
    def backward(ctx, dlogp, dentropy, *_non_differentiable):
        logits, labels, lse, entropy = ctx.saved_tensors
        x = as_btv(logits)
        # In place: the gradient overwrites the logits buffer, saving a [tokens, vocab] allocation.
        # as_btv returns a view of the caller's storage unless the layout forced a copy.
        inplace = ctx.inplace_backward and x.data_ptr() == logits.data_ptr()
        dx = x if inplace else torch.empty(x.shape, device=x.device, dtype=x.dtype)
        dlogp = torch.zeros_like(lse) if dlogp is None else dlogp.reshape(-1).float().contiguous()
        if dentropy is not None:
            dentropy = dentropy.reshape(-1).float().contiguous()
        bwd = token_logprobs_bwd if ctx.use_kernels else _torch_bwd
        bwd(x, dx, labels, lse, dlogp, entropy, dentropy, ctx.ignore_index, ctx.temperature)
        dlogits = logits if inplace else dx.view(logits.shape)
        return dlogits, None, None, None, None, None


def token_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    entropy: bool = True,
    argmax: bool = True,
    log_sum_sq_probs: bool = False,
    mean_logits: bool = False,
    inplace_backward: bool = False,
    strict: bool = False,
) -> TokenStats:
    """Per-token log-probs of `labels`, plus entropy and argmax, from one pass over the logits.

    Args:
        logits: [..., V] float32, bfloat16 or float16; any strides on the leading dims.
        labels: [...] int64, aligned with the logits (the caller shifts).
        ignore_index: label whose log-prob is 0.0 and whose gradient is 0 (default -100).
        temperature: logits are divided by it (default 1.0).
        entropy: return the entropy of softmax(logits / temperature) at every position; it is
            differentiable (default True).
        argmax: return the greedy token at every position (default True).
        log_sum_sq_probs: return log(sum_v p_v^2) of softmax(logits / temperature) at every position, float32,
            not differentiable (WPO's weights and TRL's fused head use it; default False).
        mean_logits: return the mean over the vocabulary of logits / temperature at every position, float32,
            not differentiable (TRL's `logits/*` metrics; default False).
        inplace_backward: write d logits over the logits buffer in backward (default False). Only
            safe when nothing else needs the logits after this op's backward.
        strict: on CUDA, raise on a label outside [0, V) instead of returning NaN for it; this
            syncs with the device. On the CPU such a label always raises.

    Returns:
        TokenStats(logprobs, entropy, argmax, log_sum_sq_probs, mean_logits), each shaped like `labels`; a field
        not asked for is None.
    """
    check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V > 0; got {tuple(logits.shape)}")
    check_labels("labels", labels, logits.shape[:-1], logits.device, "logits.shape[:-1]")
    check_positive("temperature", temperature)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int; got {type(ignore_index).__name__}")
    if strict or logits.device.type == "cpu":
        check_label_range("labels", labels, logits.shape[-1], ignore_index)
    extras = (entropy, argmax, log_sum_sq_probs, mean_logits)
    return TokenStats(*_TokenLogprobs.apply(logits, labels, ignore_index, float(temperature), extras, inplace_backward))


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    inplace_backward: bool = False,
    strict: bool = False,
) -> torch.Tensor:
    """float32 log-probs of `labels` under softmax(logits / temperature), 0.0 where ignored.

    logits: [..., V] float32/bfloat16/float16; labels: [...] int64 aligned with the logits.
    See `token_stats` for the arguments; this is it without the extras.
    """
    return token_stats(
        logits,
        labels,
        ignore_index=ignore_index,
        temperature=temperature,
        entropy=False,
        argmax=False,
        inplace_backward=inplace_backward,
        strict=strict,
    ).logprobs
