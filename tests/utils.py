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


def assert_norm_close(actual, expected, rtol, floor, what):
    """||actual - expected|| <= rtol ||expected|| + floor (an absolute floor for values at fp32's resolution)."""
    error = (actual.double() - expected.double()).norm().item()
    assert error <= rtol * expected.double().norm().item() + floor, (what, error, expected.double().norm().item())


# TrainingArguments of the tests' short CPU runs: every step logged, nothing saved or reported, float32, seeded.
QUIET_TRAINING = dict(
    logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, bf16=False, seed=0
)


def training_args(cls, out, steps=8, lr=5e-3, batch=4, **extra):
    """cls (transformers.TrainingArguments or a TRL config) for a short CPU run writing into out."""
    return cls(
        output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr, **QUIET_TRAINING,
        **extra,
    )  # fmt: skip
