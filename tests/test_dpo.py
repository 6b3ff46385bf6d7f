"""dpo_loss / kto_loss and the fused DPOLoss / KTOLoss against float64 eager references, and TRL 1.16 itself."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from utils import GRAD_RTOL, VALUE_RTOL, rel_err

import fastalign
from fastalign.dpo import DPO_LOSS_TYPES, KTO_LOSS_TYPES
from fastalign.reference import dpo as ref
from fastalign.reference import logprobs as ref_logprobs

IGNORE = -100
# Per-type settings where the default would be invalid or would not exercise the option.
LABEL_SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.05, "aot_unpaired": 0.05}
BETA = {"ipo": 0.5, "discopop": 0.02}  # small enough for DiscoPOP's sigmoid(z / 0.05) to be off its ends


def sequence_logps(B, device, requires_grad=True):
    """Policy and reference per-sequence sums of a few dozen tokens each, and completion lengths."""
    lengths = torch.randint(1, 40, (2, B), device=device)
    policy = [-(torch.rand(B, device=device) * 2 + 0.5) * n for n in lengths]
    # Log-ratios of a few nats: the sigmoids and DiscoPOP's mixing stay off their saturated ends.
    reference = [(x + torch.randn(B, device=device) * 3).requires_grad_(True) for x in policy]  # must get no grad
    policy = [x.requires_grad_(requires_grad) for x in policy]
    return policy, reference, lengths


def check_dpo_against_reference(policy, reference, lengths, grad_scale, **kwargs):
    kwargs = {"chosen_lengths": lengths[0], "rejected_lengths": lengths[1], **kwargs}
    loss, metrics = fastalign.dpo_loss(*policy, *reference, **kwargs)
    grads = torch.autograd.grad(loss * grad_scale, policy, allow_unused=True)

    policy64 = [x.detach().double().requires_grad_(True) for x in policy]
    reference64 = [x.detach().double() for x in reference]
    loss64, metrics64 = ref.dpo_loss(*policy64, *reference64, **kwargs)
    grads64 = torch.autograd.grad(loss64 * grad_scale, policy64, allow_unused=True)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, loss64) < VALUE_RTOL[torch.float32] * 10
    for g, g64 in zip(grads, grads64):
        if g64 is None:  # "sft" reads only the chosen completions
            assert g is None or (g == 0).all()
        else:
            assert rel_err(g, g64) < GRAD_RTOL[torch.float32]
    assert set(metrics) == set(metrics64)
    for name, value in metrics.items():
        assert not value.requires_grad and value.dim() == 0
        torch.testing.assert_close(value.double(), metrics64[name], rtol=1e-5, atol=1e-6, msg=name)
    return loss


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("B", [1, 5])
def test_every_loss_type_matches_float64_reference(loss_type, B, device):
    policy, reference, lengths = sequence_logps(B, device)
    beta = BETA.get(loss_type, 0.2)
    kwargs = {"beta": beta, "loss_type": loss_type, "label_smoothing": LABEL_SMOOTHING.get(loss_type, 0.0)}
    check_dpo_against_reference(policy, reference, lengths, grad_scale=-2.5, **kwargs)
    assert all(x.grad is None for x in reference)


def test_loss_weights_combine_loss_types(device):
    policy, reference, lengths = sequence_logps(6, device)
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]  # MPO's combination
    combined = check_dpo_against_reference(policy, reference, lengths, 1.0, loss_type=types, loss_weights=weights)
    kwargs = {"chosen_lengths": lengths[0], "rejected_lengths": lengths[1]}
    separate = [fastalign.dpo_loss(*policy, *reference, loss_type=t, **kwargs)[0] for t in types]
    torch.testing.assert_close(combined, sum(w * x for w, x in zip(weights, separate)))
    unweighted = fastalign.dpo_loss(*policy, *reference, loss_type=types, **kwargs)[0]
    torch.testing.assert_close(unweighted, sum(separate))


def test_metrics_follow_trl_definitions(device):
    pc = torch.tensor([-10.0, -20.0, -5.0], device=device)
    pr = torch.tensor([-12.0, -15.0, -5.0], device=device)
    rc = torch.tensor([-11.0, -18.0, -6.0], device=device)
    rr = torch.tensor([-11.0, -18.0, -6.0], device=device)
    _, m = fastalign.dpo_loss(pc, pr, rc, rr, beta=0.5)
    # chosen rewards 0.5, -1, 0.5; rejected -0.5, 1.5, 0.5
    assert m["rewards/chosen"].item() == pytest.approx(0.0)
    assert m["rewards/rejected"].item() == pytest.approx(0.5)
    assert m["rewards/accuracies"].item() == pytest.approx(1 / 3)  # a tie is not a win
    assert m["rewards/margins"].item() == pytest.approx(-0.5)
    assert m["logps/chosen"].item() == pytest.approx(-35 / 3)
    assert m["logps/rejected"].item() == pytest.approx(-32 / 3)


def test_aot_sorts_across_the_batch(device):
    """aot compares sorted margins: permuting the pairs changes nothing, swapping only the reference does."""
    policy, reference, lengths = sequence_logps(7, device, requires_grad=False)
    perm = torch.randperm(7, device=device)
    for loss_type in ("aot", "aot_unpaired"):
        loss = fastalign.dpo_loss(*policy, *reference, loss_type=loss_type)[0]
        permuted = fastalign.dpo_loss(*(x[perm] for x in policy), *(x[perm] for x in reference), loss_type=loss_type)
        torch.testing.assert_close(loss, permuted[0])


# ----------------------------------------------------------------------------- TRL as a second oracle


TRL_DEFAULTS = {
    "ld_alpha": None,
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
    "use_weighting": False,
}


def _trl_dpo(per_token_logps, completion_mask, ref_chosen, ref_rejected, *, log_sum_sq_probs=None, discopop_tau=0.05,
             **config):  # fmt: skip
    """Runs TRL 1.16's DPOTrainer._compute_loss on given per-token log-probs, through a stand-in model."""
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    outputs = SimpleNamespace(
        log_probs=per_token_logps,
        entropy=torch.zeros_like(per_token_logps),
        mean_logits=torch.zeros_like(per_token_logps),
        is_top1=torch.zeros_like(per_token_logps, dtype=torch.bool),
        log_sum_sq_probs=log_sum_sq_probs,
    )
    identity = SimpleNamespace(device=per_token_logps.device, gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=identity,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        args=SimpleNamespace(discopop_tau=discopop_tau),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        **{**TRL_DEFAULTS, **config},
    )
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    try:
        loss = dpo_trainer.DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, False)
    except (AttributeError, KeyError, TypeError) as exc:  # another TRL version's internals
        pytest.skip(f"TRL's DPOTrainer._compute_loss no longer fits this stand-in: {exc!r}")
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_batch(B, T, device):
    """Per-token log-probs [2B, T - 1] of a batch whose completion mask has a prompt column and holes, and
    reference sums [B] (chosen, rejected)."""
    completion_mask = (torch.rand(2 * B, T, device=device) < 0.7).long()
    completion_mask[:, 0] = 0  # the prompt: TRL counts lengths on the unshifted mask, log-probs on the shifted one
    completion_mask[0, 1:] = 1
    shift_mask = completion_mask[:, 1:]
    per_token = torch.where(shift_mask.bool(), -torch.rand(2 * B, T - 1, device=device) * 3, 0.0)
    # Log-ratios of a few nats: forward KL's 1 - e^-u and DiscoPOP's e^-z stay finite in TRL's float32.
    ref_chosen, ref_rejected = (per_token.sum(-1) + torch.randn(2 * B, device=device) * 1.5).chunk(2)
    return completion_mask, per_token, ref_chosen, ref_rejected


