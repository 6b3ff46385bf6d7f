"""fastalign compile-check's parts: the launch recorder binds arguments as Triton does at launch, the SASS reader finds
loops, widths and MMA kinds, the model predicts, the rules fail. One test compiles a small kernel for sm_90."""

from __future__ import annotations

import os

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from fastalign import compile_check as cc
from fastalign.kernels import LaunchCase, meta


def _copy(p_x, p_y, n, stride, BLOCK: tl.constexpr):
    o = tl.program_id(0) * stride + tl.arange(0, BLOCK)
    for i in range(0, n, BLOCK):
        tl.store(p_y + o + i, tl.load(p_x + o + i))


# Built as a JITFunction whatever TRITON_INTERPRET says (the tests set it), so that the recorder sees its launches.
_copy_kernel = JITFunction(_copy)


def _record(*args, **kwargs) -> cc.Launch:
    with cc._recording(90) as launches:
        _copy_kernel[(4,)](*args, BLOCK=512, **kwargs)
    assert len(launches) == 1
    return launches[0]


def test_recorder_specializes_as_triton_does_at_launch():
    x, y = meta(4096), meta(4096)
    la = _record(x, y, 4096, 1)
    assert la.grid == (4, 1, 1) and la.options["num_warps"] == 4
    assert la.signature["p_x"] == "*fp32" and la.signature["n"] == "i32"
    assert la.signature["stride"] == "constexpr"  # an int equal to 1 becomes a constant
    hinted = {k[0] for k, v in la.attrs.items() if ["tt.divisibility", 16] in v}
    assert hinted == {0, 1, 2}  # aligned pointers and n % 16 == 0; not the constant

    la = _record(meta(4097)[1:], y, 4095, 3, num_warps=8)
    hinted = {k[0] for k, v in la.attrs.items() if ["tt.divisibility", 16] in v}
    assert hinted == {1} and la.options["num_warps"] == 8  # x is 4 bytes past an aligned address
    assert la.signature["n"] == "i32" and la.signature["stride"] == "i32"
    assert _record(x, y, 2**31, 1).signature["n"] == "i64"


def test_recorder_restores_run_and_records_pick_fastest_candidates():
    from fastalign import kernels

    run = JITFunction.run
    with cc._recording(80) as launches:
        chosen = kernels.pick_fastest(("k",), [8, 16, 32], lambda block: launches.append(block))
    assert chosen == 8 and launches == [16, 32]  # the others are launched (and compiled) too
    assert JITFunction.run is run and kernels._LAUNCH_OTHER_CANDIDATES is None


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.64 R2, desc[UR4][R2.64] ;
.L_x_1:
        /*0020*/              @!P0 LDG.E.128 R4, desc[UR4][R8.64] ;
        /*0030*/                   LDG.E.U16 R6, desc[UR4][R8.64] ;
.L_x_2:
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0050*/                   FADD R7, R7, R6 ;
        /*0060*/              @P1 BRA `(.L_x_2) ;
        /*0070*/                   STG.E.128 desc[UR4][R10.64], R4 ;
        /*0080*/              @!P2 BRA `(.L_x_1) ;
        /*0090*/                   EXIT ;
