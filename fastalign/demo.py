"""`fastalign demo`: align a tiny Llama end to end with fastalign's integrations.

1. A model of the Llama architecture is built from a config (no downloads): the base.
2. IFT (fastalign.integrations.IFTTrainer) trains it on the shipped data's (prompt, right answer)
   pairs: the SFT model.
3. DPO (fastalign.integrations.DPOTrainer) trains a copy of it on the preference pairs, with
   OnlineMergeAdamW's OnDARE merging every update toward tau = SFT - base.
4. The same IFT and DPO steps are timed on fastalign's fused path and on the eager path (the model's
   logits, log_softmax, eager losses), with their peak memory.

Prints tqdm progress with the per-step loss and reward margin/accuracy, then a summary, and writes a
PNG of the curves. The CPU configuration runs in under 3 minutes on 2 cores; on a GPU a larger one
runs.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

EVAL_PAIRS = 40  # held-out preference pairs, never trained on


@dataclass(frozen=True)
class DemoSize:
    hidden_size: int
    num_layers: int
    vocab_size: int  # padded past the tokenizer's words, as released models are
    batch_size: int  # sequences per IFT step; pairs per DPO step
    ift_steps: int
    dpo_steps: int
    ift_lr: float
    dpo_lr: float
    bf16: bool


SIZES = {
    "small": DemoSize(64, 2, 16384, 8, 150, 60, 3e-3, 5e-4, bf16=False),
    "large": DemoSize(512, 8, 65536, 16, 300, 150, 1e-3, 2e-5, bf16=True),
}
DPO_BETA = 0.1
# Each step adds alpha * tau: over the run the policy moves dpo_steps * alpha of the way along tau.
ONDARE = {"method": "ondare", "reserve_p": 0.3, "alpha": 0.001}
# How much the fused step's loss and gradients may differ from the eager step's (relative, by norm), by the size's bf16
# flag. In fp32 the two differ only in the order of their sums (about 1e-6 measured); under bf16 autocast both round
# their GEMMs' operands to bf16 (relative 4e-3), differently.
AGREEMENT = {False: 1e-4, True: 5e-2}


def _quiet_hf() -> None:
    """No hub traffic, no per-map progress bars and no deprecation notices: everything here is local."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


def _progress_callback(title: str, keys: tuple[str, ...], history: list[dict]):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """A tqdm bar whose postfix shows this step's logged values; keeps every log in `history`."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=title, unit="step", dynamic_ncols=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                history.append({"step": state.global_step, **logs})
                self.bar.set_postfix({k.split("/")[-1]: f"{logs[k]:.3f}" for k in keys if k in logs})

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return Progress()


def _training_args(cls, size: DemoSize, steps: int, lr: float, out_dir: str, **extra):
    return cls(
        output_dir=out_dir,
        per_device_train_batch_size=size.batch_size,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=max(1, steps // 10),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        bf16=size.bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        **extra,
    )


def _train(trainer, title: str, keys: tuple[str, ...]) -> list[dict]:
    from transformers import PrinterCallback

    history: list[dict] = []
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_progress_callback(title, keys, history))
    trainer.train()
    return history


def _pair_logps(model, tok, rows, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's chosen and rejected completion under a patched model."""
    from torch.nn.utils.rnn import pad_sequence

    from fastalign.integrations.causal_lm import IGNORE_INDEX
    from fastalign.integrations.ift import tokenize_prompt_response

    out = []
    for key in ("chosen", "rejected"):
        examples = [tokenize_prompt_response({"prompt": r["prompt"], "completion": r[key]}, tok) for r in rows]
        ids = pad_sequence([torch.tensor(e["input_ids"]) for e in examples], True, tok.pad_token_id).to(device)
        labels = pad_sequence([torch.tensor(e["labels"]) for e in examples], True, IGNORE_INDEX).to(device)
        with torch.no_grad():
            out.append(model(input_ids=ids, attention_mask=ids != tok.pad_token_id, labels=labels).logprobs.sum(-1))
    return out[0], out[1]


