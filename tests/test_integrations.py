"""fastalign.integrations end to end on tiny models: the transformers patch, IFTTrainer, TRL's DPO and
KTO trainers, PEFT references. Each integration: at step 0 the loss equals the eager path's (the model's
own forward, or TRL's own trainer), a short run lowers the loss, and the expected metrics are logged.

The step-0 checks run the Triton kernels (interpreted on the CPU); the training runs use the torch path.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

from utils import rel_err, training_args  # noqa: E402

from fastalign._backend import forced_backend  # noqa: E402
from fastalign.integrations import (  # noqa: E402
    DPOTrainer,
    IFTTrainer,
    KTOTrainer,
    patch_causal_lm,
    reference_adapter,
    unpatch_causal_lm,
)
from fastalign.integrations.tiny import build_tokenizer, load_preferences, tiny_llama  # noqa: E402
from fastalign.reference import ift as eager_ift  # noqa: E402
from fastalign.reference import logprobs as eager_logprobs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
datasets.disable_progress_bars()

HIDDEN = 32
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
DPO_METRICS = {
    "loss",
    "entropy",
    "num_tokens",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
}
KTO_METRICS = DPO_METRICS - {"mean_token_accuracy", "rewards/accuracies"} | {"kl"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and OpenMP's spinning on a busy CPU slows them tens of times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rows():
    return load_preferences()


@pytest.fixture(scope="module")
def tok(rows):
    return build_tokenizer(rows)


def encode(tok, rows, key="chosen"):
    """input_ids, attention_mask and labels (-100 on prompt and padding) for prompt + rows[key]."""
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    enc = tok([r["prompt"] + r[key] + tok.eos_token for r in rows], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for i, p in enumerate(prompts):
        labels[i, : len(p)] = -100
    return dict(enc), labels


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def own_loss_and_grads(model, enc, labels):
    """The model's own forward and backward (before patching); leaves the gradients cleared."""
    own = model(**enc, labels=labels)
    own.loss.backward()
    expected = grads(model)
    model.zero_grad()
    return own, expected


