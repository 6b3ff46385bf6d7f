"""Worker of tests/test_logprobs.py::test_vocab_parallel_logits: one of 2 or 4 gloo processes on the CPU.

Every rank builds the same logits and labels, runs token_stats on a DTensor of them sharded on the vocabulary
(Shard(-1)) and compares the results and d logits with the same op on the whole tensor in this process (one
unsharded process). V = 1001 splits unevenly over 2 and 4 ranks; labels fall in every slice; some rows are ignored;
one row has a slice of -inf logits only (a banned range) and one is near-certain.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from utils import GRAD_RTOL, VALUE_RTOL, rel_err

import fastalign
from fastalign._backend import forced_backend

B, T, V = 3, 9, 1001
IGNORE = -100


def inputs(world: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(B, T, V, generator=gen) * 3).to(dtype)
    per_rank = -(-V // world)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, : world * 2] = torch.arange(world * 2) * (per_rank // 2)  # two labels in every slice, first ids included
    labels[1, 0] = V - 1
    labels[2, :3] = IGNORE
    logits[1, 1, :per_rank] = float("-inf")  # rank 0's whole slice banned (not the label)
    labels[1, 1] = V - 2
    logits[1, 2, labels[1, 2]] = 40.0  # p of the label ~ 1
    return logits, labels


def check(stats: fastalign.TokenStats, expected: fastalign.TokenStats) -> None:
    for name in ("logprobs", "entropy", "log_sum_sq_probs", "mean_logits"):
        got, want = getattr(stats, name), getattr(expected, name)
        if want is None:
            assert got is None, name
            continue
        assert type(got) is torch.Tensor and got.shape == want.shape and got.dtype == want.dtype, name
        finite = torch.isfinite(want)  # the row with -inf logits has a -inf mean
        assert torch.equal(got[~finite], want[~finite]), name
        assert rel_err(got[finite], want[finite]) < VALUE_RTOL[torch.float32] * 10, (name, rel_err(got, want))
    assert (stats.argmax is None) == (expected.argmax is None)
    if expected.argmax is not None:
        assert torch.equal(stats.argmax, expected.argmax)


def main(rank: int, backend: str, world: int) -> None:
    mesh = init_device_mesh("cpu", (world,))
    with forced_backend("torch") if backend == "torch" else contextlib.nullcontext():
        for dtype in (torch.float32, torch.bfloat16):
            logits, labels = inputs(world, dtype)
            gen = torch.Generator().manual_seed(8)
            g, ge = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
            for extras in (True, False):  # token_stats with every extra; token_logprobs (ignored rows skipped)
                kwargs = dict(temperature=0.7, entropy=extras, argmax=extras, log_sum_sq_probs=extras)
                kwargs |= dict(mean_logits=extras)
                whole = logits.clone().requires_grad_(True)
                expected = fastalign.token_stats(whole, labels, **kwargs)
                loss = (expected.logprobs * g).sum() + ((expected.entropy * ge).sum() if extras else 0)
                loss.backward()

                sharded = distribute_tensor(logits, mesh, [Shard(-1)]).requires_grad_(True)
                assert sharded.to_local().shape[-1] < V
                stats = fastalign.token_stats(sharded, labels, **kwargs)
                check(stats, expected)
                loss = (stats.logprobs * g).sum() + ((stats.entropy * ge).sum() if extras else 0)
                loss.backward()
                # This rank's slice only, in the logits' own layout: nothing gathered (torch 2.11's to_local did).
                assert sharded.grad.placements == (Shard(2),) and sharded.grad.stride() == sharded.stride()
                assert sharded.grad.to_local().shape == sharded.to_local().shape
                grad = sharded.grad.full_tensor()
                assert torch.isfinite(grad).all()
                assert rel_err(grad, whole.grad) < GRAD_RTOL[dtype], rel_err(grad, whole.grad)
                assert (grad[2, :3] == 0).all() or extras  # ignored rows: no gradient without the entropy's
            # In place: d logits overwrites the local buffer of the (non-leaf) DTensor logits; same as token_logprobs.
            leaf = distribute_tensor(logits, mesh, [Shard(-1)]).requires_grad_(True)
            logp = fastalign.token_logprobs(leaf * 1, labels, temperature=0.7, inplace_backward=True)
            (logp * g).sum().backward()
            assert torch.equal(leaf.grad.full_tensor(), grad)

        logits, labels = inputs(world, torch.float32)
        with contextlib.suppress(ValueError):
            fastalign.token_logprobs(distribute_tensor(logits, mesh, [Replicate()]), labels)
            raise AssertionError("replicated DTensor logits must raise")
        bad = labels.clone()
        bad[0, 0] = V  # beyond the whole vocabulary, though inside no slice either
        with contextlib.suppress(ValueError):
            fastalign.token_logprobs(distribute_tensor(logits, mesh, [Shard(-1)]), bad)
            raise AssertionError("a label outside [0, V) must raise on the CPU")
