"""Helpers shared by the tests."""

from __future__ import annotations

import torch

# Relative-norm tolerances ||a - b|| / ||b|| against the float64 reference, for values and for
# gradients written in each dtype (the gradient's own rounding dominates; fp32 allows for the
# summation error of torch's CPU log_softmax over 128k-token vocabularies).
VALUE_RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
GRAD_RTOL = {torch.float32: 3e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()
