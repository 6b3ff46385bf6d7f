"""Eager DPO-family and KTO losses, written straight from the papers' formulas (as TRL 1.16 states them).

Computes in the inputs' dtype: float64 inputs give the float64 test oracle. `dpo_loss_from_logits` is the
"eager PyTorch" benchmark baseline: float32 log_softmax over the whole [2B, T, V] logits, then the loss.
"""

from __future__ import annotations

import torch

from fastalign.reference.logprobs import token_logprobs


def _log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return -torch.log1p(torch.exp(-x))


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x))


def _per_sequence(loss_type, pc, pr, rc, rr, lc, lr, beta, eps):
    """One loss type's per-pair loss [B]: pc/pr policy chosen/rejected sums, rc/rr reference, lc/lr lengths."""
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    h = chosen_ratio - rejected_ratio  # DPO's implicit reward margin / beta
    if loss_type == "sigmoid":
        return -_log_sigmoid(beta * h)
    if loss_type == "hinge":
        return torch.clamp(1 - beta * h, min=0)
    if loss_type in ("ipo", "sigmoid_norm"):
        lc, lr = torch.clamp(lc.to(pc.dtype), min=1), torch.clamp(lr.to(pc.dtype), min=1)
        h_per_token = chosen_ratio / lc - rejected_ratio / lr
        if loss_type == "ipo":
            return (h_per_token - 1 / (2 * beta)) ** 2
        return -_log_sigmoid(beta * h_per_token)
    if loss_type == "exo_pair":
        q_w, q_l = _sigmoid(beta * h), _sigmoid(-beta * h)
        return q_w * torch.log(q_w / (1 - eps)) + q_l * torch.log(q_l / eps)
    if loss_type == "nca_pair":
        return (
            -_log_sigmoid(beta * chosen_ratio)
            - (_log_sigmoid(-beta * chosen_ratio) + _log_sigmoid(-beta * rejected_ratio)) / 2
        )
    if loss_type == "robust":
        return ((1 - eps) * -_log_sigmoid(beta * h) - eps * -_log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -_log_sigmoid(beta * chosen_ratio) - _log_sigmoid(-beta * rejected_ratio)
    if loss_type == "sppo_hard":
        return (chosen_ratio - 1 / (2 * beta)) ** 2 + (rejected_ratio + 1 / (2 * beta)) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            a, b = pc - pr, rc - rr
        else:
            a, b = chosen_ratio, rejected_ratio
        delta = a.sort().values - b.sort().values
        return -(1 - eps) * _log_sigmoid(beta * delta) - eps * _log_sigmoid(-beta * delta)
    if loss_type == "apo_zero":
        return (1 - _sigmoid(beta * chosen_ratio)) + _sigmoid(beta * rejected_ratio)
    if loss_type == "apo_down":
        return _sigmoid(beta * chosen_ratio) + (1 - _sigmoid(beta * h))
    if loss_type == "discopop":
        tau = 0.05
        weight = _sigmoid(beta * h / tau)
        return (1 - weight) * -_log_sigmoid(beta * h) + weight * torch.exp(-beta * h)
    if loss_type == "sft":
        total_tokens = torch.clamp(lc.to(pc.dtype).sum(), min=1)
        return (-pc.sum() / total_tokens) * torch.ones_like(pc)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta=0.1,
    loss_type="sigmoid",
    loss_weights=None,
    label_smoothing=0.0,
    chosen_lengths=None,
    rejected_lengths=None,
):
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    rc, rr = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    pc, pr = policy_chosen_logps, policy_rejected_logps
    loss = 0.0
    for t, w in zip(types, weights):
        per_pair = _per_sequence(t, pc, pr, rc, rr, chosen_lengths, rejected_lengths, beta, label_smoothing)
        loss = loss + w * per_pair.mean()
    chosen_rewards = (beta * (pc - rc)).detach()
    rejected_rewards = (beta * (pr - rr)).detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(pc.dtype).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": pc.detach().mean(),
        "logps/rejected": pr.detach().mean(),
    }
    return loss, metrics


def dpo_loss_from_logits(logits, labels, ref_chosen_logps, ref_rejected_logps, *, ignore_index=-100, **kwargs):
    """logits [2B, T, V] (chosen rows first), labels [2B, T] aligned with them."""
    logps = token_logprobs(logits, labels, ignore_index).sum(-1)
    lengths = (labels != ignore_index).sum(-1)
    chosen, rejected = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    return dpo_loss(
        chosen,
        rejected,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        **kwargs,
    )


def kto_loss(
    policy_logps,
    ref_logps,
    desirable,
    kl=None,
    *,
    beta=0.1,
    desirable_weight=1.0,
    undesirable_weight=1.0,
    loss_type="kto",
):
    z0 = max(float(kl), 0.0) if kl is not None else 0.0
    ratio = policy_logps - ref_logps.detach()
    per_example = []
    for i in range(ratio.shape[0]):
        r = ratio[i]
        if loss_type == "kto":
            value = 1 - _sigmoid(beta * (r - z0)) if desirable[i] else 1 - _sigmoid(beta * (z0 - r))
        else:
            value = 1 - _sigmoid(beta * r) if desirable[i] else _sigmoid(beta * r)
        per_example.append((desirable_weight if desirable[i] else undesirable_weight) * value)
    loss = torch.stack(per_example).mean()
    rewards = (beta * ratio).detach()
    logps = policy_logps.detach()
    chosen, rejected = desirable, ~desirable
    metrics = {
        "kl": torch.tensor(z0, dtype=ratio.dtype),
        "rewards/chosen": rewards[chosen].mean(),
        "rewards/rejected": rewards[rejected].mean(),
        "logps/chosen": logps[chosen].mean(),
        "logps/rejected": logps[rejected].mean(),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics
