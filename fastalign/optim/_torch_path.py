"""The optimizer's torch path (CPU tensors outside the Triton interpreter), and the pieces of it
every backend shares: the Philox keep of DARE, bit for bit the one the kernels draw, and the
TIES top-k mask. Construction sparsifies τ with these on every backend.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastalign.kernels.online_merge import keep_threshold
from fastalign.kernels.radix_select import RADIX_DIGITS
from fastalign.optim._launch import Launch, Slot, rescale_factors, select_counts
from fastalign.optim._select import radix_select, tie_budget

# Philox-4x32-10 with Triton's constants (triton.language.random.philox_impl).
_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
# Elements per chunk of the int64 Philox temporaries: on a CPU small enough to stay in cache, on a
# GPU large enough that launches do not dominate.
_CHUNK = {"cpu": 1 << 14, "cuda": 1 << 24}


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32 bits of a · b for a < 2**32 and int64 b < 2**32, without int64 overflow."""
    p_lo = (b & 0xFFFF).mul_(a)  # < 2**48
    p_hi = (b >> 16).mul_(a)  # < 2**48
    s = (p_hi & 0xFFFF).bitwise_left_shift_(16).add_(p_lo)
    return p_hi.bitwise_right_shift_(16).add_(s >> 32).bitwise_and_(_M32), s.bitwise_and_(_M32)


def philox(seed: int, c0, c1, c2, c3, rounds: int = 10):
    """Philox-4x32 of counters held in int64 tensors (values < 2**32), keyed by a 64-bit seed."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b.bitwise_xor_(c1).bitwise_xor_(k0), lo_b, hi_a.bitwise_xor_(c3).bitwise_xor_(k1), lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def dare_keep(seed: int, t: int, param_index: int, offset: int, numel: int, reserve_p: float, device) -> torch.Tensor:
    """[numel] bool: DARE's keep of global elements offset .. offset + numel - 1 at step t
    (t = 0 for τ), as the kernels draw it."""
    keep31 = keep_threshold(reserve_p)
    out = torch.empty(numel, dtype=torch.bool, device=device)
    chunk = _CHUNK.get(torch.device(device).type, 1 << 20)
    for c in range(0, numel, chunk):
        idx = torch.arange(offset + c, offset + min(c + chunk, numel), device=device)
        fill = torch.zeros_like(idx)
        r, _, _, _ = philox(seed, idx & _M32, idx >> 32, fill + (t & _M32), fill + (param_index & _M32))
        out[c : c + idx.numel()] = (r >> 1) < keep31
    return out


def magnitude_key(x: torch.Tensor) -> torch.Tensor:
    """int32 key of float32 x that orders like |x|."""
    return x.view(torch.int32) & 0x7FFFFFFF


def topk_masks(xs: list[torch.Tensor], ks: list[int], active: list[bool], offsets: list[int], group) -> list:
    """Keep masks of the top ks[i] magnitudes of each flat float32 shard xs[i] (None where not
    active), by the rule in _select.py, selected across `group`. Every process of the group
    must pass the same slots."""
    device = xs[0].device if xs else torch.device("cpu")
    keys = [magnitude_key(x) for x in xs]

    def histogram(prefix: torch.Tensor, shift: int, bits: int) -> torch.Tensor:
        rows = [
            torch.bincount((key[(key >> (shift + bits)) == p] >> shift) & (2**bits - 1), minlength=2**bits)
            if p >= 0
            else torch.zeros(2**bits, dtype=torch.int64, device=device)
            for key, p in zip(keys, prefix.tolist())
        ]
        return torch.stack(rows)

    active_t = torch.tensor(active, dtype=torch.bool, device=device)
    th = radix_select(
        histogram(torch.where(active_t, 0, -1), *RADIX_DIGITS[0]),
        histogram,
        torch.tensor(ks, dtype=torch.int64, device=device),
        active_t,
        group,
    )
    thresholds = th.key.tolist()
    local_ties = torch.stack([(key == T).sum() for key, T in zip(keys, thresholds)])
    budgets = tie_budget(th, local_ties, torch.tensor(offsets, dtype=torch.int64, device=device), group).tolist()
    masks = []
    for key, T, budget, on in zip(keys, thresholds, budgets, active):
        tie = key == T
        masks.append((key > T) | (tie & (tie.cumsum(0) <= budget)) if on else None)
    return masks


def nonfinite(launch: Launch, flag: torch.Tensor) -> None:
    """Sets flag to 1 if any gradient of the launch holds NaN or ±inf."""
    for s in launch.slots:
        flag.copy_(torch.maximum(flag, (~torch.isfinite(s.grad)).any().float()))


def torch_step(launch: Launch, t: torch.Tensor, step_size: torch.Tensor, skip, grad_scale) -> None:
    """The step of kernels/online_merge.py in torch ops, one slot at a time (it syncs freely: it
    is meant for CPU tensors)."""
    if skip is not None and bool(skip):
        return
    hp = launch.hp
    beta1, beta2 = hp["betas"]
    inv_scale = 1.0 / float(grad_scale) if grad_scale is not None else 1.0
    lr_wd = hp["lr"] * hp["weight_decay"]
    deltas, merges = [], []
    for s, ti, size in zip(launch.slots, t.tolist(), step_size.tolist()):
        g = s.grad.reshape(-1).float() * inv_scale
        m, v = s.exp_avg.view(-1), s.exp_avg_sq.view(-1)
        m.mul_(beta1).add_((1 - beta1) * g)
        v.mul_(beta2).add_((1 - beta2) * g * g)
        d = -size * (m / (v.sqrt() + hp["eps"]))
        merge = ti % hp["online_step"] == 0
        if s.cached_delta is not None:
            c = s.cached_delta.view(-1)
            if merge:
                d = d + c  # rolled back from the parameter below
            else:
                _update(s, d, lr_wd)
                c.add_(d)
        deltas.append(d)
        merges.append(merge)
    updates = (_dare_updates if hp["method"] == "ondare" else _ties_updates)(launch, deltas, merges, t.tolist())
    for s, upd, merge in zip(launch.slots, updates, merges):
        if merge:
            if s.cached_delta is not None:
                upd = upd - s.cached_delta.view(-1)
                s.cached_delta.zero_()
            _update(s, upd, lr_wd)


def _update(s: Slot, upd: torch.Tensor, lr_wd: float) -> None:
    """θ += upd, then the decoupled weight decay θ -= lr · wd · θ, rounded once to θ's dtype."""
    theta = s.param.view(-1).float() + upd
    s.param.view(-1).copy_(theta - lr_wd * theta)


