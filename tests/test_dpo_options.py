"""The DPO and KTO options beyond the loss type (TRL 1.16's DPOConfig, Liger's chunked losses) against the float64
references of fastalign.reference.dpo; TRL's own trainer code checks the same options in test_dpo.py."""

from __future__ import annotations

import math

import pytest
import torch
from test_dpo import BETA, LABEL_SMOOTHING, check_dpo_against_reference, preference_batch, sequence_logps
from utils import GRAD_RTOL, VALUE_RTOL, rel_err

import fastalign
from fastalign.dpo import (
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    dpo_loss_from_token_logps,
    sequence_token_weights,
    wpo_weights,
)
from fastalign.dpo import sequence_logps as reduce_tokens
from fastalign.reference import dpo as ref

IGNORE = -100


def options_for(loss_type: str) -> dict:
    return {
        "beta": BETA.get(loss_type, 0.2),
        "loss_type": loss_type,
        "label_smoothing": LABEL_SMOOTHING.get(loss_type, 0.0),
    }


# ----------------------------------------------------------------------------- f-divergences


@pytest.mark.parametrize("loss_type", F_DIVERGENCE_LOSS_TYPES)
@pytest.mark.parametrize(
    "f_divergence_type, alpha",
    [
        ("forward_kl", 0.5),
        ("js_divergence", 0.5),
        ("alpha_divergence", 0.3),
        ("alpha_divergence", 1.7),
        ("alpha_divergence", 1.0),  # the limit, reverse KL
    ],
    ids=["forward_kl", "js", "alpha0.3", "alpha1.7", "alpha1"],
)
def test_f_divergences_match_float64_reference(loss_type, f_divergence_type, alpha, device):
    policy, reference, lengths = sequence_logps(5, device)
    options = {**options_for(loss_type), "f_divergence_type": f_divergence_type, "f_alpha_divergence_coef": alpha}
    loss = check_dpo_against_reference(policy, reference, lengths, grad_scale=1.3, **options)
    if loss_type != "sft":  # the one type that reads no log-ratio
        reverse = fastalign.dpo_loss(*policy, *reference, chosen_lengths=lengths[0], rejected_lengths=lengths[1],
                                     **options_for(loss_type))[0]  # fmt: skip
        assert (loss == reverse) == (f_divergence_type == "alpha_divergence" and alpha == 1.0)


def test_alpha_divergence_clamps_its_exponent_as_trl():
    """(alpha - 1) * u is clamped at 80 (TRL keeps exp finite in float32): beyond it the score is constant."""
    chosen = torch.tensor([-200.0, -10.0], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(2, dtype=torch.float64)
    options = {"loss_type": "hinge", "beta": 1e-30, "f_divergence_type": "alpha_divergence"}
    loss = fastalign.dpo_loss(chosen, zero, zero, zero, f_alpha_divergence_coef=0.5, **options)[0]
    (grad,) = torch.autograd.grad(loss, chosen)
    assert grad[0] == 0 and grad[1] != 0  # -0.5 * -200 = 100 > 80: clamped
    expected = 1 - 1e-30 * ((math.exp(80) - 1) / -0.5 + (math.exp(5) - 1) / -0.5) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_f_divergence_refuses_the_loss_types_without_it():
    policy, reference, _ = sequence_logps(2, "cpu")
    for loss_type in sorted(set(DPO_LOSS_TYPES) - set(F_DIVERGENCE_LOSS_TYPES)):
        with pytest.raises(ValueError, match=rf"f_divergence_type 'js_divergence' works only with loss_type in "
                                             rf"\['sigmoid', .*\] \(.*\); got \['{loss_type}'\]"):  # fmt: skip
            fastalign.dpo_loss(*policy, *reference, loss_type=loss_type, f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match=r"f_divergence_type 'kl' is not one of \['reverse_kl', 'forward_kl'"):
        fastalign.dpo_loss(*policy, *reference, f_divergence_type="kl")
    with pytest.raises(ValueError, match="f_alpha_divergence_coef must be a finite number; got nan"):
        fastalign.DPOLoss(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=float("nan"))


# ----------------------------------------------------------------------------- DiscoPOP


@pytest.mark.parametrize("tau", [0.01, 0.3, 2.0])
def test_discopop_tau_matches_float64_reference(tau, device):
    policy, reference, lengths = sequence_logps(6, device)
    check_dpo_against_reference(policy, reference, lengths, 0.7, loss_type="discopop", beta=0.05, discopop_tau=tau)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_discopop_extreme_margins_are_finite_and_exact(dtype):
    """Issue 16.6: exp(-z) overflowed where sigmoid(z / tau) underflowed, NaN = inf * 0, for z < -709 (-88 in
    float32). Each value and gradient is compared with 60-digit arithmetic."""
    z = [-5000.0, -800.0, -709.8, -100.0, -30.0, -1.0, 0.0, 1e-3, 2.0, 30.0, 800.0]
    chosen = torch.tensor(z, dtype=dtype, requires_grad=True)
    zero = torch.zeros(len(z), dtype=dtype)
    n = len(z)
    loss = fastalign.dpo_loss(chosen, zero, zero, zero, beta=1.0, loss_type="discopop")[0]
    (grad,) = torch.autograd.grad(loss, chosen)
    exact = sum(ref.discopop_loss_exact(x) for x in z) / n
    exact_grad = torch.tensor([ref.discopop_grad_exact(x) / n for x in z], dtype=torch.float64)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    rtol = 1e-13 if dtype == torch.float64 else 1e-6
    assert loss.item() == pytest.approx(exact, rel=rtol)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=rtol, atol=1e-300)


