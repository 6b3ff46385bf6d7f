"""The exact top-k rule of OnTIES, shared by the kernel path and the torch path.

Entries are ranked by the magnitude key of their float32 value (`bits & 0x7fffffff`, which
orders exactly like |x|); among entries with the same key, the one with the smaller global
element index ranks first. So the top k of a parameter are: every entry whose key is above the
k-th largest key T, plus the first `ties` entries equal to T in global index order. This is the
same however the parameter is sharded, and it is what a stable descending sort would pick.

Everything here runs on the device without a host sync (but Runs.of, once per layout of slots):
the histograms come from the caller (Triton kernels or torch.bincount), are summed across the
shards' process group, and the digit choice and the tie budgets are a few tensor ops.
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
    histogram: Callable[[torch.Tensor, int, int, torch.Tensor | None], torch.Tensor],
    k: torch.Tensor,
    active: torch.Tensor,
    group,
    guess: torch.Tensor | None = None,
) -> Threshold:
    """Finds each active slot's k-th largest magnitude key, one radix digit at a time.

    first_hist: [S, 2**bits] int64 local counts of the first digit (RADIX_DIGITS[0]);
    histogram(prefix, shift, bits, copied): [S, 2**bits] local counts of the digit at `shift` among the keys whose
    higher bits equal prefix[s] (slots with prefix < 0 are skipped); copied: [S] bool, at the second digit, the slots
    whose keys under the first digit were copied to candidate regions already (radix_select.py), else None;
    k: [S] int64 with 1 <= k <= numel; active: [S] bool; group: the shards' process group or None.
    guess: [S] int64 guessed first digit (< 0: none); a guessed slot's row of first_hist holds only its keys at that
    digit (in its bin) and above it (in the top bin). Where the k-th largest key is not at the guess, the first digit
    is histogrammed again, by histogram(0, *RADIX_DIGITS[0], None).
    """
    hist = first_hist
    if group is not None:
        dist.all_reduce(hist, group=group)
    held = None
    if guess is not None:
        bins = hist.shape[1]
        at_least = hist.flip(-1).cumsum(-1).flip(-1)
        at = guess.clamp(0, bins - 1)[:, None]
        above = torch.where(guess < bins - 1, at_least.gather(1, (at + 1).clamp_max(bins - 1)).squeeze(1), 0)
        # Held: the k-th largest key is at the guess, counted (a skipped step counts nothing: never held, so no pass
        # reads regions its Δ pass did not fill).
        held = active & (guess >= 0) & (above < k) & (k <= at_least.gather(1, at).squeeze(1))
        again = histogram(torch.where(active & ~held, 0, -1), *RADIX_DIGITS[0], None)
        if group is not None:
            dist.all_reduce(again, group=group)
        hist = torch.where(held[:, None], hist, again)
    prefix = torch.where(active, 0, -1)
    remaining = k.clone()
    count_eq = torch.zeros_like(k)
    for i, (shift, bits) in enumerate(RADIX_DIGITS):
        if i:
            hist = histogram(prefix, shift, bits, held if i == 1 else None)
            if group is not None:
                dist.all_reduce(hist, group=group)
        at_least = hist.flip(-1).cumsum(-1).flip(-1)  # [s, d]: keys whose digit is >= d
        digit = ((at_least >= remaining[:, None]).sum(-1) - 1).clamp_min(0)
        count_eq = hist.gather(1, digit[:, None]).squeeze(1)
        remaining = remaining - (at_least.gather(1, digit[:, None]).squeeze(1) - count_eq)
        prefix = torch.where(active, (prefix << bits) | digit, -1)
    return Threshold(prefix, remaining, active & (remaining < count_eq))


@dataclass
class Runs:
    """This process's runs of consecutive global indices, slot after slot: one per shard stored as
    one range, one per local row for a shard of rows of a wider parameter (see _layout.py). Each
    slot has as many entries on every process of the group (the group's most; extra entries
    start at PAD and hold nothing), so the tables of all processes line up. Built once per
    layout of slots (it syncs, and all-reduces across the group)."""

    slot: torch.Tensor  # [T] int64: the slot of each entry
    start: torch.Tensor  # [T] int64: global index of the run's first element (PAD for padding)
    first: list[int]  # per slot: its first entry
    rows: list[int]  # per slot: elements per local run for a shard of rows, 0 for one range
    group: object  # the process group of the shards, or None
    gathered_start: torch.Tensor | None = None  # [world · T] int64: every process's starts

    @classmethod
    def of(cls, shards: list[tuple[int, int, int, int]], group, device) -> Runs:
        """shards: per slot (global offset, local numel, run, run_stride) of this process."""
        counts = [n // run if run != stride else 1 for _, n, run, stride in shards]
        most = torch.tensor(counts, dtype=torch.int64, device=device)
        if group is not None:
            dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
        slot, start, first = [], [], []
        for i, ((offset, _, _, stride), n, m) in enumerate(zip(shards, counts, most.tolist())):
            first.append(sum(len(x) for x in slot))
            slot.append([i] * m)
            start.append([offset + j * stride for j in range(n)] + [PAD] * (m - n))
        flat = lambda xs: torch.tensor([x for row in xs for x in row], dtype=torch.int64, device=device)  # noqa: E731
        rows = [run if run != stride else 0 for _, _, run, stride in shards]
        runs = cls(flat(slot), flat(start), first, rows, group)
        if group is not None:
            runs.gathered_start = _all_gather(runs.start, group)
        return runs

    def ties(self, local_ties: torch.Tensor, keys: Callable[[int], torch.Tensor], threshold: torch.Tensor):
        """[T] int64 copies of the threshold key per entry: a slot stored as one range has its
        local_ties[s]; a shard of rows counts them per row of keys(s) (its int32 magnitude keys)."""
        ties = torch.zeros_like(self.slot)
        ranges = [s for s, rows in enumerate(self.rows) if not rows]
        ties[[self.first[s] for s in ranges]] = local_ties[ranges]
        for s, rows in enumerate(self.rows):
            if rows:
                per_row = (keys(s).view(-1, rows) == threshold[s]).sum(1)
                ties[self.first[s] : self.first[s] + per_row.numel()] = per_row
        return ties


PAD = 2**62  # the start of a padding entry: after every run


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty(dist.get_world_size(group) * x.numel(), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x, group=group)
    return out


def tie_budget(th: Threshold, run_ties: torch.Tensor, runs: Runs) -> torch.Tensor:
    """[S] int64: how many copies of the threshold key this shard keeps, counting from its first
    element in local order (the kept copies of a shard are a prefix of its own: its runs come in
    global order). A copy is kept when fewer than th.ties copies precede it in global order,
    counting the runs of every shard.

    run_ties: [T] int64 copies of the threshold key in each of this process's run entries.
    """
    if runs.group is None and not any(runs.rows):  # one run per slot, nothing before it: its first th.ties copies
        return torch.where(th.partial, th.ties, UNLIMITED)
    n_slots = th.key.numel()
    if runs.group is None:
        start, ties, slot, mine = (
            runs.start,
            run_ties,
            runs.slot,
            torch.arange(run_ties.numel(), device=run_ties.device),
        )
    else:
        world, rank = dist.get_world_size(runs.group), dist.get_rank(runs.group)
        start, ties, slot = runs.gathered_start, _all_gather(run_ties, runs.group), runs.slot.repeat(world)
        mine = rank * run_ties.numel() + torch.arange(run_ties.numel(), device=run_ties.device)
    # Exclusive prefix sums of the copies in global order (by slot, then start), restarted per slot.
    order = torch.argsort(start, stable=True)
    order = order[torch.argsort(slot[order], stable=True)]
    sorted_ties = ties[order]
    before_sorted = torch.cumsum(sorted_ties, 0) - sorted_ties
    first = torch.full((n_slots,), PAD, dtype=torch.int64, device=ties.device)
    first.scatter_reduce_(0, slot[order], before_sorted, "amin")  # nondecreasing: the slot's first
    before = torch.empty_like(before_sorted)
    before[order] = before_sorted - first[slot[order]]
    kept = (th.ties[runs.slot] - before[mine]).clamp(min=0).minimum(run_ties)
    kept_per_slot = torch.zeros(n_slots, dtype=torch.int64, device=ties.device).index_add_(0, runs.slot, kept)
    return torch.where(th.partial, kept_per_slot, UNLIMITED)
