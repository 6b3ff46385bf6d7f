"""token_logprobs against eager log_softmax + gather and TRL's selective_log_softmax."""

from __future__ import annotations

import torch

import fastalign
from fastalign.bench import Case, Env
from fastalign.reference import logprobs as ref

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _inputs(N, V, dtype, device, requires_grad):
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(N, V, device=device, dtype=dtype, generator=gen).mul_(2).requires_grad_(requires_grad)
    labels = torch.randint(0, V, (N,), device=device, generator=gen)
    labels[: N // 8] = -100  # a prompt's worth of ignored positions
    return logits, labels


def _trl():
    try:
        from trl.trainer.utils import selective_log_softmax
    except Exception:
        return None

    def fn(logits, labels):
        ignored = labels == -100
        return selective_log_softmax(logits, labels.masked_fill(ignored, 0)).masked_fill(ignored, 0.0)

    return fn


def _make_check(N, V, dtype, device):
    def check():
        logits, labels = _inputs(N, V, dtype, device, True)
        g = torch.randn(N, device=device)
        out = fastalign.token_logprobs(logits, labels)
        (dx,) = torch.autograd.grad(out, logits, g)
        expected = ref.token_logprobs(logits, labels)
        (dx_ref,) = torch.autograd.grad(expected, logits, g)
        err = (out - expected).abs().max().item()
        gerr = ((dx.float() - dx_ref.float()).norm() / dx_ref.float().norm()).item()
        if err > 1e-3 or gerr > 1e-2:
            raise AssertionError(f"max |logp - eager| = {err:.2e}, relative grad error = {gerr:.2e}")

    return check


def cases(env: Env) -> list[Case]:
    if env.cuda:
        shapes = [(16384, 128256, torch.bfloat16), (16384, 32000, torch.bfloat16), (4096, 128256, torch.float32)]
    elif env.size == "target":  # the CPU memory target: fwd+bwd at N=4096, V=32000, bf16
        shapes = [(4096, 32000, torch.bfloat16)]
    else:
        shapes = [(256, 32000, torch.float32), (1024, 32000, torch.bfloat16)]
    impls = {
        "fastalign": lambda x, y: fastalign.token_logprobs(x, y),
        "fastalign-inplace": lambda x, y: fastalign.token_logprobs(x, y, inplace_backward=True),
        "eager": ref.token_logprobs,
    }
    if (trl := _trl()) is not None:
        impls["trl"] = trl

    out = []
    for N, V, dtype in shapes:
        check = _make_check(N, V, dtype, env.device)
        elem = torch.finfo(dtype).bits // 8
        for mode in ("fwd", "fwd+bwd"):
            for impl, fn in impls.items():
                if impl == "fastalign-inplace" and mode == "fwd":
                    continue

                def setup(fn=fn, N=N, V=V, dtype=dtype, mode=mode):
                    logits, labels = _inputs(N, V, dtype, env.device, mode != "fwd")
                    if mode == "fwd":
                        return lambda: fn(logits, labels)
                    g = torch.randn(N, device=env.device)
                    return lambda: torch.autograd.grad(fn(logits, labels), logits, g)

                out.append(
                    Case(
                        op="token_logprobs",
                        impl=impl,
                        mode=mode,
                        shape=f"N={N} V={V}",
                        dtype=DTYPE_NAMES[dtype],
                        setup=setup,
                        bytes=(1 if mode == "fwd" else 3) * N * V * elem,
                        check=check if impl.startswith("fastalign") else None,
                    )
                )
    return out
