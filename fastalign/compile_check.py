"""`fastalign compile-check`: compile what launches, read its SASS, predict its speed; no GPU needed.

The interpreter never compiles, so this is what catches a kernel that only fails on hardware, the register spills
that quietly halve its speed, and code that cannot reach the targets.

What it compiles. Each kernel module's `compile_specs()` returns `LaunchCase`s: calls of its own launchers at named
shapes (the target sizes and odd ones) on meta tensors, which allocate nothing. While they run, `JITFunction.run` is
replaced by a recorder that binds the arguments with Triton's own launch-time code (`create_function_from_signature`,
then `JITFunction._pack_args`, as `JITFunction.run` does in triton 3.6 to 3.9): pointer dtypes, i32/i64 integers,
integers equal to 1 made constants, integers divisible by 16 and 16-byte aligned pointers given the divisibility
hint. `pick_fastest` launches every candidate config. Each distinct specialization is then compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` for sm_80 and sm_90, in parallel processes. A
@triton.jit function named `*_kernel` (the house convention) that no case launches is an error; other @triton.jit
functions are device helpers, compiled inside the kernels that call them.

What it reads. cuobjdump gives registers and local memory (spills); the compiler's metadata the shared memory; from
those and the warps, the CTAs per SM under sm_80/sm_90 limits (`OCCUPANCY`). nvdisasm's SASS gives the MMA kind
(HGMMA = wgmma, HMMA = mma.sync), the widths of the global loads and stores (LDG/LDGSTS/STG/RED: .128, .64, 32,
.U16, ...) and the loop nest (backward branches), with the instructions in each loop's own body.

The prediction (printed per case at a target size). A case names its floor, the bytes the op must move or the
FLOPs it must do, and per kernel the trip counts of its loop nest per program. Each SASS instruction then executes
trips[0] * ... * trips[d-1] times per warp (d: its loop depth), in every warp of every program. Per launch:
    memory = bytes its loads and stores move (width x 32 lanes, every execution) / copy bandwidth
    issue  = warp instructions / (SMs x 4 schedulers x 1 instruction per cycle x clock)
    mma    = FLOPs of its HGMMA/HMMA instructions / the tensor-core rate of that instruction kind
and the launch takes the largest of the three (the bound). Predicated stores inside a loop (a compaction's, which
the data masks) move the share of lanes the case states for that kernel (`LaunchCase.store_share`), not all 32; its
unpredicated streaming stores move all. A kernel that fits one CTA per SM has nothing to overlap its instructions
outside the MMA loop (a tile's epilogue) with the tensor cores: their issue time adds to the mma term. In a case
with a FLOPs floor (tl.dot kernels) the tile loads mostly hit L2, which this model cannot tell, so the memory term
is left out there. A case takes the sum over its launches (with `pick_fastest`'s default config), and its predicted
% of the ceiling is the floor's time (floor bytes / copy bandwidth, or floor FLOPs / bf16 wgmma rate) over that sum.
Ceilings (`MACHINES`): the copy bandwidth (4.3 TB/s, read + write) and bf16 GEMM rate (790 TFLOP/s) measured on this
project's H200 (device docs, KINDS.md); the H100 and A100 from their datasheets scaled by the same
measured/datasheet ratios (0.9 for bandwidth, 0.8 for bf16 GEMM); mma.sync on sm_90 at 2/3 of wgmma; tf32 at half of
bf16. The model ignores latency (loads in flight), waves, cache hits and divergence: it is an upper bound, good at
telling which limit binds and by how much, not a measurement. The targets (issues 2 and 5) are H100 figures, so the
H100 column is the one that can fail; the H200 and A100 columns are printed alongside.

It fails on: a compile error; a spill; shared memory over the architecture's limit; a bf16/fp16 tl.dot kernel on
sm_90 without wgmma; a streaming kernel (a case with a bytes floor: the aligned target specialization) whose main
loads are narrow: no 128-bit load among them, or one narrower width 8 or more times (one load per element); a
predicted % below the case's target; a kernel without a case.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHS = (80, 90)
# Shared memory one block may opt into: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB. A kernel over it fails at launch.
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}
# Per SM: registers, shared memory (plus 1 KiB the driver reserves per CTA), warps and CTAs (CUDA occupancy tables).
OCCUPANCY = {
    80: {"regs": 65536, "smem": 164 * 1024, "warps": 64, "ctas": 32},
    90: {"regs": 65536, "smem": 228 * 1024, "warps": 64, "ctas": 32},
}
# A streaming kernel's main loads: one width narrower than 128 bits this many times is a load per element.
NARROW_REPEATS = 8


@dataclass(frozen=True)
class Machine:
    name: str
    arch: int
    sms: int
    clock_ghz: float
    copy_gbps: float  # device-to-device copy, read + write bytes per second
    mma_tflops: float  # dense bf16 GEMM (cuBLAS), i.e. wgmma on sm_90


MACHINES = (
    Machine("H100", 90, 132, 1.98, 3000, 790),  # datasheet 3.35 TB/s, 989 TFLOP/s, scaled as the H200 measured
    Machine("H200", 90, 132, 1.98, 4300, 790),  # measured here (device docs): 4.3 TB/s copy, 788 TFLOP/s bf16 GEMM
    Machine("A100", 80, 108, 1.41, 1840, 250),  # datasheet 2.04 TB/s, 312 TFLOP/s, scaled likewise
)
TARGET_MACHINE = "H100"
ISSUE_PER_CYCLE = 4  # warp instructions per SM per cycle: 4 schedulers, 1 each


# ----------------------------------------------------------------------------- recording the launches


@dataclass
class Launch:
    """One recorded kernel launch: what Triton would compile for it, and its grid."""

    module: str
    kernel: str
    grid: tuple[int, ...]
    args: dict[str, Any]  # bound arguments by name, constexprs included
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    candidate: bool = False  # a config `pick_fastest` would time besides the default: compiled, not predicted

    @property
    def key(self) -> str:
        """Equal keys compile to the same binary."""
        items = (self.module, self.kernel, self.signature, self.constexprs, self.attrs, sorted(self.options.items()))
        return repr(items)

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


def _kernel_modules() -> list:
    import fastalign.kernels as pkg

    return [importlib.import_module(f"{pkg.__name__}.{info.name}") for info in pkgutil.iter_modules(pkg.__path__)]


@contextlib.contextmanager
def _recording(arch: int) -> Iterator[list[Launch]]:
    """Within the block, @triton.jit launches are recorded (with sm_`arch`'s options), not run."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    import fastalign.kernels as kernels

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
    backend = make_backend(GPUTarget("cuda", arch, 32))
    launches: list[Launch] = []
    binders: dict[int, Any] = {}
    trying = [False]  # inside `pick_fastest`'s other candidates

    def record(self, *args, grid, warmup, **kwargs):
        # What JITFunction.run does before it compiles, minus the driver.
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
            if hasattr(knobs.compilation, name):
                kwargs[name] = getattr(knobs.compilation, name)
        if id(self) not in binders:
            binders[id(self)] = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binders[id(self)](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        grid = grid(bound) if callable(grid) else grid
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        launches.append(
            Launch(self.fn.__module__, self.fn.__name__, grid, dict(bound), signature, constexprs, attrs,
                   dict(options.__dict__), candidate=trying[0])
        )  # fmt: skip

    def other_candidates(launch, configs) -> None:
        trying[0] = True
        try:
            for config in configs:
                launch(config)
        finally:
            trying[0] = False

    saved = JITFunction.run, kernels._LAUNCH_OTHER_CANDIDATES
    JITFunction.run, kernels._LAUNCH_OTHER_CANDIDATES = record, other_candidates
    try:
        yield launches
    finally:
        JITFunction.run, kernels._LAUNCH_OTHER_CANDIDATES = saved


# ----------------------------------------------------------------------------- compiling and reading SASS


@dataclass
class Loop:
    start: int  # index of the first instruction of the body
    end: int  # index of the backward branch
    depth: int = 1  # 1 for an outermost loop


@dataclass
class Sass:
    """What compile-check reads from one kernel's SASS."""

    opcodes: list[str]  # every instruction, modifiers included: "LDG.E.128"
    loops: list[Loop]
    depth: list[int]  # per instruction: how many loops enclose it
    predicated: list[bool] = field(default_factory=list)  # per instruction: guarded by a predicate ("@P0 STG.E")

    @property
    def mma(self) -> str:
        if any(op.startswith("HGMMA") for op in self.opcodes):
            return "wgmma"
        if any(op.startswith("HMMA") for op in self.opcodes):
            return "mma.sync"
        return "-"

    def mma_loop(self) -> Loop | None:
        """The innermost loop around the first HGMMA/HMMA instruction, if any."""
        first = next((i for i, op in enumerate(self.opcodes) if op.startswith(("HGMMA", "HMMA"))), None)
        around = [lp for lp in self.loops if first is not None and lp.start <= first <= lp.end]
        return max(around, key=lambda lp: lp.depth, default=None)

    def hot_depth(self) -> int:
        """Depth of the innermost loop that loads from global memory (0: the kernel has no such loop)."""
        return max((d for op, d in zip(self.opcodes, self.depth) if _global_load(op)), default=0)

    def memory_widths(self, kind: str, depth: int | None = None) -> Counter:
        """Counter of bit widths of the global loads ("ld") or stores and atomics ("st"), at one loop depth or all."""
        test = _global_load if kind == "ld" else _global_store
        return Counter(
            _width(op) for op, d in zip(self.opcodes, self.depth) if test(op) and (depth is None or d == depth)
        )

    def loop_sizes(self) -> list[int]:
        """Instructions in each loop's own body (nested loops excluded), outermost first."""
        return [
            sum(1 for i in range(loop.start, loop.end + 1) if self.depth[i] == loop.depth)
            for loop in sorted(self.loops, key=lambda loop: (loop.depth, loop.start))
        ]


_INSTRUCTION = re.compile(r"/\*[0-9a-f]+\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def parse_sass(text: str) -> Sass:
    """Instructions, labels and loops (each backward branch closes one) of nvdisasm's output for one kernel."""
    opcodes: list[str] = []
    predicated: list[bool] = []
    labels: dict[str, int] = {}
    back: dict[str, int] = {}  # label -> last instruction that branches back to it
    for line in text.splitlines():
        if m := _LABEL.match(line):
            labels[m.group(1)] = len(opcodes)
        if m := _INSTRUCTION.search(line):
            if (b := _BRANCH_TARGET.search(line)) and b.group(1) in labels:
                back[b.group(1)] = len(opcodes)
            opcodes.append(m.group(2))
            predicated.append(m.group(1) is not None and not m.group(1).startswith("@PT"))
    # A branch to itself is the trap after the kernel's EXIT, not a loop.
    loops = [Loop(labels[label], end) for label, end in back.items() if labels[label] < end]
    loops.sort(key=lambda lp: (lp.start, -lp.end))
    depth = [0] * len(opcodes)
    for loop in loops:
        loop.depth = 1 + sum(1 for o in loops if o is not loop and o.start <= loop.start and loop.end <= o.end)
        for i in range(loop.start, loop.end + 1):
            depth[i] = max(depth[i], loop.depth)
    return Sass(opcodes, loops, depth, predicated)


def _global_load(op: str) -> bool:
    return op.startswith(("LDG.", "LDGSTS.", "UTMALDG")) or op in ("LDG", "LDGSTS")


def _global_store(op: str) -> bool:
    return op.startswith(("STG.", "RED.", "ATOMG.", "UTMASTG")) or op in ("STG", "RED", "ATOMG")


def _width(op: str) -> int:
    """Bits per lane of a global memory instruction."""
    mods = set(op.split(".")[1:])
    for bits in (128, 64):
        if str(bits) in mods:
            return bits
    if mods & {"U16", "S16", "F16", "BF16"}:
        return 16
    if mods & {"U8", "S8"}:
        return 8
    return 32


def _mma_flops(op: str, warps: int) -> tuple[float, str]:
    """(FLOPs per warp executing it, "bf16" or "tf32") of an HGMMA/HMMA instruction; (0, "") otherwise."""
    kind = "tf32" if ".TF32" in op else "bf16"
    if op.startswith("HGMMA"):  # one instruction per warpgroup (4 warps): HGMMA.64x128x16.F32.BF16
        m, n, k = (int(x) for x in re.search(r"\.(\d+)x(\d+)x(\d+)", op).groups())
        return 2 * m * n * k / 4, kind
    if op.startswith("HMMA"):  # per warp: HMMA.16816.F32.BF16 is m16 n8 k16
        shape = op.split(".")[1]
        return 2 * 16 * 8 * int(shape[3:]), kind
    return 0, ""


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _read_cubin(cubin: bytes) -> tuple[int, int, str]:
    """(registers, local-memory bytes, SASS text) of the single function in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    spill = sum(int(m.group(1)) for m in re.finditer(r"(?:LOCAL|STACK):(\d+)", usage))
    return (int(regs.group(1)) if regs else 0), spill, sass


@dataclass
class Compiled:
    arch: int
    regs: int = 0
    spill_bytes: int = 0
    shared: int = 0
    num_warps: int = 4
    sass: Sass | None = None
    error: str = ""


@dataclass(frozen=True)
class Job:
    module: str
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    arch: int


def compile_job(job: Job) -> Compiled:
    """Compiles one specialization for one arch (in a worker process) and reads its cubin."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job.module), job.kernel)
    result = Compiled(job.arch, num_warps=job.options["num_warps"])
    try:
        src = ASTSource(fn, dict(job.signature), dict(job.constexprs), dict(job.attrs))
        compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=dict(job.options))
        result.regs, result.spill_bytes, sass = _read_cubin(compiled.asm["cubin"])
        result.shared = int(compiled.metadata.shared)
        result.sass = parse_sass(sass)
    except Exception as exc:  # every failure is reported, then the check exits non-zero
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        result.error = f"{type(exc).__name__}: {first}"
    return result


def ctas_per_sm(c: Compiled) -> int:
    """Resident CTAs per SM, from registers (allocated per warp in 256s), shared memory and warps."""
    lim = OCCUPANCY[c.arch]
    regs_per_warp = math.ceil(max(c.regs, 1) * 32 / 256) * 256
    by_regs = lim["regs"] // (regs_per_warp * c.num_warps)
    by_smem = lim["smem"] // (c.shared + 1024) if c.shared else lim["ctas"]
    return min(lim["ctas"], lim["warps"] // c.num_warps, by_regs, by_smem)


# ----------------------------------------------------------------------------- the prediction


@dataclass
class Cost:
    """What one launch executes, from its SASS and the case's trip counts."""

    warp_instructions: float = 0.0
    bytes: float = 0.0
    flops: dict[str, float] = field(default_factory=dict)  # "bf16" / "tf32" -> FLOPs
    # With one CTA per SM nothing else on the SM overlaps the instructions outside the MMA loop (a tile's epilogue)
    # with the tensor cores: those warp instructions add to the MMA time.
    unhidden_instructions: float = 0.0
    note: str = ""

    def times(self, machine: Machine, mma: str, memory: bool) -> dict[str, float]:
        """Seconds under each limit on a machine ("memory", "issue", "mma"); no memory term when `memory` is False.
        The launch takes the largest (its bound)."""
        rate = machine.mma_tflops * 1e12 * (2 / 3 if mma == "mma.sync" and machine.arch >= 90 else 1)
        issue_rate = machine.sms * ISSUE_PER_CYCLE * machine.clock_ghz * 1e9
        mma_seconds = sum(f / (rate / 2 if kind == "tf32" else rate) for kind, f in self.flops.items())
        return {
            "memory": self.bytes / (machine.copy_gbps * 1e9) if memory else 0.0,
            "issue": self.warp_instructions / issue_rate,
            "mma": mma_seconds + (self.unhidden_instructions / issue_rate if mma_seconds else 0.0),
        }


def launch_cost(launch: Launch, compiled: Compiled, trips: tuple[int, ...], store_share: float = 1.0) -> Cost:
    sass, warps = compiled.sass, compiled.num_warps
    cost = Cost()
    if sass.loops and len(trips) < max(loop.depth for loop in sass.loops):
        depth = max(loop.depth for loop in sass.loops)
        cost.note = f"{_short(launch.kernel)}: SASS loops {depth} deep, trips {trips} (deeper loops counted once)"
    per_program = Cost()
    mma_loop = sass.mma_loop() if ctas_per_sm(compiled) == 1 else None
    for i, (op, depth) in enumerate(zip(sass.opcodes, sass.depth)):
        times = math.prod(trips[:depth])  # deeper than the trips given: once per enclosing known loop
        per_program.warp_instructions += times * warps
        if mma_loop is not None and not mma_loop.start <= i <= mma_loop.end:
            per_program.unhidden_instructions += times * warps
        if _global_load(op) or _global_store(op):
            share = store_share if _global_store(op) and depth and sass.predicated[i] else 1.0
            per_program.bytes += times * warps * 32 * _width(op) / 8 * share
        flops, kind = _mma_flops(op, warps)
        if flops:
            per_program.flops[kind] = per_program.flops.get(kind, 0.0) + times * warps * flops
    cost.warp_instructions = per_program.warp_instructions * launch.programs
    cost.unhidden_instructions = per_program.unhidden_instructions * launch.programs
    cost.bytes = per_program.bytes * launch.programs
    cost.flops = {k: v * launch.programs for k, v in per_program.flops.items()}
    return cost


@dataclass
class Prediction:
    case: str
    machine: str
    pct: float
    moved_over_floor: float | None  # bytes the launches move / the case's floor bytes
    bounds: str  # per kernel: its time under each limit, the bound first
    target: float | None


def predict(
    case, launches: list[Launch], compiled: dict[str, Compiled], machine: Machine, notes: list[str]
) -> Prediction | None:
    """The case's predicted % of the ceiling on a machine (None if a kernel did not compile); model notes go to
    `notes`."""
    total, moved = 0.0, 0.0
    per_kernel: dict[str, Counter] = defaultdict(Counter)  # seconds under each limit, summed over its launches
    for launch in (la for la in launches if not la.candidate):
        c = compiled[launch.key]
        if c.sass is None:
            return None
        if c.sass.loops and launch.kernel not in case.trips:
            raise ValueError(f"case {case.label!r} gives no trip counts for {launch.kernel}, whose SASS loops")
        trips = tuple(case.trips[launch.kernel](launch.args)) if launch.kernel in case.trips else ()
        share = case.store_share[launch.kernel](launch.args) if launch.kernel in case.store_share else 1.0
        cost = launch_cost(launch, c, trips, share)
        if cost.note:
            notes.append(cost.note)
        # The tile loads of a FLOPs-bound case mostly hit L2, which the model does not know: no memory term there.
        times = cost.times(machine, c.sass.mma, memory=bool(case.bytes))
        total += max(times.values())
        moved += cost.bytes
        per_kernel[_short(launch.kernel)].update(times)
    if case.bytes:
        floor = case.bytes / (machine.copy_gbps * 1e9)
    else:
        floor = case.flops / (machine.mma_tflops * 1e12)
    breakdown = []
    for kernel, times in per_kernel.items():
        limits = sorted((t, limit) for limit, t in times.items() if t > 0)[::-1]
        breakdown.append(f"{kernel} " + " > ".join(f"{limit} {1e3 * t:.2f}" for t, limit in limits) + " ms")
    return Prediction(
        case.label,
        machine.name,
        100 * floor / total if total else 0.0,
        moved / case.bytes if case.bytes else None,
        "; ".join(breakdown),
        case.target,
    )


def _short(kernel: str) -> str:
    return kernel.strip("_").removesuffix("_kernel")


# ----------------------------------------------------------------------------- the rules


def compile_problems(c: Compiled) -> list[tuple[str, str]]:
    """(rule, what) for each rule the compiled kernel breaks."""
    if c.error:
        return [("compile error", c.error)]
    out = []
    if c.spill_bytes:
        out.append(("spill", f"spills {c.spill_bytes} bytes"))
    if c.shared > MAX_SHARED[c.arch]:
        out.append(("shared memory", f"shared memory {c.shared} over {MAX_SHARED[c.arch]}"))
    if c.arch >= 90 and c.sass.mma == "mma.sync" and any(re.search(r"\.(BF16|F16)\b", op) for op in c.sass.opcodes):
        out.append(("no wgmma on sm_90", "bf16/fp16 tl.dot without wgmma"))
    return out


def narrow_main_loads(sass: Sass) -> str:
    """Why the main loads (the innermost loop's, or the whole kernel's) are not 128-bit, or ""."""
    loads = sass.memory_widths("ld", sass.hot_depth() if sass.loops else None)
    if not loads:
        return ""
    if 128 not in loads:
        return f"no 128-bit main load ({_fmt_widths(loads)})"
    narrow = [f"{n}x{bits}-bit" for bits, n in loads.items() if bits < 128 and n >= NARROW_REPEATS]
    return f"main loads {', '.join(narrow)}: one per element" if narrow else ""


def _fmt_widths(widths: Counter) -> str:
    return " ".join(f"{bits}x{n}" for bits, n in sorted(widths.items(), reverse=True)) or "-"


# ----------------------------------------------------------------------------- running


def _cases() -> tuple[list[tuple[str, Any]], list[str]]:
    """((module name, case) of every LaunchCase, the names of every kernel), importing the kernel modules."""
    from triton.runtime.jit import KernelInterface  # JITFunction, or InterpretedFunction under the interpreter

    cases, kernels = [], set()
    for module in _kernel_modules():
        kernels |= {
            f"{module.__name__}.{name}"
            for name, obj in vars(module).items()
            if isinstance(obj, KernelInterface) and obj.fn.__module__ == module.__name__
            if name.endswith("_kernel")
        }
        cases += [
            (module.__name__, case) for case in (module.compile_specs() if hasattr(module, "compile_specs") else [])
        ]
    return cases, sorted(kernels)


def run(archs=ARCHS, out=sys.stdout, only: str | None = None, jobs: int | None = None) -> int:
    """Compiles every case's launches for each arch, prints the tables and a summary; 0 when nothing failed."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile-check: unset TRITON_INTERPRET; the interpreter does not compile", file=out)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    t0 = time.perf_counter()
    cases, kernels = _cases()
    if only:
        cases = [(m, c) for m, c in cases if only in c.label or only in m]
    failures: list[tuple[str, str]] = []  # (rule, what broke it)
    launches: dict[tuple[int, int], list[Launch]] = {}  # (arch, case index) -> its launches
    for arch in archs:
        for i, (_, case) in enumerate(cases):
            with _recording(arch) as recorded:
                try:
                    case.launch()
                except Exception as exc:
                    failures.append(("case did not launch", f"[{case.label}]: {type(exc).__name__}: {exc}"))
            launches[arch, i] = recorded
    launched = {f"{la.module}.{la.kernel}" for ls in launches.values() for la in ls}
    if not only:
        failures += [("kernel without a case", k) for k in kernels if k not in launched]

    unique: dict[str, Job] = {}
    labels: dict[str, list[str]] = defaultdict(list)
    for (arch, i), recorded in launches.items():
        for la in recorded:
            unique.setdefault(
                la.key, Job(la.module, la.kernel, la.signature, la.constexprs, la.attrs, la.options, arch)
            )
            if cases[i][1].label not in labels[la.key]:
                labels[la.key].append(cases[i][1].label)
    # The slowest compiles (tl.dot kernels) first, so the last worker is not left with one.
    order = sorted(unique, key=lambda k: ("linear" not in unique[k].module, unique[k].kernel))
    workers = max(1, min(jobs or os.cpu_count() or 1, len(order)))
    if workers == 1:
        results = [compile_job(unique[k]) for k in order]
    else:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(compile_job, [unique[k] for k in order]))
    compiled = dict(zip(order, results))

    print(f"compile-check: triton {triton.__version__}, sm_{'/sm_'.join(map(str, archs))}", file=out)
    _print_kernels(order, unique, compiled, labels, failures, out)
    _print_predictions(cases, launches, compiled, archs, failures, out)
    print(f"\n{len(order)} compiles ({len(cases)} cases) in {time.perf_counter() - t0:.0f} s with {workers} processes",
          file=out)  # fmt: skip
    if not order:
        failures.append(("nothing compiled", "no case launched a kernel"))
    if failures:
        by_rule: dict[str, list[str]] = defaultdict(list)
        for rule, what in failures:
            by_rule[rule].append(what)
        print(f"FAILED: {len(failures)} findings under {len(by_rule)} rules", file=out)
        for rule, whats in by_rule.items():
            print(f"  {rule} ({len(whats)}):", file=out)
            for what, n in Counter(whats).items():  # specializations that differ in no printed detail count once
                print(f"    {what}" + (f" (x{n})" if n > 1 else ""), file=out)
        return 1
    print("all passed", file=out)
    return 0


# (title, width): a negative width right-aligns, 0 is the last, free column.
_KERNEL_COLUMNS = (
    ("kernel", 28), ("launched by", 44), ("config", 34), ("sm", -2), ("regs", -4), ("spill", -5), ("smem", -6),
    ("CTA/SM", -6), ("mma", 8), ("loop instrs", 11), ("main loads (bits x n)", 22), ("other loads", 16),
    ("stores", 18), ("status", 0),
)  # fmt: skip
_PREDICTION_COLUMNS = (
    ("case", 56), ("floor", 12), ("moved/floor", -11), *((m.name, -6) for m in MACHINES), ("target", -6),
    (f"per kernel on the {TARGET_MACHINE}: ms under each limit, the bound first", 0),
)  # fmt: skip


def _line(columns, values) -> str:
    cells = []
    for (_, width), value in zip(columns, values):
        text = str(value)
        cells.append(
            text if width == 0 else f"{text[: abs(width)]:>{-width}}" if width < 0 else f"{text[:width]:<{width}}"
        )
    return " ".join(cells).rstrip()


def _print_header(columns, out) -> None:
    head = _line(columns, [title for title, _ in columns])
    print(head, file=out)
    print("-" * len(head), file=out)


def _print_kernels(order, unique, compiled, labels, failures, out) -> None:
    _print_header(_KERNEL_COLUMNS, out)
    for key in order:
        job, c = unique[key], compiled[key]
        by = labels[key][0] + (f" (+{len(labels[key]) - 1})" if len(labels[key]) > 1 else "")
        problems = compile_problems(c)
        sass = [""] * 6
        if c.sass is not None:
            main = c.sass.memory_widths("ld", c.sass.hot_depth() if c.sass.loops else None)
            loops = "/".join(map(str, c.sass.loop_sizes())) or "-"
            other = c.sass.memory_widths("ld") - main
            sass = [ctas_per_sm(c), c.sass.mma, loops, _fmt_widths(main), _fmt_widths(other)]
            sass.append(_fmt_widths(c.sass.memory_widths("st")))
        values = [_short(job.kernel), by, _config(job), job.arch, c.regs, c.spill_bytes, c.shared, *sass]
        print(_line(_KERNEL_COLUMNS, [*values, "; ".join(what for _, what in problems) or "ok"]), file=out)
        where = f"{_short(job.kernel)} sm_{job.arch} {_config(job)} [{labels[key][0]}]"
        failures += [(rule, f"{where}: {what}") for rule, what in problems]


def _config(job: Job) -> str:
    """The BLOCK constexprs, the other integer ones, warps and stages, e.g. "128x128x32 GROUP_M=8 w8 s4"."""
    names = {(i,): name for i, name in enumerate(job.signature)}
    ints = {names[k]: v for k, v in job.constexprs.items() if k in names and type(v) is int}
    blocks = "x".join(str(v) for name, v in ints.items() if name.startswith("BLOCK"))
    others = " ".join(f"{name}={v}" for name, v in ints.items() if not name.startswith("BLOCK"))
    return " ".join(filter(None, [blocks, others, f"w{job.options['num_warps']} s{job.options['num_stages']}"]))


def _print_predictions(cases, launches, compiled, archs, failures, out) -> None:
    rows, notes = [], []
    for i, (_, case) in enumerate(cases):
        if not (case.bytes or case.flops):
            continue
        row = {"case": case, "pred": {}}
        for machine in MACHINES:
            if machine.arch in archs and launches.get((machine.arch, i)):
                try:
                    row["pred"][machine.name] = predict(case, launches[machine.arch, i], compiled, machine, notes)
                except ValueError as exc:
                    failures.append(("model", str(exc)))
        for arch in archs:
            for la in launches.get((arch, i), []):
                c = compiled[la.key]
                if case.bytes and c.sass is not None and (why := narrow_main_loads(c.sass)):
                    failures.append(("narrow streaming loads", f"{_short(la.kernel)} sm_{arch} [{case.label}]: {why}"))
        rows.append(row)
    if not rows:
        return
    print("\npredicted % of the ceiling at the target size (copy bandwidth for a bytes floor, bf16 GEMM for FLOPs):",
          file=out)  # fmt: skip
    _print_header(_PREDICTION_COLUMNS, out)
    for row in rows:
        case, pred = row["case"], row["pred"]
        floor = f"{case.bytes / 1e9:.2f} GB" if case.bytes else f"{case.flops / 1e12:.1f} TFLOP"
        first = next((p for p in pred.values() if p is not None), None)
        moved = f"{first.moved_over_floor:.2f}" if first and first.moved_over_floor else ""
        cells = [f"{pred[m.name].pct:.0f}" if pred.get(m.name) else "" for m in MACHINES]
        p = pred.get(TARGET_MACHINE)
        values = [case.label, floor, moved, *cells, f"{case.target:.0f}" if case.target else "", p.bounds if p else ""]
        print(_line(_PREDICTION_COLUMNS, values), file=out)
        if p is not None and case.target and p.pct < case.target:
            failures.append(("below target", f"[{case.label}]: predicted {p.pct:.0f}% < {case.target:.0f}% on "
                             f"{p.machine} ({p.bounds})"))  # fmt: skip
    for note in dict.fromkeys(notes):
        print("note: " + note, file=out)
