"""Triton kernels and their launchers. Installed as ``fastalign.kernels``.

Every launcher takes plain tensors and returns plain tensors; autograd, validation and the
choice of backend live in ``fastalign``. Each kernel module also lists, in ``compile_specs()``,
calls of its own launchers at named shapes (`LaunchCase`); ``fastalign compile-check`` runs them on
meta tensors, records every kernel launch and compiles exactly the specialization Triton builds for it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import triton


def _hand_over_the_top_level_name() -> None:
    """Imported as top-level ``kernels``, this folder hides the ``kernels`` distribution (Hugging Face's hub
    kernels) that transformers imports, whenever a checkout's root is on sys.path: ``python -m``/``-c`` or
    ``PYTHONPATH=.`` there. transformers >= 5.25 then fails on ``from kernels import CUDAProperties``, so the
    name goes to that distribution when it is installed. Without it this module stays, and lacking a
    ``__version__`` it reads as unavailable to transformers."""
    import importlib.machinery
    import importlib.util
    import sys

    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != checkout]
    spec = importlib.machinery.PathFinder.find_spec(__name__, elsewhere)
    if spec is None or spec.loader is None:
        return
    ours = sys.modules[__name__]
    sys.modules[__name__] = module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules[__name__] = ours
        raise


if __name__ == "kernels":
    _hand_over_the_top_level_name()


def _interpreting() -> bool:
    # Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this package is imported.
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRET: bool = _interpreting()
"""True when the kernels in this package run in Triton's CPU interpreter."""

AUTOTUNE: bool = not INTERPRET and os.environ.get("FASTALIGN_AUTOTUNE", "1") != "0"
"""Whether launchers with several candidate launch configs time them on the GPU; FASTALIGN_AUTOTUNE=0 keeps the
first candidate of each, for runs that must be bitwise reproducible across processes."""

TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64"}


Launcher = TypeVar("Launcher", bound=Callable[..., Any])


def on_tensors_device(launcher: Launcher) -> Launcher:
    """Runs `launcher` with the device of its first tensor argument current. Triton launches a kernel (and
    `pick_fastest` times it) on the current CUDA device, not on its tensors' one: a model split across GPUs
    (transformers' device_map="auto", its head on cuda:1 while cuda:0 is current) would run the kernel on cuda:0
    with cuda:1's pointers. Every launcher of this package wears it."""

    @functools.wraps(launcher)
    def on_device(*args, **kwargs):
        tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if tensor is None or tensor.device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(tensor.device):
            return launcher(*args, **kwargs)

    return on_device  # type: ignore[return-value]


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor without storage (device "meta") for `LaunchCase`s: launchers run on it and allocate nothing.

    Its data_ptr() is 0 (16-byte aligned) plus its storage offset, so a sliced view is as aligned as on a GPU."""
    return torch.empty(shape, dtype=dtype, device="meta")


@dataclass(frozen=True)
class LaunchCase:
    """Calls of a kernel module's launchers at one named shape, for `fastalign compile-check`.

    `launch` calls the launchers on `meta` tensors; compile-check records each kernel launch (arguments, grid,
    warps, stages) and compiles the specialization Triton builds from those arguments. A case at a target size
    also gives the op's floor (`bytes` it must move, or `flops` it must do) and, per kernel it launches, the trip
    counts of the kernel's loop nest per program (outermost first) as a function of the launch's arguments; from
    those and the SASS, compile-check predicts the % of the ceiling (see fastalign/compile_check.py) and fails
    below `target`. A kernel whose stores inside its loops are masked by the data (a compaction writes only the keys
    it keeps) names in `store_share` the share of lanes they write, as a function of the launch's arguments; it
    applies to its predicated in-loop stores, not to its unpredicated streaming ones.
    """

    label: str  # e.g. "fwd bf16 N=16384 V=128256"
    launch: Callable[[], Any]
    bytes: int = 0
    flops: int = 0
    target: float | None = None  # least predicted % of the ceiling on an H100
    trips: dict[str, Callable[[dict[str, Any]], tuple[int, ...]]] = field(default_factory=dict)
    store_share: dict[str, Callable[[dict[str, Any]], float]] = field(default_factory=dict)


Config = TypeVar("Config")
_CHOSEN: dict[tuple, Any] = {}
_TIMED_RUNS = 3
# Set by compile-check while it records launches: `pick_fastest` hands it the launch and the candidates it would time
# besides the first.
_LAUNCH_OTHER_CANDIDATES: Callable[[Callable[[Any], None], Sequence[Any]], None] | None = None


def pick_fastest(key: tuple, candidates: Sequence[Config], launch: Callable[[Config], None]) -> Config:
    """The candidate config under which `launch(config)` runs fastest on the current CUDA device.

    Timed once per `key` (the shape bucket that matters, device and dtypes included) and process, then cached.
    `launch` must only write its outputs, so that running it again is harmless. The first candidate is
    returned untimed when it is the only one and whenever timing is not possible (`_can_time`).
    """
    if _LAUNCH_OTHER_CANDIDATES is not None:  # compile-check: every candidate must compile
        _LAUNCH_OTHER_CANDIDATES(launch, candidates[1:])
    if len(candidates) == 1 or not _can_time():
        return candidates[0]
    if key not in _CHOSEN:
        times = [_time_ms(launch, config) for config in candidates]
        _CHOSEN[key] = candidates[times.index(min(times))]
    return _CHOSEN[key]


def tuned_configs() -> dict[str, str]:
    """What `pick_fastest` chose in this process, key -> config, as text (the benchmark records it)."""
    return {" ".join(map(str, key)): str(config) for key, config in _CHOSEN.items()}


def _can_time() -> bool:
    """Not under the interpreter or with FASTALIGN_AUTOTUNE=0, and not while a CUDA graph is being captured (timing
    synchronizes)."""
    return AUTOTUNE and torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing()


def _time_ms(launch: Callable[[Config], None], config: Config) -> float:
    try:
        launch(config)  # compiles and warms up
    except triton.runtime.errors.OutOfResources:  # more shared memory than this device has
        return float("inf")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(_TIMED_RUNS):
        launch(config)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / _TIMED_RUNS
