"""TRL's DPOTrainer and KTOTrainer on fastalign's fused log-prob head, losses and optimizer.

TRL computes its losses inline in `_compute_loss`, so a clean patch is impossible: these thin
subclasses replace that one method (and the reference forward) and keep everything else of TRL's:
datasets, collators, PEFT set-up, precomputed reference log-probs, evaluation, and the metric names.
Tested against TRL 1.16 (the pin in the `hf` extra).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
import trl
from trl.models.utils import disable_gradient_checkpointing

from fastalign.dpo import sequence_logps
from fastalign.integrations.adapters import is_peft_model, reference_adapter
from fastalign.integrations.causal_lm import IGNORE_INDEX, is_patched, patch_causal_lm
from fastalign.linear_losses import check_dpo_hidden_options, check_strategy, dpo_objective, kto_objective

_DPO_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
_KTO_NON_MODEL_KEYS = {
    "completion_mask",
    "KL_input_ids",
    "KL_attention_mask",
    "KL_completion_mask",
    "KL_token_type_ids",
    "KL_mm_token_type_ids",
    "label",
    "ref_logps",
    "ref_KL_logps",
}


class _ReferencesInFloat64:
    """The trainer's collator, with the precomputed reference sums read back in float64. TRL stores them in the
    dataset as computed (float64 here) but its collators rebuild them with torch.tensor(list of floats), in float32:
    with policy = reference the reward margins were then rounding noise (accuracy 0.5 at step 0, where TRL logs 0)."""

    def __init__(self, collate, keys: tuple[str, ...]):
        self.collate, self.keys = collate, keys

    def __call__(self, examples):
        batch = self.collate(examples)
        for key in self.keys:
            if key in batch and key in examples[0]:
                batch[key] = torch.tensor([example[key] for example in examples], dtype=torch.float64)
        return batch


def _real_positions(per_token: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens.
    return None if per_token is None else per_token[:, -seq_len:]


class _FastalignMixin:
    """What DPOTrainer and KTOTrainer share: the fused head, the reference forward (a reference
    model, a PEFT reference adapter, or the base with adapters disabled) and OnlineMergeAdamW."""

    _trl_trainer: type  # the TRL class this one extends
    _non_model_keys: set[str]
    _reference_keys: tuple[str, ...]  # the precomputed reference columns

    def __init__(
        self,
        *args,
        ref_adapter_name: str | None = None,
        online_merge: dict | None = None,
        strategy: str = "auto",
        **kwargs,
    ):
        # Set before TRL's __init__, which may precompute reference log-probs through our forward.
        check_strategy(strategy)
        self.fused_strategy = strategy
        self.ref_adapter_name = ref_adapter_name
        self.online_merge = dict(online_merge) if online_merge is not None else None
        if self.online_merge is not None and "base" not in self.online_merge:
            raise ValueError("online_merge needs 'base': the base (pretrained) model, its state dict or a file")
        bound = inspect.signature(self._trl_trainer.__init__).bind_partial(self, *args, **kwargs).arguments
        if bound.get("args") is not None:
            self._check_supported(bound["args"])
        super().__init__(*args, **kwargs)
        self.data_collator = _ReferencesInFloat64(self.data_collator, self._reference_keys)
        model = self.accelerator.unwrap_model(self.model)
        if ref_adapter_name is not None and (self.ref_model is not None or not is_peft_model(model)):
            raise ValueError(
                "ref_adapter_name names the PEFT adapter that holds the reference: it needs a PEFT model and no "
                "ref_model (it would be ignored)"
            )
        if is_peft_model(model):
            if self.online_merge is not None:
                raise ValueError("online_merge merges full weights; it cannot train a PEFT adapter")
            name = self.ref_adapter_name
            if name is not None and name != "ref" and "ref" in model.peft_config:
                # TRL copies the trained adapter to "ref" for its own reference; the named one replaces it.
                model.delete_adapter("ref")
        for m in (self.model, self.ref_model):
            self._fused(m)

    def _check_supported(self, args) -> None:
        pass

    def _fused(self, model):
        """The model, with fastalign's head installed (TRL's __init__ installs its own)."""
        if model is not None and not is_patched(self.accelerator.unwrap_model(model)):
            patch_causal_lm(self.accelerator.unwrap_model(model))
        return model

    def _reference(self):
        """(model, context) that computes reference log-probs."""
        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext()
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not is_peft_model(unwrapped):  # precomputing, before any training step
            return self.model, contextlib.nullcontext()
        name = self.ref_adapter_name
        if name is None and "ref" in unwrapped.peft_config:
            name = "ref"
        return self.model, reference_adapter(unwrapped, name)

    def _reference_logps(self, model, model_kwargs: dict, labels: torch.Tensor) -> torch.Tensor:
        """[B, T - 1] reference per-token log-probs of the shifted labels, from `model` (None: the trainer's
        reference)."""
        reference, context = self._reference()
        if model is not None and model is not reference:
            reference, context = model, contextlib.nullcontext()
        kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            context,
            self.accelerator.autocast(),
        ):
            outputs = self._fused(reference)(**kwargs, labels=labels)
        return _real_positions(outputs.logprobs, labels.size(1) - 1)

    def _model_kwargs(self, inputs: dict) -> dict:
        kwargs = {k: v for k, v in inputs.items() if k not in self._non_model_keys}
        kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            kwargs["output_router_logits"] = True
        return kwargs

    def _logits_for_metrics(self, model, model_kwargs, loss):
        # compute_metrics wants logits, which the fused head never builds: one more forward, as TRL does.
        with torch.no_grad():
            return loss, model(**model_kwargs)

    # ------------------------------------------------------------------ metrics shared with TRL

    def _gather_sum(self, value: torch.Tensor) -> float:
        return self.accelerator.gather_for_metrics(value.detach().reshape(1)).sum().item()

    def _log_token_metrics(self, mode, inputs, outputs, shift_mask, chosen_rows, rejected_rows) -> None:
        seq_len = shift_mask.size(1)
        entropy = outputs.entropy[:, -seq_len:].detach()
        tokens = self._gather_sum(shift_mask.sum())
        entropy_sum = self._gather_sum(entropy[shift_mask.bool()].sum())  # unlabelled positions are unscored
        self._metrics[mode]["entropy"].append(entropy_sum / tokens if tokens else 0.0)
        if mode == "train":
            self._total_train_tokens += int(self._gather_sum(inputs["attention_mask"].sum())) // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        mean_logits = outputs.mean_logits[:, -seq_len:]
        for name, rows in (("chosen", chosen_rows), ("rejected", rejected_rows)):
            mask = shift_mask[rows].bool()
            total, count = self._gather_sum(mean_logits[rows][mask].sum()), self._gather_sum(mask.sum())
            if count > 0 or self._always_log_logits:
                self._metrics[mode][f"logits/{name}"].append(total / count if count else 0.0)
        if outputs.aux_loss is not None and self.aux_loss_enabled:
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

    # ------------------------------------------------------------------ OnlineMergeAdamW

    def create_optimizer(self, model=None):
        if self.online_merge is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from fastalign.optim import OnlineMergeAdamW, reference_delta

        settings = dict(self.online_merge)
        base = settings.pop("base")
        reference = settings.pop("reference", None)
        if reference is None:
            if self.ref_model is None:
                raise ValueError("online_merge needs 'reference' (the SFT model) when the trainer has no ref_model")
            reference = self.accelerator.unwrap_model(self.ref_model)
        opt_model = self.model if model is None else model
        # tau for this process's shard of each parameter, keyed by parameter, stored as the optimizer will keep it.
        tau = reference_delta(reference, base, like=opt_model, dtype=settings.get("ref_delta_dtype", torch.bfloat16))
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: list[dict[str, Any]] = [
            {"params": [], "weight_decay": self.args.weight_decay},
            {"params": [], "weight_decay": 0.0},
        ]
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                groups[0 if name in decay else 1]["params"].append(param)
        ref_delta = {p: t for p, t in tau.items() if p.requires_grad}
        self.optimizer = OnlineMergeAdamW(
            [g for g in groups if g["params"]],
            lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
            ref_delta=ref_delta,
            **settings,
        )
        return self.optimizer


class DPOTrainer(_FastalignMixin, trl.DPOTrainer):
    """`trl.DPOTrainer` with fastalign's fused log-prob head, `fastalign.dpo_loss` and, optionally,
    `fastalign.optim.OnlineMergeAdamW`. Takes TRL's arguments plus:

    - ref_adapter_name: with a PEFT model and no ref_model, the adapter that holds the reference
      (e.g. loaded with `model.load_adapter(sft_adapter, adapter_name="reference")`). Default: TRL's
      "ref" copy when TRL made one, else the base model with adapters disabled.
    - online_merge: train with OnlineMergeAdamW. A dict with "base" (the pretrained model, its state
      dict or a safetensors file), optionally "reference" (the SFT model; default: ref_model), and any
      other OnlineMergeAdamW keyword (method, reserve_p, alpha, ...). lr, betas, eps and weight decay
      come from the DPOConfig. tau = reference - base is built once, at optimizer creation.
    - average_log_prob: the losses compare per-token means of the completion log-probs instead of sums
      (Liger's option; default False, as TRL).
    - strategy: "auto" (default), "fast" or "lean", as `fastalign.FusedLinearDPOLoss`'s: the patched model's head
      computes the loss itself, fast at 6 N H V matmul FLOPs (the gradient in the forward, an fp32 [V, H]
      accumulator, as TRL's head holds one), lean at 8 as TRL's head. auto takes fast unless the loss type
      couples the pairs (aot, aot_unpaired, sft with use_weighting).

    Every DPOConfig loss option is honoured: loss_type (lists, with loss_weights), label_smoothing,
    ld_alpha (LD-DPO), use_weighting (WPO), f_divergence_type with f_alpha_divergence_coef, discopop_tau.
    use_liger_kernel applies Liger's layer kernels only, as TRL 1.16 does; the head and loss stay fastalign's.
    Logs TRL's metrics under TRL's names.
    """

    _trl_trainer = trl.DPOTrainer
    _non_model_keys = _DPO_NON_MODEL_KEYS
    _reference_keys = ("ref_chosen_logps", "ref_rejected_logps")
    _always_log_logits = True

    def __init__(self, *args, average_log_prob: bool = False, **kwargs):
        self.average_log_prob = average_log_prob  # set before TRL's __init__, which may precompute through us
        super().__init__(*args, **kwargs)

    def _check_supported(self, args) -> None:
        # fastalign's messages (the argument and its valid values) before TRL's set-up work.
        kwargs = dict(beta=args.beta, loss_type=args.loss_type, loss_weights=args.loss_weights)
        check_dpo_hidden_options(
            **kwargs, label_smoothing=args.label_smoothing, strategy=self.fused_strategy, **self._dpo_options(args)
        )

    def _dpo_options(self, args) -> dict[str, Any]:
        """The DPOConfig options that `fastalign.dpo.dpo_loss_from_token_logps` takes beside beta and loss types."""
        return {
            "average_log_prob": self.average_log_prob,
            "ld_alpha": args.ld_alpha,
            "use_weighting": args.use_weighting,
            "f_divergence_type": args.f_divergence_type,
            "f_alpha_divergence_coef": args.f_alpha_divergence_coef,
            "discopop_tau": args.discopop_tau,
        }

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch: ([B] chosen, [B] rejected) sums over each completion,
        LD-weighted with ld_alpha, as TRL computes them; float64, as the loss sums the policy's."""
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        token_logps = self._reference_logps(model, self._model_kwargs(inputs), labels).double()
        mask = inputs["completion_mask"][:, 1:].bool()
        return sequence_logps(token_logps, mask, ld_alpha=self.ld_alpha).chunk(2, dim=0)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = self._model_kwargs(inputs)
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, IGNORE_INDEX)
        # The reference first: the loss is computed inside the policy's head, at 6 N H V on the fast strategy.
        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(None, inputs)
        options = dict(
            beta=self.beta,
            loss_type=self.loss_types,
            loss_weights=self.loss_weights,
            label_smoothing=self.label_smoothing,
            **self._dpo_options(self.args),
        )

        def objective(shifted_labels):
            # The scored tokens (those of the head's labels, PEFT's virtual tokens ignored): ipo and sigmoid_norm
            # divide by their count, as TRL (its unshifted completion mask has one more only when a completion
            # starts at the first position, i.e. without a prompt).
            mask = shifted_labels != IGNORE_INDEX
            return dpo_objective(mask, ref_chosen_logps, ref_rejected_logps, **options)

        outputs = self._fused(model)(
            **model_kwargs, labels=labels, return_entropy=True, return_argmax=True, return_mean_logits=True,
            fused_objective=objective, fused_strategy=self.fused_strategy,
        )  # fmt: skip
        loss, metrics = outputs.loss_outputs
        shift_mask = completion_mask[:, 1:]
        seq_len = shift_mask.size(1)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss

        half = shift_mask.size(0) // 2
        self._log_token_metrics(mode, inputs, outputs, shift_mask, slice(0, half), slice(half, None))
        chosen_mask = shift_mask[:half].bool()
        correct = outputs.argmax[:half, -seq_len:] == labels[:half, 1:]
        tokens = self._gather_sum(chosen_mask.sum())
        accuracy = self._gather_sum((correct & chosen_mask).sum()) / tokens if tokens else 0.0
        self._metrics[mode]["mean_token_accuracy"].append(accuracy)
        for name, value in metrics.items():
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value.reshape(1)).mean().item())
        return self._logits_for_metrics(model, model_kwargs, loss) if return_outputs else loss


