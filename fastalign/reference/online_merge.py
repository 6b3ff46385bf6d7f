"""Eager online-merging AdamW (OnDARE / OnTIES), two ways.

- `OnlineMergeReference`: the semantics fastalign.optim implements, written as plainly as
  possible on whole (unsharded) tensors; pass float64 tensors to get the test oracle. The DARE
  keeps are an input (the caller draws them), TIES's top-k is a stable sort.
- `OfficialOnlineMergeStep`: the step of the paper's official implementation
  (QwenLM/online_merging_optimizers, ODAdamW / OTAdamW) as eager per-parameter torch ops in the
  parameter's dtype, F.dropout for DARE and argsort for TIES: the "eager" benchmark baseline.
  Its step-K early return (which skips every later parameter) is fixed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def topk_mask(x: torch.Tensor, reserve_p: float) -> torch.Tensor:
    """Keeps the int(reserve_p · numel) largest |x|, the smaller index first among equals; all of
    x when that number is below 1. NaN ranks above every magnitude (as its float32 bits do)."""
    k = int(reserve_p * x.numel())
    if k < 1:
        return torch.ones_like(x, dtype=torch.bool)
    flat = x.reshape(-1)
    order = torch.sort(-flat.abs().nan_to_num(0.0), stable=True).indices
    order = order[torch.sort((~flat.isnan()[order]).to(torch.uint8), stable=True).indices]
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    mask[order[:k]] = True
    return mask.view(x.shape)


def selection_is_certain(delta: torch.Tensor, reserve_p: float, tau: torch.Tensor | None, rel: float = 1e-5):
    """Where a float32 run of OnTIES must agree with this float64 reference: everywhere except
    entries within `rel` of the top-k threshold when the k-th and (k+1)-th magnitudes are that
    close (float32 rounding may swap them), and where τ + Δ is within `rel` of 0 (the elected sign)."""
    certain = torch.ones_like(delta, dtype=torch.bool)
    k = int(reserve_p * delta.numel())
    if 1 <= k < delta.numel():
        mag = delta.abs()
        n = delta.numel()
        a, b = (
            mag.reshape(-1).kthvalue(n - k + 1).values,
            mag.reshape(-1).kthvalue(n - k).values,
        )  # k-th, (k+1)-th largest
        if a - b <= rel * a:
            certain &= (mag < b * (1 - rel)) | (mag > a * (1 + rel))
    if tau is not None:
        certain &= (tau + delta).abs() > rel * (tau.abs() + delta.abs())
    return certain


def sparsify_ref_delta(
    tau: torch.Tensor, method: str, reserve_p: float, clip: float, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """τ's one-time sparsification. ondare: keep (bool, required when reserve_p < 1) / reserve_p,
    clamped to ±clip; onties: the top-k magnitudes."""
    if method == "onties":
        return tau * topk_mask(tau, reserve_p)
    if reserve_p < 1:
        tau = torch.where(keep, tau / reserve_p, 0.0)
    return tau.clamp(-clip, clip)


def _elect(tau: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES's sign election: s = +1 where τ + Δ >= 0; the entries whose sign differs are zeroed (by
    a product, so a NaN Δ stays NaN)."""
    s = torch.where(tau + delta >= 0, 1.0, -1.0).to(tau.dtype)
    return tau * (torch.sign(tau) == s), delta * (torch.sign(delta) == s)


