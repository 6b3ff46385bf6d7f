"""Where a parameter's local tensor sits inside the whole parameter, for DTensors and flat shards.

Everything that must not depend on sharding (the DARE keep, the TIES top-k order, its tie rule)
is defined on the global row-major element index. A local shard is a box of the whole parameter
(a range of indices along each dimension), so its elements, in local row-major order, are runs
of consecutive global indices: `run` of them, then a jump to the next run `run_stride` further
on. Shard(0) on any number of mesh dimensions (FSDP, HSDP, FSDP over tensor parallelism's
_StridedShard) gives one run; Shard(1) (tensor parallelism's row-wise weights), alone or with
Shard(0), gives one run per local row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import Partial


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
    group: Any  # process group of every process holding another part; None when this one holds it all
    run: int  # local elements per run of consecutive global indices (one run: run == run_stride)
    run_stride: int  # global index distance from the start of one run to the next

    @property
    def contiguous(self) -> bool:
        return self.run == self.run_stride


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _whole(numel: int, shape: tuple[int, ...], offset: int = 0, group: Any = None) -> Layout:
    """A layout whose local elements are one run (the whole parameter's size bounds it)."""
    return Layout(numel, shape, offset, group, max(numel, 1), max(numel, 1))


def layout_of(param: torch.Tensor, flat: FlatShard | None, name: str) -> Layout:
    """Raises ValueError on a layout the optimizer does not support (Partial placements, or a box
    whose elements are not runs of equal length at a constant stride)."""
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
        return _whole(flat.numel, (flat.numel,), flat.offset, group)
    if not isinstance(param, DTensor):
        return _whole(param.numel(), tuple(param.shape))

    mesh, placements, shape = param.device_mesh, param.placements, tuple(param.shape)
    if any(isinstance(pl, Partial) for pl in placements):
        raise ValueError(f"{name} has placements {placements}; a Partial parameter has no values to update")
    sharded = [d for d, pl in enumerate(placements) if not isinstance(pl, Replicate)]
    if not sharded:
        return _whole(param.numel(), shape)
    local_shape, starts = compute_local_shape_and_global_offset(shape, mesh, placements)
    if tuple(local_shape) != tuple(param.to_local().shape):
        raise ValueError(
            f"{name}: the local shard {tuple(param.to_local().shape)} is not the {tuple(local_shape)} "
            f"that placements {placements} give"
        )
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    offset = sum(s * st for s, st in zip(starts, strides))
    # The local box as (local size, global stride) per dimension, outermost first, without the
    # dimensions of size 1; a dimension merges into the one outside it when it spans that stride.
    merged: list[list[int]] = []
    for size, stride in zip(local_shape, strides):
        if size == 1:
            continue
        if merged and merged[-1][1] == size * stride:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if not merged or (len(merged) == 1 and merged[0][1] == 1):
        return _whole(param.numel(), shape, offset, _group(mesh, sharded, name))
    elif len(merged) == 1:  # single elements at a stride
        run, run_stride = 1, merged[0][1]
    elif len(merged) == 2 and merged[1][1] == 1:
        run, run_stride = merged[1][0], merged[0][1]
    else:
        raise ValueError(
            f"{name} has placements {placements}: its local shard {tuple(local_shape)} of {shape} is not runs of "
            "consecutive elements at one stride; OnlineMergeAdamW supports sharding along dims 0 and 1 "
            "(any others whole)"
        )
    if param.numel() >= 2**31:
        raise ValueError(f"{name}: a shard of non-consecutive elements needs a parameter under 2**31 elements")
    return Layout(param.numel(), shape, offset, _group(mesh, sharded, name), run, run_stride)


def _group(mesh, dims: list[int], name: str):
    """The process group over the mesh dimensions that shard the parameter."""
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    names = mesh.mesh_dim_names
    if names is None:
        raise ValueError(f"{name} is sharded over {len(dims)} mesh dimensions; give the DeviceMesh mesh_dim_names")
    return mesh[tuple(names[d] for d in dims)]._flatten().get_group()


def local_part(full: torch.Tensor, layout: Layout, local: torch.Tensor) -> torch.Tensor:
    """The elements of a whole-parameter tensor that this process holds, shaped like `local`."""
    flat = full.reshape(-1)
    if layout.contiguous or local.numel() == 0:
        return flat[layout.offset : layout.offset + local.numel()].view(local.shape)
    runs = local.numel() // layout.run
    return flat.as_strided((runs, layout.run), (layout.run_stride, 1), layout.offset).reshape(local.shape)


def like_param(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Wraps a local tensor laid out like the local shard of `param` as a DTensor if `param` is one."""
    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
