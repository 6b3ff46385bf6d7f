"""The DPO family (every loss type of TRL's DPOTrainer) and KTO, on per-sequence log-probs.

The losses act on [B] per-sequence sums, so they are a handful of elementwise torch ops that autograd
differentiates; what must be fused is the log-prob pass underneath, which `dpo_loss_from_logits` and
`kto_loss_from_logits` do with `token_logprobs` (no float32 [tokens, vocab] temporary, forward or backward).
Formulas and metric names follow TRL 1.16 (trl/trainer/dpo_trainer.py, kto_trainer.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastalign._backend import check_flag, check_float, check_positive, check_real, check_values
from fastalign.logprobs import token_logprobs, token_stats

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
# The loss types that divide by the completion lengths (TRL reads them from the completion mask).
NEEDS_LENGTHS = ("ipo", "sigmoid_norm", "sft")
DISCOPOP_TAU = 0.05  # TRL's DPOConfig.discopop_tau default, the DiscoPOP paper's value
# f-DPO (arXiv 2309.16240): the regulariser between policy and reference; "reverse_kl" is DPO's own.
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The loss types built on the chosen-minus-rejected reward difference, where f-DPO's log Z(x) cancels: the
# only ones TRL 1.16 allows with another f-divergence.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft", "sigmoid_norm")
# TRL clamps the alpha-divergence exponent (alpha - 1) * log-ratio at 80 so that exp stays finite in float32.
ALPHA_DIVERGENCE_MAX_EXPONENT = 80.0
# The DPO and KTO losses run in float64 on their [B] per-sequence inputs and return the inputs' dtype (at least
# float32). It costs nothing next to the log-prob pass, and in fp32 a loss whose terms cancel (APO-down,
# DiscoPOP near its switch point, hinge-like sigmoids near 1) keeps only 1e-3 of its gradient's precision.
LOSS_MATH_DTYPE = torch.float64


def _f_divergence_scores(logratios: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """f'(pi / pi_ref) of f-DPO, from u = log(pi / pi_ref): the per-sequence score whose chosen-minus-rejected
    difference replaces DPO's log-ratio difference. Constants that cancel in the difference are TRL's."""
    if kind == "forward_kl":  # f(t) = -log t: f'(t) = -1/t, shifted by 1
        return -torch.expm1(-logratios)
    if kind == "js_divergence":  # f'(t) = log(2t / (1 + t))
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence" and abs(alpha - 1) >= 1e-6:  # f'(t) = (t^(alpha-1) - 1) / (alpha - 1)
        return torch.expm1(((alpha - 1) * logratios).clamp(max=ALPHA_DIVERGENCE_MAX_EXPONENT)) / (alpha - 1)
    return logratios  # reverse KL, and the alpha -> 1 limit as TRL takes it


class _Pairs(NamedTuple):
    """What the per-sequence losses read, in LOSS_MATH_DTYPE: the policy and reference sequence log-probs [B]
    (per-token means with average_log_prob), the chosen plain sums (for "sft"), lengths and options."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_sums: torch.Tensor
    chosen_lengths: torch.Tensor | None
    rejected_lengths: torch.Tensor | None
    beta: float
    label_smoothing: float
    f_divergence_type: str
    f_alpha_divergence_coef: float
    discopop_tau: float
    averaged: bool  # the four log-probs are already per-token means (average_log_prob)

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected

    @property
    def margin(self) -> torch.Tensor:
        """(policy - reference) log-ratio of chosen minus rejected: DPO's implicit reward difference / beta."""
        return self.chosen_logratios - self.rejected_logratios

    def scores(self, logratios: torch.Tensor) -> torch.Tensor:
        return _f_divergence_scores(logratios, self.f_divergence_type, self.f_alpha_divergence_coef)

    @property
    def score_margin(self) -> torch.Tensor:
        """The f-divergence form of `margin` (equal to it for reverse KL)."""
        return self.scores(self.chosen_logratios) - self.scores(self.rejected_logratios)

    @property
    def per_token_score_margin(self) -> torch.Tensor:
        """`score_margin` with each side divided by its completion length (clamped to >= 1); `score_margin` itself
        when the log-probs are already per-token means (average_log_prob): "ipo" and "sigmoid_norm" divide once."""
        if self.averaged:
            return self.score_margin
        chosen = self.scores(self.chosen_logratios) / self.chosen_lengths.clamp(min=1)
        return chosen - self.scores(self.rejected_logratios) / self.rejected_lengths.clamp(min=1)