def _held_out(models: dict, reference, tok, rows, device) -> dict[str, dict[str, float]]:
    """Per model: how often it prefers the right answer, and DPO's implicit reward against `reference`."""
    from fastalign.integrations import patch_causal_lm

    ref_c, ref_r = _pair_logps(patch_causal_lm(reference), tok, rows, device)
    table = {}
    for name, model in models.items():
        chosen, rejected = _pair_logps(patch_causal_lm(model), tok, rows, device)
        margin = DPO_BETA * ((chosen - ref_c) - (rejected - ref_r))
        is_reference = model is reference  # its rewards against itself are 0 by definition: not shown
        table[name] = {
            "prefers right answer": (chosen > rejected).float().mean().item(),
            "reward margin": None if is_reference else margin.mean().item(),
            "reward accuracy": None if is_reference else (margin > 0).float().mean().item(),
        }
    return table


# ---------------------------------------------------------------------------------- fused vs eager


def _ift_steps(trainer, batch):
    """(fused, eager) callables that run one IFT forward + backward on `batch`."""
    from fastalign.integrations import unpatch_causal_lm
    from fastalign.reference import ift as eager_ift

    fused_model = trainer.model
    eager_model = unpatch_causal_lm(copy.deepcopy(fused_model))
    labels, input_ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]

    def fused():
        fused_model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(fused_model, batch)
        loss.backward()
        return loss.detach(), fused_model

    def eager():
        eager_model.zero_grad(set_to_none=True)
        with torch.no_grad():
            predicted = eager_model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].argmax(-1)
        weight = eager_model.get_input_embeddings().weight
        embeds = eager_ift.ift_inputs_embeds(weight, input_ids, predicted, labels, lam=trainer.lam)
        logits = eager_model(inputs_embeds=embeds, attention_mask=mask).logits
        loss = eager_ift.ift_loss_from_logits(logits[:, :-1], labels[:, 1:], gamma=trainer.gamma)
        loss.backward()
        return loss.detach(), eager_model

    return fused, eager


