"""Eager DPO-family and KTO losses, written straight from the papers' formulas (as TRL 1.16 states them).

Computes in the inputs' dtype: float64 inputs give the float64 test oracle. `dpo_loss_from_logits` is the
"eager PyTorch" benchmark baseline: float32 log_softmax over the whole [2B, T, V] logits, then the loss.
"""

from __future__ import annotations

import math

import torch

from fastalign.reference.logprobs import token_logprobs


def _log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    # log(1 / (1 + e^-x)), for x < 0 as x - log(1 + e^x): no exp overflows (f-divergence scores reach |x| > 709).
    # Each branch sees only its half-line, so the branch not taken has finite values and gradients.
    positive, negative = torch.clamp(x, min=0), torch.clamp(x, max=0)
    return torch.where(x >= 0, -torch.log1p(torch.exp(-positive)), negative - torch.log1p(torch.exp(negative)))


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(_log_sigmoid(x))


def _f_prime(u: torch.Tensor, f_divergence_type: str, alpha: float) -> torch.Tensor:
    """f'(t) at t = exp(u) = pi / pi_ref, the f-DPO score of one sequence (constants as TRL's)."""
    t = torch.exp(u)
    if f_divergence_type == "reverse_kl":
        return u
    if f_divergence_type == "forward_kl":
        return 1 - 1 / t
    if f_divergence_type == "js_divergence":
        return torch.log(2 * t / (1 + t))
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1) < 1e-6:
            return u
        exponent = torch.clamp((alpha - 1) * u, max=80.0)  # TRL keeps exp finite in float32
        return (torch.exp(exponent) - 1) / (alpha - 1)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}")


def _per_sequence(loss_type, pc, pr, rc, rr, lc, lr, sums_c, beta, eps, f_div, f_alpha, tau, averaged=False):
    """One loss type's per-pair loss [B]: pc/pr policy chosen/rejected values, rc/rr reference, lc/lr lengths,
    sums_c the plain chosen sums of "sft"; averaged: pc..rr are per-token means already."""
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    chosen_score, rejected_score = _f_prime(chosen_ratio, f_div, f_alpha), _f_prime(rejected_ratio, f_div, f_alpha)
    h = chosen_score - rejected_score  # DPO's implicit reward margin / beta (under reverse KL)
    if loss_type == "sigmoid":
        return -_log_sigmoid(beta * h)
    if loss_type == "hinge":
        return torch.clamp(1 - beta * h, min=0)
    if loss_type in ("ipo", "sigmoid_norm"):
        if averaged:
            h_per_token = h
        else:
            lc, lr = torch.clamp(lc.to(pc.dtype), min=1), torch.clamp(lr.to(pc.dtype), min=1)
            h_per_token = chosen_score / lc - rejected_score / lr
        if loss_type == "ipo":
            return (h_per_token - 1 / (2 * beta)) ** 2
        return -_log_sigmoid(beta * h_per_token)
    if loss_type == "exo_pair":
        # log q from log-sigmoid: q = sigmoid underflows to 0 at large margins (f-divergences reach thousands),
        # and 0 * log 0 would be NaN where the term is 0.
        log_q_w, log_q_l = _log_sigmoid(beta * h), _log_sigmoid(-beta * h)
        return torch.exp(log_q_w) * (log_q_w - math.log(1 - eps)) + torch.exp(log_q_l) * (log_q_l - math.log(eps))
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
        return _sigmoid(beta * chosen_ratio) + (1 - _sigmoid(beta * (chosen_ratio - rejected_ratio)))
    if loss_type == "discopop":
        weight = _sigmoid(beta * h / tau)
        return (1 - weight) * -_log_sigmoid(beta * h) + weight * torch.exp(-beta * h)
    if loss_type == "sft":
        total_tokens = torch.clamp(lc.to(pc.dtype).sum(), min=1)
        return (-sums_c.sum() / total_tokens) * torch.ones_like(pc)
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
    average_log_prob=False,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    discopop_tau=0.05,
    pair_weights=None,
    chosen_sums=None,
    return_per_example=False,
):
    """(loss, metrics), plus per_example with return_per_example; chosen_sums (default the chosen inputs) feed
    "sft" and the NLL."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc, rr = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    sums_c = pc if chosen_sums is None else chosen_sums
    if average_log_prob:
        nc, nr = (torch.clamp(n.to(pc.dtype), min=1) for n in (chosen_lengths, rejected_lengths))
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    loss = 0.0
    for t, w in zip(types, weights):
        per_pair = _per_sequence(
            t, pc, pr, rc, rr, chosen_lengths, rejected_lengths, sums_c, beta, label_smoothing,
            f_divergence_type, f_alpha_divergence_coef, discopop_tau, average_log_prob,
        )  # fmt: skip
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
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
    per_example = {
        "logps/chosen": pc.detach(),
        "logps/rejected": pr.detach(),
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
    }
    if chosen_lengths is not None:
        per_example["nll"] = (-sums_c / torch.clamp(chosen_lengths.to(pc.dtype), min=1)).detach()
    return (loss, metrics, per_example) if return_per_example else (loss, metrics)


def ld_token_weights(mask, ld_alpha):
    """LD-DPO's token weights [2B, T], token by token: 1 on a pair's first min(len_chosen, len_rejected)
    completion tokens, ld_alpha on the rest of the longer completion, 0 off the completions."""
    weights = torch.zeros(mask.shape, dtype=torch.float64)
    half = mask.shape[0] // 2
    for row in range(mask.shape[0]):
        pair = row % half
        shared = min(int(mask[pair].sum()), int(mask[pair + half].sum()))
        seen = 0
        for t in range(mask.shape[1]):
            if mask[row, t]:
                seen += 1
                weights[row, t] = 1.0 if seen <= shared else ld_alpha
    return weights.to(mask.device)


def log_sum_sq_probs(logits):
    """log sum_v p_v^2 of softmax(logits) at each position: [..., V] -> [...]."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    return torch.logsumexp(2 * z.log_softmax(-1), -1)


