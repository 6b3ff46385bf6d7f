"""The plumbing of `fastalign bench` and `fastalign gpu-check` on the CPU: the budget cut-off and its skip records, the
results schema, README's generated table, the pytest runner, the peers' wheels. (CI also runs `gpu-check --rehearse`
end to end.)"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import zipfile

import pytest
import torch

from fastalign import bench, gpu_check
from fastalign.bench import report


def _case(op="token_logprobs", impl="fastalign", shape="N=4", check=None, setup=None) -> bench.Case:
    x = torch.randn(1024)
    return bench.Case(op, impl, "fwd", shape, "fp32", setup or (lambda: lambda: x * 2), bytes=8 * 1024, check=check)


def test_only_takes_the_suites_op_names():
    env = bench.Env(torch.device("cpu"), "small")
    for suite, ops in bench.SUITES.items():
        module = importlib.import_module(f"fastalign.bench.{suite}")
        assert {c.op for c in module.cases(env)} == set(ops), suite
    with pytest.raises(ValueError, match="unknown op.*nope.*token_logprobs"):
        bench.collect_cases(env, ["nope"])
    assert {c.op for c in bench.collect_cases(env, ["ift_loss"])} == {"ift_loss"}


def test_budget_cut_off_skips_every_later_case_and_says_why():
    env = bench.Env(torch.device("cpu"), "small")
    cases = [_case(), _case(impl="eager")]
    records, skipped, _ = bench.run_cases(env, cases, deadline=time.monotonic() - 1, progress=False)
    assert records == [] and [s["reason"] for s in skipped] == ["budget", "budget"]
    assert skipped[0]["case"] == "token_logprobs fastalign fwd N=4 fp32"


def test_records_carry_ceilings_checks_and_speedups_only_when_correct():
    env = bench.Env(torch.device("cpu"), "small")

    def wrong():
        raise AssertionError("off by one")

    def broken():
        raise RuntimeError("no such peer")

    cases = [_case(check=lambda: None), _case(impl="eager"), _case(shape="N=8", check=wrong), _case(shape="N=8",
             impl="eager"), _case(impl="trl", setup=broken)]  # fmt: skip
    records, skipped, ceilings = bench.run_cases(env, cases, progress=False)
    assert [(r["impl"], r["shape"]) for r in records] == [(c.impl, c.shape) for c in cases[:4]]
    assert skipped == [
        {"case": "token_logprobs trl fwd N=4 fp32", "impl": "trl", "reason": "RuntimeError: no such peer"}
    ]
    ok, _, bad, _ = records
    assert ok["correct"] == "ok" and ok["speedup_vs_eager"] is not None
    assert bad["correct"] == "AssertionError: off by one" and bad["speedup_vs_eager"] is None
    assert ok["ceiling"] in ceilings.values and "copy" in ok["ceiling"]
    expected = 100 * ok["throughput"] / ceilings.values[ok["ceiling"]]  # the record rounds % to 0.1
    assert ok["pct_of_peak"] == pytest.approx(expected, rel=1e-3, abs=0.051)


def test_cpu_timing_takes_turns_so_load_falls_on_every_implementation_alike():
    calls = []
    fns = [lambda: calls.append("a"), lambda: (calls.append("b"), time.sleep(0.002)), lambda: calls.append("c")]
    fast, slow, _ = bench.interleaved_ms(fns, seconds=0.05)
    assert calls[:9] == ["a", "b", "c"] * 3 and len(calls) % 3 == 0 and 9 <= len(calls) <= 60
    assert slow >= 2 > fast


def test_a_call_that_raises_after_its_warm_up_skips_its_group_and_says_why():
    env = bench.Env(torch.device("cpu"), "small")
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("out of memory")

    cases = [_case(setup=lambda: flaky), _case(impl="eager"), _case(shape="N=8"), _case(shape="N=8", impl="eager")]
    records, skipped, _ = bench.run_cases(env, cases, progress=False)
    assert [(r["impl"], r["shape"]) for r in records] == [("fastalign", "N=8"), ("eager", "N=8")]
    assert [s["reason"] for s in skipped] == ["RuntimeError: out of memory"] * 2


def test_the_table_ends_with_the_rows_slower_than_eager(capsys):
    def record(impl, shape, speedup):
        return {"op": "DPOLoss", "impl": impl, "mode": "fwd+bwd", "shape": shape, "dtype": "fp32", "ms": 1.0,
                "throughput": 1.0, "throughput_unit": "GB/s", "pct_of_peak": 1.0, "peak_mem_mb": 1.0,
                "speedup_vs_eager": speedup, "correct": "ok"}  # fmt: skip

    rows = [record("fastalign", "B=4", 1.5), record("eager", "B=4", 1.0), record("fastalign", "B=8", 0.9)]
    bench.print_table(rows + [record("fastalign-inplace", "B=8", None)])
    assert "at least as fast as eager in 1 of 2 rows; slower in: DPOLoss fastalign fwd+bwd B=8 fp32\n" in (
        capsys.readouterr().out
    )
    bench.print_table(rows[:2])
    assert "at least as fast as eager in 1 of 1 rows\n" in capsys.readouterr().out


def test_the_table_names_the_rows_heavier_than_eager(capsys):
    def record(impl, shape, peak_mb):
        return {"op": "IFTLoss", "impl": impl, "mode": "fwd", "shape": shape, "dtype": "bf16", "ms": 1.0,
                "throughput": 1.0, "throughput_unit": "GB/s", "pct_of_peak": 1.0, "peak_mem_mb": peak_mb,
                "speedup_vs_eager": 1.0, "correct": "ok"}  # fmt: skip

    rows = [record("fastalign", "T=8", 2.0), record("eager", "T=8", 3.0), record("fastalign-inplace", "T=8", 3.5)]
    bench.print_table(rows + [record("fastalign", "T=16", None), record("eager", "T=16", 1.0)])
    out = capsys.readouterr().out
    assert "within eager's peak memory in 1 of 2 rows; heavier in: IFTLoss fastalign-inplace fwd T=8 bf16\n" in out
    bench.print_table(rows[:2])
    assert "within eager's peak memory in 1 of 1 rows\n" in capsys.readouterr().out


def test_a_log_gets_one_numbered_line_per_case(capsys):
    env = bench.Env(torch.device("cpu"), "small")
    bench.run_cases(env, [_case(check=lambda: None), _case(impl="eager")], progress=True)  # stderr: not a tty here
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert lines == ["[1/2] token_logprobs fastalign fwd N=4 fp32", "[2/2] token_logprobs eager fwd N=4 fp32"]


def test_suites_take_turns_under_a_budget():
    cases = [
        _case(op="token_logprobs", shape="a"),
        _case(op="token_logprobs", shape="a", impl="eager"),
        _case(op="token_logprobs", shape="b"),
        _case(op="ondare_step", shape="c"),
        _case(op="linear_token_logprobs", shape="d"),
    ]
    order = [(c.op, c.shape, c.impl) for c in gpu_check.prioritized(cases)]
    assert order == [
        ("token_logprobs", "a", "fastalign"),
        ("token_logprobs", "a", "eager"),
        ("ondare_step", "c", "fastalign"),
        ("linear_token_logprobs", "d", "fastalign"),
        ("token_logprobs", "b", "fastalign"),
    ]


def _gpu_results(tmp_path, name="nvidia-h200-2026-12-01.json", ms=None, cut=(), correct="ok", **gpu_check):
    """A results file as gpu-check writes it on a GPU: the CPU's records, relabelled as an H200's."""
    env = bench.Env(torch.device("cpu"), "small")
    records, skipped, ceilings = bench.run_cases(env, [_case(check=lambda: None), _case(impl="eager")], progress=False)
    for r in records:
        r["device"], r["correct"] = "NVIDIA H200", correct if r["impl"] == "fastalign" else None
        r["ms"] = ms or r["ms"]
    path = tmp_path / "results" / name
    bench.write_results(
        path, env, records, skipped, ceilings, gpu_check={"budget_s": 300, "cut": list(cut), **gpu_check}
    )
    results = json.loads(path.read_text())
    path.write_text(json.dumps({**results, "device": "NVIDIA H200"}))
    return path


def test_results_file_and_the_generated_table(tmp_path):
    path = _gpu_results(tmp_path)
    results = json.loads(path.read_text())
    for key in ("device", "torch", "triton", "commit", "date", "ceilings", "records", "skipped", "gpu_check"):
        assert key in results, key
    for key in ("op", "impl", "mode", "shape", "dtype", "ms", "throughput", "pct_of_peak", "ceiling", "peak_mem_mb",
                "speedup_vs_eager", "correct", "device", "commit"):  # fmt: skip
        assert key in results["records"][0], key
    table = report.table(path.parent).splitlines()
    assert len(table) == 2 + 2 and table[0].startswith("| GPU |")
    assert "| token_logprobs | fwd | N=4 | fp32 | fastalign |" in table[2] and "| ok |" in table[2]
    assert report.table(tmp_path / "none") == report.EMPTY


def test_the_table_keeps_the_newest_record_and_only_gpu_runs_and_says_what_was_cut(tmp_path, capsys):
    folder = _gpu_results(tmp_path, ms=1.0).parent
    _gpu_results(tmp_path, "nvidia-h200-2026-12-01-2.json", ms=2.0, cut=["peer trl: missing"])  # later, same day
    _gpu_results(tmp_path, "nvidia-h200-2026-12-01-10.json", ms=3.0, correct="AssertionError: off\nby | one")
    _gpu_results(tmp_path, "cpu-x86-64-x2-2026-12-02.json", ms=9.0, rehearse=True)  # a rehearsal: not a GPU's
    table = report.table(folder).splitlines()
    rows = [line for line in table if line.startswith("| NVIDIA H200")]
    assert len(rows) == 2 and all("| 3.000 |" in row for row in rows)  # -10 is the newest, not a name sort's -2
    assert "| AssertionError: off |" in rows[0]  # one line of the message, its "|" gone from the cell
    assert "- nvidia-h200-2026-12-01-2.json (NVIDIA H200, commit" in table[-1] and "peer trl: missing" in table[-1]
    assert "cpu-x86-64-x2-2026-12-02.json is no gpu-check run on a GPU" in capsys.readouterr().err
    (folder / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json is not a results file"):
        report.table(folder)


def test_a_results_name_taken_today_gets_the_next_number(tmp_path):
    first = gpu_check.results_path("NVIDIA H200", tmp_path)
    first.write_text("{}")
    assert first.name.startswith("nvidia-h200-") and gpu_check.results_path("NVIDIA H200", tmp_path).stem.endswith("-2")


def test_readme_performance_table_is_the_generated_one():
    assert report.readme_table() == report.table(), "run `fastalign report --write`"


def test_report_write_replaces_only_the_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="lacks the performance table markers"):
        report.main(write=True, readme=readme)
    readme.write_text(f"# x\n\n## Performance\n\nintro\n\n{report.BEGIN}\nold\n{report.END}\n\n## Next\n")
    assert report.main(write=True, readme=readme) == 0
    assert (
        readme.read_text()
        == f"# x\n\n## Performance\n\nintro\n\n{report.BEGIN}\n{report.table()}\n{report.END}\n\n## Next\n"
    )


def test_pytest_runner_counts_outcomes_and_stops_at_its_budget(tmp_path):
    tests = tmp_path / "test_sample.py"
    tests.write_text("import time\n\ndef test_ok():\n    pass\n\ndef test_wrong():\n    assert 1 == 2\n")
    done = gpu_check.run_tests((str(tests),), 120, "cpu", tmp_path / "log")
    assert done["outcomes"] == {"PASSED": 1, "FAILED": 1} and not done["cut_off_by_budget"]
    assert len(done["failed"]) == 1 and done["failed"][0].endswith("test_sample.py::test_wrong")
    assert done["returncode"] == 1
    slow = tmp_path / "test_slow.py"
    slow.write_text("import time\n\ndef test_sleeps():\n    time.sleep(60)\n")
    start = time.monotonic()
    done = gpu_check.run_tests((str(slow),), 3, "cpu", tmp_path / "log2")
    assert done["cut_off_by_budget"] and done["returncode"] is None and time.monotonic() - start < 30


def test_a_pytest_that_reaches_no_test_fails_the_check_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "REHEARSE_SELECTION", (str(tmp_path / "test_missing.py"),))
    tests = gpu_check._correctness(gpu_check.Clock(120), True, tmp_path / "log", [])
    assert tests["outcomes"] == {} and tests["returncode"] not in (0, None)
    assert any("test_missing.py" in line for line in tests["log_tail"])
    assert "  pytest: " in capsys.readouterr().out


@pytest.fixture
def small_rehearsal(tmp_path, monkeypatch):
    """gpu-check --rehearse cut down: one passing test, the ift_loss cases, no peers."""
    sample = tmp_path / "test_sample.py"
    sample.write_text("def test_ok():\n    pass\n")
    monkeypatch.setattr(gpu_check, "REHEARSE_SELECTION", (str(sample),))
    monkeypatch.setattr(gpu_check, "REHEARSE_OPS", ["ift_loss"])
    monkeypatch.setattr(gpu_check, "WHEELS_DIR", tmp_path / "no-wheels")


def test_out_folder_gets_the_results_under_their_name_and_pytest_log_beside(tmp_path, small_rehearsal):
    # The GPU machine returns only the files under one folder ($OUT): `--out $OUT` must put everything there.
    out = tmp_path / "out"
    out.mkdir()
    assert gpu_check.main(budget=60, rehearse=True, out=str(out)) == 0  # an upper bound: a loaded machine is slow
    (results,) = out.glob("*.json")
    assert results.name == gpu_check.results_path(json.loads(results.read_text())["device"], tmp_path).name
    assert "test_sample.py::test_ok PASSED" in results.with_suffix(".pytest.log").read_text()
    summary = json.loads(results.read_text())["gpu_check"]
    assert summary["correctness"]["outcomes"] == {"PASSED": 1}
    (profile,) = summary["profiles"]  # REHEARSE_PROFILED: ift_loss, the rehearsal's op
    assert profile["case"].startswith("ift_loss fastalign fwd+bwd") and profile["kernels"]


def _wheel(folder, name="fastalign_fake_peer", version="1.0"):
    path = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return path


def test_peers_come_from_carried_wheels_or_are_reported_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    status = gpu_check.install_peers(tmp_path / "absent", tmp_path / "site")
    assert not status["installed_from_wheels"] and "no wheels in" in status["note"]
    assert set(gpu_check.PEERS) <= set(status)
    monkeypatch.setitem(gpu_check.PEERS, "fastalign_fake_peer", "fastalign_fake_peer")
    status = gpu_check.install_peers(tmp_path, tmp_path / "site")  # tmp_path holds no wheel yet
    assert status["fastalign_fake_peer"].startswith("missing: ModuleNotFoundError")
    _wheel(tmp_path)
    status = gpu_check.install_peers(tmp_path, tmp_path / "site")
    assert status["installed_from_wheels"] and status["fastalign_fake_peer"] == "1.0"
    assert importlib.import_module("fastalign_fake_peer").VALUE == 42
    assert str(tmp_path / "site") in sys.path and str(tmp_path / "site") in os.environ["PYTHONPATH"]
    sys.modules.pop("fastalign_fake_peer")


def test_a_profile_lists_the_longest_kernels_of_one_call_and_their_total():
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    profile = gpu_check.profile_kernels(lambda: (a @ b).softmax(-1).sum(), cuda=False)
    names = [k["name"] for k in profile["kernels"]]
    assert "aten::mm" in names and "aten::_softmax" in names and len(names) <= gpu_check.PROFILE_TOP
    times = [k["us"] for k in profile["kernels"]]
    assert times == sorted(times, reverse=True) and 0 < sum(times) <= profile["total_us"] + 1e-6  # float sums
    assert all(k["calls"] >= 1 for k in profile["kernels"])


def test_profiles_take_the_first_matching_case_and_report_what_they_could_not(capsys):
    env = bench.Env(torch.device("cpu"), "small")

    def failing_setup():
        raise RuntimeError("no such kernel")

    cases = [
        _case(shape="N=1"),
        _case(shape="N=2"),
        _case(op="ift_loss", setup=failing_setup),
    ]
    wanted = (("token_logprobs", "fastalign", "fwd"), ("ift_loss", "fastalign", "fwd"), ("DPOLoss", "trl", "fwd"))
    cut = []
    profiles = gpu_check._profiles(env, cases, wanted, gpu_check.Clock(60), cut)
    assert [p["case"] for p in profiles] == [bench._name(cases[0])]
    assert profiles[0]["kernels"] and profiles[0]["total_us"] > 0
    assert cut == [f"profile {bench._name(cases[2])}: RuntimeError: no such kernel"]  # a missing peer is no cut
    assert "profile token_logprobs fastalign fwd N=1" in capsys.readouterr().out
    cut = []
    assert gpu_check._profiles(env, cases, wanted[:1], gpu_check.Clock(0), cut) == []
    assert cut == [f"profile {bench._name(cases[0])}: budget"]


def test_every_profiled_case_is_a_case_of_the_target_run():
    pytest.importorskip("trl")  # one of them is TRL's
    env = bench.Env(torch.device("cpu"), "target")
    cases = {(c.op, c.impl, c.mode) for c in bench.collect_cases(env)}
    assert set(gpu_check.PROFILED) <= cases, set(gpu_check.PROFILED) - cases  # a typo would waste GPU seconds
    rehearsal = {
        (c.op, c.impl, c.mode) for c in bench.collect_cases(bench.Env(env.device, "small"), gpu_check.REHEARSE_OPS)
    }
    assert set(gpu_check.REHEARSE_PROFILED) <= rehearsal


def test_gpu_check_fails_when_it_proved_nothing_or_a_fastalign_case_raised(
    tmp_path, monkeypatch, capsys, small_rehearsal
):
    monkeypatch.setattr(gpu_check, "REHEARSE_PROFILED", ())
    out = tmp_path / "new" / "folder"  # made, and the results go into it under their name
    assert gpu_check.main(budget=0, rehearse=True, out=str(out)) == 1  # no test ran, nothing measured
    assert "tests NOT RUN" in capsys.readouterr().out and len(list(out.glob("*.json"))) == 1

    def broken(*args, **kwargs):
        raise RuntimeError("compile error")

    real_collect = bench.collect_cases

    def collect_with_a_broken_kernel(env, only=None):
        cases = real_collect(env, only)
        first = next(c for c in cases if c.impl.startswith("fastalign"))
        first.setup = broken
        return cases

    monkeypatch.setattr(bench, "collect_cases", collect_with_a_broken_kernel)
    assert gpu_check.main(budget=60, rehearse=True, out=str(out)) == 1
    assert "1 fastalign cases that raised" in capsys.readouterr().out


def test_gpu_check_keeps_its_results_when_it_is_stopped_midway(tmp_path, monkeypatch, small_rehearsal):
    monkeypatch.setattr(gpu_check, "REHEARSE_PROFILED", ())
    real_run = bench.run_cases

    def killed_after_the_first_group(env, cases, deadline=None, progress=True, after_group=None):
        def stop(records, skipped, ceilings):
            after_group(records, skipped, ceilings)
            raise KeyboardInterrupt  # as a kill would land, after the first group's write

        return real_run(env, cases, deadline, progress, stop)

    monkeypatch.setattr(bench, "run_cases", killed_after_the_first_group)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(budget=60, rehearse=True, out=str(tmp_path))
    (results,) = tmp_path.glob("*.json")
    saved = json.loads(results.read_text())
    assert saved["records"] and saved["gpu_check"]["correctness"]["outcomes"] == {"PASSED": 1}


def test_gpu_check_refuses_the_interpreter_on_a_gpu_run(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gpu_check.main(budget=1, rehearse=False) == 2
    assert "TRITON_INTERPRET=1 would time Triton's interpreter" in capsys.readouterr().out


def test_report_and_gpu_check_outside_a_checkout_say_so(tmp_path, monkeypatch, capsys):
    """A wheel install has no benches/ or tests/ beside the package: both commands refuse, naming what they need,
    instead of writing into site-packages or running no test."""
    monkeypatch.setattr(report, "REPO", tmp_path)
    assert report.main(write=True, readme=tmp_path / "README.md") == 2
    assert gpu_check.main(budget=1, rehearse=True, out=str(tmp_path)) == 2
    out = capsys.readouterr().out
    for command in ("report", "gpu-check"):
        assert f"fastalign {command}: runs from a fastalign checkout" in out
    assert list(tmp_path.iterdir()) == []
