"""The exact top-k rule of OnTIES, shared by the kernel path and the torch path.

Entries are ranked by the magnitude key of their float32 value (`bits & 0x7fffffff`, which
orders exactly like |x|); among entries with the same key, the one with the smaller global
element index ranks first. So the top k of a parameter are: every entry whose key is above the
k-th largest key T, plus the first `ties` entries equal to T in global index order. This is the
same however the parameter is sharded, and it is what a stable descending sort would pick.

Everything here runs on the device without a host sync: the histograms come from the caller
(Triton kernels or torch.bincount), are summed across the shards' process group, and the digit
choice is a few tensor ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastalign.kernels.radix_select import RADIX_DIGITS

UNLIMITED = 2**62  # a tie budget that keeps every copy of the threshold key


def topk_count(reserve_p: float, numel: int) -> int:
    """Entries TIES keeps: int(reserve_p · numel), or all of them when that is below 1."""
    k = int(reserve_p * numel)
    return numel if k < 1 else min(k, numel)


@dataclass
class Threshold:
    key: torch.Tensor  # [S] int64: key of the k-th largest magnitude; -1 for inactive slots
    ties: torch.Tensor  # [S] int64: how many entries equal to `key` are kept, over the whole parameter
    partial: torch.Tensor  # [S] bool: some entries equal to `key` are dropped, so the index rule applies


def radix_select(
    first_hist: torch.Tensor,
    histogram: Callable[[torch.Tensor, int, int], torch.Tensor],
    k: torch.Tensor,
    active: torch.Tensor,
    group,
) -> Threshold:
    """Finds each active slot's k-th largest magnitude key, one radix digit at a time.

    first_hist: [S, 2**bits] int64 local counts of the first digit (RADIX_DIGITS[0]);
    histogram(prefix, shift, bits): [S, 2**bits] local counts of the digit at `shift` among the
    keys whose higher bits equal prefix[s] (slots with prefix < 0 are skipped);
    k: [S] int64 with 1 <= k <= numel; active: [S] bool; group: the shards' process group or None.
    """
    hist = first_hist
    prefix = torch.where(active, 0, -1)
    remaining = k.clone()
    count_eq = torch.zeros_like(k)
    for i, (shift, bits) in enumerate(RADIX_DIGITS):
        if i:
            hist = histogram(prefix, shift, bits)
        if group is not None:
            dist.all_reduce(hist, group=group)
        at_least = hist.flip(-1).cumsum(-1).flip(-1)  # [s, d]: keys whose digit is >= d
        digit = ((at_least >= remaining[:, None]).sum(-1) - 1).clamp_min(0)
        count_eq = hist.gather(1, digit[:, None]).squeeze(1)
        remaining = remaining - (at_least.gather(1, digit[:, None]).squeeze(1) - count_eq)
        prefix = torch.where(active, (prefix << bits) | digit, -1)
    return Threshold(prefix, remaining, active & (remaining < count_eq))


def tie_budget(th: Threshold, local_ties: torch.Tensor, offsets: torch.Tensor, group) -> torch.Tensor:
    """[S] int64: how many entries equal to the threshold key this shard keeps, counting from its
    first. Shards that start earlier in the global order take theirs first.

    local_ties: [S] int64 copies of the threshold key in this shard; offsets: [S] int64 global
    index of this shard's first element.
    """
    before = torch.zeros_like(local_ties)
    if group is not None:
        table = torch.zeros(dist.get_world_size(group), 2, local_ties.numel(), dtype=torch.int64, device=offsets.device)
        table[dist.get_rank(group), 0] = offsets
        table[dist.get_rank(group), 1] = local_ties
        dist.all_reduce(table, group=group)
        before = torch.where(table[:, 0] < offsets, table[:, 1], 0).sum(0)
    return torch.where(th.partial, th.ties - before, UNLIMITED)
