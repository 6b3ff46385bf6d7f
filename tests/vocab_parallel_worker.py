"""Worker of tests/test_vocab_parallel.py: one of 2 or 4 gloo processes on the CPU.

Every rank builds the same inputs (same seed); the lm_head weight (and bias) is distributed Shard(0) over a 1-D
mesh named "tp". The vocab-parallel op must match the float64 eager reference on the full weight, computed in the
same process: forward values, argmax, and the gradients of hidden, of each rank's weight and bias slice.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

from fastalign import (
    DPOLoss,
    IFTLoss,
    KTOLoss,
    linear_token_logprobs,
    linear_token_stats,
    token_logprobs,
    vocab_parallel,
)
from fastalign._backend import forced_backend
from fastalign.linear_losses import (
    cross_entropy_from_hidden,
    dpo_loss_from_hidden,
    ift_loss_from_hidden,
    kto_loss_from_hidden,
)
from fastalign.reference.linear_logprobs import linear_logits

H, B, T = 16, 2, 5
IGNORE = -100
HEAD = {"temperature": 0.7, "softcap": 5.0, "logit_scale": 1.3}


def _path(backend: str):
    return forced_backend("torch") if backend == "torch" else contextlib.nullcontext()  # else: the kernels


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _inputs(V: int, world: int):
    gen = torch.Generator().manual_seed(1234)
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    bias = torch.randn(V, generator=gen) * 0.1
    labels = torch.randint(0, V, (B, T), generator=gen)
    # A label in every rank's slice (torch.chunk's split), and ignored rows.
    per_rank = -(-V // world)
    for r in range(world):
        labels.view(-1)[r] = min(V - 1, r * per_rank + r)
    labels[1, -2:] = IGNORE
    return hidden, weight, bias, labels


def _tp_mesh(world: int):
    return init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))


def _count_collectives(monkeypatch_calls: list):
    """Records the number of elements every all_gather / all_reduce sends, to bound the communication."""
    real_gather, real_reduce = dist.all_gather, dist.all_reduce

    def all_gather(parts, x, *args, **kwargs):
        monkeypatch_calls.append(("all_gather", x.numel()))
        return real_gather(parts, x, *args, **kwargs)

    def all_reduce(x, *args, **kwargs):
        monkeypatch_calls.append(("all_reduce", x.numel()))
        return real_reduce(x, *args, **kwargs)

    dist.all_gather, dist.all_reduce = all_gather, all_reduce
    return lambda: (setattr(dist, "all_gather", real_gather), setattr(dist, "all_reduce", real_reduce))


class _HeadFlops(TorchDispatchMode):
    """Counts the FLOPs of the torch matrix products run inside it that have the hidden size H on a side: the head's
    GEMMs (the fast path's are torch's on every backend: its kernels are elementwise), not the losses' own small
    products (IFT's [R, T] x [T, T] scan on the torch path, a d bias summed by a product)."""

    _OPERANDS = {"mm": (0, 1), "addmm": (1, 2), "addmm_": (1, 2)}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operands = self._OPERANDS.get(func.overloadpacket.__name__)
        if operands is not None:
            a, b = (args[i] for i in operands)
            if H in (a.shape[1], b.shape[1]):
                self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def stats_main(rank: int, world: int, V: int, backend: str) -> None:
    """linear_token_stats with every extra, softcap/scale/temperature and a bias, on the vocab-parallel weight."""
    hidden, weight, bias, labels = _inputs(V, world)
    mesh = _tp_mesh(world)
    w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_(True)
    b = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    g_logp, g_ent = torch.randn(B, T, generator=torch.Generator().manual_seed(7)).unbind(0)[0], 0.3

    calls: list = []
    restore = _count_collectives(calls)
    try:
        with _path(backend):
            stats = linear_token_stats(h, w, labels, b, **HEAD, log_sum_sq_probs=True, mean_logits=True)
            loss = (stats.logprobs * g_logp).sum() + g_ent * stats.entropy.sum()
            loss.backward()
    finally:
        restore()
    N = B * T
    # Per call: one all-gather of at most 9 values per row (8 statistics, the label's log-prob with its owner's flag,
    # and the label, checked equal across the group), then the all-reduce of d hidden (rows x H).
    assert [name for name, _ in calls] == ["all_gather", "all_reduce"], calls
    assert calls[0][1] <= 9 * N and calls[1][1] == N * H, calls

    h64, w64, b64 = (t.double().requires_grad_(True) for t in (hidden, weight, bias))
    z = linear_logits(h64, w64, b64, **HEAD)
    logp_all = torch.log_softmax(z, -1)
    valid = labels != IGNORE
    ref_logp = torch.where(valid, logp_all.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    ref_ent = -(logp_all.exp() * logp_all).sum(-1)
    ((ref_logp * g_logp).sum() + g_ent * ref_ent.sum()).backward()

    assert _rel(stats.logprobs, ref_logp) < 1e-6, _rel(stats.logprobs, ref_logp)
    assert (stats.logprobs[~valid] == 0).all()
    assert _rel(stats.entropy, ref_ent) < 1e-6
    assert torch.equal(stats.argmax, z.argmax(-1))
    assert _rel(stats.log_sum_sq_probs, torch.logsumexp(2 * logp_all, -1)) < 1e-6
    assert _rel(stats.mean_logits, z.mean(-1)) < 1e-6
    assert _rel(h.grad, h64.grad) < 1e-5, _rel(h.grad, h64.grad)
    assert isinstance(w.grad, DTensor) and w.grad.placements == (Shard(0),)
    assert isinstance(b.grad, DTensor) and b.grad.placements == (Shard(0),)
    sl = slice(rank * -(-V // world), rank * -(-V // world) + w.to_local().shape[0])
    assert _rel(w.grad.to_local(), w64.grad[sl]) < 1e-5, _rel(w.grad.to_local(), w64.grad[sl])
    assert _rel(b.grad.to_local(), b64.grad[sl]) < 1e-5


def logprobs_main(rank: int, world: int, V: int, backend: str) -> None:
    """linear_token_logprobs without extras (ignored rows are not scored) and without a bias, fp32 and bf16 (d logits
    in bf16 with the slice's log-sum-exp gradient added at the label columns), grad_output != 1, against float64 on
    the same (bf16-rounded) inputs."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        hidden, weight = (t.to(dtype) for t in _inputs(V, world)[:2])
        labels = _inputs(V, world)[3]
        w = distribute_tensor(weight, _tp_mesh(world), [Shard(0)]).requires_grad_(True)
        h = hidden.clone().requires_grad_(True)
        with _path(backend):
            logp = linear_token_logprobs(h, w, labels)
            (logp * torch.linspace(-1, 2, logp.numel()).view(logp.shape)).sum().backward()  # grad_output != 1
        h64, w64 = (t.double().requires_grad_(True) for t in (hidden, weight))
        valid = labels != IGNORE
        logp_all = torch.log_softmax(linear_logits(h64, w64), -1)
        ref = torch.where(valid, logp_all.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)
        (ref * torch.linspace(-1, 2, ref.numel()).view(ref.shape)).sum().backward()
        where = f"{dtype}, rank {rank}"
        assert _rel(logp, ref) < tol / 10, where
        assert (logp[~valid] == 0).all()
        assert h.grad.dtype == w.grad.dtype == dtype and w.grad.to_local().layout == torch.strided, where
        assert _rel(h.grad, h64.grad) < tol, (where, _rel(h.grad, h64.grad))
        sl = slice(rank * -(-V // world), rank * -(-V // world) + w.to_local().shape[0])
        assert _rel(w.grad.to_local(), w64.grad[sl]) < tol, (where, _rel(w.grad.to_local(), w64.grad[sl]))


def dpo_main(rank: int, world: int, V: int, backend: str) -> None:
    """dpo_loss_from_hidden end to end on the vocab-parallel weight, on the lean strategy."""
    hidden, weight, _, labels = _inputs(V, world)
    gen = torch.Generator().manual_seed(5)
    ref_logps = torch.randn(2, B // 2, generator=gen)
    # use_weighting (WPO) reads log sum_v p_v^2 of every token: the combined extra, end to end.
    kwargs = {"ref_chosen_logps": ref_logps[0], "ref_rejected_logps": ref_logps[1], "beta": 0.2, "use_weighting": True}
    w = distribute_tensor(weight, _tp_mesh(world), [Shard(0)]).requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    with _path(backend):
        loss = dpo_loss_from_hidden(h, w, labels, strategy="lean", **kwargs)[0]
        loss.backward()
    w1, h1 = weight.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    with _path(backend):
        ref = dpo_loss_from_hidden(h1, w1, labels, strategy="lean", **kwargs)[0]
        ref.backward()
    assert _rel(loss, ref) < 1e-6, (loss, ref)
    assert _rel(h.grad, h1.grad) < 1e-5
    sl = slice(rank * -(-V // world), rank * -(-V // world) + w.to_local().shape[0])
    assert _rel(w.grad.to_local(), w1.grad[sl]) < 1e-5


def _loss_inputs(V: int, world: int):
    """4 sequences (2 DPO pairs) of 7 tokens: labels in every rank's slice, greedy labels (the accuracy counts),
    ignored prompt tokens, and a sequence without a scored token (the second pair's rejected row; a KTO or IFT
    example of its own)."""
    gen = torch.Generator().manual_seed(4321)
    R, T_ = 4, 7
    hidden = torch.randn(R, T_, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 2 / H**0.5
    bias = torch.randn(V, generator=gen) * 0.1
    labels = torch.randint(0, V, (R, T_), generator=gen)
    per_rank = -(-V // world)
    for r in range(world):
        labels[r % (R - 1), 2 + r // (R - 1)] = min(V - 1, r * per_rank + 1)
    # The greedy token as the label at the last positions, so the accuracy metric counts (HEAD keeps the argmax).
    labels[:, 4:] = torch.addmm(bias, hidden[:, 4:].reshape(-1, H), weight.T).argmax(-1).view(R, T_ - 4)
    labels[:, :2] = IGNORE  # prompt
    labels[3] = IGNORE  # a sequence without a scored token
    return hidden, weight, bias, labels


def _loss_cases(R: int, V: int):
    """(name, fn(hidden, weight, labels, bias, **kw) -> (loss, values to compare), with bias) for every fused loss
    family the fast strategy takes."""
    gen = torch.Generator().manual_seed(99)
    ref_logps = torch.randn(R, generator=gen) - 10
    desirable = torch.tensor([True, False, True, False])
    dpo_ref = {"ref_chosen_logps": ref_logps[: R // 2], "ref_rejected_logps": ref_logps[R // 2 :]}

    def dpo(loss_type, **options):
        def run(h, w, labels, b, **kw):
            loss, metrics, per_example = dpo_loss_from_hidden(
                h, w, labels, b, beta=0.3, loss_type=loss_type, return_per_example=True, **dpo_ref, **options, **kw
            )
            return loss, [metrics["rewards/margins"], *per_example.values()]

        return run

    def kto(h, w, labels, b, **kw):
        loss, metrics, per_example = kto_loss_from_hidden(
            h, w, labels, desirable, b, ref_logps=ref_logps, kl=0.05, beta=0.2, return_per_example=True, **kw
        )
        return loss, list(per_example.values())

    def ift(h, w, labels, b, **kw):
        return ift_loss_from_hidden(h, w, labels, b, gamma=0.9, **kw), []

    def cross_entropy(h, w, labels, b, **kw):
        loss, metrics = cross_entropy_from_hidden(
            h, w, labels, b, label_smoothing=0.1, entropy=True, accuracy=True, **kw
        )
        return loss, [metrics["entropy"], metrics["mean_token_accuracy"]]

    def cross_entropy_sum(h, w, labels, b, **kw):
        return cross_entropy_from_hidden(h, w, labels, b, reduction="sum", **kw)[0], []

    def dpo_ref_hidden(h, w, labels, b, **kw):  # the reference's sums from hidden states under the same head
        loss, metrics = dpo_loss_from_hidden(h, w, labels, b, beta=0.3, ref_hidden=hidden_ref, **kw)
        return loss, [metrics["rewards/margins"]]

    hidden_ref = torch.randn(R, 7, H, generator=gen)
    return [
        ("dpo-sigmoid-wpo", dpo("sigmoid", use_weighting=True), False),
        ("dpo-ref-hidden", dpo_ref_hidden, True),
        ("dpo-ipo+sft", dpo(["ipo", "sft"], loss_weights=[1.0, 0.5]), True),
        ("kto", kto, True),
        ("ift", ift, False),
        ("cross-entropy-smoothed", cross_entropy, True),
        ("cross-entropy-sum", cross_entropy_sum, False),
    ]


def fast_losses_main(rank: int, world: int, V: int, backend: str) -> None:
    """The fast strategy on the vocab-parallel weight (and bias) against the same loss on the full weight in one
    process: loss, metrics, d hidden, this rank's d weight and d bias slices; auto with the default budget (it
    takes fast), and fast with a budget that cuts a pair into slices of rows. The collectives inside the forward
    are counted: per chunk one all-gather of at most 9 floats per row and the all-reduce of the chunk's d hidden,
    nothing V-sized (lean would communicate in the backward only)."""
    hidden, weight, bias, labels = _loss_inputs(V, world)
    R, T_ = labels.shape
    mesh = _tp_mesh(world)
    per_rank = -(-V // world)
    sl = slice(rank * per_rank, rank * per_rank + min(per_rank, V - rank * per_rank))
    for name, fn, with_bias in _loss_cases(R, V):
        for strategy, budget in (("auto", None), ("fast", 256)):  # 256 bytes: a few rows per chunk
            head = {**HEAD, "memory_budget": budget} if name != "ift" else {"memory_budget": budget}
            w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_(True)
            b = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_(True) if with_bias else None
            h = hidden.clone().requires_grad_(True)
            calls: list = []
            restore = _count_collectives(calls)
            try:
                with _path(backend), _HeadFlops() as counter:
                    loss, values = fn(h, w, labels, b, strategy=strategy, **head)
            finally:
                restore()
            with _path(backend), counter:
                (0.7 * loss).backward()  # grad_output != 1
            # 6 N H V / TP per rank: logits, d hidden, d weight on the slice (a computed reference's are lean's).
            nhv = (labels != IGNORE).sum().item() * H * w.to_local().shape[0]
            assert name == "dpo-ref-hidden" or counter.flops == 6 * nhv, (name, budget, counter.flops / nhv)
            if world == 1:  # the whole vocabulary on one rank: the plain path, no collective
                assert not calls, (name, calls)
            else:
                assert calls and {c for c, _ in calls} == {"all_gather", "all_reduce"}, (name, calls)
                assert all(n <= 9 * R * T_ for c, n in calls if c == "all_gather"), (name, calls)
                # d hidden's sums, and the check that every rank scores as many rows per sequence (2 R integers).
                reduced = (labels != IGNORE).sum() * H + 2 * labels.shape[0]
                assert sum(n for c, n in calls if c == "all_reduce") == reduced, (name, calls)

            w1, h1 = weight.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
            b1 = bias.clone().requires_grad_(True) if with_bias else None
            with _path(backend):
                ref, ref_values = fn(h1, w1, labels, b1, strategy=strategy, **head)
                (0.7 * ref).backward()
            where = f"{name}, {strategy}, budget {budget}, rank {rank}"
            assert _rel(loss, ref) < 1e-6, (where, loss, ref)
            for value, expected in zip(values, ref_values, strict=True):
                assert _rel(value, expected) < 1e-5 or torch.equal(value, expected), (where, value, expected)
            assert _rel(h.grad, h1.grad) < 1e-5, (where, _rel(h.grad, h1.grad))
            assert isinstance(w.grad, DTensor) and w.grad.placements == (Shard(0),), where
            assert _rel(w.grad.to_local(), w1.grad[sl]) < 1e-5, (where, _rel(w.grad.to_local(), w1.grad[sl]))
            if with_bias:
                assert isinstance(b.grad, DTensor) and b.grad.placements == (Shard(0),), where
                assert _rel(b.grad.to_local(), b1.grad[sl]) < 1e-5, (where, _rel(b.grad.to_local(), b1.grad[sl]))
    # hidden as a DTensor replicated over the group (ColwiseParallel's input): the same loss, d hidden a DTensor.
    w = distribute_tensor(weight, mesh, [Shard(0)])
    h = distribute_tensor(hidden, mesh, [Replicate()]).requires_grad_(True)
    with _path(backend):
        loss = ift_loss_from_hidden(h, w, labels, strategy="fast")
        loss.backward()
        expected = ift_loss_from_hidden(hidden, w, labels, strategy="fast")
    assert torch.equal(loss, expected) and isinstance(h.grad, DTensor), (loss, expected)
    # A shifted, non-contiguous hidden is read in place.
    longer = torch.cat([hidden, torch.randn(R, 1, H)], 1)
    with _path(backend):
        assert torch.equal(ift_loss_from_hidden(longer[:, :-1], w, labels, strategy="fast"), expected)
    # Bad input raises on every rank (the check reads only replicated values) with the single-device messages.
    bad = labels.clone()
    bad[0, 3] = V
    for args, message in (((bad, None), f"outside [0, {V})"), ((labels, bias), "bias must be a DTensor sharded as")):
        try:
            with _path(backend):
                cross_entropy_from_hidden(hidden, w, *args, strategy="fast")
        except ValueError as e:
            assert message in str(e), (message, e)
        else:
            raise AssertionError(f"expected a ValueError with {message!r}")


def smoothing_main(rank: int, world: int, V: int, backend: str) -> None:
    """Cross-entropy with label smoothing on the vocab-parallel weight against the float64 eager F.cross_entropy
    on the full logits (the mean log-prob over the whole vocabulary, not the slice's), gradients included; fp32,
    and bf16 (d logits in bf16 next to the fp32 logits on the kernel path) against the bf16-rounded inputs."""
    for dtype, value_tol, grad_tol in ((torch.float32, 1e-6, 1e-5), (torch.bfloat16, 1e-5, 1e-2)):
        hidden, weight, bias = (t.to(dtype) for t in _loss_inputs(V, world)[:3])
        labels = _loss_inputs(V, world)[3]
        w = distribute_tensor(weight, _tp_mesh(world), [Shard(0)]).requires_grad_(True)
        b = distribute_tensor(bias, _tp_mesh(world), [Shard(0)]).requires_grad_(True)
        h = hidden.clone().requires_grad_(True)
        with _path(backend):
            loss = cross_entropy_from_hidden(h, w, labels, b, label_smoothing=0.2, **HEAD)[0]
            loss.backward()
        h64, w64, b64 = (t.double().requires_grad_(True) for t in (hidden, weight, bias))
        z = linear_logits(h64, w64, b64, **HEAD).view(-1, V)
        ref = torch.nn.functional.cross_entropy(z, labels.view(-1), ignore_index=IGNORE, label_smoothing=0.2)
        ref.backward()
        per_rank = -(-V // world)
        sl = slice(rank * per_rank, rank * per_rank + w.to_local().shape[0])
        where = f"{dtype}, rank {rank}"
        assert _rel(loss, ref) < value_tol, (where, loss, ref)
        assert h.grad.dtype == dtype and w.grad.dtype == dtype, where
        assert _rel(h.grad, h64.grad) < grad_tol, (where, _rel(h.grad, h64.grad))
        assert _rel(w.grad.to_local(), w64.grad[sl]) < grad_tol, (where, _rel(w.grad.to_local(), w64.grad[sl]))
        assert _rel(b.grad.to_local(), b64.grad[sl]) < grad_tol, (where, _rel(b.grad.to_local(), b64.grad[sl]))


def logits_losses_main(rank: int, world: int, V: int, backend: str) -> None:
    """The logits-path loss modules (DPOLoss, KTOLoss, IFTLoss) on Shard(-1) DTensor logits against the same
    modules on the full logits in one process: loss, metrics, per-example outputs, and this rank's slice of d logits
    (a DTensor with the logits' placement); the DPO reference as Shard(-1) ref_logits too."""
    _, _, _, labels = _loss_inputs(V, world)
    R, T_ = labels.shape
    gen = torch.Generator().manual_seed(2024)
    logits, ref_logits = torch.randn(2, R, T_, V, generator=gen).unbind(0)
    ref_logps = torch.randn(R, generator=gen) - 10
    desirable = torch.tensor([True, False, True, False])
    mesh = _tp_mesh(world)
    per_rank = -(-V // world)
    sl = slice(rank * per_rank, rank * per_rank + min(per_rank, V - rank * per_rank))
    cases = [
        (
            "dpo-sigmoid-wpo-ref-logits",
            DPOLoss(beta=0.3, use_weighting=True, return_per_example=True),
            lambda module, x, ref: module(x, labels, ref_logits=ref),
        ),
        (
            "dpo-ipo+sft",
            DPOLoss(beta=0.3, loss_type=["ipo", "sft"], loss_weights=[1.0, 0.5], return_per_example=True),
            lambda module, x, ref: module(x, labels, ref_logps[: R // 2], ref_logps[R // 2 :]),
        ),
        (
            "kto",
            KTOLoss(beta=0.2, return_per_example=True),
            lambda module, x, ref: module(x, labels, desirable, ref_logps, 0.05),
        ),
        ("ift", IFTLoss(gamma=0.9), lambda module, x, ref: (module(x, labels),)),
    ]
    for name, module, call in cases:
        x = distribute_tensor(logits, mesh, [Shard(2)]).requires_grad_(True)
        x1 = logits.clone().requires_grad_(True)
        with _path(backend):
            out = call(module, x, distribute_tensor(ref_logits, mesh, [Shard(2)]))
            (0.7 * out[0]).backward()
            expected = call(module, x1, ref_logits)
            (0.7 * expected[0]).backward()
        where = f"{name}, rank {rank}"
        assert _rel(out[0], expected[0]) < 1e-6, (where, out[0], expected[0])
        for part, part_expected in zip(out[1:], expected[1:], strict=True):
            assert part.keys() == part_expected.keys(), where
            for key in part:
                value, ref_value = part[key], part_expected[key]
                assert not isinstance(value, DTensor), (where, key)
                assert _rel(value, ref_value) < 1e-5 or torch.equal(value, ref_value), (where, key, value, ref_value)
        assert isinstance(x.grad, DTensor) and x.grad.placements == (Shard(2),), where
        assert _rel(x.grad.to_local(), x1.grad[..., sl]) < 1e-5, (where, _rel(x.grad.to_local(), x1.grad[..., sl]))


def errors_main(rank: int, world: int) -> None:
    """Layouts a vocab-parallel head cannot take raise ValueError naming what is wrong."""
    hidden, weight, _, labels = _inputs(37, world)
    mesh = _tp_mesh(world)
    cases = [
        (distribute_tensor(weight, mesh, [Shard(1)]), "Shard(0)"),  # RowwiseParallel's layout
        (distribute_tensor(weight[: world - 1], mesh, [Shard(0)]), "slice is empty"),  # a rank with no row
    ]
    if world == 4:
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        cases.append((distribute_tensor(weight, mesh2, [Shard(0), Shard(0)]), "replicated on the others"))
        # Replicate on "tp" (accelerate's mesh with TP off, FSDP on "dp"): not vocab-parallel, gathered as before.
        fsdp_like = distribute_tensor(weight, mesh2, [Shard(0), Replicate()])
        assert torch.equal(
            linear_token_logprobs(hidden, fsdp_like, labels), linear_token_logprobs(hidden, weight, labels)
        )
    for w, message in cases:
        try:
            linear_token_logprobs(hidden, w, labels.clamp(max=w.shape[0] - 1))
        except ValueError as e:
            assert message in str(e), (message, e)
        else:
            raise AssertionError(f"expected a ValueError with {message!r}")
    w = distribute_tensor(weight, mesh, [Shard(0)])
    # hidden may be a DTensor replicated over the group (the input ColwiseParallel makes), not a sharded one.
    plain = linear_token_logprobs(hidden, w, labels)
    assert torch.equal(linear_token_logprobs(distribute_tensor(hidden, mesh, [Replicate()]), w, labels), plain)
    try:
        linear_token_logprobs(distribute_tensor(hidden, mesh, [Shard(1)]), w, labels)
    except ValueError as e:
        assert "hidden must be replicated" in str(e), e
    else:
        raise AssertionError("a sequence-sharded hidden must raise")
    try:  # a full bias: each rank would get only its slice's part of its gradient
        linear_token_logprobs(hidden, w, labels, torch.zeros(37))
    except ValueError as e:
        assert "bias must be a DTensor sharded as" in str(e), e
    else:
        raise AssertionError("a full bias with a vocab-parallel weight must raise")
    bad = labels.clone()
    bad[0, 0] = 37
    try:
        linear_token_logprobs(hidden, w, bad)
    except ValueError as e:
        assert "outside [0, 37)" in str(e), e
    else:
        raise AssertionError("a label outside [0, V) must raise")
    # Ranks scoring different rows (e.g. each its own sampled completions) would mix statistics of different tokens:
    # every rank raises, on the head, the fast losses and Shard(-1) logits alike.
    mine = labels.clone()
    mine[0, 0] = rank
    # As many rows, or fewer on one rank (or none): the fast loss plans its chunks, and so its collectives, from the
    # counts, so it checks them first (it aborted in a mismatched collective, or hung).
    fewer, none = labels.clone(), labels.clone()
    fewer[0, 0] = -100 if rank == 1 else labels[0, 0]
    none[:] = -100 if rank == 1 else labels
    refs = {"ref_chosen_logps": torch.zeros(B // 2), "ref_rejected_logps": torch.zeros(B // 2)}
    logits = distribute_tensor(linear_logits(hidden, weight), mesh, [Shard(-1)])
    for name, call in (
        ("head", lambda: linear_token_logprobs(hidden, w, mine)),
        ("fast loss", lambda: cross_entropy_from_hidden(hidden, w, mine, strategy="fast")),
        ("fast loss, a row fewer", lambda: cross_entropy_from_hidden(hidden, w, fewer, strategy="fast")),
        ("fast DPO, no row on one rank", lambda: dpo_loss_from_hidden(hidden, w, none, strategy="fast", **refs)),
        ("Shard(-1) logits", lambda: token_logprobs(logits, mine)),
    ):
        try:
            call()
        except ValueError as e:
            assert "labels differ across the tensor-parallel group" in str(e), (name, e)
        else:
            raise AssertionError(f"{name}: labels that differ across the group must raise")


def causal_lm_main(rank: int, world: int) -> None:
    """patch_causal_lm on a tiny Llama whose lm_head is ColwiseParallel over the mesh dim "tp": the loss, the
    entropy and every gradient (the head's a Shard(0) DTensor) equal the unsharded model's."""
    import copy

    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from fastalign.integrations import patch_causal_lm
    from fastalign.integrations.tiny import build_tokenizer, load_preferences, tiny_llama

    rows = load_preferences()[:4]
    tok = build_tokenizer(rows)
    enc = tok([r["prompt"] + r["chosen"] for r in rows], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    model = tiny_llama(tok, hidden_size=32, seed=0)  # untied: the head alone is ColwiseParallel
    reference = patch_causal_lm(copy.deepcopy(model))
    expected = reference(**enc, labels=labels, return_entropy=True)
    (expected.loss + 0.1 * expected.entropy.sum()).backward()

    parallelize_module(model, _tp_mesh(world), {"lm_head": ColwiseParallel()})
    assert model.lm_head.weight.placements == (Shard(0),)
    patch_causal_lm(model)
    out = model(**enc, labels=labels, return_entropy=True)
    (out.loss + 0.1 * out.entropy.sum()).backward()
    assert _rel(out.loss, expected.loss) < 1e-6, (out.loss, expected.loss)
    assert _rel(out.entropy, expected.entropy) < 1e-6
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        assert _rel(grad, ref.grad) < 1e-5, f"rank {rank}: {name} gradient off by {_rel(grad, ref.grad):.2e}"


def one_rank_main(rank: int, world: int, V: int, backend: str) -> None:
    """A one-rank "tp" mesh (TP = 1): the fast losses take the plain path, results as the unsharded op's."""
    for check in (smoothing_main, fast_losses_main):
        check(rank, world, V, backend)


def argmax_tie_main(rank: int, world: int, V: int, backend: str) -> None:
    """Two identical weight rows, the largest logit of every row, in the first and the last rank's slices: each
    slice's maximum is recomputed from the same operands, so the two tie exactly and the first wins as in
    torch.argmax, on both strategies (fast's torch path compared log p + lse, which rounds differently on each rank,
    and lost 3-6% of the ties). Unsharded, one GEMM's tiles may round the twins apart: no comparison with it."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, 64, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.1
    twin = torch.randn(H, generator=gen)
    hidden += 3 * twin / twin.norm()  # every row's largest logit is at the twins
    weight[3] = weight[V - 1] = twin
    labels = torch.full((B, 64), 3)
    w = distribute_tensor(weight, _tp_mesh(world), [Shard(0)])
    with _path(backend):
        for head in ({}, HEAD):
            for strategy in ("fast", "lean"):
                got = cross_entropy_from_hidden(hidden, w, labels, accuracy=True, strategy=strategy, **head)[1]
                assert got["mean_token_accuracy"] == 1, (strategy, head, got)


def ops_main(rank: int, world: int, V: int, backend: str) -> None:
    """Every op check in one set of processes (starting processes costs more than the checks)."""
    checks = (stats_main, logprobs_main, dpo_main, smoothing_main, fast_losses_main, logits_losses_main)
    for check in (*checks, argmax_tie_main):
        check(rank, world, V, backend)
    errors_main(rank, world)


def tp1_ops_main(rank: int, world: int, V: int, backend: str) -> None:
    """TP = 1: linear_token_stats (every extra, softcap/scale/temperature, a bias) and linear_token_logprobs on a
    Shard(0) weight of a one-rank "tp" mesh equal the plain op on the same weight bit for bit, forward and gradients
    (one slice is the whole vocabulary: the plain op runs on it, with no combining and no argmax-logit gather), and
    no collective runs."""
    hidden, weight, bias, labels = _inputs(V, world)
    w = distribute_tensor(weight, _tp_mesh(world), [Shard(0)]).requires_grad_(True)
    b = distribute_tensor(bias, _tp_mesh(world), [Shard(0)]).requires_grad_(True)
    assert w.placements == (Shard(0),) and w.to_local().shape == weight.shape
    gen = torch.Generator().manual_seed(11)
    g_logp, g_ent = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    extras = {"entropy": True, "argmax": True, "log_sum_sq_probs": True, "mean_logits": True}

    def run(w, b):
        h = hidden.clone().requires_grad_(True)
        with _path(backend):
            stats = linear_token_stats(h, w, labels, b, **HEAD, **extras)
            logp = linear_token_logprobs(h, w, labels)  # no bias, no extras
            ((stats.logprobs * g_logp).sum() + (stats.entropy * g_ent).sum() + 0.5 * logp.sum()).backward()
        return stats, logp, h.grad

    calls: list = []
    restore = _count_collectives(calls)
    real = vocab_parallel.combine_vocab_stats, vocab_parallel.row_logits
    vocab_parallel.combine_vocab_stats = vocab_parallel.row_logits = None  # TP = 1 must not reach them
    try:
        stats, logp, dh = run(w, b)
    finally:
        restore()
        vocab_parallel.combine_vocab_stats, vocab_parallel.row_logits = real
    assert calls == [], calls
    w_plain, b_plain = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    ref, ref_logp, ref_dh = run(w_plain, b_plain)
    for name in ("logprobs", "entropy", "log_sum_sq_probs", "mean_logits"):
        x, y = getattr(stats, name), getattr(ref, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), (name, _rel(x, y))
    assert torch.equal(stats.argmax, ref.argmax)
    assert (stats.logprobs[labels == IGNORE] == 0).all()
    assert torch.equal(logp, ref_logp) and torch.equal(dh, ref_dh), (_rel(logp, ref_logp), _rel(dh, ref_dh))
    assert isinstance(w.grad, DTensor) and w.grad.placements == (Shard(0),)
    assert torch.equal(w.grad.to_local(), w_plain.grad), _rel(w.grad.to_local(), w_plain.grad)
    assert torch.equal(b.grad.to_local(), b_plain.grad), _rel(b.grad.to_local(), b_plain.grad)


def trl_main(rank: int, world: int) -> None:
    """patch_trl under tensor parallelism: TRL 1.16's fused head (`add_fused_lm_head`, `model(..., labels=...,
    fused_lm_head=True)`) on a tiny Llama whose lm_head is ColwiseParallel over the mesh dim "tp" runs fastalign's
    vocab-parallel op (the weight reaches it as the Shard(0) DTensor, never gathered); every output TRL asks for and
    every gradient (each rank's lm_head slice) equal TRL's own head on the unsharded model in float64. Both of
    TRL's row layouts: every position (its CPU path) and the scored positions only (its CUDA/XPU path)."""
    for compact in (False, True):
        _trl_check(rank, world, compact)
    _trl_logits_check(rank, world)


def _trl_logits_check(rank: int, world: int) -> None:
    """TRL's logits helpers under patch_trl on Shard(-1) DTensor logits (ColwiseParallel's output with
    use_local_output=False) equal TRL's own on the full float64 logits; d logits stays sharded."""
    import trl.trainer.utils as trl_utils

    from fastalign.integrations import patch_trl, unpatch_trl

    names = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")
    theirs = {name: getattr(trl_utils, name) for name in names}
    V = 37
    gen = torch.Generator().manual_seed(21)
    logits = 3 * torch.randn(B, T, V, generator=gen)
    index = torch.randint(0, V, (B, T), generator=gen)
    row_mask = torch.rand(B, T, generator=gen) > 0.3
    g = torch.randn(3, B, T, generator=gen)
    x = distribute_tensor(logits, _tp_mesh(world), [Shard(-1)]).requires_grad_(True)
    x64 = logits.double().requires_grad_(True)
    patch_trl()
    try:
        ours = (
            trl_utils.selective_log_softmax_and_entropy(x, index, temperature=0.8, row_mask=row_mask),
            trl_utils.entropy_from_logits(x),
        )
    finally:
        unpatch_trl()
    expected = (
        theirs["selective_log_softmax_and_entropy"](x64, index, temperature=0.8, row_mask=row_mask),
        theirs["entropy_from_logits"](x64),
    )
    (logp, ent), full_ent = ours
    (ref_logp, ref_ent), ref_full_ent = expected
    for got, ref in ((logp, ref_logp), (ent, ref_ent), (full_ent, ref_full_ent)):
        assert not isinstance(got, DTensor) and got.dtype == torch.float32 and got.shape == (B, T)
        assert _rel(got, ref) < 1e-6, _rel(got, ref)
    ((logp * g[0]).sum() + (ent * g[1]).sum() + (full_ent * g[2]).sum()).backward()
    ((ref_logp * g[0]).sum() + (ref_ent * g[1]).sum() + (ref_full_ent * g[2]).sum()).backward()
    assert isinstance(x.grad, DTensor) and x.grad.placements == (Shard(2),)
    per_rank = -(-V // world)
    ref_grad = x64.grad[..., rank * per_rank : rank * per_rank + x.grad.to_local().shape[-1]]
    assert _rel(x.grad.to_local(), ref_grad) < 1e-5, _rel(x.grad.to_local(), ref_grad)


def _trl_check(rank: int, world: int, compact: bool) -> None:
    import copy
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import trl.trainer.utils as trl_utils
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    import fastalign
    from fastalign.integrations import patch_trl, unpatch_trl
    from fastalign.integrations.tiny import build_tokenizer, load_preferences, tiny_llama

    torch.set_num_threads(1)
    rows = load_preferences()
    tok = build_tokenizer(rows)
    enc = tok([r["prompt"] + r["chosen"] for r in rows[:3]], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    labels[:, :3] = -100  # the prompt's first tokens unscored, as TRL's trainers mask prompts
    V = len(tok) | 1  # odd: the slices differ in size
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    model = tiny_llama(tok, hidden_size=32, vocab_size=V, seed=0)  # untied: the head alone is ColwiseParallel
    model.lm_head = torch.nn.Linear(32, V, bias=True)  # a bias too: ColwiseParallel shards it as the weight
    reference = copy.deepcopy(model).double()
    g_ent = torch.randn(*labels.shape[:1], labels.shape[1] - 1, generator=torch.Generator().manual_seed(5))

    def run(m):
        out = m(**enc, labels=labels, fused_lm_head=True)
        (out.loss + (out.entropy * g_ent.to(out.entropy.dtype)).sum()).backward()
        return out

    # The reference: TRL's own head (unpatched) on the unsharded model, in float64.
    trl_utils.add_fused_lm_head(reference, temperature=0.9, outputs=outputs)
    expected = run(reference)
    expected_logits = reference(**enc).logits

    mesh = _tp_mesh(world)
    # Replicate: the unfused forward (generation, TRL's logits paths) gets the whole vocabulary's logits; the fused
    # head reads the weight alone, whatever the output layout.
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    assert model.lm_head.weight.placements == model.lm_head.bias.placements == (Shard(0),)
    trl_utils.add_fused_lm_head(model, temperature=0.9, outputs=outputs)
    patch_trl()
    seen = []
    real_op = fastalign.linear_token_stats

    def counted(hidden, weight, *args, **kwargs):
        seen.append(type(weight).__name__ + str(getattr(weight, "placements", "")))
        return real_op(hidden, weight, *args, **kwargs)

    real_full_tensor = DTensor.full_tensor
    gathered = []

    def full_tensor(x, *args, **kwargs):
        gathered.append(tuple(x.shape))
        return real_full_tensor(x, *args, **kwargs)

    real_use_triton = trl_utils._use_triton  # TRL scores only the labelled positions where it is True

    fastalign.linear_token_stats, DTensor.full_tensor = counted, full_tensor
    trl_utils._use_triton = lambda device: compact
    calls: list = []
    restore = _count_collectives(calls)
    try:
        out = run(model)
    finally:
        restore()
        fastalign.linear_token_stats, DTensor.full_tensor = real_op, real_full_tensor
        trl_utils._use_triton = real_use_triton
        unpatch_trl()
    assert gathered == [], gathered  # TRL's forward gathers every other DTensor weight
    assert seen == ["DTensor(Shard(dim=0),)"], seen  # fastalign's op ran once, on the weight's local slice
    mask = labels[:, 1:] != -100
    N, H = int(mask.sum()) if compact else mask.numel(), model.config.hidden_size
    # Only per-row values (<= 9 per row) and d hidden (rows x H) cross the group: never the weight (V x H).
    assert [name for name, _ in calls] == ["all_gather", "all_reduce"], calls
    assert calls[0][1] <= 9 * N and calls[1][1] == N * H, (calls, N, H)

    for field in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        x, y = getattr(out, field), getattr(expected, field)
        assert x.dtype == torch.float32 and x.shape == y.shape, field
        assert _rel(x, y) < 1e-5, (field, _rel(x, y))
    assert torch.equal(out.is_top1, expected.is_top1) and torch.equal(out.label_mask, mask)
    assert (out.log_probs[~mask] == 0).all() and (out.entropy[~mask] == 0).all()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        grad = param.grad
        if name.startswith("lm_head."):
            assert isinstance(grad, DTensor) and grad.placements == (Shard(0),), name
            per_rank = -(-V // world)
            grad, ref_grad = grad.to_local(), ref.grad[rank * per_rank : rank * per_rank + grad.to_local().shape[0]]
        else:
            ref_grad = ref.grad
        assert _rel(grad, ref_grad) < 1e-4, f"rank {rank}: {name} gradient off by {_rel(grad, ref_grad):.2e}"
    # The unfused forward (generation's) still gives the whole vocabulary's logits.
    with torch.no_grad():
        assert _rel(model(**enc).logits, expected_logits) < 1e-5
