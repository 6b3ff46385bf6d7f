"""Log-probs and losses from hidden states (the fused-linear ops) against eager PyTorch, TRL, Liger and Apple's Cut
Cross-Entropy (CCE).

- linear_token_logprobs: fastalign, and fastalign-tp1 (its vocab-parallel path on a one-rank "tp" mesh: issue 15 wants
  it within 5% of the plain op), against eager (hidden @ W.T in the inputs' dtype, then float32
  log_softmax + gather), TRL's chunked fused log-prob head (trl.kernels.ChunkedLogProbFunction, what
  `add_fused_lm_head` runs) and CCE's per-token losses (`linear_cross_entropy(reduction="none")`, negated), on N
  valid tokens.
- FusedLinearDPOLoss (sigmoid, the reference log-probs given): the fast and lean strategies side by side, against
  eager, TRL's fused head followed by its DPO loss (what TRL's DPOTrainer runs), the same DPO loss on CCE's per-token
  log-probs, and Liger's LigerFusedLinearDPOLoss without its reference model (Liger takes no precomputed reference
  log-probs: the same matmuls).
- FusedLinearKTOLoss (TRL's "kto" loss, the reference log-probs and the KL estimate given, half the sequences
  desirable): fast and lean against eager, TRL's fused head or CCE followed by TRL's KTO loss (what its KTOTrainer
  runs), and Liger's LigerFusedLinearKTOLoss without its reference model (as for DPO).
- FusedLinearIFTLoss: fast and lean against eager.
- FusedLinearCrossEntropyLoss (the SFT loss, mean over the counted tokens): fast and lean against eager
  (F.linear, then F.cross_entropy), TRL's fused head followed by the mean negative log-likelihood (what its
  SFTTrainer runs), Liger's LigerFusedLinearCrossEntropyLoss and CCE's `linear_cross_entropy`.

CCE runs as its users run it, with its defaults: its gradient skips the vocabulary entries whose softmax is below
bf16 precision (`filter_eps="high"`), so it does less work than an exact gradient. Its kernels are Triton's with no
CPU path (its `torch_compile` variant materializes the logits, which is not the method), so it runs on a GPU only;
like Liger's.

Throughput counts the FLOPs the op must do at least on its N scored tokens: 2 N H V forward and 6 N H V forward +
backward (forward, d hidden, d weight). The losses' fast strategy does just that; their lean strategy and
linear_token_logprobs (whose gradient comes after the op) recompute the logits, 8 N H V, except on the CPU path
when the logits fit its one chunk and are kept: counting 8 there read as more than 100% of the GEMM ceiling.
Correctness is checked against a float32 computation of the full logits, a chunk of rows at a time, gradients
included.
"""

from __future__ import annotations

import torch

import fastalign
from fastalign.bench import Case, Env
from fastalign.reference import dpo as ref_dpo
from fastalign.reference import ift as ref_ift
from fastalign.reference import linear_logprobs as ref

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
IGNORE = -100
_CHECK_ROWS = 1024  # rows per chunk of the float32 check


def _head(rows, T, H, V, dtype, device, prompt):
    """hidden [rows, T, H], weight [V, H], labels [rows, T] with the first `prompt` positions ignored."""
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(rows, T, H, device=device, dtype=dtype, generator=gen)
    weight = torch.randn(V, H, device=device, dtype=dtype, generator=gen).mul_(2 / H**0.5)  # logits of std ~2
    labels = torch.randint(0, V, (rows, T), device=device, generator=gen)
    labels[:, :prompt] = IGNORE
    return hidden, weight, labels