def wpo_sequence_weights(token_logps, logits, mask):
    """WPO eq. 2 as TRL computes it: exp(mean over the completion of log p(y_t) - log sum_v p_v^2) per row."""
    aligned = (token_logps - log_sum_sq_probs(logits)) * mask
    return torch.exp(aligned.sum(-1) / torch.clamp(mask.sum(-1).to(aligned.dtype), min=1)).detach()


def dpo_loss_from_logits(
    logits,
    labels,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    ref_logits=None,
    ignore_index=-100,
    ld_alpha=None,
    use_weighting=False,
    return_per_example=False,
    **kwargs,
):
    """logits [2B, T, V] (chosen rows first), labels [2B, T] aligned with them. Returns (loss, metrics), plus
    per_example with return_per_example, which adds logits/chosen and logits/rejected."""
    mask = labels != ignore_index
    token_logps = token_logprobs(logits, labels, ignore_index)
    weights = mask.to(token_logps.dtype) if ld_alpha is None else ld_token_weights(mask, ld_alpha).to(token_logps)
    logps = (token_logps * weights).sum(-1)
    if ref_logits is not None:
        with torch.no_grad():
            ref_logps = (token_logprobs(ref_logits, labels, ignore_index) * weights).sum(-1)
        ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2)
    lengths = mask.sum(-1)
    chosen, rejected = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    pair_weights = None
    if use_weighting:
        w = wpo_sequence_weights(token_logps, logits, mask)
        pair_weights = w.chunk(2)[0] * w.chunk(2)[1]
    loss, metrics, per_example = dpo_loss(
        chosen,
        rejected,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        pair_weights=pair_weights,
        chosen_sums=token_logps.sum(-1).chunk(2)[0],
        return_per_example=True,
        **kwargs,
    )
    if not return_per_example:
        return loss, metrics
    z = logits if logits.dtype == torch.float64 else logits.float()
    mean_logits = (z.detach().mean(-1) * mask).sum(-1) / torch.clamp(lengths.to(z.dtype), min=1)
    per_example["logits/chosen"], per_example["logits/rejected"] = mean_logits.chunk(2)
    return loss, metrics, per_example


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
    lengths=None,
    average_log_prob=False,
    clamp_kl=True,
    return_per_example=False,
):
    """(loss, metrics), plus per_example with return_per_example."""
    z0 = float(kl) if kl is not None else 0.0
    if clamp_kl:
        z0 = max(z0, 0.0)
    sums = policy_logps
    if average_log_prob:
        n = torch.clamp(lengths.to(policy_logps.dtype), min=1)
        policy_logps, ref_logps = policy_logps / n, ref_logps / n
    ratio = policy_logps - ref_logps.detach()
    per_example_loss = []
    for i in range(ratio.shape[0]):
        r = ratio[i]
        if loss_type == "kto":
            value = 1 - _sigmoid(beta * (r - z0)) if desirable[i] else 1 - _sigmoid(beta * (z0 - r))
        else:
            value = 1 - _sigmoid(beta * r) if desirable[i] else _sigmoid(beta * r)
        per_example_loss.append((desirable_weight if desirable[i] else undesirable_weight) * value)
    loss = torch.stack(per_example_loss).mean()
    rewards = (beta * ratio).detach()
    logps = policy_logps.detach()
    chosen, rejected = desirable, ~desirable
    metrics = {
        "kl": torch.tensor(z0 if loss_type == "kto" else 0.0, dtype=ratio.dtype),
        "rewards/chosen": rewards[chosen].mean(),
        "rewards/rejected": rewards[rejected].mean(),
        "logps/chosen": logps[chosen].mean(),
        "logps/rejected": logps[rejected].mean(),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    per_example = {"logps": logps, "rewards": rewards}
    if lengths is not None:
        per_example["nll"] = (-sums / torch.clamp(lengths.to(sums.dtype), min=1)).detach()
    return (loss, metrics, per_example) if return_per_example else (loss, metrics)


def discopop_loss_exact(z: float, tau: float = 0.05) -> float:
    """DiscoPOP's per-pair loss at z = beta * margin in exact arithmetic (mpmath, 60 digits)."""
    import mpmath

    with mpmath.workdps(60):
        z, tau = mpmath.mpf(z), mpmath.mpf(tau)
        s = 1 / (1 + mpmath.exp(-z / tau))
        return float((1 - s) * mpmath.log1p(mpmath.exp(-z)) + s * mpmath.exp(-z))


def discopop_grad_exact(z: float, tau: float = 0.05) -> float:
    """d/dz of `discopop_loss_exact`, by mpmath's numerical differentiation at 60 digits."""
    import mpmath

    with mpmath.workdps(60):
        f = lambda x: (  # noqa: E731
            (1 - 1 / (1 + mpmath.exp(-x / tau))) * mpmath.log1p(mpmath.exp(-x))
            + mpmath.exp(-x) / (1 + mpmath.exp(-x / tau))
        )
        return float(mpmath.diff(f, mpmath.mpf(z)))
