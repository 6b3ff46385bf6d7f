"""fastalign (through liger_shim), Liger itself and the torch reference of Liger's tests, each against float64, on the
shapes and dtypes of Liger's test_dpo_loss.py / test_kto_loss.py: relative-norm errors of the loss and d input.

usage (from the Liger sdist root that run_liger.sh unpacks, with tests/peer_suites on PYTHONPATH): python compare_f64.py
"""

from __future__ import annotations

import liger_shim
import torch
from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction
from liger_kernel.chunked_loss.kto_loss import LigerFusedLinearKTOFunction
from test.chunked_loss import test_dpo_loss as liger_dpo_tests
from test.chunked_loss import test_kto_loss as liger_kto_tests

HF = {
    "sigmoid": liger_dpo_tests.HFDPOLoss,
    "apo_zero": liger_dpo_tests.HFAPOZeroLoss,
    "apo_down": liger_dpo_tests.HFAPODownLoss,
    "sppo_hard": liger_dpo_tests.HFSPPPOHARDLoss,
    "nca_pair": liger_dpo_tests.HFNCAPAIRLoss,
    "hinge": liger_dpo_tests.HFHingeLoss,
    "bco_pair": liger_dpo_tests.HFBCOPAIRLoss,
    "robust": liger_dpo_tests.HFRobustLoss,
    "exo_pair": liger_dpo_tests.HFEXOPAIRLoss,
    "discopop": liger_dpo_tests.HFDiscoPOPLoss,
}
EXTRA = {"robust": {"label_smoothing": 0.1}, "exo_pair": {"label_smoothing": 1e-3}}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def dpo_case(loss_type, dtype, B=6, T=47, H=31, V=123, nll=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g)
    ref_x = torch.randn(B, T, H, generator=g)
    w, ref_w, b = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    target = torch.randint(0, V, (B, T), generator=g)
    target.view(-1)[torch.randperm(B * T, generator=g)[: B * T // 3]] = -100
    kw = EXTRA.get(loss_type, {})

    def hf(dt):
        xi = x.to(dtype).to(dt).clone().requires_grad_(True)
        loss = HF[loss_type](beta=0.1, compute_nll_loss=nll, **kw).get_batch_loss_metrics(
            w.to(dtype).to(dt), xi, target, b.to(dtype).to(dt), ref_x.to(dtype).to(dt), ref_w.to(dtype).to(dt), None,
            average_log_prob=True,
        )[0]  # fmt: skip
        loss.backward()
        return loss, xi.grad

    def run(fn):
        xi = x.to(dtype).clone().requires_grad_(True)
        loss = fn(xi, w.to(dtype), target, b.to(dtype), ref_x.to(dtype), ref_w.to(dtype), None, -100, 0.1, nll,
                  False, True, True, 1, loss_type, kw.get("label_smoothing", 0.0), 0.05, 1.0)[0]  # fmt: skip
        loss.backward()
        return loss, xi.grad

    exact = hf(torch.float64)
    rows = {"fastalign": run(liger_shim.fused_linear_dpo), "liger": run(LigerFusedLinearDPOFunction.apply)}
    rows["torch reference"] = hf(dtype)
    return {k: (rel(v[0], exact[0]), rel(v[1], exact[1])) for k, v in rows.items()}


def kto_case(dtype, B=6, T=47, H=31, V=123, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, ref_x = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)
    w, ref_w, b = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    target = torch.randint(0, V, (B, T), generator=g)
    target.view(-1)[torch.randperm(B * T, generator=g)[: B * T // 3]] = -100
    labels = torch.tensor([True, False] * (B // 2))
    kl = torch.tensor([-0.3])

    def hf(dt):
        xi = x.to(dtype).to(dt).clone().requires_grad_(True)
        loss = liger_kto_tests.HFKTOLoss(beta=0.1).get_batch_loss_metrics(
            weight=w.to(dtype).to(dt), _input=xi, target=target, bias=b.to(dtype).to(dt),
            ref_input=ref_x.to(dtype).to(dt), ref_weight=ref_w.to(dtype).to(dt), ref_bias=None,
            preference_labels=labels, kl=kl.to(dtype).to(dt), average_log_prob=True,
        )[0]  # fmt: skip
        loss.backward()
        return loss, xi.grad

    def run(fn):
        xi = x.to(dtype).clone().requires_grad_(True)
        loss = fn(xi, w.to(dtype), target, labels, b.to(dtype), ref_x.to(dtype), ref_w.to(dtype), None,
                  kl.to(dtype), -100, 0.1, False, True, True, 1)[0]  # fmt: skip
        loss.backward()
        return loss, xi.grad

    exact = hf(torch.float64)
    rows = {"fastalign": run(liger_shim.fused_linear_kto), "liger": run(LigerFusedLinearKTOFunction.apply)}
    rows["torch reference"] = hf(dtype)
    return {k: (rel(v[0], exact[0]), rel(v[1], exact[1])) for k, v in rows.items()}


if __name__ == "__main__":
    print(f"{'case':28s} {'impl':16s} {'loss rel err':>14s} {'d input rel err':>16s}")
    for dtype in (torch.float32, torch.bfloat16):
        name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
        cases = [(f"dpo-{t}-{name}", lambda t=t, dtype=dtype: dpo_case(t, dtype)) for t in HF]
        cases.append((f"kto-{name}", lambda dtype=dtype: kto_case(dtype)))
        for case, fn in cases:
            for impl, (loss_err, grad_err) in fn().items():
                print(f"{case:28s} {impl:16s} {loss_err:14.2e} {grad_err:16.2e}")