def _dpo_steps(trainer, batch):
    """(fused, eager) callables that run one DPO step's forward + backward (reference included)."""
    import fastalign
    from fastalign.integrations import unpatch_causal_lm
    from fastalign.integrations.causal_lm import IGNORE_INDEX
    from fastalign.reference import dpo as eager_dpo
    from fastalign.reference import logprobs as eager_logprobs

    policy, reference = trainer.model, trainer.ref_model
    eager_policy = unpatch_causal_lm(copy.deepcopy(policy))
    eager_reference = unpatch_causal_lm(copy.deepcopy(reference))
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = input_ids.masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    lengths = batch["completion_mask"].sum(1).chunk(2)

    def fused():
        policy.zero_grad(set_to_none=True)
        logps = policy(input_ids=input_ids, attention_mask=mask, labels=labels).logprobs.sum(-1)
        with torch.no_grad():
            ref = reference(input_ids=input_ids, attention_mask=mask, labels=labels).logprobs.sum(-1)
        loss, _ = fastalign.dpo_loss(
            *logps.chunk(2), *ref.chunk(2), beta=DPO_BETA, chosen_lengths=lengths[0], rejected_lengths=lengths[1]
        )
        loss.backward()
        return loss.detach(), policy

    def eager():
        eager_policy.zero_grad(set_to_none=True)
        logits = eager_policy(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        with torch.no_grad():
            ref_logits = eager_reference(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
            ref = eager_logprobs.token_logprobs(ref_logits, labels[:, 1:]).sum(-1)
        loss, _ = eager_dpo.dpo_loss_from_logits(logits, labels[:, 1:], *ref.chunk(2), beta=DPO_BETA)
        loss.backward()
        return loss.detach(), eager_policy

    return fused, eager


def _difference(fused, eager) -> float:
    """The largest relative difference (by norm) between the fused step's loss and every weight's gradient and the
    eager step's: the timed steps compute the same thing."""
    (fused_loss, fused_model), (eager_loss, eager_model) = fused(), eager()
    pairs = [(fused_loss, eager_loss)]
    for a, b in zip(fused_model.parameters(), eager_model.parameters(), strict=True):
        if b.grad is not None:
            pairs.append((a.grad, b.grad))
    return max(((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item() for a, b in pairs)


def _compare(steps: dict, cuda: bool) -> list[dict]:
    from fastalign.bench import peak_extra_bytes, time_ms

    rows = []
    for name, (fused, eager) in steps.items():
        difference = _difference(fused, eager)
        for impl, fn in (("fused", fused), ("eager", eager)):
            ms = time_ms(fn, cuda)
            peak = peak_extra_bytes(fn, cuda)
            rows.append({"step": name, "impl": impl, "ms": ms, "peak_mb": peak / 2**20 if peak >= 0 else None})
        rows[-2]["difference"] = difference
    return rows


# ---------------------------------------------------------------------------------- report


def _print_summary(size_name, size, device, held_out, comparison, ift_history, dpo_history, seconds, tolerance) -> None:
    print(
        f"\nfastalign demo ({size_name}): Llama, hidden {size.hidden_size}, {size.num_layers} layers, "
        f"vocab {size.vocab_size}, on {device}; {seconds:.0f} s"
    )
    print(f"IFT loss {ift_history[0]['loss']:.3f} -> {ift_history[-1]['loss']:.3f} over {len(ift_history)} steps")
    print(f"DPO loss {dpo_history[0]['loss']:.3f} -> {dpo_history[-1]['loss']:.3f} over {len(dpo_history)} steps")
    print(f"\nheld-out pairs ({EVAL_PAIRS}), rewards against the SFT reference with beta {DPO_BETA}:")
    print(f"{'model':<10}{'prefers right answer':>22}{'reward margin':>15}{'reward accuracy':>17}")
    for name, row in held_out.items():
        right, margin, accuracy = row["prefers right answer"], row["reward margin"], row["reward accuracy"]
        rewards = f"{'(the reference)':>32}" if margin is None else f"{margin:>15.3f}{accuracy:>17.2f}"
        print(f"{name:<10}{right:>22.2f}{rewards}")
    print("\none training step, forward + backward (DPO: policy and reference):")
    print(f"{'step':<6}{'impl':<7}{'ms':>10}{'peak extra MB':>15}{'vs eager':>10}{'differs from eager by':>23}")
    eager_ms = {r["step"]: r["ms"] for r in comparison if r["impl"] == "eager"}
    for r in comparison:
        mem = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        difference = f"{r['difference']:.1e}" if "difference" in r else ""
        print(f"{r['step']:<6}{r['impl']:<7}{r['ms']:>10.2f}{mem:>15}{eager_ms[r['step']] / r['ms']:>9.2f}x"
              f"{difference:>23}")  # fmt: skip
    print(f"(differs: the largest relative difference of the loss and of any weight's gradient; at most {tolerance})")
    if device.type != "cuda":
        print("(on a CPU, fused is fastalign's chunked torch fallback, built to bound memory; the kernels need a GPU)")


def _running_mean(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        recent = values[max(0, i - window + 1) : i + 1]
        out.append(sum(recent) / len(recent))
    return out


def _plot(path: str, ift_history, dpo_history, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [
        (ift_history, "loss", "IFT loss"),
        (dpo_history, "loss", "DPO loss"),
        (dpo_history, "rewards/margins", "DPO reward margin"),
        (dpo_history, "rewards/accuracies", "DPO reward accuracy"),
    ]
    for ax, (history, key, label) in zip(axes, panels):
        steps, values = [h["step"] for h in history], [h[key] for h in history]
        window = max(1, len(values) // 12)  # per-step values are noisy at this batch size: add a running mean
        ax.plot(steps, values, lw=0.8, alpha=0.35, color="C0", label="per step")
        ax.plot(steps, _running_mean(values, window), lw=1.8, color="C0", label=f"mean of {window}")
        ax.legend(fontsize=7)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(plot_path: str = "fastalign-demo.png", size: str | None = None) -> int:
    """Runs the demo; returns 0 when each stage lowered its loss, else 1. `size` is "small" or "large" (default: large
    on a GPU)."""
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        # The CPU size's matmuls are too small to gain from intra-op threads, and on a busy machine
        # OpenMP's spinning threads slow them down 40-fold (measured on 2 cores).
        torch.set_num_threads(1)
    try:
        return _run(plot_path, size)
    finally:
        torch.set_num_threads(threads)


def _run(plot_path: str, size: str | None) -> int:
    start = time.perf_counter()
    _quiet_hf()
    from datasets import Dataset
    from transformers import TrainingArguments
    from trl import DPOConfig

    from fastalign.integrations import DPOTrainer, IFTTrainer
    from fastalign.integrations.tiny import build_tokenizer, load_preferences, tiny_llama

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size_name = size or ("large" if cuda else "small")
    cfg = SIZES[size_name]
    rows = load_preferences()
    train_rows, eval_rows = rows[:-EVAL_PAIRS], rows[-EVAL_PAIRS:]
    tok = build_tokenizer(rows)
    base = tiny_llama(tok, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, vocab_size=cfg.vocab_size)
    base = base.to(device)

    with tempfile.TemporaryDirectory() as out_dir:
        sft = copy.deepcopy(base)
        ift = IFTTrainer(
            model=sft,
            args=_training_args(TrainingArguments, cfg, cfg.ift_steps, cfg.ift_lr, out_dir),
            train_dataset=[{"prompt": r["prompt"], "completion": r["chosen"]} for r in train_rows],
            processing_class=tok,
        )
        ift_history = _train(ift, "IFT from the base", ("loss", "mean_token_accuracy"))

        dpo = DPOTrainer(
            model=copy.deepcopy(sft),
            ref_model=sft,
            args=_training_args(DPOConfig, cfg, cfg.dpo_steps, cfg.dpo_lr, out_dir, beta=DPO_BETA),
            train_dataset=Dataset.from_list(train_rows),
            processing_class=tok,
            online_merge={"base": base, **ONDARE},
        )
        dpo_history = _train(dpo, "DPO + OnDARE", ("loss", "rewards/margins", "rewards/accuracies"))

        models = {"base": base, "IFT": sft, "IFT+DPO": dpo.model}
        held_out = _held_out(models, sft, tok, eval_rows, device)

        print("timing one step of each, fused and eager ...")
        ift_batch = ift._prepare_inputs(ift.data_collator([ift.train_dataset[i] for i in range(cfg.batch_size)]))
        dpo_batch = dpo._prepare_inputs(dpo.data_collator([dpo.train_dataset[i] for i in range(cfg.batch_size)]))
        comparison = _compare({"IFT": _ift_steps(ift, ift_batch), "DPO": _dpo_steps(dpo, dpo_batch)}, cuda)

    seconds = time.perf_counter() - start
    tolerance = AGREEMENT[cfg.bf16]
    _print_summary(size_name, cfg, device, held_out, comparison, ift_history, dpo_history, seconds, tolerance)
    title = f"fastalign demo ({size_name}): IFT, then DPO + OnDARE, tiny Llama on {device}"
    _plot(plot_path, ift_history, dpo_history, title)
    print(f"wrote {plot_path}")
    # What the demo claims: each training stage lowered its loss, and the fused steps compute what the eager ones do.
    stalled = [name for name, h in (("IFT", ift_history), ("DPO", dpo_history)) if h[-1]["loss"] >= h[0]["loss"]]
    if stalled:
        print(f"demo: the {' and '.join(stalled)} loss did not fall")
    differing = [r["step"] for r in comparison if r.get("difference", 0.0) > tolerance]
    if differing:
        print(f"demo: the fused {' and '.join(differing)} step differs from the eager one by more than {tolerance}")
    return 1 if stalled or differing else 0