# ----------------------------------------------------------------------------- average_log_prob


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_average_log_prob_matches_float64_reference(loss_type, device):
    policy, reference, lengths = sequence_logps(5, device)
    check_dpo_against_reference(policy, reference, lengths, -0.8, average_log_prob=True, **options_for(loss_type))


def test_average_log_prob_is_the_mean_token_weighting(device):
    """dpo_loss(sums, average_log_prob=True) compares sum_t w_t logp_t with sequence_token_weights' mean weights:
    the same loss as dpo_loss on those means; "sft" still reads the sums."""
    B, T = 4, 9
    mask = torch.rand(2 * B, T, device=device) < 0.6
    mask[0] = False  # an empty completion: its mean is 0
    token_logps = torch.where(mask, -torch.rand(2 * B, T, device=device) * 3, 0.0)
    means = reduce_tokens(token_logps, mask, average_log_prob=True)
    sums, lengths = token_logps.sum(-1), mask.sum(-1)
    torch.testing.assert_close(means, sums / lengths.clamp(min=1))
    ref_sums = sums + torch.randn(2 * B, device=device)
    ref_means = ref_sums / lengths.clamp(min=1)
    kw = {"chosen_lengths": lengths[:B], "rejected_lengths": lengths[B:]}
    for loss_type in ("sigmoid", "apo_down", "sft"):
        averaged = fastalign.dpo_loss(*sums.chunk(2), *ref_sums.chunk(2), average_log_prob=True, loss_type=loss_type,
                                      **kw)  # fmt: skip
        if loss_type == "sft":
            expected = fastalign.dpo_loss(*sums.chunk(2), *ref_sums.chunk(2), loss_type="sft", **kw)
        else:
            expected = fastalign.dpo_loss(*means.chunk(2), *ref_means.chunk(2), loss_type=loss_type, **kw)
        torch.testing.assert_close(averaged[0], expected[0], rtol=1e-6, atol=0)
        assert averaged[1]["logps/chosen"].item() == pytest.approx(means[:B].mean().item(), rel=1e-6)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_average_log_prob_leaves_the_length_normalised_types_as_they_are(loss_type, device):
    """They compare per-token means already: under reverse KL the option changes nothing (not a second division);
    under forward KL they take the f-divergence of the mean log-ratio."""
    policy, reference, lengths = sequence_logps(6, device)
    kw = {"chosen_lengths": lengths[0], "rejected_lengths": lengths[1], "loss_type": loss_type, "beta": 0.3}
    averaged = fastalign.dpo_loss(*policy, *reference, average_log_prob=True, **kw)[0]
    torch.testing.assert_close(averaged, fastalign.dpo_loss(*policy, *reference, **kw)[0], rtol=1e-6, atol=0)
    check_dpo_against_reference(policy, reference, lengths, -0.8, average_log_prob=True, f_divergence_type="forward_kl",
                                **kw)  # fmt: skip
    fastalign.DPOLoss(loss_type=loss_type, average_log_prob=True)  # accepted


