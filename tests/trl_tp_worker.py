"""A stock TRL 1.16 trainer under tensor parallelism with `patch_trl()`, as a script, for
tests/test_integrations_trl_patch.py (issue 15):

    python tests/trl_tp_worker.py KIND OUT [--trl-own]                     (one process: the reference)
    torchrun --nproc_per_node 2 tests/trl_tp_worker.py KIND OUT            (ACCELERATE_USE_CPU=true: gloo)

KIND: sft, dpo, kto or grpo. On 2 processes the model is loaded as a user loads it for tensor parallelism,
`from_pretrained(path, tp_plan="auto")` (transformers' Llama plan: lm_head "colwise_gather_output", its weight a
Shard(0) DTensor on the mesh dim "tp"); the Trainer then builds accelerate's ParallelismConfig(tp_size=2) from the
model, so both ranks read the same batches. One thing is shimmed, the one that blocks this mode on a CPU:
accelerate 1.15's `ParallelismConfig._validate_accelerator` (accelerate/parallelism_config.py, "ParallelismConfig
is only compatible DistributedType.FSDP (version 2) or DistributedType.Multi{Device} or DistributedType.DEEPSPEED,
but got DistributedType.MULTI_CPU") refuses gloo/CPU processes; the shim drops that one ValueError and keeps every
other check. Everything after it is the Trainer's, accelerate's and TRL's own code.

The model (a tiny Llama, 4 heads and 2 KV heads so that the attention splits over 2 ranks, odd V) is written to
OUT/../model by the first run. Each rank writes OUT/result-rank<r>.json: the trainer's logged losses, how often
fastalign.linear_token_stats ran and on what weight, and the shapes `DTensor.full_tensor` gathered;
OUT/params-rank<r>.pt: the final parameters, gathered after training.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the torch path, as a CPU user runs it
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from distributed import exit_cleanly  # noqa: E402  (this script's directory is on sys.path)
from utils import QUIET_TRAINING  # noqa: E402

KINDS = ("sft", "dpo", "kto", "grpo")
STEPS = 3


def _allow_tp_on_cpu() -> None:
    """accelerate refuses ParallelismConfig on MULTI_CPU (gloo); drop that one error, keep every other check."""
    from accelerate.parallelism_config import ParallelismConfig

    original = ParallelismConfig._validate_accelerator

    def validate(self, accelerator):
        try:
            original(self, accelerator)
        except ValueError as e:
            if "MULTI_CPU" not in str(e):
                raise

    ParallelismConfig._validate_accelerator = validate


def _count(record: dict) -> None:
    """Count fastalign.linear_token_stats calls (and those on a Shard(0) weight on "tp"), and full_tensor gathers."""
    from torch.distributed.tensor import DTensor, Shard

    import fastalign

    op, full_tensor = fastalign.linear_token_stats, DTensor.full_tensor

    def counted(hidden, weight, *args, **kwargs):
        record["op_calls"] += 1
        if isinstance(weight, DTensor):
            names = weight.device_mesh.mesh_dim_names
            if names == ("tp",) and weight.placements == (Shard(0),):
                record["op_calls_on_tp_shard"] += 1
                record["weight_local_shape"] = list(weight.to_local().shape)
        return op(hidden, weight, *args, **kwargs)

    def gathered(self, *args, **kwargs):
        record["full_tensor_shapes"].append(list(self.shape))
        return full_tensor(self, *args, **kwargs)

    fastalign.linear_token_stats = counted
    DTensor.full_tensor = gathered


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("out", type=Path)
    parser.add_argument("--trl-own", action="store_true", help="leave TRL unpatched")
    a = parser.parse_args()
    torch.set_num_threads(1)
    import datasets
    import torch.distributed as dist
    import transformers
    import trl

    from fastalign.integrations import patch_trl
    from fastalign.integrations.tiny import build_tokenizer, load_preferences, tiny_llama

    datasets.disable_progress_bars()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    rows = load_preferences()
    tok = build_tokenizer(rows)
    path = a.out.parent / "model"
    if world > 1:
        dist.init_process_group("gloo")
        _allow_tp_on_cpu()
    if not path.exists():
        assert world == 1, "run the one-process reference first: it writes the model"
        tiny_llama(tok, hidden_size=64, vocab_size=len(tok) | 1, seed=0).save_pretrained(path)  # 4 heads, 2 KV
    record = {"op_calls": 0, "op_calls_on_tp_shard": 0, "full_tensor_shapes": []}
    _count(record)
    if not a.trl_own:
        patch_trl()
    tp = {"tp_plan": "auto"} if world > 1 else {}
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **tp)  # noqa: E731
    model = load()
    record["lm_head"] = {
        "type": type(model.lm_head.weight).__name__,
        "placements": str(getattr(model.lm_head.weight, "placements", None)),
    }
    common = dict(output_dir=str(a.out), max_steps=STEPS, **QUIET_TRAINING)
    if a.kind == "sft":
        data = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows[:64]]
        args = trl.SFTConfig(per_device_train_batch_size=8, learning_rate=1e-2, **common)
        trainer = trl.SFTTrainer(
            model=model, args=args, train_dataset=datasets.Dataset.from_list(data), processing_class=tok
        )
    elif a.kind == "kto":
        data = [
            {"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
            for r in rows[:16]
            for key in ("chosen", "rejected")
        ]
        args = trl.KTOConfig(per_device_train_batch_size=8, learning_rate=5e-3, beta=0.5, **common)
        trainer = trl.KTOTrainer(
            model=model,
            ref_model=load(),
            args=args,
            train_dataset=datasets.Dataset.from_list(data),
            processing_class=tok,
        )
    elif a.kind == "grpo":
        args = trl.GRPOConfig(
            per_device_train_batch_size=16,
            learning_rate=2e-2,
            num_generations=4,
            max_completion_length=8,
            beta=0.04,
            temperature=0.8,
            **common,
        )

        def even_tokens(completion_ids, **kwargs):  # a toy reward: the share of even token ids
            return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]

        trainer = trl.GRPOTrainer(
            model=model,
            reward_funcs=even_tokens,
            args=args,
            train_dataset=datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in rows[:64]]),
            processing_class=tok,
        )
    else:
        args = trl.DPOConfig(per_device_train_batch_size=4, learning_rate=5e-3, beta=0.5, **common)
        trainer = trl.DPOTrainer(
            model=model,
            ref_model=load(),
            args=args,
            train_dataset=datasets.Dataset.from_list(rows[:32]),
            processing_class=tok,
        )
    record["parallelism"] = str(trainer.accelerator.parallelism_config)
    trainer.train()
    record["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    record["first_log"] = trainer.state.log_history[0]  # step 0: loss, log-probs, entropy, accuracy, grad norm
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"result-rank{rank}.json").write_text(json.dumps(record))
    params = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in trainer.model.named_parameters()}
    torch.save({n: p.detach().clone() for n, p in params.items()}, a.out / f"params-rank{rank}.pt")
    if world > 1:
        exit_cleanly(destroy=True)


if __name__ == "__main__":
    main()