# TRL's options beyond the loss type: (options, the loss types they are checked with).
F_DIVERGENCE_CASES = [
    pytest.param({"f_divergence_type": f, "f_alpha_divergence_coef": 0.3}, t, id=f"{f}-{t}")
    for f in ("forward_kl", "js_divergence", "alpha_divergence")
    for t in ("sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft", "sigmoid_norm")
]
TOKEN_OPTION_CASES = [
    *[pytest.param({"ld_alpha": 0.4}, t, id=f"ld_alpha-{t}") for t in DPO_LOSS_TYPES],
    *[
        pytest.param({"use_weighting": True}, t, id=f"wpo-{t}")
        for t in DPO_LOSS_TYPES
        if t not in ("aot", "aot_unpaired", "sft")  # TRL refuses the sorted types, and fails on sft (in-place)
    ],
    pytest.param({"discopop_tau": 0.3}, "discopop", id="discopop_tau"),
    pytest.param(
        {"ld_alpha": 0.0, "use_weighting": True, "f_divergence_type": "js_divergence"}, "sigmoid", id="ld+wpo+js"
    ),  # fmt: skip
]


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_matches_trl_dpo_trainer(loss_type, device):
    check_against_trl(loss_type, {}, device)


@pytest.mark.parametrize("options, loss_type", F_DIVERGENCE_CASES + TOKEN_OPTION_CASES)
def test_options_match_trl_dpo_trainer(options, loss_type, device):
    check_against_trl(loss_type, options, device)


