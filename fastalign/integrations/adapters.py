"""The reference model as a PEFT adapter: one set of base weights in memory for policy and reference."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


@contextmanager
def reference_adapter(model: torch.nn.Module, adapter_name: str | None = None) -> Iterator[None]:
    """Run the block on the reference weights of a PEFT model.

    Args:
        model: a `peft.PeftModel`.
        adapter_name: the reference adapter, loaded beside the trained one as DPO users do with
            `model.load_adapter(sft_adapter_path, adapter_name="reference")`; it is active only inside
            the block. None (the default) disables every adapter: the reference is the base model.

    On exit the active adapter and the `requires_grad` of every parameter are as they were: PEFT's
    `set_adapter` makes the adapter it activates trainable, and the reference must stay frozen.
    """
    if not is_peft_model(model):
        raise TypeError(f"model must be a peft.PeftModel; got {type(model).__name__}")
    if adapter_name is None:
        with model.disable_adapter():
            yield
        return
    if adapter_name not in model.peft_config:
        raise ValueError(f"adapter_name {adapter_name!r} is not loaded; the model has {sorted(model.peft_config)}")
    previous = model.active_adapter
    trainable = {p: p.requires_grad for p in model.parameters()}
    model.set_adapter(adapter_name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for p, flag in trainable.items():
            p.requires_grad_(flag)