def _smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): the logistic loss with flipped-label probability eps."""
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def _sigmoid(p: _Pairs) -> torch.Tensor:
    return -F.logsigmoid(p.beta * p.score_margin)


def _hinge(p: _Pairs) -> torch.Tensor:
    return torch.relu(1 - p.beta * p.score_margin)


def _ipo(p: _Pairs) -> torch.Tensor:
    # Length-normalised, as TRL does with the IPO authors' agreement; beta is the paper's tau.
    return (p.per_token_score_margin - 1 / (2 * p.beta)) ** 2


def _exo_pair(p: _Pairs) -> torch.Tensor:
    # EXO-pref (arXiv 2402.00856, eq. 16): KL(softmax over the pair || [1 - eps, eps]).
    z = p.beta * p.score_margin
    eps = p.label_smoothing
    chosen_term = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
    return chosen_term + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))


def _nca_pair(p: _Pairs) -> torch.Tensor:
    chosen, rejected = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _robust(p: _Pairs) -> torch.Tensor:
    z, eps = p.beta * p.score_margin, p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _bco_pair(p: _Pairs) -> torch.Tensor:
    return -F.logsigmoid(p.beta * p.chosen_logratios) - F.logsigmoid(-p.beta * p.rejected_logratios)


def _sppo_hard(p: _Pairs) -> torch.Tensor:
    return (p.chosen_logratios - 0.5 / p.beta) ** 2 + (p.rejected_logratios + 0.5 / p.beta) ** 2


def _aot(p: _Pairs) -> torch.Tensor:
    # Optimal transport over the batch: compare the sorted policy and reference margins.
    delta = torch.sort(p.chosen - p.rejected).values - torch.sort(p.ref_chosen - p.ref_rejected).values
    return _smoothed_logistic(p.beta * delta, p.label_smoothing)


def _aot_unpaired(p: _Pairs) -> torch.Tensor:
    delta = torch.sort(p.chosen_logratios).values - torch.sort(p.rejected_logratios).values
    return _smoothed_logistic(p.beta * delta, p.label_smoothing)


def _apo_zero(p: _Pairs) -> torch.Tensor:
    return 1 - torch.sigmoid(p.beta * p.chosen_logratios) + torch.sigmoid(p.beta * p.rejected_logratios)


def _apo_down(p: _Pairs) -> torch.Tensor:
    return torch.sigmoid(p.beta * p.chosen_logratios) + 1 - torch.sigmoid(p.beta * p.margin)


def _discopop(p: _Pairs) -> torch.Tensor:
    # DiscoPOP (arXiv 2406.08414, eq. 5): (1 - s) * -log sigmoid(z) + s * exp(-z), s = sigmoid(z / tau). The
    # exponential term is exp(log s - z): finite where exp(-z) alone overflows and s underflows to 0.
    z = p.beta * p.score_margin
    logistic = -F.logsigmoid(z) * torch.sigmoid(-z / p.discopop_tau)
    return logistic + torch.exp(F.logsigmoid(z / p.discopop_tau) - z)


def _sft(p: _Pairs) -> torch.Tensor:
    # NLL of the chosen completions, averaged over all their tokens in the batch (as TRL), one value per pair.
    nll = -p.chosen_sums.sum() / p.chosen_lengths.sum().clamp(min=1)
    return nll.expand_as(p.chosen)


def _sigmoid_norm(p: _Pairs) -> torch.Tensor:
    return -F.logsigmoid(p.beta * p.per_token_score_margin)


_PER_SEQUENCE: dict[str, Callable[[_Pairs], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sft": _sft,
    "sigmoid_norm": _sigmoid_norm,
}
assert tuple(_PER_SEQUENCE) == DPO_LOSS_TYPES


# ---------------------------------------------------------------------------------------------- checks


def _check_sequence_logps(named: dict[str, torch.Tensor | None], what: str = "[B]") -> torch.Tensor:
    """All given tensors are float [B] on one device, B >= 1; returns the first."""
    first_name, first = next(iter(named.items()))
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {what}; got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor; got {x.dtype}")
        if x.dim() != 1 or x.shape[0] == 0:
            raise ValueError(f"{name} must have shape {what} with B >= 1; got {tuple(x.shape)}")
        if x.shape != first.shape:
            raise ValueError(f"{name} must have the shape of {first_name}, {tuple(first.shape)}; got {tuple(x.shape)}")
        if x.device != first.device:
            raise ValueError(f"{name} must be on {first_name}'s device ({first.device}); got {x.device}")
    return first


def _check_lengths(name: str, lengths: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {tuple(like.shape)}; got {type(lengths).__name__}")
    if lengths.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, one length per pair; got {tuple(lengths.shape)}")
    if lengths.device != like.device:
        raise ValueError(f"{name} must be on the log-probs' device ({like.device}); got {lengths.device}")
    if lengths.dtype == torch.bool or lengths.dtype.is_complex:  # True would count as 1 token
        raise TypeError(f"{name} must be an integer or floating-point tensor (token counts); got {lengths.dtype}")
    lengths = lengths.to(LOSS_MATH_DTYPE)  # 0 is a fully masked completion: its per-token means clamp it to 1
    return check_values(name, lengths, torch.isfinite(lengths) & (lengths >= 0), "finite and >= 0")


def _check_kl(kl: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """kl, a real number or a one-element real tensor (on the log-probs' device or the CPU), as a float64 scalar on
    `device`."""
    expected = "a real number or a one-element real tensor"
    if not isinstance(kl, torch.Tensor):
        value = check_real("kl", kl, expected)
        if not math.isfinite(value):
            raise ValueError(f"kl must be finite; got {kl!r}")
        return torch.tensor(value, dtype=LOSS_MATH_DTYPE, device=device)
    if kl.dtype == torch.bool or kl.dtype.is_complex:
        raise TypeError(f"kl must be {expected}; got a {kl.dtype} tensor")
    if kl.numel() != 1:
        raise ValueError(f"kl must be a scalar (a float or a one-element tensor); got shape {tuple(kl.shape)}")
    if kl.device not in (device, torch.device("cpu")):
        raise ValueError(f"kl must be on the log-probs' device ({device}) or the CPU; got {kl.device}")
    kl = kl.detach().reshape(()).to(LOSS_MATH_DTYPE)
    return check_values("kl", kl, torch.isfinite(kl), "finite").to(device)


def _check_ld_alpha(ld_alpha: float | None) -> None:
    if ld_alpha is not None and not 0 <= check_real("ld_alpha", ld_alpha, "None or a number in [0, 1]") <= 1:
        raise ValueError(f"ld_alpha must be None or a number in [0, 1]; got {ld_alpha!r}")


def _check_mask(name: str, mask: torch.Tensor, shape: str) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor of shape {shape}; got {got}")
    if mask.dim() != 2:
        raise ValueError(f"{name} must have shape {shape}; got {tuple(mask.shape)}")


def check_dpo_options(
    beta: float,
    loss_type: str | Sequence[str],
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    *,
    average_log_prob: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = DISCOPOP_TAU,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
) -> list[tuple[str, float]]:
    """Validates the DPO options (DPOLoss calls it at construction); returns [(loss type, weight)]."""
    check_positive("beta", beta)
    if not isinstance(loss_type, (str, Sequence)):
        raise TypeError(f"loss_type must be a str or a list of str; got {type(loss_type).__name__}")
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError(f"loss_type must name at least one of {list(DPO_LOSS_TYPES)}")
    for t in types:
        if t not in DPO_LOSS_TYPES:
            raise ValueError(f"Unsupported loss_type {t!r}: not one of {list(DPO_LOSS_TYPES)}")
    # Any finite weights, negative ones too: TRL 1.16 checks only their count.
    if loss_weights is not None and (isinstance(loss_weights, str) or not isinstance(loss_weights, Sequence)):
        raise TypeError(f"loss_weights must be a list of numbers, one per loss_type; got {type(loss_weights).__name__}")
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights must have one weight per loss_type ({len(types)}); got {len(weights)}")
    weights = [check_real(f"loss_weights[{i}]", w, "a finite number") for i, w in enumerate(weights)]
    if not all(map(math.isfinite, weights)):
        raise ValueError(f"loss_weights must hold finite numbers; got {loss_weights!r}")
    # The texts of the robust and exo_pair cases are Liger's, whose own tests match them.
    check_real("label_smoothing", label_smoothing, "a number in [0, 1)")
    if "robust" in types and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0.0, 0.5) for loss_type='robust'; got {label_smoothing!r}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")
    if "exo_pair" in types and label_smoothing == 0:
        raise ValueError("label_smoothing must be > 0 for loss_type='exo_pair' (the EXO paper uses 1e-3)")
    check_flag("average_log_prob", average_log_prob)
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type {f_divergence_type!r} is not one of {list(F_DIVERGENCE_TYPES)}")
    unsupported = [t for t in types if t not in F_DIVERGENCE_LOSS_TYPES]
    if f_divergence_type != "reverse_kl" and unsupported:
        raise ValueError(
            f"f_divergence_type {f_divergence_type!r} works only with loss_type in {list(F_DIVERGENCE_LOSS_TYPES)} "
            f"(f-DPO's log Z(x) cancels only in the chosen-minus-rejected difference); got {unsupported}"
        )
    if not math.isfinite(check_real("f_alpha_divergence_coef", f_alpha_divergence_coef, "a finite number")):
        raise ValueError(f"f_alpha_divergence_coef must be a finite number; got {f_alpha_divergence_coef!r}")
    check_positive("discopop_tau", discopop_tau)
    _check_ld_alpha(ld_alpha)
    check_flag("use_weighting", use_weighting)
    sorted_types = [t for t in types if t in ("aot", "aot_unpaired")]
    if use_weighting and sorted_types:
        raise ValueError(
            f"use_weighting=True cannot be combined with loss_type {sorted_types}: they sort the pairs across the "
            "batch, so a pair's weight would land on another pair's loss"
        )
    return list(zip(types, weights))


def check_kto_options(
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    loss_type: str,
    *,
    average_log_prob: bool = False,
    clamp_kl: bool = True,
) -> None:
    """Validates kto_loss's hyper-parameters (KTOLoss calls it at construction)."""
    check_positive("beta", beta)
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not 0 <= check_real(name, w, "a finite number >= 0") < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0; got {w!r}")
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"Unsupported loss_type {loss_type!r}: not one of {list(KTO_LOSS_TYPES)}")
    check_flag("average_log_prob", average_log_prob)
    check_flag("clamp_kl", clamp_kl)