def check_against_trl(loss_type, options, device):
    B, T = 3, 9
    completion_mask, per_token, ref_chosen, ref_rejected = trl_batch(B, T, device)
    lssp = -torch.rand(per_token.shape, device=device) * 4  # log sum_v p_v^2 <= 0
    ls, beta = LABEL_SMOOTHING.get(loss_type, 0.0), BETA.get(loss_type, 0.3)
    trl_loss, trl_metrics = _trl_dpo(
        per_token, completion_mask, ref_chosen, ref_rejected, log_sum_sq_probs=lssp, loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=ls, **options,
    )  # fmt: skip
    loss, metrics = fastalign.dpo.dpo_loss_from_token_logps(
        per_token, completion_mask[:, 1:].bool(), ref_chosen, ref_rejected, log_sum_sq_probs=lssp, beta=beta,
        loss_type=loss_type, label_smoothing=ls, **options,
    )  # fmt: skip
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    for name, value in metrics.items():
        assert trl_metrics[name] == pytest.approx(value.item(), rel=1e-5, abs=1e-6), name
    if not options:  # the [B] sums API is the same loss (the token path sums in float64)
        logps, lengths = per_token.double().sum(-1), completion_mask[:, 1:].sum(-1)
        loss_of_sums, _ = fastalign.dpo_loss(
            *logps.chunk(2), ref_chosen, ref_rejected, beta=beta, loss_type=loss_type, label_smoothing=ls,
            chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
        )  # fmt: skip
        torch.testing.assert_close(loss_of_sums.float(), loss, rtol=0, atol=0)


# ----------------------------------------------------------------------------- fused DPOLoss


