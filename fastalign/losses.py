"""nn.Module wrappers of the fused losses: each holds its hyper-parameters and calls the functional API."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fastalign._backend import check_flag, check_ignore_index
from fastalign.dpo import (
    DISCOPOP_TAU,
    check_dpo_options,
    check_kto_options,
    dpo_loss_from_logits,
    kto_loss_from_logits,
)
from fastalign.ift import check_gamma, ift_loss_from_logits
from fastalign.linear_losses import (
    check_cross_entropy_options,
    check_dpo_hidden_options,
    check_ift_hidden_options,
    check_kto_hidden_options,
    cross_entropy_from_hidden,
    dpo_loss_from_hidden,
    ift_loss_from_hidden,
    kto_loss_from_hidden,
)


def _logits_options(check: Callable) -> Callable:
    """The check of a logits-form loss module's options: the family's `check` and the log-prob op's own."""

    def check_all(*, ignore_index=-100, inplace_backward=False, return_per_example=False, **options):
        check_ignore_index(ignore_index)
        check_flag("inplace_backward", inplace_backward)
        check_flag("return_per_example", return_per_example)
        check(**options)

    return check_all


class _LossModule(nn.Module):
    """A loss module's options: checked at construction by the check its function runs first, readable and
    settable as attributes (`loss.beta = 0.2` is checked again and takes effect at the next call)."""

    def __init__(self, arguments: dict, check: Callable):
        """arguments: the subclass's __init__ `locals()`, every option by its name and a **head dict spread (the
        logit options of the fused-linear forms: temperature, softcap, logit_scale)."""
        super().__init__()
        options = {name: value for name, value in arguments.items() if name not in ("self", "__class__", "head")}
        head = arguments.get("head", {})
        unknown = sorted(set(head) - {"temperature", "softcap", "logit_scale"})
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {unknown}")
        options.update(head)
        check(**options)
        self.__dict__["_check"], self.__dict__["_options"] = check, options

    def __getattr__(self, name: str):
        options = self.__dict__.get("_options", {})
        if name in options:
            return options[name]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        options = self.__dict__.get("_options", {})
        if name not in options:
            return super().__setattr__(name, value)
        self._check(**{**options, name: value})
        options[name] = value

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self._options.items())


class DPOLoss(_LossModule):
    """A DPO-family loss from policy logits [2B, T, V] (chosen rows first) and labels [2B, T] in one fused pass.

    Called as `(logits, labels, ref_chosen_logps, ref_rejected_logps)` or `(logits, labels, ref_logits=...)`;
    returns (loss, metrics), or (loss, metrics, per_example) with return_per_example=True. The options are
    `fastalign.dpo_loss`'s, plus ld_alpha (LD-DPO) and use_weighting (WPO): see
    `fastalign.dpo.dpo_loss_from_token_logps`.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str | Sequence[str] = "sigmoid",
        loss_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        inplace_backward: bool = False,
        *,
        average_log_prob: bool = False,
        ld_alpha: float | None = None,
        use_weighting: bool = False,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        discopop_tau: float = DISCOPOP_TAU,
        return_per_example: bool = False,
    ):
        super().__init__(locals(), _logits_options(check_dpo_options))

    def forward(self, logits, labels, ref_chosen_logps=None, ref_rejected_logps=None, *, ref_logits=None):
        return dpo_loss_from_logits(
            logits, labels, ref_chosen_logps, ref_rejected_logps, ref_logits=ref_logits, **self._options
        )


class KTOLoss(_LossModule):
    """TRL's KTO loss from policy logits [B, T, V], labels [B, T] and the desirable flags [B] in one fused pass.

    Called as `(logits, labels, desirable, ref_logps, kl)` or with `ref_logits=...` instead of ref_logps;
    returns (loss, metrics), or (loss, metrics, per_example) with return_per_example=True. See
    `fastalign.kto_loss` for the options.
    """

    def __init__(
        self,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        loss_type: str = "kto",
        ignore_index: int = -100,
        inplace_backward: bool = False,
        *,
        average_log_prob: bool = False,
        clamp_kl: bool = True,
        return_per_example: bool = False,
    ):
        super().__init__(locals(), _logits_options(check_kto_options))

    def forward(self, logits, labels, desirable, ref_logps=None, kl=None, *, ref_logits=None):
        return kto_loss_from_logits(logits, labels, desirable, ref_logps, kl, ref_logits=ref_logits, **self._options)


class IFTLoss(_LossModule):
    """The IFT loss from logits [B, T, V] and labels [B, T] (aligned; the caller shifts) in one fused pass.

    See `fastalign.ift_loss`.
    """

    def __init__(self, gamma: float = 0.95, ignore_index: int = -100, inplace_backward: bool = False):
        super().__init__(locals(), _logits_options(check_gamma))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ift_loss_from_logits(logits, labels, **self._options)


# Fused-linear forms: the same losses from the last hidden states and the lm_head weight (fastalign.linear_losses),
# so not even a bf16 [tokens, vocab] logits tensor exists. strategy="auto" | "fast" | "lean": see there.


class FusedLinearDPOLoss(_LossModule):
    """A DPO-family loss from policy hidden states [2B, T, H] (chosen rows first), the lm_head weight [V, H]
    and labels [2B, T]. Called as `(hidden, weight, labels, bias=None, *, ref_chosen_logps=..., ref_rejected_logps=...)`
    or with `ref_hidden=` (and `ref_weight=`, `ref_bias=`) instead; returns (loss, metrics), or (loss, metrics,
    per_example) with return_per_example=True. The options are DPOLoss's; strategy and the logit options
    (temperature, softcap, logit_scale): see `fastalign.linear_losses.dpo_loss_from_hidden`.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str | Sequence[str] = "sigmoid",
        loss_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        memory_budget: int | None = None,
        *,
        strategy: str = "auto",
        average_log_prob: bool = False,
        ld_alpha: float | None = None,
        use_weighting: bool = False,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        discopop_tau: float = DISCOPOP_TAU,
        return_per_example: bool = False,
        **head,
    ):
        super().__init__(locals(), check_dpo_hidden_options)

    def forward(self, hidden, weight, labels, bias=None, **reference):
        return dpo_loss_from_hidden(hidden, weight, labels, bias, **reference, **self._options)


