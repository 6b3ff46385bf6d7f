"""token_logprobs fwd+bwd under pytest-benchmark, with the peak-memory comparison of the CPU target:
forward+backward at N=4096, V=32000, bf16 must use at most half of eager's extra peak memory."""

from __future__ import annotations

import pytest
import torch

import fastalign
from fastalign.bench import peak_extra_bytes
from fastalign.reference import logprobs as ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N, V = (16384, 128256) if DEVICE.type == "cuda" else (4096, 32000)
IMPLS = {"fastalign": fastalign.token_logprobs, "eager": ref.token_logprobs}


def _fwd_bwd(fn):
    logits = torch.randn(N, V, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    g = torch.randn(N, device=DEVICE)
    return lambda: torch.autograd.grad(fn(logits, labels), logits, g)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_token_logprobs_fwd_bwd(benchmark, impl):
    benchmark.group = f"token_logprobs fwd+bwd N={N} V={V} bf16"
    step = _fwd_bwd(IMPLS[impl])
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)


def test_peak_memory_at_most_half_of_eager():
    ours = peak_extra_bytes(_fwd_bwd(fastalign.token_logprobs), DEVICE.type == "cuda")
    eager = peak_extra_bytes(_fwd_bwd(ref.token_logprobs), DEVICE.type == "cuda")
    print(f"peak extra memory: fastalign {ours / 2**20:.0f} MB, eager {eager / 2**20:.0f} MB")
    assert ours <= eager / 2
