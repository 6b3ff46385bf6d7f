"""Every launcher runs its kernels on its tensors' CUDA device, whichever device is current (a model split across
GPUs by device_map="auto" has its head on another GPU than cuda:0). No GPU here: the decorator is checked on fake
CUDA tensors, and the kernel modules are read to check that every function that launches a kernel wears it."""

from __future__ import annotations

import ast
import contextlib
import inspect
import pkgutil

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastalign.kernels as kernels
from fastalign.kernels import (
    fused_linear_loss,
    ift,
    linear_logprobs,
    logprobs,
    on_tensors_device,
    online_merge,
    radix_select,
)

MODULES = (fused_linear_loss, ift, linear_logprobs, logprobs, online_merge, radix_select)


def test_launcher_runs_with_its_first_tensors_device_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def device(d):  # torch.cuda.device, recorded: this machine has no CUDA to switch to
        entered.append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []

    @on_tensors_device
    def launcher(scale, x, out=None):
        seen.append(list(entered))
        return scale

    with FakeTensorMode():
        on_second_gpu = torch.empty(4, device="cuda:1")
    assert launcher(2.0, on_second_gpu) == 2.0 and seen[-1] == [torch.device("cuda:1")]
    entered.clear()
    assert launcher(3.0, None, out=on_second_gpu) == 3.0 and seen[-1] == [torch.device("cuda:1")]  # a keyword
    entered.clear()
    for elsewhere in (torch.empty(4), torch.empty(4, device="meta")):  # the interpreter; compile-check
        launcher(1.0, elsewhere)
        assert seen[-1] == []


def _launches_a_kernel(function: ast.FunctionDef, kernel_names: set[str]) -> bool:
    return any(
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Subscript)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in kernel_names
        for node in ast.walk(function)
    )


def test_every_function_that_launches_a_kernel_runs_on_its_tensors_device():
    launchers = []
    for module in MODULES:
        tree = ast.parse(inspect.getsource(module))
        functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
        kernel_names = {f.name for f in functions if "jit" in ast.unparse(f.decorator_list)}
        assert kernel_names, module.__name__
        for f in functions:
            if f.name not in kernel_names and _launches_a_kernel(f, kernel_names):
                launchers.append(f"{module.__name__}.{f.name}")
                assert "on_tensors_device" in [ast.unparse(d) for d in f.decorator_list], launchers[-1]
    assert len(launchers) >= 14, launchers  # every module's launchers were found, not none
    # and no kernel module was left out of MODULES
    every = {f"{kernels.__name__}.{m.name}" for m in pkgutil.iter_modules(kernels.__path__)}
    assert every == {m.__name__ for m in MODULES}
