"""Runs a test body in several gloo processes on the CPU, the way the distributed tests need it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
from fast_interpreter import patch_language_once_per_launch

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


def run_script(script: Path, args: list[str], cwd: Path, ranks: int = 1) -> subprocess.CompletedProcess:
    """`python script *args` in cwd, or under torchrun with `ranks` processes (a free port) when ranks > 1, as a user
    launches accelerate/TRL on a CPU: the torch path (no TRITON_INTERPRET), one OpenMP thread per process, TRL
    quiet."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", TRL_EXPERIMENTAL_SILENCE="1")
    launcher = []
    if ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port)]
    command = [sys.executable, *launcher, str(script), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def exit_cleanly(destroy: bool) -> None:
    """Ends a rank that passed: a barrier, destroy_process_group if `destroy`, then os._exit(0).

    The barrier: no rank tears gloo down while another still has collectives in flight. os._exit: torch's DTensor
    sharding caches keep the DeviceMesh, so gloo's threads, alive past destroy_process_group (pytorch/pytorch#190489);
    still joinable when C++ static destructors run, they now and then abort interpreter shutdown after a pass (SIGABRT,
    "terminate called without an active exception"). The trainer worker passes destroy=False: after DDP training
    destroy_process_group hung at exit in CI (b6ef9af).
    """
    dist.barrier()
    if destroy:
        dist.destroy_process_group()
    sys.stdout.flush()  # os._exit skips the flush at shutdown
    sys.stderr.flush()
    os._exit(0)


def _entry(rank: int, worker: Callable[..., None], port: int, world: int, args: tuple) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":  # spawned: conftest did not run here
        patch_language_once_per_launch()
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        worker(rank, *args)
    except BaseException:
        dist.destroy_process_group()  # a failed rank releases gloo too, then raises for mp.spawn to report
        raise
    exit_cleanly(destroy=True)
