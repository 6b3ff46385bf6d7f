"""Per-token log-probabilities from logits, with optional entropy and argmax from the same pass."""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastalign._backend import (
    as_btv,
    backend_for,
    check_flag,
    check_float,
    check_ignore_index,
    check_label_range,
    check_labels,
    check_positive,
    eager_under_compile,
    first_order_only,
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
# Torch path: the same math for CPU tensors outside the interpreter, a chunk of rows at a time through one float32
# buffer of about 4 MiB, so every pass after a chunk's first reads the cache rather than memory, and nothing of
# [tokens, vocab] size is allocated. torch's fused (log_)softmax does the exponentials: a standalone exp over the
# chunk costs several times as much on the CPU.

_TORCH_BUFFER_BYTES = 4 * 2**20
# In float32, p = 0 wherever log p < -104, so clamping log p there keeps p * log p an exact 0 (not 0 * -inf).
_LOG_P_FLOOR = -1000.0


def _local_labels(labels, ignore_index, vocab_offset, V):
    """(labels in the shard's coordinates clamped into [0, V), whether the shard holds the label)."""
    local = labels - vocab_offset
    owned = (local >= 0) & (local < V) & (labels != ignore_index)
    return local.clamp(0, V - 1), owned


def _chunk_rows(V: int) -> int:
    return max(1, _TORCH_BUFFER_BYTES // (4 * V))


def _scaled(chunk: torch.Tensor, temperature: float, buf: torch.Tensor) -> torch.Tensor:
    """chunk / temperature as float32: the chunk itself when it already is that, else written into buf."""
    if chunk.dtype == torch.float32 and temperature == 1.0:
        return chunk
    z = buf.view(chunk.shape)
    z.copy_(chunk)  # upcast first: dividing in bf16 would round z
    return z if temperature == 1.0 else z.div_(temperature)


def _torch_fwd(
    x, labels, ignore_index, temperature, return_entropy, return_argmax, return_sum_sq, return_mean, *vocab_shard
):
    """As token_logprobs_fwd, whose optional (vocab_offset, vocab_total) go in vocab_shard: labels are global ids,
    which the CPU range-checks against vocab_total before. lse is None without vocab_shard: only the shards'
    combination and their backward read it, and its two max passes are a fifth of the forward's work."""
    vocab_offset = vocab_shard[0] if vocab_shard else 0
    B, T, V = x.shape
    N = B * T
    logp = torch.empty(N, device=x.device, dtype=torch.float32)
    lse = torch.empty_like(logp) if vocab_shard else None
    entropy = torch.empty_like(logp) if return_entropy else None
    argmax = torch.empty(N, device=x.device, dtype=torch.int64) if return_argmax else None
    log_sum_sq = torch.empty_like(logp) if return_sum_sq else None
    mean = torch.empty_like(logp) if return_mean else None
    rows = min(_chunk_rows(V), max(N, 1))
    buf = torch.empty(rows, V, device=x.device, dtype=torch.float32)
    p_buf = torch.empty_like(buf) if return_entropy or return_sum_sq else None
    for r0, n, index in row_chunks(B, T, rows):
        r1 = r0 + n
        z = _scaled(x[index], temperature, buf[:n])
        if return_argmax:
            top = z.argmax(-1, keepdim=True)
            argmax[r0:r1] = top.view(n)
            nan_rows = z.gather(-1, top).view(n).isnan()  # torch's argmax points at a NaN where a row has one
            if nan_rows.any():  # the kernels' max skips NaN, as compiled Triton's
                zn = z.reshape(n, V)[nan_rows]
                argmax[r0:r1][nan_rows] = zn.masked_fill(zn.isnan(), float("-inf")).argmax(-1)
        if return_mean:
            mean[r0:r1] = z.sum(-1).view(n) / V
        z_max = z.amax(-1).view(n) if lse is not None else None  # before log_softmax, which may overwrite z
        ls = buf[:n]
        torch.log_softmax(z, -1, out=ls.view(z.shape))  # may overwrite z: each row is read before it is written
        lab, owned = _local_labels(labels[r0:r1], ignore_index, vocab_offset, V)
        ls_label = ls.gather(-1, lab.unsqueeze(-1)).squeeze(-1)
        logp[r0:r1] = torch.where(owned, ls_label, 0.0)
        if lse is not None:
            # log_softmax at the maximum is -log(sum exp(z - max)), in [-log V, 0]: lse = max - max(log_softmax) is
            # well conditioned.
            lse[r0:r1] = (z_max - ls.amax(-1)).masked_fill_(z_max == float("-inf"), float("-inf"))  # not -inf - NaN
        if p_buf is not None:
            p = torch.softmax(ls, -1, out=p_buf[:n])  # softmax of log-probs is the probabilities
            # In place and through torch's sum (pairwise: a BLAS dot lost 1e-4 over 128k terms); ls, then p, is spent.
            if return_entropy:
                entropy[r0:r1] = -ls.clamp_(min=_LOG_P_FLOOR).mul_(p).sum(-1)
            if return_sum_sq:
                log_sum_sq[r0:r1] = p.square_().sum(-1).log_()
    return logp, lse, entropy, argmax, log_sum_sq, mean


def _torch_bwd(x, dx, labels, lse, logp, dlogp, entropy, dentropy, ignore_index, temperature, *vocab_shard):
    """d logits = (g (onehot - p) - gh p (log p + H)) / temperature into dx (which may be x): softmax is recomputed by
    torch's fused kernel, faster on the CPU than exp(z - lse). The label's g (1 - p) is g * -expm1(logp): 1 - p
    cancels when p is near 1. A vocabulary shard (vocab_shard = (vocab_offset, vocab_total), as token_logprobs_bwd
    takes them) has p = exp(z - lse) with lse over the whole vocabulary, which its own softmax does not know."""
    vocab_offset = vocab_shard[0] if vocab_shard else 0
    B, T, V = x.shape
    rows = min(_chunk_rows(V), max(B * T, 1))
    buf = torch.empty(rows, V, device=x.device, dtype=torch.float32)
    ls_buf = torch.empty_like(buf) if dentropy is not None or vocab_shard else None
    g_all = torch.where(labels == ignore_index, 0.0, dlogp) / temperature
    for r0, n, index in row_chunks(B, T, rows):
        r1 = r0 + n
        z = _scaled(x[index], temperature, buf[:n])
        column = (*z.shape[:-1], 1)  # one value per row, broadcast over the vocabulary
        g = g_all[r0:r1].view(column)
        # A float32 gradient is written in place; a bf16/fp16 one goes through the buffer, rounded once at the end.
        dz = dx[index] if dx.dtype == torch.float32 else buf[:n].view(z.shape)
        if vocab_shard:
            log_p = torch.sub(z, lse[r0:r1].view(column), out=ls_buf[:n].view(z.shape))
            p = torch.exp(log_p, out=dz)
        elif dentropy is None:
            p = torch.softmax(z, -1, out=dz)
        else:
            log_p = torch.log_softmax(z, -1, out=ls_buf[:n].view(z.shape))
            p = torch.softmax(z, -1, out=dz)
        if dentropy is None:
            p.mul_(-g)
            # An ignored row's gradient is 0 even where its softmax is NaN (all -inf logits: a masked-out padding
            # row): 0 * NaN is NaN. Such a row is NaN throughout, so its first column finds it in n reads.
            nan_ignored = (labels[r0:r1] == ignore_index).view(column) & p[..., :1].isnan()
            if nan_ignored.any():
                p.masked_fill_(nan_ignored, 0.0)
        else:
            gh = dentropy[r0:r1].view(column) / temperature
            dz.mul_(log_p.clamp_(min=_LOG_P_FLOOR).add_(entropy[r0:r1].view(column)).mul_(gh).add_(g)).neg_()
        at_label, owned = (t.view(column) for t in _local_labels(labels[r0:r1], ignore_index, vocab_offset, V))
        lp = logp[r0:r1].view(column)
        label_value = torch.special.expm1(lp).mul_(-g)  # g (1 - p), exact where p is near 1
        if dentropy is not None:
            lp = lp.clamp(min=_LOG_P_FLOOR)
            label_value -= lp.exp() * gh * (lp + entropy[r0:r1].view(column))
        dz.scatter_(-1, at_label, torch.where(owned, label_value, dz.gather(-1, at_label)))
        if dz.dtype != dx.dtype:
            dx[index].copy_(dz)  # after the last read of x[index]: dx may be x


# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Vocabulary-parallel logits: a DTensor sharded on its last dim. Each rank runs the ordinary pass over its slice (the
# kernels take the slice's offset: labels stay global ids), then only per-row statistics cross the mesh: one
# all-gather of float64 [k, N], k <= 9, combined by fastalign.vocab_parallel.combine_vocab_stats (the formulas are
# in that module's docstring; the vocab-parallel head uses the same function).
# The backward needs no communication: given the whole vocabulary's lse, log-prob and entropy (saved), each rank
# writes its slice of d logits, and the upstream gradients are the same on every rank (the outputs are replicated).


class _VocabShard(NamedTuple):
    group: torch.distributed.ProcessGroup  # the ranks that share each row, ordered as the slices
    start: int  # global id of this rank's first logit
    vocab: int  # the whole vocabulary


class _LocalSlice(torch.autograd.Function):
    """`dtensor.to_local()` whose gradient is a DTensor with the input's own placements, shape and strides. torch
    2.11's `to_local` derives the gradient's strides from the local slice, which differ from the DTensor's when the
    last dim splits unevenly (V = 1001 over 2 ranks); the leaf's gradient accumulation then copies it into a
    Replicate DTensor: the whole [..., V] gradient all-gathered onto every rank."""

    @staticmethod
    def forward(ctx, dtensor: torch.Tensor) -> torch.Tensor:
        ctx.spec = (dtensor.device_mesh, dtensor.placements, dtensor.shape, dtensor.stride())
        local = dtensor.to_local()
        return local.view_as(local)  # a fresh tensor object: autograd writes its metadata into it

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        mesh, placements, shape, stride = ctx.spec
        return DTensor.from_local(grad, mesh, placements, run_check=False, shape=shape, stride=stride)


def _vocab_shard(logits: torch.Tensor) -> tuple[torch.Tensor, _VocabShard | None]:
    """(this rank's logits, its _VocabShard) for a DTensor sharded on the vocabulary dim; (logits, None) otherwise."""
    if not torch.distributed.is_available():
        return logits, None
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(logits, DTensor):
        return logits, None
    placements, last = logits.placements, logits.dim() - 1
    on_vocab = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim in (-1, last)]
    misplaced = [f"{i}: {p}" for i, p in enumerate(placements) if not isinstance(p, (Shard, Replicate))]
    misplaced += [f"{i}: {placements[i]}" for i in on_vocab if type(placements[i]) is not Shard]
    if len(on_vocab) != 1 or misplaced:
        raise ValueError(
            f"logits is a DTensor with placements {placements}: token_logprobs needs it sharded on the vocabulary "
            f"(Shard(-1)) on exactly one mesh dim and replicated or sharded on a leading dim on the others"
            + (f"; not {', '.join(misplaced)}" if misplaced else "")
        )
    (mesh_dim,) = on_vocab
    mesh, V = logits.device_mesh, logits.shape[-1]
    local = _LocalSlice.apply(logits)
    per_rank = -(-V // mesh.size(mesh_dim))  # DTensor splits as torch.chunk
    start = min(V, mesh.get_local_rank(mesh_dim) * per_rank)
    if local.shape[-1] == 0:
        raise ValueError(f"logits has V={V} over {mesh.size(mesh_dim)} ranks: every rank needs a non-empty slice")
    return local, _VocabShard(mesh.get_group(mesh_dim), start, V)


def _combine_shards(shard, x, labels, ignore_index, temperature, logp, lse, entropy, argmax, log_sum_sq, mean):
    """The whole vocabulary's (logp, lse, entropy, argmax, log_sum_sq, mean) from each rank's over its slice (the
    launchers' outputs, flat [N]), through `fastalign.vocab_parallel.combine_vocab_stats`: the math lives there.
    Every rank returns the same."""
    from fastalign.vocab_parallel import check_same_rows, combine_vocab_stats

    V = x.shape[-1]
    argmax_logit = argmax_index = None
    if argmax is not None:
        rows = torch.arange(labels.numel(), device=x.device)
        argmax_logit = x[rows // x.shape[1], rows % x.shape[1], argmax].float() / temperature
        argmax_index = argmax + shard.start
    stats = combine_vocab_stats(
        shard.group,
        lse,
        logp,  # 0 where this slice does not hold the label (the kernels' convention)
        _local_labels(labels, ignore_index, shard.start, V)[1],
        labels=labels,
        entropy=entropy,
        argmax_logit=argmax_logit,
        argmax_index=argmax_index,
        log_sum_sq_probs=log_sum_sq,
        logit_sum=None if mean is None else mean * V,
    )
    check_same_rows([stats.labels_differ])
    mean = None if stats.logit_sum is None else stats.logit_sum / shard.vocab
    return stats.logprob, stats.lse, stats.entropy, stats.argmax, stats.log_sum_sq_probs, mean


# ---------------------------------------------------------------------------------------------


def _rows_overlap(x: torch.Tensor) -> bool:
    """Whether two rows of x [B, T, V] (unit stride over V) may share memory; conservative: False proves they do
    not (t rows V apart at least, b blocks past the last t row)."""
    B, T, V = x.shape
    stride_b, stride_t, _ = x.stride()
    return (T > 1 and stride_t < V) or (B > 1 and stride_b < (T - 1) * stride_t + V)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, temperature, extras, inplace_backward, shard):
        x = as_btv(logits)
        flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
        use_kernels = backend_for(logits) != "torch"
        fwd = token_logprobs_fwd if use_kernels else _torch_fwd
        vocab_shard = () if shard is None else (shard.start, shard.vocab)
        outputs = fwd(x, flat_labels, ignore_index, temperature, *extras, *vocab_shard)
        if shard is not None:
            outputs = _combine_shards(shard, x, flat_labels, ignore_index, temperature, *outputs)
        logp, lse, entropy, argmax, log_sum_sq, mean = outputs

        ctx.save_for_backward(logits, flat_labels, lse, logp, entropy)
        ctx.vocab_shard = vocab_shard
        ctx.ignore_index, ctx.temperature = ignore_index, temperature
        ctx.inplace_backward, ctx.use_kernels = inplace_backward, use_kernels
        ctx.set_materialize_grads(False)
        logp, entropy, argmax, log_sum_sq, mean = (
            None if t is None else t.view(labels.shape) for t in (logp, entropy, argmax, log_sum_sq, mean)
        )
        ctx.mark_non_differentiable(*(t for t in (argmax, log_sum_sq, mean) if t is not None))
        return logp, entropy, argmax, log_sum_sq, mean

    @staticmethod
    @first_order_only
    def backward(ctx, dlogp, dentropy, *_non_differentiable):
        logits, labels, lse, logp, entropy = ctx.saved_tensors
        x = as_btv(logits)
        # In place: the gradient overwrites the logits buffer, saving a [tokens, vocab] allocation.
        # as_btv returns a view of the caller's storage unless the layout forced a copy.
        # Not over rows that share memory (an expanded [B, 1, V] prior): each would take every row's gradient.
        inplace = ctx.inplace_backward and x.data_ptr() == logits.data_ptr() and not _rows_overlap(x)
        dx = x if inplace else torch.empty(x.shape, device=x.device, dtype=x.dtype)
        dlogp = torch.zeros_like(logp) if dlogp is None else dlogp.reshape(-1).float().contiguous()
        if dentropy is not None:
            dentropy = dentropy.reshape(-1).float().contiguous()
        bwd = token_logprobs_bwd if ctx.use_kernels else _torch_bwd
        bwd(x, dx, labels, lse, logp, dlogp, entropy, dentropy, ctx.ignore_index, ctx.temperature, *ctx.vocab_shard)
        if inplace and ctx.use_kernels:
            # A kernel's write is invisible to autograd: mark it, so that a second backward through this graph
            # (retain_graph) raises as it does on the torch path instead of reading gradients as logits.
            torch.autograd.graph.increment_version(logits)
        dlogits = logits if inplace else dx.view(logits.shape)
        return dlogits, None, None, None, None, None, None


@eager_under_compile
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
        logits: [..., V] float32, bfloat16 or float16; any strides on the leading dims. A DTensor sharded on the
            vocabulary dim (Shard(-1)) on one mesh dim is vocab-parallel: each rank reads only its slice and
            per-row statistics cross that mesh dim; the results are plain tensors of this rank's rows, the same on
            every rank of the mesh dim, and the gradient keeps the logits' placements.
        labels: [...] int64, aligned with the logits (the caller shifts); for DTensor logits, this rank's rows
            (or a DTensor of them), as global vocabulary ids.
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
    vocab = logits.shape[-1]
    logits, shard = _vocab_shard(logits)
    if shard is not None and isinstance(labels, torch.distributed.tensor.DTensor):
        labels = labels.to_local()
    check_labels("labels", labels, logits.shape[:-1], logits.device, "logits.shape[:-1]")
    temperature = check_positive("temperature", temperature)
    ignore_index = check_ignore_index(ignore_index)
    flags = dict(entropy=entropy, argmax=argmax, log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits)
    for name, value in {**flags, "inplace_backward": inplace_backward, "strict": strict}.items():
        check_flag(name, value)
    if strict or logits.device.type == "cpu":
        check_label_range("labels", labels, vocab, ignore_index)
    extras = tuple(flags.values())
    outputs = _TokenLogprobs.apply(logits, labels, ignore_index, temperature, extras, inplace_backward, shard)
    return TokenStats(*outputs)


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
