"""Where a parameter's local tensor sits inside the whole parameter, for FSDP2 DTensors and flat shards.

Everything that must not depend on sharding (the DARE keep, the TIES top-k order, its tie rule)
is defined on the global row-major element index, so each shard needs only the global index of
its first element and the process group that holds the other shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard


@dataclass(frozen=True)
class FlatShard:
    """Marks a tensor as elements [offset, offset + tensor.numel()) of a flattened parameter of
    `numel` elements whose other parts live on the other processes of `group` (ZeRO-style flat
    partitions). Pass {tensor: FlatShard(...)} as OnlineMergeAdamW's `flat_shards`."""

    offset: int
    numel: int
    group: Any = None  # torch.distributed.ProcessGroup; None is the default group


@dataclass(frozen=True)
class Layout:
    numel: int  # elements of the whole parameter
    shape: tuple[int, ...]  # shape of the whole parameter ((numel,) for a flat shard)
    offset: int  # global index of the first local element
    group: Any  # process group holding the other shards; None when this process holds it all


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def layout_of(param: torch.Tensor, flat: FlatShard | None, name: str) -> Layout:
    """Raises ValueError on a layout the optimizer cannot treat as contiguous slices of the
    global row-major order."""
    if flat is not None:
        if isinstance(param, DTensor):
            raise ValueError(f"{name} is a DTensor; flat_shards is for plain tensors")
        if not (0 <= flat.offset and flat.offset + param.numel() <= flat.numel):
            raise ValueError(f"flat_shards[{name}] = {flat} does not fit a local tensor of {param.numel()} elements")
        if flat.group is None:
            import torch.distributed as dist

            group = dist.group.WORLD
        else:
            group = flat.group
        return Layout(flat.numel, (flat.numel,), flat.offset, group)
    if not isinstance(param, DTensor):
        return Layout(param.numel(), tuple(param.shape), 0, None)

    mesh, placements = param.device_mesh, param.placements
    sharded = [d for d, pl in enumerate(placements) if not isinstance(pl, Replicate)]
    if any(type(placements[d]) is not Shard or placements[d].dim != 0 for d in sharded) or len(sharded) > 1:
        raise ValueError(
            f"{name} has placements {placements}; OnlineMergeAdamW supports Shard(0) on one mesh "
            "dimension (FSDP2's default) and Replicate"
        )
    if not sharded:
        return Layout(param.numel(), tuple(param.shape), 0, None)
    (dim,) = sharded
    rows = param.shape[0]
    chunk = -(-rows // mesh.size(dim))  # torch.chunk's split, which DTensor and FSDP2 use
    start = min(mesh.get_coordinate()[dim] * chunk, rows)
    local_rows = param.to_local().shape[0] if param.to_local().dim() else 0
    if local_rows != max(0, min(rows, start + chunk) - start):
        raise ValueError(f"{name}: a local shard of {local_rows} rows does not match Shard(0) of {rows} rows")
    row_numel = param.numel() // rows if rows else 0
    return Layout(param.numel(), tuple(param.shape), start * row_numel, mesh.get_group(dim))


def local_part(full: torch.Tensor, layout: Layout, local: torch.Tensor) -> torch.Tensor:
    """The elements of a whole-parameter tensor that this process holds, shaped like `local`."""
    return full.reshape(-1)[layout.offset : layout.offset + local.numel()].view(local.shape)


def like_param(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Wraps a local tensor laid out like the local shard of `param` as a DTensor if `param` is one."""
    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