class FusedLinearKTOLoss(_LossModule):
    """TRL's KTO loss from policy hidden states [B, T, H], the lm_head weight [V, H], labels [B, T] and the
    desirable flags [B]. Called as `(hidden, weight, labels, desirable, bias=None, *, ref_logps=..., kl=...)` or
    with `ref_hidden=` (and `ref_weight=`, `ref_bias=`) instead of ref_logps; returns (loss, metrics), or (loss,
    metrics, per_example) with return_per_example=True. The options are KTOLoss's; strategy and the logit options:
    see `fastalign.linear_losses.kto_loss_from_hidden`.
    """

    def __init__(
        self,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        loss_type: str = "kto",
        ignore_index: int = -100,
        memory_budget: int | None = None,
        *,
        strategy: str = "auto",
        average_log_prob: bool = False,
        clamp_kl: bool = True,
        return_per_example: bool = False,
        **head,
    ):
        super().__init__(locals(), check_kto_hidden_options)

    def forward(self, hidden, weight, labels, desirable, bias=None, **reference):
        return kto_loss_from_hidden(hidden, weight, labels, desirable, bias, **reference, **self._options)


class FusedLinearIFTLoss(_LossModule):
    """The IFT loss from hidden states [B, T, H], the lm_head weight [V, H] and labels [B, T] (aligned; the
    caller shifts). Called as `(hidden, weight, labels, bias=None)`. See `fastalign.ift_loss`.
    """

    def __init__(
        self,
        gamma: float = 0.95,
        ignore_index: int = -100,
        memory_budget: int | None = None,
        *,
        strategy: str = "auto",
        **head,
    ):
        super().__init__(locals(), check_ift_hidden_options)

    def forward(self, hidden, weight, labels, bias=None):
        return ift_loss_from_hidden(hidden, weight, labels, bias, **self._options)


class FusedLinearCrossEntropyLoss(_LossModule):
    """The SFT loss: token cross-entropy from hidden states [B, T, H], the lm_head weight [V, H] and labels [B, T]
    (aligned; the caller shifts), as F.cross_entropy (reduction, ignore_index, label_smoothing). Called as
    `(hidden, weight, labels, bias=None)`; returns the loss, or (loss, metrics) when `entropy` or `accuracy` asks
    for TRL's SFT metrics. See `fastalign.linear_losses.cross_entropy_from_hidden`.
    """

    def __init__(
        self,
        reduction: str = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        entropy: bool = False,
        accuracy: bool = False,
        memory_budget: int | None = None,
        *,
        strategy: str = "auto",
        **head,
    ):
        super().__init__(locals(), check_cross_entropy_options)

    def forward(self, hidden, weight, labels, bias=None):
        loss, metrics = cross_entropy_from_hidden(hidden, weight, labels, bias, **self._options)
        return (loss, metrics) if self.entropy or self.accuracy else loss
