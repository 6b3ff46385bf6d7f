"""One launch of the optimizer step: the parameter shards of one param group that share a
device, dtypes and process group, and the kernel path that runs them (tables in, kernels out)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fastalign.kernels import online_merge as K
from fastalign.kernels.radix_select import RADIX_DIGITS, candidate_regions, radix_histogram
from fastalign.optim._select import Runs, radix_select, tie_budget, topk_count


@dataclass
class Slot:
    """One parameter shard in a launch; every tensor is the local, contiguous one."""

    param: torch.Tensor  # updated in place
    grad: torch.Tensor
    exp_avg: torch.Tensor  # fp32
    exp_avg_sq: torch.Tensor  # fp32
    ref_delta: torch.Tensor | None  # τ, bf16 or fp32
    cached_delta: torch.Tensor | None  # fp32, when online_step > 1
    step: torch.Tensor  # [] fp32, the number of steps taken
    offset: int  # global index of the first local element
    run: int  # the local elements are runs of `run` consecutive global indices ...
    run_stride: int  # ... `run_stride` apart (one run: equal), see _layout.py
    numel: int  # elements of the whole parameter
    dare_key: int  # key of the parameter's DARE keeps (_dare.dare_key of the seed and its index)


@dataclass
class Launch:
    hp: dict  # the param group: its hyperparameters
    slots: list[Slot]
    group: Any  # process group holding the other shards, or None
    device: torch.device
    param_dtype: torch.dtype
    tau_dtype: torch.dtype | None


class LayoutCache:
    """What steps keep per layout of a launch's shards: kernel tables and TIES runs (which depend
    on nothing else) and TIES's threshold guesses (any guess gives the same result). Only the
    entries that this step or the one before used are kept: the layouts change whenever the set of
    parameters with gradients does (unused MoE experts, frozen layers), so keeping every layout
    ever seen would grow without bound, while a fixed number of entries could drop some that the
    current step, however many launches it has, is still using."""

    def __init__(self) -> None:
        self.current: dict = {}  # used by this step
        self.previous: dict = {}  # used by the step before, not yet by this one

    def new_step(self) -> None:
        self.previous, self.current = self.current, {}

    def get(self, key):
        if key in self.previous:
            self.current[key] = self.previous.pop(key)
        return self.current.get(key)

    def __setitem__(self, key, value) -> None:
        self.current[key] = value

    def __len__(self) -> int:
        return len(self.current) + len(self.previous)


def step_sizes(launch: Launch) -> tuple[torch.Tensor, torch.Tensor]:
    """([S] int64 step number t being taken, [S] fp32 lr · sqrt(1 - beta2^t) / (1 - beta1^t)),
    computed on the device in float64 from the step counters, without a sync."""
    t = torch.stack([s.step for s in launch.slots]).double() + 1
    beta1, beta2 = launch.hp["betas"]
    step_size = launch.hp["lr"] * torch.sqrt(1 - beta2**t) / (1 - beta1**t)
    return t.long(), step_size.float()


def rescale_factors(sums: torch.Tensor, eps: float, clip: float) -> torch.Tensor:
    """[S, 2] fp32 (factor, clip bound) from [S, 2] (L1 of Δ before the drop, after it): the
    kept Δ is scaled back to the L1 norm it had, then clamped to ±clip; a Δ whose norm is below
    1e-8 is left as dropped, unclamped (the official implementation's rule)."""
    before, after = sums[:, 0], sums[:, 1]
    on = before >= 1e-8
    factor = torch.where(on, before / (after + eps), 1.0)
    bound = torch.where(on, clip, float("inf"))
    return torch.stack([factor, bound], 1).float()


def select_counts(launch: Launch) -> tuple[list[int], list[bool]]:
    """Per slot: how many entries TIES keeps, and whether that is fewer than all (a selection)."""
    ks = [topk_count(launch.hp["reserve_p"], s.numel) for s in launch.slots]
    return ks, [k < s.numel for k, s in zip(ks, launch.slots)]


# ----------------------------------------------------------------------------- kernel path


@dataclass
class Tables:
    """The flat index space of a launch: slots start on BLOCK boundaries; two tilings of it."""

    flat_offsets: list[int]
    dare_tiles: torch.Tensor  # [n, 3] int64 (slot, begin, end)
    ties_tiles: torch.Tensor
    dare_ranges: torch.Tensor  # [S, 2] int64: each slot's tiles are rows [first, end) of dare_tiles
    ties_ranges: torch.Tensor
    ties_regions: torch.Tensor  # [n, 2] int64: each TIES tile's candidate region in the Δ buffer (radix_select.py)
    delta_numel: int  # the Δ buffer: the flat space, then the candidate regions


def build_tables(numels: list[int], device: torch.device) -> Tables:
    offsets, flat = [], 0
    for n in numels:
        offsets.append(flat)
        flat += -(-n // K.BLOCK) * K.BLOCK

    def tiling(tile: int) -> tuple[list, list]:
        rows, ranges = [], []
        for slot, (off, n) in enumerate(zip(offsets, numels)):
            first = len(rows)
            rows += [(slot, off + b, off + min(b + tile, n)) for b in range(0, n, tile)]
            ranges.append((first, len(rows)))
        return rows, ranges

    as_tensor = lambda x, cols: torch.tensor(x, dtype=torch.int64).view(-1, cols).to(device)  # noqa: E731
    dare_tiles, dare_ranges = tiling(K.DARE_TILE)
    ties_tiles, ties_ranges = tiling(K.TIES_TILE)
    regions, delta_numel = candidate_regions(ties_tiles, flat)
    return Tables(
        offsets, as_tensor(dare_tiles, 3), as_tensor(ties_tiles, 3), as_tensor(dare_ranges, 2),
        as_tensor(ties_ranges, 2), as_tensor(regions, 2), delta_numel,
    )  # fmt: skip


def _to_device(rows: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":  # pinned, so the copy does not make the host wait for the GPU
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _segments(values: torch.Tensor, ranges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-slot sums, per-tile exclusive prefix within its slot) of per-tile values, in a fixed
    order (no atomics), so the result does not vary from run to run."""
    cs = torch.cat([values.new_zeros(1, *values.shape[1:]), values.cumsum(0)])
    per_slot = cs[ranges[:, 1]] - cs[ranges[:, 0]]
    first = torch.repeat_interleave(ranges[:, 0], ranges[:, 1] - ranges[:, 0], output_size=values.shape[0])
    return per_slot, cs[:-1] - cs[first]


def _tables(launch: Launch, cache: LayoutCache) -> Tables:
    """The launch's tables, built once per layout of local sizes."""
    numels = [s.param.numel() for s in launch.slots]
    key = (tuple(numels), launch.device)
    tables = cache.get(key)
    if tables is None:
        tables = cache[key] = build_tables(numels, launch.device)
    return tables


def cached_runs(cache: LayoutCache, slots: list[Slot], group, device) -> Runs:
    """The runs of these shards for the TIES tie rule, built once per layout of shards (a collective); both paths'."""
    shards = [(s.offset, s.param.numel(), s.run, s.run_stride) for s in slots]
    key = ("runs", tuple(shards), device, id(group))
    runs = cache.get(key)
    if runs is None:
        runs = cache[key] = Runs.of(shards, group, device)
    return runs


def kernel_step(
    launch: Launch, t: torch.Tensor, step_size: torch.Tensor, skip: torch.Tensor, grad_scale: torch.Tensor, cache
) -> None:
    tables = _tables(launch, cache)
    rows = [
        [
            s.param.data_ptr(),
            s.grad.data_ptr(),
            s.exp_avg.data_ptr(),
            s.exp_avg_sq.data_ptr(),
            0 if s.ref_delta is None else s.ref_delta.data_ptr(),
            0 if s.cached_delta is None else s.cached_delta.data_ptr(),
            off,
            s.offset,
            s.run,
            s.run_stride,
            s.dare_key,
        ]
        for s, off in zip(launch.slots, tables.flat_offsets)
    ]
    aligned = all(address % 16 == 0 for row in rows for address in row[:6])
    slots = _to_device(rows, torch.int64, launch.device)
    hp = launch.hp
    beta1, beta2 = hp["betas"]
    common = dict(beta1=beta1, beta2=beta2, eps=hp["eps"], online_step=hp["online_step"], aligned=aligned)
    lr_wd = hp["lr"] * hp["weight_decay"]

    if hp["method"] == "ondare":
        dare = dict(common, param_dtype=launch.param_dtype, tau_dtype=launch.tau_dtype, lr_wd=lr_wd, alpha=hp["alpha"])
        dare.update(reserve_p=hp["reserve_p"])
        rescale = None
        if hp["rescale"]:
            sums = K.ondare_step(slots, tables.dare_tiles, step_size, t, skip, grad_scale, sums_only=True, **dare)
            slot_sums, _ = _segments(sums.double(), tables.dare_ranges)
            if launch.group is not None:
                dist.all_reduce(slot_sums, group=launch.group)
            rescale = rescale_factors(slot_sums, hp["eps"], hp["clip"])
        K.ondare_step(slots, tables.dare_tiles, step_size, t, skip, grad_scale, rescale=rescale, **dare)
        return

    if hp["online_step"] > 1:  # the slots on an ordinary step take the plain Δ
        K.ondare_step(
            slots, tables.dare_tiles, step_size, t, skip, grad_scale, param_dtype=launch.param_dtype,
            tau_dtype=None, lr_wd=lr_wd, alpha=0.0, reserve_p=1.0, ordinary_only=True, **common,
        )  # fmt: skip
    tile_slot = tables.ties_tiles[:, 0]
    candidates = torch.empty_like(tile_slot)
    # The threshold's top digit rarely moves between merges (unchanged in about 9 of 10 on a GPT-2 run): guessing the
    # last one lets the Δ pass copy the keys under it to the candidate regions, with no histogram and no pass over Δ
    # to copy them. A slot whose threshold moved has its top digit histogrammed again (radix_select).
    guess_key = ("ties_guess", *(s.param.data_ptr() for s in launch.slots))
    guess = cache.get(guess_key)
    delta, first_hist = K.ties_delta(
        slots, tables.ties_tiles, step_size, t, skip, grad_scale, tables.delta_numel, param_dtype=launch.param_dtype,
        guess=None if guess is None else (guess, tables.ties_regions, candidates), **common,
    )  # fmt: skip
    ks, selects = select_counts(launch)
    merge = t % hp["online_step"] == 0
    select = merge & _to_device(selects, torch.bool, launch.device)
    last_shift, last_bits = RADIX_DIGITS[-1]
    tile_hist = torch.empty(tile_slot.numel(), 2**last_bits, dtype=torch.int64, device=launch.device)
    th = radix_select(
        first_hist,
        lambda prefix, shift, bits, copied: radix_histogram(
            delta,
            tables.ties_tiles,
            tables.ties_regions,
            candidates,
            prefix,
            shift,
            bits,
            tile_hist if shift == last_shift else None,
            copied,
        ),
        _to_device(ks, torch.int64, launch.device),
        select,
        launch.group,
        guess,
    )
    new_guess = th.key >> RADIX_DIGITS[0][0]
    cache[guess_key] = torch.where(select & (skip == 0), new_guess, -1 if guess is None else guess)
    # The last digit's per-tile counts in the threshold key's bin are its copies per tile; they matter only where some
    # copies are dropped.
    last_digit = (th.key & (2**last_bits - 1)).clamp_min(0)
    tile_ties = tile_hist.gather(1, last_digit[tile_slot, None]).squeeze(1)
    tile_ties = torch.where(th.partial[tile_slot], tile_ties, 0)
    local_ties, ties_before = _segments(tile_ties, tables.ties_ranges)
    runs = cached_runs(cache, launch.slots, launch.group, launch.device)
    keys = lambda i: (
        delta[tables.flat_offsets[i] : tables.flat_offsets[i] + launch.slots[i].param.numel()].view(  # noqa: E731
            torch.int32
        )
        & 0x7FFFFFFF
    )
    counted = torch.where(th.partial, th.key, -1)
    slot_budget = tie_budget(th, runs.ties(local_ties, keys, counted), runs)
    tile_budget = slot_budget[tables.ties_tiles[:, 0]] - ties_before
    # Slots that keep everything have threshold key 0 and no budget limit; ordinary steps skip.
    threshold = torch.where(merge, torch.where(select, th.key, 0), -1)
    K.ties_apply(
        slots, tables.ties_tiles, delta, threshold, tile_budget, skip, param_dtype=launch.param_dtype,
        tau_dtype=launch.tau_dtype, lr_wd=lr_wd, alpha=hp["alpha"], online_step=hp["online_step"], aligned=aligned,
    )  # fmt: skip


def kernel_nonfinite(launch: Launch, flag: torch.Tensor, cache) -> None:
    tables = _tables(launch, cache)
    rows = [[0, s.grad.data_ptr(), 0, 0, 0, 0, off, 0, 1, 1, 0] for s, off in zip(launch.slots, tables.flat_offsets)]
    aligned = all(row[1] % 16 == 0 for row in rows)
    slots = _to_device(rows, torch.int64, launch.device)
    K.nonfinite(slots, tables.dare_tiles, flag, param_dtype=launch.param_dtype, aligned=aligned)
