"""The fused-linear losses (DPO family, KTO, IFT, cross-entropy) on both strategies, against composing
linear_token_logprobs with the losses, and against the float64 eager references (log-probs from the full logits,
then the eager losses), every gradient included (hidden, weight, bias)."""

from __future__ import annotations

import inspect
import math

import linear_fsdp_worker
import pytest
import torch
import triton.runtime.interpreter as triton_interpreter
from distributed import run_on_processes
from torch.utils._python_dispatch import TorchDispatchMode
from utils import GRAD_RTOL, rel_err

import fastalign
import fastalign.linear_losses as losses_module
from fastalign._backend import forced_backend
from fastalign.dpo import DPO_LOSS_TYPES, KTO_LOSS_TYPES
from fastalign.linear_losses import cross_entropy_from_hidden, kto_loss_from_hidden
from fastalign.reference import dpo as ref_dpo
from fastalign.reference import ift as ref_ift
from fastalign.reference import linear_logprobs as ref

IGNORE = -100
B, T, H, V = 2, 13, 40, 517
STRATEGIES = ["fast", "lean"]
BATCH_COUPLED = ("aot", "aot_unpaired")


def make_batch(device, dtype=torch.float32, batch=2 * B, T=T, H=H, V=V):
    hidden = torch.randn(batch, T, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * 2 / H**0.5).to(dtype)
    bias = torch.randn(V, device=device).to(dtype)
    labels = torch.randint(0, V, (batch, T), device=device)
    labels[:, :4] = IGNORE  # prompt
    labels[0, -2:] = IGNORE  # padding
    return hidden, weight, bias, labels


def leaves_of(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def sequence_logps_64(hidden, weight, bias, labels, **head):
    return ref.linear_token_logprobs(hidden, weight, labels, bias, IGNORE, **head).sum(-1)


def dpo_kwargs(loss_type):
    return {"beta": 0.2, "loss_type": loss_type, "label_smoothing": 0.1 if loss_type in ("exo_pair", "robust") else 0.0}


def sum_rounding_sensitivity(loss_of_sums, sums64: torch.Tensor) -> float:
    """How far (relative) the float64 gradient of loss_of_sums([2B] sequence sums) moves when the sums move by 4 fp32
    ulps each: the chosen up and the rejected down (the margins up), the reverse, or all up."""

    def grad_at(sums):
        sums = sums.detach().clone().requires_grad_(True)
        loss_of_sums(sums).backward()
        return sums.grad

    at = grad_at(sums64)
    step = 4 * torch.finfo(torch.float32).eps * sums64.abs()
    margin = torch.cat([torch.ones(B), -torch.ones(B)]).to(sums64)
    moved = [grad_at(sums64 + step * d) for d in (margin, -margin, torch.ones_like(margin))]
    return max(rel_err(g, at) for g in moved)


def check_grads(leaves, leaves64, tol):
    for leaf, leaf64, name in zip(leaves, leaves64, ("hidden", "weight", "bias")):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name
        assert torch.isfinite(leaf.grad).all(), name
        if leaf64.grad.abs().max() > 0:  # sppo_hard, for one, can have a zero gradient
            assert rel_err(leaf.grad, leaf64.grad) < tol, name


# ----------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_matches_float64_and_the_composition(loss_type, strategy, backend, device):
    hidden, weight, bias, labels = make_batch(device)
    ref_logps = torch.randn(2 * B, device=device) - 20
    leaves = leaves_of(hidden, weight, bias)
    reference = {"ref_chosen_logps": ref_logps[:B], "ref_rejected_logps": ref_logps[B:]}
    if strategy == "fast" and loss_type in BATCH_COUPLED:  # the module at construction, the function at the call
        with pytest.raises(ValueError, match="strategy='fast' needs a loss that decomposes"):
            fastalign.FusedLinearDPOLoss(**dpo_kwargs(loss_type), strategy=strategy)
        with pytest.raises(ValueError, match="strategy='fast' needs a loss that decomposes"):
            fastalign.linear_losses.dpo_loss_from_hidden(
                *leaves[:2], labels, leaves[2], **reference, **dpo_kwargs(loss_type), strategy=strategy
            )
        return
    module = fastalign.FusedLinearDPOLoss(**dpo_kwargs(loss_type), strategy=strategy)
    loss, metrics = module(*leaves[:2], labels, leaves[2], **reference)
    (2.5 * loss).backward()  # grad_output != 1

    # The composition the module stands for: the op, then dpo_loss with lengths from the labels.
    lengths = (labels != IGNORE).sum(-1)
    composed = leaves_of(hidden, weight, bias)
    logps = fastalign.linear_token_logprobs(*composed[:2], labels, composed[2]).sum(-1)
    loss_c, metrics_c = fastalign.dpo_loss(
        logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
        **dpo_kwargs(loss_type),
    )  # fmt: skip
    (2.5 * loss_c).backward()
    torch.testing.assert_close(loss, loss_c)
    assert metrics.keys() == metrics_c.keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name], metrics_c[name])

    leaves64 = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    logps64 = sequence_logps_64(*leaves64, labels)
    assert rel_err(logps, logps64) < 1e-6

    def reference_loss(sums):
        return ref_dpo.dpo_loss(
            sums[:B], sums[B:], ref_logps[:B].double(), ref_logps[B:].double(),
            chosen_lengths=lengths[:B], rejected_lengths=lengths[B:], **dpo_kwargs(loss_type),
        )[0]  # fmt: skip

    # The module and the composition sum the log-probs in different orders, so their fp32 sums differ by an ulp or
    # so, and near DiscoPOP's switch point (beta * margin within a few tau = 0.05 of 0) the loss's gradient moves
    # by ~100 per unit of a sum: 4.5e-4 of it between the two with FASTALIGN_SEED=1540773247. So both gradient checks
    # allow what 4 ulps of the sums move the float64 gradient, which is ~1e-5 or less for a well-conditioned draw.
    sensitivity = sum_rounding_sensitivity(reference_loss, logps64.detach())
    for leaf, leaf_c in zip(leaves, composed):
        assert rel_err(leaf.grad, leaf_c.grad) < 1e-5 + sensitivity

    loss64 = reference_loss(logps64.detach())
    assert abs(loss.item() - loss64.item()) <= 1e-5 * max(1.0, abs(loss64.item()))
    # The gradient is checked with the loss taken at the op's own fp32 sums and the float64 Jacobian of the sums:
    # near DiscoPOP's switch point the loss turns the sums' fp32 rounding (1e-7) into 1e-3 of its gradient, an
    # ill-conditioning no fp32 log-prob op avoids; the sums themselves are checked just above.
    (2.5 * reference_loss(logps64 + (logps.detach().double() - logps64.detach()))).backward()
    check_grads(leaves, leaves64, 1e-4 + sensitivity)