# ---------------------------------------------------------------------------------------------- sequences


def sequence_token_weights(
    mask: torch.Tensor, *, average_log_prob: bool = False, ld_alpha: float | None = None
) -> torch.Tensor:
    """The per-token weights w that turn token log-probs into the sequence log-prob sum_t w_t * logp_t.

    Args:
        mask: [R, T] bool, True on the completion tokens. With ld_alpha, R = 2B: the B chosen rows first.
        average_log_prob: divide by the completion length (clamped to >= 1): the per-token mean, Liger's
            `average_log_prob` (default False: the sum, as TRL).
        ld_alpha: LD-DPO (arXiv 2409.06411), TRL's `ld_alpha` in [0, 1]: a pair's first
            min(chosen length, rejected length) completion tokens weigh 1 and the longer completion's verbose
            rest weighs ld_alpha (default None: every token 1). With average_log_prob too, the LD-weighted sum
            is divided by the completion length.

    Returns:
        [R, T] float32: 0 off the mask, 1 (sum), 1 / length (mean), or ld_alpha beyond the shared prefix.

    The DPO losses take sums (`dpo_loss(average_log_prob=True)` divides them by the lengths, which is the
    same as summing with these weights), so the fused paths sum with `sequence_logps(..., ld_alpha=...)`.
    """
    _check_mask("mask", mask, "[R, T]")
    check_flag("average_log_prob", average_log_prob)
    _check_ld_alpha(ld_alpha)
    weights = mask.to(torch.float32)
    if ld_alpha is not None:
        check_paired_batch("mask", mask, "[2B, T]")
        lengths = mask.sum(-1)
        shared = torch.minimum(*lengths.chunk(2)).repeat(2)  # the pair's shared length, on both of its rows
        weights = torch.where(mask.cumsum(-1) > shared[:, None], float(ld_alpha), weights)
        weights = weights * mask
    if average_log_prob:
        weights = weights / mask.sum(-1, keepdim=True).clamp(min=1)
    return weights


