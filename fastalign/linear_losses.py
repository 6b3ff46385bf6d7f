"""Fused-linear losses: the DPO family, KTO, IFT and token cross-entropy straight from the last hidden states and
the lm_head weight, without the [tokens, vocab] logits, on two strategies.

- lean: the per-token log-probs through `linear_token_stats`, then the loss by autograd. The backward recomputes
  the logits: 8 N H V matmul FLOPs (forward 2, recompute 2, d hidden 2, d weight 2). No [V, H] buffer. Every loss.
- fast: the gradient is computed inside the forward, at 6 N H V (forward 2, d hidden 2, d weight 2). The scored
  rows are cut into chunks of whole units (a DPO pair, a sequence, or a token for cross-entropy: the rows whose
  values the gradient of one row's log-prob depends on). Per chunk: the fp32 logits by one GEMM; per row the
  log-sum-exp and the label's log-prob; the loss's gradient with respect to the chunk's per-token log-probs;
  d logits in place over the chunk; d hidden for the chunk by a GEMM; d weight accumulated in fp32 across chunks
  (the gradient itself for an fp32 weight). The backward only scales the stored gradients by grad_output.
- A vocab-parallel weight (fastalign.vocab_parallel) takes both. On fast, each rank makes its slice's logits of the
  chunk; the per-row statistics (log-sum-exp, the label's log-prob, and the extras the loss reads) are combined
  across the group, O(rows) floats, so the loss and its gradient at the log-probs are the same on every rank; d
  logits is formed on the slice, the chunk's d hidden is summed over the group (rows x H), and d weight stays the
  slice's. One path: a weight that is not vocab-parallel, or whose one-rank group holds the whole vocabulary, takes
  it with no group (no combination, no collective).

The fast path needs the loss to decompose over units: the gradient at one unit's log-probs must not depend on the
log-probs of other units. Then one mechanism serves every loss: the loss (the same function the lean path
differentiates) is evaluated on batch-shaped log-probs whose entries outside the chunk are detached placeholders,
and autograd's gradient is read at the chunk's entries. What each loss relies on:
- DPO: each pair's loss reads the pair's two sums (and lengths, from the labels); "sft" averages over a token
  count that comes from the labels. "aot"/"aot_unpaired" sort the margins across the batch, and "sft" under
  use_weighting (WPO) weighs the batch's NLL by every pair's weight: lean only.
- KTO: each example's loss reads its own sum; the KL estimate is an input, detached (as TRL has it).
- IFT: each sequence's loss reads that sequence's log-probs only.
- Cross-entropy: each token's loss reads its own log-prob (and mean log-prob, for label smoothing); the mean
  divides by a token count from the labels. reduction="none" returns per-token losses whose weights in the
  weight gradient are not known in the forward: lean only.

A unit longer than the memory budget allows (say a DPO pair of 2 x 2048 tokens at V = 128256) is computed a slice
of rows at a time: each row's d log-prob / d logits goes into a buffer in the GEMMs' operand dtype (bf16 for bf16
inputs: half the fp32 logits), and is scaled by the loss's gradient once the unit is complete.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastalign._backend import (
    as_btv,
    autocast_off,
    backend_for,
    check_flag,
    check_float,
    check_labels,
    check_real,
    eager_under_compile,
    first_order_only,
    label_range_error,
)
from fastalign.dpo import (
    check_dpo_options,
    check_kto_options,
    check_paired_batch,
    dpo_loss_from_token_logps,
    kto_loss,
    reference_logps,
    sequence_logps,
)
from fastalign.ift import check_gamma, ift_loss
from fastalign.kernels.fused_linear_loss import logits_grad, logits_stats, padded_bias, padded_width
from fastalign.kernels.linear_logprobs import Outputs
from fastalign.linear_logprobs import (
    _TORCH_BLOCK_ELEMENTS,
    _fast_mm,
    _Head,
    _prepare,
    _row_blocks,
    _rows_of,
    _torch_stats,
    check_head_options,
    linear_token_logprobs,
    linear_token_stats,
)
from fastalign.logprobs import TokenStats
from fastalign.vocab_parallel import (
    ROWS_DIFFER,
    VocabShard,
    check_same_rows,
    combine_vocab_stats,
    local_operands,
    row_logits,
    vocab_shard,
)

STRATEGIES = ("auto", "fast", "lean")
REDUCTIONS = ("mean", "sum", "none")
_NONE = Outputs()  # no per-token extras


# Per-token values a loss may read besides the label log-probs, [R, T] float32 each: log sum_v p_v^2 and mean_v z
# (no gradient, as linear_token_stats returns them), and mean_v log p_v (differentiable: label smoothing; fast only).
TOKEN_EXTRAS = ("log_sum_sq_probs", "mean_logits", "mean_logps")


@dataclass(frozen=True)
class _Objective:
    """A loss of the per-token log-probs, the same function for both strategies.

    loss_of(logps [R, T] float32, extras {name: [R, T]}) -> (scalar loss, metrics, ...), differentiable in logps
    and extras["mean_logps"]. unit: "pair" (rows p and R/2 + p), "sequence" or "token": the rows whose log-probs the
    gradient at one row's log-prob depends on. not_fast: why the loss cannot take the fast path, or None. extras:
    the names of TOKEN_EXTRAS that loss_of reads.
    """

    loss_of: Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple]
    unit: str
    not_fast: str | None = None
    extras: tuple[str, ...] = ()


def check_strategy(strategy: str, not_fast: str | None = None, needs_fast: str | None = None) -> None:
    """strategy against what the loss's options allow: not_fast says why it cannot run fast (it couples the
    examples), needs_fast why it cannot run lean (lean has no mean log-prob)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}; got {strategy!r}")
    if strategy == "fast" and not_fast is not None:
        raise ValueError(f"strategy='fast' needs a loss that decomposes over examples: {not_fast}")
    if needs_fast is not None and (strategy == "lean" or not_fast is not None):
        raise ValueError(
            f"{needs_fast} runs on the fast strategy only (the lean path has no mean log-prob)"
            + (f", which cannot take {not_fast}" if not_fast else f", not strategy={strategy!r}")
        )