def assert_same_grads(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert rel_err(actual[name], expected[name]) < GRAD_RTOL, name


def perturbed(model, scale=0.02):
    """A copy of `model` with noise on every weight: a policy that differs from its reference."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return out


# ------------------------------------------------------------------------------------- transformers


def small_config(arch: str, vocab: int):
    common = dict(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    if arch == "gemma2-softcap":
        return transformers.Gemma2Config(**common, head_dim=16, final_logit_softcapping=3.0)
    if arch == "cohere-logit-scale":
        return transformers.CohereConfig(**common, logit_scale=0.5)
    if arch == "granite-logits-scaling":
        return transformers.GraniteConfig(**common, logits_scaling=4.0)
    if arch == "mixtral-router-aux-loss":
        return transformers.MixtralConfig(
            **common, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1
        )
    if arch == "jetmoe-aux-loss-coef":  # its coefficient is `aux_loss_coef`
        return transformers.JetMoeConfig(
            vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
            num_key_value_heads=1, kv_channels=16, num_local_experts=4, num_experts_per_tok=2,
            output_router_logits=True, aux_loss_coef=0.5,
        )  # fmt: skip
    if arch == "recurrent-gemma-softcap":  # its softcap is `logits_soft_cap`
        return transformers.RecurrentGemmaConfig(
            **common, lru_width=HIDDEN, attention_window_size=16, logits_soft_cap=1.0, use_cache=False
        )
    raise ValueError(arch)


@pytest.mark.parametrize(
    "arch, on_kernels",
    [
        pytest.param("llama", True, id="llama-kernels"),
        pytest.param("llama", False, id="llama-torch"),
        pytest.param("gemma2-softcap", True, id="gemma2-softcap-kernels"),
        pytest.param("cohere-logit-scale", False, id="cohere-logit-scale"),
        pytest.param("granite-logits-scaling", False, id="granite-logits-scaling"),
        pytest.param("mixtral-router-aux-loss", False, id="mixtral-router-aux-loss"),
        pytest.param("jetmoe-aux-loss-coef", False, id="jetmoe-aux-loss-coef"),
        pytest.param("recurrent-gemma-softcap", False, id="recurrent-gemma-softcap"),
    ],
)
def test_patched_forward_matches_the_models_own(arch, on_kernels, tok, rows):
    """Loss, per-token values and every gradient equal the model's own forward on its logits."""
    torch.manual_seed(0)
    if arch == "llama":
        model = tiny_llama(tok, hidden_size=HIDDEN)
    else:
        model = transformers.AutoModelForCausalLM.from_config(small_config(arch, len(tok)))
    model.eval()  # Mixtral's router jitter and dropout would differ between the two runs
    enc, labels = encode(tok, rows[:3])
    own, expected = own_loss_and_grads(model, enc, labels)
    patch_causal_lm(model)
    with contextlib.nullcontext() if on_kernels else forced_backend("torch"):
        extras = {f"return_{x}": True for x in ("entropy", "argmax", "mean_logits", "log_sum_sq_probs")}
        out = model(**enc, labels=labels, **extras)
        out.loss.backward()
    shifted = labels[:, 1:]
    logits = own.logits[:, :-1].detach().double()
    assert rel_err(out.loss, own.loss) < LOSS_RTOL
    assert rel_err(out.logprobs, eager_logprobs.token_logprobs(logits, shifted)) < LOSS_RTOL
    mask = shifted != -100
    assert rel_err(out.entropy[mask], eager_logprobs.token_entropy(logits)[mask]) < LOSS_RTOL
    assert torch.equal(out.argmax[mask], logits.argmax(-1)[mask])
    assert torch.equal(out.label_mask, mask)
    assert (out.entropy[~mask] == 0).all() and (out.argmax[~mask] == -100).all() and (out.logprobs[~mask] == 0).all()
    assert rel_err(out.mean_logits[mask], logits.mean(-1)[mask]) < LOSS_RTOL
    log_sum_sq = torch.logsumexp(2 * logits.log_softmax(-1), -1)
    assert rel_err(out.log_sum_sq_probs[mask], log_sum_sq[mask]) < LOSS_RTOL
    assert (out.mean_logits[~mask] == 0).all() and (out.log_sum_sq_probs[~mask] == 0).all()
    assert_same_grads(grads(model), expected)


def test_heads_the_fused_head_cannot_compute_are_refused(tok, rows):
    """A prediction head between the backbone and the output embedding (RoBERTa's dense + norm), a hidden-state
    multiplier (Inkling), or a load-balancing loss that is not Mixtral's (Doge): refused, never a wrong loss."""
    small = dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2)
    roberta = transformers.RobertaForCausalLM(
        transformers.RobertaConfig(**small, num_attention_heads=2, is_decoder=True, pad_token_id=0)
    )
    with pytest.raises(TypeError, match="RobertaForCausalLM computes them through lm_head too"):
        patch_causal_lm(roberta)
    inkling = transformers.InklingForCausalLM(
        transformers.InklingTextConfig(
            **small, num_attention_heads=2, num_key_value_heads=1, logits_mup_width_multiplier=4.0
        )
    )
    with pytest.raises(TypeError, match="logits_mup_width_multiplier"):
        patch_causal_lm(inkling)
    doge = transformers.AutoModelForCausalLM.from_config(
        transformers.DogeConfig(
            **small,
            num_attention_heads=2,
            num_key_value_heads=2,
            is_moe=True,
            num_experts=16,
            num_experts_per_tok=4,
            output_router_logits=True,
            router_aux_loss_coef=0.1,
        )  # fmt: skip
    )
    patch_causal_lm(doge)
    enc, labels = encode(tok, rows[:2])
    with forced_backend("torch"), pytest.raises(NotImplementedError, match="DogeForCausalLM's load-balancing loss"):
        doge(**enc, labels=labels)


