"""FusedLinearDPOLoss and FusedLinearIFTLoss: against composing linear_token_logprobs with dpo_loss / ift_loss,
and against the float64 eager references (log-probs from the full logits, then the eager losses)."""

from __future__ import annotations

import inspect

import pytest
import torch
from utils import GRAD_RTOL, rel_err

import fastalign
from fastalign.dpo import DPO_LOSS_TYPES
from fastalign.reference import dpo as ref_dpo
from fastalign.reference import ift as ref_ift
from fastalign.reference import linear_logprobs as ref

IGNORE = -100
B, T, H, V = 2, 13, 40, 517


def make_batch(device, dtype=torch.float32, batch=2 * B):
    hidden = torch.randn(batch, T, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * 2 / H**0.5).to(dtype)
    bias = torch.randn(V, device=device).to(dtype)
    labels = torch.randint(0, V, (batch, T), device=device)
    labels[:, :4] = IGNORE  # prompt
    labels[0, -2:] = IGNORE  # padding
    return hidden, weight, bias, labels


def sequence_logps_64(hidden, weight, bias, labels):
    return ref.linear_token_logprobs(hidden, weight, labels, bias, IGNORE).sum(-1)


def dpo_kwargs(loss_type):
    return {"beta": 0.2, "loss_type": loss_type, "label_smoothing": 0.1 if loss_type in ("exo_pair", "robust") else 0.0}


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_matches_float64_and_the_composition(loss_type, backend, device):
    hidden, weight, bias, labels = make_batch(device)
    ref_logps = torch.randn(2 * B, device=device) - 20
    module = fastalign.FusedLinearDPOLoss(**dpo_kwargs(loss_type))

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, metrics = module(
        *leaves[:2], labels, leaves[2], ref_chosen_logps=ref_logps[:B], ref_rejected_logps=ref_logps[B:]
    )
    loss.backward()

    # The composition the module stands for: the op, then dpo_loss with lengths from the labels.
    lengths = (labels != IGNORE).sum(-1)
    composed = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logps = fastalign.linear_token_logprobs(*composed[:2], labels, composed[2]).sum(-1)
    loss_c, metrics_c = fastalign.dpo_loss(
        logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
        **dpo_kwargs(loss_type),
    )  # fmt: skip
    loss_c.backward()
    torch.testing.assert_close(loss, loss_c)
    assert metrics.keys() == metrics_c.keys()
    for leaf, leaf_c in zip(leaves, composed):
        torch.testing.assert_close(leaf.grad, leaf_c.grad)

    leaves64 = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    logps64 = sequence_logps_64(*leaves64, labels)
    assert rel_err(logps, logps64) < 1e-6

    def reference_loss(sums):
        return ref_dpo.dpo_loss(
            sums[:B], sums[B:], ref_logps[:B].double(), ref_logps[B:].double(),
            chosen_lengths=lengths[:B], rejected_lengths=lengths[B:], **dpo_kwargs(loss_type),
        )[0]  # fmt: skip

    loss64 = reference_loss(logps64.detach())
    assert abs(loss.item() - loss64.item()) <= 1e-5 * max(1.0, abs(loss64.item()))
    # The gradient is checked with the loss taken at the op's own fp32 sums and the float64 Jacobian of the sums:
    # near DiscoPOP's switch point the loss turns the sums' fp32 rounding (1e-7) into 1e-3 of its gradient, an
    # ill-conditioning no fp32 log-prob op avoids; the sums themselves are checked just above.
    reference_loss(logps64 + (logps.detach().double() - logps64.detach())).backward()
    for leaf, leaf64 in zip(leaves, leaves64):
        if leaf64.grad.abs().max() > 0:  # sppo_hard, for one, can have a zero gradient
            assert rel_err(leaf.grad, leaf64.grad) < 1e-4


def test_dpo_reference_hidden_states_run_without_grad(backend, device):
    hidden, weight, bias, labels = make_batch(device, torch.bfloat16)
    ref_hidden = (hidden.float() + 0.1 * torch.randn_like(hidden.float())).bfloat16().requires_grad_(True)
    ref_weight = weight.clone().requires_grad_(True)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
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


def test_dpo_completion_fully_masked(backend, device):
    hidden, weight, bias, labels = make_batch(device, torch.bfloat16)
    labels[1] = IGNORE  # the second chosen completion is empty
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, _ = fastalign.FusedLinearDPOLoss(beta=0.1)(
        *leaves[:2], labels, leaves[2], ref_chosen_logps=torch.zeros(B), ref_rejected_logps=torch.zeros(B)
    )
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(leaf.grad).all() for leaf in leaves)
    assert (leaves[0].grad[1] == 0).all()


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
    with pytest.raises(ValueError, match="beta"):
        fastalign.FusedLinearDPOLoss(beta=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        fastalign.FusedLinearDPOLoss(loss_type="nope")


def test_dpo_module_options_come_in_dpoloss_order():
    """A positional DPOLoss(...) call means the same to FusedLinearDPOLoss(...): only the last option differs."""

    def positional(cls):
        return [n for n, p in inspect.signature(cls).parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD]

    dpo, fused = positional(fastalign.DPOLoss), positional(fastalign.FusedLinearDPOLoss)
    assert fused[:-1] == dpo[:-1] and (dpo[-1], fused[-1]) == ("inplace_backward", "memory_budget")


@pytest.mark.parametrize("gamma", [0.0, 0.95, 1.0])
def test_ift_matches_float64_and_the_composition(gamma, backend, device):
    hidden, weight, bias, labels = make_batch(device, torch.bfloat16, batch=3)
    labels[2] = IGNORE  # a sequence with nothing to learn: contributes 0
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = fastalign.FusedLinearIFTLoss(gamma=gamma)(*leaves[:2], labels, leaves[2])
    loss.backward()

    composed = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    token_logps = fastalign.linear_token_logprobs(*composed[:2], labels, composed[2])
    loss_c = fastalign.ift_loss(token_logps, labels != IGNORE, gamma=gamma)
    loss_c.backward()
    torch.testing.assert_close(loss, loss_c)
    for leaf, leaf_c in zip(leaves, composed):
        torch.testing.assert_close(leaf.grad, leaf_c.grad)

    leaves64 = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    logps64 = ref.linear_token_logprobs(leaves64[0], leaves64[1], labels, leaves64[2], IGNORE)
    loss64 = ref_ift.ift_loss(logps64, labels != IGNORE, gamma=gamma)
    loss64.backward()
    assert abs(loss.item() - loss64.item()) <= 1e-5 * abs(loss64.item())
    for leaf, leaf64 in zip(leaves, leaves64):
        assert rel_err(leaf.grad, leaf64.grad) < GRAD_RTOL[torch.bfloat16]


def test_ift_bad_inputs(device):
    hidden, weight, bias, labels = make_batch(device)
    with pytest.raises(ValueError, match="gamma"):
        fastalign.FusedLinearIFTLoss(gamma=1.5)
    with pytest.raises(ValueError, match=r"hidden must have shape \[B, T, H\]"):
        fastalign.FusedLinearIFTLoss()(hidden[0], weight, labels[0])