def _pop_head(options: dict) -> dict:
    """The logit options and the strategy, taken out of a loss's options (defaults filled in)."""
    head = {"ignore_index": -100, "temperature": 1.0, "softcap": None, "logit_scale": 1.0, "memory_budget": None}
    head.update({name: options.pop(name) for name in list(head) if name in options})
    return {**head, "strategy": options.pop("strategy", "auto")}


def _checked_head(head: dict, not_fast: str | None = None, needs_fast: str | None = None) -> dict:
    """The logit options (head_args) of _pop_head's dict, checked with its strategy, as Python ints and floats."""
    head = dict(head)
    check_strategy(head.pop("strategy"), not_fast, needs_fast)
    return check_head_options(**head)


def _dpo_not_fast(loss_type, use_weighting: bool) -> str | None:
    """Why a DPO loss cannot run fast (it couples the pairs), or None."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if use_weighting and "sft" in types:
        # The batch's NLL is a constant per pair times the pair's weight: its gradient at a pair's tokens is the
        # sum of every pair's weight, which no chunk knows before the last.
        return "use_weighting=True weights the batch-level 'sft' term by every pair's WPO weight"
    coupled = [t for t in types if t in ("aot", "aot_unpaired")]
    return f"loss_type {coupled} sorts the margins across the batch" if coupled else None


def _cross_entropy_not_fast(reduction: str) -> str | None:
    # A per-token loss's weights in the weight gradient are unknown in the forward.
    return "reduction='none'" if reduction == "none" else None


# Each loss's options, checked without a tensor: the function checks them first, its nn.Module at construction.
# Each takes the loss's options, the logit options and the strategy as keywords, and returns the logit options
# (head_args).


def check_dpo_hidden_options(
    *, beta=0.1, loss_type="sigmoid", loss_weights=None, label_smoothing=0.0, return_per_example=False, **options
) -> dict:
    head = _pop_head(options)
    check_dpo_options(beta, loss_type, loss_weights, label_smoothing, **options)
    check_flag("return_per_example", return_per_example)
    return _checked_head(head, _dpo_not_fast(loss_type, options.get("use_weighting", False)))


def check_kto_hidden_options(
    *, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto", return_per_example=False, **options
) -> dict:
    head = _pop_head(options)
    check_kto_options(beta, desirable_weight, undesirable_weight, loss_type, **options)
    check_flag("return_per_example", return_per_example)
    return _checked_head(head)  # every KTO loss type decomposes: the KL is an input


def check_ift_hidden_options(*, gamma=0.95, **options) -> dict:
    head = _pop_head(options)
    check_gamma(gamma)
    if options:
        raise TypeError(f"unexpected keyword arguments {sorted(options)}")
    return _checked_head(head)


def check_cross_entropy_options(
    *, reduction="mean", label_smoothing=0.0, entropy=False, accuracy=False, **options
) -> dict:
    head = _pop_head(options)
    if options:
        raise TypeError(f"unexpected keyword arguments {sorted(options)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}; got {reduction!r}")
    if not 0 <= check_real("label_smoothing", label_smoothing, "a number in [0, 1)") < 1:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")
    check_flag("entropy", entropy)
    check_flag("accuracy", accuracy)
    needs_fast = "label_smoothing > 0" if label_smoothing > 0 else None
    return _checked_head(head, _cross_entropy_not_fast(reduction), needs_fast)


# ---------------------------------------------------------------------------------------------- matmuls


def _logits_into(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> None:
    """out [rows, V] fp32 = h @ weight.T, accumulated in fp32 (bf16/fp16 CPU operands: a vocabulary piece at a
    time, so no fp32 copy of the weight exists)."""
    if _fast_mm(h, weight) or h.dtype == torch.float32:
        kwargs = {"out_dtype": torch.float32} if h.dtype != torch.float32 else {}
        torch.mm(h, weight.T, out=out, **kwargs)
        return
    h32 = h.float()
    for v0, v1 in _pieces(weight.shape[0], h.shape[0] + weight.shape[1]):
        torch.mm(h32, weight[v0:v1].float().T, out=out[:, v0:v1])


def _dlogits_times_weight(d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """d [rows, V] @ weight [V, H] as fp32 [rows, H]."""
    if _fast_mm(d, weight) or (d.dtype == weight.dtype == torch.float32):
        kwargs = {"out_dtype": torch.float32} if d.dtype != torch.float32 else {}
        return torch.mm(d, weight, **kwargs)
    out = torch.zeros(d.shape[0], weight.shape[1], device=d.device)
    for v0, v1 in _pieces(weight.shape[0], d.shape[0] + weight.shape[1]):
        out.addmm_(d[:, v0:v1].float(), weight[v0:v1].float())
    return out


def _accumulate_dweight(acc: torch.Tensor, d: torch.Tensor, h: torch.Tensor, first: bool) -> None:
    """acc [V, H] fp32 += d.T @ h, accumulated in fp32; acc = d.T @ h on the `first` call (acc's contents ignored,
    NaN included: beta = 0)."""
    beta = 0 if first else 1
    if _fast_mm(d, h):
        torch.addmm(acc, d.T, h, out_dtype=torch.float32, beta=beta, out=acc)
    elif d.dtype == h.dtype == torch.float32:
        acc.addmm_(d.T, h, beta=beta)
    else:
        h32 = h.float()
        for v0, v1 in _pieces(acc.shape[0], d.shape[0] + h.shape[1]):
            acc[v0:v1].addmm_(d[:, v0:v1].float().T, h32, beta=beta)


def _pieces(V: int, floats_per_column: int) -> list[tuple[int, int]]:
    """Vocabulary pieces whose fp32 upcasts stay near 16 MB: the CPU path for bf16/fp16 operands."""
    width = max(64, _TORCH_BLOCK_ELEMENTS // max(1, floats_per_column))
    return [(v0, min(V, v0 + width)) for v0 in range(0, V, width)]


# ---------------------------------------------------------------------------------------------- elementwise (torch)
# The torch path works in place on the chunk buffer, which holds the raw logits a, then log p (after `_torch_stats`),
# then d logits (after `_torch_dlogits`): a fresh [rows, V] temporary costs more in page faults than its arithmetic.


def _torch_dlogits(a, labels, lse, coef, coef_mean, head: _Head, vocab: int) -> None:
    """`logits_grad` on the torch path: `a` holds log p (from `_torch_stats`, over the whole vocabulary) and becomes
    d logits in place. labels: -1 where the label is in another rank's slice; vocab: the whole vocabulary's size."""
    scale = head.logit_scale / head.temperature
    for r0, r1 in _row_blocks(*a.shape):
        logp, c = a[r0:r1], coef[r0:r1, None]
        if head.softcap is not None:  # 1 - tanh^2, with tanh = z * temperature / softcap and z = log p + lse
            th = (logp + lse[r0:r1, None]).mul_(head.temperature / head.softcap)
            chain = th.mul_(th).neg_().add_(1).mul_(scale)
        d = logp.exp_()  # p
        if coef_mean is None:
            d *= -c
        else:  # d log p(label) / dz = onehot - p;  d mean_v log p_v / dz = 1 / V - p
            d.mul_(-(c + coef_mean[r0:r1, None])).add_(coef_mean[r0:r1, None] / vocab)
        label = labels[r0:r1, None]
        d.scatter_add_(1, label.clamp(min=0), torch.where(label >= 0, c, 0.0))
        if head.softcap is not None:
            d *= chain
        elif scale != 1.0:
            d *= scale


# ---------------------------------------------------------------------------------------------- fast path


@dataclass(frozen=True)
class _Fast:
    """One fast call's plan: the loss, the head, and which per-token extras to return."""

    objective: _Objective
    labels: torch.Tensor  # [R, T] int64
    head: _Head
    outputs: Outputs  # entropy / argmax at the scored rows, for the loss's metrics
    use_kernels: bool
    shard: VocabShard | None  # the weight's slice of the vocabulary when vocab-parallel
    sized_for_gemms: bool  # memory_budget was left at its default on a kernel path: see `_chunk_rows`
    # Which of hidden, weight, bias get a gradient, decided at the call: inside forward, ctx.needs_input_grad says
    # requires_grad even under no_grad, and an evaluation pass would compute d logits and both GEMMs for nothing.
    needs_grad: tuple[bool, bool, bool]