def test_return_dict_false_gives_a_tuple_with_the_loss_first(tok, rows):
    model = tiny_llama(tok, hidden_size=HIDDEN)
    enc, labels = encode(tok, rows[:2])
    own = model(**enc, labels=labels, return_dict=False)
    patch_causal_lm(model)
    with forced_backend("torch"):
        out = model(**enc, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and rel_err(out[0], own[0]) < LOSS_RTOL


def test_shift_labels_and_num_items_in_batch(tok, rows):
    model = patch_causal_lm(tiny_llama(tok, hidden_size=HIDDEN))
    enc, labels = encode(tok, rows[:2])
    with forced_backend("torch"):
        shifted = model(**enc, labels=labels)
        pre = model(**enc, shift_labels=torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1))
        summed = model(**enc, labels=labels, num_items_in_batch=7)
    assert torch.equal(pre.logprobs[:, :-1], shifted.logprobs)
    assert torch.allclose(summed.loss, -shifted.logprobs.sum() / 7)


def test_zero_num_items_in_batch_is_a_zero_loss_not_inf(tok, rows):
    """No token counts anywhere (num_items_in_batch 0, as an int or HF's tensor): the loss is 0, fastalign's mean of
    nothing (inf or NaN before); a fraction (a rank's share under FSDP) is divided by as it is."""
    model = patch_causal_lm(tiny_llama(tok, hidden_size=HIDDEN))
    enc, labels = encode(tok, rows[:2])
    with forced_backend("torch"):
        for n in (0, torch.tensor(0)):
            assert model(**enc, labels=torch.full_like(labels, -100), num_items_in_batch=n).loss == 0
        summed = -model(**enc, labels=labels).logprobs.sum()
        torch.testing.assert_close(model(**enc, labels=labels, num_items_in_batch=torch.tensor(0.5)).loss, summed * 2)


BAD_FORWARD_ARGS = [
    ({"num_items_in_batch": -3}, ValueError, "num_items_in_batch must be finite and >= 0; got -3"),
    ({"num_items_in_batch": float("nan")}, ValueError, "num_items_in_batch must be finite and >= 0; got nan"),
    ({"num_items_in_batch": "x"}, TypeError, "num_items_in_batch must be a number or a one-element real tensor"),
    ({"num_items_in_batch": True}, TypeError, "num_items_in_batch must be a number .*; got bool"),
    ({"num_items_in_batch": torch.tensor([1, 2])}, TypeError, r"num_items_in_batch must be .* shape \(2,\)"),
    ({"num_items_in_batch": torch.tensor(-1.0)}, ValueError, "num_items_in_batch must be finite and >= 0; got -1"),
    ({"labels": "T + 1"}, ValueError, r"labels must have the shape \[B, T\] of input_ids, \(2, \d+\); got \(2, \d+\)"),
    ({"labels": "1-D"}, ValueError, r"labels must have the shape \[B, T\] of input_ids"),  # IndexError before
    ({"fused_strategy": "bogus"}, ValueError, r"strategy must be one of \['auto', 'fast', 'lean'\]; got 'bogus'"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_FORWARD_ARGS)
def test_patched_forward_refuses_bad_arguments_naming_them(kwargs, error, message, tok, rows):
    model = patch_causal_lm(tiny_llama(tok, hidden_size=HIDDEN))
    enc, labels = encode(tok, rows[:2])
    kwargs = {"labels": labels, **kwargs}
    kwargs["labels"] = {"T + 1": torch.cat([labels, labels[:, :1]], 1), "1-D": labels[0]}.get(kwargs["labels"], labels)
    with forced_backend("torch"), pytest.raises(error, match=message):
        model(**enc, **kwargs)


@pytest.mark.parametrize("option", ["temperature", "logit_scale", "softcap"])
def test_patch_refuses_bad_logit_options_naming_them(option, tok):
    model = tiny_llama(tok, hidden_size=HIDDEN)
    with pytest.raises(TypeError, match=f"{option} must be a finite number > 0; got str 'x'"):
        patch_causal_lm(model, **{option: "x"})
    with pytest.raises(ValueError, match=f"{option} must be a finite number > 0; got -1"):
        patch_causal_lm(model, **{option: -1})
    assert "forward" not in model.__dict__  # refused before patching anything


def test_generation_and_plain_forward_unchanged(tok, rows):
    model = tiny_llama(tok, hidden_size=HIDDEN).eval()
    enc, _ = encode(tok, rows[:2])
    prompt = enc["input_ids"][:1, :6]
    before = model.generate(prompt, max_new_tokens=6, do_sample=False)
    logits = model(**enc).logits
    patch_causal_lm(model)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), before)
    assert torch.equal(model(**enc).logits, logits)
    with pytest.raises(ValueError, match="return_log_sum_sq_probs need labels"):
        model(**enc, return_entropy=True)
    unpatch_causal_lm(model)
    assert "forward" not in model.__dict__ and torch.equal(model(**enc).logits, logits)