def _float32_reference(hidden, weight, labels, dlogp):
    """(log-probs, d hidden, d weight) of sum(logp * dlogp) in float32, from the full logits a chunk of rows at a
    time: the oracle for sizes where float64 logits would not fit."""
    H = hidden.shape[-1]
    h, lab, g = hidden.reshape(-1, H), labels.reshape(-1), dlogp.reshape(-1).float()
    w = weight.float()
    logp = torch.zeros(lab.shape, device=h.device)
    dh = torch.zeros(h.shape, device=h.device)
    dw = torch.zeros(w.shape, device=h.device)
    for r0 in range(0, h.shape[0], _CHECK_ROWS):
        r1 = min(r0 + _CHECK_ROWS, h.shape[0])
        hc, lc = h[r0:r1].float(), lab[r0:r1]
        valid = lc != IGNORE
        ls = (hc @ w.T).log_softmax(-1)
        logp[r0:r1] = torch.where(valid, ls.gather(-1, lc.clamp(min=0)[:, None]).squeeze(-1), 0.0)
        gc = torch.where(valid, g[r0:r1], 0.0)
        dz = ls.exp_().mul_(-gc[:, None])
        dz.scatter_add_(-1, lc.clamp(min=0)[:, None], gc[:, None])
        dh[r0:r1] = dz @ w
        dw.addmm_(dz.T, hc)
    return logp.view(labels.shape), dh.view(hidden.shape), dw


def _assert_close(name, got, expected, tol):
    err = ((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30)).item()
    if not err < tol:
        raise AssertionError(f"{name}: relative error {err:.2e} > {tol:.0e}")


def _check_against_float32(loss_of_logps, hidden, weight, labels, fused):
    """fused(hidden, weight) -> loss; loss_of_logps(token logps [rows, T]) -> the same loss. Compares the loss and
    both gradients with the float32 oracle, the loss's gradient w.r.t. the log-probs taken from the oracle."""
    hidden, weight = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    loss = fused(hidden, weight)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    with torch.no_grad():
        logp32, _, _ = _float32_reference(hidden, weight, labels, torch.zeros(labels.shape, device=labels.device))
    logp32.requires_grad_(True)
    loss32 = loss_of_logps(logp32)
    (dlogp,) = torch.autograd.grad(loss32, logp32)
    _, dh32, dw32 = _float32_reference(hidden.detach(), weight.detach(), labels, dlogp)
    _assert_close("loss", loss.detach().reshape(1), loss32.detach().reshape(1), 1e-4)
    _assert_close("d hidden", dh, dh32, 1e-2)
    _assert_close("d weight", dw, dw32, 1e-2)


# ----------------------------------------------------------------------------- peers


def _trl_head():
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    except Exception:
        return None

    def fn(hidden, weight, labels):
        # What add_fused_lm_head does: score the valid positions only, then scatter back.
        mask = labels != IGNORE
        logp = ChunkedLogProbFunction.apply(
            hidden[mask], weight, None, labels[mask], 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",)
        )[0]
        return logp.new_zeros(mask.shape).masked_scatter(mask, logp)

    return fn


def _installed(**peers) -> dict:
    """The peers whose package is here (a peer's maker returns None when it is not, or has no path on this device)."""
    return {name: fn for name, fn in peers.items() if fn is not None}


def _cce_head(cuda: bool, impl: str = "cce"):
    """CCE's per-token log-probs, 0 at ignored positions: fn(hidden, weight, labels) -> [rows, T], and
    fn(..., reduction="mean") -> its mean cross-entropy. `impl` is CCE's: its "torch_compile" reference (the tests
    run it uncompiled, on the CPU) checks this wrapper where the "cce" kernels cannot run."""
    if not cuda and impl == "cce":
        return None
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception:
        return None

    def fn(hidden, weight, labels, reduction="none"):
        loss = linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, reduction=reduction, impl=impl)
        return -loss if reduction == "none" else loss

    return fn


