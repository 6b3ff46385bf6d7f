"""Per-token log-probs straight from hidden states and the lm_head weight, never materializing the logits.

Logits are z = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap) / temperature (the softcap
only when given); log-probs, entropy and argmax are those of softmax(z).

- Forward: on CUDA (and in the interpreter) one Triton kernel computes logits tiles with tl.dot and folds them
  into online log-sum-exp statistics: the logits exist only in registers. Only rows whose label counts are
  scored (every row when entropy or argmax is asked for).
- Backward: the vocabulary is cut into chunks within `memory_budget`. For each chunk a kernel recomputes the
  logits tiles and writes d a = d loss / d (hidden @ weight.T + bias) into the chunk buffer; two GEMMs then add
  d hidden += d a @ W[chunk] into an fp32 accumulator and write d W[chunk] = d a.T @ hidden with fp32
  accumulation. Deterministic (no atomics), and bf16 rounding touches each gradient once, at the end.
- The torch path (CPU outside the interpreter, other devices) runs the same chunk loop in fp32 torch ops. When the
  whole vocabulary fits one forward chunk, it takes one fused log_softmax and keeps the fp32 log-probs for the
  backward instead of recomputing the logits (6 N H V, as eager PyTorch): they are within `memory_budget`, and a
  CPU is short of FLOPs, not memory.

Costs of one call: 8 N H V FLOPs for forward + backward (the backward recomputes the logits; 6 where the torch path
keeps them), and one host sync, to count the rows that are scored and reject labels outside [0, V).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign._backend import (
    as_btv,
    autocast_off,
    backend_for,
    check_flag,
    check_float,
    check_ignore_index,
    check_int,
    check_labels,
    check_positive,
    eager_under_compile,
    first_order_only,
    label_range_error,
)
from fastalign.kernels.linear_logprobs import Outputs, bwd_chunk_multiple, linear_logprobs_bwd, linear_logprobs_fwd
from fastalign.logprobs import TokenStats
from fastalign.vocab_parallel import linear_head_stats, vocab_shard

DEFAULT_MEMORY_BUDGET = 256 * 2**20
"""Bytes for the logits-sized temporaries of one call (the backward's vocabulary chunk); see `linear_token_stats`."""

# Rows per block of the torch path's elementwise work, so its temporaries stay near 16 MB whatever the chunk.
_TORCH_BLOCK_ELEMENTS = 2**22
# torch.mm(..., out_dtype=torch.float32) from bf16/fp16 operands: CUDA, torch >= 2.8.
_MM_OUT_DTYPE = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 8)


@dataclass(frozen=True)
class _Head:
    """One call's options: how logits are made from a = hidden @ weight.T + bias, the ignored label, the budget."""

    ignore_index: int
    temperature: float
    softcap: float | None
    logit_scale: float
    memory_budget: int


# ---------------------------------------------------------------------------------------------- helpers


def _scored_rows(labels: torch.Tensor, vocab: int, ignore_index: int, every_row: bool) -> torch.Tensor:
    """[M] int64 indices of the rows to score: those whose label is not ignore_index, or every row.

    The call's one host sync: it counts those rows and rejects a label outside [0, vocab). Meta tensors (shape
    inference) hold no labels: every row is scored."""
    if labels.device.type == "meta":
        return torch.arange(labels.numel(), device=labels.device)
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    n_valid, n_bad = torch.stack([valid.sum(), bad.sum()]).tolist()
    if n_bad:
        raise label_range_error("labels", labels, bad, vocab, ignore_index)
    if every_row or n_valid == labels.numel():
        return torch.arange(labels.numel(), device=labels.device)
    # A stable sort puts the valid rows first, in order, without a second sync (nonzero() would sync).
    return torch.argsort((~valid).to(torch.int8), stable=True)[:n_valid]