def test_auto_takes_fast_for_decomposable_losses_and_lean_otherwise(backend, device, monkeypatch):
    """auto: fast unless the loss sorts across the batch, or a unit's d logits exceed max(budget, 4 V H bytes)."""
    hidden, weight, bias, labels = make_batch(device)
    ran = []
    real_stats, real_fast = losses_module.linear_token_stats, losses_module._FastFusedLinearLoss.apply
    monkeypatch.setattr(losses_module, "linear_token_stats", lambda *a, **k: ran.append("lean") or real_stats(*a, **k))
    monkeypatch.setattr(losses_module._FastFusedLinearLoss, "apply", lambda *a: ran.append("fast") or real_fast(*a))
    reference = {"ref_chosen_logps": torch.zeros(B, device=device), "ref_rejected_logps": torch.zeros(B, device=device)}
    for loss_type, budget, expected in (("sigmoid", None, "fast"), ("aot", None, "lean"), ("ipo", 1, "fast")):
        fastalign.FusedLinearDPOLoss(loss_type=loss_type, memory_budget=budget)(hidden, weight, labels, **reference)
        assert ran.pop() == expected, loss_type
    # A pair of 2 x 13 rows of V fp32 logits is 53 KB; with H = 4 the accumulator is only 8 KB.
    small = (hidden[..., :4].contiguous(), weight[:, :4].contiguous())
    fastalign.FusedLinearDPOLoss(memory_budget=2**14)(*small, labels, **reference)
    assert ran.pop() == "lean"


def test_dpo_reference_hidden_states_run_without_grad(backend, device):
    hidden, weight, bias, labels = make_batch(device, torch.bfloat16)
    ref_hidden = (hidden.float() + 0.1 * torch.randn_like(hidden.float())).bfloat16().requires_grad_(True)
    ref_weight = weight.clone().requires_grad_(True)
    leaves = leaves_of(hidden, weight, bias)
    module = fastalign.FusedLinearDPOLoss(beta=0.1)
    loss, _ = module(*leaves[:2], labels, leaves[2], ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=bias)
    loss.backward()
    assert ref_hidden.grad is None and ref_weight.grad is None

    ref_logps = fastalign.linear_token_logprobs(ref_hidden, ref_weight, labels, bias).sum(-1).detach()
    expected, _ = module(hidden, weight, labels, bias, ref_chosen_logps=ref_logps[:B], ref_rejected_logps=ref_logps[B:])
    torch.testing.assert_close(loss, expected)
    # Without ref_weight, the reference shares the policy's lm_head (a PEFT adapter over a frozen head).
    shared, _ = module(hidden, weight, labels, bias, ref_hidden=ref_hidden, ref_bias=bias)
    torch.testing.assert_close(shared, expected)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dpo_completion_fully_masked(strategy, backend, device):
    hidden, weight, bias, labels = make_batch(device, torch.bfloat16)
    labels[1] = IGNORE  # the second chosen completion is empty
    leaves = leaves_of(hidden, weight, bias)
    zeros = torch.zeros(B, device=device)
    loss, _ = fastalign.FusedLinearDPOLoss(beta=0.1, strategy=strategy)(
        *leaves[:2], labels, leaves[2], ref_chosen_logps=zeros, ref_rejected_logps=zeros
    )
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(leaf.grad).all() for leaf in leaves)
    assert (leaves[0].grad[1] == 0).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dpo_with_no_label_ignored_matches_float64(strategy, backend, device):
    # Every row scored: the fast strategy takes the rows in pair order (chosen p, then rejected p), so no shortcut may
    # take them as the [2B * T, H] view in batch order.
    hidden, weight, bias, _ = make_batch(device)
    labels = torch.randint(0, V, (2 * B, T), device=device)
    ref_logps = torch.randn(2 * B, device=device) - 20
    leaves = leaves_of(hidden, weight, bias)
    loss, _ = fastalign.FusedLinearDPOLoss(beta=0.2, strategy=strategy)(
        *leaves[:2], labels, leaves[2], ref_chosen_logps=ref_logps[:B], ref_rejected_logps=ref_logps[B:]
    )
    (2.5 * loss).backward()
    leaves64 = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    sums = sequence_logps_64(*leaves64, labels)
    loss64 = ref_dpo.dpo_loss(sums[:B], sums[B:], ref_logps[:B].double(), ref_logps[B:].double(), beta=0.2)[0]
    (2.5 * loss64).backward()
    assert abs(loss.item() - loss64.item()) <= 1e-5 * max(1.0, abs(loss64.item()))
    check_grads(leaves, leaves64, 1e-4)


def test_dpo_bad_inputs(device):
    hidden, weight, bias, labels = make_batch(device)
    module = fastalign.FusedLinearDPOLoss(beta=0.1)
    logps = {"ref_chosen_logps": torch.zeros(B), "ref_rejected_logps": torch.zeros(B)}
    with pytest.raises(ValueError, match="even batch"):
        module(hidden[:3], weight, labels[:3], **logps)
    with pytest.raises(ValueError, match="ref_hidden"):
        module(hidden, weight, labels)
    with pytest.raises(ValueError, match="not both"):
        module(hidden, weight, labels, ref_hidden=hidden, **logps)
    with pytest.raises(ValueError, match="ref_weight and ref_bias need ref_hidden"):
        module(hidden, weight, labels, ref_weight=weight, **logps)
    with pytest.raises(ValueError, match="ref_hidden must have shape"):
        module(hidden, weight, labels, ref_hidden=hidden[:, 1:])
    with pytest.raises(ValueError, match="labels must have shape"):
        module(hidden, weight, labels[:, 1:], **logps)
    with pytest.raises(ValueError, match="beta"):
        fastalign.FusedLinearDPOLoss(beta=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        fastalign.FusedLinearDPOLoss(loss_type="nope")
    with pytest.raises(ValueError, match=r"strategy must be one of \['auto', 'fast', 'lean'\]"):
        fastalign.FusedLinearDPOLoss(strategy="quick")
    with pytest.raises(ValueError, match="strategy='fast' needs a loss that decomposes.*'aot'"):
        fastalign.FusedLinearDPOLoss(loss_type=["sigmoid", "aot"], strategy="fast")(hidden, weight, labels, **logps)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dpo_token_level_options_match_the_composition(strategy, backend, device):
    """LD-DPO, WPO (log sum p^2 from the same pass), f-divergence, per-example outputs (mean logits), a reference
    from hidden states summed with the same LD weights: as linear_token_stats then dpo_loss_from_token_logps."""
    hidden, weight, bias, labels = make_batch(device)
    labels[2, 4:7] = IGNORE  # chosen and rejected of a pair differ in length: LD-DPO's verbose tail
    ref_hidden = hidden + 0.2 * torch.randn_like(hidden)
    options = dict(ld_alpha=0.4, use_weighting=True, f_divergence_type="js_divergence", return_per_example=True)
    leaves = leaves_of(hidden, weight, bias)
    module = fastalign.FusedLinearDPOLoss(beta=0.3, strategy=strategy, softcap=6.0, **options)
    loss, metrics, per_example = module(*leaves[:2], labels, leaves[2], ref_hidden=ref_hidden, ref_bias=bias)
    (1.5 * loss).backward()

    head = {"ignore_index": IGNORE, "softcap": 6.0}
    composed = leaves_of(hidden, weight, bias)
    stats = fastalign.linear_token_stats(
        *composed[:2], labels, composed[2], **head, entropy=False, argmax=False, log_sum_sq_probs=True, mean_logits=True
    )
    mask = labels != IGNORE
    ref_token_logps = fastalign.linear_token_logprobs(ref_hidden, weight, labels, bias, **head)
    ref_sums = fastalign.dpo.sequence_logps(ref_token_logps, mask, ld_alpha=0.4)
    loss_c, metrics_c, per_example_c = fastalign.dpo.dpo_loss_from_token_logps(
        stats.logprobs, mask, *ref_sums.chunk(2), log_sum_sq_probs=stats.log_sum_sq_probs,
        mean_logits=stats.mean_logits, beta=0.3, **options,
    )  # fmt: skip
    (1.5 * loss_c).backward()
    torch.testing.assert_close(loss, loss_c)
    for got, expected in ((metrics, metrics_c), (per_example, per_example_c)):
        assert got.keys() == expected.keys()
        for name in got:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)
    assert "logits/chosen" in per_example
    for leaf, leaf_c in zip(leaves, composed):
        assert rel_err(leaf.grad, leaf_c.grad) < 1e-5


