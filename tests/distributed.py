"""Runs a test body in several gloo processes on the CPU, the way the distributed tests need it."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2  # the default number of processes


def run_on_processes(worker: Callable[..., None], *args, world: int = WORLD) -> None:
    """Calls worker(rank, *args) in each of `world` processes joined in a gloo group; raises if any fails.

    worker must be a module-level function (spawn pickles it by name). Children inherit the
    environment, so TRITON_INTERPRET from conftest makes them run the interpreted kernels too.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(worker, port, world, args), nprocs=world)


def _entry(rank: int, worker: Callable[..., None], port: int, world: int, args: tuple) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        worker(rank, *args)
        dist.barrier()  # no rank tears gloo down while another still has collectives in flight
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter shutdown: gloo's threads can still be joinable when C++ static destructors
    # run and abort the process ("terminate called without an active exception") after a pass.
    os._exit(0)