def test_peft_model_is_patched_through_the_wrapper(tok, rows):
    base = tiny_llama(tok, hidden_size=HIDDEN)
    plain = copy.deepcopy(base)  # get_peft_model injects the adapters into `base` itself
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    enc, labels = encode(tok, rows[:2])
    own, expected = own_loss_and_grads(model, enc, labels)
    patch_causal_lm(model)
    with forced_backend("torch"):
        out = model(**enc, labels=labels)
        out.loss.backward()
        assert rel_err(out.loss, own.loss) < LOSS_RTOL
        assert_same_grads(grads(model), expected)
        with reference_adapter(model):  # adapters disabled: the base model
            assert rel_err(model(**enc, labels=labels).loss, plain(**enc, labels=labels).loss) < LOSS_RTOL

    head = peft.get_peft_model(tiny_llama(tok, hidden_size=HIDDEN), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    patch_causal_lm(head)
    with pytest.raises(ValueError, match="lm_head carries a PEFT adapter"):
        head(**enc, labels=labels)


def test_imports_stay_optional():
    """fastalign imports none of transformers/TRL/PEFT; the transformers integrations import no TRL."""
    core = "import sys, fastalign; assert not {'transformers', 'trl', 'peft'} & set(sys.modules)"
    hf = "import sys; from fastalign.integrations import IFTTrainer, patch_causal_lm; assert 'trl' not in sys.modules"
    for src in (core, hf):
        result = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]


def test_a_checkouts_root_on_sys_path_hides_no_hub_kernels_from_transformers():
    """`python -m`/`-c` in a checkout puts its root on sys.path, where kernels/ would shadow Hugging Face's `kernels`
    (a transformers dependency since 5.25) and break `import transformers`; fastalign.kernels stays ours."""
    hub = pytest.importorskip("kernels")  # pytest's sys.path has no checkout root: this is the installed one
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.dirname(os.path.abspath(hub.__file__)) != os.path.join(checkout, "kernels"), hub.__file__
    both_orders = (
        "import kernels, fastalign.kernels as ours",
        "import fastalign.kernels as ours, kernels",
    )
    for imports in both_orders:
        src = (
            f"{imports}; import transformers.integrations.hub_kernels; import sys; "
            f"assert kernels.__file__ == {hub.__file__!r}, kernels.__file__; "
            "assert ours.INTERPRET in (True, False) and hasattr(ours, 'LaunchCase'), ours; "
            "assert sys.modules['kernels'] is kernels"
        )
        result = subprocess.run([sys.executable, "-c", src], cwd=checkout, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, (imports, result.stderr[-2000:])


# ------------------------------------------------------------------------------------- trainers


def first_batch(trainer, n=4):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(n)]))


def loss_on(trainer, batch) -> float:
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def logged(trainer) -> set[str]:
    return set().union(*(h.keys() for h in trainer.state.log_history if "loss" in h))


def assert_same_metrics(ours, stock):
    """The trainers' logged metrics, train and eval, have the same names and values."""
    for mode in ("train", "eval"):
        assert ours._metrics[mode].keys() == stock._metrics[mode].keys()
        for key, values in stock._metrics[mode].items():
            assert ours._metrics[mode][key] == pytest.approx(values, rel=1e-4, abs=1e-5), key
    assert ours._metrics["train"] or ours._metrics["eval"]


# IFT ------------------------------------------------------------------------------------------


def eager_ift_loss(model, batch, lam, gamma):
    """The two-pass IFT step on the logits of `model` (unpatched) with the eager references."""
    input_ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    with torch.no_grad():
        predicted = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].argmax(-1)
    embeds = eager_ift.ift_inputs_embeds(model.get_input_embeddings().weight, input_ids, predicted, labels, lam=lam)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    return eager_ift.ift_loss_from_logits(logits[:, :-1].double(), labels[:, 1:], gamma=gamma)