.L_x_3:
        /*00a0*/                   BRA `(.L_x_3);
"""


def test_sass_reader_finds_loops_widths_and_mma():
    sass = cc.parse_sass(SASS)
    assert len(sass.opcodes) == 11
    assert sass.depth == [0, 0, 1, 1, 2, 2, 2, 1, 1, 0, 0]  # the branch to itself after EXIT is no loop
    assert sass.loop_sizes() == [4, 3] and sass.mma == "wgmma"
    assert sass.hot_depth() == 1
    assert sass.memory_widths("ld", 1) == {128: 1, 16: 1} and sass.memory_widths("st") == {128: 1}
    assert cc.narrow_main_loads(sass) == ""
    assert "no 128-bit" in cc.narrow_main_loads(cc.parse_sass(SASS.replace("LDG.E.128", "LDG.E.64")))
    line = "        /*0030*/                   LDG.E.U16 R6, desc[UR4][R8.64] ;\n"
    many = SASS.replace(line, line * 8)
    assert "8x16-bit" in cc.narrow_main_loads(cc.parse_sass(many))
    assert cc.parse_sass(SASS.replace("HGMMA.64x128x16", "HMMA.16816")).mma == "mma.sync"


def _compiled(sass_text: str, arch=90, regs=64, shared=0, warps=4) -> cc.Compiled:
    return cc.Compiled(arch, regs=regs, shared=shared, num_warps=warps, sass=cc.parse_sass(sass_text))


def test_occupancy_from_registers_shared_memory_and_warps():
    assert cc.ctas_per_sm(_compiled(SASS, regs=32, warps=4)) == 16  # 64 warps per SM
    assert cc.ctas_per_sm(_compiled(SASS, regs=128, warps=8)) == 2  # 128 * 32 * 8 = 32768 registers each
    assert cc.ctas_per_sm(_compiled(SASS, regs=33, warps=8)) == 6  # allocated as 40 per thread
    assert cc.ctas_per_sm(_compiled(SASS, regs=64, shared=100 * 1024, warps=4)) == 2  # 228 KiB / 101 KiB
    assert cc.ctas_per_sm(_compiled(SASS, arch=80, regs=64, shared=100 * 1024, warps=4)) == 1


def test_prediction_counts_every_loop_iteration_and_takes_the_binding_limit():
    compiled = _compiled(SASS)
    launch = cc.Launch("m", "k", (1000, 1, 1), {"n": 10}, {}, {}, {}, {"num_warps": 4})
    cost = cc.launch_cost(launch, compiled, (10, 20))
    # Per warp: 4 outside the loops once, the outer body (4 of its own) 10 times, the inner (3) 200 times.
    assert cost.warp_instructions == 1000 * 4 * (4 + 10 * 4 + 200 * 3)
    lanes = 1000 * 4 * 32
    assert cost.bytes == lanes * (8 + 10 * (16 + 2 + 16))
    assert cost.flops == {"bf16": 1000 * 4 * 200 * 2 * 64 * 128 * 16 / 4}
    h100 = next(m for m in cc.MACHINES if m.name == "H100")
    times = cost.times(h100, "wgmma", memory=True)
    seconds = times["mma"]
    assert max(times, key=times.get) == "mma" and seconds == pytest.approx(cost.flops["bf16"] / 790e12)
    assert times["memory"] == pytest.approx(cost.bytes / 3e12) and cost.times(h100, "wgmma", False)["memory"] == 0

    # One CTA per SM: the 4 + 10 * 4 warp instructions per program outside the MMA loop add to the MMA time.
    alone = cc.launch_cost(launch, _compiled(SASS, regs=255, warps=8), (10, 20))
    assert alone.unhidden_instructions == 1000 * 8 * (4 + 10 * 4)
    issue_rate = 132 * 4 * 1.98e9
    assert alone.times(h100, "wgmma", False)["mma"] == pytest.approx(
        2 * seconds + alone.unhidden_instructions / issue_rate
    )

    case = LaunchCase("c", lambda: None, bytes=int(cost.bytes), target=90, trips={"k": lambda a: (a["n"], 20)})
    pred = cc.predict(case, [launch], {launch.key: compiled}, h100, [])
    assert pred.moved_over_floor == pytest.approx(1.0) and pred.pct == pytest.approx(100 * cost.bytes / 3e12 / seconds)
    assert pred.bounds.startswith("k mma ") and " > memory " in pred.bounds
    with pytest.raises(ValueError, match="no trip counts"):
        cc.predict(LaunchCase("c", lambda: None, bytes=1), [launch], {launch.key: compiled}, h100, [])


def test_rules_fail_spills_shared_memory_and_mma_sync_on_sm90():
    assert cc.compile_problems(_compiled(SASS)) == []
    spilled = _compiled(SASS)
    spilled.spill_bytes = 8
    assert cc.compile_problems(spilled) == [("spill", "spills 8 bytes")]
    assert cc.compile_problems(_compiled(SASS, shared=300 * 1024))[0][0] == "shared memory"
    mma_sync = SASS.replace("HGMMA.64x128x16", "HMMA.16816")
    assert cc.compile_problems(_compiled(mma_sync)) == [("no wgmma on sm_90", "bf16/fp16 tl.dot without wgmma")]
    assert cc.compile_problems(_compiled(mma_sync, arch=80)) == []


def test_every_kernel_module_declares_launch_cases():
    cases, kernels = cc._cases()
    assert kernels and all(isinstance(c, LaunchCase) for _, c in cases)
    assert any(c.target for _, c in cases)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs a JITFunction built under the tests")
def test_compiles_a_launch_for_sm90_and_reads_its_sass():
    """End to end: ptxas, cuobjdump and nvdisasm from Triton's wheel; 4 aligned fp32 per thread load as one 128-bit
    access, unaligned ones one by one."""
    aligned = _record(meta(1 << 20), meta(1 << 20), 4096, 4096)
    unaligned = _record(meta((1 << 20) + 1)[1:], meta(1 << 20), 4095, 4095)
    for la, widths in ((aligned, {128}), (unaligned, {32})):
        job = cc.Job(__name__, "_copy_kernel", la.signature, la.constexprs, la.attrs, la.options, 90)
        result = cc.compile_job(job)
        assert not result.error and result.regs > 0 and result.spill_bytes == 0
        assert set(result.sass.memory_widths("ld", result.sass.hot_depth())) == widths
        assert result.sass.loops and result.sass.mma == "-"


def test_meta_tensors_have_the_alignment_of_their_offset():
    assert meta(2, 3, dtype=torch.bfloat16).data_ptr() == 0 and meta(4, 3)[1:].data_ptr() == 12