class KTOTrainer(_FastalignMixin, trl.KTOTrainer):
    """`trl.KTOTrainer` with fastalign's fused log-prob head, `fastalign.kto_loss` and, optionally,
    `fastalign.optim.OnlineMergeAdamW`. Takes TRL's arguments plus `ref_adapter_name`, `online_merge` and
    `strategy`, as `fastalign.integrations.DPOTrainer`. Logs TRL's metrics under TRL's names."""

    _trl_trainer = trl.KTOTrainer
    _non_model_keys = _KTO_NON_MODEL_KEYS
    _reference_keys = ("ref_logps", "ref_KL_logps")
    _always_log_logits = False

    def _kl_inputs(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """Model kwargs and labels of the mismatched (prompt, completion) pairs of the KL estimate."""
        kwargs = {k: v for k, v in batch.items() if k not in self._non_model_keys | {"input_ids", "attention_mask"}}
        kwargs.update(input_ids=batch["KL_input_ids"], attention_mask=batch["KL_attention_mask"], use_cache=False)
        for key in ("token_type_ids", "mm_token_type_ids"):
            if f"KL_{key}" in batch:
                kwargs[key] = batch[f"KL_{key}"]
        return kwargs, batch["KL_input_ids"].masked_fill(batch["KL_completion_mask"] == 0, IGNORE_INDEX)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch: ([B] completions, [B] KL completions or None)."""
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        logps = self._reference_logps(model, self._model_kwargs(inputs), labels).sum(-1)
        kl_logps = self._reference_logps(model, *self._kl_inputs(inputs)).sum(-1) if self.calculate_KL else None
        return logps, kl_logps

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        batch = {k: (v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        model_kwargs = self._model_kwargs(batch)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
        shift_mask = batch["completion_mask"][:, 1:]
        desirable = torch.as_tensor(batch["label"], dtype=torch.bool, device=labels.device)

        # The reference and the KL estimate first (TRL's order for the KL): the loss is computed inside the
        # policy's head, at 6 N H V on the fast strategy.
        if self.precompute_ref_logps:
            ref_logps, ref_kl_logps = batch["ref_logps"], batch.get("ref_KL_logps")
        else:
            ref_logps, ref_kl_logps = self.compute_ref_log_probs(None, batch)
        kl = None
        if self.calculate_KL:
            kl_kwargs, kl_labels = self._kl_inputs(batch)
            with torch.no_grad():
                kl_outputs = self._fused(model)(**kl_kwargs, labels=kl_labels)
            kl = (_real_positions(kl_outputs.logprobs, kl_labels.size(1) - 1).sum(-1) - ref_kl_logps).mean()
            kl = self.accelerator.gather_for_metrics(kl.detach().reshape(1)).mean()
        options = dict(
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
            loss_type=self.loss_type,
        )

        def objective(shifted_labels):
            return kto_objective(shifted_labels != IGNORE_INDEX, ref_logps, desirable, kl, **options)

        outputs = self._fused(model)(
            **model_kwargs, labels=labels, return_entropy=True, return_mean_logits=True,
            fused_objective=objective, fused_strategy=self.fused_strategy,
        )  # fmt: skip
        loss, metrics = outputs.loss_outputs
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss

        self._metrics[mode]["kl"].append(metrics["kl"].item())
        self._log_token_metrics(mode, batch, outputs, shift_mask, desirable, ~desirable)
        # Batch means over each kind of example, weighted by its count on every rank, as TRL does.
        counts = {"chosen": self._gather_sum(desirable.sum()), "rejected": self._gather_sum((~desirable).sum())}
        for kind in ("chosen", "rejected"):
            if counts[kind] > 0:
                n = desirable.sum() if kind == "chosen" else (~desirable).sum()
                for what in ("rewards", "logps"):
                    total = self._gather_sum(metrics[f"{what}/{kind}"].nan_to_num(0.0) * n)
                    self._metrics[mode][f"{what}/{kind}"].append(total / counts[kind])
        if counts["chosen"] > 0 and counts["rejected"] > 0:
            margin = self._metrics[mode]["rewards/chosen"][-1] - self._metrics[mode]["rewards/rejected"][-1]
            self._metrics[mode]["rewards/margins"].append(margin)
        return self._logits_for_metrics(model, model_kwargs, loss) if return_outputs else loss
