"""OnlineMergeAdamW: AdamW whose every update is sparsified and merged with a reference task
vector τ = θ_ref − θ_base, as OnDARE or OnTIES (Lu et al. 2024, "Online Merging Optimizers for
Boosting Rewards and Mitigating Tax in Alignment"), with the official implementation's semantics
and its step-K bug fixed. See README.md, "Online-merging optimizer".
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from fastalign._backend import backend_for, check_flag, eager_under_compile
from fastalign.optim import _torch_path
from fastalign.optim._dare import dare_keep, dare_key
from fastalign.optim._launch import Launch, LayoutCache, Slot, kernel_nonfinite, kernel_step, step_sizes
from fastalign.optim._layout import FlatShard, Layout, layout_of, like_param, local_part, local_tensor
from fastalign.optim._select import Runs, topk_count

METHODS = ("ondare", "onties")
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REF_DELTA_DTYPES = (torch.bfloat16, torch.float32)
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "cached_delta")
_GROUP_KEYS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "method",
    "reserve_p",
    "alpha",
    "rescale",
    "clip",
    "online_step",
    "seed",
)

# A launch covers at most this many elements of whole parameters (more only for one larger
# parameter): it bounds OnTIES's fp32 Δ buffer. Whole-parameter sizes, so every process of a
# sharded run cuts the same launches and their collectives line up.
_LAUNCH_NUMEL = 1 << 28
# What OnlineMergeAdamW keeps besides torch.optim's defaults, state and param_groups (see __getstate__).
_OWN_ATTRIBUTES = (
    "ref_delta_dtype",
    "skip_nonfinite",
    "_flat_shards",
    "_params",
    "_index",
    "_names",
    "_layouts",
    "_constructed",
)


def _is_number(x: Any) -> bool:
    """A Python int or float: the kernels take hyperparameters as scalar arguments, which a tensor is not."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_group(group: Mapping[str, Any]) -> None:
    """Raises ValueError/TypeError naming the first bad hyperparameter. Run at construction, by add_param_group, on
    a state dict's groups before they are loaded, and at every step (an LR scheduler or a user may set a group's
    values directly; the kernels take them as scalar arguments)."""
    missing = [key for key in _GROUP_KEYS if key not in group]
    if missing:
        raise ValueError(f"a param group has no {missing}")

    def real(name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
        x = group[name]
        ok = _is_number(x) and (lo < x if lo_open else lo <= x) and (x < hi if hi_open else x <= hi)
        if not ok:
            lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
            raise ValueError(f"{name} must be a Python int or float in {lb}{lo}, {hi}{rb}; got {x!r}")

    inf = float("inf")
    real("lr", 0.0, inf, hi_open=True)
    # eps = 0 would divide 0 by 0 wherever a gradient element has been exactly 0 so far (an unused embedding row).
    real("eps", 0.0, inf, lo_open=True, hi_open=True)
    real("weight_decay", 0.0, inf, hi_open=True)
    # At least float32's smallest normal: ondare scales the kept entries by 1 / reserve_p, in float32.
    real("reserve_p", torch.finfo(torch.float32).tiny, 1.0)
    real("alpha", 0.0, 1.0)
    real("clip", 0.0, inf, lo_open=True)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1); got {betas!r}")
    if group["method"] not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {group['method']!r}")
    check_flag("rescale", group["rescale"])
    if group["rescale"] and group["method"] != "ondare":
        raise ValueError("rescale is defined for method='ondare' only (OnTIES keeps the top-k Δ as it is)")
    step = group["online_step"]
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 1):
        raise ValueError(f"online_step must be an int >= 1; got {step!r}")
    seed = group["seed"]
    if not (isinstance(seed, int) and 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in [0, 2**63); got {seed!r}")


class OnlineMergeAdamW(torch.optim.Optimizer):
    """AdamW (HF's eps convention) with OnDARE or OnTIES online merging, one fused step per launch.

    Each step, per parameter: m, v ← Adam moments; Δ = −lr·√(1−β2^t)/(1−β1^t) · m/(√v + eps);
    Δ is sparsified (ondare: Bernoulli(reserve_p) keep, scaled by 1/reserve_p; onties: top
    int(reserve_p·numel) by magnitude, then sign election against τ) and merged:
    θ += alpha·τ + (1 − alpha)·Δ; then θ −= lr·weight_decay·θ. τ is sparsified once, here.

    Args:
        params: parameters or param groups, as for torch.optim (named parameters work too);
            fp32/bf16/fp16, plain tensors or DTensors sharded along dims 0 and 1 (FSDP2, HSDP,
            FSDP x TP), or flat shards (see flat_shards).
        lr, betas, eps, weight_decay: AdamW's (defaults 1e-3, (0.9, 0.999), 1e-8, 0.0).
        method: "ondare" or "onties" (default "ondare").
        reserve_p: fraction of entries kept, in (0, 1] (default 1.0; at least float32's smallest normal).
        alpha: weight of τ in the merge, in [0, 1] (default 0.0).
        rescale: ondare only: scale the kept Δ back to its L1 norm before the drop, then clamp
            it to ±clip (default False).
        clip: bound of the sparsified τ (and of the rescaled Δ) for ondare (default 1.0).
        online_step: merge every K steps; the steps between apply and accumulate the plain Δ,
            and the K-th rolls it back and merges the sum (default 1).
        ref_delta: τ per parameter: a dict keyed by parameter (or by name, if params were
            named), or a list aligned with the parameters; entries are whole-parameter tensors
            (the optimizer keeps its shard) or DTensors laid out like the parameter, on the
            parameter's device. Parameters without an entry merge with τ = 0. Default None.
        seed: key of the DARE random keeps, with the step, parameter index and element index.
        ref_delta_dtype: how τ is stored: torch.bfloat16 (default) or torch.float32.
        skip_nonfinite: skip the whole step (moments and step counters included) when any
            gradient holds NaN or ±inf, decided on the device without a host sync (default False).
        flat_shards: {tensor: FlatShard(offset, numel, group)} for parameters that are flat
            partitions of a larger flattened parameter (ZeRO-style).

    GradScaler works as with torch's fused optimizers: it sets `grad_scale` and `found_inf`, the
    gradients are unscaled inside the kernels and an inf/NaN step is skipped on the device.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        method: str = "ondare",
        reserve_p: float = 1.0,
        alpha: float = 0.0,
        rescale: bool = False,
        clip: float = 1.0,
        online_step: int = 1,
        ref_delta: Mapping | Sequence | None = None,
        seed: int = 0,
        ref_delta_dtype: torch.dtype = torch.bfloat16,
        skip_nonfinite: bool = False,
        flat_shards: Mapping[torch.Tensor, FlatShard] | None = None,
    ):
        if ref_delta_dtype not in REF_DELTA_DTYPES:
            raise ValueError(f"ref_delta_dtype must be torch.bfloat16 or torch.float32; got {ref_delta_dtype}")
        check_flag("skip_nonfinite", skip_nonfinite)
        self.ref_delta_dtype = ref_delta_dtype
        self.skip_nonfinite = skip_nonfinite
        self._flat_shards = dict(flat_shards or {})
        self._params: list[torch.Tensor] = []  # in param_groups order: what each position held
        self._index: dict[torch.Tensor, int] = {}
        self._names: dict[torch.Tensor, str] = {}
        self._layouts: dict[torch.Tensor, Layout] = {}
        self._tables = LayoutCache()  # what the steps keep per layout of their launches
        self._constructed = False
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            method=method,
            reserve_p=reserve_p,
            alpha=alpha,
            rescale=rescale,
            clip=clip,
            online_step=online_step,
            seed=seed,
        )
        super().__init__(params, defaults)
        unknown = [p for p in self._flat_shards if p not in self._index]
        if unknown:
            raise ValueError(f"flat_shards holds {len(unknown)} tensor(s) that are not parameters of this optimizer")
        entries = self._ref_delta_entries(ref_delta)
        if ref_delta is None and any(g["alpha"] > 0 for g in self.param_groups):
            raise ValueError("alpha > 0 merges τ into every update, so ref_delta is required")
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p, group, entries.get(p))
        self._constructed = True

    def __getstate__(self) -> dict[str, Any]:
        """torch.optim keeps only defaults, state and param_groups when an optimizer is copied or pickled; this one
        also needs what it holds per parameter (copy.deepcopy(opt) could not step). The per-layout cache is rebuilt.
        """
        kept = {k: v for k, v in self.__dict__.items() if k in _OWN_ATTRIBUTES}
        return {**super().__getstate__(), **kept, "_tables": LayoutCache()}

    # ------------------------------------------------------------------------- construction

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check_group({**self.defaults, **param_group})
        if not isinstance(param_group["params"], (torch.Tensor, set)):  # torch.optim refuses a set
            param_group["params"] = params = list(param_group["params"])  # once: it may be a generator
            ids = [id(p[1] if isinstance(p, tuple) else p) for p in params]  # (name, parameter) pairs too
            if len(set(ids)) != len(ids):
                # torch.optim only warns: each copy would take its own step, one after the other.
                raise ValueError("a param group holds the same parameter more than once")
        if self._constructed:
            self._follow_swapped_params()
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        indices = range(len(self._params), len(self._params) + len(group["params"]))
        names = [
            name or f"parameter {index} (shape {tuple(p.shape)})"
            for index, p, name in zip(indices, group["params"], group.get("param_names", [None] * len(indices)))
        ]
        try:  # every parameter is checked before any is registered, so a call that raises changes nothing
            layouts = [self._checked_layout(p, name) for p, name in zip(group["params"], names)]
        except Exception:
            self.param_groups.pop()
            raise
        for index, p, name, layout in zip(indices, group["params"], names, layouts):
            self._params.append(p)
            self._register(p, name, index, layout)
        if self._constructed:  # a group added later starts without τ
            for p in group["params"]:
                self._init_state(p, group, None)

    def _checked_layout(self, p: torch.Tensor, name: str) -> Layout:
        """p's layout; raises TypeError or ValueError on a parameter the optimizer cannot step."""
        _check_dtype(p, name)
        layout = layout_of(p, self._flat_shards.get(p), name)
        if not local_tensor(p).is_contiguous():
            raise ValueError(f"{name} must be contiguous (its local shard, for a DTensor)")
        return layout

    def _register(self, p: torch.Tensor, name: str, index: int, layout: Layout) -> None:
        self._index[p], self._names[p], self._layouts[p] = index, name, layout

    def _follow_swapped_params(self) -> None:
        """Re-keys everything kept per parameter when param_groups hold new tensors in the places of
        the old ones, as after accelerate's FSDP2 prepare (fsdp2_switch_optimizer_parameters swaps
        each parameter for its sharded DTensor after the optimizer was built). The new tensor takes
        the old one's index (so the DARE keeps do not change), name and state; the state, made for
        the old layout, is re-sliced to the new local shard, so the trajectory goes on exactly.
        Called by step, state_dict and load_state_dict: a check of identities when nothing moved."""
        current = [p for g in self.param_groups for p in g["params"]]
        if len(current) != len(self._params):
            raise RuntimeError(
                f"param_groups hold {len(current)} parameters where OnlineMergeAdamW registered "
                f"{len(self._params)}; add parameters with add_param_group"
            )
        for index, (old, new) in enumerate(zip(self._params, current)):
            if new is not old:
                self._swap_param(index, old, new)

    def _swap_param(self, index: int, old: torch.Tensor, new: torch.Tensor) -> None:
        name = self._names[old]
        if tuple(new.shape) != tuple(old.shape) or new.dtype != old.dtype:
            raise ValueError(
                f"{name} ({tuple(old.shape)} {old.dtype}) was replaced in param_groups by a tensor of "
                f"{tuple(new.shape)} {new.dtype}; a replacement must be the same parameter, resharded"
            )
        if old in self._flat_shards:
            raise ValueError(f"{name} is a flat shard (flat_shards); it cannot be replaced in param_groups")
        layout = self._checked_layout(new, name)
        for table in (self._index, self._names, self._layouts):
            del table[old]
        state = self.state.pop(old, {})
        self._params[index] = new
        self._register(new, name, index, layout)
        self.state[new] = {key: self._loaded(new, key, value) for key, value in state.items()}

    def _ref_delta_entries(self, ref_delta) -> dict[torch.Tensor, torch.Tensor]:
        params = [p for g in self.param_groups for p in g["params"]]
        if ref_delta is None:
            return {}
        if isinstance(ref_delta, Mapping):
            by_name = {name: p for p, name in self._names.items()}
            entries = {}
            for key, value in ref_delta.items():
                if isinstance(key, str):
                    if key not in by_name:
                        raise ValueError(
                            f"ref_delta has the name {key!r}, which no parameter has; name the parameters by "
                            "passing model.named_parameters(), or key ref_delta by parameter"
                        )
                    key = by_name[key]
                elif not isinstance(key, torch.Tensor) or key not in self._index:
                    raise ValueError("ref_delta has a key that is not a parameter of this optimizer")
                entries[key] = value
            return {p: v for p, v in entries.items() if v is not None}
        if isinstance(ref_delta, Sequence):
            if len(ref_delta) != len(params):
                raise ValueError(f"ref_delta must have one entry per parameter ({len(params)}); got {len(ref_delta)}")
            return {p: v for p, v in zip(params, ref_delta) if v is not None}
        raise TypeError(f"ref_delta must be a dict, a list or None; got {type(ref_delta).__name__}")

    def _local_ref_delta(self, p: torch.Tensor, entry) -> torch.Tensor:
        """This process's part of τ for p, as float32, after checking its shape and device."""
        name, local = self._names[p], local_tensor(p)
        if not isinstance(entry, torch.Tensor) or not entry.is_floating_point():
            raise TypeError(f"ref_delta for {name} must be a floating-point tensor; got {type(entry).__name__}")
        if isinstance(entry, DTensor):
            if not _laid_out_like(entry, p):
                raise ValueError(
                    f"ref_delta for {name} is a DTensor {tuple(entry.shape)} {getattr(entry, 'placements', '')} "
                    "not laid out like the parameter"
                )
            part = entry.to_local()
        else:
            part = self._local_part(p, f"ref_delta for {name}", entry)
        part = part.detach()  # τ built from live models (sft - base) must not keep their autograd graph
        if part.device != local.device:
            raise ValueError(f"ref_delta for {name} must be on {local.device}, like the parameter; got {part.device}")
        if not bool(torch.isfinite(part).all()):  # TIES's sign election would drop a NaN τ silently
            raise ValueError(f"ref_delta for {name} holds NaN or ±inf")
        return part.float().contiguous()

    def _local_part(self, p: torch.Tensor, what: str, whole: torch.Tensor) -> torch.Tensor:
        """This process's part of `whole`, a plain tensor of the whole parameter p (of its shape, or
        for a flat shard of its number of elements); raises ValueError naming `what` otherwise."""
        layout = self._layouts[p]
        if tuple(whole.shape) != layout.shape and not (len(layout.shape) == 1 and whole.numel() == layout.numel):
            raise ValueError(f"{what} must have shape {layout.shape}; got {tuple(whole.shape)}")
        return local_part(whole, layout, local_tensor(p))

    def _init_state(self, p: torch.Tensor, group: dict, entry) -> None:
        """Creates the whole state now, so torch.distributed.checkpoint never needs a dummy step."""
        local = local_tensor(p)
        zeros = lambda: like_param(torch.zeros_like(local, dtype=torch.float32), p)  # noqa: E731
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32, device=local.device)
        state["exp_avg"] = zeros()
        state["exp_avg_sq"] = zeros()
        if group["online_step"] > 1:
            state["cached_delta"] = zeros()
        if entry is not None:
            tau = self._sparsify_ref_delta(p, group, self._local_ref_delta(p, entry))
            state["ref_delta"] = like_param(tau.to(self.ref_delta_dtype), p)

    def _sparsify_ref_delta(self, p: torch.Tensor, group: dict, tau: torch.Tensor) -> torch.Tensor:
        """τ's one-time sparsification (the same on every backend): ondare keeps each entry with
        probability reserve_p (the DARE keep of step 0), scales by 1/reserve_p, clamps to ±clip;
        onties keeps the top int(reserve_p·numel) magnitudes."""
        layout, reserve_p = self._layouts[p], group["reserve_p"]
        flat = tau.view(-1)
        if group["method"] == "ondare":
            if reserve_p < 1.0:
                keep = dare_keep(
                    group["seed"], 0, self._index[p], layout.offset, flat.numel(), reserve_p, flat.device, layout.run,
                    layout.run_stride,
                )  # fmt: skip
                flat = torch.where(keep, flat * torch.tensor(1.0 / reserve_p, dtype=torch.float32).item(), 0.0)
            return flat.clamp(-group["clip"], group["clip"]).view(tau.shape)
        k = topk_count(reserve_p, layout.numel)
        flat = flat.clone()
        runs = Runs.of([(layout.offset, flat.numel(), layout.run, layout.run_stride)], layout.group, flat.device)
        _torch_path.topk_select(flat, [flat.numel()], [k], [k < layout.numel], runs)
        return flat.view(tau.shape)

    # ------------------------------------------------------------------------- step

    def _taking_part(self, group: dict) -> set[torch.Tensor]:
        """The parameters of `group` this step updates: those with a gradient, and where the step's launches run
        collectives over a parameter's shards (TIES's selection, rescale's norms), also a shard with no gradient on
        this process while another process of its group has one: the launches must hold the same slots on every
        process. Only an empty shard can take part so (with its empty gradient); a non-empty one would be half
        updated, and every process raises ValueError. One all-reduce per process group (and a host sync)."""
        taking = {p for p in group["params"] if p.grad is not None}
        if group["method"] != "onties" and not group["rescale"]:
            return taking
        by_group: dict[int, list[torch.Tensor]] = {}
        for p in group["params"]:
            if self._layouts[p].group is not None:
                by_group.setdefault(id(self._layouts[p].group), []).append(p)
        for params in sorted(by_group.values(), key=lambda ps: _group_order(self._layouts[ps[0]].group)):
            flags = torch.tensor(
                [
                    [p.grad is not None for p in params],
                    [p.grad is None and local_tensor(p).numel() > 0 for p in params],
                ],
                dtype=torch.int32,
                device=local_tensor(params[0]).device,
            )
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._layouts[params[0]].group)
            for p, somewhere, missing in zip(params, *flags.tolist()):
                if somewhere and missing:
                    raise ValueError(
                        f"{self._names[p]} has a gradient on some processes of its group and none on others, where "
                        "its shard is not empty: its step would update part of it"
                    )
                if somewhere:
                    taking.add(p)
        return taking

    def _launches(self) -> list[Launch]:
        launches = []
        for group in self.param_groups:
            buckets: dict[tuple, list[Slot]] = {}
            taking = self._taking_part(group)
            for p in group["params"]:
                if p not in taking:
                    continue
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(f"{self._names[p]} has a sparse gradient; OnlineMergeAdamW needs dense ones")
                _check_dtype(p, self._names[p])  # again: the model may have been cast since (model.double())
                state, layout, local = self.state[p], self._layouts[p], local_tensor(p)
                if group["online_step"] > 1 and "cached_delta" not in state:
                    state["cached_delta"] = like_param(torch.zeros_like(local, dtype=torch.float32), p)
                tau = state.get("ref_delta")
                slot = Slot(
                    param=local,
                    grad=torch.zeros_like(local)
                    if p.grad is None
                    else local_tensor(p.grad).contiguous(),  # empty shard
                    exp_avg=local_tensor(state["exp_avg"]),
                    exp_avg_sq=local_tensor(state["exp_avg_sq"]),
                    ref_delta=None if tau is None else local_tensor(tau),
                    cached_delta=local_tensor(state["cached_delta"]) if group["online_step"] > 1 else None,
                    step=state["step"],
                    offset=layout.offset,
                    run=layout.run,
                    run_stride=layout.run_stride,
                    numel=layout.numel,
                    dare_key=dare_key(group["seed"], self._index[p]),
                )
                key = (local.device, local.dtype, None if tau is None else tau.dtype, layout.group)
                buckets.setdefault(key, []).append(slot)
            for (device, dtype, tau_dtype, pg), slots in buckets.items():
                size = 0
                for slot in slots:
                    if size == 0 or size + slot.numel > _LAUNCH_NUMEL:
                        launches.append(Launch(group, [], pg, device, dtype, tau_dtype))
                        size = 0
                    launches[-1].slots.append(slot)
                    size += slot.numel
        return launches

    def _skip_flags(self, launches: list[Launch]) -> dict[torch.device, torch.Tensor | None]:
        """Per device, a [] fp32 flag, 1 when this step must be skipped and 0 otherwise (step() adds
        1 - flag to the step counters): GradScaler's found_inf > 0, or (skip_nonfinite) a NaN/inf
        gradient anywhere, on any device of any process that holds a shard. None when nothing can
        skip the step."""
        devices = {launch.device for launch in launches}
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None and not self.skip_nonfinite:
            return dict.fromkeys(devices)
        flags = {}
        for d in devices:  # found_inf is GradScaler's sum of its devices' flags: 2 or more when several overflow
            if found_inf is None:
                flags[d] = torch.zeros((), dtype=torch.float32, device=d)
            else:
                flags[d] = (found_inf.to(d) > 0).float()
        if self.skip_nonfinite:
            for launch in launches:
                if backend_for(launch.slots[0].param) == "torch":
                    _torch_path.nonfinite(launch, flags[launch.device])
                else:
                    kernel_nonfinite(launch, flags[launch.device], self._tables)
        if len(flags) > 1:  # one device skips, all skip: a max, which keeps the flag 0 or 1 (a sum would not)
            first = next(iter(flags))
            anywhere = torch.stack([f.to(first) for f in flags.values()]).amax()
            flags = {d: anywhere.to(d) for d in flags}
        # Every process reduces over its groups in one global order (smaller groups first, then by
        # their ranks), so overlapping groups of a 2-D mesh cannot wait on each other; the largest
        # (FSDP x TP's flattened mesh) comes last and leaves every process of it with one flag.
        groups = {id(launch.group): launch for launch in launches if launch.group is not None}
        for launch in sorted(groups.values(), key=lambda la: _group_order(la.group)):
            dist.all_reduce(flags[launch.device], op=dist.ReduceOp.MAX, group=launch.group)
        return flags

    @eager_under_compile
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter with a gradient; returns closure()'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_group(group)
        self._follow_swapped_params()
        self._tables.new_step()
        launches = self._launches()
        skip = self._skip_flags(launches)
        grad_scale = getattr(self, "grad_scale", None)
        for launch in launches:
            flag = skip[launch.device]
            scale = None if grad_scale is None else grad_scale.to(launch.device, torch.float32)
            t, step_size = step_sizes(launch)
            if backend_for(launch.slots[0].param) == "torch":
                _torch_path.torch_step(launch, t, step_size, flag, scale, self._tables)
            else:
                kernel_step(
                    launch,
                    t,
                    step_size,
                    flag if flag is not None else torch.zeros((), device=launch.device),
                    scale if scale is not None else torch.ones((), device=launch.device),
                    self._tables,
                )
            steps = [s.step for s in launch.slots]
            torch._foreach_add_(steps, 1.0 if flag is None else 1.0 - flag)
        return loss

    # ------------------------------------------------------------------------- state dict

    def state_dict(self) -> dict[str, Any]:
        self._follow_swapped_params()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads hyperparameters and state without casting the state to the parameters' dtype:
        moments stay fp32 and τ keeps its stored dtype (torch.optim would cast both to the
        parameter's dtype). Values are copied to the parameter's device and layout. The hooks run
        as torch.optim.Optimizer's do: the pre-hooks first (one may return a new state dict), the
        post-hooks once all is loaded. A state dict that does not fit raises before anything changes."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict (from state_dict()); got {type(state_dict).__name__}")
        self._follow_swapped_params()
        state_dict = dict(state_dict)  # shallow, as torch.optim's: a pre-hook may change it in place
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        for saved_group in saved_groups:  # the values every later step runs with
            _check_group(saved_group)
        sizes, saved_sizes = ([len(g["params"]) for g in groups] for groups in (self.param_groups, saved_groups))
        if saved_sizes != sizes:
            raise ValueError(
                f"the state dict's param groups hold {saved_sizes} parameters; this optimizer's hold {sizes}"
            )
        saved, state = state_dict["state"], {}
        for group, saved_group in zip(self.param_groups, saved_groups):
            for p, i in zip(group["params"], saved_group["params"]):
                if i not in saved or not {"step", "exp_avg", "exp_avg_sq"} <= set(saved[i]):
                    raise ValueError(f"the state dict has no step, exp_avg and exp_avg_sq for {self._names[p]}")
                state[p] = {key: self._loaded(p, key, value) for key, value in saved[i].items()}
            saved_group["params"] = group["params"]  # the groups as torch.optim loads them
            if "param_names" in group:
                saved_group.setdefault("param_names", group["param_names"])
        self.__setstate__({"state": defaultdict(dict, state), "param_groups": saved_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _loaded(self, p: torch.Tensor, key: str, value):
        """A state value for p: this process's part of it, on p's device, in the state's dtype.
        value is laid out like p, or whole, or a DTensor of another layout (gathered first), or
        on the meta device (a model built there before it was sharded: only zeros can be kept).
        Values no step could recover from raise: a step that is not a finite count >= 0, a moment
        or τ that is not a real float tensor, a NaN/inf moment, a negative second moment."""
        what = f"state {key!r} of {self._names[p]}"
        if key == "step" and _is_number(value):
            value = torch.tensor(float(value))
        if key not in (*_MOMENT_KEYS, "ref_delta", "step"):
            return value  # not ours: kept as it is, as torch.optim does
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
            kind = type(value).__name__ if not isinstance(value, torch.Tensor) else value.dtype
            raise TypeError(f"{what} must be a real floating-point tensor; got {kind}")
        if key == "ref_delta" and value.dtype not in REF_DELTA_DTYPES:
            raise TypeError(f"{what} must be bfloat16 or float32 (how τ is stored); got {value.dtype}")
        loaded = self._loaded_tensor(p, key, value, what)
        if loaded.device.type != "meta" and key != "ref_delta":  # τ was checked finite when it was given
            local_value = local_tensor(loaded)
            bad = not bool(torch.isfinite(local_value).all())  # a host sync, once per state value at load time
            if key == "step":
                bad = bad or bool(local_value < 0)
            elif key == "exp_avg_sq":
                bad = bad or bool((local_value < 0).any())
            if bad:
                expected = "a finite count >= 0" if key == "step" else "finite" + " and >= 0" * (key == "exp_avg_sq")
                raise ValueError(f"{what} must be {expected}; the state dict holds other values")
        return loaded

    def _loaded_tensor(self, p: torch.Tensor, key: str, value: torch.Tensor, what: str) -> torch.Tensor:
        local = local_tensor(p)
        dtype = torch.float32 if key in _MOMENT_KEYS or key == "step" else value.dtype
        if value.device.type == "meta" and local.device.type != "meta":
            if key not in _MOMENT_KEYS and key != "step":
                raise ValueError(f"{what} is on the meta device; its values are lost")
            value = torch.zeros(value.shape, dtype=dtype)
        if key == "step":
            if value.numel() != 1:
                raise ValueError(f"{what} must hold one number; got shape {tuple(value.shape)}")
            return local_tensor(value).detach().to(local.device, torch.float32).reshape(()).clone()
        if isinstance(value, DTensor) and _laid_out_like(value, p):
            value = value.to_local()
        else:
            if isinstance(value, DTensor):
                value = value.full_tensor()
            if isinstance(p, DTensor) or tuple(value.shape) != tuple(local.shape):
                value = self._local_part(p, what, value)
        return like_param(value.detach().to(local.device, dtype).contiguous().clone(), p)


def _check_dtype(p: torch.Tensor, name: str) -> None:
    if p.dtype not in PARAM_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16; got {p.dtype}")


def _group_order(group) -> tuple[int, list[int]]:
    """A process group's place in an order every process agrees on: its size, then its ranks."""
    ranks = sorted(dist.get_process_group_ranks(group))
    return len(ranks), ranks


def _laid_out_like(value: DTensor, p: torch.Tensor) -> bool:
    return (
        isinstance(p, DTensor)
        and value.shape == p.shape
        and value.device_mesh == p.device_mesh
        and value.placements == p.placements
    )
