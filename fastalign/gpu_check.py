"""`fastalign gpu-check`: what a GPU says about fastalign, in one command and one time budget.

On the GPU machine, from the repository root, with no network (fastalign need not be installed there):

    FASTALIGN_COMMIT=<commit> python3 -m fastalign.cli gpu-check [--budget 300] [--out FOLDER]

(FASTALIGN_COMMIT names the commit where the copied tree has no .git. `--out` a folder, such as the device tool's
$OUT, the only place whose files come back: the results go there under their usual name, with pytest's log beside
them. `benches/gpu_run.sh` is that whole command.)

In order, and no new step or case starts once the budget (seconds, from the start) is spent:
0. Peers. If `.gpu-wheels/` exists (`benches/gpu_wheels.sh` fills it on a machine with network; carry it along), its
   wheels are installed with `pip install --no-index --no-deps --target` into a temporary folder that goes first on
   the path. Otherwise the peers the machine lacks (trl, liger-kernel, cut-cross-entropy, peft) are skipped, and the
   output and the JSON say so.
1. Correctness, compiled: the float64-reference tests of every public op (`TEST_SELECTION`: forward and every
   gradient, V 32001/128256, T 1/257, H 4097, bf16/fp16/fp32, NaN-poisoned outputs, the out-of-range-label NaN path,
   `strict`) in a pytest subprocess with FASTALIGN_TEST_DEVICE=cuda, stopped after CORRECTNESS_SECONDS.
2. Profiles: the time of each kernel in one call of each PROFILED case (torch.profiler), for at most
   PROFILE_SECONDS: where fast's time goes (cuBLAS against the elementwise kernels, TRL's alike) and each OnTIES
   pass's time, beside compile-check's per-launch predictions.
3. Benchmarks: the `fastalign bench --size target` cases with % of the copy bandwidth and of cuBLAS bf16 TFLOP/s
   measured in the same run, each group after its correctness check at that size; the first group of every suite
   runs before the second of any, so a short budget still covers every suite.
4. Results: `benches/results/<gpu>-<date>.json`: the bench's schema (device, torch/triton versions, commit, ceilings,
   one record per measurement, skipped cases and why) plus `gpu_check` (budget, peers, correctness, profiles, what
   was cut).
   `fastalign report --write` then regenerates README's Performance table from the committed files.

`--rehearse` runs the same code on the CPU, so that no GPU minute is lost to a typo: the command re-executes itself
with TRITON_INTERPRET=1 (the kernels run in Triton's interpreter), runs a few tests (REHEARSE_SELECTION), profiles
REHEARSE_PROFILED (its torch ops on the CPU) and the bench's smallest ops (REHEARSE_OPS) at CPU sizes, and writes the
same JSON schema to a temporary folder unless --out says where.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fastalign.bench.report import REPO, in_checkout

WHEELS_DIR = REPO / ".gpu-wheels"
# module -> distribution
PEERS = {"trl": "trl", "liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy", "peft": "peft"}
CORRECTNESS_SECONDS = 90
# The float64-reference tests of every public op, compiled; the torch-path variants are not what a GPU runs.
TEST_FILES = (
    "tests/test_logprobs.py",
    "tests/test_linear_logprobs.py",
    "tests/test_fused_linear_losses.py",
    "tests/test_dpo.py",
    "tests/test_ift.py",
    "tests/test_optim.py",
)
# A torch-path variant's id starts "[torch" or holds "-torch" (as in .ci/run's triton 3.6 step); the FLOP counts'
# "-interpret]" runs the interpreter's tl.dot, which a GPU run does not have.
TEST_SELECTION = (*TEST_FILES, "-k", "not [torch and not -torch and not -interpret] and not fsdp")
REHEARSE_SELECTION = ("tests/test_logprobs.py", "-k", "strict or nan_for_out_of_range")
REHEARSE_OPS = ["ift_loss", "ift_inputs_embeds"]
# (op, impl, mode) of the cases whose time per kernel is recorded (torch.profiler, one warm call each, at the first
# shape): what the open targets hinge on, to set beside compile-check's per-launch predictions and the fused-linear
# model (how much of fast's time is cuBLAS, how much the elementwise kernels; TRL's alike).
PROFILED = (
    ("FusedLinearDPOLoss", "fastalign-fast", "fwd+bwd"),
    ("FusedLinearDPOLoss", "trl", "fwd+bwd"),
    ("onties_step", "fastalign", "step"),
    ("FusedLinearCrossEntropyLoss", "fastalign-fast", "fwd+bwd"),
    ("token_logprobs", "fastalign", "fwd+bwd"),
    ("linear_token_logprobs", "fastalign", "fwd+bwd"),
)
REHEARSE_PROFILED = (("ift_loss", "fastalign", "fwd+bwd"),)
PROFILE_SECONDS = 30  # no profile starts after this many seconds of profiling
PROFILE_TOP = 12  # kernels kept per profile, the longest first
# Seconds kept back from the benchmarks for writing the results.
RESERVE_SECONDS = 5
_OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_TEST_ID = re.compile(r"(\S+\.py::\S+)")
_PROGRESS = re.compile(r"\[\s*\d+%\]")


@dataclass
class Clock:
    budget: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    @property
    def deadline(self) -> float:
        return self.start + self.budget


def install_peers(wheels: Path, target: Path) -> dict:
    """Installs the wheels in `wheels` into `target` (first on sys.path and PYTHONPATH) if the folder exists; returns
    what each peer is now: its version, or why it is missing."""
    status: dict = {"wheels": str(wheels), "installed_from_wheels": False}
    files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if files:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        cmd += ["--disable-pip-version-check", "--target", str(target), *map(str, files)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            sys.path.insert(0, str(target))
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
            importlib.invalidate_caches()
            status["installed_from_wheels"] = True
        else:
            status["install_error"] = (done.stderr or done.stdout).strip().splitlines()[-1:]
    else:
        status["note"] = (
            f"no wheels in {wheels} (run benches/gpu_wheels.sh on a machine with network; carry the folder)"
        )
    for module, dist in PEERS.items():
        status[module] = _version(module, dist)
    return status


def _version(module: str, dist: str) -> str:
    """The version of an importable module's distribution, or "missing: <why>"."""
    try:
        importlib.import_module(module)
        return importlib.metadata.version(dist)
    except Exception as exc:  # an import that fails for any reason makes the peer missing
        return f"missing: {type(exc).__name__}: {exc}".splitlines()[0]


