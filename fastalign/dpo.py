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

from fastalign._backend import check_positive
from fastalign.logprobs import token_logprobs

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
# The DPO and KTO losses run in float64 on their [B] per-sequence inputs and return the inputs' dtype (at least
# float32). It costs nothing next to the log-prob pass, and in fp32 a loss whose terms cancel (APO-down,
# DiscoPOP near its switch point, hinge-like sigmoids near 1) keeps only 1e-3 of its gradient's precision.
LOSS_MATH_DTYPE = torch.float64


class _Pairs(NamedTuple):
    """What the per-sequence losses read: policy and reference log-probs [B], their ratios, lengths."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_lengths: torch.Tensor | None
    rejected_lengths: torch.Tensor | None
    beta: float
    label_smoothing: float

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

    def per_token(self, logratios: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return logratios / lengths.clamp(min=1)


def _smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): the logistic loss with flipped-label probability eps."""
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def _sigmoid(p: _Pairs) -> torch.Tensor:
    return -F.logsigmoid(p.beta * p.margin)


def _hinge(p: _Pairs) -> torch.Tensor:
    return torch.relu(1 - p.beta * p.margin)


def _ipo(p: _Pairs) -> torch.Tensor:
    # Length-normalised, as TRL does with the IPO authors' agreement; beta is the paper's tau.
    delta = p.per_token(p.chosen_logratios, p.chosen_lengths) - p.per_token(p.rejected_logratios, p.rejected_lengths)
    return (delta - 1 / (2 * p.beta)) ** 2


def _exo_pair(p: _Pairs) -> torch.Tensor:
    # EXO-pref (arXiv 2402.00856, eq. 16): KL(softmax over the pair || [1 - eps, eps]).
    z = p.beta * p.margin
    eps = p.label_smoothing
    chosen_term = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
    return chosen_term + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))


def _nca_pair(p: _Pairs) -> torch.Tensor:
    chosen, rejected = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _robust(p: _Pairs) -> torch.Tensor:
    z, eps = p.beta * p.margin, p.label_smoothing
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
    z = p.beta * p.margin
    mix = torch.sigmoid(z / DISCOPOP_TAU)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def _sft(p: _Pairs) -> torch.Tensor:
    # NLL of the chosen completions, averaged over all their tokens in the batch (as TRL), one value per pair.
    nll = -p.chosen.sum() / p.chosen_lengths.sum().clamp(min=1)
    return nll.expand_as(p.chosen)


def _sigmoid_norm(p: _Pairs) -> torch.Tensor:
    delta = p.per_token(p.chosen_logratios, p.chosen_lengths) - p.per_token(p.rejected_logratios, p.rejected_lengths)
    return -F.logsigmoid(p.beta * delta)


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
    return lengths.to(like.dtype)


def check_dpo_options(
    beta: float, loss_type: str | Sequence[str], loss_weights: Sequence[float] | None, label_smoothing: float
) -> list[tuple[str, float]]:
    """Validates dpo_loss's hyper-parameters (DPOLoss calls it at construction); returns [(loss type, weight)]."""
    check_positive("beta", beta)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError(f"loss_type must name at least one of {list(DPO_LOSS_TYPES)}")
    for t in types:
        if t not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type {t!r} is not one of {list(DPO_LOSS_TYPES)}")
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights must have one weight per loss_type ({len(types)}); got {len(weights)}")
    if not (isinstance(label_smoothing, (int, float)) and 0 <= label_smoothing < 1):
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")
    if "robust" in types and not label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for loss_type 'robust'; got {label_smoothing}")
    if "exo_pair" in types and label_smoothing == 0:
        raise ValueError("label_smoothing must be > 0 for loss_type 'exo_pair' (the EXO paper uses 1e-3)")
    return list(zip(types, (float(w) for w in weights)))