@pytest.mark.parametrize("strategy", ["auto", "fast", "lean"])
def test_weighted_sft_couples_the_pairs_so_it_runs_lean(strategy, backend, device):
    """WPO's weights scale the batch-level 'sft' NLL per pair, so its gradient at any token is the sum of every
    pair's weight: auto takes lean (fast gave the unweighted gradient when the pairs spanned chunks), fast refuses."""
    hidden, weight, bias, labels = make_batch(device, batch=6)
    ref_logps = torch.randn(6, device=device) - 20
    reference = {"ref_chosen_logps": ref_logps[:3], "ref_rejected_logps": ref_logps[3:]}
    options = dict(beta=0.3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], use_weighting=True)
    pair_bytes = 2 * T * V * 4  # a budget of one pair: on fast, one chunk per pair
    leaves = leaves_of(hidden, weight, bias)
    if strategy == "fast":
        with pytest.raises(ValueError, match="decomposes over examples: use_weighting=True weights the batch-level"):
            fastalign.FusedLinearDPOLoss(**options, strategy=strategy, memory_budget=pair_bytes)
        return
    module = fastalign.FusedLinearDPOLoss(**options, strategy=strategy, memory_budget=pair_bytes)
    loss, metrics = module(*leaves[:2], labels, leaves[2], **reference)
    (0.7 * loss).backward()

    composed = leaves_of(hidden, weight, bias)
    stats = fastalign.linear_token_stats(*composed[:2], labels, composed[2], log_sum_sq_probs=True)
    mask = labels != IGNORE
    loss_c, metrics_c = fastalign.dpo.dpo_loss_from_token_logps(
        stats.logprobs, mask, *ref_logps.chunk(2), log_sum_sq_probs=stats.log_sum_sq_probs, **options
    )
    (0.7 * loss_c).backward()
    torch.testing.assert_close(loss, loss_c)
    for leaf, leaf_c in zip(leaves, composed):
        assert rel_err(leaf.grad, leaf_c.grad) < 1e-5


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_second_backward_runs_lean_and_is_refused_clearly_fast(strategy, backend, device):
    hidden, weight, bias, labels = make_batch(device)
    reference = {"ref_chosen_logps": torch.zeros(B, device=device), "ref_rejected_logps": torch.zeros(B, device=device)}
    leaves = leaves_of(hidden, weight, bias)
    loss, _ = fastalign.FusedLinearDPOLoss(strategy=strategy)(*leaves[:2], labels, leaves[2], **reference)
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    if strategy == "fast":
        with pytest.raises(RuntimeError, match="second backward .* needs strategy='lean'"):
            torch.autograd.grad(loss, leaves)
    else:
        for again, once in zip(torch.autograd.grad(loss, leaves), first):
            torch.testing.assert_close(again, once, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["token_logprobs", "linear_token_logprobs", "ift_loss", "dpo-fast", "dpo-lean"])
def test_a_second_order_gradient_is_refused_not_silently_wrong(op, backend, device):
    # The backwards run kernels (or write in place), which autograd cannot differentiate: with create_graph=True the
    # first-order gradient is right and a gradient of it raises, instead of coming out zero, partial or wrong.
    hidden, weight, bias, labels = make_batch(device, torch.bfloat16)
    leaves = leaves_of(hidden, weight, bias)
    if op == "token_logprobs":
        loss = fastalign.token_logprobs(leaves[0] @ leaves[1].T, labels).sum()
    elif op == "linear_token_logprobs":
        loss = fastalign.linear_token_logprobs(*leaves[:2], labels, leaves[2]).sum()
    elif op == "ift_loss":
        # Log-probs (<= 0): with both signs a sequence's sum of discounted NLLs can be near 0, where IFT's weights
        # (divided by it) and their second order are ill-conditioned (0.16 relative error in fp32, seed 199).
        logps = (-5 * torch.rand(2 * B, T, device=device)).requires_grad_(True)
        leaves = [logps]
        loss = fastalign.ift_loss(logps, labels != IGNORE)
    else:
        zeros = torch.zeros(B, device=device)
        module = fastalign.FusedLinearDPOLoss(strategy=op.split("-")[1])
        loss, _ = module(*leaves[:2], labels, leaves[2], ref_chosen_logps=zeros, ref_rejected_logps=zeros)
    refused = "a gradient of their gradient .* is not supported"
    if op == "dpo-fast":  # its gradients come from the forward, linked to no input: create_graph=True is refused
        with pytest.raises(RuntimeError, match=refused):
            torch.autograd.grad(loss, leaves[0], create_graph=True)
        return
    first = torch.autograd.grad(loss, leaves[0], create_graph=True)[0]
    assert torch.isfinite(first).all() and first.abs().sum() > 0
    if op == "ift_loss" and backend == "torch":  # plain torch ops: their second order is right, and allowed
        logps64 = leaves[0].detach().double().requires_grad_(True)
        first64 = torch.autograd.grad(ref_ift.ift_loss(logps64, labels != IGNORE), logps64, create_graph=True)[0]
        second64 = torch.autograd.grad(first64.square().sum(), logps64)[0]
        assert rel_err(torch.autograd.grad(first.square().sum(), leaves[0])[0], second64) < 1e-5
        return
    with pytest.raises(RuntimeError, match=refused):
        torch.autograd.grad(first.float().square().sum(), leaves[0])
    if op == "token_logprobs":  # through d hidden = d logits @ W, the weight's second order needs our op's term
        first = torch.autograd.grad(loss, leaves[0], create_graph=True)[0]
        with pytest.raises(RuntimeError, match=refused):
            torch.autograd.grad(first.float().square().sum(), leaves[1])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kto_options_match_the_composition(strategy, backend, device):
    hidden, weight, bias, labels = make_batch(device, batch=3)
    desirable = torch.tensor([True, False, False], device=device)
    ref_logps = torch.randn(3, device=device) - 20
    options = dict(average_log_prob=True, clamp_kl=False, return_per_example=True)
    leaves = leaves_of(hidden, weight, bias)
    module = fastalign.FusedLinearKTOLoss(beta=0.2, strategy=strategy, **options)
    loss, metrics, per_example = module(*leaves[:2], labels, desirable, leaves[2], ref_logps=ref_logps, kl=-0.3)
    loss.backward()

    composed = leaves_of(hidden, weight, bias)
    stats = fastalign.linear_token_stats(
        *composed[:2], labels, composed[2], entropy=False, argmax=False, mean_logits=True
    )
    mask = labels != IGNORE
    loss_c, metrics_c, per_example_c = fastalign.kto_loss(
        stats.logprobs.sum(-1), ref_logps, desirable, -0.3, beta=0.2, lengths=mask.sum(-1), **options
    )
    loss_c.backward()
    torch.testing.assert_close(loss, loss_c)
    for name in metrics_c:
        torch.testing.assert_close(metrics[name], metrics_c[name])
    logits = torch.where(mask, stats.mean_logits, 0.0).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(per_example.pop("logits"), logits)
    for name in per_example_c:
        torch.testing.assert_close(per_example[name], per_example_c[name])
    for leaf, leaf_c in zip(leaves, composed):
        assert rel_err(leaf.grad, leaf_c.grad) < 1e-5


