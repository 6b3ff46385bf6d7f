"""Exact top-k thresholds by radix select over the bits of float32 magnitudes, without a sort.

A float32's magnitude |x| orders exactly like the integer `bits(x) & 0x7fffffff` (its 31 low
bits), so the k-th largest magnitude is found one digit at a time: histogram the top digit of
every key, pick the bin that holds the k-th largest, then histogram the next digit of the keys
that share the chosen prefix, and so on. Four digits (RADIX_DIGITS) cover the 31 bits.

Keys live in one flat float32 buffer per launch, cut into tiles that never straddle two
segments ("slots", one per parameter shard): `tiles` is [n_tiles, 3] int64 rows
(slot, begin, end) of flat offsets. Each program histograms one tile and adds its counts into
its slot's row with one vector of atomics, so the histograms are [n_slots, bins] and can be
all-reduced across a device mesh before the host-side (but sync-free) selection picks the digit.
At the last digit each program also stores its own counts: the tile's count in the chosen bin is
its number of copies of the threshold key, which the tie rule needs per tile.

Only the keys that match the digits chosen so far count, and after the first digit they are few. So a pass copies
each tile's matching keys (its candidates) into a region of the key buffer after the keys (`candidate_regions`), and
the second and later digits' passes read a tile's region instead of the tile when its candidates fit: they move a
fraction of the bytes and histogram a fraction of the keys. From an optimizer's second merge on, the pass that makes
the keys copies them under a guessed first digit (online_merge.py), and the copy pass here skips the slots whose
guess held (`copied`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, LaunchCase, meta, on_tensors_device

# (shift, bits) of each digit of the 31-bit magnitude key, most significant first. The first digit is histogrammed (or
# guessed) in the Δ pass (online_merge's _ties_delta_kernel); each later one costs a pass over the keys (4 bytes per
# key), so the digits are as wide as tl.histogram stays cheap. Triton 3.9 lowers it to shared-memory atomics: a 2048-bin
# histogram of 1024 keys is 87 SASS instructions, and the passes stay memory-bound. Earlier versions (the GPU image's
# 3.6) lower it to ballots and popcounts whose cost grows with the bins (issue 11: with digits of 11, 10 and 10 bits the
# passes were issue-bound, OnTIES predicted at 39% of copy bandwidth on the H100): one more pass with narrow digits
# costs less there.
SHARED_MEMORY_DIGITS = ((21, 10), (10, 11), (0, 10))
BALLOT_DIGITS = ((21, 10), (14, 7), (7, 7), (0, 7))
_SHARED_MEMORY_HISTOGRAM = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9)
RADIX_DIGITS = SHARED_MEMORY_DIGITS if _SHARED_MEMORY_HISTOGRAM else BALLOT_DIGITS

# Elements per loop iteration. Tiles are long (see the optimizer's TIES_TILE) so that each
# program pays its 2**bits histogram atomics once per many elements.
_BLOCK = 128 if INTERPRET else 1024
_NUM_WARPS = 4

# A tile's candidate region holds 1/CANDIDATE_SHARE of its keys (rounded up to a BLOCK): 0.5 bytes per fp32 key of
# extra memory. On AdamW's Δ the first digit's chosen bin holds 6-11% of a parameter's entries once training is past
# its first few steps (measured on a GPT-2 model, reserve_p 0.1 to 0.5); at step 1 every |Δ| is about lr and the bin
# holds them all. A tile whose candidates do not fit is read whole by the later digits, as without regions.
CANDIDATE_SHARE = 8
_SCAN_ROWS = tl.constexpr(8)

# What a launch of _radix_histogram_kernel does (its PASS), digit by digit (`radix_histogram`):
# - HISTOGRAM_TILES: histogram the digit among each tile's keys (the first digit, where a guess missed);
# - COPY_CANDIDATES: copy each tile's keys that match the prefix to its region and count them (the second digit,
#   before its histogram);
# - HISTOGRAM_CANDIDATES: histogram the digit among a tile's region where its candidates fit, else among the tile.
HISTOGRAM_TILES, COPY_CANDIDATES, HISTOGRAM_CANDIDATES = (tl.constexpr(i) for i in range(3))


def candidate_regions(tiles: list[tuple[int, int, int]], start: int) -> tuple[list[tuple[int, int]], int]:
    """(offset, capacity) of each tile's candidate region, placed from `start` (the end of the keys, a multiple of
    BLOCK) on, and the end of the last region: the size the key buffer needs. tiles: (slot, begin, end) rows."""
    if start % _BLOCK:  # the kernel tells the compiler a region starts on a BLOCK: its loads are 16-byte wide
        raise ValueError(f"candidate regions must start on a multiple of {_BLOCK} elements; got {start}")
    regions, at = [], start
    for _, begin, end in tiles:
        capacity = -(-(end - begin) // (CANDIDATE_SHARE * _BLOCK)) * _BLOCK
        regions.append((at, capacity))
        at += capacity
    return regions, at


@triton.jit
def _magnitude_key(x):
    """Integer key that orders like |x| for float32 x: its 31 low bits."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _load_keys(p_x, o_x, end, MASKED: tl.constexpr):
    """Keys of one block: unmasked (vectorized) inside a tile, masked on its ragged tail."""
    if MASKED:
        return _magnitude_key(tl.load(p_x + o_x, mask=o_x < end, other=0.0)), o_x < end
    else:
        return _magnitude_key(tl.load(p_x + o_x)), o_x >= 0


