"""fastalign inside transformers, TRL and PEFT. Needs the `hf` extra: pip install "fastalign[hf]".

Nothing in fastalign imports this package, and each name here imports only what it needs (the
transformers patch and IFTTrainer never import TRL).

- patch_causal_lm / unpatch_causal_lm: `model(..., labels=...)` returns per-token log-probs from the
  fused linear head (FusedCausalLMOutput) instead of logits.
- DPOTrainer / KTOTrainer: TRL's trainers on fastalign's head, losses and OnlineMergeAdamW.
- IFTTrainer: the two-pass Intuitive Fine-Tuning step as a transformers.Trainer.
- reference_adapter: the reference model as a PEFT adapter (or the base, adapters disabled).
- patch_trl / unpatch_trl: every stock TRL trainer's per-token log-probs (its fused head and its logits
  helpers) on fastalign's ops, TRL's loss math unchanged.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FusedCausalLMOutput": "causal_lm",
    "patch_causal_lm": "causal_lm",
    "unpatch_causal_lm": "causal_lm",
    "logit_transform": "causal_lm",
    "reference_adapter": "adapters",
    "IFTTrainer": "ift",
    "DPOTrainer": "trl_trainers",
    "KTOTrainer": "trl_trainers",
    "patch_trl": "trl_patch",
    "unpatch_trl": "trl_patch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastalign.integrations' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
