"""The transformers patch, and TRL's fused head under patch_trl(), on an FSDP2-sharded model: 2 gloo processes on
the CPU (kernels interpreted) give the loss and the gradients of one unsharded process over the whole batch."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
from distributed import WORLD, run_on_processes

import fastalign

pytest.importorskip("transformers")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6", allow_module_level=True)

GRAD_RTOL = 1e-4


def _worker(rank: int, head_unit: bool) -> None:
    from fastalign.integrations import patch_causal_lm
    from fastalign.integrations.tiny import build_tokenizer, load_preferences, tiny_llama

    rows = load_preferences()
    tok = build_tokenizer(rows)
    enc = tok([r["prompt"] + r["chosen"] for r in rows[: 2 * WORLD]], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    total = (labels[:, 1:] != -100).sum()
    model = tiny_llama(tok, hidden_size=32, seed=0)

    reference = patch_causal_lm(copy.deepcopy(model))  # one process, the whole batch
    expected = reference(**enc, labels=labels, num_items_in_batch=total)
    expected.loss.backward()

    for layer in model.model.layers:
        fsdp.fully_shard(layer)
    if head_unit:  # the head is its own FSDP unit: sharded outside its own call
        fsdp.fully_shard(model.lm_head)
    fsdp.fully_shard(model)
    patch_causal_lm(model)
    mine = slice(2 * rank, 2 * rank + 2)
    # FSDP averages gradients over ranks, so each rank's loss is scaled by WORLD / total.
    out = model(
        input_ids=enc["input_ids"][mine],
        attention_mask=enc["attention_mask"][mine],
        labels=labels[mine],
        num_items_in_batch=total / WORLD,
    )
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    assert torch.allclose(loss / WORLD, expected.loss, rtol=1e-5), (loss / WORLD, expected.loss)
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        grad = param.grad.full_tensor()
        err = ((grad - ref.grad).norm() / ref.grad.norm()).item()
        assert err < GRAD_RTOL, f"rank {rank}: {name} gradient off by {err:.2e}"


@pytest.mark.parametrize("head_unit", [False, True], ids=["head-in-root-unit", "head-own-unit"])
def test_fsdp2_sharded_model_matches_one_process(head_unit):
    # Children inherit TRITON_INTERPRET from conftest, so they run the interpreted kernels too.
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    run_on_processes(_worker, head_unit)


def _trl_worker(rank: int) -> None:
    """TRL's own head on one unsharded process is the reference; fastalign's, under patch_trl(), runs sharded."""
    import trl.trainer.utils as trl_utils

    from fastalign.integrations import patch_trl
    from fastalign.integrations.tiny import build_tokenizer, load_preferences, tiny_llama

    torch.set_num_threads(1)
    runs = []
    linear_token_stats = fastalign.linear_token_stats
    fastalign.linear_token_stats = lambda *args, **kwargs: runs.append(1) or linear_token_stats(*args, **kwargs)
    rows = load_preferences()
    tok = build_tokenizer(rows)
    enc = tok([r["prompt"] + r["chosen"] for r in rows[: 2 * WORLD]], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    total = (labels[:, 1:] != -100).sum()
    model = tiny_llama(tok, hidden_size=32, seed=0)
    trl_utils.add_fused_lm_head(model, temperature=0.8, outputs=("log_probs", "entropy"))

    reference = copy.deepcopy(model)
    expected = reference(**enc, labels=labels, num_items_in_batch=total, fused_lm_head=True)
    (expected.loss + 0.1 * expected.entropy.sum() / total).backward()
    assert not runs

    for layer in model.model.layers:
        fsdp.fully_shard(layer)
    fsdp.fully_shard(model)  # the head in the root unit, as accelerate's transformer auto-wrap leaves it
    patch_trl()
    mine = slice(2 * rank, 2 * rank + 2)
    out = model(
        input_ids=enc["input_ids"][mine],
        attention_mask=enc["attention_mask"][mine],
        labels=labels[mine],
        num_items_in_batch=total / WORLD,  # FSDP averages gradients over ranks
        fused_lm_head=True,
    )
    (out.loss + 0.1 * out.entropy.sum() * WORLD / total).backward()
    assert len(runs) == 1
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    assert torch.allclose(loss / WORLD, expected.loss, rtol=1e-5), (loss / WORLD, expected.loss)
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        err = ((param.grad.full_tensor() - ref.grad).norm() / ref.grad.norm()).item()
        assert err < GRAD_RTOL, f"rank {rank}: {name} gradient off by {err:.2e}"


def test_fsdp2_trl_head_under_patch_trl_matches_trls_own_path_on_one_process():
    pytest.importorskip("trl")
    run_on_processes(_trl_worker)
