"""Worker of tests/test_optim_fsdp.py: one of two gloo processes on the CPU.

Each case trains a small model for a few steps three ways and checks they agree bit for bit:
the whole model in one process (computed on every rank, no collectives), the same model under
FSDP2 (fully_shard, with uneven and empty shards), and flat ZeRO-style partitions (FlatShard).
Then a torch.distributed.checkpoint save/load round trip must continue the same trajectory.

The FSDP2 optimizer is built after fully_shard, or (`after_prepare`) in accelerate's order: on the
whole model, whose parameters accelerate then swaps for the sharded ones
(fsdp2_switch_optimizer_parameters), as the HF Trainer does.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from fastalign._backend import forced_backend
from fastalign.optim import FlatShard, OnlineMergeAdamW

CASES = {
    "ondare": dict(method="ondare", reserve_p=0.5, alpha=0.3, online_step=2, skip_nonfinite=True),
    "onties": dict(method="onties", reserve_p=0.3, alpha=0.3, weight_decay=0.01),
    "onties-K3-fp32tau": dict(method="onties", reserve_p=0.1, alpha=0.5, online_step=3, ref_delta_dtype=torch.float32),
}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Shard(0) over 2 ranks: 3 rows split 2/1, 1 row split 1/0 (an empty shard), 40 rows 20/20
    # and more than a TIES tile under the interpreter.
    return torch.nn.Sequential(
        torch.nn.Linear(64, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)
    )


def taus(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {name: torch.randn(p.shape, generator=gen) * 0.02 for name, p in model.named_parameters()}


def batches(n: int, first: int = 0):
    for i in range(first, first + n):
        gen = torch.Generator().manual_seed(100 + i)
        yield torch.randn(16, 64, generator=gen)


def train(model, opt, n, first=0):
    for x in batches(n, first):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def train_flat(source, slices, opt, n):
    """ZeRO's loop: each rank steps its slices of the gradient, then the slices are gathered."""
    for x in batches(n):
        source.zero_grad()
        source(x).square().mean().backward()
        for local, (offset, p) in zip(opt.param_groups[0]["params"], slices):
            # An empty slice gets no gradient, as a framework that skips it would leave it: it still takes part in
            # the collectives of the parameter's step, which the other rank runs.
            local.grad = p.grad.reshape(-1)[offset : offset + local.numel()].clone() if local.numel() else None
        opt.step()
        with torch.no_grad():
            for local, (offset, p) in zip(opt.param_groups[0]["params"], slices):
                gathered = torch.zeros(p.numel())
                gathered[offset : offset + local.numel()] = local
                dist.all_reduce(gathered)
                p.copy_(gathered.view(p.shape))


def shard(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def sharded_with_optimizer(hp: dict, after_prepare: bool, steps_before: int = 0, **kwargs):
    """(FSDP2 model, its optimizer); τ is given whole, as reference_delta(like=...) gives it
    before sharding. With after_prepare, the optimizer first takes steps_before steps on the whole
    model, so the state that is re-sliced holds values."""
    model = make_model()
    tau = taus(model)
    if not after_prepare:
        shard(model)
        return model, OnlineMergeAdamW(model.named_parameters(), lr=0.02, ref_delta=tau, **hp, **kwargs)
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters

    opt = OnlineMergeAdamW(model.named_parameters(), lr=0.02, ref_delta=tau, **hp, **kwargs)
    train(model, opt, steps_before)
    whole = list(model.parameters())
    shard(model)
    fsdp2_switch_optimizer_parameters(opt, {old.data_ptr: new for old, new in zip(whole, model.parameters())})
    return model, opt


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check_case(name: str, hp: dict, tmp: str, after_prepare: bool = False) -> None:
    rank = dist.get_rank()
    whole = make_model()
    whole_opt = OnlineMergeAdamW(whole.named_parameters(), lr=0.02, ref_delta=taus(whole), **hp)
    train(whole, whole_opt, 3)

    steps_before = 1 if after_prepare else 0
    sharded, sharded_opt = sharded_with_optimizer(hp, after_prepare, steps_before)
    train(sharded, sharded_opt, 3 - steps_before, first=steps_before)
    for (n, p), q in zip(sharded.named_parameters(), whole.parameters()):
        assert torch.equal(full(p), q), f"{name}: FSDP2 {n} differs from one process"
        for key, value in whole_opt.state[q].items():
            state = sharded_opt.state[p][key]
            assert isinstance(state, DTensor) == (key != "step"), f"{name}: FSDP2 state {n}.{key} is not sharded"
            assert torch.equal(full(state), value), f"{name}: FSDP2 state {n}.{key}"
    if not after_prepare:
        check_flat_shards(name, hp, whole, rank)
    check_checkpoint(name, hp, tmp, sharded, sharded_opt, after_prepare)


def check_flat_shards(name: str, hp: dict, whole: torch.nn.Module, rank: int) -> None:
    # ZeRO-style flat partitions, split unevenly (rank 0 holds 40% of every parameter, and all of the first).
    source = make_model()
    slices, flat_params, shards = [], [], {}
    for j, p in enumerate(source.parameters()):
        cut = (p.numel() * 2) // 5 if j else p.numel()
        offset, size = (0, cut) if rank == 0 else (cut, p.numel() - cut)
        local = torch.nn.Parameter(p.detach().reshape(-1)[offset : offset + size].clone())
        flat_params.append(local)
        shards[local] = FlatShard(offset, p.numel())
        slices.append((offset, p))
    ref_delta = list(taus(whole).values())
    flat_opt = OnlineMergeAdamW(flat_params, lr=0.02, ref_delta=ref_delta, flat_shards=shards, **hp)
    train_flat(source, slices, flat_opt, 3)
    for p, q in zip(source.parameters(), whole.parameters()):
        assert torch.equal(p, q), f"{name}: flat shards differ from one process"


def check_checkpoint(name: str, hp: dict, tmp: str, sharded, sharded_opt, after_prepare: bool) -> None:
    """Save with torch.distributed.checkpoint, load into a fresh model and optimizer, go on."""
    model_sd, optim_sd = get_state_dict(sharded, sharded_opt)
    path = os.path.join(tmp, f"{name}-{after_prepare}")
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    resumed, resumed_opt = sharded_with_optimizer(hp, after_prepare, seed=99)
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=path)
    set_state_dict(resumed, resumed_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    assert resumed_opt.param_groups[0]["seed"] == 0  # the checkpoint's seed replaces the new one
    train(sharded, sharded_opt, 3, first=3)
    train(resumed, resumed_opt, 3, first=3)
    for p, q in zip(sharded.parameters(), resumed.parameters()):
        assert torch.equal(full(p), full(q)), f"{name}: resumed run differs"
    for p, q in zip(sharded.parameters(), resumed.parameters()):
        for key, value in sharded_opt.state[p].items():
            assert torch.equal(full(resumed_opt.state[q][key]), full(value)), f"{name}: resumed state {key}"
            assert resumed_opt.state[q][key].dtype == value.dtype


def check_partial_gradient(name: str, hp: dict) -> None:
    """A parameter whose non-empty shard has no gradient on one rank while the other's has one: TIES's selection
    runs collectives over its shards, so every rank raises (one aborted in a mismatched collective)."""
    sharded, opt = sharded_with_optimizer(hp, False)
    sharded(next(batches(1))).square().mean().backward()
    if dist.get_rank() == 1:
        sharded[0].weight.grad = None
    try:
        opt.step()
    except ValueError as e:
        assert "has a gradient on some processes of its group and none on others" in str(e), (name, e)
    else:
        raise AssertionError(f"{name}: a gradient on one rank only must raise")


def main(rank: int, tmp: str, backend: str, names: list[str], after_prepare: bool = False) -> None:
    with forced_backend("torch") if backend == "torch" else contextlib.nullcontext():
        for name in names:
            check_case(name, CASES[name], tmp, after_prepare)
            if CASES[name]["method"] == "onties" and not after_prepare:
                check_partial_gradient(name, CASES[name])


# ----------------------------------------------------------------------------- 2-D meshes


MESH_CASES = {
    "ondare": dict(method="ondare", reserve_p=0.5, alpha=0.3, online_step=2, skip_nonfinite=True),
    "onties": dict(method="onties", reserve_p=0.3, alpha=0.3, weight_decay=0.01),
}


def make_wide_model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    # Column-parallel then row-parallel under tensor parallelism; FSDP over it shards rows again:
    # 40 rows over tp then dp (_StridedShard), a 37 x 40 weight as 19/18 rows x 20/20 columns.
    return torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.Tanh(), torch.nn.Linear(40, 37)).to(dtype)