def test_dpo_module_options_come_in_dpoloss_order():
    """A positional DPOLoss(...) call means the same to FusedLinearDPOLoss(...): only the last option differs."""

    def positional(cls):
        return [n for n, p in inspect.signature(cls).parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD]

    dpo, fused = positional(fastalign.DPOLoss), positional(fastalign.FusedLinearDPOLoss)
    assert fused[:-1] == dpo[:-1] and (dpo[-1], fused[-1]) == ("inplace_backward", "memory_budget")


# ----------------------------------------------------------------------------- KTO


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
def test_kto_matches_float64(loss_type, strategy, backend, device):
    hidden, weight, bias, labels = make_batch(device, batch=3)
    desirable = torch.tensor([True, False, True], device=device)
    ref_logps, kl = torch.randn(3, device=device) - 20, 0.7
    kwargs = {"beta": 0.3, "desirable_weight": 1.3, "undesirable_weight": 0.8, "loss_type": loss_type}
    leaves = leaves_of(hidden, weight, bias)
    module = fastalign.FusedLinearKTOLoss(**kwargs, strategy=strategy)
    loss, metrics = module(*leaves[:2], labels, desirable, leaves[2], ref_logps=ref_logps, kl=kl)
    (0.6 * loss).backward()

    leaves64 = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    logps64 = sequence_logps_64(*leaves64, labels)
    loss64, metrics64 = ref_dpo.kto_loss(logps64, ref_logps.double(), desirable, kl, **kwargs)
    (0.6 * loss64).backward()
    assert abs(loss.item() - loss64.item()) <= 1e-5 * max(1.0, abs(loss64.item()))
    for name in metrics64:
        assert abs(metrics[name].item() - metrics64[name].item()) <= 1e-4 * max(1.0, abs(metrics64[name].item()))
    check_grads(leaves, leaves64, 1e-4)


def test_kto_reference_hidden_states(backend, device):
    hidden, weight, bias, labels = make_batch(device, batch=3)
    desirable = torch.tensor([False, True, True], device=device)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    ref_logps = fastalign.linear_token_logprobs(ref_hidden, weight, labels, bias).sum(-1)
    for strategy in STRATEGIES:
        got, _ = kto_loss_from_hidden(
            hidden, weight, labels, desirable, bias, ref_hidden=ref_hidden, ref_bias=bias, kl=0.1, strategy=strategy
        )
        expected, _ = kto_loss_from_hidden(
            hidden, weight, labels, desirable, bias, ref_logps=ref_logps, kl=0.1, strategy=strategy
        )
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="pass ref_logps, or ref_hidden"):
        kto_loss_from_hidden(hidden, weight, labels, desirable, kl=0.1)
    with pytest.raises(ValueError, match="kl"):
        kto_loss_from_hidden(hidden, weight, labels, desirable, ref_logps=ref_logps)


# ----------------------------------------------------------------------------- IFT


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("gamma", [0.0, 0.95, 1.0])
def test_ift_matches_float64_and_the_composition(gamma, strategy, backend, device):
    hidden, weight, bias, labels = make_batch(device, torch.bfloat16, batch=3)
    labels[2] = IGNORE  # a sequence with nothing to learn: contributes 0
    leaves = leaves_of(hidden, weight, bias)
    loss = fastalign.FusedLinearIFTLoss(gamma=gamma, strategy=strategy)(*leaves[:2], labels, leaves[2])
    loss.backward()

    composed = leaves_of(hidden, weight, bias)
    token_logps = fastalign.linear_token_logprobs(*composed[:2], labels, composed[2])
    loss_c = fastalign.ift_loss(token_logps, labels != IGNORE, gamma=gamma)
    loss_c.backward()
    torch.testing.assert_close(loss, loss_c)
    for leaf, leaf_c in zip(leaves, composed):
        assert rel_err(leaf.grad, leaf_c.grad) < GRAD_RTOL[torch.bfloat16]

    leaves64 = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    logps64 = ref.linear_token_logprobs(leaves64[0], leaves64[1], labels, leaves64[2], IGNORE)
    loss64 = ref_ift.ift_loss(logps64, labels != IGNORE, gamma=gamma)
    loss64.backward()
    assert abs(loss.item() - loss64.item()) <= 1e-5 * abs(loss64.item())
    check_grads(leaves, leaves64, GRAD_RTOL[torch.bfloat16])


def test_ift_bad_inputs(device):
    hidden, weight, bias, labels = make_batch(device)
    with pytest.raises(ValueError, match="gamma"):
        fastalign.FusedLinearIFTLoss(gamma=1.5)
    with pytest.raises(ValueError, match=r"hidden must have shape \[batch, T, H\]"):
        fastalign.FusedLinearIFTLoss()(hidden[0], weight, labels[0])


# ----------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "reduction, label_smoothing", [("mean", 0.0), ("sum", 0.0), ("mean", 0.1), ("none", 0.0)], ids=str
)
def test_cross_entropy_matches_float64(reduction, label_smoothing, strategy, backend, device):
    hidden, weight, bias, labels = make_batch(device, batch=3)
    head = {"softcap": 4.0, "temperature": 1.3}
    kwargs = {"reduction": reduction, "label_smoothing": label_smoothing, **head}
    leaves = leaves_of(hidden, weight, bias)
    lean_only = reduction == "none"
    if (strategy == "fast" and lean_only) or (strategy == "lean" and label_smoothing):
        with pytest.raises(ValueError, match="strategy"):
            fastalign.FusedLinearCrossEntropyLoss(**kwargs, strategy=strategy)
        with pytest.raises(ValueError, match="strategy"):
            cross_entropy_from_hidden(*leaves[:2], labels, leaves[2], **kwargs, strategy=strategy)
        return
    module = fastalign.FusedLinearCrossEntropyLoss(**kwargs, entropy=True, accuracy=True, strategy=strategy)
    loss, metrics = module(*leaves[:2], labels, leaves[2])
    g = torch.randn(loss.shape, device=device)
    (loss * g).sum().backward()

    leaves64 = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    loss64 = ref.linear_cross_entropy(*leaves64[:2], labels, leaves64[2], IGNORE, reduction, label_smoothing, **head)
    (loss64 * g).sum().backward()
    assert loss.dtype == torch.float32 and loss.shape == loss64.shape
    assert rel_err(loss, loss64) < 1e-5
    check_grads(leaves, leaves64, 1e-4)

    z64 = ref.linear_logits(*[t.detach() for t in leaves64], **head)
    valid = labels != IGNORE
    entropy64 = ref.linear_token_entropy(*[t.detach() for t in leaves64], **head)[valid].mean()
    assert abs(metrics["entropy"].item() - entropy64.item()) < 1e-5 * entropy64.item()
    accuracy = (z64.argmax(-1) == labels)[valid].double().mean()
    assert metrics["mean_token_accuracy"].item() == pytest.approx(accuracy.item())


