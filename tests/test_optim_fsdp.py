"""OnlineMergeAdamW under FSDP2 and flat partitions on 2 gloo processes equals 1 process, bit for
bit, for both methods (uneven and empty shards included), and survives a distributed checkpoint.
The work happens in tests/optim_fsdp_worker.py."""

from __future__ import annotations

import socket

import optim_fsdp_worker
import pytest
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_two_processes_equal_one(backend, tmp_path, device):
    if device.type != "cpu":
        pytest.skip("gloo on the CPU")
    mp.spawn(
        optim_fsdp_worker.main,
        args=(_free_port(), str(tmp_path), backend, list(optim_fsdp_worker.CASES)),
        nprocs=2,
    )