def run_tests(selection: tuple[str, ...], seconds: float, device: str, log: Path) -> dict:
    """Runs pytest on `selection` in a subprocess for at most `seconds`; returns the counts of each outcome, the
    failing test ids, and whether it was cut off. The whole output goes to `log`."""
    env = {**os.environ, "FASTALIGN_TEST_DEVICE": device, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if device == "cuda":
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--tb=line", *selection]
    if device == "cuda" and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]  # Triton compiles in parallel
    counts: Counter = Counter()
    failed: list[str] = []
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )

        def read() -> None:
            for line in proc.stdout:
                out.write(line)
                outcome, test = _OUTCOME.search(line), _TEST_ID.search(line)
                if outcome and test and _PROGRESS.search(line):  # a result line, not the summary's repeat
                    counts[outcome.group(1)] += 1
                    if outcome.group(1) in ("FAILED", "ERROR"):
                        failed.append(test.group(1))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=max(1.0, seconds))
            cut = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            cut = True
        reader.join(timeout=10)
    return {
        "command": " ".join(cmd[1:]),
        "device": device,
        "seconds": round(time.monotonic() - start, 1),
        "returncode": None if cut else proc.returncode,
        "cut_off_by_budget": cut,
        "outcomes": dict(counts),
        "failed": failed,
        "log": str(log),
    }


def prioritized(cases: list) -> list:
    """The cases with each suite's first group (op, shape, dtype) first, then every suite's second, and so on."""
    from fastalign.bench import SUITES

    suite_of = {op: i for i, ops in enumerate(SUITES.values()) for op in ops}
    rank: dict[tuple, int] = {}
    seen: dict[int, int] = {}
    for case in cases:
        group = (case.op, case.shape, case.dtype)
        if group not in rank:
            suite = suite_of[case.op]
            rank[group] = seen.get(suite, 0)
            seen[suite] = rank[group] + 1
    return sorted(cases, key=lambda c: (rank[c.op, c.shape, c.dtype], suite_of[c.op]))