def _rows_of(x: torch.Tensor, rows: torch.Tensor, ascending: bool) -> torch.Tensor:
    """[M, H]: the flat `rows` of a [B, T, H] view. Ascending rows that number B * T are every row in order, so a view
    of it; rows in another order (a DPO pair's chosen, then its rejected) are gathered."""
    B, T, H = x.shape
    if ascending and rows.numel() == B * T:
        return x.reshape(B * T, H)
    return x[rows // T, rows % T]


def _fast_mm(a: torch.Tensor, b: torch.Tensor) -> bool:
    return _MM_OUT_DTYPE and a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as float32, accumulated in fp32 and rounded once."""
    if _fast_mm(a, b):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for an fp32 acc, without rounding a @ b to the operands' dtype first."""
    if _fast_mm(a, b):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _vocab_chunk(V: int, budget: int, bytes_per_column: int, multiple: int) -> int:
    """Columns per vocabulary chunk: within budget, a multiple of `multiple` (at least one), at most V."""
    columns = budget // max(1, bytes_per_column) // multiple * multiple
    return min(V, max(multiple, columns))


# ---------------------------------------------------------------------------------------------- torch path


def _torch_chain_(a: torch.Tensor, bias: torch.Tensor | None, head: _Head) -> torch.Tensor:
    """a -> z = softcap * tanh(logit_scale * (a + bias) / softcap) / temperature, in place."""
    if bias is not None:
        a += bias.float()
    if head.logit_scale != 1.0:
        a *= head.logit_scale
    if head.softcap is not None:
        a.div_(head.softcap).tanh_().mul_(head.softcap)
    if head.temperature != 1.0:
        a /= head.temperature
    return a


def _row_blocks(rows: int, V: int) -> list[tuple[int, int]]:
    step = max(1, _TORCH_BLOCK_ELEMENTS // V)
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _torch_stats(a, bias, labels, head: _Head, outputs: Outputs):
    """The contract of `fastalign.kernels.fused_linear_loss.logits_stats` in torch ops, over every column at once:
    a [rows, V] fp32 raw logits becomes log p in place (one fused log_softmax; labels in [0, V))."""
    z = _torch_chain_(a, bias, head)
    z_label = z.gather(1, labels[:, None]).squeeze(1)
    # The mean of z before z becomes log p: mean(log p) + lse cancels to 1e-5 of |z| (fp32 rounding of lse).
    mean = z.mean(1) if outputs.mean_logits else None
    torch.ops.aten._log_softmax.out(z, 1, False, out=z)  # row by row: safe in place
    logp = z
    lse = z_label - logp.gather(1, labels[:, None]).squeeze(1)
    entropy = argmax = log_sum_sq = None
    blocks = _row_blocks(*a.shape)
    if outputs.entropy:
        entropy = torch.cat([-(logp[r0:r1].exp() * logp[r0:r1]).sum(1) for r0, r1 in blocks])
    if outputs.argmax:
        argmax = logp.argmax(1)  # the first maximum of z, as torch.argmax
    if outputs.log_sum_sq_probs:
        log_sum_sq = torch.cat([torch.logsumexp(2 * logp[r0:r1], 1) for r0, r1 in blocks])
    return lse, z_label, entropy, argmax, log_sum_sq, mean


def _torch_logits(h32, weight, bias, v0, v1, head: _Head) -> torch.Tensor:
    """z for vocabulary columns [v0, v1) of the fp32 rows h32, as fp32 [M, v1 - v0]."""
    return _torch_chain_(h32 @ weight[v0:v1].float().T, None if bias is None else bias[v0:v1], head)


def _torch_fwd(x, weight, bias, rows, labels, head: _Head, outputs: Outputs):
    """The forward kernel's contract (see `linear_logprobs_fwd`) in fp32 torch ops, a vocabulary chunk at a time.

    Returns (logp, lse, log p, *extras): log p the [M, V] fp32 log-probs of the scored rows when the vocabulary is
    one chunk (kept for the backward), else None."""
    N, V, M = labels.numel(), weight.shape[0], rows.numel()
    dev = x.device
    h32 = _rows_of(x, rows, ascending=True).float()
    lab = labels[rows]
    chunk = _vocab_chunk(V, head.memory_budget, 4 * (3 * M + x.shape[2]), 64)
    if chunk == V and M:
        kept = h32 @ weight.float().T
        lse, z_label, *per_row = _torch_stats(kept, bias, lab.clamp(0, V - 1), head, outputs)
    else:
        kept, (lse, z_label, *per_row) = None, _torch_online_stats(h32, weight, bias, lab, chunk, head, outputs)
    logp = torch.zeros(N, device=dev)
    logp[rows] = torch.where(lab == head.ignore_index, 0.0, z_label - lse)
    extras = [
        torch.zeros(N, device=dev, dtype=value.dtype).index_copy_(0, rows, value) if wanted else None
        for value, wanted in zip(per_row, outputs)
    ]
    return logp, lse, kept, *extras


def _torch_online_stats(h32, weight, bias, lab, chunk: int, head: _Head, outputs: Outputs):
    """`_torch_stats`'s values folded over vocabulary chunks with online log-sum-exp (extras not asked for in
    `outputs` are placeholders)."""
    M, V, dev = h32.shape[0], weight.shape[0], h32.device
    m = torch.full((M,), float("-inf"), device=dev)
    s = torch.zeros(M, device=dev)
    t = torch.zeros(M, device=dev)
    q = torch.zeros(M, device=dev)
    z_sum = torch.zeros(M, device=dev)
    best = torch.zeros(M, device=dev, dtype=torch.int64)
    z_label = torch.zeros(M, device=dev)
    for v0 in range(0, V, chunk):
        z = _torch_logits(h32, weight, bias, v0, min(V, v0 + chunk), head)
        z_max, i_max = z.max(1)
        m_new = torch.maximum(m, z_max)
        alpha = torch.exp(m - m_new)  # 0 on the first chunk, where m = -inf
        e = torch.exp(z - m_new[:, None])
        s = s * alpha + e.sum(1)
        if outputs.entropy:
            t = t * alpha + (e * z).sum(1)
        if outputs.log_sum_sq_probs:
            q = q * alpha.square() + e.square().sum(1)
        if outputs.mean_logits:
            z_sum += z.sum(1)
        if outputs.argmax:
            best = torch.where(z_max > m, i_max + v0, best)  # strict >: the first maximum, as torch.argmax
        local = lab - v0
        here = (local >= 0) & (local < z.shape[1])
        z_label = torch.where(here, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), z_label)
        m = m_new
    lse = m + torch.log(s)
    # sum_v p_v^2 = sum_v exp(2 (z_v - m)) / (sum_v exp(z_v - m))^2
    return lse, z_label, lse - t / s, best, q.log() - 2 * s.log(), z_sum / V


def _torch_dlogits(h32, weight, bias, lab, lse, g, entropy, gh, da, v0, head: _Head, logp=None) -> None:
    """The backward kernel's contract in fp32 torch ops: d a for columns [v0, v0 + da.shape[1]) into da, from those
    columns' log-probs when the forward kept them (from recomputed logits z otherwise)."""
    z = None
    if logp is None:
        z = _torch_logits(h32, weight, bias, v0, v0 + da.shape[1], head)
        logp = torch.sub(z, lse[:, None], out=da)
    elif head.softcap is not None:
        z = logp + lse[:, None]
    # d logp / dz = onehot - p;  d H / dz = -p * (log p + H)
    if gh is None:
        torch.exp(logp, out=da).mul_(-g[:, None])
    else:
        p = logp.exp()
        torch.mul(logp, gh[:, None], out=da).add_((g + gh * entropy)[:, None]).mul_(p).neg_()
    _add_at_labels(da, lab, v0, g)
    if head.softcap is not None:
        da *= _dz_da_at(z, head)
    elif head.logit_scale != head.temperature:
        da *= head.logit_scale / head.temperature


# ---------------------------------------------------------------------------------------------- autograd


class _LinearTokenLogprobs(torch.autograd.Function):
    """(log-probs, entropy, argmax, log_sum_sq_probs, mean_logits) as `linear_token_stats` returns them, then, with
    `with_lse`, the log-sum-exp of z at every scored row (0 at the others), differentiable: a vocab-parallel rank's
    statistics of its slice (`fastalign.vocab_parallel.linear_head_stats`). Its gradient is taken at the rows whose
    label is not ignore_index."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, head: _Head, outputs: Outputs, with_lse: bool = False):
        x = as_btv(hidden)
        flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
        weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        # The kernels read the bias at unit stride: a strided one (big[::2]) is copied, V elements, once per call.
        bias = None if bias is None else bias.contiguous()
        rows = _scored_rows(flat_labels, weight.shape[0], head.ignore_index, any(outputs))
        use_kernels = backend_for(hidden) != "torch"
        with autocast_off(hidden.device):
            if use_kernels:
                args = (head.ignore_index, head.temperature, head.softcap, head.logit_scale)
                logp, lse, *extras = linear_logprobs_fwd(x, weight, bias, rows, flat_labels, *args, outputs)
                kept = None
            else:
                logp, lse, kept, *extras = _torch_fwd(x, weight, bias, rows, flat_labels, head, outputs)

        entropy = extras[0]
        ctx.save_for_backward(hidden, weight, bias, rows, flat_labels, lse, entropy, kept, logp if with_lse else None)
        ctx.head, ctx.use_kernels, ctx.with_lse = head, use_kernels, with_lse
        ctx.set_materialize_grads(False)
        extras = [None if e is None else e.view(labels.shape) for e in extras]
        # Only the log-probs, the entropy and the log-sum-exp are differentiable.
        ctx.mark_non_differentiable(*(e for e in extras[1:] if e is not None))
        if not with_lse:
            return logp.view(labels.shape), *extras
        row_lse = torch.zeros(flat_labels.shape, device=lse.device).index_copy_(0, rows, lse)
        return logp.view(labels.shape), *extras, row_lse.view(labels.shape)

    @staticmethod
    @first_order_only
    def backward(ctx, dlogp, dentropy, *rest):
        """A vocabulary chunk at a time: d a for the chunk (kernel or torch), then the two fp32-accumulating GEMMs."""
        hidden, weight, bias, rows, labels, lse, entropy, kept, logp = ctx.saved_tensors
        head: _Head = ctx.head
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dlse = rest[3] if ctx.with_lse else None  # after the non-differentiable argmax, log_sum_sq, mean
        x = as_btv(hidden)
        with autocast_off(hidden.device):
            B, T, H = x.shape
            V, M, dev = weight.shape[0], rows.numel(), x.device
            lab = labels[rows]
            # Ignored rows (scored only for the extras) get no log-prob gradient.
            ignored = lab == head.ignore_index
            g = torch.zeros(M, device=dev) if dlogp is None else dlogp.reshape(-1)[rows].float()
            g = torch.where(ignored, 0.0, g)
            gh = None if dentropy is None else dentropy.reshape(-1)[rows].float()
            ent = None if gh is None else entropy[rows]
            label_term = None
            if dlse is not None:
                # d lse / dz = p = onehot - (onehot - p): the log-prob gradient's form, taken with g - g_lse, plus
                # g_lse * dz/da at the label column of each chunk (`_add_at_labels`): O(rows) work, and the backward
                # kernels keep their signature (their entropy variants sit at sm_80's register limit, see _TILES).
                g_lse = torch.where(ignored, 0.0, dlse.reshape(-1)[rows].float())
                g = g - g_lse
                label_term = g_lse * _dz_da_at(logp.reshape(-1)[rows] + lse, head)

            h_rows = _rows_of(x, rows, ascending=True)
            if ctx.use_kernels:
                da_dtype, multiple = x.dtype, bwd_chunk_multiple(x.dtype)
                fp32_copies = 0 if _fast_mm(h_rows, weight) else M + H  # the operands' fp32 upcasts, a chunk at a time
                bytes_per_column = M * x.element_size() + 4 * (H + fp32_copies)
            else:
                h_rows = h_rows.float()
                da_dtype, multiple = torch.float32, 64
                bytes_per_column = 4 * (4 * M + 2 * H)
            chunk = _vocab_chunk(V, head.memory_budget, bytes_per_column, multiple)

            dh32 = torch.zeros(M, H, device=dev, dtype=torch.float32) if need_h else None
            dw = torch.empty(weight.shape, device=dev, dtype=weight.dtype) if need_w else None
            db = torch.empty(V, device=dev, dtype=torch.float32) if need_b else None
            da_buffer = torch.empty(M, chunk, device=dev, dtype=da_dtype)
            g, lse = g.contiguous(), lse.contiguous()
            for v0 in range(0, V, chunk):
                v1 = min(V, v0 + chunk)
                da = da_buffer[:, : v1 - v0]
                if ctx.use_kernels:
                    args = (head.ignore_index, head.temperature, head.softcap, head.logit_scale)
                    linear_logprobs_bwd(x, weight, bias, rows, labels, lse, g, ent, gh, da, v0, *args)
                else:
                    logp_kept = None if kept is None else kept[:, v0:v1]
                    _torch_dlogits(h_rows, weight, bias, lab, lse, g, ent, gh, da, v0, head, logp_kept)
                if label_term is not None:
                    _add_at_labels(da, lab, v0, label_term)
                if need_h:
                    _addmm_fp32(dh32, da, weight[v0:v1])
                if need_w and dw.dtype == da.dtype == h_rows.dtype == torch.float32:
                    torch.mm(da.T, h_rows, out=dw[v0:v1])  # no [chunk, H] temporary to copy
                elif need_w:
                    dw[v0:v1] = _mm_fp32(da.T, h_rows)
                if need_b:
                    db[v0:v1] = da.sum(0, dtype=torch.float32)

            dh = None
            if need_h:
                if M == B * T:  # every row, in order
                    dh = dh32.to(x.dtype).view(hidden.shape)
                else:
                    dh = torch.zeros(B * T, H, device=dev, dtype=x.dtype)
                    dh[rows] = dh32.to(x.dtype)
                    dh = dh.view(hidden.shape)
            return dh, dw, None if db is None else db.to(bias.dtype), None, None, None, None


def _dz_da_at(z: torch.Tensor, head: _Head) -> torch.Tensor:
    """dz/da at logits z (fp32): logit_scale / temperature * (1 - tanh^2), tanh = z * temperature / softcap."""
    scale = head.logit_scale / head.temperature
    if head.softcap is None:
        return torch.full_like(z, scale)
    return (z * (head.temperature / head.softcap)).square_().neg_().add_(1).mul_(scale)


def _add_at_labels(da: torch.Tensor, labels: torch.Tensor, v0: int, values: torch.Tensor) -> None:
    """da[m, labels[m] - v0] += values[m] where the label lies in the chunk's columns [v0, v0 + da.shape[1])."""
    local = labels - v0
    here = (local >= 0) & (local < da.shape[1])
    rows = torch.arange(da.shape[0], device=da.device)
    column = torch.where(here, local, 0)
    da[rows, column] = (da[rows, column].float() + torch.where(here, values, 0.0)).to(da.dtype)


# ---------------------------------------------------------------------------------------------- public API


def _gathered(t: torch.Tensor | None) -> torch.Tensor | None:
    """The full tensor of an FSDP2 / DTensor parameter, gathered once; other tensors as they are.

    Each rank's gradient of the full weight is a partial sum over its own tokens: it flows back as
    Partial, so DTensor reduce-scatters it, averaged over the ranks as FSDP2 averages its gradients.
    """
    try:
        from torch.distributed.tensor import DTensor, Partial
    except ImportError:  # torch without distributed
        return t
    if not isinstance(t, DTensor):
        return t
    full = t.full_tensor(grad_placements=[Partial()] * t.device_mesh.ndim)
    return _ScaleGrad.apply(full, 1.0 / t.device_mesh.size())


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def check_head_options(ignore_index, temperature, softcap, logit_scale, memory_budget) -> dict:
    """The logit options every fused-linear entry point takes (the loss modules check them at construction), as
    Python ints and floats (the head_args of the entry points)."""
    if memory_budget is not None:
        memory_budget = check_int("memory_budget", memory_budget, "a positive int (bytes) or None")
        if memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive int (bytes) or None; got {memory_budget!r}")
    return {
        "ignore_index": check_ignore_index(ignore_index),
        "temperature": check_positive("temperature", temperature),
        "softcap": None if softcap is None else check_positive("softcap", softcap),
        "logit_scale": check_positive("logit_scale", logit_scale),
        "memory_budget": memory_budget,
    }


def _check_head_args(hidden, weight, labels, bias, **head_args) -> dict:
    """Checks the arguments of a fused-linear entry point; returns the checked head_args."""
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have shape [..., H] with H > 0; got {tuple(hidden.shape)}")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != H:
        raise ValueError(f"weight must have shape [V, H] = [V, {H}] with V > 0; got {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on hidden's device ({hidden.device}); got {weight.device}")
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},); got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias must be on hidden's device ({hidden.device}); got {bias.device}")
    check_labels("labels", labels, hidden.shape[:-1], hidden.device, "hidden.shape[:-1]", "hidden")
    return check_head_options(**head_args)


