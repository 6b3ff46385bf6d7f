"""reference_delta: τ = θ_ref − θ_base from two models, state dicts or safetensors checkpoints."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from fastalign.optim._layout import layout_of, like_param, local_part, local_tensor

_FLOAT_SAFETENSORS = {"F16", "BF16", "F32", "F64"}


class _Source:
    """Name → tensor, loaded one tensor at a time."""

    def __init__(self, obj, what: str):
        self.what = what
        if isinstance(obj, torch.nn.Module):
            tensors = dict(obj.named_parameters())
            self._float = [n for n, t in tensors.items() if t.is_floating_point()]
            self._get: Callable[[str], torch.Tensor] = tensors.__getitem__
            self._has = tensors.__contains__
        elif isinstance(obj, Mapping):
            self._float = [n for n, t in obj.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
            self._get, self._has = obj.__getitem__, obj.__contains__
        elif isinstance(obj, (str, os.PathLike)):
            self._open_safetensors(Path(obj))
        else:
            raise TypeError(
                f"{what} must be an nn.Module, a state dict or a safetensors path; got {type(obj).__name__}"
            )

    def _open_safetensors(self, path: Path) -> None:
        from safetensors import safe_open

        if path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.exists():
                files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
            else:
                files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{self.what}: no .safetensors files in {path}")
        elif path.exists():
            files = [path]
        else:
            raise ValueError(f"{self.what}: {path} does not exist")
        where: dict[str, Path] = {}
        self._float = []
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    where[name] = file
                    if f.get_slice(name).get_dtype() in _FLOAT_SAFETENSORS:
                        self._float.append(name)

        def get(name: str) -> torch.Tensor:
            with safe_open(where[name], framework="pt") as f:
                return f.get_tensor(name)

        self._get, self._has = get, where.__contains__

    def floating_names(self) -> list[str]:
        return self._float

    def __contains__(self, name: str) -> bool:
        return self._has(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._get(name).detach()
        return t.full_tensor() if isinstance(t, DTensor) else t


def reference_delta(
    ref,
    base,
    *,
    like: torch.nn.Module | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
) -> dict:
    """The reference task vector τ = ref − base, one tensor at a time (the difference is taken in
    float32, then stored in `dtype`).

    Args:
        ref: the reference (SFT) model: an nn.Module, a state dict (name → tensor), or a path to a
            .safetensors file or to a directory of them (sharded: model.safetensors.index.json).
        base: the base (pretrained) model, in any of the same forms.
        like: the model being trained. When given, τ is computed for its named parameters only
            and returned as {parameter: τ}, ready for OnlineMergeAdamW(ref_delta=...): each τ is
            on the parameter's device and, for an FSDP2 DTensor, holds only this process's shard.
            Without it, every floating-point tensor of ref is returned as {name: τ}.
        dtype: τ's dtype (default torch.bfloat16).
        device: where τ goes when `like` is not given (default: where ref's tensor is).

    Raises:
        ValueError: a name missing from ref or base (or, with `like`, a parameter name missing
            from either), or tensors of different shapes.
    """
    ref_src, base_src = _Source(ref, "ref"), _Source(base, "base")
    if like is None:
        names = ref_src.floating_names()
        missing = [n for n in base_src.floating_names() if n not in ref_src]
        if missing:
            raise ValueError(f"base has {len(missing)} tensor(s) that ref lacks, e.g. {missing[0]!r}")
        targets = dict.fromkeys(names)
    else:
        targets = dict(like.named_parameters())

    out = {}
    for name, param in targets.items():
        for src in (ref_src, base_src):
            if name not in src:
                raise ValueError(f"{name!r} is missing from {src.what}")
        r, b = ref_src[name], base_src[name]
        if r.shape != b.shape:
            raise ValueError(f"{name!r} has shape {tuple(r.shape)} in ref but {tuple(b.shape)} in base")
        if param is None:
            to = device if device is not None else r.device
            out[name] = (r.to(to, torch.float32) - b.to(to, torch.float32)).to(dtype)
            continue
        if r.shape != param.shape:
            raise ValueError(f"{name!r} has shape {tuple(r.shape)} in ref but {tuple(param.shape)} in like")
        local = local_tensor(param)
        layout = layout_of(param, None, name)
        r, b = local_part(r, layout, local), local_part(b, layout, local)  # only this process's shard
        tau = r.to(local.device, torch.float32) - b.to(local.device, torch.float32)
        out[param] = like_param(tau.to(dtype).contiguous(), param)
    return out
