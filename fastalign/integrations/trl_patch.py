"""One line for every stock TRL trainer: `patch_trl()` runs TRL's per-token log-prob math on fastalign's ops.

TRL 1.16's SFT, DPO, KTO, GRPO and RLOO trainers install `trl.trainer.utils.add_fused_lm_head` on their
models; its forward calls `_ChunkedLogProbFunction.apply(...)`, a name it looks up in `trl.trainer.utils` on
every call. Replacing that one name moves every fused head onto `fastalign.linear_token_stats`, for trainers
(and heads) created before or after the patch, while TRL keeps everything around it: the backbone call, the
label shift and masking, FSDP2's weight gather, PEFT's unwrapping, the loss and the metrics.

Under tensor parallelism (`ColwiseParallel` on lm_head: the weight a DTensor Shard(0) on the mesh dim "tp"), TRL's
forward would gather the weight (`full_tensor()`, V x H per call) before calling the head; the patch rebinds
`trl.trainer.utils.DTensor`, the one name that check reads, to a class no vocab-parallel weight is an instance of,
so the sharded weight reaches `fastalign.linear_token_stats`, which runs on each rank's slice of the vocabulary
(fastalign.vocab_parallel). Every other DTensor (FSDP2's) is gathered by TRL as before.

The logits helpers `selective_log_softmax`, `entropy_from_logits` and `selective_log_softmax_and_entropy`
(TRL's experimental trainers import them by name) are rebound in every loaded `trl` module to versions on
`fastalign.token_stats`; `trl` modules imported later pick the new ones up from `trl.trainer.utils`.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Any

import torch

import fastalign
from fastalign.integrations.causal_lm import IGNORE_INDEX

_HEAD_NAME = "_ChunkedLogProbFunction"  # in trl.trainer.utils, looked up by add_fused_lm_head's forward
_DTENSOR_NAME = "DTensor"  # in trl.trainer.utils: add_fused_lm_head's forward gathers an instance's full_tensor()
_LOGITS_FUNCTIONS = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")
_FASTALIGN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_originals: dict[str, Any] = {}  # name -> TRL's object, while patched
_replacements: dict[str, Any] = {}  # name -> fastalign's stand-in, while patched


def _trl_utils():
    import trl.trainer.utils

    return trl.trainer.utils


def _trl_modules() -> list:
    return [m for name, m in list(sys.modules.items()) if m is not None and (name == "trl" or name.startswith("trl."))]


def _rebind(old: Any, new: Any) -> None:
    """Point every name bound to `old` in a loaded trl module at `new` (trainers import the helpers by name)."""
    for module in _trl_modules():
        for name, value in list(vars(module).items()):
            if value is old:
                setattr(module, name, new)


# ---------------------------------------------------------------------------------------------- fused head


class _FusedHead:
    """Stands in for `trl.kernels.ChunkedLogProbFunction` where `add_fused_lm_head`'s forward calls it."""

    @staticmethod
    def apply(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"),
    ):
        """TRL's contract: hidden [N, H], weight [V, H], bias [V] or None, targets [N] in [0, V). Returns
        float32 (log_probs, entropy, log_sum_sq_probs, mean_logits) and bool is_top1, each [N] or None when not in
        `outputs`; log_probs and entropy differentiable."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            # ZeRO-3 re-partitions the weight after the forward; TRL's backward gathers it again, ours cannot.
            _warn_once("DeepSpeed ZeRO-3: TRL's fused head keeps running on TRL's own kernel under patch_trl()")
            args = (final_logit_softcapping, logit_scale, outputs)
            return _originals[_HEAD_NAME].apply(hidden, weight, bias, targets, temperature, chunk_size, *args)
        stats = fastalign.linear_token_stats(
            hidden,
            weight,
            targets,
            bias,
            ignore_index=IGNORE_INDEX,
            temperature=temperature,
            softcap=final_logit_softcapping,
            logit_scale=logit_scale,
            entropy="entropy" in outputs,
            argmax="is_top1" in outputs,
            log_sum_sq_probs="log_sum_sq_probs" in outputs,
            mean_logits="mean_logits" in outputs,
        )
        # TRL's is_top1: the label is the first maximum, as torch.argmax picks it.
        is_top1 = None if stats.argmax is None else stats.argmax == targets
        return stats.logprobs, stats.entropy, stats.log_sum_sq_probs, stats.mean_logits, is_top1


def _gathered_dtensor(dtensor: type) -> type:
    """A stand-in for the class `DTensor` in `isinstance` checks: the DTensors that are not vocab-parallel (those
    TRL's forward is to gather), so a vocab-parallel weight and its bias reach the head sharded."""
    from fastalign.vocab_parallel import vocab_shard

    def is_vocab_parallel(x) -> bool:
        try:
            return vocab_shard(x) is not None
        except ValueError:  # a "tp" layout fastalign cannot take (e.g. Shard(1)): TRL gathers it, as before
            return False

    class _Check(type):
        def __instancecheck__(cls, x) -> bool:
            return isinstance(x, dtensor) and not is_vocab_parallel(x)

    return _Check("DTensor", (), {"__doc__": _gathered_dtensor.__doc__})


# ---------------------------------------------------------------------------------------------- logits helpers


def _fastalign_takes(logits: torch.Tensor, index: torch.Tensor | None) -> bool:
    """Whether fastalign.token_stats computes this call: one index per row, a dtype it takes."""
    return (
        logits.dtype in _FASTALIGN_DTYPES and logits.dim() >= 1 and (index is None or index.shape == logits.shape[:-1])
    )


def _out_dtype(logits, index=None, row_mask=None) -> torch.dtype:
    """The dtype TRL returns: float32 from its Triton kernel, the logits' dtype from its torch path."""
    from transformers.utils import is_triton_available

    trl_kernel = is_triton_available() and _trl_utils()._supports_trl_loss_kernel(logits, index, row_mask)
    return torch.float32 if trl_kernel else logits.dtype


def _logits_stats(logits, index, temperature, row_mask, want_entropy):
    """(log-probs of index, entropy or None) of softmax(logits / temperature) in TRL's dtype, 0 where row_mask is 0."""
    labels = torch.full(logits.shape[:-1], IGNORE_INDEX, device=logits.device) if index is None else index
    if row_mask is not None:
        labels = labels.masked_fill(row_mask == 0, IGNORE_INDEX)
    stats = fastalign.token_stats(logits, labels, temperature=temperature, entropy=want_entropy, argmax=False)
    dtype = _out_dtype(logits, index, row_mask)
    entropy = stats.entropy
    if entropy is not None and row_mask is not None:
        entropy = entropy.masked_fill(row_mask == 0, 0.0)
    return stats.logprobs.to(dtype), None if entropy is None else entropy.to(dtype)


def _make_logits_functions(originals: dict[str, Any]) -> dict[str, Any]:
    """fastalign versions of TRL's logits helpers, with TRL's signatures; inputs fastalign does not take (top-K
    indices, float64 logits) go to TRL's own function."""

    @functools.wraps(originals["selective_log_softmax"])
    def selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
        if not _fastalign_takes(logits, index):
            return originals["selective_log_softmax"](logits, index, temperature, row_mask)
        return _logits_stats(logits, index, temperature, row_mask, want_entropy=False)[0]

    @functools.wraps(originals["entropy_from_logits"])
    def entropy_from_logits(logits, chunk_size=128):
        if not _fastalign_takes(logits, None):
            return originals["entropy_from_logits"](logits, chunk_size)
        return _logits_stats(logits, None, 1.0, None, want_entropy=True)[1]

    @functools.wraps(originals["selective_log_softmax_and_entropy"])
    def selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None):
        if not _fastalign_takes(logits, index):
            original = originals["selective_log_softmax_and_entropy"]
            return original(logits, index, entropy_requires_grad, temperature, row_mask)
        logprobs, entropy = _logits_stats(logits, index, temperature, row_mask, want_entropy=True)
        return logprobs, entropy if entropy_requires_grad else entropy.detach()

    return {
        "selective_log_softmax": selective_log_softmax,
        "entropy_from_logits": entropy_from_logits,
        "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
    }