def ift_trainer(tok, rows, tmp_path, model=None, **kwargs):
    data = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows[:48]]
    return IFTTrainer(
        model=model or tiny_llama(tok, hidden_size=HIDDEN),
        args=training_args(transformers.TrainingArguments, tmp_path, steps=kwargs.pop("steps", 8)),
        train_dataset=data,
        processing_class=tok,
        **kwargs,
    )


@pytest.mark.parametrize("strategy", ["fast", "lean"])
def test_ift_step_zero_equals_eager_with_its_gradients(strategy, tok, rows, tmp_path):
    model = perturbed(tiny_llama(tok, hidden_size=HIDDEN), 0.5)
    trainer = ift_trainer(tok, rows, tmp_path, model=model, strategy=strategy)
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    eager = unpatch_causal_lm(copy.deepcopy(trainer.model)).double()
    eager.zero_grad()
    loss64 = eager_ift_loss(eager, batch, trainer.lam, trainer.gamma)
    loss64.backward()
    assert rel_err(loss, loss64) < LOSS_RTOL
    eager_params = dict(eager.named_parameters())
    for name, p in trainer.model.named_parameters():
        assert rel_err(p.grad, eager_params[name].grad) < GRAD_RTOL, name
    assert trainer.lam == 0.2 and trainer.gamma == 0.95


def test_ift_with_no_residual_and_no_discount_is_sft(tok, rows, tmp_path):
    trainer = ift_trainer(tok, rows, tmp_path, lam=0.0, gamma=0.0)
    batch = first_batch(trainer)
    with forced_backend("torch"):
        loss = trainer.compute_loss(trainer.model, batch)
    model = unpatch_causal_lm(copy.deepcopy(trainer.model))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = eager_logprobs.token_logprobs(logits.double(), batch["labels"][:, 1:])
    mask = batch["labels"][:, 1:] != -100
    per_sequence = -(logps.sum(1) / mask.sum(1))
    assert rel_err(loss, per_sequence.mean()) < LOSS_RTOL


def test_ift_training_lowers_the_loss(tok, rows, tmp_path):
    trainer = ift_trainer(tok, rows, tmp_path, steps=12)
    batch = first_batch(trainer)
    with forced_backend("torch"):
        before = loss_on(trainer, batch)
        trainer.train()
        after = loss_on(trainer, batch)
    assert after < 0.8 * before
    assert {"loss", "nll", "mean_token_accuracy", "grad_norm"} <= logged(trainer)


# DPO ------------------------------------------------------------------------------------------


def dpo_trainer(cls, tok, rows, tmp_path, policy, reference=None, steps=8, **kwargs):
    config_keys = {"beta", "loss_type", "loss_weights", "label_smoothing", "ld_alpha", "precompute_ref_log_probs", "lr"}
    config = {k: kwargs.pop(k) for k in list(kwargs) if k in config_keys}
    return cls(
        model=policy,
        ref_model=reference,
        args=training_args(trl.DPOConfig, tmp_path, steps=steps, **config),
        train_dataset=datasets.Dataset.from_list(rows[:32]),
        processing_class=tok,
        **kwargs,
    )


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({"loss_type": ["ipo"]}, id="ipo"),
        pytest.param({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}, id="sigmoid+sft"),
        pytest.param({"loss_type": ["robust"], "label_smoothing": 0.1}, id="robust"),
        pytest.param({"precompute_ref_log_probs": True}, id="precomputed-reference"),
    ],
)
def test_dpo_options_equal_trl(config, tok, rows, tmp_path):
    reference = tiny_llama(tok, hidden_size=HIDDEN)
    policy = perturbed(reference)
    with forced_backend("torch"):
        ours = dpo_trainer(
            DPOTrainer, tok, rows, tmp_path / "a", copy.deepcopy(policy), copy.deepcopy(reference), **config
        )
        stock = dpo_trainer(
            trl.DPOTrainer, tok, rows, tmp_path / "b", copy.deepcopy(policy), copy.deepcopy(reference), **config
        )
        batch = first_batch(ours)
        assert rel_err(ours.compute_loss(ours.model, batch), stock.compute_loss(stock.model, batch)) < LOSS_RTOL


