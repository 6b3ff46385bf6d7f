"""Worker of tests/test_linear_logprobs.py::test_fsdp2: one of two gloo processes on the CPU.

A tiny causal LM runs under FSDP2 (fully_shard) two ways:
- "dtensor": the lm_head is its own FSDP unit and the loss reads its weight outside its forward, so the weight
  is a sharded DTensor that linear_token_logprobs gathers (once per call);
- "tied": the lm_head is tied to the input embedding, both in the root unit, as transformers models are wrapped
  (after the root's forward FSDP2 leaves them unsharded).
The loss, and every gradient, must match the same model in one process fed both ranks' batches, with FSDP2's
gradient averaging. `losses_main` runs the fused-linear losses (DPO, KTO, IFT, cross-entropy) on the "dtensor"
layout, on both strategies.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from fastalign import linear_token_logprobs
from fastalign._backend import forced_backend
from fastalign.linear_losses import (
    cross_entropy_from_hidden,
    dpo_loss_from_hidden,
    ift_loss_from_hidden,
    kto_loss_from_hidden,
)

V, H, B, T = 301, 32, 2, 9


class TinyLM(torch.nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(V, H)
        self.body = torch.nn.Linear(H, H)
        self.lm_head = torch.nn.Linear(H, V, bias=not tied)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return torch.tanh(self.body(self.embed(ids)))


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, V, (B, T), generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[:, :3] = -100
    return ids, labels


def loss_of(model: TinyLM, rank: int) -> torch.Tensor:
    ids, labels = batch(rank)
    logp = linear_token_logprobs(model(ids), model.lm_head.weight, labels, model.lm_head.bias)
    return -logp.sum() / (labels != -100).sum()


def fused_loss(name: str, strategy: str):
    """loss_of(model, rank) for one fused-linear loss on the rank's batch."""
    ref_logps = torch.full((B,), -20.0)

    def loss_of(model: TinyLM, rank: int) -> torch.Tensor:
        ids, labels = batch(rank)
        head = (model(ids), model.lm_head.weight, labels)
        kwargs = {"bias": model.lm_head.bias, "strategy": strategy}
        if name == "dpo":
            half = {"ref_chosen_logps": ref_logps[: B // 2], "ref_rejected_logps": ref_logps[B // 2 :]}
            return dpo_loss_from_hidden(*head, **kwargs, **half)[0]
        if name == "kto":
            desirable = torch.tensor([True, False])
            return kto_loss_from_hidden(*head, desirable, **kwargs, ref_logps=ref_logps, kl=0.1)[0]
        if name == "ift":
            return ift_loss_from_hidden(*head, **kwargs)
        return cross_entropy_from_hidden(*head, **kwargs)[0]

    return loss_of


def main(rank: int, backend: str) -> None:
    with forced_backend("torch") if backend == "torch" else contextlib.nullcontext():
        for layout in ("dtensor", "tied"):
            check(rank, layout)


def losses_main(rank: int) -> None:
    for name in ("dpo", "kto", "ift", "ce"):
        for strategy in ("fast", "lean"):
            check(rank, "dtensor", fused_loss(name, strategy))


def check(rank: int, layout: str, loss_of=loss_of) -> None:
    """One layout: the sharded model's loss and gradients against the same model in one process."""
    torch.manual_seed(0)
    reference = TinyLM(tied=layout == "tied")
    sharded = TinyLM(tied=layout == "tied")
    sharded.load_state_dict(reference.state_dict())
    # One process, both batches: FSDP2 averages gradients over the ranks.
    (sum(loss_of(reference, r) for r in range(2)) / 2).backward()

    if layout == "dtensor":
        fully_shard(sharded.lm_head)
    fully_shard(sharded)
    gathers = []
    full_tensor = DTensor.full_tensor
    DTensor.full_tensor = lambda self, **kw: gathers.append(self.shape) or full_tensor(self, **kw)
    try:
        loss = loss_of(sharded, rank)
        loss.backward()
    finally:
        DTensor.full_tensor = full_tensor
    # "dtensor": the lm_head's forward never ran, so the loss got its sharded weight and bias and gathered
    # each once. "tied": the root's forward left them unsharded, plain tensors.
    assert gathers == ([(V, H), (V,)] if layout == "dtensor" else []), gathers

    expected_loss = loss_of(reference, rank).detach()
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-5, atol=1e-6)
    ref_params = dict(reference.named_parameters())
    for name, param in sharded.named_parameters():
        grad = param.grad.full_tensor()
        torch.testing.assert_close(grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