def test_average_log_prob_bad_inputs():
    policy, reference, lengths = sequence_logps(2, "cpu")
    with pytest.raises(ValueError, match=r"\['average_log_prob'\] needs chosen_lengths and rejected_lengths"):
        fastalign.dpo_loss(*policy, *reference, average_log_prob=True)
    with pytest.raises(TypeError, match="average_log_prob must be True or False; got 1"):
        fastalign.dpo_loss(*policy, *reference, average_log_prob=1)


# ----------------------------------------------------------------------------- LD-DPO


@pytest.mark.parametrize("ld_alpha", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("average_log_prob", [False, True], ids=["sum", "mean"])
def test_ld_token_weights_match_the_reference(ld_alpha, average_log_prob, device):
    B, T = 5, 11
    mask = torch.rand(2 * B, T, device=device) < 0.55  # completions with holes
    mask[0] = False  # an empty chosen completion: its rejected one is all verbose
    mask[B + 1] = False
    weights = sequence_token_weights(mask, average_log_prob=average_log_prob, ld_alpha=ld_alpha)
    expected = ref.ld_token_weights(mask.cpu(), ld_alpha)
    if average_log_prob:
        expected = expected / mask.cpu().sum(-1, keepdim=True).clamp(min=1)
    assert weights.dtype == torch.float32 and weights.device == mask.device
    torch.testing.assert_close(weights.double().cpu(), expected, rtol=1e-7, atol=0)
    if ld_alpha == 1.0:
        assert torch.equal(weights, sequence_token_weights(mask, average_log_prob=average_log_prob))


# ----------------------------------------------------------------------------- WPO and pair weights


def test_pair_weights_scale_each_pair(device):
    policy, reference, lengths = sequence_logps(6, device)
    pair_weights = torch.rand(6, device=device, dtype=torch.float64)
    for loss_type in ("sigmoid", "sft", "bco_pair"):
        check_dpo_against_reference(policy, reference, lengths, 2.0, pair_weights=pair_weights, loss_type=loss_type)


def test_wpo_weights_match_the_reference(device):
    B, T, V = 3, 6, 50
    logits = torch.randn(2 * B, T, V, device=device, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (2 * B, T), device=device)
    labels[:, :2] = IGNORE
    labels[2] = IGNORE  # no completion: weight 1
    mask = labels != IGNORE
    token_logps = ref.token_logprobs(logits, labels)
    weights = wpo_weights(token_logps.float(), ref.log_sum_sq_probs(logits).float(), mask)
    expected = ref.wpo_sequence_weights(token_logps, logits, mask)
    assert not weights.requires_grad and weights[2] == 1
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    assert ((weights > 0) & (weights <= 1)).all()


def test_use_weighting_refuses_the_sorted_types_and_needs_log_sum_sq_probs(device):
    with pytest.raises(ValueError, match=r"use_weighting=True cannot be combined with loss_type \['aot'\]"):
        fastalign.DPOLoss(loss_type=["sigmoid", "aot"], use_weighting=True)
    mask = torch.ones(2, 3, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match=r"use_weighting=True needs log_sum_sq_probs"):
        dpo_loss_from_token_logps(-torch.rand(2, 3, device=device), mask, torch.zeros(1), torch.zeros(1),
                                  use_weighting=True)  # fmt: skip


# ----------------------------------------------------------------------------- the fused module


FUSED_CASES = [
    pytest.param({"loss_type": "sigmoid", "ld_alpha": 0.3}, id="ld_alpha"),
    pytest.param({"loss_type": ["sigmoid", "sft"], "ld_alpha": 0.0, "ref": "logits"}, id="ld_alpha0+sft-ref_logits"),
    pytest.param({"loss_type": "apo_down", "average_log_prob": True}, id="average"),
    pytest.param({"loss_type": "hinge", "average_log_prob": True, "ld_alpha": 0.5, "ref": "logits"}, id="average+ld"),
    pytest.param({"loss_type": "ipo", "f_divergence_type": "js_divergence"}, id="js-ipo"),
    pytest.param({"loss_type": "discopop", "discopop_tau": 0.5, "beta": 0.02}, id="discopop_tau"),
    pytest.param({"loss_type": "sigmoid", "use_weighting": True}, id="wpo"),
    pytest.param({"loss_type": "nca_pair", "return_per_example": True}, id="per-example"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_dpo_options_match_float64_reference(case, dtype, backend, device):
    case = dict(case)
    ref_source = case.pop("ref", "logps")
    options = {"beta": 0.3, **case}
    B, T, V = 2, 7, 301
    logits, labels = preference_batch(B, T, V, dtype, device)
    ref_logits = torch.randn(2 * B, T, V, device=device).to(dtype)
    if ref_source == "logits":
        given, ref_kwargs = (), {"ref_logits": ref_logits}
    else:
        given, ref_kwargs = tuple(-torch.rand(2, B, device=device) * 20), {}
    x = logits.clone().requires_grad_(True)
    out = fastalign.DPOLoss(**options)(x, labels, *given, **ref_kwargs)
    out[0].backward(torch.tensor(1.7, device=device))

    x64 = logits.double().requires_grad_(True)
    ref_kwargs64 = {"ref_logits": ref_logits.double()} if ref_source == "logits" else {}
    out64 = ref.dpo_loss_from_logits(x64, labels, *(g.double() for g in given), **ref_kwargs64, **options)
    out64[0].backward(torch.tensor(1.7, dtype=torch.float64, device=device))
    assert torch.isfinite(out[0]) and rel_err(out[0], out64[0]) < VALUE_RTOL[dtype] * 10
    assert rel_err(x.grad, x64.grad) < GRAD_RTOL[dtype]
    for name, value in out[1].items():
        torch.testing.assert_close(value.double(), out64[1][name], rtol=1e-4, atol=1e-5, msg=name)
    if options.get("return_per_example"):
        assert set(out[2]) == set(out64[2])
        for name, value in out[2].items():
            assert value.shape == (B,) and not value.requires_grad
            torch.testing.assert_close(value.double(), out64[2][name], rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- per-example outputs


def test_per_example_outputs_match_the_reference(device):
    policy, reference, lengths = sequence_logps(4, device)
    kwargs = {"chosen_lengths": lengths[0], "rejected_lengths": lengths[1], "loss_type": ["sigmoid", "sft"]}
    loss, metrics, per_example = fastalign.dpo_loss(*policy, *reference, return_per_example=True, **kwargs)
    loss_only, metrics_only = fastalign.dpo_loss(*policy, *reference, **kwargs)
    assert torch.equal(loss, loss_only) and all(torch.equal(metrics[k], metrics_only[k]) for k in metrics)
    _, _, expected = ref.dpo_loss(*(x.detach().double() for x in (*policy, *reference)), return_per_example=True,
                                  **kwargs)  # fmt: skip
    assert set(per_example) == {"logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "nll"}
    for name, value in per_example.items():
        assert value.shape == (4,) and value.dtype == torch.float32 and not value.requires_grad
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-6, atol=1e-6, msg=name)
    # The per-example rewards are each rounded to fp32 (1 ulp of the larger reward), so their difference can be off by
    # that much where the margin is small next to them.
    chosen, rejected = per_example["rewards/chosen"].double(), per_example["rewards/rejected"].double()
    ulp = torch.finfo(torch.float32).eps * torch.cat([chosen, rejected]).abs().max().item()
    assert metrics["rewards/margins"].item() == pytest.approx((chosen - rejected).mean().item(), rel=1e-6, abs=2 * ulp)
    _, _, without_lengths = fastalign.dpo_loss(*policy, *reference, return_per_example=True)
    assert "nll" not in without_lengths


# ----------------------------------------------------------------------------- KTO


@pytest.mark.parametrize("clamp_kl", [True, False])
@pytest.mark.parametrize("average_log_prob", [False, True], ids=["sum", "mean"])
def test_kto_options_match_float64_reference(clamp_kl, average_log_prob, device):
    B = 7
    lengths = torch.randint(1, 30, (B,), device=device)
    policy = (-torch.rand(B, device=device) * lengths).requires_grad_(True)
    reference = policy.detach() + torch.randn(B, device=device) * 3
    desirable = torch.tensor([True, False, True, True, False, False, True], device=device)
    kl = torch.tensor([-0.4], device=device)  # one element, as Liger passes it; negative
    kwargs = {"beta": 0.3, "desirable_weight": 1.5, "lengths": lengths, "average_log_prob": average_log_prob,
              "clamp_kl": clamp_kl}  # fmt: skip
    loss, metrics, per_example = fastalign.kto_loss(policy, reference, desirable, kl, return_per_example=True, **kwargs)
    (grad,) = torch.autograd.grad(loss * 2.0, policy)
    policy64 = policy.detach().double().requires_grad_(True)
    loss64, metrics64, per_example64 = ref.kto_loss(policy64, reference.double(), desirable, kl.item(),
                                                    return_per_example=True, **kwargs)  # fmt: skip
    (grad64,) = torch.autograd.grad(loss64 * 2.0, policy64)
    assert rel_err(loss, loss64) < 1e-6 and rel_err(grad, grad64) < GRAD_RTOL[torch.float32]
    assert metrics["kl"].item() == pytest.approx(0.0 if clamp_kl else -0.4, abs=1e-7)
    for name, value in metrics.items():
        torch.testing.assert_close(value.double(), metrics64[name].to(device), rtol=1e-5, atol=1e-6, msg=name)
    assert set(per_example) == {"logps", "rewards", "nll"}
    for name, value in per_example.items():
        assert value.shape == (B,) and not value.requires_grad
        torch.testing.assert_close(value.double(), per_example64[name], rtol=1e-5, atol=1e-6, msg=name)


def test_kto_bad_options():
    policy, reference = -torch.rand(2, 3)
    desirable = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match=r"average_log_prob=True needs lengths"):
        fastalign.kto_loss(policy, reference, desirable, 0.1, average_log_prob=True)
    with pytest.raises(TypeError, match="clamp_kl must be True or False; got 'no'"):
        fastalign.KTOLoss(clamp_kl="no")
    with pytest.raises(ValueError, match=r"kl must be a scalar \(a float or a one-element tensor\); got shape \(2,\)"):
        fastalign.kto_loss(policy, reference, desirable, torch.zeros(2))
    with pytest.raises(ValueError, match=r"lengths must have shape \(3,\)"):
        fastalign.kto_loss(policy, reference, desirable, 0.1, lengths=torch.ones(2))


# ----------------------------------------------------------------------------- bad input


def test_bad_options_name_the_argument_and_the_valid_values():
    policy, reference, _ = sequence_logps(2, "cpu")
    with pytest.raises(ValueError, match="discopop_tau must be a finite number > 0; got 0"):
        fastalign.DPOLoss(loss_type="discopop", discopop_tau=0)
    with pytest.raises(ValueError, match=r"ld_alpha must be None or a number in \[0, 1\]; got 1.5"):
        fastalign.DPOLoss(ld_alpha=1.5)
    with pytest.raises(TypeError, match="use_weighting must be True or False; got 'yes'"):
        fastalign.DPOLoss(use_weighting="yes")
    with pytest.raises(TypeError, match="return_per_example must be True or False"):
        fastalign.dpo_loss(*policy, *reference, return_per_example=None)
    with pytest.raises(ValueError, match=r"pair_weights must have the shape of policy_chosen_logps"):
        fastalign.dpo_loss(*policy, *reference, pair_weights=torch.ones(3))
    with pytest.raises(ValueError, match=r"mask must have an even batch \[2B, T\]"):
        sequence_token_weights(torch.ones(3, 4, dtype=torch.bool), ld_alpha=0.5)
    with pytest.raises(TypeError, match=r"mask must be a bool tensor of shape \[R, T\]; got torch.int64"):
        sequence_token_weights(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_logps must have the mask's shape \(2, 4\); got \(2, 3\)"):
        reduce_tokens(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