def sequence_logps(
    token_logps: torch.Tensor, mask: torch.Tensor, *, average_log_prob: bool = False, ld_alpha: float | None = None
) -> torch.Tensor:
    """[R] sequence log-probs sum_t w_t * token_logps[r, t] with w = `sequence_token_weights(mask, ...)`.

    token_logps: [R, T] float (differentiable); mask: [R, T] bool, True on the completion tokens.
    """
    if not isinstance(token_logps, torch.Tensor) or token_logps.shape != mask.shape:
        got = tuple(token_logps.shape) if isinstance(token_logps, torch.Tensor) else type(token_logps).__name__
        raise ValueError(f"token_logps must have the mask's shape {tuple(mask.shape)}; got {got}")
    weights = sequence_token_weights(mask, average_log_prob=average_log_prob, ld_alpha=ld_alpha)
    return (token_logps * weights).sum(-1)


@torch.no_grad()
def wpo_weights(token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO's sequence weights (arXiv 2406.11827, eq. 2, as TRL 1.16 computes them), detached.

    exp(mean over the completion tokens of log p(y_t) - log sum_v p_v^2): the probability of the completion
    under the policy, per token, relative to that of a sample from the policy. The loss of a pair is
    multiplied by the product of its two weights.

    Args:
        token_logps: [R, T] float, the label log-probs; log_sum_sq_probs: [R, T] float, log sum_v p_v^2 at
            each position (`token_stats(..., log_sum_sq_probs=True)`); mask: [R, T] bool completion tokens.

    Returns:
        [R] float64 weights in (0, 1]; 1 for a row without completion tokens.
    """
    _check_mask("mask", mask, "[R, T]")
    for name, x in (("token_logps", token_logps), ("log_sum_sq_probs", log_sum_sq_probs)):
        if not isinstance(x, torch.Tensor) or x.shape != mask.shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must have the mask's shape {tuple(mask.shape)}; got {got}")
    aligned = torch.where(mask, token_logps.to(LOSS_MATH_DTYPE) - log_sum_sq_probs.to(LOSS_MATH_DTYPE), 0.0)
    return torch.exp(aligned.sum(-1) / mask.sum(-1).clamp(min=1))


def _masked_row_means(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[R] mean of x [R, T] over each row's True mask positions (0 for an empty row), detached."""
    return torch.where(mask, x.detach().to(LOSS_MATH_DTYPE), 0.0).sum(-1) / mask.sum(-1).clamp(min=1)


# ---------------------------------------------------------------------------------------------- DPO


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    average_log_prob: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = DISCOPOP_TAU,
    pair_weights: torch.Tensor | None = None,
    return_per_example: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """Any of TRL DPOTrainer's losses (or a weighted sum of several) from per-sequence log-probs.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] float, summed over each completion's tokens (with
            LD-DPO, the LD-weighted sums: `sequence_logps(..., ld_alpha=...)`). Gradients flow to these two only.
        ref_chosen_logps, ref_rejected_logps: [B] float, the same under the reference model (detached here).
        beta: > 0 (default 0.1); for "ipo" it is the paper's tau.
        loss_type: one of DPO_LOSS_TYPES, or a list of them (default "sigmoid").
        loss_weights: a list of one weight per loss type (default all 1.0); the loss is sum_i w_i * mean(loss_i).
            Any finite numbers, negative ones too, as TRL 1.16 (which checks only their count).
        label_smoothing: in [0, 1) (default 0.0): the flip probability of "robust" (< 0.5), EXO's epsilon of
            "exo_pair" (> 0), and the smoothing of "aot"/"aot_unpaired". The other types ignore it, as in TRL.
        chosen_lengths, rejected_lengths: [B] completion token counts (integer or float tensors, finite, >= 0; 0
            for a fully masked completion), needed by "ipo", "sigmoid_norm", "sft" and average_log_prob (clamped
            to >= 1). A bad count raises on the CPU; on an accelerator it makes the loss NaN (no host sync).
        average_log_prob: the losses compare per-token means: all four inputs are divided by the lengths
            (default False). "sft" still averages the NLL over all chosen tokens of the batch; "ipo" and
            "sigmoid_norm", which compare per-token means anyway, take the means as they are (no second
            division): under reverse KL the same loss as without the option.
        f_divergence_type: f-DPO's regulariser, one of F_DIVERGENCE_TYPES (default "reverse_kl", DPO's).
            The others replace each log-ratio u by f'(e^u) in the loss types of F_DIVERGENCE_LOSS_TYPES:
            forward_kl 1 - e^-u, js_divergence log 2 + log sigmoid(u), alpha_divergence
            (e^((a-1)u) - 1) / (a - 1) with a = f_alpha_divergence_coef (default 0.5; the exponent clamped
            at 80 as in TRL; a within 1e-6 of 1 is reverse KL). Rewards stay beta * u, as TRL logs them.
        discopop_tau: DiscoPOP's temperature, > 0 (default 0.05, the paper's).
        pair_weights: [B] float weights, detached, multiplying each pair's loss before the batch mean
            (default None: 1); WPO: `wpo_weights(...)` of the chosen rows times that of the rejected rows.
        return_per_example: also return a third value, per-example outputs (default False).

    Returns:
        (loss, metrics), or (loss, metrics, per_example) with return_per_example: the scalar loss (float32,
        or float64 for float64 inputs); detached batch means named as TRL logs them: rewards/chosen,
        rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected; and per_example,
        detached [B] tensors of the same dtype under the same names: logps/chosen, logps/rejected (the values
        the loss compares: per-token means with average_log_prob), rewards/chosen, rewards/rejected, and nll
        (the mean NLL per chosen token, when the lengths are given). Nothing syncs with the device.
    """
    _check_sequence_logps(
        {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "ref_chosen_logps": ref_chosen_logps,
            "ref_rejected_logps": ref_rejected_logps,
        }
    )
    return _dpo(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_sums=policy_chosen_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        beta=beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        label_smoothing=label_smoothing,
        average_log_prob=average_log_prob,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau,
        pair_weights=pair_weights,
        return_per_example=return_per_example,
    )


def _dpo(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    chosen_sums: torch.Tensor,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    average_log_prob: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = DISCOPOP_TAU,
    pair_weights: torch.Tensor | None = None,
    logits_means: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_per_example: bool = False,
    out_dtype: torch.dtype | None = None,
):
    """`dpo_loss` on checked [B] inputs; chosen_sums are the plain chosen sums that "sft" and the NLL read.
    The results have out_dtype (default: the inputs' dtype, at least float32)."""
    terms = check_dpo_options(
        beta,
        loss_type,
        loss_weights,
        label_smoothing,
        average_log_prob=average_log_prob,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau,
    )
    check_flag("return_per_example", return_per_example)
    types = [t for t, _ in terms]
    needs = [t for t in types if t in NEEDS_LENGTHS] + (["average_log_prob"] if average_log_prob else [])
    if needs and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"{needs} needs chosen_lengths and rejected_lengths (completion token counts)")
    if chosen_lengths is not None:
        chosen_lengths = _check_lengths("chosen_lengths", chosen_lengths, chosen)
    if rejected_lengths is not None:
        rejected_lengths = _check_lengths("rejected_lengths", rejected_lengths, chosen)
    if pair_weights is not None:
        _check_sequence_logps({"policy_chosen_logps": chosen, "pair_weights": pair_weights})
        pair_weights = pair_weights.detach().to(LOSS_MATH_DTYPE)

    dtype = torch.promote_types(chosen.dtype, torch.float32) if out_dtype is None else out_dtype
    values = [chosen, rejected, ref_chosen.detach(), ref_rejected.detach()]
    values = [x.to(LOSS_MATH_DTYPE) for x in values]
    if average_log_prob:
        lengths = (chosen_lengths, rejected_lengths) * 2
        values = [x / n.clamp(min=1) for x, n in zip(values, lengths)]
    pairs = _Pairs(
        *values,
        chosen_sums.to(LOSS_MATH_DTYPE),
        chosen_lengths,
        rejected_lengths,
        float(beta),
        float(label_smoothing),
        f_divergence_type,
        float(f_alpha_divergence_coef),
        float(discopop_tau),
        average_log_prob,
    )
    per_pair = sum(weight * _PER_SEQUENCE[t](pairs) for t, weight in terms)
    if pair_weights is not None:
        per_pair = per_pair * pair_weights
    loss = per_pair.mean().to(dtype)
    metrics = {name: value.to(dtype) for name, value in _dpo_metrics(pairs).items()}
    if not return_per_example:
        return loss, metrics
    return loss, metrics, _dpo_per_example(pairs, logits_means, dtype)


