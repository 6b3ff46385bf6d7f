"""Intuitive Fine-Tuning (Hua et al. 2024): the relation-propagation loss and the temporal-residual inputs.

Semantics follow the authors' code (TsinghuaC3I/Intuitive-Fine-Tuning) at its defaults: propagation of the
per-token loss from the right (a reverse discounted cumulative sum), L1 normalisation, gamma = 0.95, lambda =
0.2; the weights are not detached, and gamma = 0 is plain SFT.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastalign._backend import (
    backend_for,
    check_float,
    check_ignore_index,
    check_label_range,
    check_labels,
    check_real,
    eager_under_compile,
    first_order_only,
)
from fastalign.kernels.ift import ift_bwd, ift_fwd, ift_inputs_embeds_fwd
from fastalign.logprobs import token_logprobs

# Block length of the torch path's scan: a [B, T] scan costs T / block sequential steps of a small matmul.
_TORCH_SCAN_BLOCK = 256


class _IFTLoss(torch.autograd.Function):
    """Per-sequence IFT losses [B] from token log-probs, on the Triton scan kernels."""

    @staticmethod
    def forward(ctx, token_logps, mask, gamma):
        loss, c, s, n = ift_fwd(token_logps, mask, gamma)
        ctx.save_for_backward(token_logps, mask, c, loss, s, n)
        ctx.gamma = gamma
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx, dloss):
        token_logps, mask, c, loss, s, n = ctx.saved_tensors
        dlogps = ift_bwd(token_logps, mask, c, loss, s, n, dloss.float().contiguous(), ctx.gamma)
        return dlogps, None, None


@functools.lru_cache(maxsize=16)
def _decay_matrix(block: int, gamma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[k, t] = gamma^(k - t) for k >= t, else 0: a constant of the scan, kept because building it (block^2 powers)
    took 40% of a T = 512 forward. Read only (a matmul operand), so sharing it between calls is safe."""
    with torch.inference_mode(False):  # a first call under inference_mode would cache a tensor autograd cannot save
        k = torch.arange(block, device=device)
        distance = k.unsqueeze(1) - k.unsqueeze(0)  # [k, t] = k - t
        return torch.where(distance >= 0, gamma ** distance.clamp(min=0).to(dtype), 0.0).to(dtype)


