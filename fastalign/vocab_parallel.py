"""Vocab-parallel (tensor-parallel) log-probs: each rank of a tensor-parallel group holds a slice of the vocabulary.

A rank computes its slice's per-row statistics with the ordinary single-device op, and only those cross the
group: one all-gather of a few floats per row (log-sum-exp, the label's log-prob and owner, and the entropy,
argmax and extras when asked for, and the label itself, which every rank checks is the same on all), never
logits-sized or weight-sized tensors. With lse_r the log-sum-exp of rank r's slice and w_r = exp(lse_r - lse):

    lse = logsumexp_r lse_r            log p = the owning rank's (log p_r + lse_r - lse), exact where p is near 1
    entropy = lse - sum_r w_r (lse_r - entropy_r)                          argmax = the best of the ranks' argmaxes
    log sum_v p_v^2 = logsumexp_r (2 (lse_r - lse) + log sum_v p_rv^2)     mean logit = sum of logits / V

Autograd flows through the combination: d lse / d lse_r = w_r, so a rank's gradient of its slice's logits is its
softmax times w_r, exactly the unsharded gradient restricted to the slice. The loss is replicated over the group
(every rank computes the same combination), so the all-gather's backward hands each rank its own slice of the
gradient without communicating, as Megatron's vocab-parallel cross-entropy does.

For the fused linear head (`linear_head_stats`): the lm_head weight is a DTensor sharded on the vocabulary dim,
Shard(0) of [V, H], on the mesh dimension named "tp" (ColwiseParallel on lm_head), replicated on any other mesh
dimension. hidden must be the same on every rank of the group (the replicated input of ColwiseParallel). The weight
is never gathered; its gradient is a DTensor with the weight's placements; d hidden is all-reduced over the group
(standard tensor parallelism, rows x H). A DTensor weight on meshes without a "tp" dimension (FSDP2, HSDP) is not
vocab-parallel: `fastalign.linear_logprobs` gathers it as before.

The fused losses' fast strategy (`fastalign.linear_losses`) calls `combine_vocab_stats` once per chunk of rows
inside its forward, with `local_operands` and `VocabShard.widest` sizing the chunks alike on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

TP_DIM = "tp"
"""The name of the mesh dimension a vocab-parallel weight is sharded on (torch's, torchtitan's and accelerate's)."""


# ---------------------------------------------------------------------------------------------- combine


class _AllGatherReplicated(torch.autograd.Function):
    """[k, N] per rank -> [ranks, k, N] on every rank. The backward hands each rank its own slice of the gradient:
    exact when everything downstream is replicated over the group, the vocab-parallel contract."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.rank = dist.get_rank(group)
        if dist.get_world_size(group) == 1:  # TP = 1: a collective through the backend would be pure overhead
            return x.unsqueeze(0).clone()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group (a replicated input read by every rank's
    slice of the vocabulary, as the input of a column-parallel linear layer)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if dist.get_world_size(ctx.group) == 1:
            return grad, None
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


@dataclass(frozen=True)
class VocabStats:
    """Per-row statistics over the whole vocabulary, float32 [N] (argmax int64); None where not asked for."""

    lse: torch.Tensor
    logprob: torch.Tensor
    entropy: torch.Tensor | None = None
    argmax: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    logit_sum: torch.Tensor | None = None
    labels_differ: torch.Tensor | None = None  # 0-d bool, on the device: for `check_same_rows`


ROWS_DIFFER = (
    "labels differ across the tensor-parallel group: a vocab-parallel head needs the same rows (hidden states and "
    "labels) on every rank of the group, as ColwiseParallel's replicated input (e.g. give every rank the same batch, "
    "and the same sampled completions)"
)


def check_same_rows(labels_differ: list[torch.Tensor]) -> None:
    """Raises ValueError if any of `combine_vocab_stats`'s labels_differ flags is set (the same verdict on every
    rank). The check's one host sync is the caller's, so that a loop of combinations (the fast losses' chunks) pays
    it once, after its work is queued."""
    if labels_differ and bool(torch.stack(labels_differ).any()):
        raise ValueError(ROWS_DIFFER)


def combine_vocab_stats(
    group: dist.ProcessGroup,
    lse: torch.Tensor,
    logprob: torch.Tensor,
    owned: torch.Tensor,
    *,
    labels: torch.Tensor,
    entropy: torch.Tensor | None = None,
    argmax_logit: torch.Tensor | None = None,
    argmax_index: torch.Tensor | None = None,
    log_sum_sq_probs: torch.Tensor | None = None,
    logit_sum: torch.Tensor | None = None,
) -> VocabStats:
    """Combines each rank's statistics of its vocabulary slice into those of the whole vocabulary, over `group`.
    The one implementation of the combination: the vocab-parallel head (`linear_head_stats`, with autograd) and
    Shard(-1) DTensor logits (`fastalign.logprobs`, inside its autograd.Function, whose backward reads the results)
    both call it.

    Args (per rank, each [N] over the same N rows on every rank):
        group: the tensor-parallel process group; the slices are ordered by rank (rank 0 holds the first tokens).
        lse: log-sum-exp of the slice's logits; differentiable.
        logprob: the label's log-prob under the slice's softmax on the rank whose slice holds the label, 0 on the
            others (a NaN there stays NaN); differentiable. The whole vocabulary's is the owner's
            logprob + (lse_r - lse), exact where p is near 1 (label logit - lse would cancel there).
        owned: bool, whether this rank's slice holds the row's label (False for ignored rows everywhere).
        labels: int64, the rows' labels as the caller got them (global vocabulary ids or the ignore index). They
            must be the same on every rank: the group shares its rows, and a rank scoring other tokens (its own
            sampled completions, say) would mix their statistics into a silently wrong answer. They travel with the
            statistics; the result's labels_differ says whether they differed, and `check_same_rows` raises.
        entropy: entropy of the softmax over the slice; differentiable. Optional.
        argmax_logit, argmax_index: the slice's largest logit and its global vocabulary index (the first maximum);
            together or not at all. NaN counts as -inf (the kernels' max skips NaN). Not differentiable.
        log_sum_sq_probs: log sum_v p_v^2 of the softmax over the slice. Not differentiable. Optional.
        logit_sum: sum of the slice's logits. Not differentiable. Optional.

    Returns the VocabStats of the whole vocabulary (float32; argmax int64, the first maximum as torch.argmax),
    the same on every rank: the gradients of lse, logprob and entropy reach the per-rank inputs. Works under
    no_grad as well. Communication: one all-gather of float64 [k, N] per rank, with k <= 9 the number of
    statistics given and the labels.
    """
    if (argmax_logit is None) != (argmax_index is None):
        raise ValueError("argmax_logit and argmax_index go together: give both or neither")
    if argmax_logit is not None:
        argmax_logit = argmax_logit.detach().nan_to_num(nan=float("-inf"))
    given = {
        "lse": lse,
        "logprob": logprob,
        "owned": owned.detach(),
        "labels": labels.detach(),
        "entropy": entropy,
        "argmax_logit": argmax_logit,
        "argmax_index": None if argmax_index is None else argmax_index.detach(),
        "log_sum_sq_probs": log_sum_sq_probs,
        "logit_sum": logit_sum,
    }
    names = [name for name, value in given.items() if value is not None]
    # float64 carries vocabulary indices exactly and keeps the combination's rounding below fp32's.
    parts = torch.stack([given[name].double() for name in names])
    gathered = dict(zip(names, _AllGatherReplicated.apply(parts, group).unbind(1)))  # [ranks, N] each

    lse_r = gathered["lse"]
    total = torch.logsumexp(lse_r, 0)
    share = lse_r - total  # log w_r, each slice's share of the mass; -inf for a slice of -inf logits only
    alive = share > float("-inf")
    logprob_r = gathered["logprob"]
    # Rows no rank owns (ignored) sum the zeros they were given, whatever their lse_r (-inf where a pass skipped).
    out = {"lse": total, "logprob": torch.where(gathered["owned"].bool(), logprob_r + share, logprob_r).sum(0)}
    if entropy is not None:
        # Masked inside the product: 0 * -inf would be NaN, in the forward and in the backward alike.
        out["entropy"] = total - (share.exp() * torch.where(alive, lse_r - gathered["entropy"], 0.0)).sum(0)
    with torch.no_grad():
        if argmax_logit is not None:
            best = gathered["argmax_logit"].argmax(0, keepdim=True)  # first maximum: the lowest rank, lowest index
            out["argmax"] = gathered["argmax_index"].gather(0, best).squeeze(0).to(torch.int64)
        if log_sum_sq_probs is not None:
            terms = torch.where(alive, 2 * share + gathered["log_sum_sq_probs"], float("-inf"))
            out["log_sum_sq_probs"] = torch.logsumexp(terms, 0)
        if logit_sum is not None:
            out["logit_sum"] = gathered["logit_sum"].sum(0)
    stats = {name: value if name == "argmax" else value.float() for name, value in out.items()}
    return VocabStats(**stats, labels_differ=(gathered["labels"] != gathered["labels"][:1]).any())


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's slice of a vocab-parallel weight lies: rows [start, start + size) of V, over `group`."""

    group: dist.ProcessGroup
    start: int
    size: int
    vocab: int

    @property
    def widest(self) -> int:
        """The largest slice of the group, ceil(V / ranks): the same on every rank, so sizes derived from it (the
        fast losses' chunks) give every rank the same sequence of collectives."""
        return -(-self.vocab // dist.get_world_size(self.group))


def vocab_shard(weight: torch.Tensor, name: str = "weight") -> VocabShard | None:
    """The VocabShard of a vocab-parallel weight (a DTensor, Shard(0) on the mesh dim named "tp", replicated on
    the others); None for any other tensor, including DTensors replicated on "tp" or on meshes without a "tp" dim
    (FSDP2 / HSDP weights, which the callers gather). Raises ValueError for a "tp" layout that cannot be
    vocab-parallel."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # torch without distributed
        return None
    if not isinstance(weight, DTensor):
        return None
    mesh = weight.device_mesh
    dim_names = mesh.mesh_dim_names or ()
    if TP_DIM not in dim_names:
        return None
    tp = dim_names.index(TP_DIM)
    placements = weight.placements
    if isinstance(placements[tp], Replicate):  # e.g. accelerate's mesh with TP off: FSDP's, gathered by the caller
        return None
    if not (isinstance(placements[tp], Shard) and placements[tp].dim == 0 and type(placements[tp]) is Shard):
        raise ValueError(
            f"{name} is a DTensor on the mesh dim {TP_DIM!r} with placement {placements[tp]}; a vocab-parallel head "
            f"needs Shard(0) of [V, H] there (ColwiseParallel on lm_head), e.g. not RowwiseParallel's Shard(1)"
        )
    others = [f"{dim_names[i]}: {p}" for i, p in enumerate(placements) if i != tp and not isinstance(p, Replicate)]
    if others:
        raise ValueError(
            f"{name} is vocab-parallel on the mesh dim {TP_DIM!r} and must be replicated on the others; got "
            f"{', '.join(others)} (call the head where FSDP has unsharded it, e.g. inside the model's forward)"
        )
    vocab, ranks, rank = weight.shape[0], mesh.size(tp), mesh.get_local_rank(tp)
    # DTensor splits Shard(0) as torch.chunk: ceil(V / ranks) rows per rank, the last ones shorter or empty.
    per_rank = -(-vocab // ranks)
    start = min(vocab, rank * per_rank)
    size = min(per_rank, vocab - start)
    # Decided from the global shape alone, so every rank raises (a rank that went on would wait for the others).
    if vocab <= (ranks - 1) * per_rank:
        raise ValueError(
            f"{name} has V={vocab} rows over {ranks} ranks of {TP_DIM!r}, split as torch.chunk splits it: the last "
            f"rank's slice is empty; a vocab-parallel head needs a non-empty slice on every rank"
        )
    if weight.to_local().shape[0] != size:
        raise ValueError(f"{name}'s local slice has {weight.to_local().shape[0]} rows; Shard(0) gives {size}")
    return VocabShard(mesh.get_group(tp), start, size, vocab)


def local_operands(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shard: VocabShard):
    """(hidden, weight, bias) of this rank as plain tensors: hidden replicated over the group (a DTensor must be
    Replicate everywhere), the weight's and bias's local slices (their `to_local` backward makes the gradients
    DTensors with the weight's placements)."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(hidden, DTensor):
        if not all(isinstance(p, Replicate) for p in hidden.placements):
            raise ValueError(f"hidden must be replicated over the tensor-parallel group; got {hidden.placements}")
        hidden = hidden.to_local()
    return hidden, weight.to_local(), _local_bias(bias, shard)


def _local_bias(bias: torch.Tensor | None, shard: VocabShard) -> torch.Tensor | None:
    """This rank's slice of the bias, a DTensor sharded as the weight (ColwiseParallel shards both). A full [V]
    bias is refused: each rank would hold only its slice's part of that tensor's gradient."""
    if bias is None:
        return None
    bias_shard = vocab_shard(bias, "bias")
    if bias_shard is None or (bias_shard.start, bias_shard.size) != (shard.start, shard.size):
        raise ValueError(
            f"bias must be a DTensor sharded as the vocab-parallel weight (Shard(0) on the mesh dim {TP_DIM!r}, as "
            f"ColwiseParallel shards it); got {type(bias).__name__}"
        )
    return bias.to_local()


# ---------------------------------------------------------------------------------------------- linear head


_ROW_BLOCK = 4096  # rows per block of `row_logits`: its temporaries stay 2 x 4096 x H floats


@torch.no_grad()
def row_logits(hidden, weight, bias, index, head) -> torch.Tensor:
    """fp32 [N] logits z[n, index[n]] of the rows of hidden [..., H] (N rows) under weight [V_r, H] and bias [V_r]
    (the head's transform), accumulated in fp32; no gradient."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    a = torch.empty(rows.shape[0], device=rows.device)
    for r0 in range(0, rows.shape[0], _ROW_BLOCK):
        r1 = r0 + _ROW_BLOCK
        a[r0:r1] = (rows[r0:r1].float() * weight[index[r0:r1]].float()).sum(-1)
    if bias is not None:
        a += bias[index].float()
    a *= head.logit_scale
    z = a if head.softcap is None else head.softcap * torch.tanh(a / head.softcap)
    return z / head.temperature


def linear_head_stats(hidden, weight, labels, bias, head, outputs, shard: VocabShard, local_stats):
    """(log-probs, entropy, argmax, log_sum_sq_probs, mean_logits) of the vocab-parallel head, as the single-device
    op returns them (each [...] like labels, None when not asked for in `outputs`).

    hidden [..., H] replicated over the group (a DTensor must be Replicate everywhere); weight the vocab-parallel
    DTensor of `shard`; labels [...] in [0, V) or head.ignore_index; bias None or a DTensor sharded as the weight;
    head the single-device op's options. local_stats(hidden, weight, labels, bias, outputs) is the single-device op
    run on this rank's slice: (log-probs, entropy, argmax, log_sum_sq_probs, mean_logits, log-sum-exp), the
    log-sum-exp of every scored row differentiable (d lse / d logits = the slice's softmax)."""
    hidden, w_local, b_local = local_operands(hidden, weight, bias, shard)
    if shard.size == shard.vocab:
        # A one-rank group (TP = 1): the slice is the whole vocabulary, whose statistics need no combining.
        return local_stats(hidden, w_local, labels, b_local, outputs)[:5]
    flat = labels.reshape(-1).to(torch.int64)
    valid = flat != head.ignore_index
    bad = valid & ((flat < 0) | (flat >= shard.vocab))
    if bad.any():
        from fastalign._backend import label_range_error

        raise label_range_error("labels", flat, bad, shard.vocab, head.ignore_index)

    group = shard.group
    x = _AllReduceGrad.apply(hidden, group)  # each slice's part of d hidden, summed over the group
    local = flat - shard.start
    here = valid & (local >= 0) & (local < shard.size)
    # Every scored row needs this slice's log-sum-exp: a label elsewhere is replaced by token 0 of the slice (its
    # log-prob is not used). Ignored rows stay ignored unless an extra scores every row.
    every_row = any(outputs)
    keep = valid | every_row
    local = torch.where(here, local, torch.where(keep, 0, head.ignore_index)).view(labels.shape)
    logp_r, entropy_r, argmax_r, sq_r, mean_r, lse_r = local_stats(x, w_local, local, b_local, outputs)
    argmax_logit = argmax_index = None
    if argmax_r is not None:
        argmax_logit = row_logits(x, w_local, b_local, argmax_r.reshape(-1), head)
        argmax_index = argmax_r.reshape(-1) + shard.start
    stats = combine_vocab_stats(
        group,
        torch.where(keep, lse_r.reshape(-1), 0.0),
        torch.where(here, logp_r.reshape(-1), 0.0),
        here,
        labels=flat,
        entropy=None if entropy_r is None else entropy_r.reshape(-1),
        argmax_logit=argmax_logit,
        argmax_index=argmax_index,
        log_sum_sq_probs=None if sq_r is None else sq_r.reshape(-1),
        logit_sum=None if mean_r is None else mean_r.reshape(-1) * shard.size,
    )
    check_same_rows([stats.labels_differ])
    logprobs = stats.logprob  # 0 on ignored rows: no rank owns their label
    mean_logits = None if stats.logit_sum is None else stats.logit_sum / shard.vocab
    values = (logprobs, stats.entropy, stats.argmax, stats.log_sum_sq_probs, mean_logits)
    return tuple(None if v is None else v.view(labels.shape) for v in values)