def profile_kernels(fn, cuda: bool) -> dict:
    """Time per kernel of one call of fn (already warm): {"total_us", "kernels": [{"name", "calls", "us"}, ...]},
    the PROFILE_TOP longest; on a CPU (the rehearsal) its torch ops, by self time."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    device_type = DeviceType.CUDA if cuda else DeviceType.CPU
    with profile(activities=[activity]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        if event.device_type == device_type:
            us = event.self_device_time_total if cuda else event.self_cpu_time_total
            rows.append({"name": event.key[:160], "calls": event.count, "us": round(us, 1)})
    rows.sort(key=lambda row: -row["us"])
    return {"total_us": round(sum(row["us"] for row in rows), 1), "kernels": rows[:PROFILE_TOP]}


def _profiles(env, cases: list, wanted: tuple, clock: Clock, cut: list[str]) -> list[dict]:
    """profile_kernels of the first case of each (op, impl, mode) in `wanted`, for at most PROFILE_SECONDS."""
    from fastalign import bench

    stop = min(time.monotonic() + PROFILE_SECONDS, clock.deadline - RESERVE_SECONDS)
    out = []
    for op, impl, mode in wanted:
        case = next((c for c in cases if (c.op, c.impl, c.mode) == (op, impl, mode)), None)
        if case is None:
            continue  # a peer that is not installed
        name = bench._name(case)
        if time.monotonic() > stop:
            cut.append(f"profile {name}: budget")
            continue
        try:
            fn = case.setup()
            fn()  # compiles, tunes and warms up outside the profile
            profile = profile_kernels(fn, env.cuda)
        except Exception as exc:  # a profile is diagnostics: report it and go on
            cut.append(f"profile {name}: {type(exc).__name__}: {exc}")
            continue
        finally:
            fn = None
            bench._free(env)
        out.append({"case": name, **profile})
        top = ", ".join(f"{k['name'][:40]} {k['us'] / 1e3:.2f} ms" for k in profile["kernels"][:3])
        print(f"profile {name}: {profile['total_us'] / 1e3:.2f} ms in kernels; {top}", flush=True)
    return out


def results_path(device: str, folder: Path = REPO / "benches" / "results") -> Path:
    """<folder>/<gpu>-<date>.json, or -2, -3, ... after it: a second run on a day never overwrites the first."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    stem = f"{slug}-{datetime.date.today().isoformat()}"
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    return path


def _correctness(clock: Clock, rehearse: bool, log: Path, cut: list[str]) -> dict:
    selection = REHEARSE_SELECTION if rehearse else TEST_SELECTION
    seconds = min(CORRECTNESS_SECONDS, clock.left() - RESERVE_SECONDS)
    if seconds <= 1:
        cut.append("correctness tests (budget)")
        return {"skipped": "budget"}
    print(f"correctness: pytest {' '.join(selection)} (at most {seconds:.0f} s)", flush=True)
    tests = run_tests(selection, seconds, "cpu" if rehearse else "cuda", log)
    cut_off = " (cut off by the budget)" if tests["cut_off_by_budget"] else ""
    print(f"correctness: {tests['outcomes']} in {tests['seconds']} s{cut_off}", flush=True)
    if not tests["outcomes"]:  # pytest never got to a test (a usage error, a failed import): say why
        tail = log.read_text(errors="replace").strip().splitlines()[-8:]
        tests["log_tail"] = tail
        print("\n".join(f"  pytest: {line}" for line in tail), flush=True)
    for test in tests["failed"]:
        print(f"  FAILED {test}")
    if cut_off:
        cut.append(f"correctness tests after {tests['seconds']} s (budget)")
    return tests


