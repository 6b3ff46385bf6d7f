"""OnlineMergeAdamW's step (OnDARE, OnTIES) against the official implementation's eager step and
torch.optim.AdamW (fused where available, the speed of light for an AdamW step).

Sizes are a decoder-shaped set of tensors: about 1B fp32 parameters on a GPU (τ in bf16), about 1M on a CPU (the
CPU runs the torch path). The CPU set's embedding has 0.5M elements, so an eager step's temporaries (a few copies of
its largest tensor) are not smaller than the torch path's fixed chunk buffers, as in any real model. Bytes per step
count what the step must move at least (FLOOR_BYTES: read the gradient, θ, both moments and τ, write θ and both
moments), except fastalign's OnTIES on a GPU, which counts what its kernels really move (`onties_bytes`: its extra
passes over Δ), so its GB/s and % of copy bandwidth say how well its passes stream; its record keeps the floor in
`floor_bytes`, and time is what compares it with the other rows.
"""

from __future__ import annotations

import torch

from fastalign.bench import Case, Env
from fastalign.kernels.radix_select import CANDIDATE_SHARE, RADIX_DIGITS
from fastalign.optim import OnlineMergeAdamW
from fastalign.optim._dare import dare_keep
from fastalign.reference import online_merge as ref

HP = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, reserve_p=0.3, alpha=0.2, clip=1.0)
ADAMW_BYTES = 4 + 4 + 4 + 16  # per fp32 parameter: read the gradient, θ and both moments, write θ and both moments
FLOOR_BYTES = ADAMW_BYTES + 2  # and read τ (bf16)


def onties_bytes(param_bytes: int = 4, tau_bytes: int = 2) -> float:
    """Global-memory bytes per parameter element of one OnTIES step of the kernels (online_step=1) after the first
    merge, where each slot's guess of its threshold's top digit holds (the next merge's holds in about 9 of 10),
    counted from the tensors each launch reads and writes (kernels/online_merge.py, kernels/radix_select.py): the Δ
    pass reads the gradient and both fp32 moments, writes the moments and Δ (fp32) and copies each tile's keys at the
    guessed digit (its candidates); each later radix digit (RADIX_DIGITS, which depends on the triton version) reads
    them: at most 1/CANDIDATE_SHARE of the keys where they fit, as they do from the benchmark's mid-training state
    (8%); the apply pass reads Δ, θ and τ and writes θ. The per-slot and per-tile tables (histograms, tie counts,
    budgets) are under 0.5% of that at 1B parameters and are left out."""
    candidates = 4 / CANDIDATE_SHARE
    delta_pass = param_bytes + 4 * 4 + 4 + candidates
    radix_passes = candidates * (len(RADIX_DIGITS) - 1)
    apply_pass = 4 + 2 * param_bytes + tau_bytes
    return delta_pass + radix_passes + apply_pass


def _shapes(env: Env) -> list[tuple[int, ...]]:
    """Embedding, then per layer 4 attention projections, 3 MLP matrices and 2 norms."""
    vocab, hidden, ffn, layers = (32000, 2048, 8192, 14) if env.cuda else (4000, 128, 512, 2)
    layer = [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden,), (hidden,)]
    return [(vocab, hidden)] + layer * layers + [(hidden,)]


def _inputs(shapes, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen) * 1e-3
    taus = [torch.randn(s, device=device, generator=gen) * 1e-3 for s in shapes]
    return params, taus


def _fastalign(method, shapes, device):
    params, taus = _inputs(shapes, device)
    return _with_state(OnlineMergeAdamW(params, method=method, ref_delta=taus, **HP), params, device)


def _with_state(opt, params, device):
    """opt.step, once taken and then from a mid-training state: torch's optimizers make their state (both moments) in
    their first step, the official one at construction, so the memory a later step needs is what the cases measure (a
    CPU case's is its first call's)."""
    opt.step()
    _mid_training([opt.state[p] for p in params], device)
    return opt.step


def _mid_training(states: list[dict], device) -> None:
    """Sets optimizer states' moments to a mid-training state (spread out, step 10). From the state of a fresh
    optimizer every timed step has about the same Δ = ±lr everywhere (one fixed gradient: m̂ = g, v̂ = g²), which a
    real run has at step 1 only, and where OnTIES's radix select cannot skip any keys."""
    gen = torch.Generator(device=device).manual_seed(2)
    for state in states:
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.copy_(torch.randn(m.shape, device=device, generator=gen) * 1e-3)
        v.copy_(torch.rand(v.shape, device=device, generator=gen) * 1e-6 + 1e-8)
        if isinstance(state["step"], torch.Tensor):
            state["step"].fill_(10)
        else:
            state["step"] = 10