# ---------------------------------------------------------------------------------------------- public API

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def patch_trl() -> None:
    """Run every stock TRL trainer's per-token log-probs on fastalign's ops; `unpatch_trl()` undoes it.

    - The fused LM head that TRL's SFT, DPO, KTO, GRPO and RLOO trainers install (`add_fused_lm_head`) runs
      `fastalign.linear_token_stats`: log_probs, entropy, log_sum_sq_probs, mean_logits and is_top1, with TRL's
      temperature, `final_logit_softcapping` and logit scale. Trainers created before the call switch too.
    - A vocab-parallel lm_head (`ColwiseParallel`: the weight Shard(0) on the mesh dim "tp") is not gathered by
      TRL's forward: the head runs on each rank's slice (fastalign.vocab_parallel).
    - `selective_log_softmax`, `entropy_from_logits` and `selective_log_softmax_and_entropy` run
      `fastalign.token_stats` (same shapes, dtypes, temperature and gradients as TRL's).
    TRL's loss math, data handling and metrics are unchanged. Calling it again does nothing.
    """
    if _originals:
        return
    utils = _trl_utils()
    originals = {name: getattr(utils, name) for name in (_HEAD_NAME, _DTENSOR_NAME, *_LOGITS_FUNCTIONS)}
    replacements = {
        _HEAD_NAME: _FusedHead,
        _DTENSOR_NAME: _gathered_dtensor(originals[_DTENSOR_NAME]),
        **_make_logits_functions(originals),
    }
    for name in (_HEAD_NAME, _DTENSOR_NAME):  # read by add_fused_lm_head's forward in trl.trainer.utils only
        setattr(utils, name, replacements[name])
    for name in _LOGITS_FUNCTIONS:
        _rebind(originals[name], replacements[name])
    _originals.update(originals)
    _replacements.update(replacements)


def unpatch_trl() -> None:
    """Restore TRL's own head and logits helpers in every loaded trl module, including those imported while
    patched. Does nothing when not patched."""
    if not _originals:
        return
    for name in (_HEAD_NAME, _DTENSOR_NAME):
        setattr(_trl_utils(), name, _originals[name])
    for name in _LOGITS_FUNCTIONS:
        _rebind(_replacements[name], _originals[name])
    _originals.clear()
    _replacements.clear()


def is_trl_patched() -> bool:
    return bool(_originals)