def _liger_dpo(cuda: bool):
    """Liger's fused DPO without its reference model: it takes no precomputed reference log-probs, and this runs the
    same matmuls as fastalign given them (its loss then reads a reference of 0)."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except Exception:
        return None
    loss = LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=0.1, compiled=cuda, use_ref_model=False)

    def fn(hidden, weight, labels, ref_chosen, ref_rejected):
        return loss(weight, hidden, labels)[0]

    return fn


# ----------------------------------------------------------------------------- cases


def _cases(env, op, shapes, impls, make_inputs, flops_of, check_for, per_token=False):
    """make_inputs(shape, requires_grad) -> (hidden, weight, labels, ...); impls[name](*inputs) -> a scalar loss,
    or per-token log-probs shaped like the labels (per_token), which get a random upstream gradient.
    check_for(shape, impl) -> the correctness check of a fastalign implementation at that shape.

    A loss is timed forward+backward only: training runs it so (and the fast strategy's forward does the gradients'
    work, which a forward-only row would show as slow), and GPU minutes are few. The per-token log-probs, which a
    reference model runs forward-only too, are timed both ways on a GPU; the CPU run stays short."""
    out = []
    modes = ("fwd", "fwd+bwd") if env.cuda and per_token else ("fwd+bwd",)
    for shape in shapes:
        rows, T, H, V, dtype = shape
        checks = {impl: check_for(shape, impl) for impl in impls if impl.startswith("fastalign")}
        for mode in modes:
            for impl, fn in impls.items():

                def setup(fn=fn, shape=shape, mode=mode):
                    inputs = make_inputs(shape, mode != "fwd")
                    if mode == "fwd":
                        return lambda: fn(*inputs)
                    grad = _upstream_grad(inputs[2]) if per_token else None
                    return lambda: torch.autograd.grad(fn(*inputs), inputs[:2], grad)

                out.append(
                    Case(
                        op=op,
                        impl=impl,
                        mode=mode,
                        shape=f"rows={rows} T={T} H={H} V={V}",
                        dtype=DTYPE_NAMES[dtype],
                        setup=setup,
                        flops=flops_of(shape, mode),
                        check=checks.get(impl),
                        # Peak memory includes the returned gradients; this is their size.
                        extra={"grad_mb": round(_grad_bytes(shape, mode) / 2**20, 1)},
                    )
                )
    return out


def _upstream_grad(labels: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator(device=labels.device).manual_seed(2)
    return torch.randn(labels.shape, device=labels.device, generator=gen)


def _grad_bytes(shape, mode):
    rows, T, H, V, dtype = shape
    return 0 if mode == "fwd" else (rows * T + V) * H * dtype.itemsize


def _shapes(env: Env, gpu: list, cpu_small: tuple) -> list:
    """(rows, T, H, V, dtype) shapes: the issue's targets on a GPU, bigger CPU ones for --size target."""
    if env.cuda:
        return gpu
    return [cpu_small] if env.size == "small" else [(4, 1024, 1024, 32000, torch.bfloat16)]


def _inputs(env: Env, shape, requires_grad: bool, prompt: bool):
    """(hidden, weight, labels) of a shape; with `prompt`, the first quarter of each row is ignored."""
    rows, T, H, V, dtype = shape
    hidden, weight, labels = _head(rows, T, H, V, dtype, env.device, _prompt(T) if prompt else 0)
    return hidden.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), labels


def _flops(shape, mode: str) -> int:
    """linear_token_logprobs: 2 N H V forward, 6 N H V forward + backward (the floor: no recompute)."""
    rows, T, H, V, _ = shape
    return (2 if mode == "fwd" else 6) * rows * T * H * V


def _loss_flops(prompt_of):
    """A loss's floor on its scored tokens (T - prompt per row): 2 N H V forward, 6 N H V forward + backward."""

    def flops(shape, mode: str) -> int:
        rows, T, H, V, _ = shape
        return (2 if mode == "fwd" else 6) * rows * (T - prompt_of(T)) * H * V

    return flops


_TARGET = (8, 2048, 4096, 128256, torch.bfloat16)  # N = 16384 tokens, H = 4096, V = 128256