@triton.jit
def _tile_bounds(p_tiles, i_t, BLOCK: tl.constexpr):
    """(slot, begin, end of the unmasked blocks, end) of tile i_t; tiles begin on a block boundary."""
    slot = tl.load(p_tiles + i_t * 3)
    begin = tl.multiple_of(tl.load(p_tiles + i_t * 3 + 1), BLOCK)
    end = tl.load(p_tiles + i_t * 3 + 2)
    return slot, begin, begin + (end - begin) // BLOCK * BLOCK, end


@triton.jit
def _matching_keys(p_x, o_x, end, prefix, SHIFT: tl.constexpr, BITS: tl.constexpr, MASKED: tl.constexpr):
    """(keys of the block, mask of those whose bits above the digit equal prefix)."""
    key, m_x = _load_keys(p_x, o_x, end, MASKED)
    return key, m_x & ((key >> (SHIFT + BITS)).to(tl.int64) == prefix)


@triton.jit
def _histogram_block(p_x, o_x, end, prefix, SHIFT: tl.constexpr, BITS: tl.constexpr, MASKED: tl.constexpr):
    """Histogram of the digit among the block's keys that match the prefix."""
    key, m_match = _matching_keys(p_x, o_x, end, prefix, SHIFT, BITS, MASKED)
    return tl.histogram((key >> SHIFT) & (2**BITS - 1), 2**BITS, mask=m_match)


