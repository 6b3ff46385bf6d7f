"""Trains fastalign's DPOTrainer (with OnlineMergeAdamW) or IFTTrainer on tiny models, as a script, for the
checkpoint crash tests and the DDP tests (tests/test_integrations_distributed.py):

    python tests/hf_trainer_worker.py KIND OUT [--steps 6] [--save-steps 3] [--batch 4]
        [--kill-after-save STEP] [--resume CHECKPOINT]
    torchrun --nproc_per_node 2 tests/hf_trainer_worker.py KIND OUT --batch 2 [--fsdp2] ...   (ACCELERATE_USE_CPU=true)

KIND: dpo-ondare, dpo-onties or ift. Each rank writes OUT/params-rank<r>.pt (its final parameters),
OUT/log-rank<r>.json (the trainer's log history) and OUT/setup-rank<r>.json (how accelerate ran it).
--kill-after-save STEP SIGKILLs the process once the trainer has written checkpoint-STEP. The torch path runs
on one thread, so runs are bitwise reproducible.

--fsdp2: accelerate enables FSDP only on accelerator devices (on a CPU its state stays MULTI_CPU, whatever the
config says), so this sets the trainer's accelerator state to FSDP with an FSDP2 plugin before training. From there
on it is accelerate's and the Trainer's own FSDP2 code on gloo: fully_shard of each decoder layer and the root, the
optimizer built before sharding and its parameters swapped for the DTensors, sharded (DCP) checkpoints.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the torch path, as a CPU user runs it (pytest's children inherit it)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from distributed import exit_cleanly  # noqa: E402  (this script's directory is on sys.path)

KINDS = ("dpo-ondare", "dpo-onties", "ift")
HIDDEN = 32


def trainer_for(kind: str, out: Path, steps: int, save_steps: int, batch: int, callbacks: list):
    import datasets
    from transformers import TrainingArguments
    from trl import DPOConfig

    from fastalign.integrations import DPOTrainer, IFTTrainer
    from fastalign.integrations.tiny import build_tokenizer, load_preferences, tiny_llama

    datasets.disable_progress_bars()
    rows = load_preferences()
    tok = build_tokenizer(rows)
    common = dict(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        max_steps=steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    if kind == "ift":
        data = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows[:64]]
        args = TrainingArguments(learning_rate=3e-3, **common)
        model = tiny_llama(tok, hidden_size=HIDDEN)
        return IFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=callbacks)
    base = tiny_llama(tok, hidden_size=HIDDEN, seed=1)
    sft = tiny_llama(tok, hidden_size=HIDDEN, seed=2)
    merge = {"base": base, "method": kind.removeprefix("dpo-"), "reserve_p": 0.5, "alpha": 0.01}
    return DPOTrainer(
        model=copy.deepcopy(sft),
        ref_model=sft,
        args=DPOConfig(learning_rate=1e-3, beta=0.5, **common),
        train_dataset=datasets.Dataset.from_list(rows[:64]),
        processing_class=tok,
        online_merge=merge,
        callbacks=callbacks,
    )


def force_fsdp2(trainer) -> None:
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        state_dict_type="SHARDED_STATE_DICT",
    )
    # AcceleratorState() copies PartialState's shared state on every call: set the type in both.
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--kill-after-save", type=int, default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--fsdp2", action="store_true")
    opts = parser.parse_args()
    torch.set_num_threads(1)

    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from transformers import TrainerCallback

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # the Trainer calls it once the checkpoint is written
            if state.global_step == opts.kill_after_save:
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks = [KillAfterSave()] if opts.kill_after_save else []
    trainer = trainer_for(opts.kind, opts.out, opts.steps, opts.save_steps, opts.batch, callbacks)
    if opts.fsdp2:
        force_fsdp2(trainer)
    trainer.train(resume_from_checkpoint=opts.resume)
    rank = trainer.args.process_index
    model = trainer.accelerator.unwrap_model(trainer.model)
    optimizer = trainer.optimizer.optimizer
    setup = {
        "distributed_type": trainer.accelerator.distributed_type.value,
        "num_processes": trainer.accelerator.num_processes,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "ddp": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
        "fsdp2": isinstance(model, FSDPModule),
        "optimizer": type(optimizer).__name__,
        "sharded_parameters": sum(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"]),
    }
    (opts.out / f"setup-rank{rank}.json").write_text(json.dumps(setup))
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}
    torch.save(full, opts.out / f"params-rank{rank}.pt")
    (opts.out / f"log-rank{rank}.json").write_text(json.dumps(trainer.state.log_history))
    if torch.distributed.is_initialized():
        exit_cleanly(destroy=False)  # destroying the group hung CI here (b6ef9af)


if __name__ == "__main__":
    main()