# A chunk's d-weight GEMM over K rows reads and writes the fp32 [V, H] accumulator, 8 bytes per element for 2 K FLOPs,
# so it is memory-bound below K = 4 x GEMM rate / copy bandwidth: 735 rows on an H200 (790 TFLOP/s, 4.3 TB/s, measured;
# compile_check.MACHINES) and 1053 on an H100. The default budget alone gives 348 rows at V = 128256 in bf16, which
# would take the accumulate 2.1x its FLOPs' time on an H200 (3.0x on an H100), with a d-hidden GEMM of 348 x H outputs
# too small to fill the GPU. Up to twice the H100's ridge, then, where the memory allows (TRL's fused head accumulates
# over tiles of 4096 tokens).
_GEMM_ROWS = 2048
# The largest row tile cuBLAS and the GEMM kernels take: a GEMM of 348 rows computes 512 in 256-row tiles.
_TILE_ROWS = 256


def _whole_tiles(rows: int) -> int:
    """rows rounded down to whole row tiles, once there is one."""
    return rows // _TILE_ROWS * _TILE_ROWS if rows >= _TILE_ROWS else rows


def _chunk_rows(budget: int, width: int, H: int, d_bytes: int, weight_bytes: int, sized_for_gemms: bool):
    """(rows of whole units a chunk may take, rows of logits at a time within a longer unit). A row of the chunk
    buffers takes `width` fp32 logits plus, if d logits has a buffer of its own, its d_bytes per logit.

    sized_for_gemms (memory_budget left at its default, on a kernel path): chunks take up to _GEMM_ROWS rows, within
    the bytes of the weight's gradient in the weight's dtype (weight_bytes each; 0 for fp32), which the backward
    allocates next to the fp32 accumulator anyway: the forward's buffers then add nothing to the backward's peak. A
    longer unit's slices stay within the budget: its d-weight GEMM runs over the whole unit."""
    row_bytes = width * (4 + d_bytes)
    slice_rows = _whole_tiles(max(1, budget // row_bytes))
    if sized_for_gemms:
        return max(slice_rows, _whole_tiles(min(_GEMM_ROWS, width * H * weight_bytes // row_bytes))), slice_rows
    return slice_rows, slice_rows


def _unit_order(objective: _Objective, R: int) -> list[int]:
    """Sequences in unit order: a DPO pair's chosen row p is followed by its rejected row R/2 + p."""
    if objective.unit != "pair":
        return list(range(R))
    return [r for p in range(R // 2) for r in (p, R // 2 + p)]


def _scored_rows_by_unit(labels: torch.Tensor, vocab: int, ignore_index: int, order: list[int], group=None):
    """([M] int64 scored rows of labels.view(-1), in unit order; per-sequence counts of scored rows, host ints).

    The call's one host sync: the counts, a check that every label is in [0, vocab) or ignore_index, and with a
    vocab-parallel `group` a check that every rank scores as many rows per sequence (one all-reduce of 2R integers
    before the sync): the chunks, and so the collectives, are planned from the counts."""
    R, T = labels.shape
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    numbers = [valid.sum(1), bad.sum().view(1)]
    if group is not None:  # the group's most and (negated) least counts
        spread = torch.cat([numbers[0], -numbers[0]])
        dist.all_reduce(spread, op=dist.ReduceOp.MAX, group=group)
        numbers.append(spread)
    flat = torch.cat(numbers).tolist()
    counts, n_bad, most, least = flat[:R], flat[R], flat[R + 1 : 2 * R + 1], flat[2 * R + 1 :]
    if n_bad:
        raise label_range_error("labels", labels, bad, vocab, ignore_index)
    if group is not None and most != [-c for c in least]:
        raise ValueError(ROWS_DIFFER)
    rank = torch.empty(R, dtype=torch.int64, device=labels.device)
    rank[torch.tensor(order, device=labels.device, dtype=torch.int64)] = torch.arange(R, device=labels.device)
    key = rank[:, None] * T + torch.arange(T, device=labels.device)
    key = torch.where(valid, key, R * T).view(-1)
    return torch.argsort(key, stable=True)[: sum(counts)], counts


def _chunks(unit_rows: list[int], limit: int, splittable: bool) -> list[tuple[int, int, bool]]:
    """(first, end, whole) row ranges over the units in order: whole units, at most `limit` rows where they fit;
    a unit longer than that alone, marked whole=False. Token units (splittable) cut anywhere."""
    total = sum(unit_rows)
    if splittable:  # chunks of equal size in whole tiles: a short last one would cost a pass over the accumulator
        n_chunks = -(-total // limit)  # ceiling divisions
        size = -(-total // n_chunks) if total else 1
        if size >= _TILE_ROWS:
            size = min(limit, -(-size // _TILE_ROWS) * _TILE_ROWS)
        return [(r0, min(total, r0 + size), True) for r0 in range(0, total, size)]
    chunks, start, end = [], 0, 0
    for n in unit_rows:
        if end + n - start > limit and end > start:
            chunks.append((start, end, True))
            start = end
        end += n
        if end - start > limit:
            chunks.append((start, end, False))
            start = end
    if end > start:
        chunks.append((start, end, True))
    return chunks


def _loss_gradient(objective: _Objective, logps, extras: dict, rows, logp_c, mean_c):
    """(d loss / d log-probs, d loss / d mean log-probs, what loss_of returned, detached) at `rows` of the flat
    [R * T] log-probs, the other entries held as detached placeholders: exact for a loss that decomposes over units,
    each chunk holding whole units. On the last chunk every entry is in place: loss_of's values are the call's."""
    with torch.enable_grad():
        leaves = [logp_c.detach().requires_grad_(True)]
        lp = logps.view(-1).index_put((rows,), leaves[0]).view_as(logps)
        extras = dict(extras)
        if mean_c is not None:
            leaves.append(mean_c.detach().requires_grad_(True))
            means = extras["mean_logps"]
            extras["mean_logps"] = means.view(-1).index_put((rows,), leaves[1]).view_as(means)
        result = objective.loss_of(lp, extras)
        grads = torch.autograd.grad(result[0], leaves)
    result = torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, result)
    return grads[0].float(), None if mean_c is None else grads[1].float(), result


_STAT_NAMES = ("entropy", "argmax", "log_sum_sq_probs", "mean_logits")


def _stats(a, bias, labels, head: _Head, outputs: Outputs, use_kernels: bool):
    if use_kernels:
        return logits_stats(a, bias, labels, head.temperature, head.softcap, head.logit_scale, outputs)
    return _torch_stats(a, bias, labels, head, outputs)


def _row_stats(a, h, weight, bias, labels, head: _Head, outputs: Outputs, plan: _Fast):
    """(lse, label log-probs, labels for `_dlogits`, {name: value} of _STAT_NAMES asked for in `outputs`, and when
    vocab-parallel the combination's labels_differ flag, for `check_same_rows` after the chunks, else None) of the rows
    of the chunk buffer a [rows, V] (fp32 raw logits h @ weight.T) with labels [rows] in [0, vocab), over the whole
    vocabulary.

    Vocab-parallel: a holds this rank's slice; its statistics are combined across the group (one all-gather of
    <= 9 floats per row), and the labels for `_dlogits` are local to the slice, -1 where another rank's slice holds
    the label. The torch path's buffer then holds log p over the whole vocabulary, as `_torch_dlogits` expects. Each
    slice's maximum logit is recomputed from h and its weight row, as the lean path's: identical rows on two ranks
    then tie exactly, and the first wins as in torch.argmax (the buffer's log p + lse, or two GEMMs of different
    shapes, round differently)."""
    shard = plan.shard
    if shard is None:
        lse, z_label, *values = _stats(a, bias, labels, head, outputs, plan.use_kernels)
        return lse, z_label - lse, labels, dict(zip(_STAT_NAMES, values)), None
    local = labels - shard.start
    here = (local >= 0) & (local < shard.size)
    lse_r, z_label, entropy, argmax, log_sum_sq, mean = _stats(
        a, bias, torch.where(here, local, 0), head, outputs, plan.use_kernels
    )
    argmax_logit = None if argmax is None else row_logits(h, weight, bias, argmax, head)
    stats = combine_vocab_stats(
        shard.group,
        lse_r,
        torch.where(here, z_label - lse_r, 0.0),
        here,
        labels=labels,
        entropy=entropy,
        argmax_logit=argmax_logit,
        argmax_index=None if argmax is None else argmax + shard.start,
        log_sum_sq_probs=log_sum_sq,
        logit_sum=None if mean is None else mean * shard.size,
    )
    if not plan.use_kernels:
        a += (lse_r - stats.lse)[:, None]
    mean_logits = None if stats.logit_sum is None else stats.logit_sum / shard.vocab
    values = (stats.entropy, stats.argmax, stats.log_sum_sq_probs, mean_logits)
    found = dict(zip(_STAT_NAMES, values))
    return stats.lse, stats.logprob, torch.where(here, local, -1), found, stats.labels_differ


def _dlogits(a, out, bias, labels, lse, coef, coef_mean, head: _Head, use_kernels: bool, vocab: int) -> None:
    """d loss / d a into out, from `_row_stats`'s lse and labels (-1: the label is in another rank's slice); vocab:
    the whole vocabulary's size, a's width unless vocab-parallel."""
    if not use_kernels:
        if out.data_ptr() != a.data_ptr():
            raise AssertionError("the torch path writes d logits over log p, in place")
        _torch_dlogits(out, labels, lse, coef, coef_mean, head, vocab)
        return
    chain = head.temperature, head.softcap, head.logit_scale
    logits_grad(a, out, bias, labels, lse, coef, coef_mean, *chain, vocab=vocab)


class _FastFusedLinearLoss(torch.autograd.Function):
    """(loss, per-token log-probs [R, T], entropy, argmax, then TOKEN_EXTRAS, then the rest of what loss_of returned:
    metrics, no gradient) with the gradients of the loss computed in the forward; only the loss is differentiable.
    The per-token values are 0 where the label is ignored."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: _Fast):
        head, objective = plan.head, plan.objective
        x = as_btv(hidden)
        R, T = plan.labels.shape
        H, V = x.shape[2], weight.shape[0]
        dev = x.device
        weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        # The kernels read the bias 16 bytes at a time from a padded copy (V elements); the torch path as it is.
        bias = padded_bias(bias) if plan.use_kernels else None if bias is None else bias.contiguous()
        order = _unit_order(objective, R)
        ascending = order == sorted(order)  # the rows come in unit order: a pair's chosen row, then its rejected
        shard = plan.shard
        vocab = V if shard is None else shard.vocab
        rows, counts = _scored_rows_by_unit(plan.labels, vocab, head.ignore_index, order, shard and shard.group)
        if objective.unit == "pair":
            unit_rows = [counts[p] + counts[R // 2 + p] for p in range(R // 2)]
        else:
            unit_rows = [counts[r] for r in order]
        # d logits goes into the GEMMs' operand dtype: the inputs' dtype on the kernel paths (tensor-core GEMMs, the
        # fp32 logits in a buffer of their own), fp32 on the torch path (in place over the logits).
        need_h, need_w, need_b = plan.needs_grad
        grads = need_h or need_w or need_b  # without them the buffer holds the fp32 logits alone: 2 N H V FLOPs
        d_dtype = x.dtype if plan.use_kernels and grads else torch.float32
        separate = d_dtype != torch.float32
        # Vocab-parallel: every rank sizes its chunks by the widest slice, so all take the same collectives.
        width = V if shard is None else shard.widest
        weight_bytes = 0 if weight.dtype == torch.float32 else weight.element_size()
        limit, slice_rows = _chunk_rows(
            head.memory_budget, width, H, d_dtype.itemsize if separate else 0, weight_bytes, plan.sized_for_gemms
        )
        chunks = _chunks(unit_rows, limit, objective.unit == "token")

        flat_labels = plan.labels.reshape(-1)
        logps = torch.zeros(R, T, device=dev)
        # Per token, at the scored rows: the metrics' entropy and argmax, then the extras the loss reads.
        per_token = {
            "entropy": torch.zeros(R, T, device=dev) if plan.outputs.entropy else None,
            "argmax": torch.zeros(R, T, device=dev, dtype=torch.int64) if plan.outputs.argmax else None,
            **{name: torch.zeros(R, T, device=dev) if name in objective.extras else None for name in TOKEN_EXTRAS},
        }
        # Unscored rows get a zero d hidden; the first chunk writes d weight over the empty buffer.
        new_dh = torch.empty if sum(counts) == R * T else torch.zeros
        dh = new_dh(R * T, H, device=dev, dtype=x.dtype) if need_h else None
        dw = (torch.empty if chunks else torch.zeros)(V, H, device=dev) if need_w else None  # fp32 across chunks
        db = torch.zeros(V, device=dev) if need_b else None
        wanted = Outputs(
            plan.outputs.entropy,
            plan.outputs.argmax,
            "log_sum_sq_probs" in objective.extras,
            "mean_logits" in objective.extras or "mean_logps" in objective.extras,
        )
        smoothing = "mean_logps" in objective.extras
        # One buffer for every chunk (a fresh one per chunk would page-fault it in again), one more for the fp32
        # logits when d logits has a dtype of its own.
        # On the kernel paths their rows are padded to 16 elements (the GEMMs write the [:, :V] views in place), so the
        # kernels move 16 bytes per access at any V; the torch path's log_softmax would copy a strided view.
        row = padded_width(V) if plan.use_kernels else V
        d_buf = torch.empty(max((r1 - r0 for r0, r1, _ in chunks), default=0), row, device=dev, dtype=d_dtype)[:, :V]
        a_rows = max((r1 - r0 if whole else min(slice_rows, r1 - r0) for r0, r1, whole in chunks), default=0)
        a_buf = torch.empty(a_rows, row, device=dev)[:, :V] if separate else None

        result = None
        labels_differ = []  # vocab-parallel: whether the group's ranks scored different rows, per chunk
        with autocast_off(dev):
            for i_chunk, (r0, r1, whole) in enumerate(chunks):
                rows_c, n = rows[r0:r1], r1 - r0
                h_c, lab_c = _rows_of(x, rows_c, ascending), flat_labels[rows_c]
                d = d_buf[:n]
                logp_c = torch.empty(n, device=dev)
                mean_c = torch.empty(n, device=dev) if smoothing else None
                # Whole units: one slice; d logits is written once the loss's gradient is known. A unit longer than
                # the budget: slices, each row's d log p / d logits written at once, scaled by the gradient after.
                for s0 in range(0, n, n if whole else slice_rows):
                    s1 = min(n, s0 + slice_rows) if not whole else n
                    a = a_buf[: s1 - s0] if separate else d[s0:s1]
                    _logits_into(a, h_c[s0:s1], weight)
                    lse, logp_c[s0:s1], grad_labels, found, differ = _row_stats(
                        a, h_c[s0:s1], weight, bias, lab_c[s0:s1], head, wanted, plan
                    )
                    if differ is not None:
                        labels_differ.append(differ)
                    if mean_c is not None:
                        mean_c[s0:s1] = found["mean_logits"] - lse
                    for name, value in found.items():
                        if per_token.get(name) is not None:
                            per_token[name].view(-1)[rows_c[s0:s1]] = value
                    if not whole and grads:
                        ones = torch.ones(s1 - s0, device=dev)
                        _dlogits(a, d[s0:s1], bias, grad_labels, lse, ones, None, head, plan.use_kernels, vocab)
                logps.view(-1)[rows_c] = logp_c
                if mean_c is not None:
                    per_token["mean_logps"].view(-1)[rows_c] = mean_c
                if grads:  # else the loss is taken once, after the chunks (no autograd under inference_mode)
                    extras = {name: per_token[name] for name in objective.extras}
                    coef, coef_mean, result = _loss_gradient(objective, logps, extras, rows_c, logp_c, mean_c)
                if whole and grads:
                    _dlogits(a, d, bias, grad_labels, lse, coef, coef_mean, head, plan.use_kernels, vocab)
                    h_w = h_c
                elif grads:  # the rows' scale moves onto the [n, H] side of each GEMM
                    h_w = (h_c.float() * coef[:, None]).to(d_dtype if separate else torch.float32)
                if need_h:
                    dh_c = _dlogits_times_weight(d, weight)
                    if shard is not None:  # each slice's part of d hidden
                        dist.all_reduce(dh_c, group=shard.group)
                    dh[rows_c] = (dh_c if whole else dh_c.mul_(coef[:, None])).to(dh.dtype)
                if need_w:
                    _accumulate_dweight(dw, d, h_w, first=i_chunk == 0)
                if need_b and whole:
                    db += d.sum(0, dtype=torch.float32)
                elif need_b:
                    for s0 in range(0, n, slice_rows):  # fp32 products, a slice of rows at a time
                        db += coef[s0 : s0 + slice_rows] @ d[s0 : s0 + slice_rows].float()

        check_same_rows(labels_differ)  # one host sync for every chunk's check
        if result is None:  # no gradient asked for, or no scored row
            result = objective.loss_of(logps, {name: per_token[name] for name in objective.extras})
        loss, *metrics = result
        ctx.grads = (None if dh is None else dh.view(hidden.shape), dw, db)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(logps, *(t for t in per_token.values() if t is not None))
        return loss, logps, *per_token.values(), tuple(metrics)

    @staticmethod
    @first_order_only
    def backward(ctx, dloss, *_non_differentiable):
        """Scales the gradients the forward computed by grad_output, in place: once."""
        if ctx.grads is None:
            raise RuntimeError(
                "strategy='fast' computes the gradients in the forward and hands them to the first backward, in place; "
                "a second backward through the same graph (retain_graph=True) needs strategy='lean'"
            )
        (dh, dw, db), (w_dtype, b_dtype) = ctx.grads, ctx.dtypes
        ctx.grads = None
        scale = dloss.float()
        if dh is not None and dh.dtype == torch.float32:
            dh.mul_(scale)
        elif dh is not None:  # in fp32: grad_output rounded to bf16 would scale every element off by up to 2**-9
            flat = dh.view(-1, dh.shape[-1])
            for r0, r1 in _row_blocks(*flat.shape):
                flat[r0:r1] = flat[r0:r1].float().mul_(scale)
        if dw is not None:
            dw = dw.mul_(scale).to(w_dtype)
        if db is not None:
            db = db.mul_(scale).to(b_dtype)
        return dh, dw, db, None


# ---------------------------------------------------------------------------------------------- both strategies


def _strategy_for(
    strategy: str, objective: _Objective, hidden, weight, head: _Head, use_kernels: bool, shard: VocabShard | None
) -> str:
    """The strategy a call runs: auto takes fast unless the loss cannot, or its largest unit's d logits would take
    more memory than max(memory_budget, the fp32 [V, H] d-weight accumulator that fast holds anyway); V is the
    widest slice's when vocab-parallel (the same decision on every rank). The options' check_*_options refused
    what they cannot run."""
    if objective.not_fast is not None:
        return "lean"
    if strategy != "auto":
        return strategy
    V, H = weight.shape[0] if shard is None else shard.widest, weight.shape[1]
    rows = {"pair": 2 * hidden.shape[1], "sequence": hidden.shape[1], "token": 1}[objective.unit]
    unit_bytes = rows * V * (hidden.element_size() if use_kernels else 4)
    return "fast" if unit_bytes <= max(head.memory_budget, 4 * V * H) else "lean"


@eager_under_compile
def fused_linear_loss(
    hidden, weight, labels, bias, objective: _Objective, head_args: dict, strategy: str, outputs: Outputs = _NONE
) -> tuple[tuple, TokenStats]:
    """(what objective.loss_of returns, TokenStats) on the log-probs of hidden [R, T, H] under weight [V, H]: every
    loss of this module, and the fused loss a patched model computes inside its head (the TRL trainers' path).
    The TokenStats ([R, T], no gradient; valid wherever the label counts) hold the log-probs, the entropy and argmax
    when `outputs` asks for them, and the objective's extras (log_sum_sq_probs, mean_logits)."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must have shape [batch, T, H]; got {got}")
    hidden, weight, bias, head = _prepare(hidden, weight, labels, bias, **head_args)
    use_kernels = backend_for(hidden) != "torch"
    shard = vocab_shard(weight)
    if _strategy_for(strategy, objective, hidden, weight, head, use_kernels, shard) == "lean":
        if "mean_logps" in objective.extras:  # auto, where a unit's d logits would exceed the memory budget
            raise ValueError(
                "label_smoothing > 0 runs on the fast strategy only (the lean path has no mean log-prob), and "
                f"strategy='auto' found a token's d logits larger than memory_budget={head.memory_budget}"
            )
        stats = linear_token_stats(
            hidden,
            weight,
            labels,
            bias,
            **head_args,
            entropy=outputs.entropy,
            argmax=outputs.argmax,
            log_sum_sq_probs="log_sum_sq_probs" in objective.extras,
            mean_logits="mean_logits" in objective.extras,
        )
        extras = {name: getattr(stats, name) for name in objective.extras}
        result = objective.loss_of(stats.logprobs, extras)
        entropy = None if stats.entropy is None else stats.entropy.detach()
        return result, stats._replace(logprobs=stats.logprobs.detach(), entropy=entropy)
    if shard is not None:  # the slices; the gradients' DTensors come from to_local's backward
        hidden, weight, bias = local_operands(hidden, weight, bias, shard)
        shard = shard if shard.size < shard.vocab else None  # a one-rank group's slice is the whole vocabulary
    sized_for_gemms = use_kernels and head_args["memory_budget"] is None
    needs_grad = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    plan = _Fast(objective, labels.to(torch.int64), head, outputs, use_kernels, shard, sized_for_gemms, needs_grad)
    loss, logps, entropy, argmax, log_sum_sq, mean_logits, _mean_logps, metrics = _FastFusedLinearLoss.apply(
        hidden, weight, bias, plan
    )
    return (loss, *metrics), TokenStats(logps, entropy, argmax, log_sum_sq, mean_logits)


def _check_hidden_labels(hidden, labels) -> None:
    """The losses read labels (for the mask) before fused_linear_loss checks the rest."""
    check_float("hidden", hidden)
    check_labels("labels", labels, hidden.shape[:-1], hidden.device, "hidden.shape[:-1]", "hidden")


def _references_and_mask(
    ref_logps: dict, ref_hidden, ref_weight, ref_bias, hidden, weight, labels, head_args, ld_alpha
):
    """(the reference's per-sequence sums, one per name of ref_logps, LD-weighted as the policy's with ld_alpha; the
    completion mask [R, T]) of the DPO and KTO losses: the sums as given in ref_logps ({name: [B] or None}), or from
    ref_hidden under no_grad (2 N H V FLOPs); then the labels are checked against hidden."""
    if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
        raise ValueError("ref_weight and ref_bias need ref_hidden")
    _check_hidden_labels(hidden, labels)
    ref_w = (weight if ref_weight is None else ref_weight).detach()
    ref_b = None if ref_bias is None else ref_bias.detach()
    mask = labels != head_args["ignore_index"]

    def compute(h):
        return sequence_logps(linear_token_logprobs(h, ref_w, labels, ref_b, **head_args), mask, ld_alpha=ld_alpha)

    refs = reference_logps(ref_logps, "ref_hidden", ref_hidden, hidden, "hidden", compute)
    return refs, mask


# ---------------------------------------------------------------------------------------------- the losses


def dpo_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    memory_budget: int | None = None,
    strategy: str = "auto",
    **options,
):
    """`fastalign.dpo_loss` straight from the policy's last hidden states and the lm_head weight.

    Args:
        hidden: [2B, T, H], the B chosen rows first, then the B rejected ones; weight: [V, H]; bias: [V] or None.
        labels: [2B, T] int64 aligned with hidden (the caller shifts); ignore_index marks prompt and padding.
        ref_chosen_logps, ref_rejected_logps: [B] reference sums over the completions (LD-weighted with ld_alpha,
            as TRL precomputes them); or instead
        ref_hidden: [2B, T, H'] the reference model's hidden states, projected under no_grad by ref_weight
            ([V, H'], default `weight`, as when the reference shares the policy's lm_head) and ref_bias.
        temperature, softcap, logit_scale: the logits, as in `linear_token_stats`.
        memory_budget: bytes for the logits-sized buffers (default 256 MiB; left at the default on a GPU, fast's
            chunks take up to 2048 rows, within the size of the weight's gradient: see `_chunk_rows`); see
            `strategy`.
        strategy: "auto" (default), "fast" or "lean" (see the module docstring). fast computes the gradient in the
            forward at 6 N H V FLOPs, holding an fp32 [V, H] d-weight accumulator (none for an fp32 weight) and
            the d logits of whole pairs; lean recomputes the logits in the backward (8 N H V) and holds no [V, H]
            buffer. auto takes fast unless the loss couples the pairs ("aot", "aot_unpaired", or "sft" with
            use_weighting) or a pair's d logits (2 T rows x V, in the inputs' dtype on a GPU) exceed
            max(memory_budget, the accumulator's size).
        beta, loss_type, loss_weights, label_smoothing, **options: `dpo_loss_from_token_logps`'s (every `dpo_loss`
            option, ld_alpha, use_weighting, return_per_example); the completion lengths come from the labels.

    Returns:
        (loss, metrics), or (loss, metrics, per_example) with return_per_example, as `fastalign.dpo_loss`.
    """
    kwargs = dict(beta=beta, loss_type=loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing)
    head_args = check_dpo_hidden_options(
        **kwargs, ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
        memory_budget=memory_budget, strategy=strategy, **options,
    )  # fmt: skip
    check_paired_batch("hidden", hidden, "[2B, T, H]")
    token_options = {k: options[k] for k in ("ld_alpha", "use_weighting") if k in options}
    given = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    (ref_chosen, ref_rejected), mask = _references_and_mask(
        given, ref_hidden, ref_weight, ref_bias, hidden, weight, labels, head_args, token_options.get("ld_alpha")
    )
    objective = dpo_objective(mask, ref_chosen, ref_rejected, **kwargs, **options)
    return fused_linear_loss(hidden, weight, labels, bias, objective, head_args, strategy)[0]


def dpo_objective(mask, ref_chosen, ref_rejected, **options) -> _Objective:
    """The DPO loss of the pairs of mask [2B, T] (the B chosen rows first) from their per-token log-probs, with
    `dpo_loss_from_token_logps`'s options: dpo_loss_from_hidden's, and the loss fastalign's DPOTrainer has its
    patched model compute in the head."""

    def loss_of(logps, extras):
        token_extras = {k: v for k, v in extras.items() if k in ("log_sum_sq_probs", "mean_logits")}
        return dpo_loss_from_token_logps(logps, mask, ref_chosen, ref_rejected, **token_extras, **options)

    extras = ("log_sum_sq_probs",) * bool(options.get("use_weighting")) + ("mean_logits",) * bool(
        options.get("return_per_example")
    )
    not_fast = _dpo_not_fast(options.get("loss_type", "sigmoid"), options.get("use_weighting", False))
    return _Objective(loss_of, "pair", not_fast, extras)


def kto_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    desirable: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    kl: torch.Tensor | float | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    memory_budget: int | None = None,
    strategy: str = "auto",
    **options,
):
    """`fastalign.kto_loss` straight from the policy's last hidden states [B, T, H] and the lm_head weight [V, H].

    labels: [B, T] int64 aligned with hidden; desirable: [B] bool. The reference comes as ref_logps [B] or as
    ref_hidden [B, T, H'] (with ref_weight, ref_bias; under no_grad). kl: TRL's batch KL estimate, detached.
    options: `kto_loss`'s (average_log_prob, clamp_kl, return_per_example; the lengths come from the labels, and
    the per-example outputs add logits, the mean logit over each completion's tokens). strategy: as in
    `dpo_loss_from_hidden`, with a sequence as the unit (every KTO loss type decomposes: the KL is an input).
    """
    kwargs = dict(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    head_args = check_kto_hidden_options(
        **kwargs, loss_type=loss_type, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
        logit_scale=logit_scale, memory_budget=memory_budget, strategy=strategy, **options,
    )  # fmt: skip
    (ref,), mask = _references_and_mask(
        {"ref_logps": ref_logps}, ref_hidden, ref_weight, ref_bias, hidden, weight, labels, head_args, None
    )
    objective = kto_objective(mask, ref, desirable, kl, loss_type=loss_type, **kwargs, **options)
    return fused_linear_loss(hidden, weight, labels, bias, objective, head_args, strategy)[0]


def kto_objective(mask, ref_logps, desirable, kl, **options) -> _Objective:
    """The KTO loss of the sequences of mask [B, T] from their per-token log-probs, with `kto_loss`'s options (the
    lengths from the mask; return_per_example adds logits, the mean logit over each completion's tokens):
    kto_loss_from_hidden's, and the loss fastalign's KTOTrainer has its patched model compute in the head."""
    lengths = mask.sum(-1)
    per_example = bool(options.get("return_per_example"))

    def loss_of(logps, extras):
        result = kto_loss(sequence_logps(logps, mask), ref_logps, desirable, kl, lengths=lengths, **options)
        if per_example:
            with torch.no_grad():
                result[2]["logits"] = (torch.where(mask, extras["mean_logits"], 0.0).sum(-1) / lengths.clamp(min=1)).to(
                    result[0].dtype
                )
        return result

    return _Objective(loss_of, "sequence", None, ("mean_logits",) * per_example)  # the KL is an input


def ift_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    gamma: float = 0.95,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    memory_budget: int | None = None,
    strategy: str = "auto",
) -> torch.Tensor:
    """`fastalign.ift_loss` straight from hidden [B, T, H], weight [V, H] and labels [B, T] (aligned; the caller
    shifts). strategy: as in `dpo_loss_from_hidden`, with a sequence as the unit."""
    head_args = check_ift_hidden_options(
        gamma=gamma, ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
        memory_budget=memory_budget, strategy=strategy,
    )  # fmt: skip
    _check_hidden_labels(hidden, labels)
    objective = ift_objective(labels != head_args["ignore_index"], float(gamma))
    return fused_linear_loss(hidden, weight, labels, bias, objective, head_args, strategy)[0][0]


def ift_objective(mask, gamma: float) -> _Objective:
    """The IFT loss of the sequences of mask [B, T] from their per-token log-probs: ift_loss_from_hidden's, and the
    loss fastalign's IFTTrainer has its patched model compute in the head (every IFT loss decomposes per sequence)."""

    def loss_of(logps, _extras):
        return (ift_loss(logps, mask, gamma=gamma),)

    return _Objective(loss_of, "sequence")


def cross_entropy_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    entropy: bool = False,
    accuracy: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    memory_budget: int | None = None,
    strategy: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token cross-entropy (the SFT loss) of `labels` under the logits hidden @ weight.T, as F.cross_entropy.

    Args:
        hidden: [B, T, H], or [N, H] tokens (as F.cross_entropy and Liger take them); weight: [V, H]; bias: [V] or
            None; labels: [B, T] (or [N]) int64 aligned with hidden (the caller shifts), ignore_index where no loss
            is taken.
        reduction: "mean" over the tokens that count (default; 0 when none does), "sum", or "none" (labels' shape,
            0 where ignored; lean only: a per-token loss's weights in the weight gradient are unknown in the
            forward).
        label_smoothing: in [0, 1) (default 0): (1 - eps) * NLL + eps * mean_v(-log p_v), as F.cross_entropy;
            fast only.
        entropy, accuracy: also return metrics["entropy"], the mean entropy of softmax(z) over the tokens that
            count, and metrics["mean_token_accuracy"], the fraction of them whose argmax is the label (what
            TRL's SFTTrainer logs). No gradient flows through them.
        strategy: as in `dpo_loss_from_hidden`, with a token as the unit (no whole-sequence buffer).

    Returns:
        (loss, metrics): the loss (float32) and the metrics asked for.
    """
    head_args = check_cross_entropy_options(
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, entropy=entropy,
        accuracy=accuracy, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
        memory_budget=memory_budget, strategy=strategy,
    )  # fmt: skip
    tokens = isinstance(hidden, torch.Tensor) and hidden.dim() == 2 and isinstance(labels, torch.Tensor)
    if tokens:  # [N, H] as one sequence of N tokens: a view
        hidden, labels = hidden[None], labels[None]
    _check_hidden_labels(hidden, labels)
    mask = labels != head_args["ignore_index"]
    count = mask.sum().clamp(min=1)
    eps = float(label_smoothing)

    def loss_of(logps, extras):
        nll = -logps if eps == 0 else -(1 - eps) * logps - eps * torch.where(mask, extras["mean_logps"], 0.0)
        if reduction == "none":
            return (nll,)
        return (nll.sum() / count if reduction == "mean" else nll.sum(),)

    objective = _Objective(loss_of, "token", _cross_entropy_not_fast(reduction), ("mean_logps",) * (eps > 0))
    (loss,), stats = fused_linear_loss(
        hidden, weight, labels, bias, objective, head_args, strategy, Outputs(entropy=entropy, argmax=accuracy)
    )
    if tokens and reduction == "none":
        loss = loss[0]
    metrics = {}
    if entropy:
        metrics["entropy"] = torch.where(mask, stats.entropy, 0.0).sum() / count
    if accuracy:
        metrics["mean_token_accuracy"] = (mask & (stats.argmax == labels)).sum() / count
    return loss, metrics
