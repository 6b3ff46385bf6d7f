"""The optimizer's torch path (CPU tensors outside the Triton interpreter), and the TIES top-k
selection that every backend shares (construction sparsifies τ with it).

The step goes through a launch in bundles: ranges of parameter shards of at most `_dare.CHUNK`
elements in all (small shards together, large ones cut). A bundle takes a fixed number of torch
ops, foreach ops over its ranges or flat ops over reused chunk-sized buffers, so the Python cost of
an op is paid per bundle, not per parameter, the temporaries stay a few chunks (in cache), and the
state is updated in place. OnTIES holds the float32 Δ of whole shards, a chunk's worth at once (or
one larger shard), while it selects. The arithmetic is the kernels' in float32 (a few roundings
ordered differently), with the same random keeps and the same top-k rule. It syncs freely: it is
meant for CPU tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from fastalign.kernels.online_merge import keep_threshold
from fastalign.kernels.radix_select import RADIX_DIGITS
from fastalign.optim._dare import CHUNK, KeepHasher, chunks, step_key
from fastalign.optim._launch import Launch, LayoutCache, Slot, cached_runs, rescale_factors
from fastalign.optim._select import Runs, radix_select, tie_budget, topk_count

Segment = tuple[Slot, int, int]  # a shard and a range [begin, end) of its elements


def magnitude_key(x: torch.Tensor) -> torch.Tensor:
    """int32 key of float32 x that orders like |x| (NaN above every magnitude)."""
    return x.view(torch.int32) & 0x7FFFFFFF


def topk_select(
    x: torch.Tensor, lengths: list[int], ks: list[int], selects: list[bool], runs: Runs, piece: int | None = None
) -> None:
    """Zeroes all but the top ks[i] magnitudes of each shard of x where selects[i], in place.

    x: flat float32, the shards side by side (`lengths`); ks[i] entries of the whole parameter are
    kept; runs: where the shards' elements sit in their parameters, and their process group. The
    rule is _select.py's (ties at the threshold go to smaller global indices); a NaN is always kept.
    The threshold comes from radix_select, as on the kernel path, with each digit's histogram built a piece of
    `piece` elements of x at a time (default: CHUNK on a CPU, 2**22 elements elsewhere, where this only sparsifies τ
    at construction), and so do the masks: the temporaries are piece-sized whatever the shards. Every process of the
    group must pass the same parameters in the same order."""
    piece = piece or (CHUNK if x.device.type == "cpu" else 1 << 22)
    n_slots, device = len(lengths), x.device
    starts = [sum(lengths[:i]) for i in range(n_slots + 1)]
    # Per piece of x: its range and its shards, one index where it lies in one shard (a large shard's pieces) or an
    # int32 tensor of each element's (a piece of small shards: one step's group of them fits in one).
    slot_ids = torch.arange(n_slots, dtype=torch.int32, device=device)
    pieces = []
    for begin in range(0, x.numel(), piece):
        end = min(begin + piece, x.numel())
        counts = [max(0, min(end, starts[i + 1]) - max(begin, starts[i])) for i in range(n_slots)]
        inside = [i for i, n in enumerate(counts) if n]
        slot = inside[0] if len(inside) == 1 else _spread(slot_ids, torch.tensor(counts, device=device))
        pieces.append((begin, end, slot))
    local = []  # each digit's histogram of this process's keys (radix_select sums them across the group in place)

    def histogram(prefix: torch.Tensor, shift: int, bits: int, _copied=None) -> torch.Tensor:  # no regions here
        bins = n_slots << bits  # the keys that do not match go to one more bin, dropped (a mask would index slowly)
        hist = torch.zeros(bins + 1, dtype=torch.int64, device=device)
        prefix32, prefixes = prefix.to(torch.int32), prefix.tolist()
        for begin, end, slot in pieces:
            key = magnitude_key(x[begin:end])
            one = isinstance(slot, int)
            # A slot that does not select has prefix -1: none of its keys match.
            match = (key >> (shift + bits)) == (prefixes[slot] if one else prefix32.index_select(0, slot))
            digit = key.bitwise_right_shift_(shift).bitwise_and_(2**bits - 1).bitwise_or_(slot << bits)
            hist += torch.bincount(torch.where(match, digit, bins), minlength=bins + 1)
        local.append(hist[:-1].view(n_slots, 2**bits))
        return local[-1].clone()

    active = torch.tensor(selects, dtype=torch.bool, device=device)
    first = histogram(torch.where(active, 0, -1), *RADIX_DIGITS[0])
    th = radix_select(first, histogram, torch.tensor(ks, dtype=torch.int64, device=device), active, runs.group)
    last_digit = (th.key & (2 ** RADIX_DIGITS[-1][1] - 1)).clamp_min(0)
    local_ties = torch.where(active, local[-1].gather(1, last_digit.view(-1, 1)).view(-1), 0)
    shard_keys = lambda i: magnitude_key(x[starts[i] : starts[i + 1]])  # noqa: E731
    budget = tie_budget(th, runs.ties(local_ties, shard_keys, torch.where(th.partial, th.key, -1)), runs)
    threshold = torch.where(active, th.key, 0).to(torch.int32)  # 0: every key is at or above it
    nan_threshold = bool((threshold > 0x7F800000).any())  # T is a NaN's key: a NaN below it stays all the same
    x_bits, thresholds = x.view(torch.int32), threshold.tolist()
    for begin, end, slot in pieces:
        t = thresholds[slot] if isinstance(slot, int) else threshold.index_select(0, slot)
        drop = (magnitude_key(x[begin:end]) - t).bitwise_right_shift_(31)  # -1 where key < T
        if nan_threshold:
            drop.mul_(~x[begin:end].isnan())
        x_bits[begin:end].bitwise_and_(drop.bitwise_not_())  # masked_fill_ bit for bit, without its slow CPU loop
    # Where some copies of T go, only the first budget[i] in index order stay. The entries zeroed above have key 0,
    # no copy of T (T = 0 drops nothing).
    for i in (budget < local_ties).nonzero().view(-1).tolist():
        keep, t = int(budget[i]), int(threshold[i])
        for begin in range(starts[i], starts[i + 1], piece):
            part = x_bits[begin : min(begin + piece, starts[i + 1])]
            copies = (magnitude_key(part.view(torch.float32)) == t).nonzero().view(-1)
            part[copies[max(keep, 0) :]] = 0
            keep -= copies.numel()


def _spread(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """values[s] repeated counts[s] times, as int32: a cumulative sum of the steps between
    consecutive shards' values, placed where each shard starts (repeat_interleave would build an
    int64 index of the whole output)."""
    n = int(counts.sum())
    steps = torch.zeros(n + 1, dtype=torch.int32, device=values.device)
    steps.index_add_(0, torch.cumsum(counts, 0) - counts, torch.diff(values, prepend=values.new_zeros(1)))
    return torch.cumsum(steps[:n], 0, dtype=torch.int32, out=steps[:n])


def nonfinite(launch: Launch, flag: torch.Tensor) -> None:
    """Sets flag to 1 if any gradient of the launch holds NaN or ±inf."""
    for s in launch.slots:
        flag.copy_(torch.maximum(flag, (~torch.isfinite(s.grad)).any().float()))


def bundles(slots: list[Slot], size: int) -> Iterator[list[Segment]]:
    """Segments of at most `size` elements in all: small shards share a bundle, large ones are cut
    (by `_dare.chunks`, so a segment's DARE hash inputs are one run of low words)."""
    bundle, total = [], 0
    for s in slots:
        for begin, end in chunks(s.offset, s.param.numel(), size):
            if bundle and total + end - begin > size:
                yield bundle
                bundle, total = [], 0
            bundle.append((s, begin, end))
            total += end - begin
    if bundle:
        yield bundle


def _views(tensors: list[torch.Tensor | None], segments: list[Segment]) -> list:
    return [None if x is None else x.view(-1)[b:e] for x, (_, b, e) in zip(tensors, segments)]


class _Step:
    """One step of one launch; the kernels' arithmetic, a bundle at a time."""

    def __init__(self, launch: Launch, grad_scale, cache: LayoutCache):
        self.launch, self.hp, self.cache = launch, launch.hp, cache
        self.inv_scale = 1.0 / float(grad_scale) if grad_scale is not None else None
        self.lr_wd = self.hp["lr"] * self.hp["weight_decay"]
        # OnDARE and plain steps take bundles of 2 chunks: fewer ops (10-15% less time on a CPU), for 3 bundle-sized
        # buffers (1.5 MiB; an eager step's temporaries are ~3 of its largest parameter); OnTIES holds more per element.
        chunk = CHUNK if self.hp["method"] == "onties" else 2 * CHUNK
        self.size = min(chunk, max(1, sum(s.param.numel() for s in launch.slots)))
        buffer = lambda: torch.empty(self.size, dtype=torch.float32, device=launch.device)  # noqa: E731
        self.delta, self.denom = buffer(), buffer()
        self.mask = self.denom  # a float 0/1 mask, made once the denominators are used up
        self.grad32 = buffer() if launch.param_dtype != torch.float32 or self.inv_scale is not None else None
        self.theta32 = buffer() if launch.param_dtype != torch.float32 else None
        self.hasher = KeepHasher(self.size, launch.device) if self.hp["reserve_p"] < 1 else None
        self.keep_below = torch.tensor(keep_threshold(self.hp["reserve_p"]), dtype=torch.int32, device=launch.device)
        self.inv_p = torch.tensor(1.0 / self.hp["reserve_p"], dtype=torch.float32).item()  # the kernels' float32 1/p
        # Scalars of foreach ops as 0-d float32 tensors (the same float32 products: a Python float costs a conversion
        # per tensor on a CPU); -1/p scales DARE's int32 keep (-1 or 0) into its float factor in one op.
        f32 = lambda x: torch.tensor(x, dtype=torch.float32, device=launch.device)  # noqa: E731
        self.betas = [f32(b) for b in self.hp["betas"]]
        self.neg_inv_p = f32(-self.inv_p)

    @staticmethod
    def split(buffer: torch.Tensor, segments: list[Segment]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the used part of a chunk buffer, its views of each segment's length)."""
        lengths = [e - b for _, b, e in segments]
        flat = buffer[: sum(lengths)]
        return flat, list(flat.split(lengths))

    def adam(self, segments: list[Segment], sizes: list[float], out_flat: torch.Tensor, out: list, store: bool = True):
        """Δ = -size · m / (√v + eps) of each segment into the views `out` (of `out_flat`, side by side); the
        moments are updated in place (into scratch copies unless `store`)."""
        beta1, beta2 = self.hp["betas"]
        grads = _views([s.grad for s, _, _ in segments], segments)
        if self.grad32 is not None:
            flat, g32 = self.split(self.grad32, segments)
            torch._foreach_copy_(g32, grads)
            if self.inv_scale is not None:
                flat.mul_(self.inv_scale)
            grads = g32
        m = _views([s.exp_avg for s, _, _ in segments], segments)
        v = _views([s.exp_avg_sq for s, _, _ in segments], segments)
        if not store:
            m, v = [x.clone() for x in m], [x.clone() for x in v]
        torch._foreach_mul_(m, self.betas[0])
        torch._foreach_add_(m, grads, alpha=1 - beta1)
        torch._foreach_mul_(v, self.betas[1])
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        flat, denom = self.split(self.denom, segments)
        torch._foreach_copy_(denom, v)
        flat.sqrt_().add_(self.hp["eps"])
        out_flat.zero_()
        torch._foreach_addcdiv_(out, m, denom, [-size for size in sizes])  # 0 + (-size) · (m / denom)
        return out

    def update(self, segments: list[Segment], upd: list[torch.Tensor], rollback: list[torch.Tensor] | None) -> None:
        """θ += upd (after θ -= rollback), then θ -= lr · wd · θ, rounded once to θ's dtype."""
        params = _views([s.param for s, _, _ in segments], segments)
        theta = params
        if self.theta32 is not None:
            _, theta = self.split(self.theta32, segments)
            torch._foreach_copy_(theta, params)
        if rollback is not None:
            torch._foreach_sub_(theta, rollback)
        torch._foreach_add_(theta, upd)
        if self.lr_wd:
            torch._foreach_add_(theta, theta, alpha=-self.lr_wd)
        if theta is not params:
            torch._foreach_copy_(params, theta)

    def merge(self, segments: list[Segment], flat: torch.Tensor, kept: list[torch.Tensor]) -> None:
        """θ += (1 - alpha) · kept + alpha · τ, rolling back and clearing the accumulated Δ."""
        alpha = self.hp["alpha"]
        if alpha:
            flat.mul_(1 - alpha)
        if any(s.ref_delta is not None for s, _, _ in segments):
            tau_flat, tau = self.tau32(segments)
            flat.add_(tau_flat, alpha=alpha)
        self.finish(segments, kept)

    def tau32(self, segments: list[Segment]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """τ of each segment (0 without τ) as float32, side by side in the denominators' buffer (a
        conversion into a buffer: a mixed-dtype foreach op would allocate it)."""
        tau_flat, tau = self.split(self.denom, segments)
        for x, (s, _, _) in zip(tau, segments):
            if s.ref_delta is None:
                x.zero_()
        with_tau = [(x, s.ref_delta.view(-1)[b:e]) for x, (s, b, e) in zip(tau, segments) if s.ref_delta is not None]
        if with_tau:
            torch._foreach_copy_([x for x, _ in with_tau], [t for _, t in with_tau])
        return tau_flat, tau

    def finish(self, segments: list[Segment], upd: list[torch.Tensor]) -> None:
        cached = _views([s.cached_delta for s, _, _ in segments], segments)
        rollback = cached if segments[0][0].cached_delta is not None else None
        self.update(segments, upd, rollback)
        if rollback is not None:
            torch._foreach_zero_(rollback)

    def ordinary(self, slots: list[Slot], sizes: dict[int, float]) -> None:
        """Steps between merges (online_step > 1): θ and the accumulated Δ take the plain Δ."""
        for segments in bundles(slots, self.size):
            flat, d = self.split(self.delta, segments)
            self.adam(segments, [sizes[id(s)] for s, _, _ in segments], flat, d)
            torch._foreach_add_(_views([s.cached_delta for s, _, _ in segments], segments), d)
            self.update(segments, d, None)

    def kept_delta(self, segments, sizes, ts, store: bool = True, sums=None) -> tuple[torch.Tensor, list]:
        """Δ (plus the accumulated Δ) of each segment after DARE's drop, scaled by 1/reserve_p; with
        `sums` ({slot id: [2] float64}), adds each shard's L1 norms of Δ before and after the drop."""
        flat, d = self.split(self.delta, segments)
        self.adam(segments, [sizes[id(s)] for s, _, _ in segments], flat, d, store)
        if segments[0][0].cached_delta is not None:
            torch._foreach_add_(d, _views([s.cached_delta for s, _, _ in segments], segments))
        if sums is not None:
            for (s, _, _), x in zip(segments, d):
                sums[id(s)][0] += x.abs().sum(dtype=torch.float64)
        if self.hasher is not None:
            self.hasher.start(flat.numel())
            at = 0
            for s, b, e in segments:
                self.hasher.place(at, step_key(s.dare_key, ts[id(s)]), s.offset, b, e - b, s.run, s.run_stride)
                at += e - b
            # A dropped NaN Δ stays NaN (NaN · 0): θ turns NaN, as AdamW's would.
            # (Δ · -1.0 or · 0.0) · -1/p, bit for bit: Δ · 1/p (negation is exact) or Δ · -0.0. (A copy converts
            # the int32 keep in place; a mixed-dtype product would allocate a converted copy first.)
            flat.mul_(self.mask[:at].copy_(self.hasher.keep(at, self.keep_below, self.mask)).mul_(self.neg_inv_p))
        if sums is not None:
            for (s, _, _), x in zip(segments, d):
                sums[id(s)][1] += x.abs().sum(dtype=torch.float64)
        return flat, d

    def dare(self, slots: list[Slot], sizes: dict[int, float], ts: dict[int, int]) -> None:
        """Merge steps of OnDARE: Δ (plus the accumulated Δ), dropped, rescaled, merged."""
        hp = self.hp
        bounds = None
        if hp["rescale"]:  # a first pass, without writing, for each shard's L1 norms of Δ
            table = torch.zeros(len(slots), 2, dtype=torch.float64, device=self.launch.device)
            sums = dict(zip(map(id, slots), table))
            for segments in bundles(slots, self.size):
                self.kept_delta(segments, sizes, ts, store=False, sums=sums)
            if self.launch.group is not None:
                dist.all_reduce(table, group=self.launch.group)
            bounds = dict(zip(map(id, slots), rescale_factors(table, hp["eps"], hp["clip"]).tolist()))
        for segments in bundles(slots, self.size):
            flat, d = self.kept_delta(segments, sizes, ts)
            if bounds is not None:
                for (s, _, _), x in zip(segments, d):
                    factor, bound = bounds[id(s)]
                    x.mul_(factor).clamp_(-bound, bound)
            self.merge(segments, flat, d)

    def ties(self, slots: list[Slot], sizes: dict[int, float]) -> None:
        """Merge steps of OnTIES: Δ of whole shards, their top k, the sign election, the merge."""
        # Δ of whole shards, a chunk's worth at once (or one larger shard): the selection of a group's small shards
        # takes a fixed number of ops, and a larger shard's goes a chunk at a time (its temporaries are chunk-sized).
        for group in _whole_groups(slots, self.size):
            lengths = [s.param.numel() for s in group]
            delta = torch.empty(sum(lengths), dtype=torch.float32, device=self.launch.device)
            whole = dict(zip(map(id, group), delta.split(lengths)))
            at = 0
            for segments in bundles(group, self.size):
                d = [whole[id(s)][b:e] for s, b, e in segments]  # side by side in delta
                n = sum(x.numel() for x in d)
                self.adam(segments, [sizes[id(s)] for s, _, _ in segments], delta[at : at + n], d)
                at += n
                if segments[0][0].cached_delta is not None:
                    torch._foreach_add_(d, _views([s.cached_delta for s, _, _ in segments], segments))
            ks = [topk_count(self.hp["reserve_p"], s.numel) for s in group]
            selects = [k < s.numel for k, s in zip(ks, group)]
            if any(selects):
                topk_select(
                    delta, lengths, ks, selects, cached_runs(self.cache, group, self.launch.group, self.launch.device)
                )
            at = 0
            for segments in bundles(group, self.size):
                n = sum(e - b for _, b, e in segments)
                self.elect(segments, delta[at : at + n])
                at += n

    def elect(self, segments: list[Segment], flat: torch.Tensor) -> None:
        """TIES's sign election and merge on a bundle's Δ (`flat`, the segments side by side): the
        sign of τ + Δ (>= 0 counts as +) wins and the entries of τ and Δ of the other sign are
        zeroed; a NaN Δ passes (NaN · 0), so θ turns NaN. A shard without τ has τ = 0."""
        d = list(flat.split([e - b for _, b, e in segments]))
        tau_flat, _ = self.tau32(segments)
        positive = torch.add(tau_flat, flat, out=self.delta[: flat.numel()]) >= 0  # (the chunk buffer is free)
        # masked_fill_(mask, 0.0) bit for bit, as an int32 product with ~mask (much faster on a CPU)
        flat.view(torch.int32).mul_(torch.eq(flat > 0, positive))
        tau_flat.view(torch.int32).mul_(torch.eq(tau_flat > 0, positive))
        alpha = self.hp["alpha"]
        flat.mul_(1 - alpha).add_(tau_flat, alpha=alpha)
        self.finish(segments, d)


def _whole_groups(slots: list[Slot], size: int) -> Iterator[list[Slot]]:
    """Whole shards in groups of at most `size` elements in all, or one larger shard alone."""
    group, total = [], 0
    for s in slots:
        n = s.param.numel()
        if group and total + n > size:
            yield group
            group, total = [], 0
        group.append(s)
        total += n
    if group:
        yield group


def torch_step(launch: Launch, t: torch.Tensor, step_size: torch.Tensor, skip, grad_scale, cache: LayoutCache) -> None:
    """The step of kernels/online_merge.py in torch ops; cache keeps what depends on the layout only."""
    if skip is not None and bool(skip):
        return
    step = _Step(launch, grad_scale, cache)
    ts = {id(s): ti for s, ti in zip(launch.slots, t.tolist())}
    sizes = {id(s): size for s, size in zip(launch.slots, step_size.tolist())}
    merging = [s for s in launch.slots if ts[id(s)] % launch.hp["online_step"] == 0]
    ordinary = [s for s in launch.slots if ts[id(s)] % launch.hp["online_step"]]
    if ordinary:
        step.ordinary(ordinary, sizes)
    if merging:
        (step.dare(merging, sizes, ts) if launch.hp["method"] == "ondare" else step.ties(merging, sizes))