def test_dpo_bad_options_raise(tok, rows, tmp_path):
    model = tiny_llama(tok, hidden_size=HIDDEN)
    with pytest.raises(ValueError, match=r"ld_alpha must be None or a number in \[0, 1\]"):
        dpo_trainer(DPOTrainer, tok, rows, tmp_path, model, copy.deepcopy(model), ld_alpha=1.5)
    with pytest.raises(ValueError, match="ref_adapter_name names the PEFT adapter .* no ref_model"):
        dpo_trainer(DPOTrainer, tok, rows, tmp_path, model, copy.deepcopy(model), ref_adapter_name="ref")


def test_dpo_online_merge_applies_tau(tok, rows, tmp_path):
    """With lr = 0 the update is alpha * tau alone: after k steps the policy moved by k * alpha * tau,
    tau = reference - base, so the optimizer got tau for the right parameters."""
    from fastalign.optim import OnlineMergeAdamW

    base = tiny_llama(tok, hidden_size=HIDDEN, seed=1)
    sft = tiny_llama(tok, hidden_size=HIDDEN, seed=2)
    alpha, steps = 0.1, 2
    merge = {"base": base, "method": "ondare", "reserve_p": 1.0, "alpha": alpha, "clip": 100.0}
    trainer = dpo_trainer(
        DPOTrainer, tok, rows, tmp_path, copy.deepcopy(sft), sft, steps=steps, lr=0.0, online_merge=merge
    )
    with forced_backend("torch"):
        trainer.train()
    assert isinstance(trainer.optimizer.optimizer, OnlineMergeAdamW)  # inside accelerate's wrapper
    base_params = dict(base.named_parameters())
    for name, p in trainer.model.named_parameters():
        start = sft.get_parameter(name)
        tau = (start - base_params[name]).to(torch.bfloat16).float()
        assert rel_err(p.detach() - start.detach(), steps * alpha * tau) < 1e-2, name


# KTO ------------------------------------------------------------------------------------------


def kto_trainer(cls, tok, rows, tmp_path, policy, reference, steps=8, **config):
    kwargs = {k: config.pop(k) for k in ("strategy",) if k in config}  # the trainer's, not the config's
    data = []
    for r in rows[:16]:
        data += [{"prompt": r["prompt"], "completion": r["chosen"], "label": True}]
        data += [{"prompt": r["prompt"], "completion": r["rejected"], "label": False}]
    return cls(
        model=policy,
        ref_model=reference,
        args=training_args(trl.KTOConfig, tmp_path, steps=steps, **config),
        train_dataset=datasets.Dataset.from_list(data),
        processing_class=tok,
        **kwargs,
    )


PREFERENCE = {  # trainer factory, fastalign's trainer, TRL's, the metrics TRL logs, the least loss drop
    "dpo": (dpo_trainer, DPOTrainer, trl.DPOTrainer, DPO_METRICS, 0.05),
    "kto": (kto_trainer, KTOTrainer, trl.KTOTrainer, KTO_METRICS, 0.02),
}


@pytest.mark.parametrize("kind", PREFERENCE)
def test_step_zero_equals_trl(kind, tok, rows, tmp_path):
    """Loss and every metric equal stock TRL's trainer's on the same batch, on the kernels."""
    make, ours_cls, stock_cls, _, _ = PREFERENCE[kind]
    reference = tiny_llama(tok, hidden_size=HIDDEN)
    policy = perturbed(reference)
    ours = make(ours_cls, tok, rows, tmp_path, copy.deepcopy(policy), copy.deepcopy(reference))
    stock = make(stock_cls, tok, rows, tmp_path, copy.deepcopy(policy), copy.deepcopy(reference))
    batch = first_batch(ours)
    loss, stock_loss = ours.compute_loss(ours.model, batch), stock.compute_loss(stock.model, batch)
    assert rel_err(loss, stock_loss) < LOSS_RTOL
    assert_same_metrics(ours, stock)


