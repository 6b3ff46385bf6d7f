"""The fused losses (DPOLoss, IFTLoss), the IFT scan and ift_inputs_embeds against eager PyTorch.

The eager baselines are fastalign.reference: float32 log_softmax over the whole logits, then the loss. Liger's
LigerFusedLinearDPOLoss starts from hidden states, so it is compared with the fused-linear DPO loss in the
`linear` suite rather than here.
"""

from __future__ import annotations

import torch

import fastalign
from fastalign._backend import forced_backend
from fastalign.bench import Case, Env
from fastalign.reference import dpo as ref_dpo
from fastalign.reference import ift as ref_ift

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
IGNORE = -100


def _logits_and_labels(rows, T, V, dtype, device, requires_grad):
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(rows, T, V, device=device, dtype=dtype, generator=gen).mul_(2)
    labels = torch.randint(0, V, (rows, T), device=device, generator=gen)
    labels[:, : T // 4] = IGNORE  # the prompt
    return logits.requires_grad_(requires_grad), labels


def _reference_logps(B, device):
    gen = torch.Generator(device=device).manual_seed(1)
    return -torch.rand(2, B, device=device, generator=gen) * 100 - 1000


def _dpo_impls():
    fused = fastalign.DPOLoss(beta=0.1)
    inplace = fastalign.DPOLoss(beta=0.1, inplace_backward=True)
    return {
        "fastalign": lambda x, y, rc, rr: fused(x, y, rc, rr)[0],
        "fastalign-inplace": lambda x, y, rc, rr: inplace(x, y, rc, rr)[0],
        "eager": lambda x, y, rc, rr: ref_dpo.dpo_loss_from_logits(x, y, rc, rr, beta=0.1)[0],
    }


def _ift_impls():
    fused, inplace = fastalign.IFTLoss(), fastalign.IFTLoss(inplace_backward=True)
    return {
        "fastalign": lambda x, y: fused(x, y),
        "fastalign-inplace": lambda x, y: inplace(x, y),
        "eager": ref_ift.ift_loss_from_logits,
    }


def _check_loss(name, fused, eager, logits, tol_grad=1e-2):
    """Compares fused and eager loss and d logits on the same inputs; raises with the errors if off."""
    out = fused(logits)
    (dx,) = torch.autograd.grad(out, logits)
    expected = eager(logits)
    (dx_ref,) = torch.autograd.grad(expected, logits)
    err = abs(out.item() - expected.item()) / max(abs(expected.item()), 1e-12)
    gerr = ((dx.float() - dx_ref.float()).norm() / dx_ref.float().norm()).item()
    if err > 1e-4 or gerr > tol_grad:
        raise AssertionError(f"{name}: relative loss error {err:.2e}, relative grad error {gerr:.2e}")


def _loss_cases(env, op, shapes, impls, make_inputs, check_for):
    out = []
    for rows, T, V, dtype in shapes:
        check = check_for(rows, T, V, dtype)
        elem = torch.finfo(dtype).bits // 8
        for mode in ("fwd", "fwd+bwd") if env.cuda else ("fwd+bwd",):  # training steps; the CPU run stays short
            for impl, fn in impls.items():
                if impl == "fastalign-inplace" and mode == "fwd":
                    continue

                def setup(fn=fn, rows=rows, T=T, V=V, dtype=dtype, mode=mode):
                    logits, *rest = make_inputs(rows, T, V, dtype, mode != "fwd")
                    if mode == "fwd":
                        return lambda: fn(logits, *rest)
                    return lambda: torch.autograd.grad(fn(logits, *rest), logits)

                out.append(
                    Case(
                        op=op,
                        impl=impl,
                        mode=mode,
                        shape=f"B={rows} T={T} V={V}",
                        dtype=DTYPE_NAMES[dtype],
                        setup=setup,
                        bytes=(1 if mode == "fwd" else 3) * rows * T * V * elem,  # read; read, read, write d logits
                        check=check if impl.startswith("fastalign") else None,
                    )
                )
    return out


def _dpo_cases(env: Env) -> list[Case]:
    if env.cuda:
        shapes = [(8, 2048, 128256, torch.bfloat16), (8, 2048, 32000, torch.bfloat16)]  # 2B = 8 sequences
    else:
        shapes = [(4, 64, 32000, torch.float32)] if env.size == "small" else [(8, 512, 32000, torch.bfloat16)]
    impls = _dpo_impls()

    def make_inputs(rows, T, V, dtype, requires_grad):
        logits, labels = _logits_and_labels(rows, T, V, dtype, env.device, requires_grad)
        return (logits, labels, *_reference_logps(rows // 2, env.device))

    def check_for(rows, T, V, dtype):
        def check():
            logits, labels, rc, rr = make_inputs(rows, T, V, dtype, True)
            _check_loss(
                "DPOLoss", lambda x: impls["fastalign"](x, labels, rc, rr), lambda x: impls["eager"](x, labels, rc, rr),
                logits,
            )  # fmt: skip

        return check

    return _loss_cases(env, "DPOLoss", shapes, impls, make_inputs, check_for)


def _ift_cases(env: Env) -> list[Case]:
    if env.cuda:
        shapes = [(8, 2048, 128256, torch.bfloat16), (8, 2048, 32000, torch.bfloat16)]
    else:
        shapes = [(4, 64, 32000, torch.float32)] if env.size == "small" else [(8, 512, 32000, torch.bfloat16)]
    impls = _ift_impls()

    def make_inputs(rows, T, V, dtype, requires_grad):
        return _logits_and_labels(rows, T, V, dtype, env.device, requires_grad)

    def check_for(rows, T, V, dtype):
        def check():
            logits, labels = make_inputs(rows, T, V, dtype, True)
            _check_loss("IFTLoss", lambda x: impls["fastalign"](x, labels), lambda x: impls["eager"](x, labels), logits)

        return check

    return _loss_cases(env, "IFTLoss", shapes, impls, make_inputs, check_for)


def _scan_cases(env: Env) -> list[Case]:
    """ift_loss on per-token log-probs: the reverse discounted scan alone (kernel on a GPU, torch path on a CPU),
    against the eager reference's [T, T] discount matrix."""
    B, T = (64, 4096) if env.cuda else (4, 512)

    def inputs():
        gen = torch.Generator(device=env.device).manual_seed(0)
        logps = -torch.rand(B, T, device=env.device, generator=gen).mul_(5).requires_grad_(True)
        mask = torch.arange(T, device=env.device) >= T // 4
        return logps, mask.expand(B, T)

    def check():
        logps, mask = inputs()
        _check_loss("ift_loss", lambda x: fastalign.ift_loss(x, mask), lambda x: ref_ift.ift_loss(x, mask), logps, 1e-4)

    impls = {"fastalign": fastalign.ift_loss, "eager": ref_ift.ift_loss}
    if env.cuda:

        def torch_path(x, mask):
            with forced_backend("torch"):
                return fastalign.ift_loss(x, mask)

        impls["fastalign-torch-path"] = torch_path
    cases = []
    for impl, fn in impls.items():

        def setup(fn=fn):
            logps, mask = inputs()
            return lambda: torch.autograd.grad(fn(logps, mask), logps)

        cases.append(
            Case(
                op="ift_loss",
                impl=impl,
                mode="fwd+bwd",
                shape=f"B={B} T={T}",
                dtype="fp32",
                setup=setup,
                bytes=B * T * (4 + 1) * 2 + B * T * 4 * 3,  # logps + mask twice, C written and read, d logps
                check=check if impl.startswith("fastalign") else None,
            )
        )
    return cases


def _embeds_cases(env: Env) -> list[Case]:
    B, T, V, D, dtype = (8, 2048, 128256, 4096, torch.bfloat16) if env.cuda else (4, 256, 8000, 1024, torch.float32)

    def inputs():
        gen = torch.Generator(device=env.device).manual_seed(0)
        weight = torch.randn(V, D, device=env.device, dtype=dtype, generator=gen)
        ids = torch.randint(0, V, (3, B, T), device=env.device, generator=gen)
        input_ids, predicted, labels = ids[0], ids[1], ids[2].clone()
        labels[:, : T // 4] = IGNORE
        return weight, input_ids, predicted, labels

    def check():
        args = inputs()
        got, expected = fastalign.ift_inputs_embeds(*args), ref_ift.ift_inputs_embeds(*args)
        err = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
        if err > 1e-2:
            raise AssertionError(f"ift_inputs_embeds: relative error {err:.2e}")

    impls = {"fastalign": fastalign.ift_inputs_embeds, "eager": ref_ift.ift_inputs_embeds}
    cases = []
    for impl, fn in impls.items():

        def setup(fn=fn):
            args = inputs()
            return lambda: fn(*args)

        cases.append(
            Case(
                op="ift_inputs_embeds",
                impl=impl,
                mode="fwd",
                shape=f"B={B} T={T} D={D}",
                dtype=DTYPE_NAMES[dtype],
                setup=setup,
                bytes=3 * B * T * D * dtype.itemsize,  # two embedding rows read, one written per position
                check=check if impl == "fastalign" else None,
            )
        )
    return cases


def cases(env: Env) -> list[Case]:
    return _dpo_cases(env) + _ift_cases(env) + _scan_cases(env) + _embeds_cases(env)