def preference_batch(B, T, V, dtype, device):
    """[2B, T, V] logits (chosen rows first) and labels with a prompt prefix, a masked tail, one empty row."""
    logits = (torch.randn(2 * B, T, V, device=device) * 2).to(dtype)
    labels = torch.randint(0, V, (2 * B, T), device=device)
    labels[:, : T // 3] = IGNORE
    labels[torch.rand(2 * B, T, device=device) < 0.15] = IGNORE
    return logits, labels


@pytest.mark.parametrize(
    "B, T, V, dtype",
    [
        pytest.param(2, 7, 301, torch.float32, id="B2-T7-V301-fp32"),
        pytest.param(1, 5, 1000, torch.bfloat16, id="B1-T5-V1000-bf16"),
        pytest.param(3, 4, 129, torch.float16, id="B3-T4-V129-fp16"),
    ],
)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", ["sigmoid", "sft"]], ids=["sigmoid", "ipo", "sigmoid+sft"])
def test_fused_dpo_matches_reference_and_composition(B, T, V, dtype, loss_type, backend, device):
    logits, labels = preference_batch(B, T, V, dtype, device)
    labels[B] = IGNORE  # a rejected completion with every token masked
    ref_chosen, ref_rejected = -torch.rand(2, B, device=device) * 20
    module = fastalign.DPOLoss(beta=0.5, loss_type=loss_type)
    x = logits.clone().requires_grad_(True)
    loss, metrics = module(x, labels, ref_chosen, ref_rejected)
    loss.backward(torch.tensor(1.7, device=device))

    # Composition of the public pieces: token_logprobs, a masked sum (in float64, as DPOLoss), dpo_loss.
    y = logits.clone().requires_grad_(True)
    logps = fastalign.token_logprobs(y, labels).double().sum(-1)
    lengths = (labels != IGNORE).sum(-1)
    composed, composed_metrics = fastalign.dpo_loss(
        *logps.chunk(2), ref_chosen, ref_rejected, beta=0.5, loss_type=loss_type,
        chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
    )  # fmt: skip
    composed.backward(torch.tensor(1.7, device=device))
    assert torch.equal(loss, composed.float()) and torch.equal(x.grad, y.grad)
    assert all(torch.equal(metrics[k], composed_metrics[k].float()) for k in metrics)

    x64 = logits.detach().double().requires_grad_(True)
    loss64, _ = ref.dpo_loss_from_logits(x64, labels, ref_chosen.double(), ref_rejected.double(), beta=0.5,
                                         loss_type=loss_type)  # fmt: skip
    loss64.backward(torch.tensor(1.7, dtype=torch.float64, device=device))
    assert torch.isfinite(loss) and rel_err(loss, loss64) < VALUE_RTOL[dtype] * 10
    assert x.grad.dtype == dtype and rel_err(x.grad, x64.grad) < GRAD_RTOL[dtype]
    assert (x.grad[B] == 0).all() and (x.grad[labels == IGNORE] == 0).all()


def test_fused_dpo_with_reference_logits_and_inplace_backward(backend, device):
    B, T, V = 2, 6, 257
    base, labels = preference_batch(B, T + 1, V, torch.bfloat16, device)
    labels = labels[:, 1:]
    ref_logits = torch.randn(2 * B, T, V, device=device, dtype=torch.bfloat16)
    module = fastalign.DPOLoss(beta=0.1, loss_type="hinge")

    x = base[:, :-1].clone().requires_grad_(True)
    loss, _ = module(x, labels, ref_logits=ref_logits)
    (expected,) = torch.autograd.grad(loss, x)
    ref_logps = fastalign.token_logprobs(ref_logits, labels).double().sum(-1)
    torch.testing.assert_close(loss, module(x, labels, *ref_logps.chunk(2))[0], rtol=0, atol=0)

    leaf = base.clone().requires_grad_(True)
    logits = (leaf * 1)[:, :-1]  # a strided non-leaf, as the shifted lm_head output is
    inplace = fastalign.DPOLoss(beta=0.1, loss_type="hinge", inplace_backward=True)
    loss_inplace, _ = inplace(logits, labels, ref_logits=ref_logits)
    loss_inplace.backward()
    assert torch.equal(loss_inplace, loss)
    assert torch.equal(leaf.grad[:, :-1], expected) and (leaf.grad[:, -1] == 0).all()
    assert torch.equal(logits.detach(), expected)  # the buffer now holds the gradient


def test_fused_dpo_all_completions_masked(backend, device):
    logits, labels = preference_batch(2, 5, 64, torch.float32, device)
    labels[:] = IGNORE
    x = logits.clone().requires_grad_(True)
    for loss_type in ("sigmoid", "ipo", "sft", "sigmoid_norm"):
        loss, metrics = fastalign.DPOLoss(loss_type=loss_type)(x, labels, torch.zeros(2), torch.zeros(2))
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and (grad == 0).all()
        assert all(torch.isfinite(v) for v in metrics.values())


# ----------------------------------------------------------------------------- KTO


@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
@pytest.mark.parametrize("kl", [0.7, -0.3], ids=["kl", "negative-kl-clamped"])
def test_kto_matches_float64_reference(loss_type, kl, device):
    B = 7
    policy = (-torch.rand(B, device=device) * 40).requires_grad_(True)
    reference = (policy.detach() + torch.randn(B, device=device) * 5).requires_grad_(True)
    desirable = torch.tensor([True, False, True, True, False, False, True], device=device)
    kwargs = {"beta": 0.3, "desirable_weight": 1.5, "undesirable_weight": 0.7, "loss_type": loss_type}
    loss, metrics = fastalign.kto_loss(policy, reference, desirable, torch.tensor(kl), **kwargs)
    (grad,) = torch.autograd.grad(loss * 3.0, policy)
    policy64 = policy.detach().double().requires_grad_(True)
    loss64, metrics64 = ref.kto_loss(policy64, reference.detach().double(), desirable, kl, **kwargs)
    (grad64,) = torch.autograd.grad(loss64 * 3.0, policy64)
    assert rel_err(loss, loss64) < 1e-6 and rel_err(grad, grad64) < GRAD_RTOL[torch.float32]
    assert reference.grad is None
    for name, value in metrics.items():
        torch.testing.assert_close(value.double(), metrics64[name].to(device), rtol=1e-5, atol=1e-6, msg=name)
    # Clamped at 0, as TRL does; apo_zero_unpaired reads no KL, and TRL logs 0 for it whatever was passed.
    assert metrics["kl"].item() == pytest.approx(max(kl, 0.0) if loss_type == "kto" else 0.0)


def test_kto_matches_trl_kto_trainer(device):
    kto_trainer = pytest.importorskip("trl.trainer.kto_trainer")
    B, T = 5, 8
    completion_mask = (torch.rand(B, T, device=device) < 0.8).long()
    completion_mask[:, 0] = 0
    per_token = torch.where(completion_mask[:, 1:].bool(), -torch.rand(B, T - 1, device=device) * 3, 0.0)
    kl_per_token = -torch.rand(B, T - 1, device=device) * 3
    ref_logps, ref_kl_logps = -torch.rand(2, B, device=device) * 12
    desirable = torch.tensor([True, False, False, True, True], device=device)
    input_ids, kl_input_ids = torch.zeros(2, B, T, dtype=torch.long, device=device)
    by_input = {input_ids.data_ptr(): per_token, kl_input_ids.data_ptr(): kl_per_token}

    def model(input_ids, **_):
        log_probs = by_input[input_ids.data_ptr()]
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)

    identity = SimpleNamespace(device=device, gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=identity, aux_loss_enabled=False, precompute_ref_logps=True,
        calculate_KL=True, loss_type="kto", beta=0.2, desirable_weight=1.3, undesirable_weight=0.6,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    trainer._compute_kl_logps = lambda m, batch: kto_trainer.KTOTrainer._compute_kl_logps(trainer, m, batch)
    batch = {
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion_mask,
        "KL_input_ids": kl_input_ids, "KL_attention_mask": torch.ones_like(input_ids),
        "KL_completion_mask": torch.ones_like(input_ids), "label": desirable, "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }  # fmt: skip
    try:
        trl_loss = kto_trainer.KTOTrainer._compute_loss(trainer, model, batch, False)
    except (AttributeError, KeyError, TypeError) as exc:
        pytest.skip(f"TRL's KTOTrainer._compute_loss no longer fits this stand-in: {exc!r}")
    kl = (kl_per_token.sum(-1) - ref_kl_logps).mean()
    loss, metrics = fastalign.kto_loss(
        per_token.sum(-1), ref_logps, desirable, kl, beta=0.2, desirable_weight=1.3, undesirable_weight=0.6
    )
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    for name, value in metrics.items():
        assert trainer._metrics["train"][name][-1] == pytest.approx(value.item(), rel=1e-5, abs=1e-6), name


def test_kto_metrics_of_an_absent_kind_are_nan(device):
    policy, reference = -torch.rand(2, 3, device=device) * 10
    loss, metrics = fastalign.kto_loss(policy, reference, torch.ones(3, dtype=torch.bool, device=device), 0.1)
    assert torch.isfinite(loss) and torch.isfinite(metrics["rewards/chosen"])
    assert math.isnan(metrics["rewards/rejected"].item()) and math.isnan(metrics["rewards/margins"].item())


def test_fused_kto_matches_composition(backend, device):
    B, T, V = 4, 5, 97
    logits = torch.randn(B, T, V, device=device, dtype=torch.bfloat16)
    labels = torch.randint(0, V, (B, T), device=device)
    labels[:, :2] = IGNORE
    labels[3] = IGNORE
    desirable = torch.tensor([True, False, True, False], device=device)
    ref_logits = torch.randn(B, T, V, device=device, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    loss, metrics = fastalign.KTOLoss(beta=0.2)(x, labels, desirable, kl=0.05, ref_logits=ref_logits)
    loss.backward()
    y = logits.clone().requires_grad_(True)
    ref_logps = fastalign.token_logprobs(ref_logits, labels).double().sum(-1)  # float64 sums, as KTOLoss
    logps = fastalign.token_logprobs(y, labels).double().sum(-1)
    composed, _ = fastalign.kto_loss(logps, ref_logps, desirable, 0.05, beta=0.2)
    composed.backward()
    assert torch.equal(loss, composed.float()) and torch.equal(x.grad, y.grad) and (x.grad[3] == 0).all()
    x64 = logits.double()
    logps64 = ref_logprobs.token_logprobs(x64, labels).sum(-1)
    ref64 = ref_logprobs.token_logprobs(ref_logits.double(), labels).sum(-1)
    loss64, _ = ref.kto_loss(logps64, ref64, desirable, 0.05, beta=0.2)
    assert rel_err(loss, loss64) < 1e-5


# ----------------------------------------------------------------------------- bad input


def test_dpo_bad_inputs(device):
    policy, reference, lengths = sequence_logps(3, device)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        fastalign.dpo_loss(*policy, *reference, beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        fastalign.dpo_loss(*policy, *reference, beta=-0.1)
    with pytest.raises(ValueError, match=r"Unsupported loss_type 'dpo': not one of \['sigmoid', 'hinge', 'ipo'"):
        fastalign.dpo_loss(*policy, *reference, loss_type="dpo")
    with pytest.raises(ValueError, match="loss_weights must have one weight per loss_type"):
        fastalign.dpo_loss(*policy, *reference, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="ref_rejected_logps must have the shape of policy_chosen_logps"):
        fastalign.dpo_loss(*policy, reference[0], reference[1][:2])
    with pytest.raises(ValueError, match="policy_chosen_logps must have shape"):
        fastalign.dpo_loss(policy[0][None], *policy[1:], *reference)
    with pytest.raises(TypeError, match="ref_chosen_logps must be a floating-point tensor"):
        fastalign.dpo_loss(*policy, lengths[0], reference[1])
    with pytest.raises(ValueError, match=r"\['ipo'\] needs chosen_lengths and rejected_lengths"):
        fastalign.dpo_loss(*policy, *reference, loss_type="ipo")
    with pytest.raises(ValueError, match="chosen_lengths must have shape"):
        fastalign.dpo_loss(*policy, *reference, loss_type="ipo", chosen_lengths=lengths[0][:2],
                           rejected_lengths=lengths[1])  # fmt: skip
    with pytest.raises(ValueError, match="label_smoothing must be > 0 for loss_type='exo_pair'"):
        fastalign.dpo_loss(*policy, *reference, loss_type="exo_pair")
    for bad in (0.5, -0.1):
        with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0\.0, 0\.5\) for loss_type='robust'"):
            fastalign.dpo_loss(*policy, *reference, loss_type="robust", label_smoothing=bad)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\); got -0.1"):
        fastalign.dpo_loss(*policy, *reference, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="beta"):
        fastalign.DPOLoss(beta=0)
    with pytest.raises(ValueError, match="Unsupported loss_type 'nope': not one of"):
        fastalign.DPOLoss(loss_type="nope")


A = torch.randn(4)
DESIRABLE = torch.tensor([True, False, True, False])
NAN, INF = math.nan, math.inf


def _dpo(**options):
    return fastalign.dpo_loss(A, A, A, A, **options)


def _ipo_lengths(chosen):
    return _dpo(loss_type="ipo", chosen_lengths=chosen, rejected_lengths=torch.ones(4))


def _kto(kl, module=False):
    if module:
        return fastalign.KTOLoss()(torch.randn(4, 3, 5), torch.zeros(4, 3, dtype=torch.long), DESIRABLE, A, kl)
    return fastalign.kto_loss(A, A, DESIRABLE, kl)


# (call, error, message): each a silent wrong answer or an unnamed error before (bad-input audit).
BAD_LOSS_CALLS = [
    (lambda: _dpo(loss_weights=[NAN]), ValueError, r"loss_weights must hold finite numbers; got \[nan\]"),
    (lambda: _dpo(loss_weights=[INF]), ValueError, r"loss_weights must hold finite numbers; got \[inf\]"),
    (lambda: fastalign.DPOLoss(loss_weights=[NAN]), ValueError, "loss_weights must hold finite numbers"),
    (lambda: _dpo(loss_weights=["a"]), TypeError, "loss_weights\\[0\\] must be a finite number; got str 'a'"),
    (lambda: _dpo(loss_weights=2.0), TypeError, "loss_weights must be a list of numbers, one per loss_type; got float"),
    (lambda: _dpo(loss_type=None), TypeError, "loss_type must be a str or a list of str; got NoneType"),
    (lambda: _dpo(beta=True), TypeError, "beta must be a finite number > 0; got bool True"),
    (lambda: _dpo(beta=1e-39), ValueError, "beta must be at least float32's smallest normal number"),
    (
        lambda: _dpo(f_alpha_divergence_coef=True),
        TypeError,
        "f_alpha_divergence_coef must be a finite number; got bool",
    ),
    (lambda: _dpo(loss_type="robust", label_smoothing="0.1"), TypeError, "label_smoothing must be a number in"),
    (lambda: _ipo_lengths(torch.ones(4, dtype=torch.bool)), TypeError, "chosen_lengths must be an integer or floating"),
    (lambda: _ipo_lengths(torch.ones(4, dtype=torch.complex64)), TypeError, "chosen_lengths must be an integer or"),
    (lambda: _ipo_lengths(torch.full((4,), NAN)), ValueError, "chosen_lengths must be finite and >= 0; got nan"),
    (lambda: _ipo_lengths(torch.tensor([1, -2, 3, 4])), ValueError, "chosen_lengths must be finite and >= 0; got -2"),
    (
        lambda: fastalign.kto_loss(A, A, DESIRABLE, 0.0, lengths=torch.full((4,), INF)),
        ValueError,
        "lengths must be finite and >= 0; got inf",
    ),  # fmt: skip
    (lambda: _kto(NAN), ValueError, "kl must be finite; got nan"),
    (lambda: _kto(torch.tensor([INF])), ValueError, "kl must be finite; got inf"),
    (lambda: _kto(NAN, module=True), ValueError, "kl must be finite; got nan"),
    (lambda: _kto(1 + 2j), TypeError, r"kl must be a real number or a one-element real tensor; got complex"),
    (lambda: _kto(torch.tensor(1 + 2j)), TypeError, "kl must be a real number .*; got a torch.complex64 tensor"),
    (lambda: _kto("0.1"), TypeError, "kl must be a real number or a one-element real tensor; got str '0.1'"),
    (lambda: _kto(torch.tensor(0.1, device="meta")), ValueError, r"kl must be on the log-probs' device \(cpu\)"),
    (lambda: fastalign.kto_loss(A, A, DESIRABLE, 0.0, desirable_weight=True), TypeError, "desirable_weight must be"),
    (lambda: fastalign.IFTLoss(gamma=True), TypeError, r"gamma must be a number in \[0, 1\]; got bool True"),
]


@pytest.mark.parametrize(("call", "error", "message"), BAD_LOSS_CALLS)
def test_bad_loss_inputs_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_loss_inputs_accept_what_trl_passes():
    """A fully masked completion (length 0), negative loss weights (TRL 1.16 checks only their count), NumPy scalars
    (converted to Python numbers) and kl as a one-element tensor."""
    np = pytest.importorskip("numpy")
    lengths = torch.tensor([0, 3, 0, 2])
    assert torch.isfinite(_dpo(loss_type="ipo", chosen_lengths=lengths, rejected_lengths=lengths)[0])
    types = ["sigmoid", "hinge"]
    weighted = _dpo(loss_type=types, loss_weights=[1.0, -0.5])[0]
    torch.testing.assert_close(weighted, _dpo()[0] - 0.5 * _dpo(loss_type="hinge")[0])
    numpy_options = {"beta": np.float32(0.25), "label_smoothing": np.float64(0.1), "loss_weights": [np.float32(2)]}
    plain = {"beta": 0.25, "label_smoothing": 0.1, "loss_weights": [2.0]}
    assert _dpo(loss_type="robust", **numpy_options)[0] == _dpo(loss_type="robust", **plain)[0]
    kto = fastalign.kto_loss(A, A, DESIRABLE, np.float32(0.5), beta=np.float64(0.2), desirable_weight=np.int64(2))
    assert kto[0] == fastalign.kto_loss(A, A, DESIRABLE, torch.tensor([0.5]), beta=0.2, desirable_weight=2)[0]


def test_fused_dpo_bad_inputs(device):
    logits, labels = preference_batch(2, 4, 31, torch.float32, device)
    ref_logps = torch.zeros(2, device=device)
    with pytest.raises(ValueError, match="logits must have an even batch .* got batch 3"):
        fastalign.DPOLoss()(logits[:3], labels[:3], ref_logps, ref_logps)
    with pytest.raises(ValueError, match="pass ref_chosen_logps and ref_rejected_logps, or ref_logits"):
        fastalign.DPOLoss()(logits, labels, ref_logps)
    with pytest.raises(ValueError, match="pass either ref_logits or"):
        fastalign.DPOLoss()(logits, labels, ref_logps, ref_logps, ref_logits=logits)
    with pytest.raises(ValueError, match="ref_logits must have shape"):
        fastalign.DPOLoss()(logits, labels, ref_logits=logits[:, :-1])
    with pytest.raises(ValueError, match="ref_chosen_logps must have the shape of policy_chosen_logps"):
        fastalign.DPOLoss()(logits, labels, torch.zeros(3, device=device), ref_logps)
    with pytest.raises(ValueError, match="labels must have shape"):
        fastalign.DPOLoss()(logits, labels[:, :-1], ref_logps, ref_logps)
    with pytest.raises(TypeError, match="ref_logits must be float32, bfloat16 or float16; got torch.int64"):
        fastalign.DPOLoss()(logits, labels, ref_logits=logits.long())
    with pytest.raises(ValueError, match=r"ref_logits must be on the device of the logits \(.*\); got meta"):
        fastalign.DPOLoss()(logits, labels, ref_logits=logits.to("meta"))


def test_kto_bad_inputs(device):
    policy, reference = -torch.rand(2, 4, device=device)
    desirable = torch.tensor([True, False, True, False], device=device)
    with pytest.raises(ValueError, match="kl .* is required for loss_type 'kto'"):
        fastalign.kto_loss(policy, reference, desirable)
    with pytest.raises(TypeError, match="desirable must be a bool tensor"):
        fastalign.kto_loss(policy, reference, desirable.long(), 0.0)
    with pytest.raises(ValueError, match="desirable must have shape"):
        fastalign.kto_loss(policy, reference, desirable[:3], 0.0)
    with pytest.raises(ValueError, match="ref_logps must have the shape of policy_logps"):
        fastalign.kto_loss(policy, reference[:3], desirable, 0.0)
    with pytest.raises(ValueError, match="kl must be a scalar"):
        fastalign.kto_loss(policy, reference, desirable, torch.zeros(2))
    with pytest.raises(ValueError, match="beta"):
        fastalign.kto_loss(policy, reference, desirable, 0.0, beta=0)
    with pytest.raises(ValueError, match="undesirable_weight must be a finite number >= 0"):
        fastalign.KTOLoss(undesirable_weight=-1.0)
    with pytest.raises(ValueError, match=r"Unsupported loss_type 'sigmoid': not one of \['kto', 'apo_zero_unpaired'\]"):
        fastalign.kto_loss(policy, reference, desirable, 0.0, loss_type="sigmoid")