class HeadMatmulFlops(TorchDispatchMode):
    """FLOPs of the torch matrix products with a dimension of `vocab` (the lm_head's; the backbone has none)."""

    _OPERANDS = {"mm": (0, 1), "addmm": (1, 2), "addmm_": (1, 2)}

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.flops = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operands = self._OPERANDS.get(func.overloadpacket.__name__)
        if operands is not None:
            a, b = (args[i] for i in operands)
            if self.vocab in (*a.shape, *b.shape):
                self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("strategy", ["fast", "lean"])
@pytest.mark.parametrize("kind", PREFERENCE)
def test_step_zero_gradients_equal_trl_and_fast_takes_6_nhv(kind, strategy, tok, rows, tmp_path):
    """The trainers' loss is computed inside the policy's head on either strategy: the gradient of every weight
    equals stock TRL's, and fast's head takes 6 N H V matmul FLOPs (N the scored tokens) besides the reference's."""
    make, ours_cls, stock_cls, _, _ = PREFERENCE[kind]
    reference = tiny_llama(tok, hidden_size=HIDDEN)
    policy = perturbed(reference)
    with forced_backend("torch"):
        ours = make(ours_cls, tok, rows, tmp_path, copy.deepcopy(policy), copy.deepcopy(reference), strategy=strategy)
        stock = make(stock_cls, tok, rows, tmp_path, copy.deepcopy(policy), copy.deepcopy(reference))
        batch = first_batch(ours)
        counter = HeadMatmulFlops(len(tok))
        with counter:
            loss = ours.compute_loss(ours.model, batch)
            loss.backward()
        stock.compute_loss(stock.model, batch).backward()
        with torch.inference_mode():  # an evaluation loop's: the same loss, no autograd anywhere
            evaluated = ours.compute_loss(ours.model, batch)
    assert rel_err(loss, stock.compute_loss(stock.model, batch)) < LOSS_RTOL
    assert rel_err(evaluated, loss.detach()) < 1e-6
    stock_grads = dict(stock.model.named_parameters())
    for name, p in ours.model.named_parameters():
        assert rel_err(p.grad, stock_grads[name].grad) < GRAD_RTOL, name
    if strategy == "fast":
        H, V = HIDDEN, len(tok)
        scored = int(batch["completion_mask"][:, 1:].sum())
        kl_scored = int(batch["KL_completion_mask"][:, 1:].sum()) if kind == "kto" else 0
        # Besides, under no_grad on the scored tokens alone: the reference's forward, 2 N H V, and KTO's KL pass
        # of the policy and of the reference, 2 N_KL H V each.
        assert counter.flops == (6 * scored + 2 * scored + 4 * kl_scored) * H * V


@pytest.mark.parametrize("kind", PREFERENCE)
def test_precomputed_reference_equal_to_the_policy_gives_zero_rewards(kind, tok, rows, tmp_path):
    """Policy = reference with precompute_ref_log_probs: every reward metric is exactly 0, as TRL logs (the
    references were read back in float32 while the policy's sums are float64: margins of rounding noise)."""
    make, ours_cls, *_ = PREFERENCE[kind]
    model = tiny_llama(tok, hidden_size=HIDDEN)
    with forced_backend("torch"):  # the precompute (in __init__) and the step on the same path
        trainer = make(ours_cls, tok, rows, tmp_path, copy.deepcopy(model), model, steps=1, lr=0.0,
                       precompute_ref_log_probs=True)  # fmt: skip
        trainer.train()
    rewards = {k: v for k, v in trainer.state.log_history[0].items() if k.startswith("rewards/")}
    assert len(rewards) >= 3 and all(v == 0 for v in rewards.values()), rewards


@pytest.mark.parametrize("kind", PREFERENCE)
def test_training_lowers_the_loss_and_logs_trls_metrics(kind, tok, rows, tmp_path):
    make, ours_cls, _, metrics, least_drop = PREFERENCE[kind]
    reference = tiny_llama(tok, hidden_size=HIDDEN)
    trainer = make(ours_cls, tok, rows, tmp_path, copy.deepcopy(reference), reference, beta=0.5)
    batch = first_batch(trainer)
    with forced_backend("torch"):
        before = loss_on(trainer, batch)
        trainer.train()
        after = loss_on(trainer, batch)
    assert after < before - least_drop
    assert metrics <= logged(trainer)


# PEFT -----------------------------------------------------------------------------------------