def shard_2d(model: torch.nn.Module, mesh, kind: str) -> torch.nn.Module:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if kind == "fsdp-tp":
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh["dp"])
        return fully_shard(model, mesh=mesh["dp"])
    for layer in (model[0], model[2]):  # HSDP: replicate over dp, shard over tp
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def tied_grads(n_steps: int, first: int = 0):
    """Per step, {name: gradient} of the whole model, rounded to a few levels so that |Δ| has many
    exact ties at the first steps (the TIES tie rule then crosses shards)."""
    model = make_wide_model()
    out = []
    for x in batches(n_steps, first):
        model.zero_grad()
        model(x).square().mean().backward()
        levels = {n: (p.grad * 1e3).round().clamp(-3, 3) for n, p in model.named_parameters()}
        out.append({n: torch.where(g == 0, 1.0, g) / 64 for n, g in levels.items()})
    return out


def check_mesh_case(name: str, hp: dict, tmp: str, kind: str) -> None:
    """OnlineMergeAdamW on a 2x2 mesh (FSDP x TP, or HSDP) equals one process bit for bit, given
    the same gradients; then a distributed checkpoint resumes the same trajectory."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    grads = tied_grads(6)
    whole = make_wide_model()
    whole_opt = OnlineMergeAdamW(whole.named_parameters(), lr=0.02, ref_delta=taus(whole), **hp)

    # Where each local element sits in the whole parameter: shard a model of indices alike.
    indices = make_wide_model(torch.float64)
    with torch.no_grad():
        for p in indices.parameters():
            p.copy_(torch.arange(p.numel(), dtype=torch.float64).view(p.shape))
    index = {n: p.to_local().long() for n, p in shard_2d(indices, mesh, kind).named_parameters()}

    def step(model, opt, grad):
        for n, p in model.named_parameters():
            local = grad[n].reshape(-1)[index[n].reshape(-1)].view(index[n].shape)
            p.grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        opt.step()

    sharded = shard_2d(make_wide_model(), mesh, kind)
    sharded_opt = OnlineMergeAdamW(sharded.named_parameters(), lr=0.02, ref_delta=taus(whole), **hp)
    for grad in grads[:3]:
        for n, p in whole.named_parameters():
            p.grad = grad[n].clone()
        whole_opt.step()
        step(sharded, sharded_opt, grad)
    for (n, p), q in zip(sharded.named_parameters(), whole.parameters()):
        assert torch.equal(p.full_tensor(), q), f"{name} {kind}: {n} {p.placements} differs from one process"
        for key, value in whole_opt.state[q].items():
            assert torch.equal(full(sharded_opt.state[p][key]), value), f"{name} {kind}: state {n}.{key}"

    model_sd, optim_sd = get_state_dict(sharded, sharded_opt)
    path = os.path.join(tmp, f"{name}-{kind}")
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    resumed = shard_2d(make_wide_model(), mesh, kind)
    resumed_opt = OnlineMergeAdamW(resumed.named_parameters(), lr=0.02, ref_delta=taus(whole), seed=99, **hp)
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=path)
    set_state_dict(resumed, resumed_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    for grad in grads[3:]:
        step(sharded, sharded_opt, grad)
        step(resumed, resumed_opt, grad)
    for p, q in zip(sharded.parameters(), resumed.parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor()), f"{name} {kind}: resumed run differs"


def check_unsupported_layouts() -> None:
    """A Partial parameter, and a shard that is not runs of consecutive elements at one stride
    (dims 1 and 2 of a 3-D tensor: two jumps), raise ValueError naming the parameter."""
    import pytest
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    partial = DTensor.from_local(torch.zeros(4, 3), mesh, [Shard(0), Partial()])
    cube = distribute_tensor(torch.zeros(2, 4, 4), mesh, [Shard(1), Shard(2)])
    for name, value, match in [("summed", partial, "Partial"), ("cube", cube, "runs of consecutive elements")]:
        with pytest.raises(ValueError, match=match) as error:
            OnlineMergeAdamW([(name, torch.nn.Parameter(value))])
        assert name in str(error.value)


def main_mesh(rank: int, tmp: str, backend: str, kinds: list[str]) -> None:
    with forced_backend("torch") if backend == "torch" else contextlib.nullcontext():
        for kind in kinds:
            for name, hp in MESH_CASES.items():
                check_mesh_case(name, hp, tmp, kind)
    check_unsupported_layouts()
