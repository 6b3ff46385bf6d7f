"""Patch a transformers causal LM so that `model(..., labels=...)` returns per-token log-probs from
fastalign's fused linear head instead of logits.

The patched forward runs the backbone, then `fastalign.linear_token_stats` on the last hidden states
and the lm_head weight: the [tokens, vocab] logits never exist. Without labels it is the model's own
forward, so generation is unchanged. The backbone and the head are looked up on every call, so the
patch survives PEFT wrapping and FSDP2 sharding applied after it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import sys
import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

import fastalign
from fastalign._backend import check_positive, check_real, check_values
from fastalign.kernels.linear_logprobs import Outputs
from fastalign.linear_losses import check_strategy, fused_linear_loss
from fastalign.vocab_parallel import vocab_shard

IGNORE_INDEX = -100

# Where the config of each model family keeps its logit scaling. Each entry multiplies the logits
# by the value (Cohere `logit_scale`, Falcon-H1 `lm_head_multiplier`, Muse Glimmer
# `output_multiplier`), except Granite and MiniCPM3, which divide them by `logits_scaling`
# (HyperCLOVA X multiplies by it).
_MULTIPLIER_ATTRS = ("logit_scale", "output_multiplier", "lm_head_multiplier")
_LOGITS_SCALING_MULTIPLIES = {"hyperclovax"}
# Where each family keeps its final softcap: c * tanh(logits / c) (Gemma 2-4, RecurrentGemma, xLSTM).
_SOFTCAP_ATTRS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


@dataclass
class FusedCausalLMOutput(ModelOutput):
    """Output of a patched model called with labels. Per-token fields are `[B, T - 1]` (labels are
    shifted inside, as for the model's own loss), or `[B, T]` when pre-shifted `shift_labels` were
    passed. Only labelled positions are scored: elsewhere the float fields are 0 and argmax is -100.

    - loss: summed negative log-likelihood of the labelled tokens divided by `num_items_in_batch`
      (their count when not passed; 0 when no token counts), plus the MoE load-balancing loss when router logits were
      requested: the loss the model's own forward returns, at temperature 1.
    - logprobs: log-prob of each next-token label; differentiable.
    - entropy: entropy of the next-token distribution (with `return_entropy=True`); differentiable.
    - argmax: greedy next token, int64 (with `return_argmax=True`).
    - mean_logits: mean of the scaled logits over the vocabulary, float32, no gradient (with
      `return_mean_logits=True`; TRL's `logits/chosen` metric).
    - log_sum_sq_probs: log(sum_v p_v^2) of the next-token distribution, float32, no gradient (with
      `return_log_sum_sq_probs=True`; WPO's weights).
    - label_mask: where the label is not ignored.
    - aux_loss: the MoE load-balancing loss, when added.
    - loss_outputs: with `fused_objective` (fastalign's TRL trainers), what its loss returned (the loss, then its
      metrics); `loss` is then that loss (plus aux_loss), and logprobs and entropy carry no gradient.
    """

    loss: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    argmax: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    loss_outputs: tuple | None = None


def logit_transform(config: Any) -> tuple[float, float | None]:
    """(logit_scale, softcap) that a model's own forward applies to its logits, read from its config:
    logits = softcap * tanh(logit_scale * (h W^T + b) / softcap)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = None
    for attr in _MULTIPLIER_ATTRS:
        scale = getattr(text_config, attr, None)
        if scale is not None:
            break
    scaling = getattr(text_config, "logits_scaling", None)
    if scale is None and scaling is not None:
        scale = scaling if text_config.model_type in _LOGITS_SCALING_MULTIPLIES else 1.0 / scaling
    softcap = next((getattr(text_config, a) for a in _SOFTCAP_ATTRS if getattr(text_config, a, None) is not None), None)
    return float(1.0 if scale is None else scale), (None if softcap is None else float(softcap))


def _check_plain_head(model: torch.nn.Module) -> None:
    """Raises TypeError unless the model's logits are its output embedding applied to its backbone's last hidden
    state (up to what `logit_transform` reads): the fused head computes exactly that, so any other module in
    between (a BERT/RoBERTa-style prediction head, Inkling 2's softcap module) would be skipped silently."""
    head, backbone = model.get_output_embeddings(), _backbone(model)
    others = [name for name, child in model.named_children() if child is not head and child is not backbone]
    if backbone is None or others or not any(child is head for child in model.children()):
        raise TypeError(
            f"model must compute its logits as lm_head(last hidden state of its backbone); {type(model).__name__} "
            f"computes them through {', '.join(others) or 'a module around its output embedding'} too, which the "
            "fused head would skip"
        )
    text_config = model.config.get_text_config()
    unpadded = getattr(text_config, "unpadded_vocab_size", None)
    if getattr(text_config, "logits_mup_width_multiplier", None) not in (None, 1) or (
        unpadded is not None and unpadded < head.weight.shape[0]
    ):
        raise TypeError(
            f"{type(model).__name__} scales its last hidden state (logits_mup_width_multiplier) or cuts its "
            "vocabulary (unpadded_vocab_size), which the fused head cannot apply"
        )


def _unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model


def _check_lm_head(lm_head: torch.nn.Module) -> None:
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(lm_head, peft.tuners.tuners_utils.BaseTunerLayer):
        raise ValueError(
            "lm_head carries a PEFT adapter, which the fused head cannot apply: it reads lm_head.weight directly. "
            "Remove 'lm_head' from target_modules (modules_to_save=['lm_head'] is supported)."
        )


_MIXTRAL_LOSS_ARGS = ["gate_logits", "num_experts", "top_k", "attention_mask"]


def _moe_aux_loss(model, text_config, backbone_outputs, attention_mask) -> tuple[float, torch.Tensor] | None:
    """(coefficient, load-balancing loss) as the model's own forward adds them to its loss, or None without router
    logits. Each family's modeling module has its own `load_balancing_loss_func`; the coefficient lives on the
    model (`router_aux_loss_coef`, JetMoe's `aux_loss_coef`) or in its text config (the vision-language MoEs)."""
    router_logits = getattr(backbone_outputs, "router_logits", None)
    if router_logits is None:
        return None
    loss_func = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
    found = {
        "coefficient": next(
            (
                getattr(x, a)
                for x in (model, text_config)
                for a in ("router_aux_loss_coef", "aux_loss_coef")
                if hasattr(x, a)
            ),
            None,
        ),
        "num_experts": getattr(model, "num_experts", getattr(text_config, "num_experts", None)),
        "top_k": getattr(model, "num_experts_per_tok", getattr(text_config, "num_experts_per_tok", None)),
    }
    if (
        loss_func is None
        or list(inspect.signature(loss_func).parameters) != _MIXTRAL_LOSS_ARGS
        or None in found.values()
    ):
        raise NotImplementedError(
            f"fastalign: {type(model).__name__}'s load-balancing loss is not Mixtral's (gate_logits, num_experts, "
            "top_k, attention_mask) with a known coefficient, so the patched forward cannot add it as the model's own "
            "forward does; pass output_router_logits=False (and add the model's aux loss yourself) or use the "
            "unpatched model"
        )
    return found["coefficient"], loss_func(router_logits, found["num_experts"], found["top_k"], attention_mask)


def _call_head(lm_head, hidden, labels, head, extras: dict[str, bool], objective=None, strategy: str = "auto"):
    """(TokenStats of the head on `hidden`, with the `extras` of linear_token_stats asked for; what the objective's
    loss_of returned, or None), computed inside lm_head's own call. Without an objective the stats are
    linear_token_stats' (differentiable log-probs); with one, fastalign.linear_losses.fused_linear_loss computes
    the loss in the head (at 6 N H V on its fast strategy) and the stats carry no gradient.

    Calling the module rather than reading its weight lets FSDP2 gather a separately sharded head
    for this call and reduce-scatter its gradient, as for any other layer. A vocab-parallel head (ColwiseParallel:
    the weight Shard(0) on the mesh dim "tp") is not called: its hooks would make hidden a DTensor and expect
    logits back; linear_token_stats runs it on each rank's vocabulary slice.
    """

    head_args = {
        "ignore_index": IGNORE_INDEX,
        "temperature": head["temperature"],
        "softcap": head["softcap"],
        "logit_scale": head["logit_scale"],
    }

    def head_forward(hidden, labels):
        if objective is None:
            stats = fastalign.linear_token_stats(hidden, lm_head.weight, labels, lm_head.bias, **head_args, **extras)
            return stats, None
        wanted = [name for name in ("log_sum_sq_probs", "mean_logits") if extras[name]]
        with_extras = dataclasses.replace(objective, extras=tuple(dict.fromkeys((*objective.extras, *wanted))))
        result, stats = fused_linear_loss(
            hidden, lm_head.weight, labels, lm_head.bias, with_extras, {**head_args, "memory_budget": None}, strategy,
            Outputs(entropy=extras["entropy"], argmax=extras["argmax"]),
        )  # fmt: skip
        return stats, result

    if vocab_shard(lm_head.weight) is not None:
        return head_forward(hidden, labels)
    previous = lm_head.__dict__.get("forward")
    lm_head.forward = head_forward
    try:
        return lm_head(hidden, labels)
    finally:
        if previous is None:
            del lm_head.forward
        else:
            lm_head.forward = previous


_BYPASSED = (
    "fastalign: the model patched with patch_causal_lm was {how}, so fastalign's head did not run. "
    "TRL's trainers call their own fused head (model(..., fused_lm_head=True), from add_fused_lm_head), which "
    "patch_causal_lm does not reach. Under TRL's trainers use `from fastalign.integrations import patch_trl; "
    "patch_trl()` instead (or fastalign.integrations.DPOTrainer / KTOTrainer)."
)


class _BypassCheck:
    """Forward pre-hook on the backbone of a patched model, and the patched forward's call depth: warns once when
    the backbone runs outside the patched forward, i.e. another head computes the outputs (TRL's fused head,
    installed after the patch, calls the backbone directly). An object, not a closure, so that a deep copy of
    the model gets its own."""

    def __init__(self) -> None:
        self.depth = 0
        self.warned = False

    def __call__(self, module, args) -> None:
        if self.depth == 0:
            self.warn("bypassed: its backbone ran outside the patched forward")

    def warn(self, how: str) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(_BYPASSED.format(how=how), UserWarning, stacklevel=3)


def _backbone(model: torch.nn.Module) -> torch.nn.Module | None:
    backbone = model.base_model
    return None if backbone is model else backbone


def _remove_bypass_check(model: torch.nn.Module) -> None:
    backbone = _backbone(model)
    if backbone is not None:
        for key, hook in list(backbone._forward_pre_hooks.items()):
            if isinstance(hook, _BypassCheck):
                del backbone._forward_pre_hooks[key]


def _fused_forward(
    self,
    *args,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    return_entropy: bool = False,
    return_argmax: bool = False,
    return_mean_logits: bool = False,
    return_log_sum_sq_probs: bool = False,
    fused_objective=None,
    fused_strategy: str = "auto",
    **kwargs,
):
    head = self._fastalign_head
    original = types.MethodType(head["original_forward"], self)
    check_strategy(fused_strategy)
    if kwargs.pop("fused_lm_head", False):
        # TRL's head was installed before the patch and its trainer calls it through this forward: let it run.
        if head["previous_forward"] is None:
            raise TypeError("fused_lm_head=True needs TRL's add_fused_lm_head head, which this model lacks")
        head["bypass"].warn("called with TRL's fused_lm_head=True")
        extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
        extra = {k: v for k, v in extra.items() if v is not None}
        return head["previous_forward"](*args, fused_lm_head=True, **extra, **kwargs)
    extras = {
        "entropy": return_entropy,
        "argmax": return_argmax,
        "mean_logits": return_mean_logits,
        "log_sum_sq_probs": return_log_sum_sq_probs,
    }
    if labels is None and shift_labels is None:
        if any(extras.values()):
            raise ValueError(f"return_{'/return_'.join(extras)} need labels (or shift_labels)")
        return original(*args, **kwargs)

    kwargs["use_cache"] = False
    kwargs.pop("logits_to_keep", None)
    return_dict = kwargs.pop("return_dict", None)  # the backbone's outputs are read by name
    text_config = self.config.get_text_config()
    if getattr(text_config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    backbone_outputs = self.base_model(*args, **kwargs)
    hidden = backbone_outputs.last_hidden_state
    name, given = ("labels", labels) if shift_labels is None else ("shift_labels", shift_labels)
    if not isinstance(given, torch.Tensor) or given.shape != hidden.shape[:-1]:
        got = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
        raise ValueError(f"{name} must have the shape [B, T] of input_ids, {tuple(hidden.shape[:-1])}; got {got}")
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    count = None if num_items_in_batch is None else _checked_count(num_items_in_batch)

    lm_head = self.get_output_embeddings()
    _check_lm_head(lm_head)
    # With the model split across devices (device_map), the backbone may end on another device.
    hidden, labels = hidden.to(lm_head.weight.device), labels.to(lm_head.weight.device)
    objective = None if fused_objective is None else fused_objective(labels)
    stats, loss_result = _call_head(lm_head, hidden, labels, head, extras, objective, fused_strategy)
    mask = labels != IGNORE_INDEX
    if loss_result is None:
        loss = -stats.logprobs.sum() / (mask.sum().clamp(min=1) if count is None else count)
    else:
        loss = loss_result[0]
    aux_loss = _moe_aux_loss(self, text_config, backbone_outputs, kwargs.get("attention_mask"))
    if aux_loss is not None:
        coefficient, aux_loss = aux_loss
        loss = loss + coefficient * aux_loss.to(loss.device)

    def labelled(x, fill=0.0):
        return None if x is None else torch.where(mask, x, fill)

    output = FusedCausalLMOutput(
        loss=loss,
        logprobs=stats.logprobs,
        entropy=labelled(stats.entropy),
        argmax=labelled(stats.argmax, IGNORE_INDEX),
        mean_logits=labelled(stats.mean_logits),
        log_sum_sq_probs=labelled(stats.log_sum_sq_probs),
        label_mask=mask,
        aux_loss=aux_loss,
        loss_outputs=loss_result,
    )
    return output.to_tuple() if return_dict is False else output  # a tuple as the model's own: the loss first


def _checked_count(num_items_in_batch: torch.Tensor | float) -> torch.Tensor | float:
    """What the summed NLL is divided by: num_items_in_batch (an int, as HF passes it, or a one-element real tensor),
    with 0 read as 1 (no token counts anywhere, so the sum is 0: the loss is 0, fastalign's mean of nothing, not
    NaN). Not max(n, 1): under FSDP a rank's share (total / world) may be a fraction. A tensor's values are checked
    without a host sync (see check_values)."""
    if isinstance(num_items_in_batch, torch.Tensor):
        n = num_items_in_batch
        if n.dtype == torch.bool or n.dtype.is_complex or n.numel() != 1:
            got = f"a {n.dtype} tensor of shape {tuple(n.shape)}"
            raise TypeError(f"num_items_in_batch must be a number or a one-element real tensor; got {got}")
        n = n.detach().reshape(()).to(torch.float32)  # the log-probs' dtype, which the loss keeps
        n = check_values("num_items_in_batch", n, torch.isfinite(n) & (n >= 0), "finite and >= 0")
        return torch.where(n == 0, 1.0, n)
    n = check_real("num_items_in_batch", num_items_in_batch, "a number or a one-element real tensor")
    if not 0 <= n < math.inf:
        raise ValueError(f"num_items_in_batch must be finite and >= 0; got {num_items_in_batch!r}")
    return n or 1.0


def patch_causal_lm(
    model: torch.nn.Module,
    *,
    temperature: float = 1.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
) -> torch.nn.Module:
    """Make `model(..., labels=labels)` return a `FusedCausalLMOutput` from the fused linear head.

    Args:
        model: a transformers causal LM (`*ForCausalLM`, or a vision-language model with a language
            head), or a PEFT model wrapping one. Patching the PEFT model patches the model inside.
        temperature: the logits are divided by it (default 1.0).
        logit_scale: multiplier of the logits before softcapping; default: read from the config
            (`logit_scale`, `logits_scaling`, `lm_head_multiplier`, `output_multiplier`), else 1.0.
        softcap: default: read from the config (`final_logit_softcapping`, `logits_soft_cap`,
            `output_logit_soft_cap`), else none.

    The patched forward takes, besides the model's own arguments, `labels` (aligned with input_ids,
    shifted inside, -100 ignored) or pre-shifted `shift_labels`, `num_items_in_batch`, and the
    flags `return_entropy`, `return_argmax`, `return_mean_logits`, `return_log_sum_sq_probs`; fastalign's TRL trainers
    also pass `fused_objective` (shifted labels -> a `fastalign.linear_losses` objective) and `fused_strategy`, so
    that the head computes their loss itself, on the fused losses' strategies (fast: 6 N H V FLOPs). Called without
    labels it is the model's own forward. Patching again replaces the settings; `unpatch_causal_lm` undoes it.

    Stock TRL trainers call their own fused head (`add_fused_lm_head`), which bypasses this forward: it then
    warns once (the backbone ran outside it, or it got TRL's `fused_lm_head=True`) and names `patch_trl()`.

    Returns the model, patched in place.
    """
    target = _unwrap_peft(model)
    if not hasattr(target, "get_output_embeddings") or target.get_output_embeddings() is None:
        raise TypeError(f"model must be a transformers causal LM with an lm_head; got {type(target).__name__}")
    _check_plain_head(target)
    config_scale, config_softcap = logit_transform(target.config)
    settings = {
        "temperature": check_positive("temperature", temperature),
        "logit_scale": config_scale if logit_scale is None else check_positive("logit_scale", logit_scale),
        "softcap": config_softcap if softcap is None else check_positive("softcap", softcap),
    }
    head = getattr(target, "_fastalign_head", None)
    if head is None:
        # An instance-level forward installed before us (e.g. TRL's fused head) is kept for unpatching.
        head = {
            "previous_forward": target.__dict__.get("forward"),
            "original_forward": type(target).forward,
            "bypass": _BypassCheck(),
        }
        backbone = _backbone(target)
        if backbone is not None:
            backbone.register_forward_pre_hook(head["bypass"])
    head.update(settings)
    target._fastalign_head = head

    # wraps() keeps the model's own signature: generate() and Trainer inspect it.
    @functools.wraps(head["original_forward"])
    def forward(self, *args, **kwargs):
        bypass = self._fastalign_head["bypass"]
        bypass.depth += 1
        try:
            return _fused_forward(self, *args, **kwargs)
        finally:
            bypass.depth -= 1

    target.forward = types.MethodType(forward, target)
    return model


def unpatch_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the forward that `patch_causal_lm` replaced. Returns the model."""
    target = _unwrap_peft(model)
    head = target.__dict__.pop("_fastalign_head", None)
    if head is None:
        return model
    _remove_bypass_check(target)
    if head["previous_forward"] is None:
        del target.forward
    else:
        target.forward = head["previous_forward"]
    return model


def is_patched(model: torch.nn.Module) -> bool:
    return "_fastalign_head" in _unwrap_peft(model).__dict__