def _vocab_parallel_at_tp1(env: Env):
    """linear_token_logprobs with the weight as a vocab-parallel DTensor (Shard(0) on a mesh dim "tp") of one rank:
    what the tensor-parallel path costs at TP = 1 (its DTensor plumbing; one slice needs no combining) next to the
    plain op.
    On its first call (the correctness check's), the benchmark process becomes a one-rank process group (an in-memory
    store: no network) unless it already is one; a failure there is reported as the case's."""
    import torch.distributed as dist

    if not dist.is_available() or (dist.is_initialized() and dist.get_world_size() != 1):
        return None
    mesh = []

    def fn(hidden, weight, labels):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        if not mesh:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if env.cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
            mesh.append(init_device_mesh(env.device.type, (1,), mesh_dim_names=("tp",)))
        # from_local is differentiable: the weight's gradient comes back as a plain tensor, as the other impls'.
        return fastalign.linear_token_logprobs(hidden, DTensor.from_local(weight, mesh[0], [Shard(0)]), labels)

    return fn


def _logprobs_cases(env: Env) -> list[Case]:
    shapes = _shapes(env, [_TARGET, (8, 2048, 4096, 32000, torch.bfloat16)], (2, 128, 128, 32000, torch.float32))
    impls = {"fastalign": fastalign.linear_token_logprobs}
    if (tp1 := _vocab_parallel_at_tp1(env)) is not None:
        impls["fastalign-tp1"] = tp1
    impls["eager"] = ref.linear_token_logprobs
    impls.update(_installed(trl=_trl_head(), cce=_cce_head(env.cuda)))

    def make_inputs(shape, requires_grad):
        return _inputs(env, shape, requires_grad, prompt=False)  # N valid tokens

    def check_for(shape, impl):
        def check():
            hidden, weight, labels = make_inputs(shape, False)
            g = _upstream_grad(labels)
            fused = lambda h, w: (impls[impl](h, w, labels) * g).sum()
            _check_against_float32(lambda logp: (logp * g).sum(), hidden, weight, labels, fused)

        return check

    return _cases(env, "linear_token_logprobs", shapes, impls, make_inputs, _flops, check_for, per_token=True)


def _prompt(T: int) -> int:
    return T // 4


def _dpo_on(head):
    """The DPO loss on a peer's per-token log-probs head(hidden, weight, labels), as TRL's DPOTrainer computes it from
    its fused head: summed over the completion, then its sigmoid loss."""
    if head is None:
        return None

    def fn(hidden, weight, labels, ref_chosen, ref_rejected):
        chosen, rejected = head(hidden, weight, labels).sum(-1).chunk(2)
        margin = (chosen - ref_chosen) - (rejected - ref_rejected)
        return -torch.nn.functional.logsigmoid(0.1 * margin).mean()

    return fn


def _dpo_cases(env: Env) -> list[Case]:
    shapes = _shapes(env, [_TARGET], (4, 64, 128, 32000, torch.float32))  # 2B sequences, the chosen ones first
    impls = {f"fastalign-{strategy}": _fused_dpo(strategy) for strategy in ("fast", "lean")}
    impls["eager"] = _eager_dpo
    impls.update(_installed(trl=_dpo_on(_trl_head()), cce=_dpo_on(_cce_head(env.cuda)), liger=_liger_dpo(env.cuda)))

    def make_inputs(shape, requires_grad):
        hidden, weight, labels = _inputs(env, shape, requires_grad, prompt=True)
        gen = torch.Generator(device=env.device).manual_seed(3)
        ref_logps = torch.randn(labels.shape[0], device=env.device, generator=gen) - 3 * labels.shape[1]
        return hidden, weight, labels, *ref_logps.chunk(2)

    def check_for(shape, impl):
        def check():
            hidden, weight, labels, ref_chosen, ref_rejected = make_inputs(shape, False)
            lengths = (labels != IGNORE).sum(-1)

            def loss_of_logps(logp):
                chosen, rejected = logp.sum(-1).chunk(2)
                chosen_lengths, rejected_lengths = lengths.chunk(2)
                kwargs = {"beta": 0.1, "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
                return ref_dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, **kwargs)[0]

            fused = impls[impl]
            _check_against_float32(
                loss_of_logps, hidden, weight, labels, lambda h, w: fused(h, w, labels, ref_chosen, ref_rejected)
            )

        return check

    return _cases(env, "FusedLinearDPOLoss", shapes, impls, make_inputs, _loss_flops(_prompt), check_for)


