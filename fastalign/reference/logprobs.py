"""Eager per-token log-probs: log_softmax in float32 (or float64 for float64 input) and a gather."""

from __future__ import annotations

import torch


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits if logits.dtype == torch.float64 else logits.float()
    # As a user writes it: no division (a [..., V] copy, and a pass in the backward) at temperature 1. The eager
    # benchmark baselines run this.
    return z if temperature == 1.0 else z / temperature


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, temperature: float = 1.0
) -> torch.Tensor:
    """logits [..., V], labels [...] -> log-probs [...]; 0.0 where label == ignore_index."""
    logp = _scaled(logits, temperature).log_softmax(-1)
    ignored = labels == ignore_index
    picked = logp.gather(-1, labels.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at every position: [..., V] -> [...]."""
    logp = _scaled(logits, temperature).log_softmax(-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)  # 0 * log 0 = 0, with a finite gradient


def token_log_sum_sq_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log(sum_v p_v^2) of softmax(logits / temperature) at every position: [..., V] -> [...]."""
    return (2 * _scaled(logits, temperature).log_softmax(-1)).logsumexp(-1)


def token_mean_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over the vocabulary of logits / temperature at every position: [..., V] -> [...]."""
    return _scaled(logits, temperature).mean(-1)