def _prepare(hidden, weight, labels, bias, ignore_index, temperature, softcap, logit_scale, memory_budget):
    """What every fused-linear entry point does first: gathers an FSDP2 weight and bias, checks the arguments, and
    casts weight and bias to hidden's dtype (or the autocast dtype). Returns (hidden, weight, bias, head).
    A vocab-parallel weight (fastalign.vocab_parallel) stays sharded."""
    if vocab_shard(weight) is None:
        weight, bias = _gathered(weight), _gathered(bias)
    head_args = _check_head_args(
        hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
        logit_scale=logit_scale, memory_budget=memory_budget,
    )  # fmt: skip
    device_type = hidden.device.type
    # Meta tensors (shape inference) have no autocast state: torch raises on the query.
    autocast = device_type != "meta" and torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if head_args["memory_budget"] is None:
        head_args["memory_budget"] = DEFAULT_MEMORY_BUDGET
    return hidden, weight, bias, _Head(**head_args)


@eager_under_compile
def linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    entropy: bool = True,
    argmax: bool = True,
    log_sum_sq_probs: bool = False,
    mean_logits: bool = False,
    memory_budget: int | None = None,
) -> TokenStats:
    """Per-token log-probs of `labels` under the lm_head `weight`, plus entropy and argmax, without the logits.

    The logits are z = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap) / temperature (Gemma's
    final softcap when `softcap` is given; Cohere/Granite-style scaling with `logit_scale`).

    Args:
        hidden: [..., H] float32, bfloat16 or float16; any strides (a shifted `hidden[:, :-1]` is read in place).
        weight: [V, H] (the lm_head, or the tied input embedding); a DTensor (FSDP2) is gathered once per call,
            except a vocab-parallel one (Shard(0) on the mesh dim "tp", see fastalign.vocab_parallel): each rank then
            computes its vocabulary slice and only per-row statistics cross the group.
        labels: [...] int64 aligned with hidden (the caller shifts), each in [0, V) or ignore_index.
        bias: optional [V].
        ignore_index: label whose log-prob is 0.0 and whose gradient is 0 (default -100).
        temperature, logit_scale: > 0 (defaults 1.0); softcap: > 0 or None (default None).
        entropy: return the entropy of softmax(z) at every position; differentiable (default True).
        argmax: return the greedy token at every position (default True).
        log_sum_sq_probs: return log(sum_v p_v^2) of softmax(z) at every position (default False).
        mean_logits: return mean_v z at every position (default False).
        memory_budget: bytes for the backward's vocabulary chunk, the only logits-sized buffer of a call
            (default DEFAULT_MEMORY_BUDGET, 256 MiB; a chunk holds at least one vocabulary tile). Besides it, the
            backward holds an fp32 accumulator for d hidden (4 bytes per scored row and hidden unit). On the torch
            path, when the fp32 logits of the scored rows fit one forward chunk, their log-probs stay until the
            backward.

    Weight and bias are computed in hidden's dtype, or in the autocast dtype inside torch.autocast (cast like
    F.linear does); gradients reach hidden, weight and bias. Only rows whose label is not ignore_index cost work,
    unless an extra is asked for (extras are returned at every position). A label outside [0, V) raises
    ValueError: counting the scored rows syncs with the device once per call anyway.

    Returns:
        TokenStats(logprobs, entropy, argmax, log_sum_sq_probs, mean_logits), each shaped like `labels`, None when
        not asked for; float32 but argmax (int64). All come from the forward's one pass over the vocabulary; the
        last two are not differentiable (TRL's fused head defines the same outputs).
    """
    hidden, weight, bias, head = _prepare(
        hidden, weight, labels, bias, ignore_index, temperature, softcap, logit_scale, memory_budget
    )
    outputs = Outputs(entropy, argmax, log_sum_sq_probs, mean_logits)
    for name, value in outputs._asdict().items():
        check_flag(name, value)
    shard = vocab_shard(weight)
    if shard is not None:

        def local_stats(hidden, weight, labels, bias, outputs):
            return _LinearTokenLogprobs.apply(hidden, weight, bias, labels, head, outputs, True)

        return TokenStats(*linear_head_stats(hidden, weight, labels, bias, head, outputs, shard, local_stats))
    return TokenStats(*_LinearTokenLogprobs.apply(hidden, weight, bias, labels, head, outputs))


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """float32 log-probs [...] of `labels` from hidden [..., H] and weight [V, H], 0.0 where ignored.

    `linear_token_stats` without the extras: see it for the arguments.
    """
    return linear_token_stats(
        hidden,
        weight,
        labels,
        bias,
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        logit_scale=logit_scale,
        entropy=False,
        argmax=False,
        memory_budget=memory_budget,
    ).logprobs
