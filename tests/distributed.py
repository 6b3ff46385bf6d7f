"""Runs a test body in 2 gloo processes on the CPU, the way the FSDP2 tests need it."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def run_on_two_processes(worker: Callable[..., None], *args) -> None:
    """Calls worker(rank, *args) in each of 2 processes joined in a gloo group; raises if either fails.

    worker must be a module-level function (spawn pickles it by name). Children inherit the
    environment, so TRITON_INTERPRET from conftest makes them run the interpreted kernels too.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(worker, port, args), nprocs=WORLD)


def _entry(rank: int, worker: Callable[..., None], port: int, args: tuple) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
    try:
        worker(rank, *args)
        dist.barrier()  # no rank tears gloo down while the other still has collectives in flight
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter shutdown: gloo's threads can still be joinable when C++ static destructors
    # run and abort the process ("terminate called without an active exception") after a pass.
    os._exit(0)
