"""One OnlineMergeAdamW step (OnDARE, OnTIES) under pytest-benchmark, against the official
implementation's eager step and torch.optim.AdamW, at the sizes of `fastalign bench`
(about 1B fp32 parameters on a GPU, a small decoder-shaped set on a CPU)."""

from __future__ import annotations

import pytest
import torch

from fastalign.bench import Env
from fastalign.bench import optim as suite

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ENV = Env(DEVICE, "target" if DEVICE.type == "cuda" else "small")
SHAPES = suite._shapes(ENV)
IMPLS = {
    "fastalign": lambda method: suite._fastalign(method, SHAPES, DEVICE),
    "eager": lambda method: suite._official(method, SHAPES, DEVICE),
    "torch-adamw": lambda method: suite._torch_adamw(SHAPES, DEVICE, suite._torch_fused_works(DEVICE)),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("method", ["ondare", "onties"])
def test_online_merge_step(benchmark, method, impl):
    numel = sum(torch.Size(s).numel() for s in SHAPES)
    benchmark.group = f"{method} step, {numel / 1e6:.1f}M fp32 parameters"
    step = IMPLS[impl](method)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def test_fastalign_step_is_correct_at_this_size():
    for method in ("ondare", "onties"):
        suite._make_check(method, SHAPES, DEVICE)()
