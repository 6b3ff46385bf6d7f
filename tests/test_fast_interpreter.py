"""tests/fast_interpreter.py only removes work: kernels give the same bits with triton's own patching."""

from __future__ import annotations

import os

import fast_interpreter
import pytest
import torch

import fastalign
from fastalign.optim import OnlineMergeAdamW

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's patching")


def run_kernels() -> list[torch.Tensor]:
    """Token log-probs with extras, forward and backward, and two OnTIES steps (radix select, tl.zeros)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 33, 515, generator=gen, requires_grad=True)
    labels = torch.randint(0, 515, (2, 33), generator=gen)
    out = fastalign.token_stats(logits, labels, entropy=True, argmax=True)
    (out.logprobs.sum() * 0.5 + out.entropy.sum()).backward()
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(1000,), (37, 3)]]
    taus = [torch.randn(p.shape, generator=gen) * 0.02 for p in params]
    opt = OnlineMergeAdamW(params, lr=0.01, method="onties", reserve_p=0.3, ref_delta=taus)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [out.logprobs, out.entropy, out.argmax, logits.grad, *params]


def test_results_are_bit_identical_with_triton_own_patching():
    assert fast_interpreter.patch_language_once_per_launch(), "triton's interpreter internals changed: update it"
    ours = run_kernels()
    fast_interpreter.unpatch()
    try:
        theirs = run_kernels()
    finally:
        assert fast_interpreter.patch_language_once_per_launch()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