class OnlineMergeReference:
    """OnlineMergeAdamW's semantics for one parameter group, on whole tensors, in their dtype.

    params: list of tensors, updated in place; ref_delta: list of already-sparsified τ (or None).
    """

    def __init__(
        self, params, *, lr, betas, eps, weight_decay, method, reserve_p, alpha, rescale, clip, online_step, ref_delta
    ):
        self.params = params
        self.ref_delta = ref_delta
        self.lr, (self.beta1, self.beta2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.method, self.p, self.alpha, self.rescale, self.clip, self.k = (
            method, reserve_p, alpha, rescale, clip, online_step
        )  # fmt: skip
        self.t = [0] * len(params)
        self.m = [torch.zeros_like(x) for x in params]
        self.v = [torch.zeros_like(x) for x in params]
        self.cached = [torch.zeros_like(x) for x in params]
        self.sparsified: dict[int, torch.Tensor] = {}  # Δ that the last step sparsified, per parameter

    def step(self, grads, keeps=None) -> None:
        """grads: one per parameter (None skips it, as torch.optim does); keeps: DARE's keep
        masks for this step (bool, one per parameter), needed when reserve_p < 1."""
        self.sparsified = {}
        for i, (theta, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            self.t[i] += 1
            t = self.t[i]
            self.m[i] = self.beta1 * self.m[i] + (1 - self.beta1) * g
            self.v[i] = self.beta2 * self.v[i] + (1 - self.beta2) * g * g
            step_size = self.lr * math.sqrt(1 - self.beta2**t) / (1 - self.beta1**t)
            delta = -step_size * self.m[i] / (self.v[i].sqrt() + self.eps)
            if self.k > 1:
                if t % self.k:
                    theta += delta
                    self.cached[i] += delta
                    theta -= self.lr * self.wd * theta
                    continue
                theta -= self.cached[i]
                delta = delta + self.cached[i]
                self.cached[i] = torch.zeros_like(delta)
            self.sparsified[i] = delta
            tau = self.ref_delta[i] if self.ref_delta is not None and self.ref_delta[i] is not None else None
            tau = torch.zeros_like(delta) if tau is None else tau
            if self.method == "ondare":  # a NaN Δ is always kept: θ turns NaN, as AdamW's does
                kept = delta if self.p == 1 else torch.where(keeps[i] | delta.isnan(), delta / self.p, 0.0)
                before = delta.abs().sum()
                if self.rescale and before >= 1e-8:
                    kept = (kept * before / (kept.abs().sum() + self.eps)).clamp(-self.clip, self.clip)
                theta += self.alpha * tau + (1 - self.alpha) * kept
            else:
                tau, kept = _elect(tau, delta * topk_mask(delta, self.p))
                theta += self.alpha * tau + (1 - self.alpha) * kept
            theta -= self.lr * self.wd * theta


class OfficialOnlineMergeStep:
    """The official ODAdamW / OTAdamW step, eager, state in the parameter's dtype (as there).

    params: list of tensors with .grad set before each step(); ref_delta: list of raw τ (the
    official init_ref_param_diff sparsifies them here: dropout + clamp, or argsort top-k).
    """

    def __init__(
        self, params, *, lr, betas, eps, weight_decay, method, reserve_p, alpha, rescale, clip, online_step, ref_delta
    ):
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.method, self.p, self.alpha, self.rescale, self.clip, self.k = (
            method, reserve_p, alpha, rescale, clip, online_step
        )  # fmt: skip
        self.state = []
        for x, tau in zip(self.params, ref_delta):
            tau = tau.to(x.dtype).clone()
            if method == "ondare":
                F.dropout(tau, p=1 - reserve_p, training=True, inplace=True)
                tau.clamp_(-clip, clip)
            else:
                self._magnitude_mask_(tau)
            self.state.append(
                {"step": 0, "exp_avg": torch.zeros_like(x), "exp_avg_sq": torch.zeros_like(x), "tau": tau}
            )
            if online_step > 1:
                self.state[-1]["cached_delta"] = torch.zeros_like(x)

    def _magnitude_mask_(self, x: torch.Tensor) -> None:
        k = int(self.p * x.numel())
        if self.p >= 1 or k < 1:
            return
        top = torch.argsort(x.view(-1).abs(), descending=True)[:k]
        mask = torch.zeros_like(x)
        mask.view(-1)[top] = 1
        before = x.abs().sum()
        x.mul_(mask)
        if self.rescale and before >= 1e-8:
            x.mul_(before / x.abs().sum())

    @torch.no_grad()
    def step(self) -> None:
        for x, state in zip(self.params, self.state):
            if x.grad is None:
                continue
            m, v = state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1
            m.mul_(self.beta1).add_(x.grad, alpha=1 - self.beta1)
            v.mul_(self.beta2).addcmul_(x.grad, x.grad, value=1 - self.beta2)
            denom = v.sqrt().add_(self.eps)
            step_size = self.lr * math.sqrt(1 - self.beta2 ** state["step"]) / (1 - self.beta1 ** state["step"])
            delta = (m / denom) * -step_size
            if self.k > 1:
                cached = state["cached_delta"]
                if state["step"] % self.k:
                    cached.add_(delta)
                    x.add_(delta)
                    x.add_(x, alpha=-self.lr * self.wd)
                    continue  # the official code returns here, leaving later parameters unstepped
                x.sub_(cached)
                delta.add_(cached)
                cached.zero_()
            if self.method == "ondare":
                before = delta.abs().sum()
                F.dropout(delta, p=1 - self.p, training=True, inplace=True)
                after = delta.abs().sum()
                x.add_(state["tau"], alpha=self.alpha)
                if self.rescale and before >= 1e-8:
                    delta.mul_(before / (after + self.eps)).clamp_(-self.clip, self.clip)
                x.add_(delta, alpha=1 - self.alpha)
            else:
                self._magnitude_mask_(delta)
                deltas = torch.stack([state["tau"], delta])
                weights = torch.tensor([self.alpha, 1 - self.alpha], dtype=deltas.dtype, device=deltas.device)
                majority = (deltas.sum(0) >= 0) * 2 - 1
                deltas.mul_(deltas.sign() == majority)
                x.add_((deltas * weights.view(-1, *[1] * x.dim())).sum(0))
            x.add_(x, alpha=-self.lr * self.wd)