def main(budget: float = 300, rehearse: bool = False, out: str | None = None) -> int:
    if not in_checkout("gpu-check"):
        return 2
    if rehearse and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be chosen before the kernels are decorated, i.e. before fastalign is imported.
        cmd = [sys.executable, "-m", "fastalign.cli", "gpu-check", "--rehearse", "--budget", str(budget)]
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return subprocess.call([*cmd, *(["--out", out] if out else [])], env=env)
    if not rehearse and os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu-check: TRITON_INTERPRET=1 would time Triton's interpreter as the GPU's kernels; unset it "
              "(`--rehearse` is the interpreter run)")  # fmt: skip
        return 2
    clock = Clock(budget)
    import torch

    from fastalign import bench

    if not rehearse and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; `fastalign gpu-check --rehearse` runs the same steps on the CPU")
        return 2
    env = bench.Env(torch.device("cpu" if rehearse else "cuda"), "small" if rehearse else "target")
    meta = bench.environment(env)
    work = Path(tempfile.mkdtemp(prefix="fastalign-gpu-check-"))
    mode = " --rehearse (CPU, Triton interpreter)" if rehearse else ""
    print(f"gpu-check{mode}: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']},"
          f" budget {budget:.0f} s", flush=True)  # fmt: skip

    peers = install_peers(WHEELS_DIR, work / "peers")
    note = f" ({peers['note']})" if "note" in peers else ""
    print("peers: " + ", ".join(f"{name} {peers[name]}" for name in PEERS) + note, flush=True)
    cut = [f"peer {name}: {peers[name]}" for name in PEERS if peers[name].startswith("missing")]

    if out and (Path(out).is_dir() or Path(out).suffix != ".json"):  # a folder, made if need be
        Path(out).mkdir(parents=True, exist_ok=True)
        path = results_path(meta["device"], Path(out))
    elif out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        path = work / "results.json" if rehearse else results_path(meta["device"])
    summary = {"budget_s": budget, "rehearse": rehearse, "peers": peers}
    latest = {"records": [], "skipped": [], "ceilings": bench.Ceilings(env)}

    def save(records, skipped, ceilings) -> None:
        """The results file as it stands: written after the tests and after every group of cases (a run killed
        midway, as by the device tool's timeout, or an error, keeps what it measured)."""
        latest.update(records=records, skipped=skipped, ceilings=ceilings)
        summary["seconds"] = round(time.monotonic() - clock.start, 1)
        bench.write_results(
            path, env, records, skipped, ceilings, gpu_check={**summary, "cut": _every_cut(cut, skipped)}
        )

    # Beside the results when --out says where (on the GPU machine only $OUT comes back), else with the scratch files.
    summary["correctness"] = tests = _correctness(
        clock, rehearse, path.with_suffix(".pytest.log") if out else work / "pytest.log", cut
    )
    try:
        save(**latest)
        cases = prioritized(bench.collect_cases(env, REHEARSE_OPS if rehearse else None))
        summary["profiles"] = _profiles(env, cases, REHEARSE_PROFILED if rehearse else PROFILED, clock, cut)
        print(f"benchmarks: {len(cases)} cases, for {max(0.0, clock.left() - RESERVE_SECONDS):.0f} s", flush=True)
        bench.run_cases(env, cases, deadline=clock.deadline - RESERVE_SECONDS, after_group=save)
    finally:
        save(**latest)
    records, skipped, ceilings = latest["records"], latest["skipped"], latest["ceilings"]
    bench.print_table(records, ceilings)
    if rehearse:  # the kernels ran in Triton's interpreter: the table proves the code path, not the speed
        print("rehearsal: fastalign's rows ran the Triton interpreter, so their times say nothing about speed")
    print(f"wrote {path}" + ("" if rehearse else "; commit it, then `fastalign report --write` for README's table"))
    return _verdict(records, skipped, tests, cut, summary["seconds"])


def _every_cut(cut: list[str], skipped: list[dict]) -> list[str]:
    """What the run left out, one line each: the steps the budget cut, then the benchmark cases skipped and why."""
    return cut + [f"{s['case']}: {s['reason']}" for s in skipped]


def _verdict(records: list[dict], skipped: list[dict], tests: dict, cut: list[str], seconds: float) -> int:
    """Prints the outcome; 1 unless the run proved something and found nothing wrong: no wrong result, no failed or
    unrun tests, no fastalign case that raised (a compile error raises in the check and the set-up alike), and at
    least one measurement."""
    wrong = [r for r in records if r["correct"] not in (None, "ok")]
    failed_tests = bool(tests.get("failed")) or tests.get("returncode") not in (None, 0)
    tests_run = "skipped" not in tests
    raised = [s for s in skipped if s.get("impl", "").startswith("fastalign") and s["reason"] != "budget"]
    test_state = "NOT RUN" if not tests_run else "FAILED" if failed_tests else "ok"
    every_cut = _every_cut(cut, skipped)
    print(f"gpu-check: {len(records)} measurements, {len(wrong)} wrong results, {len(raised)} fastalign cases that "
          f"raised, tests {test_state}, {seconds} s; cut or skipped ({len(every_cut)}):", flush=True)  # fmt: skip
    for item in every_cut:
        print(f"  {item}")
    return 1 if wrong or failed_tests or raised or not tests_run or not records else 0
