"""The one place that decides how an op runs, plus the argument checks every op shares.

- CUDA tensors run the compiled Triton kernels.
- CPU tensors run the same Triton kernels in Triton's interpreter when TRITON_INTERPRET=1 was set
  before fastalign was imported (that is how the tests exercise the kernels).
- Any other tensor runs a chunked torch path that never builds a float32 [tokens, vocab] temporary.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from fastalign.kernels import INTERPRET

Backend = Literal["triton", "interpret", "torch"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Working-set budget of one chunk on the torch path. Chosen so a chunk's float32 temporaries
# stay in the tens of MB whatever the vocabulary size.
TORCH_CHUNK_BYTES = 32 * 2**20


_forced: Backend | None = None


def _patch_interpreter_index() -> None:
    """Triton's interpreter before 3.7 converts a scalar to a Python int with int() of its shape-(1,) numpy array,
    which numpy >= 2.4 rejects ("only 0-dimensional arrays can be converted"), so every `range(0, V, BLOCK)` over a
    runtime bound fails. Newer interpreters squeeze the array first; this does the same under numpy >= 2.4 (for them it
    is the same conversion). It only touches the interpreter: compiled kernels are unchanged."""
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.ones(1, dtype=np.int32))
        return  # numpy < 2.4: the interpreter's own conversion works
    except TypeError:
        pass
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "squeezes_index", False):
        return

    def patch_tensor_squeezing_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_tensor_squeezing_index.squeezes_index = True
    interpreter._patch_lang_tensor = patch_tensor_squeezing_index


if INTERPRET:
    _patch_interpreter_index()


def eager_under_compile(op):
    """op runs as it is under torch.compile, a graph break around it. Dynamo would otherwise trace into the
    launchers (their host syncs, the chunk loops, Triton's interpreter on the CPU, which it cannot run on fake
    tensors) and into autograd Functions whose gradients the forward computes; the kernels are fused already, so
    compiling around them loses nothing."""
    return torch.compiler.disable(op)


@contextmanager
def forced_backend(backend: Backend) -> Iterator[None]:
    """Run every op in this block on `backend` whatever the device: tests and benchmarks use it
    to reach the torch path under the interpreter, or on a GPU."""
    global _forced
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous


def backend_for(tensor: torch.Tensor) -> Backend:
    if _forced is not None:
        return _forced
    if tensor.device.type == "cuda":
        return "triton"
    if tensor.device.type == "cpu" and INTERPRET:
        return "interpret"
    return "torch"


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast(device.type, enabled=False), or nothing for meta tensors (shape inference), which have no
    autocast state: torch raises on it."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


def check_float(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16; got {tensor.dtype}")


def check_labels(
    name: str, labels: torch.Tensor, shape: torch.Size, device: torch.device, what: str, on: str = "the logits"
) -> None:
    """labels must be an integer tensor of `shape` on `device`; `what` names where the shape comes from, `on` the
    tensor whose device it is."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64); got {labels.dtype}")
    if labels.shape != shape:
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)}; got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} must be on the same device as {on} ({device}); got {labels.device}")


def check_label_range(name: str, labels: torch.Tensor, vocab: int, ignore_index: int | None) -> None:
    """Raises on a label outside [0, vocab) that is not ignore_index (None: every id counts). Syncs with the
    device."""
    if labels.numel() == 0:
        return
    if labels.dtype not in (torch.int32, torch.int64):  # in int8/uint8/int16, -100 and V would wrap (-100 -> 156)
        labels = labels.long()
    ids = labels if ignore_index is None else labels.masked_fill(labels == ignore_index, 0)
    low, high = torch.aminmax(ids)  # one pass and one sync; the mask of bad ids only on the way to the error
    if low < 0 or high >= vocab:
        bad = (ids < 0) | (ids >= vocab)
        raise label_range_error(name, labels, bad, vocab, ignore_index)


def label_range_error(
    name: str, labels: torch.Tensor, bad: torch.Tensor, vocab: int, ignore_index: int | None
) -> ValueError:
    """The error for the first label that `bad` (a bool mask over labels) marks as outside [0, vocab)."""
    first = labels[bad][0].item()
    allowed = "" if ignore_index is None else f" and not ignore_index={ignore_index}"
    return ValueError(f"{name} holds {first}, outside [0, {vocab}){allowed}")


# The options' numbers are passed on as Python floats and ints: a kernel takes them as scalar arguments, which a
# NumPy scalar is not (the interpreter fails on it), and torch ops promote them as Python numbers.


def check_real(name: str, value, expected: str = "a real number") -> float:
    """value (a real number, Python's or NumPy's) as a float; TypeError naming `name` otherwise."""
    # bool is a numbers.Real: temperature=True would silently be 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}; got {type(value).__name__} {value!r}")
    return float(value)