def test_cross_entropy_counts_accuracy_and_ignores_padding(backend, device):
    """A head whose every prediction is right scores accuracy 1; a batch with nothing to learn gives loss 0."""
    hidden = torch.eye(16, device=device)[None, :, :]  # [1, 16, 16]
    weight = 10 * torch.eye(16, device=device)
    labels = torch.arange(16, device=device)[None]
    labels[0, :3] = IGNORE
    for strategy in STRATEGIES:
        loss, metrics = cross_entropy_from_hidden(hidden, weight, labels, accuracy=True, strategy=strategy)
        assert metrics["mean_token_accuracy"].item() == 1.0 and loss.item() < 1e-3
        leaf = hidden.clone().requires_grad_(True)
        empty, _ = cross_entropy_from_hidden(leaf, weight, torch.full_like(labels, IGNORE), strategy=strategy)
        empty.backward()
        assert empty.item() == 0 and (leaf.grad == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_takes_tokens_as_n_by_h(reduction, backend, device):
    # [N, H] hidden and [N] labels, as F.cross_entropy and Liger's fused loss take them: the same as [1, N, H].
    hidden, weight, bias, labels = make_batch(device)
    flat = hidden.reshape(-1, H)[::2]  # non-contiguous rows
    flat_labels = labels.reshape(-1)[::2]
    module = fastalign.FusedLinearCrossEntropyLoss(
        reduction=reduction, strategy="lean" if reduction == "none" else "auto"
    )
    leaves, leaves3 = leaves_of(flat, weight, bias), leaves_of(flat, weight, bias)
    loss = module(leaves[0], leaves[1], flat_labels, leaves[2])
    loss3 = module(leaves3[0][None], leaves3[1], flat_labels[None], leaves3[2])
    assert loss.shape == flat_labels.shape[: 1 if reduction == "none" else 0]
    torch.testing.assert_close(loss, loss3.reshape(loss.shape))
    g = torch.rand(loss.shape, device=device) + 0.5
    (loss * g).sum().backward()
    (loss3.reshape(loss.shape) * g).sum().backward()
    for leaf, leaf3 in zip(leaves, leaves3):
        torch.testing.assert_close(leaf.grad, leaf3.grad)
    expected = torch.nn.functional.cross_entropy(
        flat.double() @ weight.double().T + bias.double(), flat_labels, reduction=reduction
    )
    assert rel_err(loss.detach(), expected) < 1e-5


def test_cross_entropy_bad_inputs(device):
    hidden, weight, bias, labels = make_batch(device)
    with pytest.raises(ValueError, match=r"reduction must be one of \['mean', 'sum', 'none'\]"):
        cross_entropy_from_hidden(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        cross_entropy_from_hidden(hidden, weight, labels, label_smoothing=1.0)
    with pytest.raises(ValueError, match="labels holds 517, outside"):
        cross_entropy_from_hidden(hidden, weight, torch.full_like(labels, V))
    with pytest.raises(TypeError, match="weight must be float32"):
        cross_entropy_from_hidden(hidden, weight.long(), labels)


MODULES = {
    "dpo": fastalign.FusedLinearDPOLoss,
    "kto": fastalign.FusedLinearKTOLoss,
    "ift": fastalign.FusedLinearIFTLoss,
    "ce": fastalign.FusedLinearCrossEntropyLoss,
}
# (module, options, error, message): each refused at construction, before any tensor is seen.
BAD_MODULE_OPTIONS = [
    ("ce", {"reduction": "avg"}, ValueError, r"reduction must be one of \['mean', 'sum', 'none'\]; got 'avg'"),
    ("ce", {"label_smoothing": 1.5}, ValueError, r"label_smoothing must be in \[0, 1\); got 1.5"),
    ("ce", {"reduction": "none", "label_smoothing": 0.1}, ValueError, "fast strategy only.*reduction='none'"),
    ("ce", {"label_smoothing": 0.1, "strategy": "lean"}, ValueError, "fast strategy only.*not strategy='lean'"),
    ("ce", {"reduction": "none", "strategy": "fast"}, ValueError, "strategy='fast' needs.*reduction='none'"),
    ("ce", {"entropy": "no"}, TypeError, "entropy must be True or False; got 'no'"),
    ("ce", {"accuracy": 1}, TypeError, "accuracy must be True or False; got 1"),
    ("dpo", {"loss_type": "aot", "strategy": "fast"}, ValueError, r"strategy='fast' needs.*\['aot'\] sorts"),
    ("dpo", {"return_per_example": "yes"}, TypeError, "return_per_example must be True or False"),
    ("kto", {"beta": 0.0}, ValueError, "beta must be a finite number > 0; got 0.0"),
    ("ift", {"gamma": 2}, ValueError, r"gamma must be a number in \[0, 1\]; got 2"),
    ("dpo", {"loss_weights": [math.nan]}, ValueError, r"loss_weights must hold finite numbers; got \[nan\]"),
    ("dpo", {"beta": True}, TypeError, "beta must be a finite number > 0; got bool True"),
    ("kto", {"desirable_weight": True}, TypeError, "desirable_weight must be a finite number >= 0; got bool True"),
]
for name in MODULES:  # the logit options, the same in every module
    BAD_MODULE_OPTIONS += [
        (name, {"temperature": 0}, ValueError, "temperature must be a finite number > 0; got 0"),
        (name, {"softcap": 0.0}, ValueError, "softcap must be a finite number > 0; got 0.0"),
        (name, {"logit_scale": math.nan}, ValueError, "logit_scale must be a finite number > 0; got nan"),
        (name, {"memory_budget": -1}, ValueError, r"memory_budget must be a positive int \(bytes\) or None; got -1"),
        (name, {"memory_budget": "1GB"}, TypeError, "memory_budget must be a positive int.*got str '1GB'"),
        (name, {"temperature": True}, TypeError, "temperature must be a finite number > 0; got bool True"),
        (name, {"softcap": True}, TypeError, "softcap must be a finite number > 0; got bool True"),
        (name, {"temperature": 1e-45}, ValueError, "temperature must be at least float32's smallest normal number"),
        (
            name,
            {"ignore_index": 2**64},
            ValueError,
            "ignore_index must fit in int64, as the labels; got 18446744073709551616",
        ),
        (name, {"ignore_index": -(2**63) - 1}, ValueError, "ignore_index must fit in int64"),
        (name, {"ignore_index": 0.5}, TypeError, "ignore_index must be an int; got float"),
        (name, {"ignore_index": None}, TypeError, "ignore_index must be an int; got NoneType"),
        (name, {"strategy": "quick"}, ValueError, r"strategy must be one of \['auto', 'fast', 'lean'\]"),
        (name, {"temprature": 2.0}, TypeError, r"unexpected keyword arguments \['temprature'\]"),
    ]


@pytest.mark.parametrize(("name", "options", "error", "message"), BAD_MODULE_OPTIONS)
def test_modules_refuse_bad_options_at_construction_naming_them(name, options, error, message):
    with pytest.raises(error, match=message):
        MODULES[name](**options)


def test_modules_refuse_bad_tensors_naming_them(device):
    hidden, weight, bias, labels = make_batch(device)
    for module in (fastalign.FusedLinearCrossEntropyLoss(), fastalign.FusedLinearIFTLoss()):
        with pytest.raises(TypeError, match="hidden must be a torch.Tensor; got NoneType"):
            module(None, weight, labels)
    desirable = torch.arange(2 * B, device=device) % 2 == 0
    ref_logps = torch.zeros(2 * B, device=device)
    with pytest.raises(ValueError, match="kl must be finite; got nan"):
        fastalign.FusedLinearKTOLoss()(hidden, weight, labels, desirable, ref_logps=ref_logps, kl=math.nan)


def test_module_options_take_numpy_scalars(backend, device):
    """Converted to Python numbers before they reach a kernel (a NumPy ignore_index crashed the interpreter)."""
    np = pytest.importorskip("numpy")
    hidden, weight, bias, labels = make_batch(device)
    plain = {"ignore_index": IGNORE, "temperature": 0.5, "label_smoothing": 0.25, "memory_budget": 2**20}
    numpy_options = {"ignore_index": np.int64(IGNORE), "temperature": np.float32(0.5),
                     "label_smoothing": np.float64(0.25), "memory_budget": np.int64(2**20)}  # fmt: skip
    expected = fastalign.FusedLinearCrossEntropyLoss(**plain)(hidden, weight, labels)
    torch.testing.assert_close(fastalign.FusedLinearCrossEntropyLoss(**numpy_options)(hidden, weight, labels), expected)
    ift = fastalign.FusedLinearIFTLoss(gamma=np.float32(0.5), ignore_index=np.int64(IGNORE))(hidden, weight, labels)
    torch.testing.assert_close(ift, fastalign.FusedLinearIFTLoss(gamma=0.5)(hidden, weight, labels))


def test_module_options_are_attributes_checked_when_set(backend, device):
    hidden, weight, bias, labels = make_batch(device)
    module = fastalign.FusedLinearCrossEntropyLoss(label_smoothing=0.1)
    assert module.label_smoothing == 0.1 and "label_smoothing=0.1" in repr(module)
    module.label_smoothing = 0.0  # takes effect at the next call
    torch.testing.assert_close(
        module(hidden, weight, labels, bias), cross_entropy_from_hidden(hidden, weight, labels, bias)[0]
    )
    with pytest.raises(ValueError, match="fast strategy only.*reduction='none'"):
        module.reduction, module.label_smoothing = "none", 0.1
    assert module.reduction == "none" and module.label_smoothing == 0.0  # the refused value was not taken
    dpo = fastalign.FusedLinearDPOLoss()
    with pytest.raises(ValueError, match="beta must be a finite number > 0; got -1"):
        dpo.beta = -1
    assert dpo.beta == 0.1


# ----------------------------------------------------------------------------- every loss, harder inputs


def _smoothing(strategy):
    return 0.05 if strategy == "fast" else 0.0  # label smoothing is fast-only


def _losses(device, R):
    """name -> (call(hidden, weight, labels, bias, **kw) -> loss, float64 reference of the same inputs)."""
    half = R // 2
    ref_logps = torch.randn(R, device=device) - 15
    desirable = torch.arange(R, device=device) % 3 != 0
    dpo_ref = {"ref_chosen_logps": ref_logps[:half], "ref_rejected_logps": ref_logps[half:]}

    def dpo64(h, w, y, b):
        sums = sequence_logps_64(h, w, b, y)
        lengths = (y != IGNORE).sum(-1)
        return ref_dpo.dpo_loss(
            sums[:half], sums[half:], ref_logps[:half].double(), ref_logps[half:].double(), beta=0.5,
            loss_type="ipo", chosen_lengths=lengths[:half], rejected_lengths=lengths[half:],
        )[0]  # fmt: skip

    return {
        "dpo": (
            lambda *a, **k: fastalign.linear_losses.dpo_loss_from_hidden(*a, **dpo_ref, beta=0.5, loss_type="ipo", **k)[
                0
            ],
            dpo64,
        ),
        "kto": (
            lambda h, w, y, b, **k: kto_loss_from_hidden(h, w, y, desirable, b, ref_logps=ref_logps, kl=0.2, **k)[0],
            lambda h, w, y, b: ref_dpo.kto_loss(sequence_logps_64(h, w, b, y), ref_logps.double(), desirable, 0.2)[0],
        ),
        "ift": (
            lambda *a, **k: fastalign.linear_losses.ift_loss_from_hidden(*a, **k),
            lambda h, w, y, b: ref_ift.ift_loss(ref.linear_token_logprobs(h, w, y, b, IGNORE), y != IGNORE),
        ),
        "ce": (lambda *a, **k: cross_entropy_from_hidden(*a, label_smoothing=_smoothing(k["strategy"]), **k)[0], None),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", ["dpo", "kto", "ift", "ce"])
def test_every_loss_odd_sizes_empty_rows_and_dtypes(name, strategy, dtype, backend, device):
    """H 33 and V 1031 (odd: unaligned rows, ragged tiles), T 1, a sequence with no label that counts, a budget that
    splits the batch (and units) into several chunks, grad_output 3.5; float64 reference, every gradient."""
    R = 4
    hidden, weight, bias, labels = make_batch(device, dtype, batch=R, T=7, H=33, V=1031)
    labels[:, :1] = IGNORE
    labels[2] = IGNORE
    call, reference = _losses(device, R)[name]
    smoothing = _smoothing(strategy)
    for T_cut, budget in ((7, 5 * 1031 * 4), (1, None)):
        h, w, y = hidden[:, :T_cut], weight, labels[:, :T_cut].clone()
        y[0, 0] = 5  # T = 1 still has a label that counts
        leaves = leaves_of(h, w, bias)
        loss = call(*leaves[:2], y, leaves[2], strategy=strategy, memory_budget=budget)
        (3.5 * loss).backward()
        leaves64 = [t.double().requires_grad_(True) for t in (h, w, bias)]
        if reference is None:
            loss64 = ref.linear_cross_entropy(*leaves64[:2], y, leaves64[2], IGNORE, label_smoothing=smoothing)
        else:
            loss64 = reference(leaves64[0], leaves64[1], y, leaves64[2])
        (3.5 * loss64).backward()
        tol = 1e-5 if dtype == torch.float32 else 1e-3
        assert abs(loss.item() - loss64.item()) <= tol * max(1.0, abs(loss64.item())), (T_cut, loss, loss64)
        check_grads(leaves, leaves64, 1e-4 if dtype == torch.float32 else GRAD_RTOL[dtype])
        assert (leaves[0].grad[2] == 0).all()


@pytest.mark.parametrize("strategy", ["auto", "fast", "lean"])
def test_cross_entropy_of_an_empty_batch_is_zero(strategy, backend, device):
    hidden, weight, bias, labels = make_batch(device)
    hidden, labels = hidden[:0], labels[:0]
    leaves = leaves_of(hidden, weight, bias)
    loss, _ = cross_entropy_from_hidden(*leaves[:2], labels, leaves[2], strategy=strategy)
    loss.backward()
    assert loss.item() == 0 and all((leaf.grad == 0).all() for leaf in leaves[1:])


def test_autocast_fast_computes_in_the_autocast_dtype(backend, device):
    hidden, weight, bias, labels = make_batch(device)
    leaves = leaves_of(hidden, weight, bias)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss, _ = cross_entropy_from_hidden(*leaves[:2], labels, leaves[2], strategy="fast")
    loss.backward()
    expected, _ = cross_entropy_from_hidden(hidden.bfloat16(), weight.bfloat16(), labels, bias.bfloat16())
    torch.testing.assert_close(loss, expected)
    assert all(leaf.grad.dtype == torch.float32 and torch.isfinite(leaf.grad).all() for leaf in leaves)


# ----------------------------------------------------------------------------- the property fast relies on


def _unit_gradient(loss_of, logps, unit_rows, other_rows, shift):
    """d loss / d logps at unit_rows, with shift added to the log-probs of other_rows."""
    perturbed = logps.clone()
    perturbed[other_rows] += shift
    leaf = perturbed.requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(leaf), leaf)
    return grad[unit_rows]


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_the_loss_decomposes_over_pairs_unless_it_sorts_the_batch(loss_type):
    """fast's one assumption: the gradient at a pair's log-probs does not depend on the other pairs' values."""
    R, T_ = 16, 5
    mask = torch.rand(R, T_) < 0.7
    mask[:, 0] = True  # every sequence has a token: a shift moves every sum
    ref_logps = torch.randn(R, dtype=torch.float64) - 10
    lengths = mask.sum(-1)

    def loss_of(logps):
        sums = torch.where(mask, logps, 0.0).sum(-1)
        return fastalign.dpo.paired_dpo_loss(sums, lengths, *ref_logps.chunk(2), **dpo_kwargs(loss_type))[0]

    logps = -torch.rand(R, T_, dtype=torch.float64) * 3
    unit = [0, R // 2]  # the pair (0, R/2): rows 0..R/2-1 are the chosen halves
    others, other_chosen = [r for r in range(R) if r not in unit], list(range(1, R // 2))
    alone = _unit_gradient(loss_of, logps, unit, others, 0.0)
    moved = _unit_gradient(loss_of, logps, unit, others, 10 * torch.randn(len(others), T_, dtype=torch.float64))
    # The other chosen sequences all far above, then all far below: the pair's chosen log-ratio sorts first, then
    # last, so a batch-sorting loss pairs it with a different reference (or rejected) value. (Random moves alone
    # left it in place for some seeds.)
    above = _unit_gradient(loss_of, logps, unit, other_chosen, 100.0)
    below = _unit_gradient(loss_of, logps, unit, other_chosen, -100.0)
    if loss_type in BATCH_COUPLED:
        assert not torch.equal(above, below)
    else:
        assert torch.equal(alone, moved) and torch.equal(alone, above) and torch.equal(alone, below)


@pytest.mark.parametrize("loss_type", [t for t in DPO_LOSS_TYPES if t not in BATCH_COUPLED])
def test_wpo_weighted_losses_decompose_over_pairs_but_sft(loss_type):
    """Under use_weighting each pair's loss is scaled by its own (detached) weight: still per pair, except the
    batch-level 'sft' NLL, whose gradient then sums every pair's weight (dpo_loss_from_hidden runs it lean)."""
    R, T_ = 8, 5
    mask = torch.rand(R, T_) < 0.7
    mask[:, 0] = True
    ref_logps = torch.randn(R, dtype=torch.float64) - 10
    log_sum_sq = -torch.rand(R, T_, dtype=torch.float64)

    def loss_of(logps):
        return fastalign.dpo.dpo_loss_from_token_logps(
            logps, mask, *ref_logps.chunk(2), log_sum_sq_probs=log_sum_sq, use_weighting=True, **dpo_kwargs(loss_type)
        )[0]

    logps = -torch.rand(R, T_, dtype=torch.float64) * 3
    unit, others = [0, R // 2], [r for r in range(R) if r not in (0, R // 2)]
    alone = _unit_gradient(loss_of, logps, unit, others, 0.0)
    moved = _unit_gradient(loss_of, logps, unit, others, torch.rand(len(others), T_, dtype=torch.float64))
    assert torch.equal(alone, moved) != (loss_type == "sft")


def test_kto_ift_and_cross_entropy_decompose_over_sequences():
    R, T_ = 4, 6
    mask = torch.rand(R, T_) < 0.8
    desirable = torch.tensor([True, False, True, False])
    ref_logps = torch.randn(R)
    losses = {
        "kto": lambda lp: fastalign.kto_loss(torch.where(mask, lp, 0.0).sum(-1), ref_logps, desirable, 0.3)[0],
        "ift": lambda lp: fastalign.ift_loss(lp, mask),
        "ce": lambda lp: -torch.where(mask, lp, 0.0).sum() / mask.sum(),
    }
    logps = -torch.rand(R, T_) * 3
    for name, loss_of in losses.items():
        alone = _unit_gradient(loss_of, logps, [1], [0, 2, 3], 0.0)
        assert torch.equal(alone, _unit_gradient(loss_of, logps, [1], [0, 2, 3], 10 * torch.randn(3, T_))), name


# ----------------------------------------------------------------------------- chunk sizes


def test_fast_chunks_at_the_default_budget_take_enough_rows_for_the_gemms():
    """At the target (bf16, H = 4096, V = 128256) the default 256 MiB alone gives 348 rows (256 in whole 256-row
    GEMM tiles), under the d-weight accumulate's ridge (4 x GEMM rate / bandwidth rows) on every sm_90 machine
    compile-check models; left at the default on a kernel path, chunks take what the bf16 weight gradient's bytes
    allow (H / 3 = 1365 rows at 6 bytes a logit: 1280 in whole tiles), above the ridge. An explicit budget, the torch
    path (sized_for_gemms False) and an fp32 weight keep the budget; fewer rows than a tile stay as they are."""
    from fastalign.compile_check import MACHINES
    from fastalign.linear_logprobs import DEFAULT_MEMORY_BUDGET

    V_, H_ = 128256, 4096
    assert DEFAULT_MEMORY_BUDGET // (V_ * 6) == 348
    assert losses_module._chunk_rows(DEFAULT_MEMORY_BUDGET, V_, H_, 2, 2, True) == (1280, 256)
    assert losses_module._chunk_rows(DEFAULT_MEMORY_BUDGET, V_, H_, 2, 2, False) == (256, 256)
    assert losses_module._chunk_rows(DEFAULT_MEMORY_BUDGET, V_, H_, 0, 0, True) == (512, 512)  # 523 fp32 rows
    assert losses_module._chunk_rows(DEFAULT_MEMORY_BUDGET, V_, 2**15, 2, 2, True)[0] == losses_module._GEMM_ROWS
    assert losses_module._chunk_rows(200 * V_ * 6, V_, 64, 2, 2, True) == (200, 200)
    for machine in (m for m in MACHINES if m.arch == 90):
        ridge = 4 * machine.mma_tflops * 1e12 / (machine.copy_gbps * 1e9)
        assert 348 < ridge < 1280, machine.name
    # Cross-entropy's 12288 scored tokens: 10 chunks, of whole tiles but the last.
    assert [r1 - r0 for r0, r1, _ in losses_module._chunks([1] * 12288, 1280, True)] == [1280] * 9 + [768]
    # A chunk's buffers (fp32 logits and bf16/fp16 d logits) stay within the weight gradient in the weight's dtype,
    # which the backward allocates next to the accumulator, or within the budget where that is larger.
    for width, hidden_size in ((128256, 4096), (128256, 2048), (32000, 4096), (151936, 8192), (50257, 768)):
        limit, _ = losses_module._chunk_rows(DEFAULT_MEMORY_BUDGET, width, hidden_size, 2, 2, True)
        assert limit * width * 6 <= max(DEFAULT_MEMORY_BUDGET, width * hidden_size * 2), (width, hidden_size)


@pytest.mark.parametrize("name", ["dpo", "ce"])
def test_fast_chunks_at_the_default_budget_hold_whole_units_and_change_no_result(name, backend, device, monkeypatch):
    """A default budget shrunk to 2 rows of bf16 logits (6 bytes each) with H = 48: on the kernel path chunks take up
    to H / 3 = 16 rows, on the torch path (4 bytes a logit) 3; an explicit budget of the same bytes keeps the kernel
    path to 2. Cross-entropy (33 scored rows) cuts them into equal chunks; DPO's pairs (16 and 17 scored rows) go
    whole into one chunk where they fit, else alone, computed 2 or 3 rows of logits at a time. Losses and gradients
    agree across the chunkings, and the d-weight GEMMs cover every scored row."""
    import fastalign.linear_logprobs as logprobs_module

    R, T_, H_, V_ = 4, 13, 48, 103
    hidden, weight, bias, labels = make_batch(device, torch.bfloat16, batch=R, T=T_, H=H_, V=V_)
    labels[1, -1] = IGNORE  # scored rows 7, 8, 9, 9: pairs (0, 2) and (1, 3) of 16 and 17
    scored = int((labels != IGNORE).sum())
    budget = 2 * V_ * 6
    monkeypatch.setattr(logprobs_module, "DEFAULT_MEMORY_BUDGET", budget)
    gemm_rows = []
    real_accumulate = losses_module._accumulate_dweight

    def accumulate(acc, d, h, first):
        gemm_rows.append(d.shape[0])
        real_accumulate(acc, d, h, first)

    monkeypatch.setattr(losses_module, "_accumulate_dweight", accumulate)
    reference = {"ref_chosen_logps": torch.zeros(2, device=device), "ref_rejected_logps": torch.zeros(2, device=device)}
    calls = {
        "dpo": lambda *a, **k: fastalign.linear_losses.dpo_loss_from_hidden(*a, **reference, **k)[0],
        "ce": lambda *a, **k: cross_entropy_from_hidden(*a, **k)[0],
    }
    results = {}
    for memory_budget in (None, budget):
        leaves = leaves_of(hidden, weight, bias)
        loss = calls[name](*leaves[:2], labels, leaves[2], strategy="fast", memory_budget=memory_budget)
        (2.5 * loss).backward()
        results[memory_budget] = (loss.detach(), *(leaf.grad for leaf in leaves))
        assert sum(gemm_rows) == scored, gemm_rows
        sized = backend == "kernel" and memory_budget is None
        most = 16 if sized else (2 if backend == "kernel" else 3)
        if name == "ce":
            size = -(-scored // -(-scored // most))
            assert gemm_rows == [min(size, scored - r0) for r0 in range(0, scored, size)], gemm_rows
        else:  # one pair a chunk when it fits, else a longer unit alone, its d-weight GEMM over the whole pair
            pairs = (labels != IGNORE).sum(1).view(2, -1).sum(0).tolist()
            assert gemm_rows == pairs, gemm_rows
        gemm_rows.clear()
    for got, want in zip(results[None], results[budget]):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)


# ----------------------------------------------------------------------------- matmul FLOPs


class MatmulFlops(TorchDispatchMode):
    """Counts the FLOPs of every torch matrix product (mm, addmm and addmm_, bmm, baddbmm, mv, addmv, dot) run
    inside it, and of every tl.dot that Triton's interpreter runs meanwhile."""

    _OPS = {"mm": (0, 1), "addmm": (1, 2), "addmm_": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2), "baddbmm_": (1, 2)}
    _OPS |= {"mv": (0, 1), "addmv": (1, 2), "addmv_": (1, 2), "dot": (0, 1)}

    def __init__(self, monkeypatch):
        super().__init__()
        self.flops = 0
        builder = triton_interpreter.InterpreterBuilder
        real_dot = builder.create_dot

        def counting_dot(interp, a, b, *args):
            *batch, m, k = a.data.shape
            self.flops += 2 * math.prod(batch) * m * k * b.data.shape[-1]
            return real_dot(interp, a, b, *args)

        monkeypatch.setattr(builder, "create_dot", counting_dot)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operands = self._OPS.get(func.overloadpacket.__name__)
        if operands is not None:
            a, b = (args[i] for i in operands)
            k = a.shape[-1]
            rows = math.prod(a.shape[:-1])
            self.flops += 2 * rows * k * (b.shape[-1] if b.dim() > 1 else 1)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend_name", ["torch", "interpret"])
@pytest.mark.parametrize("name", ["dpo", "kto", "ift", "ce"])
def test_matmul_flops_fast_6_lean_8_and_2_more_for_a_computed_reference(name, backend_name, monkeypatch):
    """Exact counts, forward + backward, N the scored rows: fast 6 N H V, lean 8 N H V (tile-aligned sizes, so the
    interpreted tl.dot tiles hold no padding), and 2 N H V more when the DPO/KTO reference comes from ref_hidden.
    Lean on the torch path keeps the logits when the vocabulary fits one chunk (6), and recomputes them under a
    budget of a few vocabulary chunks (8)."""
    if backend_name == "interpret" and not fastalign.kernels.INTERPRET:
        pytest.skip("counts the interpreter's tl.dot: a GPU run compiles the kernels")
    R, T_, H_, V_ = 4, 40, 64, 256
    hidden, weight, bias, labels = make_batch(torch.device("cpu"), batch=R, T=T_, H=H_, V=V_)
    labels = torch.randint(0, V_, (R, T_))
    labels[:, :8] = IGNORE  # N = 4 * 32 = 128 scored rows: two 64-row tiles
    nhv = 128 * H_ * V_
    reference = {
        "dpo": lambda rh: (
            {"ref_hidden": rh}
            if rh is not None
            else {"ref_chosen_logps": torch.zeros(2)} | {"ref_rejected_logps": torch.zeros(2)}
        ),
        "kto": lambda rh: {"ref_hidden": rh, "kl": 0.1} if rh is not None else {"ref_logps": torch.zeros(R), "kl": 0.1},
    }
    desirable = torch.tensor([True, False, True, True])
    calls = {
        "dpo": lambda *a, **k: fastalign.linear_losses.dpo_loss_from_hidden(*a, **k)[0],
        "kto": lambda h, w, y, b, **k: kto_loss_from_hidden(h, w, y, desirable, b, **k)[0],
        "ift": fastalign.linear_losses.ift_loss_from_hidden,
        "ce": lambda *a, **k: cross_entropy_from_hidden(*a, **k)[0],
    }
    with forced_backend(backend_name):
        for strategy, budget in (("fast", None), ("lean", None), ("lean", 2**16)):
            keeps_logits = backend_name == "torch" and budget is None
            expected = 6 if strategy == "fast" or keeps_logits else 8
            for with_reference in (False, True) if name in reference else (False,):
                kwargs = {"strategy": strategy, "memory_budget": budget}
                if name in reference:
                    kwargs |= reference[name](hidden + 0.5 if with_reference else None)
                leaves = leaves_of(hidden, weight, bias)
                with MatmulFlops(monkeypatch) as counter:
                    loss = calls[name](*leaves[:2], labels, leaves[2], **kwargs)
                    loss.backward()
                want = expected + 2 * with_reference
                assert want * nhv <= counter.flops <= (want + 0.05) * nhv, (
                    strategy,
                    budget,
                    with_reference,
                    counter.flops / nhv,
                )
                # An evaluation pass (no_grad, leaves requiring grad) computes the logits only, on every strategy.
                with torch.no_grad(), MatmulFlops(monkeypatch) as counter:
                    evaluated = calls[name](*leaves[:2], labels, leaves[2], **kwargs)
                want = 2 + 2 * with_reference
                assert want * nhv <= counter.flops <= (want + 0.05) * nhv, (strategy, budget, counter.flops / nhv)
                assert rel_err(evaluated, loss.detach()) < 1e-6
                with torch.inference_mode():  # as an evaluation loop's; fast differentiated its objective here
                    inferred = calls[name](*leaves[:2], labels, leaves[2], **kwargs)
                assert not inferred.requires_grad and rel_err(inferred, loss.detach()) < 1e-6


# ----------------------------------------------------------------------------- FSDP2


def test_fsdp2_fast_and_lean_equal_unsharded(device):
    """The lm_head as an FSDP2 DTensor (gathered once) under each fused-linear loss and strategy, on 2 gloo
    processes: loss and every gradient equal to the unsharded model fed both ranks' batches."""
    if device.type != "cpu":
        pytest.skip("gloo on the CPU")
    run_on_processes(linear_fsdp_worker.losses_main)
