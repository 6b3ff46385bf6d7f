"""Eager IFT, written as the authors' code computes it (TsinghuaC3I/Intuitive-Fine-Tuning, src/trainers.py at
its defaults: propagation_type "loss", propagation_side "left", propagation_norm "L1").

The discounted sum is one [T, T] matrix product, obviously right and O(T^2). Computes in the log-probs'
dtype: float64 inputs give the test oracle. Where the official code divides by zero (a row with no completion
token, or sum C = 0), this returns that row's SFT value (0 for an empty row), as fastalign does.
"""

from __future__ import annotations

import torch

from fastalign.reference.logprobs import token_logprobs


def relation_weights(token_logps: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """w [B, T]: C_t * N / sum_t C_t inside the mask, 0 outside; all ones for gamma = 0."""
    mask = mask.bool()
    if gamma == 0:
        return torch.ones_like(token_logps)
    n = mask.sum(-1, keepdim=True).to(token_logps.dtype)
    item = torch.where(mask, -token_logps / n.clamp(min=1), 0.0)
    T = token_logps.shape[-1]
    k = torch.arange(T, device=token_logps.device)
    power = (k[:, None] - k[None, :]).to(token_logps.dtype)  # [k, t] = k - t
    discount = torch.where(power >= 0, gamma ** power.clamp(min=0), 0.0)
    c = torch.where(mask, item @ discount, 0.0)  # C_t = sum_{k >= t} gamma^(k - t) item_k
    total = c.sum(-1, keepdim=True)
    return torch.where(total != 0, c * n / torch.where(total != 0, total, 1.0), 1.0) * mask


def ift_loss(token_logps: torch.Tensor, mask: torch.Tensor, *, gamma: float = 0.95) -> torch.Tensor:
    mask = mask.bool()
    logps = torch.where(mask, token_logps, 0.0)
    n = mask.sum(-1).to(logps.dtype)
    weights = relation_weights(logps, mask, gamma)
    per_sequence = (-logps * weights).sum(-1) / n.clamp(min=1)
    return per_sequence.mean()


def ift_loss_from_logits(logits, labels, *, gamma=0.95, ignore_index=-100):
    return ift_loss(token_logprobs(logits, labels, ignore_index), labels != ignore_index, gamma=gamma)


def ift_inputs_embeds(embedding_weight, input_ids, predicted_ids, labels, *, lam=0.2, ignore_index=-100):
    """(1 - lam) E[y] + lam E[y'], y' = the previous position's prediction on response tokens, y elsewhere."""
    T = input_ids.shape[1]
    tokens_further = torch.cat([input_ids[:, :1], predicted_ids[:, : T - 1]], dim=1)
    ids_further = torch.where(labels == ignore_index, input_ids, tokens_further)
    embed = torch.nn.functional.embedding
    return (1 - lam) * embed(input_ids, embedding_weight) + lam * embed(ids_further, embedding_weight)
