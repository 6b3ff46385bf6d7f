"""`fastalign bench`: fastalign against eager PyTorch and the installed peers, side by side.

Each suite module (SUITES) returns `Case`s for a size. A case builds its inputs, times one callable, and reports
time, throughput, the % of a ceiling measured in this run and peak extra memory. Speedups are reported only for
cases whose correctness check passed at that size in the same run.

Ceilings (`Ceilings`), each measured once per run on first use:
- bytes-bound cases: a device copy (read + write bytes per second). On a GPU one 1 GiB copy (HBM). On a CPU a copy
  of a buffer the size of the case's working set, so that a case that fits in a cache compares with that cache's
  bandwidth, not with DRAM's.
- FLOP-bound cases: a GEMM. On a GPU cuBLAS bf16 at 8192^3. On a CPU the faster of a GEMM in the case's dtype and
  one in fp32 (an implementation may upcast), at 1024^3.
On a CPU each is the better of a run on torch's threads and one on a single thread (see `Ceilings._best`).
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastalign.bench.report import REPO
from fastalign.kernels import tuned_configs

# Suite module -> the ops its cases time (`--only` takes these names; a test keeps them equal to the cases').
SUITES = {
    "logprobs": ("token_logprobs",),
    "losses": ("DPOLoss", "IFTLoss", "ift_loss", "ift_inputs_embeds"),
    "optim": ("onties_step", "ondare_step"),
    "linear": (
        "FusedLinearDPOLoss",
        "linear_token_logprobs",
        "FusedLinearCrossEntropyLoss",
        "FusedLinearKTOLoss",
        "FusedLinearIFTLoss",
    ),
}
OPS = tuple(op for ops in SUITES.values() for op in ops)
RESULTS_DIR = "benches/results"


@dataclass
class Case:
    op: str  # e.g. "token_logprobs"
    impl: str  # "fastalign", "eager", or a peer: "trl", "liger", "torch-fused"
    mode: str  # "fwd", "fwd+bwd" or "step"
    shape: str  # e.g. "N=16384 V=128256"
    dtype: str
    setup: Callable[[], Callable[[], Any]]  # builds the inputs; returns the callable to time
    bytes: int = 0  # bytes the op must move at least: the bandwidth floor
    flops: int = 0  # FLOPs the op must do: the compute floor (used instead of bytes when set)
    check: Callable[[], None] | None = None  # raises if fastalign is wrong at this size; shared per group
    extra: dict = field(default_factory=dict)


@dataclass
class Env:
    device: torch.device
    size: str  # "small" or "target"

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# ----------------------------------------------------------------------------- measurement


def time_ms(fn: Callable[[], Any], cuda: bool, best: bool = False) -> float:
    """The median time of fn in ms (the fastest with `best`, for ceilings): triton's do_bench on a GPU; on a CPU a
    warm-up call, then 2 calls or more, for up to 0.3 s."""
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="min" if best else "median"))
    fn()
    times = []
    deadline = time.perf_counter() + 0.3
    while len(times) < 2 or (time.perf_counter() < deadline and len(times) < 20):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times) if best else statistics.median(times)


def interleaved_ms(fns: list[Callable[[], Any]], seconds: float) -> list[float]:
    """The median time in ms of each of fns (already warm), timed in turns A, B, C, A, B, C, ... on a CPU.

    Implementations compared side by side are timed together this way so that a change in the machine's load (a
    shared CI runner, a background job) falls on all of them alike: timed one after the other, 0.3 s each, a busy
    spell during one of them read as a 4x speedup or slowdown. At least 3 rounds (no more: the slow cases keep the run
    under a minute), then until `seconds` or 20 rounds.
    """
    times: list[list[float]] = [[] for _ in fns]
    deadline = time.perf_counter() + seconds
    while len(times[0]) < 3 or (time.perf_counter() < deadline and len(times[0]) < 20):
        for fn, mine in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            mine.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


_libc = None


def _cpu_rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_peak_extra(fn: Callable[[], Any]) -> int:
    """Peak resident memory above the current level while fn runs (Linux), in bytes.

    Large allocations are forced onto mmap, so each is returned to the OS on free and a later
    measurement touches fresh pages; /proc/self/clear_refs resets the high-water mark.
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6")
        _libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, fixed
    gc.collect()
    _libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return -1
    base = _cpu_rss_bytes("VmRSS:")
    fn()
    return max(0, _cpu_rss_bytes("VmHWM:") - base)


