"""Triton kernels and their launchers. Installed as ``fastalign.kernels``.

Every launcher takes plain tensors and returns plain tensors; autograd, validation and the
choice of backend live in ``fastalign``. Each kernel module also lists, in ``compile_specs()``,
the signatures and block sizes its launchers use, so ``fastalign compile-check`` can compile
exactly what runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import triton


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


@dataclass(frozen=True)
class CompileSpec:
    """One specialization of a kernel, as its launcher would launch it."""

    kernel: Any  # triton.JITFunction
    label: str  # what this specialization is for, e.g. "fwd bf16 V=128256"
    signature: dict[str, str]  # argument -> Triton type ("*bf16", "i64", "fp32") or "constexpr"
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3


Config = TypeVar("Config")
_CHOSEN: dict[tuple, Any] = {}
_TIMED_RUNS = 3


def pick_fastest(key: tuple, candidates: Sequence[Config], launch: Callable[[Config], None]) -> Config:
    """The candidate config under which `launch(config)` runs fastest on the current CUDA device.

    Timed once per `key` (the shape bucket that matters, device and dtypes included) and process, then cached.
    `launch` must only write its outputs, so that running it again is harmless. The first candidate is
    returned untimed when it is the only one and whenever timing is not possible (`_can_time`).
    """
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
