"""Trains a patched tiny Llama under DeepSpeed ZeRO-3 on 2 gloo processes (DeepSpeed's CPU accelerator), each rank
on its own half of every batch, and checks every parameter's update against the stock model trained without
DeepSpeed on the whole batch with the loss in eager PyTorch (tests/test_integrations_distributed.py):

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/deepspeed_worker.py CASE tied|untied

CASE: "sft" (the patched model's own loss: log-probs from linear_token_stats, whose backward needs the weight that
ZeRO-3 releases after the forward and gathers again for lm_head's backward), or "dpo-fast" (the DPO loss computed
inside lm_head's call on the fast strategy, which takes the weight's gradient in the forward, as fastalign's
DPOTrainer does). ZeRO-3 partitions every parameter (persistence threshold 0), gathers it for each module's forward
and backward, and reduce-scatters the gradients, averaged over the ranks. SGD keeps the comparison exact up to the
order of the sums.
"""

from __future__ import annotations

import copy
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the torch path, as a CPU user runs it
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from distributed import exit_cleanly  # noqa: E402  (this script's directory is on sys.path)

CASES = ("sft", "dpo-fast")
STEPS, LR, BETA = 3, 0.5, 0.5
ROWS, T = 4, 12  # per rank and step: 2 pairs for DPO, the chosen rows first


def batch(step: int, rank: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, reference log-probs [ROWS]) of one rank at one step; the prompt (first 4 tokens) and a
    ragged tail are not scored."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(3, vocab, (ROWS, T), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, T - 3 :] = -100
    return ids, labels, -20.0 * torch.rand(ROWS, generator=g)


def fastalign_loss(model, case: str, ids, labels, ref) -> torch.Tensor:
    if case == "sft":
        return model(input_ids=ids, labels=labels).loss
    from fastalign.linear_losses import dpo_objective

    def objective(shifted_labels):
        return dpo_objective(shifted_labels != -100, ref[: ROWS // 2], ref[ROWS // 2 :], beta=BETA)

    return model(input_ids=ids, labels=labels, fused_objective=objective, fused_strategy="fast").loss_outputs[0]


def eager_loss(model, case: str, ids, labels, ref) -> torch.Tensor:
    """The stock model's loss ("sft"), or the eager DPO reference (fastalign.reference) on its logits."""
    if case == "sft":
        return model(input_ids=ids, labels=labels).loss
    from fastalign.reference.dpo import dpo_loss_from_logits

    logits = model(input_ids=ids).logits[:, :-1].float()
    return dpo_loss_from_logits(logits, labels[:, 1:], ref[: ROWS // 2], ref[ROWS // 2 :], beta=BETA)[0]


def main(case: str, tied: bool) -> None:
    import deepspeed
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastalign.integrations import patch_causal_lm

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tied,
    )  # fmt: skip
    reference = LlamaForCausalLM(config)
    model = patch_causal_lm(copy.deepcopy(reference))
    initial = {name: p.detach().clone() for name, p in reference.named_parameters()}
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_config = {
        "train_micro_batch_size_per_gpu": ROWS,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # (DeepSpeed clips at 1.0 by default)
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    head = engine.module.lm_head.weight
    assert head.ds_tensor.numel() < head.ds_numel, "ZeRO-3 did not partition the head"
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    for step in range(STEPS):
        engine.backward(fastalign_loss(engine, case, *batch(step, rank, config.vocab_size)))
        engine.step()
        # Without DeepSpeed: the mean of every rank's loss, so the gradient is the ranks' average, as ZeRO's.
        reference_optimizer.zero_grad()
        losses = [eager_loss(reference, case, *batch(step, r, config.vocab_size)) for r in range(world)]
        (sum(losses) / world).backward()
        reference_optimizer.step()

    # Each parameter's update (what the gradients made of it) within 1e-4 of its norm: the sums run in another order.
    expected = dict(reference.named_parameters())
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            update, expected_update = p.data - initial[name], expected[name].data - initial[name]
            assert expected_update.norm() > 0, f"{name} did not move"
            error = (update - expected_update).norm() / expected_update.norm()
            assert error < 1e-4, f"{name}: the update is {error:.1e} of its norm off the run without DeepSpeed"
    print(f"rank {rank}: {case} tied={tied}: every update equals the run without DeepSpeed")
    exit_cleanly(destroy=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in CASES or sys.argv[2] not in ("tied", "untied"):
        sys.exit(f"usage: deepspeed_worker.py {'|'.join(CASES)} tied|untied")
    main(sys.argv[1], sys.argv[2] == "tied")