def _dpo_metrics(p: _Pairs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        chosen_rewards = p.beta * p.chosen_logratios
        rejected_rewards = p.beta * p.rejected_logratios
        return {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": p.chosen.mean(),
            "logps/rejected": p.rejected.mean(),
        }


@torch.no_grad()
def _dpo_per_example(
    p: _Pairs, logits_means: tuple[torch.Tensor, torch.Tensor] | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    out = {
        "logps/chosen": p.chosen,
        "logps/rejected": p.rejected,
        "rewards/chosen": p.beta * p.chosen_logratios,
        "rewards/rejected": p.beta * p.rejected_logratios,
    }
    if p.chosen_lengths is not None:
        out["nll"] = -p.chosen_sums / p.chosen_lengths.clamp(min=1)
    if logits_means is not None:
        out["logits/chosen"], out["logits/rejected"] = logits_means
    return {name: value.detach().to(dtype) for name, value in out.items()}


def reference_logps(
    ref_logps: dict[str, torch.Tensor | None],
    source_name: str,
    source: torch.Tensor | None,
    like: torch.Tensor,
    like_name: str,
    compute: Callable[[torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """The reference log-probs, one tensor per name in ref_logps: as given, or `compute(source)` ([R] per-sequence
    sums, under no_grad) split into as many equal parts along the batch; never both. `source` (the reference
    logits or hidden states) must have `like`'s shape but for the last dimension."""
    given = [name for name, value in ref_logps.items() if value is not None]
    if source is None:
        if len(given) != len(ref_logps):
            raise ValueError(f"pass {' and '.join(ref_logps)}, or {source_name}")
        return list(ref_logps.values())
    if given:
        raise ValueError(f"pass either {source_name} or {' and '.join(ref_logps)}, not both")
    if not isinstance(source, torch.Tensor) or source.shape[:-1] != like.shape[:-1]:
        got = tuple(source.shape) if isinstance(source, torch.Tensor) else type(source).__name__
        raise ValueError(f"{source_name} must have shape [*{tuple(like.shape[:-1])}, ...] like {like_name}; got {got}")
    check_float(source_name, source)  # here, or the log-prob op would name the policy's argument
    if source.device != like.device:
        raise ValueError(f"{source_name} must be on the device of {like_name} ({like.device}); got {source.device}")
    with torch.no_grad():
        ref = compute(source.detach())
    return list(ref.chunk(len(ref_logps)))


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must have shape [batch, T, V]; got {got}")


def _reference_from_logits(ref_logps, ref_logits, logits, labels, ignore_index, ld_alpha=None) -> list[torch.Tensor]:
    """`reference_logps` with the reference logits as the source, summed as the policy's (LD-weighted or not)."""
    mask = labels != ignore_index

    def compute(z: torch.Tensor) -> torch.Tensor:  # float64 sums, as the policy's
        token_logps = token_logprobs(z, labels, ignore_index=ignore_index).to(LOSS_MATH_DTYPE)
        return sequence_logps(token_logps, mask, ld_alpha=ld_alpha)

    return reference_logps(ref_logps, "ref_logits", ref_logits, logits, "the logits", compute)


def _token_stats(logits, labels, ignore_index, inplace_backward, *, log_sum_sq_probs=False, mean_logits=False):
    """token_stats without entropy and argmax, with the extras the options need."""
    _check_logits(logits)
    return token_stats(
        logits, labels, ignore_index=ignore_index, entropy=False, argmax=False, log_sum_sq_probs=log_sum_sq_probs,
        mean_logits=mean_logits, inplace_backward=inplace_backward,
    )  # fmt: skip


def dpo_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    ref_logits: torch.Tensor | None = None,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    **options,
):
    """`dpo_loss` straight from the policy logits, through the fused log-prob kernel.

    Args:
        logits: [2B, T, V] float32/bfloat16/float16, the B chosen rows first, then the B rejected ones.
        labels: [2B, T] int64 aligned with the logits (the caller shifts); ignore_index marks prompt and padding.
        ref_chosen_logps, ref_rejected_logps: [B] reference sums over the completions (LD-weighted with
            ld_alpha, as TRL precomputes them); or instead
        ref_logits: [2B, T, V'] reference logits, read under no_grad.
        inplace_backward: write d logits over the logits buffer (see `token_logprobs`).
        options: `dpo_loss_from_token_logps`'s: every `dpo_loss` option, plus ld_alpha and use_weighting; the
            completion lengths come from the labels. With return_per_example the per-example outputs add logits/chosen
            and logits/rejected, the mean logit over each completion's tokens.
    """
    check_paired_batch("logits", logits, "[2B, T, V]")
    stats = _token_stats(
        logits,
        labels,
        ignore_index,
        inplace_backward,
        log_sum_sq_probs=options.get("use_weighting", False),
        mean_logits=options.get("return_per_example", False),
    )
    ref_chosen, ref_rejected = _reference_from_logits(
        {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps},
        ref_logits,
        logits,
        labels,
        ignore_index,
        options.get("ld_alpha"),
    )
    return dpo_loss_from_token_logps(
        stats.logprobs,
        labels != ignore_index,
        ref_chosen,
        ref_rejected,
        log_sum_sq_probs=stats.log_sum_sq_probs,
        mean_logits=stats.mean_logits,
        **options,
    )


def check_paired_batch(name: str, x: torch.Tensor, shape: str) -> None:
    """The fused DPO paths stack the B chosen rows, then the B rejected ones: the batch must be even."""
    if x.dim() >= 1 and x.shape[0] % 2:
        raise ValueError(f"{name} must have an even batch {shape}, the B chosen rows first; got batch {x.shape[0]}")


def paired_dpo_loss(
    logps: torch.Tensor,
    lengths: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    **options,
):
    """`dpo_loss` on per-sequence sums [2B] and completion lengths [2B], the B chosen rows first. Takes
    `dpo_loss`'s options; ld_alpha and use_weighting need the per-token log-probs: `dpo_loss_from_token_logps`."""
    chosen, rejected = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    return dpo_loss(
        chosen,
        rejected,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        **options,
    )


def dpo_loss_from_token_logps(
    token_logps: torch.Tensor,
    mask: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    log_sum_sq_probs: torch.Tensor | None = None,
    mean_logits: torch.Tensor | None = None,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    **options,
):
    """`dpo_loss` from the per-token log-probs of the 2B rows, the B chosen rows first: the last step of the
    fused DPO paths (from logits, the TRL trainer), where the token-level options live.

    Args:
        token_logps: [2B, T] float, the label log-probs (differentiable); mask: [2B, T] bool completion tokens.
        ref_chosen_logps, ref_rejected_logps: [B] the reference's sums, LD-weighted like the policy's when
            ld_alpha is set (`sequence_logps(ref_token_logps, mask, ld_alpha=ld_alpha)`); average_log_prob
            divides them by the lengths here, as the policy's.
        log_sum_sq_probs: [2B, T] float log sum_v p_v^2, needed by use_weighting.
        mean_logits: [2B, T] float mean logit over the vocabulary per position, or None: with
            return_per_example the per-example outputs add logits/chosen and logits/rejected, its mean over
            each completion's tokens.
        ld_alpha: LD-DPO's weight of the verbose tokens (see `sequence_token_weights`; default None). "sft"
            and the NLL read the plain sums, as in TRL.
        use_weighting: WPO (default False): each pair's loss times the `wpo_weights` of its two rows.
        options: `dpo_loss`'s other keyword options (beta, loss_type, ..., return_per_example).
    """
    _check_mask("mask", mask, "[2B, T]")
    check_paired_batch("mask", mask, "[2B, T]")
    check_dpo_options(
        options.get("beta", 0.1),
        options.get("loss_type", "sigmoid"),
        options.get("loss_weights"),
        options.get("label_smoothing", 0.0),
        ld_alpha=ld_alpha,
        use_weighting=use_weighting,
    )
    # Summed in float64 (one rounding, at the loss's output): an fp32 sum over a long completion keeps ~sqrt(T)
    # roundings, which losses that square or exponentiate the log-ratios (sppo_hard, f-divergences) amplify.
    out_dtype = torch.promote_types(token_logps.dtype, torch.float32)
    sums = sequence_logps(token_logps.to(LOSS_MATH_DTYPE), mask)
    logps = sums if ld_alpha is None else sequence_logps(token_logps.to(LOSS_MATH_DTYPE), mask, ld_alpha=ld_alpha)
    chosen, rejected = logps.chunk(2)
    chosen_lengths, rejected_lengths = mask.sum(-1).chunk(2)
    _check_sequence_logps(
        {"policy_chosen_logps": chosen, "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    )
    pair_weights = None
    if use_weighting:
        if log_sum_sq_probs is None:
            raise ValueError("use_weighting=True needs log_sum_sq_probs (token_stats(..., log_sum_sq_probs=True))")
        chosen_weights, rejected_weights = wpo_weights(token_logps, log_sum_sq_probs, mask).chunk(2)
        pair_weights = chosen_weights * rejected_weights
    logits_means = None
    if mean_logits is not None:
        logits_means = _masked_row_means(mean_logits, mask).chunk(2)
    return _dpo(
        chosen,
        rejected,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_sums=sums.chunk(2)[0],
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        pair_weights=pair_weights,
        logits_means=logits_means,
        out_dtype=out_dtype,
        **options,
    )


# ---------------------------------------------------------------------------------------------- KTO


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float | None = None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    lengths: torch.Tensor | None = None,
    average_log_prob: bool = False,
    clamp_kl: bool = True,
    return_per_example: bool = False,
):
    """TRL's KTO loss (KTO paper eq. 7) from per-sequence log-probs, with the KL estimate as an input.

    Args:
        policy_logps: [B] float, summed over each completion; gradients flow to it only.
        ref_logps: [B] float, the same under the reference model (detached here).
        desirable: [B] bool, True for a desirable (chosen) completion, as TRL's "label".
        kl: the batch KL estimate, finite, a real number or a one-element real tensor (a bad tensor value raises on
            the CPU and makes the loss NaN on an accelerator, without a host sync): TRL takes mean(policy - reference
            log-probs) over mismatched (prompt, completion) pairs, averaged across ranks. It is detached here.
            Required for "kto"; "apo_zero_unpaired" uses none (None means 0).
        beta: > 0 (default 0.1).
        desirable_weight, undesirable_weight: >= 0 weights of the two kinds of example (default 1.0).
        loss_type: "kto" (default) or "apo_zero_unpaired".
        lengths: [B] completion token counts, needed by average_log_prob and the per-example NLL.
        average_log_prob: compare per-token means: policy_logps and ref_logps are divided by the lengths
            (clamped to >= 1; default False, as TRL).
        clamp_kl: clamp the KL estimate at 0, as TRL (default True); False passes a negative estimate
            through, as Liger does.
        return_per_example: also return a third value, per-example outputs (default False).

    Returns:
        (loss, metrics), or (loss, metrics, per_example) with return_per_example: the mean over all B examples
        of the weighted per-example losses; detached metrics with TRL's names: kl, rewards/chosen,
        rewards/rejected, rewards/margins, logps/chosen, logps/rejected (means over the desirable /
        undesirable examples; NaN for a kind absent from the batch, where TRL skips the entry); and
        per_example, detached [B] tensors: logps (the values the loss compares), rewards, and nll (the mean
        NLL per completion token, when lengths are given).
    """
    first = _check_sequence_logps({"policy_logps": policy_logps, "ref_logps": ref_logps})
    return _kto(
        policy_logps,
        ref_logps,
        desirable,
        kl,
        lengths=None if lengths is None else _check_lengths("lengths", lengths, first),
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        loss_type=loss_type,
        average_log_prob=average_log_prob,
        clamp_kl=clamp_kl,
        return_per_example=return_per_example,
    )


def _kto(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float | None,
    *,
    lengths: torch.Tensor | None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    average_log_prob: bool = False,
    clamp_kl: bool = True,
    return_per_example: bool = False,
    logits_means: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
):
    """`kto_loss` on checked [B] log-prob sums and float64 lengths (or None); results in out_dtype (default: the
    inputs' dtype, at least float32)."""
    first = policy_logps
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool:
        got = desirable.dtype if isinstance(desirable, torch.Tensor) else type(desirable).__name__
        raise TypeError(f"desirable must be a bool tensor of shape {tuple(first.shape)}; got {got}")
    if desirable.shape != first.shape or desirable.device != first.device:
        raise ValueError(
            f"desirable must have shape {tuple(first.shape)} on {first.device}; "
            f"got {tuple(desirable.shape)} on {desirable.device}"
        )
    check_kto_options(
        beta, desirable_weight, undesirable_weight, loss_type, average_log_prob=average_log_prob, clamp_kl=clamp_kl
    )
    check_flag("return_per_example", return_per_example)
    if average_log_prob and lengths is None:
        raise ValueError("average_log_prob=True needs lengths (completion token counts)")
    dtype = torch.promote_types(first.dtype, torch.float32) if out_dtype is None else out_dtype
    if kl is None:
        if loss_type == "kto":
            raise ValueError("kl (the batch KL estimate) is required for loss_type 'kto'")
        kl = 0.0
    kl = _check_kl(kl, first.device)
    beta, desirable_weight, undesirable_weight = float(beta), float(desirable_weight), float(undesirable_weight)
    if clamp_kl:
        kl = kl.clamp(min=0)

    logps = policy_logps.to(LOSS_MATH_DTYPE)
    ref = ref_logps.detach().to(LOSS_MATH_DTYPE)
    if average_log_prob:
        logps, ref = logps / lengths.clamp(min=1), ref / lengths.clamp(min=1)
    logratios = logps - ref
    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (logratios - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - logratios))
    else:  # apo_zero_unpaired: APO-zero (arXiv 2408.06266, eq. 7) without pairs
        chosen_losses = 1 - torch.sigmoid(beta * logratios)
        rejected_losses = torch.sigmoid(beta * logratios)
    losses = torch.where(desirable, desirable_weight * chosen_losses, undesirable_weight * rejected_losses)

    with torch.no_grad():
        rewards = beta * logratios
        logps = logps.detach()

        def group_mean(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
            return torch.where(group, x, 0).sum() / group.sum()  # 0 / 0 = NaN for an empty group

        metrics = {
            "kl": kl if loss_type == "kto" else torch.zeros_like(kl),  # TRL logs 0 for a loss that reads no KL
            "rewards/chosen": group_mean(rewards, desirable),
            "rewards/rejected": group_mean(rewards, ~desirable),
            "logps/chosen": group_mean(logps, desirable),
            "logps/rejected": group_mean(logps, ~desirable),
        }
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        metrics = {name: value.to(dtype) for name, value in metrics.items()}
        per_example = {"logps": logps, "rewards": rewards}
        if lengths is not None:
            per_example["nll"] = -policy_logps.detach().to(LOSS_MATH_DTYPE) / lengths.clamp(min=1)
        if logits_means is not None:
            per_example["logits"] = logits_means
        per_example = {name: value.to(dtype) for name, value in per_example.items()}
    loss = losses.mean().to(dtype)
    return (loss, metrics, per_example) if return_per_example else (loss, metrics)


def kto_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    desirable: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    kl: torch.Tensor | float | None = None,
    *,
    ref_logits: torch.Tensor | None = None,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    **options,
):
    """`kto_loss` straight from the policy logits [B, T, V] and labels [B, T] (aligned; the caller shifts).

    The reference comes as ref_logps [B] (sums) or as ref_logits [B, T, V'] (read under no_grad). options are
    `kto_loss`'s keyword options; the lengths come from the labels, and with return_per_example the
    per-example outputs add logits, the mean logit over each completion's tokens.
    """
    stats = _token_stats(
        logits, labels, ignore_index, inplace_backward, mean_logits=options.get("return_per_example", False)
    )
    mask = labels != ignore_index
    logps = sequence_logps(stats.logprobs.to(LOSS_MATH_DTYPE), mask)  # float64, as dpo_loss_from_token_logps
    (ref,) = _reference_from_logits({"ref_logps": ref_logps}, ref_logits, logits, labels, ignore_index)
    _check_sequence_logps({"policy_logps": logps, "ref_logps": ref})
    logits_means = None if stats.mean_logits is None else _masked_row_means(stats.mean_logits, mask)
    lengths = mask.sum(-1).to(LOSS_MATH_DTYPE)
    return _kto(logps, ref, desirable, kl, lengths=lengths, logits_means=logits_means, out_dtype=torch.float32,
                **options)  # fmt: skip