def check_int(name: str, value, expected: str = "an int") -> int:
    """value (an integer, Python's or NumPy's) as an int; TypeError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}; got {type(value).__name__} {value!r}")
    return int(value)


# float32's smallest normal number: 1 / x overflows float32 below it (the kernels divide by a temperature in
# float32, and a temperature of 1e-39 gave NaN log-probs).
FLOAT32_TINY = torch.finfo(torch.float32).tiny


def check_positive(name: str, value: float) -> float:
    """value as a float, finite and at least float32's smallest normal number."""
    number = check_real(name, value, "a finite number > 0")
    if not 0 < number < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    if number < FLOAT32_TINY:
        raise ValueError(
            f"{name} must be at least float32's smallest normal number {FLOAT32_TINY} (its reciprocal overflows "
            f"float32 below it); got {value!r}"
        )
    return number


def check_values(name: str, x: torch.Tensor, ok: torch.Tensor, expected: str) -> torch.Tensor:
    """x, whose values `ok` (a bool tensor like x) marks as valid. On the CPU a bad value raises ValueError. On an
    accelerator a check would sync with the host at every training step, so a bad value becomes NaN instead, which
    the loss then shows (meta tensors hold no values)."""
    if x.device.type == "cpu":
        if not ok.all():
            raise ValueError(f"{name} must be {expected}; got {x[~ok].flatten()[0].item()}")
        return x
    return x if x.device.type == "meta" else torch.where(ok, x, math.nan)


def check_flag(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}")


def check_ignore_index(ignore_index: int) -> int:
    """ignore_index as an int: bool is refused (ignore_index=True would ignore every label 1), and it must fit the
    labels' int64."""
    ignore_index = check_int("ignore_index", ignore_index)
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, as the labels; got {ignore_index}")
    return ignore_index


SECOND_ORDER = (
    "fastalign's ops compute their gradients with kernels and in-place writes, which autograd cannot differentiate: "
    "a gradient of their gradient (a backward with create_graph=True, then one through its result) is not supported"
)


class _SecondOrderRefused(torch.autograd.Function):
    """Links a first-order gradient to the op's inputs, so that a backward through it reaches this node and raises
    wherever it would otherwise take a gradient to the inputs without our op's term."""

    @staticmethod
    def forward(ctx, n_grads, *grads_then_inputs):
        return tuple(g.view_as(g) for g in grads_then_inputs[:n_grads])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(SECOND_ORDER)


def first_order_only(backward):
    """Decorates an autograd.Function's backward: it runs without a graph, and under create_graph=True its
    gradients hang off a node that raises when a second backward reaches it. That node links them to the tensors
    the forward saved that require grad (its inputs); a Function that saved none refuses create_graph=True at once.
    (torch's once_differentiable links nothing: a second order of a composite, say a gradient of the lm_head weight
    through d hidden = d logits @ W, would silently lack our op's term.)"""

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():
            return grads
        sources = [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
        if not sources:
            raise RuntimeError(SECOND_ORDER)
        grads = list(grads) if isinstance(grads, tuple) else [grads]
        at = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor) and g.dtype.is_floating_point]
        linked = _SecondOrderRefused.apply(len(at), *(grads[i].detach() for i in at), *sources)
        for i, g in zip(at, linked):
            grads[i] = g
        return tuple(grads) if len(grads) > 1 else grads[0]

    return wrapper


def as_btv(x: torch.Tensor) -> torch.Tensor:
    """A [B, T, V] view of an [..., V] tensor, copying only when no such view exists.

    Kernels address row r at (r // T) * stride(0) + (r % T) * stride(1), so a sliced
    `logits[:, :-1]` (not viewable as [N, V]) still needs no copy.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    V = x.shape[-1]
    # Merge adjacent leading dims whose strides line up; size-1 dims merge with anything.
    dims: list[list[int]] = []  # [size, stride]
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = [dims[-1][0] * size, stride]
        else:
            dims.append([size, stride])
    if not dims:
        dims = [[1, V]]
    if len(dims) > 2:
        return x.contiguous().view(1, -1, V)
    if len(dims) == 1:
        dims.insert(0, [1, dims[0][0] * dims[0][1]])
    (B, stride_b), (T, stride_t) = dims
    return x.as_strided((B, T, V), (stride_b, stride_t, 1))


def row_chunks(B: int, T: int, rows: int) -> Iterator[tuple[int, int, tuple[slice, slice]]]:
    """Splits the rows of a [B, T, ...] tensor into chunks of at most `rows` rows, in order: yields (first row, row
    count, index), with `x[index]` the chunk's [b, t, ...] view. Whole sequences go together when they fit (few
    Python steps for short ones), else pieces of one."""
    if B * T == 0:
        return
    if T <= rows:
        step = rows // T
        for b0 in range(0, B, step):
            yield b0 * T, min(step, B - b0) * T, (slice(b0, b0 + step), slice(None))
        return
    for b in range(B):
        for t0 in range(0, T, rows):
            yield b * T + t0, min(rows, T - t0), (slice(b, b + 1), slice(t0, t0 + rows))
