"""A tiny Llama, a word-level tokenizer and the shipped preference data: everything the demo and
the integration tests need, built locally with no downloads."""

from __future__ import annotations

import json
from importlib import resources

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<unk>"}


def load_preferences() -> list[dict[str, str]]:
    """The shipped preference data: a few hundred {"prompt", "chosen", "rejected"} rows of
    synthetic questions with a right and a wrong answer (see data/make_preferences.py)."""
    text = resources.files("fastalign.integrations").joinpath("data/preferences.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def build_tokenizer(rows: list[dict[str, str]]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the whitespace-separated words of `rows`' values, plus <pad>,
    <eos> and <unk>. Ids are in sorted word order, so the same rows give the same ids."""
    words = sorted({word for row in rows for value in row.values() for word in value.split()})
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS.values(), *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int | None = None,
    seed: int = 0,
    **config_overrides,
) -> LlamaForCausalLM:
    """A randomly initialised model of the Llama architecture for `tokenizer`.

    vocab_size defaults to the tokenizer's size; a larger value pads the vocabulary with unused rows,
    as released models do, to show the cost of the lm_head at realistic sizes.
    """
    vocab = len(tokenizer) if vocab_size is None else vocab_size
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size must be at least the tokenizer's {len(tokenizer)} tokens; got {vocab}")
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 16),
        num_key_value_heads=max(1, hidden_size // 32),
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        **config_overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
