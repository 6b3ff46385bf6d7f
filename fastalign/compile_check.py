"""Ahead-of-time compile of every kernel in fastalign.kernels for sm_80 and sm_90, without a GPU.

The interpreter never compiles, so this is what catches a kernel that only fails on hardware, and
the register spills that quietly halve its speed. Each kernel module lists the specializations its
launchers use in `compile_specs()`; a @triton.jit kernel that no spec covers is an error. Kernels are
the @triton.jit functions named `*_kernel` (the house convention); other @triton.jit functions are
device helpers (e.g. a `tl.associative_scan` combine function), compiled inside the kernels that call them.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ARCHS = (80, 90)
# Shared memory one block may opt into: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB. A kernel over it fails at launch.
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class Result:
    kernel: str
    label: str
    arch: int
    regs: int = 0
    spill_bytes: int = 0
    shared: int = 0
    error: str = ""


def _kernel_modules():
    import fastalign.kernels as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        yield importlib.import_module(f"{pkg.__name__}.{info.name}")


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local-memory bytes) of the single function in a cubin, via cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    regs = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    spill = int(local.group(1)) if local else 0
    spill += int(stack.group(1)) if stack else 0
    return (int(regs.group(1)) if regs else 0), spill


def _compile(spec, arch: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    names = list(spec.signature)
    # Pointers are 16-byte aligned, as every torch allocation is; the runtime specializes on it too.
    attrs = {(names.index(n),): backend.parse_attr("D") for n, ty in spec.signature.items() if ty.startswith("*")}
    src = ASTSource(fn=spec.kernel, signature=dict(spec.signature), constexprs=dict(spec.constexprs), attrs=attrs)
    result = Result(spec.kernel.__name__, spec.label, arch)
    try:
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        result.regs, result.spill_bytes = _resource_usage(compiled.asm["cubin"])
        result.shared = int(compiled.metadata.shared)
    except Exception as exc:  # report every failure, then exit non-zero
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return result


def _status(r: Result) -> str:
    if r.error:
        return "ERROR " + r.error
    if r.spill_bytes:
        return "SPILL"
    if r.shared > MAX_SHARED[r.arch]:
        return f"SHARED MEMORY over {MAX_SHARED[r.arch]}"
    return "ok"


def run(archs=ARCHS, out=sys.stdout) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile-check: unset TRITON_INTERPRET; the interpreter does not compile", file=out)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    results: list[Result] = []
    uncovered: list[str] = []
    for module in _kernel_modules():
        kernels = {
            name
            for name, obj in vars(module).items()
            if isinstance(obj, triton.runtime.JITFunction)
            and obj.fn.__module__ == module.__name__
            and name.endswith("_kernel")
        }
        specs = module.compile_specs() if hasattr(module, "compile_specs") else []
        uncovered += sorted(f"{module.__name__}.{k}" for k in kernels - {s.kernel.__name__ for s in specs})
        seen = set()
        for spec in specs:
            # Launch heuristics often pick the same block for several shapes: compile each once.
            key = (spec.kernel.__name__, tuple(spec.signature.items()), tuple(spec.constexprs.items()))
            key += (spec.num_warps, spec.num_stages)
            if key in seen:
                continue
            seen.add(key)
            for arch in archs:
                results.append(_compile(spec, arch))

    print(f"{'kernel':<40} {'specialization':<56} {'sm':>3} {'regs':>5} {'spill':>6} {'smem':>7}  status", file=out)
    for r in results:
        print(
            f"{r.kernel:<40} {r.label:<56} {r.arch:>3} {r.regs:>5} {r.spill_bytes:>6} {r.shared:>7}  {_status(r)}",
            file=out,
        )
    for name in uncovered:
        print(f"{name}: no compile spec covers this kernel", file=out)
    failed = [r for r in results if _status(r) != "ok"]
    print(
        f"\n{len(results)} compiles, {len(failed)} failed, spilled or over shared memory, "
        f"{len(uncovered)} kernels without a spec",
        file=out,
    )
    return 1 if failed or uncovered or not results else 0