def _trl_sft():
    head = _trl_head()
    if head is None:
        return None

    def fn(hidden, weight, labels):
        # TRL's SFTTrainer with its fused head: per-token log-probs, then the mean negative log-likelihood.
        counted = labels != IGNORE
        return -head(hidden, weight, labels).sum() / counted.sum()

    return fn


def _liger_cross_entropy(cuda: bool):
    if not cuda:  # its kernels are Triton's, with no CPU path
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
    return lambda hidden, weight, labels: loss(weight, hidden.flatten(0, 1), labels.flatten())


def _mean_of(head):
    """CCE's own mean over the counted tokens (None without CCE)."""
    if head is None:
        return None
    return lambda hidden, weight, labels: head(hidden, weight, labels, reduction="mean")


def _cross_entropy_cases(env: Env) -> list[Case]:
    shapes = _shapes(env, [_TARGET], (4, 64, 128, 32000, torch.float32))
    impls = {f"fastalign-{s}": fastalign.FusedLinearCrossEntropyLoss(strategy=s) for s in ("fast", "lean")}
    impls["eager"] = lambda h, w, y: ref.linear_cross_entropy(h, w, y, ignore_index=IGNORE)
    impls.update(_installed(trl=_trl_sft(), liger=_liger_cross_entropy(env.cuda), cce=_mean_of(_cce_head(env.cuda))))

    def make_inputs(shape, requires_grad):
        return _inputs(env, shape, requires_grad, prompt=True)

    def check_for(shape, impl):
        def check():
            hidden, weight, labels = make_inputs(shape, False)
            counted = labels != IGNORE
            eager = lambda logp: -torch.where(counted, logp, 0.0).sum() / counted.sum()  # noqa: E731
            _check_against_float32(eager, hidden, weight, labels, lambda h, w: impls[impl](h, w, labels))

        return check

    return _cases(env, "FusedLinearCrossEntropyLoss", shapes, impls, make_inputs, _loss_flops(_prompt), check_for)


def _kto_loss(policy_logps, ref_logps, desirable, kl, beta=0.1):
    """TRL's KTO loss (loss_type "kto", unit weights) on per-sequence log-prob sums, as its KTOTrainer computes it (in
    tensors, no host sync): the loss of eager and of the peers' heads. kl: the detached batch KL estimate, clamped at
    0."""
    sign = torch.where(desirable, 1.0, -1.0)
    return (1 - torch.sigmoid(sign * (beta * (policy_logps - ref_logps - kl.clamp(min=0))))).mean()


def _kto_on(head):
    """TRL's KTO loss on a head's per-token log-probs head(hidden, weight, labels), summed over the completion."""
    if head is None:
        return None
    return lambda hidden, weight, labels, desirable, ref, kl: _kto_loss(
        head(hidden, weight, labels).sum(-1), ref, desirable, kl
    )


