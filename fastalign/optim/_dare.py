"""DARE's random keep in torch ops, bit for bit the kernels' `_dare_keep` (kernels/online_merge.py).

Element i (its global row-major index in the whole parameter) of parameter `index` is kept at step
t (t = 0 draws τ's keep) when

    triple32(lo(i) ^ step_key ^ GOLDEN · hi(i)), read as int32, >> 1  <  keep_threshold(reserve_p)

with lo/hi the low and high 32-bit words of i, step_key = triple32(dare_key ^ t) and dare_key a
chain of triple32 over (seed low word, seed high word, index). triple32 (hash-prospector) is a
32-bit xorshift-multiply permutation whose avalanche bias, measured exhaustively, is 0.0209: the
level of a random permutation. For a fixed key the element map is triple32 after an input xor, so
it has exactly that avalanche; keys of different (seed, parameter, step) come out of the same
permutation chain. tests/test_optim.py checks keep rates, correlations and bit patterns.

The torch ops work on int32 tensors: multiplication wraps modulo 2**32 (its low 32 bits are exact),
and right shifts are made logical with a mask.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from fastalign.kernels.online_merge import GOLDEN, HASH_MULTIPLIERS, HASH_SHIFTS, keep_threshold

_M32 = 0xFFFFFFFF
_RUN = 2**31  # a chunk never crosses a multiple of this in the global index


def _triple32(x: int) -> int:
    for shift, multiplier in zip(HASH_SHIFTS, HASH_MULTIPLIERS):
        x ^= x >> shift
        x = (x * multiplier) & _M32
    return x ^ (x >> HASH_SHIFTS[-1])


def _int32(x: int) -> int:
    """The int32 with the bits of the 32-bit word x."""
    return x - 2**32 if x >= 2**31 else x


@functools.lru_cache(maxsize=1 << 16)  # the optimizer asks for every parameter's key at every step
def dare_key(seed: int, param_index: int) -> int:
    """The 32-bit key of parameter `param_index`'s keeps under `seed` (0 <= seed < 2**63)."""
    key = GOLDEN
    for word in (seed & _M32, seed >> 32, param_index & _M32):
        key = _triple32(key ^ word)
    return key


def step_key(key: int, t: int) -> int:
    """The key of one parameter's keeps at step t, from its dare_key."""
    return _triple32((key ^ t) & _M32)


def chunks(offset: int, numel: int, size: int) -> Iterator[tuple[int, int]]:
    """(begin, end) local ranges of at most `size` elements of a shard whose first element has the
    global index `offset`, cut where a global index crosses a multiple of 2**31 (so a range has one
    high word, and its low words count up without passing the int32 limit)."""
    begin = 0
    while begin < numel:
        end = min(numel, begin + size, (offset + begin) // _RUN * _RUN + _RUN - offset)
        yield begin, end
        begin = end


class KeepHasher:
    """Draws keeps in a reused int32 buffer of `size` elements: the hash inputs of several ranges of
    global indices (one per parameter shard, each with its own key) go side by side, then one pass
    of int32 ops hashes them all. The constants are 0-d int32 tensors: a Python int costs a
    conversion on every call of an int32 op."""

    def __init__(self, size: int, device: torch.device):
        const = lambda x: torch.tensor(_int32(x), dtype=torch.int32, device=device)  # noqa: E731
        self._x = torch.empty(size, dtype=torch.int32, device=device)
        self._iota = torch.arange(min(size, 4096), dtype=torch.int32, device=device)  # `start`'s first lanes
        self._rounds = [
            (const(shift), const((1 << (32 - shift)) - 1), const(m) if m is not None else None)
            for shift, m in zip(HASH_SHIFTS, (*HASH_MULTIPLIERS, None))
        ]

    def start(self, n: int) -> None:
        """Begins the inputs of a pass: 0, 1, ..., n - 1 at positions 0 .. n - 1, for `place` to shift. By
        doubling: torch.arange costs a few ns per element on a CPU, an add a fraction of one."""
        x = self._x[:n]
        done = min(n, self._iota.numel())
        x[:done] = self._iota[:done]
        while done < n:
            torch.add(x[: min(done, n - done)], done, out=x[done : 2 * done])
            done *= 2

    def place(self, at: int, key: int, offset: int, begin: int, n: int, run: int, run_stride: int) -> None:
        """Puts at positions at .. at + n - 1 (which hold at .. at + n - 1: `start`) the hash inputs, under
        the step key `key`, of local elements begin .. begin + n - 1 of a shard whose elements are runs of
        `run` consecutive global indices, `run_stride` apart, from `offset` (one run: a range from `chunks`;
        several: a shard of rows, whose parameter is under 2**31 elements)."""
        x = self._x[at : at + n]
        if run == run_stride:
            first = offset + begin
            low = _int32(first & _M32)
            x.add_(_int32((low - at) & _M32))  # the low words of first + lane (int32 adds wrap)
            x.bitwise_xor_(_int32(key ^ ((first >> 32) * GOLDEN & _M32)))
            return
        x.sub_(at - begin)
        row = torch.div(x, run, rounding_mode="floor")
        x.sub_(row * run).add_(row.mul_(run_stride)).add_(offset).bitwise_xor_(_int32(key))

    def hash(self, n: int, scratch: torch.Tensor) -> torch.Tensor:
        """[n] int32: triple32 of the first n inputs placed, in place (a view the next call
        overwrites); scratch: a buffer of at least 4n bytes."""
        x, tmp = self._x[:n], scratch.view(-1).view(torch.int32)[:n]
        for shift, mask, multiplier in self._rounds:
            torch.bitwise_right_shift(x, shift, out=tmp)
            x.bitwise_xor_(tmp.bitwise_and_(mask))
            if multiplier is not None:
                x.mul_(multiplier)
        return x

    def keep(self, n: int, keep_below: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """[n] int32: -1 where the first n inputs placed are kept, 0 where dropped (a view the next
        call overwrites); keep_below: a 0-d int32 tensor. Integer ops throughout: a comparison
        would give bool, which costs a converted copy to use."""
        # (h >> 1) - keep_below lies in (-2**31, 2**31): its sign is the keep, and >> 31 spreads it.
        return self.hash(n, scratch).bitwise_right_shift_(1).sub_(keep_below).bitwise_right_shift_(31)


# Elements per chunk: small enough that the chunk's temporaries stay in a CPU's cache.
CHUNK = 1 << 16


def dare_keep(
    seed: int, t: int, param_index: int, offset: int, numel: int, reserve_p: float, device, run=None, run_stride=None
) -> torch.Tensor:
    """[numel] bool: DARE's keep, at step t (t = 0 for τ), of the numel local elements of parameter
    `param_index` whose global indices start at `offset` (runs of `run` consecutive indices,
    `run_stride` apart, for a shard of rows; default: one range), as the kernels draw it."""
    device = torch.device(device)
    if run is None:
        run = run_stride = max(numel, 1)
    out = torch.empty(numel, dtype=torch.bool, device=device)
    size = min(CHUNK, max(numel, 1))
    hasher, scratch = KeepHasher(size, device), torch.empty(size, dtype=torch.int32, device=device)
    key = step_key(dare_key(seed, param_index), t)
    keep_below = torch.tensor(keep_threshold(reserve_p), dtype=torch.int32, device=device)
    for begin, end in chunks(offset, numel, CHUNK):
        hasher.start(end - begin)
        hasher.place(0, key, offset, begin, end - begin, run, run_stride)
        out[begin:end] = hasher.keep(end - begin, keep_below, scratch)
    return out
