"""IFTTrainer: Intuitive Fine-Tuning (Hua et al., 2024) as a transformers.Trainer.

Each step makes two passes over the batch:
1. a greedy pass under no_grad, whose argmax comes straight from the fused head's hidden states;
2. a pass whose input embeddings mix, on response positions, the ground-truth token with the token
   the model predicted at the previous position: (1 - lam) E[y_t] + lam E[y^_{t-1}];
and takes the IFT loss (`fastalign.ift_loss`) on the second pass's per-token log-probs, inside its lm_head call
(the fused-linear losses' strategies: fast at 6 N H V).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import DataCollatorForSeq2Seq, Trainer

import fastalign
from fastalign.integrations.causal_lm import IGNORE_INDEX, is_patched, patch_causal_lm
from fastalign.linear_losses import check_strategy, ift_objective

RESPONSE_COLUMNS = ("completion", "response")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_prompt_response(example: dict, tokenizer, max_length: int | None = None) -> dict:
    """{"prompt", "completion" (or "response")} text -> {"input_ids", "labels"}: labels are -100 on the
    prompt, and the response ends with the EOS token."""
    column = next((c for c in RESPONSE_COLUMNS if c in example), None)
    if column is None or "prompt" not in example:
        raise ValueError(f"each example needs 'prompt' and one of {RESPONSE_COLUMNS}; got {sorted(example)}")
    response = example[column]
    if tokenizer.eos_token and not response.endswith(tokenizer.eos_token):
        response += tokenizer.eos_token
    prompt_ids = tokenizer(example["prompt"])["input_ids"]
    input_ids = tokenizer(example["prompt"] + response)["input_ids"]
    # The response starts where the two tokenizations diverge: tokens may merge across the boundary.
    start = _common_prefix(prompt_ids, input_ids)
    labels = [IGNORE_INDEX] * start + input_ids[start:]
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


class IFTTrainer(Trainer):
    """A transformers.Trainer that trains with the two-pass IFT step on (prompt, response) data.

    Args (besides transformers.Trainer's):
        lam: weight of the model's own previous prediction in the input embeddings (default 0.2).
        gamma: discount of the IFT loss's reverse cumulative sum (default 0.95; 0 is plain SFT).
        max_length: truncate tokenized examples to this many tokens (default: no truncation).
        strategy: "auto" (default), "fast" or "lean", as `fastalign.FusedLinearIFTLoss`'s: the second pass's head
            computes the loss, fast at 6 N H V matmul FLOPs, lean at 8.

    Datasets hold either text columns "prompt" and "completion" (or "response"), tokenized here
    with `processing_class`, or token columns "input_ids" and "labels" (-100 on the prompt). No
    preference data is needed. The model is patched with `fastalign.integrations.patch_causal_lm`.
    Logs, besides the loss, "nll" (the plain per-token SFT loss of the mixed pass) and
    "mean_token_accuracy" (how often the greedy pass predicts the response token).
    """

    def __init__(
        self,
        model=None,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        lam: float = 0.2,
        gamma: float = 0.95,
        max_length: int | None = None,
        strategy: str = "auto",
        **kwargs,
    ):
        check_strategy(strategy)
        self.fused_strategy = strategy
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1]; got {lam}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1]; got {gamma}")
        self.lam, self.gamma = float(lam), float(gamma)
        train_dataset = self._prepare(train_dataset, processing_class, max_length)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._prepare(v, processing_class, max_length) for k, v in eval_dataset.items()}
        else:
            eval_dataset = self._prepare(eval_dataset, processing_class, max_length)
        if data_collator is None:
            if processing_class is None:
                raise ValueError("IFTTrainer needs a processing_class (tokenizer) or a data_collator")
            data_collator = DataCollatorForSeq2Seq(processing_class, label_pad_token_id=IGNORE_INDEX)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # The IFT loss is a mean over sequences, not a sum over num_items_in_batch tokens: let the
        # Trainer divide it by the gradient-accumulation steps.
        self.model_accepts_loss_kwargs = False
        patch_causal_lm(self.model)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    @staticmethod
    def _prepare(dataset, tokenizer, max_length):
        if dataset is None:
            return None
        if isinstance(dataset, list):
            from datasets import Dataset

            dataset = Dataset.from_list(dataset)
        columns = set(dataset.column_names or [])
        if {"input_ids", "labels"} <= columns:
            return dataset
        if tokenizer is None:
            raise ValueError("text datasets need a processing_class to tokenize them")
        return dataset.map(
            tokenize_prompt_response,
            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
            remove_columns=sorted(columns),
        )

    @contextmanager
    def _mixed_embeddings(self, model, input_ids, predicted_ids, labels) -> Iterator[None]:
        """Replace the input embeddings inside the model's own forward, so that the embedding weight
        is the one the forward sees (gathered under FSDP2) and gradients reach it."""
        embedding = self.accelerator.unwrap_model(model).get_input_embeddings()

        def mix(module, args, output):
            if args[0].shape != input_ids.shape:
                raise RuntimeError(f"IFT expected the embedding of input_ids {tuple(input_ids.shape)}")
            mixed = fastalign.ift_inputs_embeds(module.weight, input_ids, predicted_ids, labels, lam=self.lam)
            scale = getattr(module, "embed_scale", None)  # Gemma's scaled embeddings
            return mixed.to(output.dtype) if scale is None else (mixed * scale.to(mixed.dtype)).to(output.dtype)

        # prepend: run before FSDP2's post-forward hook reshards the weight.
        handle = embedding.register_forward_hook(mix, prepend=True)
        try:
            yield
        finally:
            handle.remove()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        unwrapped = self.accelerator.unwrap_model(model)
        if not is_patched(unwrapped):
            patch_causal_lm(unwrapped)
        labels, input_ids = inputs["labels"], inputs["input_ids"]
        kwargs = {k: v for k, v in inputs.items() if k != "labels"}
        kwargs["use_cache"] = False

        with torch.no_grad():
            greedy = model(**kwargs, labels=labels, return_argmax=True)
        # predicted[:, t] is the argmax at position t, read only where token t + 1 is a response token.
        predicted = torch.where(greedy.label_mask, greedy.argmax, input_ids[:, :-1])
        # The loss inside the head's call: at 6 N H V on the fast strategy (linear_token_stats, then the loss: 8).
        with self._mixed_embeddings(model, input_ids, predicted, labels):
            outputs = model(
                **kwargs, labels=labels, fused_strategy=self.fused_strategy,
                fused_objective=lambda shifted_labels: ift_objective(shifted_labels != IGNORE_INDEX, self.gamma),
            )  # fmt: skip
        loss = outputs.loss_outputs[0]

        mask = outputs.label_mask
        tokens = self.accelerator.gather_for_metrics(mask.sum().reshape(1)).sum().clamp(min=1)
        nll = self.accelerator.gather_for_metrics(-outputs.logprobs.detach().sum().reshape(1)).sum()
        hits = self.accelerator.gather_for_metrics((greedy.argmax == labels[:, 1:])[mask].sum().reshape(1)).sum()
        self._metrics[mode]["nll"].append((nll / tokens).item())
        self._metrics[mode]["mean_token_accuracy"].append((hits / tokens).item())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        logs.update(metrics if mode == "train" else {f"eval_{key}": value for key, value in metrics.items()})
        super().log(logs, *args, **kwargs)
        self._metrics[mode].clear()