def _liger_kto(cuda: bool):
    """Liger's fused KTO without its reference model, as `_liger_dpo` (its loss reads a reference of 0)."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss
    except Exception:
        return None
    loss = LigerFusedLinearKTOLoss(ignore_index=IGNORE, beta=0.1, compiled=cuda, use_ref_model=False)

    def fn(hidden, weight, labels, desirable, ref, kl):
        return loss(hidden, weight, labels, preference_labels=desirable, kl=kl)[0]

    return fn


def _fused_kto(strategy: str):
    loss = fastalign.FusedLinearKTOLoss(beta=0.1, strategy=strategy)
    return lambda h, w, y, desirable, ref, kl: loss(h, w, y, desirable, ref_logps=ref, kl=kl)[0]


def _kto_cases(env: Env) -> list[Case]:
    shapes = _shapes(env, [_TARGET], (4, 64, 128, 32000, torch.float32))
    impls = {f"fastalign-{strategy}": _fused_kto(strategy) for strategy in ("fast", "lean")}
    impls["eager"] = _kto_on(ref.linear_token_logprobs)
    impls.update(_installed(trl=_kto_on(_trl_head()), cce=_kto_on(_cce_head(env.cuda)), liger=_liger_kto(env.cuda)))

    def make_inputs(shape, requires_grad):
        hidden, weight, labels = _inputs(env, shape, requires_grad, prompt=True)
        rows = labels.shape[0]
        # The reference within about 1 / beta of the policy: KTO's 1 - sigmoid saturates (a zero gradient, in fp32)
        # when they are far apart, as with made-up log-probs.
        with torch.no_grad():
            policy = fastalign.linear_token_logprobs(hidden, weight, labels).sum(-1)
        gen = torch.Generator(device=env.device).manual_seed(4)
        ref_logps = policy + 10 * torch.randn(rows, device=env.device, generator=gen)
        desirable = torch.arange(rows, device=env.device) % 2 == 0
        return hidden, weight, labels, desirable, ref_logps, torch.tensor(0.5, device=env.device)

    def check_for(shape, impl):
        def check():
            hidden, weight, labels, desirable, ref_logps, kl = make_inputs(shape, False)

            def loss_of_logps(logp):
                return ref_dpo.kto_loss(logp.sum(-1), ref_logps, desirable, kl, beta=0.1)[0]

            fused = impls[impl]
            _check_against_float32(
                loss_of_logps, hidden, weight, labels, lambda h, w: fused(h, w, labels, desirable, ref_logps, kl)
            )

        return check

    return _cases(env, "FusedLinearKTOLoss", shapes, impls, make_inputs, _loss_flops(_prompt), check_for)


def _fused_dpo(strategy: str):
    loss = fastalign.FusedLinearDPOLoss(beta=0.1, strategy=strategy)
    return lambda h, w, y, rc, rr: loss(h, w, y, ref_chosen_logps=rc, ref_rejected_logps=rr)[0]


def _eager_dpo(hidden, weight, labels, ref_chosen, ref_rejected):
    logits = torch.nn.functional.linear(hidden, weight)
    return ref_dpo.dpo_loss_from_logits(logits, labels, ref_chosen, ref_rejected, beta=0.1)[0]


def _ift_cases(env: Env) -> list[Case]:
    shapes = _shapes(env, [_TARGET], (4, 64, 128, 32000, torch.float32))
    impls = {f"fastalign-{s}": fastalign.FusedLinearIFTLoss(strategy=s) for s in ("fast", "lean")}
    impls["eager"] = lambda h, w, y: ref_ift.ift_loss_from_logits(torch.nn.functional.linear(h, w), y)

    def make_inputs(shape, requires_grad):
        return _inputs(env, shape, requires_grad, prompt=True)

    def check_for(shape, impl):
        def check():
            hidden, weight, labels = make_inputs(shape, False)
            eager = lambda logp: ref_ift.ift_loss(logp, labels != IGNORE)
            _check_against_float32(eager, hidden, weight, labels, lambda h, w: impls[impl](h, w, labels))

        return check

    return _cases(env, "FusedLinearIFTLoss", shapes, impls, make_inputs, _loss_flops(_prompt), check_for)


def cases(env: Env) -> list[Case]:
    # In the order a short GPU budget should cover them (gpu-check runs a suite's groups in order): issue 12's DPO
    # target, then the log-probs, the SFT loss, KTO and IFT.
    return _dpo_cases(env) + _logprobs_cases(env) + _cross_entropy_cases(env) + _kto_cases(env) + _ift_cases(env)