@triton.jit
def append_candidates(key, m_match, p_region, capacity, written):
    """Appends the keys where m_match holds to a tile's region, as fp32 bits (in any order: only counts matter), where
    they fit; returns the candidates counted so far (written: before this block)."""
    # Positions by a scan along rows of the block plus each row's start: under triton 3.6 a scan of all 1024 keys at
    # once costs 280 more SASS instructions per block (984 against 703, sm_90); under 3.9 they are even.
    shape: tl.constexpr = [_SCAN_ROWS, key.shape[0] // _SCAN_ROWS]
    match = tl.reshape(m_match.to(tl.int32), shape)
    per_row = tl.sum(match, 1)
    at = written + (tl.cumsum(per_row, 0) - per_row)[:, None] + tl.cumsum(match, 1) - 1
    bits = tl.reshape(key, shape).to(tl.float32, bitcast=True)
    tl.store(p_region + at, bits, mask=(match != 0) & (at < capacity))
    return written + tl.sum(per_row, 0)


@triton.jit
def _compact_block(
    p_x, o_x, end, prefix, p_region, capacity, written, SHIFT: tl.constexpr, BITS: tl.constexpr, MASKED: tl.constexpr
):  # fmt: skip
    """Appends the block's keys that match the prefix to the tile's region; returns the candidates counted so far."""
    key, m_match = _matching_keys(p_x, o_x, end, prefix, SHIFT, BITS, MASKED)
    return append_candidates(key, m_match, p_region, capacity, written)


@triton.jit
def _radix_histogram_kernel(
    p_x,  # [N] fp32: the values whose magnitudes are ranked, then the tiles' candidate regions
    p_tiles,  # [n_tiles, 3] int64: (slot, begin, end) flat offsets, begin a multiple of BLOCK
    p_regions,  # [n_tiles, 2] int64: (offset in p_x, a multiple of BLOCK; capacity) of each tile's candidate region
    p_count,  # [n_tiles] int64: candidates in each tile's region, -1 where they did not fit (COPY_CANDIDATES writes)
    p_prefix,  # [S] int64: the key bits above this digit chosen so far; < 0 skips the slot
    p_hist,  # [S, 2**BITS] int64, accumulated into (not by COPY_CANDIDATES)
    p_tile_hist,  # [n_tiles, 2**BITS] int64 out, if TILE_COUNTS: each tile's own counts (0 where skipped)
    SHIFT: tl.constexpr,
    BITS: tl.constexpr,
    TILE_COUNTS: tl.constexpr,
    PASS: tl.constexpr,  # HISTOGRAM_TILES, COPY_CANDIDATES or HISTOGRAM_CANDIDATES
    BLOCK: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    slot, begin, full_end, end = _tile_bounds(p_tiles, i_t, BLOCK)
    prefix = tl.load(p_prefix + slot)
    b_hist = tl.zeros([2**BITS], dtype=tl.int32)
    if prefix >= 0:
        region = tl.multiple_of(tl.load(p_regions + i_t * 2), BLOCK)
        if PASS == COPY_CANDIDATES:
            capacity = tl.load(p_regions + i_t * 2 + 1).to(tl.int32)
            written = tl.zeros((), tl.int32)
            for b0 in range(begin, full_end, BLOCK):
                written = _compact_block(
                    p_x, b0 + tl.arange(0, BLOCK), end, prefix, p_x + region, capacity, written, SHIFT, BITS, False
                )
            if full_end < end:
                written = _compact_block(
                    p_x, full_end + tl.arange(0, BLOCK), end, prefix, p_x + region, capacity, written, SHIFT, BITS,
                    True,
                )  # fmt: skip
            tl.store(p_count + i_t, tl.where(written <= capacity, written, -1))
        else:
            if PASS == HISTOGRAM_CANDIDATES:
                count = tl.load(p_count + i_t)
                if count >= 0:  # the tile's candidates fit its region: read them, not the tile
                    begin = region
                    end = region + count
                full_end = begin + (end - begin) // BLOCK * BLOCK
            begin = tl.multiple_of(begin, BLOCK)
            for b0 in range(begin, full_end, BLOCK):
                b_hist += _histogram_block(p_x, b0 + tl.arange(0, BLOCK), end, prefix, SHIFT, BITS, False)
            if full_end < end:
                b_hist += _histogram_block(p_x, full_end + tl.arange(0, BLOCK), end, prefix, SHIFT, BITS, True)
            tl.atomic_add(p_hist + slot * 2**BITS + tl.arange(0, 2**BITS), b_hist.to(tl.int64), sem="relaxed")
    if TILE_COUNTS:
        tl.store(p_tile_hist + i_t * 2**BITS + tl.arange(0, 2**BITS), b_hist.to(tl.int64))


@on_tensors_device
def radix_histogram(
    x: torch.Tensor,
    tiles: torch.Tensor,
    regions: torch.Tensor,
    count: torch.Tensor,
    prefix: torch.Tensor,
    shift: int,
    bits: int,
    tile_hist: torch.Tensor | None = None,
    copied: torch.Tensor | None = None,
) -> torch.Tensor:
    """[S, 2**bits] int64 counts of digit (key >> shift) among each slot's keys whose bits above the digit equal
    prefix[slot]. x: fp32 keys, then the candidate regions; tiles: [n_tiles, 3] int64; regions: [n_tiles, 2] int64
    from `candidate_regions`; count: [n_tiles] int64, which the second digit (RADIX_DIGITS[1]) fills before its
    histogram and the later digits read; prefix: [S] int64; tile_hist: [n_tiles, 2**bits] int64, if given, receives
    each tile's own counts (a zero row where its slot's prefix is < 0); copied: [S] bool, the slots whose candidates
    are in their regions already (the Δ pass copied the keys under a guessed first digit that held). The digits are
    histogrammed in RADIX_DIGITS order."""
    hist = torch.zeros(prefix.numel(), 2**bits, dtype=torch.int64, device=x.device)
    # The second digit first copies each tile's candidates (but the slots `copied` already), then histograms them from
    # the regions as the later digits do. Under triton 3.6, whose histograms are ballots, one pass that did both issued
    # 703 SASS instructions per block (sm_90), more than its 4 bytes per key take on an H200; the copy alone issues 288,
    # the histogram of a region 473 per block of candidates (an eighth of the keys at most).
    digit = RADIX_DIGITS.index((shift, bits))
    passes = {0: (HISTOGRAM_TILES,), 1: (COPY_CANDIDATES, HISTOGRAM_CANDIDATES)}.get(digit, (HISTOGRAM_CANDIDATES,))
    for pass_ in passes:
        copies = pass_ is COPY_CANDIDATES
        if tiles.shape[0]:
            _radix_histogram_kernel[(tiles.shape[0],)](
                x,
                tiles,
                regions,
                count,
                prefix if not copies or copied is None else torch.where(copied, -1, prefix),
                hist,
                hist if tile_hist is None else tile_hist,
                SHIFT=shift,
                BITS=bits,
                TILE_COUNTS=tile_hist is not None and not copies,
                PASS=pass_.value,
                BLOCK=_BLOCK,
                num_warps=_NUM_WARPS,
            )
    return hist


def compile_specs() -> list[LaunchCase]:
    """The digits after the first (the producer histograms that) over 1B keys in 256K-key tiles; kernels/online_merge.py
    launches them within the OnTIES step too."""

    def launch() -> None:
        tiles, per_slot = meta(2**12, 3, dtype=torch.int64), meta(114, dtype=torch.int64)
        regions, count = meta(2**12, 2, dtype=torch.int64), meta(2**12, dtype=torch.int64)
        keys = meta(2**30 + 2**30 // CANDIDATE_SHARE)
        for shift, bits in RADIX_DIGITS[1:-1]:
            radix_histogram(keys, tiles, regions, count, per_slot, shift, bits)
        shift, bits = RADIX_DIGITS[-1]
        radix_histogram(keys, tiles, regions, count, per_slot, shift, bits, meta(2**12, 2**bits, dtype=torch.int64))

    return [LaunchCase("fp32 keys=2^30 tiles=4096", launch)]
