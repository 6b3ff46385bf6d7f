"""DPOLoss and IFTLoss forward+backward under pytest-benchmark, fused against eager, with a peak-memory check:
the fused losses never hold a float32 [tokens, vocab] temporary, so they need at most half of eager's extra
peak memory (bf16 logits, 2B x T = 4096 tokens, V = 32000 on a CPU)."""

from __future__ import annotations

import pytest
import torch

import fastalign
from fastalign.bench import peak_extra_bytes
from fastalign.reference import dpo as ref_dpo
from fastalign.reference import ift as ref_ift

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROWS, T, V = (8, 2048, 128256) if DEVICE.type == "cuda" else (8, 512, 32000)


def _inputs():
    logits = torch.randn(ROWS, T, V, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, V, (ROWS, T), device=DEVICE)
    labels[:, : T // 4] = -100
    return logits, labels


def _dpo_step(loss_fn):
    logits, labels = _inputs()
    ref_chosen, ref_rejected = -torch.rand(2, ROWS // 2, device=DEVICE) * 100 - 1000
    return lambda: torch.autograd.grad(loss_fn(logits, labels, ref_chosen, ref_rejected)[0], logits)


def _ift_step(loss_fn):
    logits, labels = _inputs()
    return lambda: torch.autograd.grad(loss_fn(logits, labels), logits)


DPO = {"fastalign": fastalign.DPOLoss(beta=0.1), "eager": ref_dpo.dpo_loss_from_logits}
IFT = {"fastalign": fastalign.IFTLoss(), "eager": ref_ift.ift_loss_from_logits}


@pytest.mark.parametrize("impl", list(DPO))
def test_dpo_loss_fwd_bwd(benchmark, impl):
    benchmark.group = f"DPOLoss fwd+bwd 2B={ROWS} T={T} V={V} bf16"
    benchmark.pedantic(_dpo_step(DPO[impl]), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("impl", list(IFT))
def test_ift_loss_fwd_bwd(benchmark, impl):
    benchmark.group = f"IFTLoss fwd+bwd B={ROWS} T={T} V={V} bf16"
    benchmark.pedantic(_ift_step(IFT[impl]), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("name, step, impls", [("DPOLoss", _dpo_step, DPO), ("IFTLoss", _ift_step, IFT)])
def test_peak_memory_at_most_half_of_eager(name, step, impls):
    cuda = DEVICE.type == "cuda"
    ours = peak_extra_bytes(step(impls["fastalign"]), cuda)
    eager = peak_extra_bytes(step(impls["eager"]), cuda)
    print(f"{name} peak extra memory: fastalign {ours / 2**20:.0f} MB, eager {eager / 2**20:.0f} MB")
    assert ours <= eager / 2
