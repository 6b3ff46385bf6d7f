"""`fastalign bench`: fastalign against eager PyTorch and the installed peers, side by side.

Each suite module (SUITES) returns `Case`s for a size. A case builds its inputs, times one
callable, and reports time, throughput, the % of the ceiling measured in this run (device copy
bandwidth, or cuBLAS bf16 GEMM FLOP/s for compute-bound ops) and peak extra memory. Speedups are
reported only for cases whose correctness check passed at that size in the same run.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import importlib
import json
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

from fastalign.kernels import tuned_configs

SUITES = ["logprobs", "losses", "optim", "linear"]


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


def time_ms(fn: Callable[[], Any], cuda: bool) -> float:
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()  # warm-up
    times = []
    deadline = time.perf_counter() + 0.5
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 20):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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


def copy_bandwidth_gbps(env: Env) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), measured now."""
    n = (1 << 30 if env.cuda else 1 << 26) // 4
    src = torch.randn(n, device=env.device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), env.cuda)
    return 2 * src.numel() * 4 / ms / 1e6


def gemm_tflops(env: Env) -> float:
    """bf16 matmul throughput measured now (cuBLAS on a GPU): the compute ceiling."""
    n = 8192 if env.cuda else 1024
    a = torch.randn(n, n, device=env.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=env.device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, env.cuda)
    return 2 * n**3 / ms / 1e9


# ----------------------------------------------------------------------------- running


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def device_name(env: Env) -> str:
    if env.cuda:
        return torch.cuda.get_device_name(env.device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()}"


def run_case(case: Case, env: Env, ceilings: dict[str, float]) -> dict:
    fn = case.setup()
    ms = time_ms(fn, env.cuda)
    peak = peak_extra_bytes(fn, env.cuda)
    del fn
    if case.flops:
        throughput, unit = case.flops / ms / 1e9, "TFLOP/s"
        pct = 100 * throughput / ceilings["gemm_tflops"] if ceilings.get("gemm_tflops") else None
    else:
        throughput, unit = case.bytes / ms / 1e6, "GB/s"
        pct = 100 * throughput / ceilings["copy_gbps"]
    return {
        "op": case.op,
        "impl": case.impl,
        "mode": case.mode,
        "shape": case.shape,
        "dtype": case.dtype,
        "ms": round(ms, 4),
        "throughput": round(throughput, 2),
        "throughput_unit": unit,
        "pct_of_peak": None if pct is None else round(pct, 1),
        "peak_mem_mb": round(peak / 2**20, 1) if peak >= 0 else None,
        **case.extra,
    }


def collect_cases(env: Env, only: list[str] | None) -> list[Case]:
    cases = []
    for suite in SUITES:
        module = importlib.import_module(f"fastalign.bench.{suite}")
        cases += [c for c in module.cases(env) if not only or c.op in only]
    return cases


def main(json_path: str | None = None, plot_path: str | None = None, size: str | None = None, only=None) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = Env(device, size or ("target" if device.type == "cuda" else "small"))
    cases = collect_cases(env, only)
    if not cases:
        print(f"no benchmark matches --only {only}", file=sys.stderr)
        return 2
    ceilings = {"copy_gbps": copy_bandwidth_gbps(env)}
    if any(c.flops for c in cases):
        ceilings["gemm_tflops"] = gemm_tflops(env)
    meta = {
        "device": device_name(env),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "commit": _git_commit(),
        "date": datetime.date.today().isoformat(),
        "size": env.size,
    }
    print(f"fastalign bench on {meta['device']} ({env.size} sizes); ceilings: " + _fmt_ceilings(ceilings))

    checked: dict[int, str] = {}  # id(check) -> "ok" or the failure
    records = []
    for case in cases:
        if case.check is not None and id(case.check) not in checked:
            try:
                case.check()
                checked[id(case.check)] = "ok"
            except Exception as exc:  # a wrong result is reported, never timed as a win
                checked[id(case.check)] = f"{type(exc).__name__}: {exc}"
                print(f"CHECK FAILED {case.op} {case.shape} {case.dtype}: {exc}", file=sys.stderr)
        try:
            rec = run_case(case, env, ceilings)
        except Exception as exc:  # a peer that fails at this size is reported, not fatal
            print(f"skipped {case.op}/{case.impl}/{case.mode}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        rec["correct"] = checked.get(id(case.check)) if case.check is not None else None
        rec.update(meta)
        records.append(rec)
        _free(env)

    _add_speedups(records)
    print_table(records)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        # The launch configs the GPU tuner picked for this run's shapes, so a record can be reproduced.
        results = {**meta, "ceilings": ceilings, "autotuned": tuned_configs(), "records": records}
        Path(json_path).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {json_path}")
    if plot_path:
        plot(records, plot_path, meta)
    failed = [v for v in checked.values() if v != "ok"]
    return 1 if failed else 0


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


def _fmt_ceilings(ceilings: dict[str, float]) -> str:
    parts = [f"copy {ceilings['copy_gbps']:.0f} GB/s"]
    if "gemm_tflops" in ceilings:
        parts.append(f"bf16 GEMM {ceilings['gemm_tflops']:.1f} TFLOP/s")
    return ", ".join(parts)


def _add_speedups(records: list[dict]) -> None:
    """speedup_vs_eager = eager ms / this ms, for records whose group passed its correctness check."""
    eager = {(r["op"], r["mode"], r["shape"], r["dtype"]): r["ms"] for r in records if r["impl"] == "eager"}
    for r in records:
        base = eager.get((r["op"], r["mode"], r["shape"], r["dtype"]))
        ok = not r["impl"].startswith("fastalign") or r["correct"] == "ok"
        r["speedup_vs_eager"] = round(base / r["ms"], 2) if base and ok else None


def print_table(records: list[dict]) -> None:
    head = f"{'op':<22} {'impl':<18} {'mode':<8} {'shape':<26} {'dtype':<5} {'ms':>9} {'throughput':>16} "
    head += f"{'%peak':>6} {'peak MB':>9} {'vs eager':>8}  check"
    print(head)
    print("-" * len(head))
    for r in records:
        tp = f"{r['throughput']:.1f} {r['throughput_unit']}"
        pct = "" if r["pct_of_peak"] is None else f"{r['pct_of_peak']:.1f}"
        mem = "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
        spd = "" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
        print(
            f"{r['op']:<22} {r['impl']:<18} {r['mode']:<8} {r['shape']:<26} {r['dtype']:<5} {r['ms']:>9.3f} "
            f"{tp:>16} {pct:>6} {mem:>9} {spd:>8}  {r['correct'] or ''}"
        )


def plot(records: list[dict], path: str, meta: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'fastalign[bench]'); no plot written", file=sys.stderr)
        return
    groups = sorted({(r["op"], r["mode"], r["shape"], r["dtype"]) for r in records})
    impls = sorted({r["impl"] for r in records}, key=lambda i: (i != "fastalign", i != "eager", i))
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(groups)), 5))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        by_group = {(r["op"], r["mode"], r["shape"], r["dtype"]): r for r in records if r["impl"] == impl}
        xs = [i + k * width for i, g in enumerate(groups) if g in by_group]
        axes[0].bar(xs, [by_group[g]["ms"] for g in groups if g in by_group], width, label=impl)
        axes[1].bar(xs, [by_group[g]["peak_mem_mb"] or 0 for g in groups if g in by_group], width, label=impl)
    labels = [f"{op}\n{mode} {dtype}\n{shape}" for op, mode, shape, dtype in groups]
    for ax, title in zip(axes, ("time (ms, lower is better)", "peak extra memory (MB)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], labels, fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"fastalign bench: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