def _official(method, shapes, device):
    params, taus = _inputs(shapes, device)
    step = ref.OfficialOnlineMergeStep(params, method=method, rescale=False, online_step=1, ref_delta=taus, **HP)
    _mid_training(step.state, device)
    return step.step


def _torch_adamw(shapes, device, fused):
    params, _ = _inputs(shapes, device)
    hp = {k: HP[k] for k in ("lr", "betas", "eps", "weight_decay")}
    return _with_state(torch.optim.AdamW(params, **hp, fused=fused, foreach=None if fused else True), params, device)


def _torch_fused_works(device) -> bool:
    try:
        p = torch.nn.Parameter(torch.zeros(4, device=device))
        p.grad = torch.zeros(4, device=device)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, ValueError):
        return False


def _make_check(method, shapes, device):
    """One step from a mid-training state (spread-out moments) against the float64 reference,
    one parameter at a time; OnDARE's keeps are the hash draws, OnTIES's near-threshold
    entries are left out where float32 may legitimately reorder them."""

    def check():
        params, taus = _inputs(shapes, device, seed=1)
        opt = OnlineMergeAdamW(params, method=method, ref_delta=taus, **HP)
        _mid_training([opt.state[p] for p in params], device)
        before = [(p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
                  for p in params]  # fmt: skip
        opt.step()
        for i, (p, (theta, m, v)) in enumerate(zip(params, before)):
            tau = opt.state[p]["ref_delta"].double()
            one = ref.OnlineMergeReference(
                [theta.double()], method=method, rescale=False, online_step=1, ref_delta=[tau], **HP
            )
            one.m, one.v, one.t = [m.double()], [v.double()], [10]
            keeps = [dare_keep(0, 11, i, 0, p.numel(), HP["reserve_p"], device).view(p.shape)]
            one.step([p.grad.double()], keeps if method == "ondare" else None)
            certain = ref.selection_is_certain(one.sparsified[0], HP["reserve_p"], tau) if method == "onties" else None
            err = (p.double() - one.params[0]).abs()
            err = err[certain] if certain is not None else err
            bound = 4 * torch.finfo(torch.float32).eps * one.params[0].abs().max().item() + 1e-9
            if err.numel() and err.max().item() > bound:
                raise AssertionError(f"parameter {i} {tuple(p.shape)}: max |θ - reference| = {err.max().item():.2e}")
            if certain is not None and certain.float().mean().item() < 0.99:
                raise AssertionError(f"parameter {i}: {1 - certain.float().mean().item():.1%} near-ties")

    return check


def cases(env: Env) -> list[Case]:
    shapes = _shapes(env)
    numel = sum(torch.Size(s).numel() for s in shapes)
    shape = f"params={numel / 1e9:.2f}B tensors={len(shapes)}" if env.cuda else f"params={numel / 1e6:.1f}M"
    fused = _torch_fused_works(env.device)
    torch_name = "torch-fused" if fused else "torch-foreach"
    out = []
    for method in ("onties", "ondare"):  # OnTIES first: issue 11's target, should a GPU budget run short
        check = _make_check(method, shapes, env.device)
        moved = onties_bytes() if method == "onties" and env.cuda else FLOOR_BYTES
        impls = {
            "fastalign": (lambda m=method: _fastalign(m, shapes, env.device), moved),
            "eager": (lambda m=method: _official(m, shapes, env.device), FLOOR_BYTES),
            torch_name: (lambda: _torch_adamw(shapes, env.device, fused), ADAMW_BYTES),
        }
        for impl, (setup, bytes_per_param) in impls.items():
            extra = {"ref_delta_dtype": "bf16" if impl == "fastalign" else "fp32"}
            if impl == "fastalign" and moved != FLOOR_BYTES:
                extra["floor_bytes"] = numel * FLOOR_BYTES
            out.append(
                Case(
                    op=f"{method}_step",
                    impl=impl,
                    mode="step",
                    shape=shape,
                    dtype="fp32",
                    setup=setup,
                    bytes=round(numel * bytes_per_param),
                    check=check if impl == "fastalign" else None,
                    extra=extra,
                )
            )
    return out
