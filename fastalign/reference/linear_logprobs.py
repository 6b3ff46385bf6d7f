"""Eager log-probs from hidden states: the full [..., V] logits through F.linear, then log_softmax + gather.

With float64 inputs everything runs in float64 (the test oracle). Otherwise the projection runs in the
inputs' dtype, as a model's lm_head does, and the softmax in float32 (the "eager" benchmark baseline).
"""

from __future__ import annotations

import torch

from fastalign.reference import logprobs as ref


def linear_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap) / temperature, in float32 or float64."""
    z = torch.nn.functional.linear(hidden, weight, bias)
    z = z if z.dtype == torch.float64 else z.float()
    # The identity options cost nothing, as in a user's code (each would be a [..., V] copy, and a backward pass, in
    # the eager benchmark baselines that run this).
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z if temperature == 1.0 else z / temperature


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """hidden [..., H], weight [V, H], labels [...] -> log-probs [...]; 0.0 where label == ignore_index."""
    z = linear_logits(hidden, weight, bias, temperature, softcap, logit_scale)
    return ref.token_logprobs(z, labels, ignore_index)


def linear_token_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """Entropy of the softmax of the transformed logits at every position: [..., H] -> [...]."""
    return ref.token_entropy(linear_logits(hidden, weight, bias, temperature, softcap, logit_scale))


def linear_token_extras(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log(sum_v p_v^2), mean_v z) of the transformed logits z at every position: [..., H] -> two [...]."""
    z = linear_logits(hidden, weight, bias, temperature, softcap, logit_scale)
    return torch.logsumexp(2 * torch.log_softmax(z, -1), -1), z.mean(-1)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    **head,
) -> torch.Tensor:
    """F.cross_entropy of the transformed logits; "mean" divides by the count of labels that are not ignore_index,
    clamped to >= 1 (0 for a batch with none, where F.cross_entropy gives NaN)."""
    z = linear_logits(hidden, weight, bias, **head)
    per_token = torch.nn.functional.cross_entropy(
        z.flatten(0, -2), labels.flatten(), ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    ).view(labels.shape)
    if reduction == "none":
        return per_token
    total = per_token.sum()
    return total / (labels != ignore_index).sum().clamp(min=1) if reduction == "mean" else total
