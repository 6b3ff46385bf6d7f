"""OnlineMergeAdamW under FSDP2 and flat partitions on 2 gloo processes equals 1 process, bit for
bit, for both methods (uneven and empty shards included), and survives a distributed checkpoint,
also when built before the model was sharded (accelerate's order). The work happens in
tests/optim_fsdp_worker.py."""

from __future__ import annotations

import optim_fsdp_worker
import pytest
from distributed import run_on_processes


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_two_processes_equal_one(backend, tmp_path, device):
    if device.type != "cpu":
        pytest.skip("gloo on the CPU")
    run_on_processes(optim_fsdp_worker.main, str(tmp_path), backend, list(optim_fsdp_worker.CASES))


@pytest.mark.parametrize("world", [1, 2])
def test_optimizer_built_before_accelerate_shards_the_model(world, tmp_path, device):
    """The HF Trainer's order: OnlineMergeAdamW on the whole model, then accelerate's FSDP2 prepare
    swaps its parameters for the sharded DTensors (issue 16). Steps and a checkpoint round trip
    must equal one unsharded process."""
    if device.type != "cpu":
        pytest.skip("gloo on the CPU")
    pytest.importorskip("accelerate")
    run_on_processes(optim_fsdp_worker.main, str(tmp_path), "kernel", ["ondare", "onties"], True, world=world)


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_2d_meshes_equal_one_process(backend, tmp_path, device):
    """FSDP x TP (_StridedShard and Shard(0) x Shard(1) parameters) and HSDP (Replicate x Shard)
    on a 2x2 mesh of 4 gloo processes equal one process bit for bit, with many exact ties at the
    TIES threshold, and resume from a distributed checkpoint (issue 15)."""
    if device.type != "cpu":
        pytest.skip("gloo on the CPU")
    run_on_processes(optim_fsdp_worker.main_mesh, str(tmp_path), backend, ["fsdp-tp", "hsdp"], world=4)