def check_kto_options(beta: float, desirable_weight: float, undesirable_weight: float, loss_type: str) -> None:
    """Validates kto_loss's hyper-parameters (KTOLoss calls it at construction)."""
    check_positive("beta", beta)
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not (isinstance(w, (int, float)) and 0 <= w < math.inf):
            raise ValueError(f"{name} must be a finite number >= 0; got {w!r}")
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {list(KTO_LOSS_TYPES)}")


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Any of TRL DPOTrainer's losses (or a weighted sum of several) from per-sequence log-probs.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] float, summed over each completion's tokens.
            Gradients flow to these two only.
        ref_chosen_logps, ref_rejected_logps: [B] float, the same under the reference model (detached here).
        beta: > 0 (default 0.1); for "ipo" it is the paper's tau.
        loss_type: one of DPO_LOSS_TYPES, or a list of them (default "sigmoid").
        loss_weights: one weight per loss type (default all 1.0); the loss is sum_i w_i * mean(loss_i).
        label_smoothing: in [0, 1) (default 0.0): the flip probability of "robust" (< 0.5), EXO's epsilon of
            "exo_pair" (> 0), and the smoothing of "aot"/"aot_unpaired". The other types ignore it, as in TRL.
        chosen_lengths, rejected_lengths: [B] completion token counts, needed by "ipo", "sigmoid_norm" and
            "sft" (clamped to >= 1).

    Returns:
        (loss, metrics): the scalar loss (float32, or float64 for float64 inputs) and detached batch means
        named as TRL logs them: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
        logps/chosen, logps/rejected.
    """
    first = _check_sequence_logps(
        {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "ref_chosen_logps": ref_chosen_logps,
            "ref_rejected_logps": ref_rejected_logps,
        }
    )
    terms = check_dpo_options(beta, loss_type, loss_weights, label_smoothing)
    types = [t for t, _ in terms]
    dtype = torch.promote_types(first.dtype, torch.float32)
    chosen, rejected = policy_chosen_logps.to(LOSS_MATH_DTYPE), policy_rejected_logps.to(LOSS_MATH_DTYPE)
    if any(t in NEEDS_LENGTHS for t in types):
        if chosen_lengths is None or rejected_lengths is None:
            needs = [t for t in types if t in NEEDS_LENGTHS]
            raise ValueError(f"loss_type {needs} needs chosen_lengths and rejected_lengths (completion token counts)")
    if chosen_lengths is not None:
        chosen_lengths = _check_lengths("chosen_lengths", chosen_lengths, chosen)
    if rejected_lengths is not None:
        rejected_lengths = _check_lengths("rejected_lengths", rejected_lengths, chosen)
    pairs = _Pairs(
        chosen,
        rejected,
        ref_chosen_logps.detach().to(LOSS_MATH_DTYPE),
        ref_rejected_logps.detach().to(LOSS_MATH_DTYPE),
        chosen_lengths,
        rejected_lengths,
        float(beta),
        float(label_smoothing),
    )
    loss = sum(weight * _PER_SEQUENCE[t](pairs).mean() for t, weight in terms)
    return loss.to(dtype), {name: value.to(dtype) for name, value in _dpo_metrics(pairs).items()}


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


def _sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, inplace_backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of the label log-probs ([R], float32, differentiable) and completion lengths ([R])."""
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [batch, T, V]; got {tuple(logits.shape)}")
    token_logps = token_logprobs(logits, labels, ignore_index=ignore_index, inplace_backward=inplace_backward)
    return token_logps.sum(-1), (labels != ignore_index).sum(-1)


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
    with torch.no_grad():
        ref = compute(source.detach())
    return list(ref.chunk(len(ref_logps)))


def _reference_from_logits(ref_logps, ref_logits, logits, labels, ignore_index) -> list[torch.Tensor]:
    """`reference_logps` with the reference logits as the source."""
    compute = lambda z: token_logprobs(z, labels, ignore_index=ignore_index).sum(-1)
    return reference_logps(ref_logps, "ref_logits", ref_logits, logits, "the logits", compute)