def _reverse_discounted_cumsum(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """C_t = sum_{k >= t} gamma^(k - t) x_k along the last dim, differentiable: blocks of a triangular matmul,
    with the carry from the block to the right decayed into each position."""
    T = x.shape[-1]
    if T == 0:
        return x.clone()
    block = min(T, _TORCH_SCAN_BLOCK)
    decay = _decay_matrix(block, float(gamma), x.dtype, x.device)
    blocks = []
    carry = x.new_zeros(x.shape[:-1])  # C at the first position right of the current block
    for t1 in range(T, 0, -block):
        t0 = max(0, t1 - block)
        n = t1 - t0
        # gamma^(n - t): distance from position t to the next block's first position.
        c = x[..., t0:t1] @ decay[:n, :n] + carry.unsqueeze(-1) * decay[n - 1, :n] * gamma
        blocks.append(c)
        carry = c[..., 0]
    return torch.cat(blocks[::-1], dim=-1)


def _ift_loss_torch(token_logps: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """The same per-sequence losses as the kernels, as differentiable torch ops (the CPU path)."""
    x = torch.where(mask, -token_logps.float(), 0.0)
    c = torch.where(mask, _reverse_discounted_cumsum(x, gamma), 0.0)
    s, a, n = c.sum(-1), (x * c).sum(-1), mask.sum(-1)
    nonzero_s = s != 0
    # A row with S = 0 (every x 0) falls back to plain SFT, as the kernel does; where() on safe denominators
    # keeps the unused branch's gradient finite.
    return torch.where(nonzero_s, a / torch.where(nonzero_s, s, 1.0), x.sum(-1) / n.clamp(min=1))


def check_gamma(gamma: float) -> float:
    """Validates IFT's discount (IFTLoss calls it at construction)."""
    if not 0 <= check_real("gamma", gamma, "a number in [0, 1]") <= 1:
        raise ValueError(f"gamma must be a number in [0, 1]; got {gamma!r}")
    return float(gamma)


@eager_under_compile
def ift_loss(token_logps: torch.Tensor, mask: torch.Tensor, *, gamma: float = 0.95) -> torch.Tensor:
    """The IFT loss: the batch mean of each sequence's propagation-weighted negative log-likelihood.

    With l_t = -token_logps[t] inside the mask and N the sequence's token count there:
    item_t = l_t / N, C_t = sum_{k >= t} gamma^(k - t) item_k, w_t = C_t N / sum_t C_t, and the sequence
    loss is sum_t l_t w_t / N. Gradients flow through the weights too.

    Args:
        token_logps: [B, T] float32/bfloat16/float16 per-token log-probs; read only inside the mask.
        mask: [B, T] bool (or integer 0/1), True on the completion tokens.
        gamma: discount in [0, 1] (default 0.95). 0 is plain SFT (all weights 1); 1 is the undiscounted
            reverse cumulative sum.

    Returns:
        Scalar float32 loss. A sequence with no token in the mask (T = 0 included) contributes 0, and no
        gradient. An empty batch (B = 0) raises ValueError, as `dpo_loss` does.
    """
    check_float("token_logps", token_logps)
    if token_logps.dim() != 2 or token_logps.shape[0] == 0:
        # The mean over no sequences would be NaN; dpo_loss raises on an empty batch too.
        raise ValueError(f"token_logps must have shape [B, T] with B >= 1; got {tuple(token_logps.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.dtype.is_floating_point or mask.dtype.is_complex:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool (or integer 0/1) tensor; got {got}")
    if mask.shape != token_logps.shape:
        raise ValueError(f"mask must have shape {tuple(token_logps.shape)} like token_logps; got {tuple(mask.shape)}")
    if mask.device != token_logps.device:
        raise ValueError(f"mask must be on token_logps' device ({token_logps.device}); got {mask.device}")
    gamma = check_gamma(gamma)
    mask = (mask != 0).contiguous()
    if gamma == 0:  # the official code's special case: weights of 1, plain SFT
        nll = torch.where(mask, -token_logps.float(), 0.0).sum(-1)
        per_sequence = nll / mask.sum(-1).clamp(min=1)
    elif backend_for(token_logps) == "torch":
        per_sequence = _ift_loss_torch(token_logps, mask, gamma)
    else:
        per_sequence = _IFTLoss.apply(token_logps, mask, gamma)
    return per_sequence.mean()


def ift_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    gamma: float = 0.95,
    ignore_index: int = -100,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """`ift_loss` straight from logits [B, T, V] and labels [B, T] aligned with them (the caller shifts).

    The per-token log-probs come from the fused kernel and the loss's gradient flows back through its
    backward, so no float32 [tokens, vocab] temporary exists. inplace_backward: see `token_logprobs`.
    """
    if logits.dim() != 3 or logits.shape[0] == 0:
        raise ValueError(f"logits must have shape [B, T, V] with B >= 1; got {tuple(logits.shape)}")
    gamma = check_gamma(gamma)
    token_logps = token_logprobs(logits, labels, ignore_index=ignore_index, inplace_backward=inplace_backward)
    return ift_loss(token_logps, labels != ignore_index, gamma=gamma)


# ---------------------------------------------------------------------------------------------- inputs


def _shifted_predictions(input_ids: torch.Tensor, predicted_ids: torch.Tensor) -> torch.Tensor:
    """[B, T]: the prediction made at t - 1 for t >= 1, the token itself at t = 0."""
    T = input_ids.shape[1]
    return torch.cat([input_ids[:, :1], predicted_ids[:, : T - 1]], dim=1)


class _IFTInputsEmbeds(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, input_ids, predicted_ids, labels, lam, ignore_index):
        out = ift_inputs_embeds_fwd(weight, input_ids, predicted_ids, labels, ignore_index, lam)
        ctx.save_for_backward(input_ids, predicted_ids, labels)
        ctx.lam, ctx.ignore_index, ctx.vocab = lam, ignore_index, weight.shape[0]
        return out

    @staticmethod
    def backward(ctx, dout):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        input_ids, predicted_ids, labels = ctx.saved_tensors
        # d weight: each output row scatters (1 - lam) * g to its token's row and lam * g to the shifted
        # prediction's row (1 * g to the token on prompt and padding).
        response = (labels != ctx.ignore_index).reshape(-1, 1)
        g = dout.reshape(input_ids.numel(), dout.shape[-1]).float()  # not (-1, D): D may be 0
        dweight = torch.zeros(ctx.vocab, g.shape[1], device=g.device, dtype=torch.float32)
        dweight.index_add_(0, input_ids.reshape(-1), torch.where(response, (1 - ctx.lam) * g, g))
        # The ids the forward read: a prediction at a prompt position may be anything (-100 where unscored).
        mixed = _mixed_ids(input_ids, predicted_ids, labels, ctx.ignore_index).reshape(-1)
        dweight.index_add_(0, mixed, torch.where(response, ctx.lam * g, 0.0))
        return dweight.to(dout.dtype), None, None, None, None, None


def _mixed_ids(input_ids: torch.Tensor, predicted_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """[B, T]: the id whose embedding is mixed in at each position: the shifted prediction on response positions,
    the token itself on prompt and padding."""
    return torch.where(labels == ignore_index, input_ids, _shifted_predictions(input_ids, predicted_ids))


def _check_read_ids(input_ids, predicted_ids, labels, ignore_index, vocab) -> None:
    """Raises on an id outside [0, vocab) among those the op reads (a prediction at a prompt position is not read)."""
    check_label_range("input_ids", input_ids, vocab, None)
    check_label_range("predicted_ids", _mixed_ids(input_ids, predicted_ids, labels, ignore_index), vocab, None)


def _ift_inputs_embeds_torch(weight, input_ids, predicted_ids, labels, lam, ignore_index):
    # Prompt and padding rows mix a token with itself: lerp(e, e, lam) is e exactly, so they stay bit-exact copies.
    # In place over the first lookup: one [B, T, D] buffer fewer (neither lookup's backward reads its output).
    mixed_ids = _mixed_ids(input_ids, predicted_ids, labels, ignore_index)
    try:
        return F.embedding(input_ids, weight).lerp_(F.embedding(mixed_ids, weight), lam)
    except IndexError:  # F.embedding range-checks what it reads, at no extra cost: name the argument at fault
        _check_read_ids(input_ids, predicted_ids, labels, ignore_index, weight.shape[0])
        raise


@eager_under_compile
def ift_inputs_embeds(
    embedding_weight: torch.Tensor,
    input_ids: torch.Tensor,
    predicted_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    lam: float = 0.2,
    ignore_index: int = -100,
) -> torch.Tensor:
    """IFT's temporal-residual inputs for the second pass, in one kernel.

    inputs_embeds[b, t] = (1 - lam) * E[input_ids[b, t]] + lam * E[predicted_ids[b, t - 1]] on response
    positions (labels != ignore_index; position 0 mixes with its own token), and exactly E[input_ids[b, t]]
    on prompt and padding positions.

    Args:
        embedding_weight: [V, D] float32/bfloat16/float16, e.g. model.get_input_embeddings().weight. Gets a
            gradient if it requires one (the official code uses a frozen copy: pass a detached weight for that).
        input_ids: [B, T] int64 ground-truth tokens.
        predicted_ids: [B, T] (or [B, T - 1]) int64: the greedy prediction at each position of the first
            pass, e.g. `token_stats(...).argmax`; predicted_ids[:, t] predicts the token at t + 1 and the
            shift happens here.
        labels: [B, T] int64 aligned with input_ids (not shifted), ignore_index on prompt and padding.
        lam: the mixing weight lambda in [0, 1] (default 0.2, the official default).
        ignore_index: label value of non-response positions (default -100).

    An id outside [0, V) that is read (every input id; a prediction where it is mixed in) raises ValueError on the
    CPU, and gives a NaN row on CUDA.

    Returns:
        [B, T, D] in the weight's dtype.
    """
    check_float("embedding_weight", embedding_weight)
    if embedding_weight.dim() != 2 or embedding_weight.shape[0] == 0:
        raise ValueError(f"embedding_weight must have shape [V, D] with V > 0; got {tuple(embedding_weight.shape)}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must have shape [B, T]; got {got}")
    if not 0 <= check_real("lam", lam, "a number in [0, 1]") <= 1:
        raise ValueError(f"lam must be a number in [0, 1]; got {lam!r}")
    lam, ignore_index = float(lam), check_ignore_index(ignore_index)
    device, (B, T), vocab = embedding_weight.device, input_ids.shape, embedding_weight.shape[0]
    check_labels("input_ids", input_ids, input_ids.shape, device, "[B, T]", "embedding_weight")
    check_labels("labels", labels, input_ids.shape, device, "input_ids.shape", "embedding_weight")
    full = isinstance(predicted_ids, torch.Tensor) and predicted_ids.shape == (B, T)
    predicted_shape = torch.Size([B, T] if full else [B, max(T - 1, 0)])
    what = f"[B, T] or [B, T - 1] with (B, T) = {(B, T)}"
    check_labels("predicted_ids", predicted_ids, predicted_shape, device, what, "embedding_weight")
    input_ids, predicted_ids, labels = (x.to(torch.int64) for x in (input_ids, predicted_ids, labels))
    if backend_for(embedding_weight) == "torch":
        return _ift_inputs_embeds_torch(embedding_weight, input_ids, predicted_ids, labels, lam, ignore_index)
    if device.type == "cpu":  # the interpreter; compiled kernels give NaN rows for bad ids instead
        _check_read_ids(input_ids, predicted_ids, labels, ignore_index, vocab)
    weight = embedding_weight if embedding_weight.stride(-1) == 1 else embedding_weight.contiguous()
    return _IFTInputsEmbeds.apply(weight, input_ids, predicted_ids, labels, lam, ignore_index)
