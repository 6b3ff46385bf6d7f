"""Liger-Kernel's chunked DPO / KTO loss API (0.8.5) mapped onto fastalign, for running Liger's own tests.

The loss is fastalign's fused-linear module, `fastalign.FusedLinearDPOLoss` / `fastalign.FusedLinearKTOLoss`
(strategy "auto"), with return_per_example, whose [B] outputs give Liger's auxiliary outputs. What the shim computes
itself, because Liger defines it differently from TRL and fastalign: the logits "mean" (Liger: over every position,
prompt and padding included, and the whole vocabulary; TRL/fastalign: over the completion tokens), taken from the
identity mean_v(h W^T + b) = h . mean_v(W) + mean(b). chunk_size and compiled have no meaning here.
"""

from __future__ import annotations

import torch

import fastalign


def _all_logits_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """sum over rows, positions and vocabulary of hidden @ weight.T + bias, in float32, without the logits."""
    with torch.no_grad():
        rows = hidden.shape[0] * hidden.shape[1]
        total = hidden.float().sum((0, 1)) @ weight.float().sum(0)
        return total + (0.0 if bias is None else rows * bias.float().sum())


def fused_linear_dpo(
    _input, weight, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, ignore_index=-100,
    beta=0.1, compute_nll_loss=False, compiled=True, use_ref_model=True, average_log_prob=False, chunk_size=1,
    loss_type="sigmoid", label_smoothing=0.0, discopop_tau=0.05, alpha=1.0,
):  # fmt: skip
    B = target.shape[0] // 2
    types, weights = [loss_type], [1.0]
    if compute_nll_loss:  # Liger's alpha * NLL is TRL's "sft" term
        types, weights = [loss_type, "sft"], [1.0, alpha]
    module = fastalign.FusedLinearDPOLoss(
        beta=beta, loss_type=types, loss_weights=weights, label_smoothing=label_smoothing, ignore_index=ignore_index,
        average_log_prob=average_log_prob, discopop_tau=discopop_tau, return_per_example=True,
    )  # fmt: skip
    if use_ref_model:
        reference = dict(ref_hidden=ref_input, ref_weight=ref_weight, ref_bias=ref_bias)
    else:  # Liger's reference log-probs are then 0
        zeros = torch.zeros(B, device=_input.device)
        reference = dict(ref_chosen_logps=zeros, ref_rejected_logps=zeros)
    loss, _, per = module(_input, weight, target, bias, **reference)
    chosen_lengths = (target[:B] != ignore_index).sum(-1)
    nll = torch.zeros((), device=_input.device)
    if compute_nll_loss:
        nll = (per["nll"] * chosen_lengths).sum() / chosen_lengths.sum()
    denominator = B * target.shape[1] * weight.shape[0]
    aux = (
        per["logps/chosen"],
        per["logps/rejected"],
        _all_logits_sum(_input[:B], weight, bias) / denominator,
        _all_logits_sum(_input[B:], weight, bias) / denominator,
        nll,
        per["rewards/chosen"],
        per["rewards/rejected"],
    )
    return loss, aux


class LigerFusedLinearDPOFunction:
    apply = staticmethod(fused_linear_dpo)


class LigerFusedLinearDPOLoss(torch.nn.Module):
    def __init__(
        self, ignore_index=-100, beta=0.1, alpha=1.0, compute_nll_loss=False, compiled=True, use_ref_model=True,
        average_log_prob=False, chunk_size=1, loss_type="sigmoid", label_smoothing=0.0, discopop_tau=0.05,
    ):  # fmt: skip
        super().__init__()
        self.ignore_index, self.beta, self.alpha, self.compute_nll_loss = ignore_index, beta, alpha, compute_nll_loss
        self.use_ref_model, self.average_log_prob, self.loss_type = use_ref_model, average_log_prob, loss_type
        self.label_smoothing, self.discopop_tau = label_smoothing, discopop_tau
        fastalign.FusedLinearDPOLoss(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)  # validates

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        return fused_linear_dpo(
            _input, lin_weight, target, bias, ref_input, ref_weight, ref_bias, self.ignore_index, self.beta,
            self.compute_nll_loss, True, self.use_ref_model, self.average_log_prob, 1, self.loss_type,
            self.label_smoothing, self.discopop_tau, self.alpha,
        )  # fmt: skip


def fused_linear_kto(
    _input, weight, target, preference_labels, bias=None, ref_input=None, ref_weight=None, ref_bias=None, kl=None,
    ignore_index=-100, beta=0.1, compiled=True, use_ref_model=True, average_log_prob=False, chunk_size=1,
):  # fmt: skip
    module = fastalign.FusedLinearKTOLoss(
        beta=beta, ignore_index=ignore_index, average_log_prob=average_log_prob, clamp_kl=False,
        return_per_example=True,
    )  # fmt: skip
    if use_ref_model:
        reference = dict(ref_hidden=ref_input, ref_weight=ref_weight, ref_bias=ref_bias)
    else:  # Liger's reference log-probs are then 0
        reference = dict(ref_logps=torch.zeros(target.shape[0], device=_input.device))
    kl = 0.0 if kl is None else kl
    loss, _, per = module(_input, weight, target, preference_labels, bias, kl=kl, **reference)
    chosen, rejected = preference_labels, ~preference_labels
    aux = (
        per["logps"][chosen].sum(),
        per["logps"][rejected].sum(),
        _all_logits_sum(_input[chosen], weight, bias),
        _all_logits_sum(_input[rejected], weight, bias),
        per["rewards"][chosen].sum(),
        per["rewards"][rejected].sum(),
    )
    return loss, aux


class LigerFusedLinearKTOFunction:
    apply = staticmethod(fused_linear_kto)


class LigerFusedLinearKTOLoss(torch.nn.Module):
    def __init__(
        self, ignore_index=-100, beta=0.1, compiled=True, use_ref_model=False, average_log_prob=False, chunk_size=1
    ):
        super().__init__()
        self.ignore_index, self.beta, self.use_ref_model, self.average_log_prob = (
            ignore_index, beta, use_ref_model, average_log_prob,
        )  # fmt: skip

    def forward(self, _input, lin_weight, target, bias=None, preference_labels=None, ref_input=None,
                ref_weight=None, ref_bias=None, kl=None):  # fmt: skip
        return fused_linear_kto(
            _input, lin_weight, target, preference_labels, bias, ref_input, ref_weight, ref_bias, kl,
            self.ignore_index, self.beta, True, self.use_ref_model, self.average_log_prob, 1,
        )  # fmt: skip