def dpo_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    ref_logits: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`dpo_loss` straight from the policy logits, through the fused log-prob kernel.

    Args:
        logits: [2B, T, V] float32/bfloat16/float16, the B chosen rows first, then the B rejected ones.
        labels: [2B, T] int64 aligned with the logits (the caller shifts); ignore_index marks prompt and padding.
        ref_chosen_logps, ref_rejected_logps: [B] reference sums over the completions; or instead
        ref_logits: [2B, T, V'] reference logits, read under no_grad.
        inplace_backward: write d logits over the logits buffer (see `token_logprobs`).
        The other arguments are `dpo_loss`'s; the completion lengths come from the labels.
    """
    check_paired_batch("logits", logits, "[2B, T, V]")
    logps, lengths = _sequence_logps(logits, labels, ignore_index, inplace_backward)
    ref_chosen, ref_rejected = _reference_from_logits(
        {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps},
        ref_logits,
        logits,
        labels,
        ignore_index,
    )
    return paired_dpo_loss(
        logps,
        lengths,
        ref_chosen,
        ref_rejected,
        beta=beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        label_smoothing=label_smoothing,
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`dpo_loss` on per-sequence sums [2B] and completion lengths [2B], the B chosen rows first: the last step
    of every fused DPO path (from logits, from hidden states)."""
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL's KTO loss (KTO paper eq. 7) from per-sequence log-probs, with the KL estimate as an input.

    Args:
        policy_logps: [B] float, summed over each completion; gradients flow to it only.
        ref_logps: [B] float, the same under the reference model (detached here).
        desirable: [B] bool, True for a desirable (chosen) completion, as TRL's "label".
        kl: the batch KL estimate, a float or a 0-dim tensor: TRL takes mean(policy - reference log-probs)
            over mismatched (prompt, completion) pairs, averaged across ranks. It is detached and clamped at 0
            here, as in TRL. Required for "kto"; "apo_zero_unpaired" uses none (None means 0).
        beta: > 0 (default 0.1).
        desirable_weight, undesirable_weight: >= 0 weights of the two kinds of example (default 1.0).
        loss_type: "kto" (default) or "apo_zero_unpaired".

    Returns:
        (loss, metrics): the mean over all B examples of the weighted per-example losses, and detached metrics
        with TRL's names: kl, rewards/chosen, rewards/rejected, rewards/margins, logps/chosen, logps/rejected
        (means over the desirable / undesirable examples; NaN for a kind absent from the batch, where TRL
        skips the entry).
    """
    first = _check_sequence_logps({"policy_logps": policy_logps, "ref_logps": ref_logps})
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool:
        got = desirable.dtype if isinstance(desirable, torch.Tensor) else type(desirable).__name__
        raise TypeError(f"desirable must be a bool tensor of shape {tuple(first.shape)}; got {got}")
    if desirable.shape != first.shape or desirable.device != first.device:
        raise ValueError(
            f"desirable must have shape {tuple(first.shape)} on {first.device}; "
            f"got {tuple(desirable.shape)} on {desirable.device}"
        )
    check_kto_options(beta, desirable_weight, undesirable_weight, loss_type)
    dtype = torch.promote_types(first.dtype, torch.float32)
    if kl is None:
        if loss_type == "kto":
            raise ValueError("kl (the batch KL estimate) is required for loss_type 'kto'")
        kl = 0.0
    kl = torch.as_tensor(kl, dtype=LOSS_MATH_DTYPE, device=first.device).detach().clamp(min=0)
    if kl.dim() != 0:
        raise ValueError(f"kl must be a scalar (a float or a 0-dim tensor); got shape {tuple(kl.shape)}")

    logratios = policy_logps.to(LOSS_MATH_DTYPE) - ref_logps.detach().to(LOSS_MATH_DTYPE)
    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (logratios - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - logratios))
    else:  # apo_zero_unpaired: APO-zero (arXiv 2408.06266, eq. 7) without pairs
        chosen_losses = 1 - torch.sigmoid(beta * logratios)
        rejected_losses = torch.sigmoid(beta * logratios)
    losses = torch.where(desirable, desirable_weight * chosen_losses, undesirable_weight * rejected_losses)

    with torch.no_grad():
        rewards = beta * logratios
        logps = policy_logps.to(LOSS_MATH_DTYPE)

        def group_mean(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
            return torch.where(group, x, 0).sum() / group.sum()  # 0 / 0 = NaN for an empty group

        metrics = {
            "kl": kl,
            "rewards/chosen": group_mean(rewards, desirable),
            "rewards/rejected": group_mean(rewards, ~desirable),
            "logps/chosen": group_mean(logps, desirable),
            "logps/rejected": group_mean(logps, ~desirable),
        }
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.mean().to(dtype), {name: value.to(dtype) for name, value in metrics.items()}


def kto_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    desirable: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    kl: torch.Tensor | float | None = None,
    *,
    ref_logits: torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    ignore_index: int = -100,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`kto_loss` straight from the policy logits [B, T, V] and labels [B, T] (aligned; the caller shifts).

    The reference comes as ref_logps [B] or as ref_logits [B, T, V'] (read under no_grad).
    """
    logps, _ = _sequence_logps(logits, labels, ignore_index, inplace_backward)
    (ref,) = _reference_from_logits({"ref_logps": ref_logps}, ref_logits, logits, labels, ignore_index)
    return kto_loss(
        logps,
        ref,
        desirable,
        kl,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        loss_type=loss_type,
    )
