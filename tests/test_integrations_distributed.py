"""fastalign's HF trainers across processes: crash and resume, DDP and FSDP2 through torchrun. Slow (marked `slow`):
each test starts a few Python processes (tests/hf_trainer_worker.py) that train tiny models for 6 steps on the
torch path, one thread each.

- Crash: SIGKILL right after the trainer wrote checkpoint-3, resume from it, and the parameters after step 6 equal
  the uninterrupted run's bitwise (DPOTrainer with OnDARE and with OnTIES, IFTTrainer).
- `torchrun --nproc_per_node 2` with ACCELERATE_USE_CPU=true (gloo), as DDP, and as FSDP2 (accelerate enables FSDP
  only on accelerator devices, so the worker sets its state to FSDP2; everything after that is accelerate's and the
  Trainer's FSDP2 code: fully_shard, the optimizer's parameter swap, sharded checkpoints). The run completes, both
  ranks end with the same parameters, the logged losses and the parameters are one process's on the same global
  batch, and resuming from the checkpoint the trainer saved gives the uninterrupted run's parameters bitwise.
- DeepSpeed ZeRO-3 on 2 processes (tests/deepspeed_worker.py): a patched model's updates equal the stock model's
  trained without DeepSpeed, with the loss in eager PyTorch.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from distributed import run_script
from utils import rel_err

pytest.importorskip("transformers")
pytest.importorskip("trl")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.slow

WORKER = Path(__file__).resolve().parent / "hf_trainer_worker.py"
STEPS, CHECKPOINT = 6, 3
GLOBAL_BATCH = 4
LOSS_RTOL = 1e-5
PARAM_RTOL = 1e-5  # DDP's all-reduced mean gradient rounds differently from one process's


def run_worker(out: Path, kind: str, *args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    batch = ["--batch", str(GLOBAL_BATCH // ranks)] if ranks > 1 else []
    out.mkdir(parents=True, exist_ok=True)
    return run_script(WORKER, [kind, str(out), *batch, *args], cwd=out, ranks=ranks)


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def params(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(out / f"params-rank{rank}.pt")


def losses(out: Path, rank: int = 0) -> dict[int, float]:
    history = json.loads((out / f"log-rank{rank}.json").read_text())
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def assert_bitwise(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys() and actual
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not different, different


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted one-process run of a kind, at the global batch size: trained once, shared by the tests."""
    runs: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in runs:
            out = tmp_path_factory.mktemp(f"{kind}-uninterrupted")
            check(run_worker(out, kind, "--steps", str(STEPS)))
            runs[kind] = out
        return runs[kind]

    return get


@pytest.mark.parametrize("kind", ["dpo-ondare", "dpo-onties", "ift"])
def test_sigkill_after_checkpoint_then_resume_is_bitwise_the_uninterrupted_run(kind, tmp_path, uninterrupted):
    run = tmp_path / "run"
    every = ("--steps", str(STEPS), "--save-steps", str(CHECKPOINT))
    killed = run_worker(run, kind, *every, "--kill-after-save", str(CHECKPOINT))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    checkpoint = run / f"checkpoint-{CHECKPOINT}"
    assert (checkpoint / "optimizer.pt").exists() and not (run / "params-rank0.pt").exists()
    check(run_worker(run, kind, *every, "--resume", str(checkpoint)))
    expected = uninterrupted(kind)
    assert_bitwise(params(run), params(expected))
    assert losses(run) == losses(expected)  # steps 1-3 from the checkpoint's trainer state, 4-6 trained again


SETUP = {
    "ddp": {"distributed_type": "MULTI_CPU", "ddp": True, "fsdp2": False, "sharded_parameters": 0},
    "fsdp2": {"distributed_type": "FSDP", "ddp": False, "fsdp2": True, "sharded_parameters": 21},
}


@pytest.mark.parametrize("mode", SETUP)
@pytest.mark.parametrize("kind", ["dpo-ondare", "ift"])
def test_two_processes_match_one_and_resume_from_their_checkpoint(kind, mode, tmp_path, uninterrupted):
    run = tmp_path / "run"
    every = ("--steps", str(STEPS), "--save-steps", str(CHECKPOINT), *(["--fsdp2"] if mode == "fsdp2" else []))
    check(run_worker(run, kind, *every, ranks=2))
    optimizer = "OnlineMergeAdamW" if kind.startswith("dpo") else "AdamW"
    for rank in (0, 1):
        setup = json.loads((run / f"setup-rank{rank}.json").read_text())
        assert setup == {**SETUP[mode], "num_processes": 2, "backend": "gloo", "optimizer": optimizer}
    assert_bitwise(params(run, 1), params(run, 0))  # the ranks hold the same (gathered) parameters

    one = uninterrupted(kind)  # one process, the same global batches
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    assert losses(run) == pytest.approx(losses(one), rel=LOSS_RTOL)
    single = params(one)
    for name, value in params(run).items():
        assert rel_err(value, single[name]) < PARAM_RTOL, name

    resumed = tmp_path / "resumed"
    check(run_worker(resumed, kind, *every, "--resume", str(run / f"checkpoint-{CHECKPOINT}"), ranks=2))
    for rank in (0, 1):
        assert_bitwise(params(resumed, rank), params(run, 0))


@pytest.mark.parametrize("tied", ["untied", "tied"])
@pytest.mark.parametrize("case", ["sft", "dpo-fast"])
def test_deepspeed_zero3_on_two_processes_matches_eager_without_it(case, tied, tmp_path):
    """DeepSpeed ZeRO-3 (every parameter partitioned over 2 gloo processes, DeepSpeed's CPU accelerator) with a
    patched model: its own loss (the lean log-probs, whose backward needs the head's weight gathered again) and
    the DPO loss on the fast strategy inside lm_head's call (the weight's gradient taken in the forward), with the
    head tied to the embedding or not. Every parameter's update after 3 SGD steps equals the stock model's trained
    without DeepSpeed on the whole batch with the loss in eager PyTorch (tests/deepspeed_worker.py)."""
    pytest.importorskip("deepspeed")
    worker = Path(__file__).resolve().parent / "deepspeed_worker.py"
    result = run_script(worker, [case, tied], tmp_path, ranks=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("every update equals the run without DeepSpeed") == 2, result.stdout[-3000:]