def peak_extra_bytes(fn: Callable[[], Any], cuda: bool) -> int:
    if not cuda:
        return _cpu_peak_extra(fn)
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth_gbps(env: Env, nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth (read + write bytes per second) through a buffer of `nbytes`, measured now."""
    src = torch.randn(max(nbytes // 4, 1024), device=env.device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), env.cuda, best=True)
    return 2 * src.numel() * 4 / ms / 1e6


def gemm_tflops(env: Env, dtype: torch.dtype = torch.bfloat16) -> float:
    """GEMM throughput in `dtype` measured now (cuBLAS on a GPU, 8192^3; 1024^3 on a CPU)."""
    n = 8192 if env.cuda else 1024
    gen = torch.Generator(device=env.device).manual_seed(0)
    a = torch.randn(n, n, device=env.device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=env.device, dtype=dtype, generator=gen)
    ms = time_ms(lambda: a @ b, env.cuda, best=True)
    return 2 * n**3 / ms / 1e9


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Ceilings:
    """The ceiling of each case, measured in this run on first use and kept by name (see the module docstring)."""

    def __init__(self, env: Env):
        self.env = env
        self.values: dict[str, float] = {}  # name -> GB/s or TFLOP/s

    def of(self, case: Case) -> tuple[str, float]:
        """(name, value) of the case's ceiling: GB/s for a bytes floor, TFLOP/s for a FLOPs floor."""
        if case.flops:
            dtypes = ["bf16"] if self.env.cuda else sorted({case.dtype, "fp32"})
            name = f"{'/'.join(dtypes)} GEMM"
            if name not in self.values:
                self.values[name] = self._best(lambda: max(gemm_tflops(self.env, _DTYPES[d]) for d in dtypes))
        else:
            # The working set rounded up to a power of two, at least 64 KiB; one buffer of half of it is copied.
            size = 1 << 30 if self.env.cuda else 1 << max(16, (max(case.bytes, 1) - 1).bit_length())
            name = f"copy {_fmt_bytes(size)}"
            if name not in self.values:
                self.values[name] = self._best(lambda: copy_bandwidth_gbps(self.env, size // 2))
        return name, self.values[name]

    def _best(self, measure: Callable[[], float]) -> float:
        """The measurement, on a CPU the better of torch's threads and one thread: a busy machine can stall a
        multi-threaded copy 100-fold (a descheduled thread holds up each parallel region), never a single thread."""
        threads = torch.get_num_threads()
        if self.env.cuda or threads == 1:
            return measure()
        try:
            torch.set_num_threads(1)
            single = measure()
        finally:
            torch.set_num_threads(threads)
        return max(measure(), single)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n} {unit}"
        n //= 1024
    return f"{n} GiB"


# ----------------------------------------------------------------------------- running


def _git_commit() -> str:
    """The checkout's commit (with "-dirty" if it has changes), or FASTALIGN_COMMIT where there is no .git (a copied
    working tree, as on the GPU machine)."""
    if os.environ.get("FASTALIGN_COMMIT"):
        return os.environ["FASTALIGN_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        # Changes to tracked files; an untracked file (a demo's plot) changes no code that ran.
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, cwd=REPO, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def device_name(env: Env) -> str:
    if env.cuda:
        return torch.cuda.get_device_name(env.device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()}"


def _record(case: Case, ms: float, peak: int, ceilings: Ceilings) -> dict:
    ceiling, ceiling_value = ceilings.of(case)
    if case.flops:
        throughput, unit = case.flops / ms / 1e9, "TFLOP/s"
    else:
        throughput, unit = case.bytes / ms / 1e6, "GB/s"
    pct = 100 * throughput / ceiling_value
    return {
        "op": case.op,
        "impl": case.impl,
        "mode": case.mode,
        "shape": case.shape,
        "dtype": case.dtype,
        "ms": round(ms, 4),
        "throughput": float(f"{throughput:.4g}"),
        "throughput_unit": unit,
        "pct_of_peak": round(pct, 1),
        "ceiling": ceiling,
        "peak_mem_mb": round(peak / 2**20, 1) if peak >= 0 else None,
        **case.extra,
    }


def _name(case: Case) -> str:
    return f"{case.op} {case.impl} {case.mode} {case.shape} {case.dtype}"


def _comparisons(cases: list[Case]) -> list[list[Case]]:
    """The cases grouped by what they compare (op, mode, shape, dtype), groups in order of first appearance."""
    groups: dict[tuple, list[Case]] = {}
    for case in cases:
        groups.setdefault((case.op, case.mode, case.shape, case.dtype), []).append(case)
    return list(groups.values())


def collect_cases(env: Env, only: list[str] | None = None) -> list[Case]:
    """Every suite's cases for env, or only those of the ops named in `only` (names from OPS)."""
    unknown = sorted(set(only or ()) - set(OPS))
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(unknown)}; --only takes: {', '.join(OPS)}")
    cases = []
    for suite, ops in SUITES.items():
        if only and not set(only) & set(ops):
            continue
        module = importlib.import_module(f"fastalign.bench.{suite}")
        cases += [c for c in module.cases(env) if not only or c.op in only]
    return cases


def environment(env: Env) -> dict:
    """What every record and results file carries about the machine and the code."""
    return {
        "device": device_name(env),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "commit": _git_commit(),
        "date": datetime.date.today().isoformat(),
        "size": env.size,
    }


def headline(env: Env) -> str:
    """The first line of `fastalign bench`: what the rows measure, and where the GPU results are."""
    if env.cuda:
        return (
            f"fastalign bench on {device_name(env)} ({env.size} sizes): the compiled Triton kernels against eager "
            "PyTorch and the installed peers; % of ceilings measured in this run."
        )
    return (
        f"fastalign bench on {device_name(env)} ({env.size} sizes). On a CPU, fastalign's rows run its chunked torch "
        "fallback (what CPU tensors get; the Triton kernels need a GPU), so they show memory and correctness, not "
        f"kernel speed. GPU results: {RESULTS_DIR}/*.json and README 'Performance' (`fastalign gpu-check` makes them)."
    )


def run_cases(
    env: Env, cases: list[Case], deadline: float | None = None, progress: bool = True, after_group=None
) -> tuple[list[dict], list[dict], Ceilings]:
    """Checks and times the cases, grouped by what they compare (`_comparisons`). Returns (records, skipped,
    ceilings).

    On a GPU each case is timed by do_bench in turn. On a CPU a group's implementations are timed in turns
    (`interleaved_ms`), each after its memory measurement, which is its warm-up call.
    With a `deadline` (time.monotonic()), no case starts after it: those are skipped with the reason "budget".
    A case that raises is skipped with its error (and its check's outcome, when one ran); a failed correctness check
    is recorded, never a speedup. after_group(records, skipped, ceilings), when given, runs after each group: gpu-check
    writes its results file there, so a run killed midway keeps what it measured.
    """
    from tqdm.auto import tqdm

    ceilings = Ceilings(env)
    meta = environment(env)
    checked: dict[int, str] = {}  # id(check) -> "ok" or the failure
    records, skipped = [], []
    tty = progress and sys.stderr.isatty()
    bar = tqdm(total=len(cases), unit="case", disable=not tty, file=sys.stderr, dynamic_ncols=True)

    def record(case: Case, ms: float, peak: int) -> None:
        rec = _record(case, ms, peak, ceilings)
        rec["correct"] = checked.get(id(case.check)) if case.check is not None else None
        rec.update(meta)
        records.append(rec)

    done = 0  # cases started (a disabled tqdm, as in a log, counts nothing)
    for group in _comparisons(cases):
        warm = []  # CPU: (case, callable, peak) of the group, each called once
        for case in group:
            name = _name(case)
            bar.set_description(f"{case.op} {case.impl} {case.mode}"[:48])
            bar.update()
            done += 1
            if progress and not tty:  # a log gets a line per case instead of a bar
                print(f"[{done}/{len(cases)}] {name}", file=sys.stderr, flush=True)
            if deadline is not None and time.monotonic() > deadline:
                skipped.append({"case": name, "impl": case.impl, "reason": "budget"})
                continue
            if case.check is not None and id(case.check) not in checked:
                try:
                    case.check()
                    checked[id(case.check)] = "ok"
                except Exception as exc:  # a wrong result is reported, never timed as a win
                    checked[id(case.check)] = f"{type(exc).__name__}: {exc}"
                    bar.write(f"CHECK FAILED {case.op} {case.shape} {case.dtype}: {exc}", file=sys.stderr)
            try:
                fn = case.setup()
                if env.cuda:
                    record(case, time_ms(fn, True), peak_extra_bytes(fn, True))
                else:
                    warm.append((case, fn, peak_extra_bytes(fn, False)))
            except Exception as exc:  # a peer that fails at this size is reported, not fatal
                skip = {"case": name, "impl": case.impl, "reason": f"{type(exc).__name__}: {exc}"}
                if case.check is not None and id(case.check) in checked:
                    skip["check"] = checked[id(case.check)]
                skipped.append(skip)
                bar.write(f"skipped {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            finally:
                fn = None
                if env.cuda:
                    _free(env)
        if warm:
            try:
                times = interleaved_ms([fn for _, fn, _ in warm], 0.3 * len(warm))
            except Exception as exc:  # a call that worked once and then raised: the group is reported, not fatal
                times = None
                reason = f"{type(exc).__name__}: {exc}"
                skipped += [{"case": _name(case), "impl": case.impl, "reason": reason} for case, _, _ in warm]
            for (case, _, peak), ms in zip(warm, times or ()):
                record(case, ms, peak)
            warm = []
            _free(env)
        if after_group is not None:
            _add_speedups(records)
            after_group(records, skipped, ceilings)
    bar.close()
    _add_speedups(records)
    return records, skipped, ceilings


def write_results(path: str | Path, env: Env, records: list[dict], skipped: list[dict], ceilings: Ceilings,
                  **extra) -> None:  # fmt: skip
    """The results file: environment, ceilings, the GPU tuner's choices, records, skipped cases, and `extra`."""
    results = {
        **environment(env),
        "ceilings": ceilings.values,
        # The launch configs the GPU tuner picked for this run's shapes, so a record can be reproduced.
        "autotuned": tuned_configs(),
        **extra,
        "records": records,
        "skipped": skipped,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Whole or not at all: gpu-check rewrites it after every group, and a kill may land mid-write.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(partial, path)


def main(json_path: str | None = None, plot_path: str | None = None, size: str | None = None, only=None) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = Env(device, size or ("target" if device.type == "cuda" else "small"))
    print(headline(env), flush=True)
    cases = collect_cases(env, only)
    records, skipped, ceilings = run_cases(env, cases)
    print_table(records, ceilings)
    if json_path:
        write_results(json_path, env, records, skipped, ceilings)
        print(f"wrote {json_path}")
    if plot_path:
        plot(records, plot_path, environment(env))
    failed = [r for r in records if r["correct"] not in (None, "ok")]
    return 1 if failed or not records else 0


def _free(env: Env) -> None:
    gc.collect()
    if env.cuda:
        torch.cuda.empty_cache()


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def _add_speedups(records: list[dict]) -> None:
    """speedup_vs_eager = eager ms / this ms, for records whose group passed its correctness check."""
    eager = {(r["op"], r["mode"], r["shape"], r["dtype"]): r["ms"] for r in records if r["impl"] == "eager"}
    for r in records:
        base = eager.get((r["op"], r["mode"], r["shape"], r["dtype"]))
        ok = not r["impl"].startswith("fastalign") or r["correct"] == "ok"
        r["speedup_vs_eager"] = round(base / r["ms"], 2) if base and ok else None


COLUMNS = """\
columns: time ms per call (lower is better) | throughput: GB/s of the bytes the op must move, or TFLOP/s (higher is
better) | % ceiling: of the ceiling measured for the case in this run, listed below (higher is better) | peak MB:
extra memory while it runs (lower is better) | speedup: eager's time / this time (higher is better; shown only where
fastalign's correctness check passed)"""


def print_table(records: list[dict], ceilings: Ceilings | None = None) -> None:
    head = f"{'op':<22} {'impl':<18} {'mode':<8} {'shape':<26} {'dtype':<5} {'time ms':>9} {'throughput':>16} "
    head += f"{'% ceiling':>9} {'peak MB':>9} {'speedup':>8}  check"
    print(COLUMNS)
    print(head)
    print("-" * len(head))
    for r in records:
        tp = f"{r['throughput']:.3g} {r['throughput_unit']}"
        mem = "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
        spd = "" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
        print(
            f"{r['op']:<22} {r['impl']:<18} {r['mode']:<8} {r['shape']:<26} {r['dtype']:<5} {r['ms']:>9.3f} "
            f"{tp:>16} {r['pct_of_peak']:>9.1f} {mem:>9} {spd:>8}  {r['correct'] or ''}"
        )
    mine = [r for r in records if r["impl"].startswith("fastalign") and r["speedup_vs_eager"] is not None]
    name = lambda r: f"{r['op']} {r['impl']} {r['mode']} {r['shape']} {r['dtype']}"  # noqa: E731
    slower = [name(r) for r in mine if r["speedup_vs_eager"] < 1]
    print(f"fastalign at least as fast as eager in {len(mine) - len(slower)} of {len(mine)} rows", end="")
    print(f"; slower in: {'; '.join(slower)}" if slower else "")
    group = lambda r: (r["op"], r["mode"], r["shape"], r["dtype"])  # noqa: E731
    eager_mb = {group(r): r["peak_mem_mb"] for r in records if r["impl"] == "eager" and r["peak_mem_mb"] is not None}
    weighed = [r for r in mine if r["peak_mem_mb"] is not None and group(r) in eager_mb]
    heavier = [name(r) for r in weighed if r["peak_mem_mb"] > eager_mb[group(r)]]
    if weighed:
        print(f"fastalign within eager's peak memory in {len(weighed) - len(heavier)} of {len(weighed)} rows", end="")
        print(f"; heavier in: {'; '.join(heavier)}" if heavier else "")
    if ceilings is not None:
        units = {name: "TFLOP/s" if "GEMM" in name else "GB/s" for name in ceilings.values}
        print(
            "ceilings measured in this run: " + ", ".join(f"{n} {v:.3g} {units[n]}" for n, v in ceilings.values.items())
        )


def plot(records: list[dict], path: str, meta: dict) -> None:
    """Per op, mode and shape: each implementation's speedup over eager and its peak memory relative to eager's, on
    log scales, one bar per implementation (eager is the line at 1)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'fastalign[bench]'); no plot written", file=sys.stderr)
        return
    key = lambda r: (r["op"], r["mode"], r["shape"], r["dtype"])
    eager = {key(r): r for r in records if r["impl"] == "eager"}
    impls = sorted({r["impl"] for r in records} - {"eager"}, key=lambda i: (not i.startswith("fastalign"), i))
    colors = {impl: f"C{k}" for k, impl in enumerate(impls)}
    bars, ticks, y = [], [], 0.0  # bars: (y, impl, speedup, memory ratio)
    for group, base in eager.items():
        rows = sorted(
            (r for r in records if key(r) == group and r["impl"] != "eager"), key=lambda r: impls.index(r["impl"])
        )
        if not rows:
            continue
        for r in rows:
            mem = (
                r["peak_mem_mb"] / base["peak_mem_mb"] if r["peak_mem_mb"] is not None and base["peak_mem_mb"] else None
            )
            bars.append((y, r["impl"], r["speedup_vs_eager"], mem))
            y += 1
        op, mode, shape, dtype = group
        ticks.append((y - (len(rows) + 1) / 2, f"{op} {mode} {dtype}\n{shape}"))
        y += 0.8  # a gap between groups
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.5 + 0.28 * y), sharey=True)
    for ax, column in zip(axes, (2, 3)):
        for impl in impls:
            mine = [b for b in bars if b[1] == impl and b[column]]
            values = [b[column] for b in mine]
            drawn = ax.barh([b[0] for b in mine], values, 0.8, color=colors[impl], label=impl)
            ax.bar_label(drawn, [f"{v:.2f}x" if v < 10 else f"{v:.0f}x" for v in values], fontsize=7, padding=2)
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.grid(axis="x", which="both", alpha=0.3)
        ax.margins(x=0.12)
    axes[0].set_title("speedup over eager (log scale, higher is better)", fontsize=10)
    axes[1].set_title("peak extra memory / eager's (log scale, lower is better)", fontsize=10)
    axes[0].set_yticks([t for t, _ in ticks], [label for _, label in ticks], fontsize=8)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(f"fastalign bench: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