def test_dpo_lora_reference_is_the_disabled_adapter(tok, rows, tmp_path):
    """A new LoRA adapter trains; the reference is the base with adapters disabled, never a copy."""
    base = tiny_llama(tok, hidden_size=HIDDEN)
    lora = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])
    kwargs = {"peft_config": lora, "beta": 0.5, "steps": 10}
    ours = dpo_trainer(DPOTrainer, tok, rows, tmp_path / "a", copy.deepcopy(base), **kwargs)
    stock = dpo_trainer(trl.DPOTrainer, tok, rows, tmp_path / "b", copy.deepcopy(base), **kwargs)
    assert ours.ref_model is None and list(ours.model.peft_config) == ["default"]
    batch = first_batch(ours)
    assert rel_err(ours.compute_loss(ours.model, batch), stock.compute_loss(stock.model, batch)) < LOSS_RTOL
    frozen = {n: p.detach().clone() for n, p in ours.model.named_parameters() if not p.requires_grad}
    with forced_backend("torch"):
        before = loss_on(ours, batch)
        ours.train()
        after = loss_on(ours, batch)
    assert after < before - 0.01
    assert all(torch.equal(p, ours.model.get_parameter(n)) for n, p in frozen.items())
    assert DPO_METRICS <= logged(ours)


def test_dpo_reference_adapter_loaded_beside_the_trained_one(tok, rows, tmp_path):
    """The DPO users' pattern: the SFT adapter loaded twice, as "default" (trained) and "reference"."""
    base = tiny_llama(tok, hidden_size=HIDDEN)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(base), lora).save_pretrained(tmp_path / "sft")

    def load():
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "sft", is_trainable=True)
        model.load_adapter(tmp_path / "sft", adapter_name="reference")
        return model

    ours = dpo_trainer(DPOTrainer, tok, rows, tmp_path / "a", load(), ref_adapter_name="reference", beta=0.5)
    stock = dpo_trainer(trl.DPOTrainer, tok, rows, tmp_path / "b", load(), beta=0.5)  # TRL's own "ref" copy
    assert sorted(ours.model.peft_config) == ["default", "reference"]  # TRL's redundant "ref" copy is gone
    batch = first_batch(ours)
    with forced_backend("torch"):
        assert rel_err(ours.compute_loss(ours.model, batch), stock.compute_loss(stock.model, batch)) < LOSS_RTOL
        reference = {n: p.detach().clone() for n, p in ours.model.named_parameters() if ".reference." in n}
        ours.train()
    assert ours.model.active_adapter == "default"
    for name, value in reference.items():
        param = ours.model.get_parameter(name)
        assert torch.equal(param, value) and not param.requires_grad, name
    trained = [n for n, p in ours.model.named_parameters() if p.requires_grad]
    assert trained and all(".default." in n for n in trained)


# Demo -----------------------------------------------------------------------------------------


def test_demo_command_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """`fastalign demo` at a few steps: both phases train, the summary and the plot are written."""
    from fastalign import cli, demo

    few = demo.DemoSize(32, 1, 512, 4, ift_steps=4, dpo_steps=3, ift_lr=3e-3, dpo_lr=5e-4, bf16=False)
    monkeypatch.setitem(demo.SIZES, "small", few)
    plot = tmp_path / "demo.png"
    with forced_backend("torch"):
        assert cli.main(["demo", "--plot", str(plot), "--size", "small"]) == 0
    out = capsys.readouterr().out
    assert plot.stat().st_size > 10_000
    for text in ("IFT loss", "DPO loss", "prefers right answer", "IFT+DPO", "fused", "eager", "differs from eager by"):
        assert text in out, text


def test_demo_difference_sees_a_gradient_the_fused_step_got_wrong():
    """The demo exits 1 when its fused step and eager step differ: the measure sees one weight's gradient off."""
    from fastalign import demo

    models = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(5, 3)

    def step(model, scale=1.0):
        model.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        model.bias.grad *= scale
        return loss.detach(), model

    assert demo._difference(lambda: step(models[0]), lambda: step(models[1])) < 1e-12
    assert demo._difference(lambda: step(models[0], 1.01), lambda: step(models[1])) == pytest.approx(0.01, rel=1e-4)
