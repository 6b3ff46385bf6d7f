"""Vocab-parallel fused head (issue 15): the lm_head weight Shard(0) over a mesh dim named "tp", on 2 and 4 gloo
processes, against the float64 eager reference (or the unsharded op) in the same process. The checks live in
tests/vocab_parallel_worker.py (the ops, the fused losses on both strategies, the logits-path loss modules on
Shard(-1) logits); V = 37 splits unevenly (19 + 18 on 2 ranks, 10 + 10 + 10 + 7 on 4)."""

from __future__ import annotations

import pytest
import torch
from distributed import run_on_processes

import fastalign.vocab_parallel as vp

pytest.importorskip("torch.distributed.tensor")
import vocab_parallel_worker as worker  # noqa: E402


@pytest.mark.parametrize(
    ("world", "backend"),
    [(2, "kernels"), (4, "torch")],
    ids=["2-ranks-kernels", "4-ranks-torch-path"],
)
def test_ops_match_one_process(world, backend):
    # "kernels": the Triton kernels (interpreted here, as conftest sets it); "torch": the torch path forced.
    run_on_processes(worker.ops_main, world, 37, backend, world=world)


def test_fast_losses_on_a_one_rank_tp_mesh():
    run_on_processes(worker.one_rank_main, 1, 37, "torch", world=1)


@pytest.mark.parametrize("backend", ["kernels", "torch"])
def test_ops_on_a_one_rank_tp_mesh_equal_the_plain_op(backend):
    run_on_processes(worker.tp1_ops_main, 1, 37, backend, world=1)


def test_patch_causal_lm_with_colwise_parallel_head():
    pytest.importorskip("transformers")
    run_on_processes(worker.causal_lm_main, 2, world=2)


def test_not_vocab_parallel_without_a_tp_dim():
    # A plain tensor is not vocab-parallel (no process group needed to tell).
    assert vp.vocab_shard(torch.zeros(3, 2)) is None


def test_combine_needs_both_argmax_halves():
    with pytest.raises(ValueError, match="argmax_logit and argmax_index"):
        owned = torch.zeros(2, dtype=torch.bool)
        vp.combine_vocab_stats(None, torch.zeros(2), torch.zeros(2), owned, labels=owned, argmax_logit=torch.zeros(2))


def test_patch_trl_fused_head_with_colwise_parallel_head():
    pytest.importorskip("trl")
    run_on_processes(worker.trl_main, 2, world=2)