def _dare_updates(launch: Launch, deltas, merges, ts) -> list[torch.Tensor]:
    hp = launch.hp
    p = hp["reserve_p"]
    inv_p = torch.tensor(1.0 / p, dtype=torch.float32).item()  # the kernels' float32 1/p
    kept = []
    for s, d, merge, t in zip(launch.slots, deltas, merges, ts):
        if merge and p < 1.0:
            keep = dare_keep(hp["seed"], t, s.index, s.offset, d.numel(), p, d.device) | d.isnan()
            d = torch.where(keep, d * inv_p, 0.0)
        kept.append(d)
    if hp["rescale"]:
        sums = torch.tensor(
            [[float(d.abs().sum()), float(k.abs().sum())] if merge else [0.0, 0.0] for d, k, merge in
             zip(deltas, kept, merges)], dtype=torch.float64, device=launch.device,
        )  # fmt: skip
        if launch.group is not None:
            dist.all_reduce(sums, group=launch.group)
        for i, (factor, bound) in enumerate(rescale_factors(sums, hp["eps"], hp["clip"]).tolist()):
            kept[i] = (kept[i] * factor).clamp(-bound, bound)
    alpha = hp["alpha"]
    return [
        (1 - alpha) * k + (alpha * s.ref_delta.view(-1).float() if s.ref_delta is not None else 0.0)
        for s, k in zip(launch.slots, kept)
    ]


def _ties_updates(launch: Launch, deltas, merges, ts) -> list[torch.Tensor]:
    ks, selects = select_counts(launch)
    active = [m and sel for m, sel in zip(merges, selects)]
    masks = topk_masks(deltas, ks, active, [s.offset for s in launch.slots], launch.group)
    alpha = launch.hp["alpha"]
    updates = []
    for s, d, mask in zip(launch.slots, deltas, masks):
        nan = d.isnan()
        if mask is not None:
            d = torch.where(mask | nan, d, 0.0)
        if s.ref_delta is None:
            updates.append((1 - alpha) * d)
            continue
        tau = s.ref_delta.view(-1).float()
        positive = tau + d >= 0
        tau = torch.where(torch.where(positive, tau > 0, tau < 0), tau, 0.0)
        d = torch.where(torch.where(positive, d > 0, d < 0) | nan, d, 0.0)
        updates.append(alpha * tau + (1 - alpha) * d)
    return updates
