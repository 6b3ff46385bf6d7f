"""Triton kernels and their launchers. Installed as ``fastalign.kernels``.

Every launcher takes plain tensors and returns plain tensors; autograd, validation and the
choice of backend live in ``fastalign``. Each kernel module also lists, in ``compile_specs()``,
the signatures and block sizes its launchers use, so ``fastalign compile-check`` can compile
exactly what runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

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
