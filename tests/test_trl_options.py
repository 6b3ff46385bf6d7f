"""fastalign's DPOTrainer with TRL 1.16's DPOConfig loss options equals stock TRL's DPOTrainer on the same batch;
average_log_prob (Liger's option, not TRL's) equals fastalign.dpo_loss on per-token means; use_liger_kernel
applies Liger's layer kernels and keeps fastalign's head, as TRL 1.16 keeps its own."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from utils import rel_err  # noqa: E402

import fastalign  # noqa: E402
from fastalign._backend import forced_backend  # noqa: E402
from fastalign.integrations import DPOTrainer  # noqa: E402
from fastalign.integrations.causal_lm import is_patched, unpatch_causal_lm  # noqa: E402
from fastalign.integrations.tiny import build_tokenizer, load_preferences, tiny_llama  # noqa: E402
from fastalign.reference import logprobs as eager_logprobs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
datasets.disable_progress_bars()

HIDDEN = 32
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def rows():
    """Pairs whose completions differ in length, the longer one alternating: LD-DPO's verbose tail and the
    per-token means both matter on them."""
    rows = load_preferences()[:16]
    for i, row in enumerate(rows):
        longer = "chosen" if i % 2 else "rejected"
        row[longer] = f"{row['chosen']} {row['rejected']}"
    return rows


@pytest.fixture(scope="module")
def tok(rows):
    return build_tokenizer(rows)


def dpo_trainer(cls, tok, rows, tmp_path, policy, reference, **kwargs):
    config = {k: kwargs.pop(k) for k in list(kwargs) if k in trl.DPOConfig.__dataclass_fields__}
    args = trl.DPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[], save_strategy="no",
        disable_tqdm=True, use_cpu=True, bf16=False, seed=0, **config,
    )  # fmt: skip
    data = datasets.Dataset.from_list(rows)
    return cls(model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tok, **kwargs)


def first_batch(trainer, n=4):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(n)]))


def models(tok):
    reference = tiny_llama(tok, hidden_size=HIDDEN)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return policy, reference


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({"ld_alpha": 0.5}, id="ld_alpha"),
        pytest.param({"ld_alpha": 0.0, "precompute_ref_log_probs": True}, id="ld_alpha-precomputed"),
        pytest.param(
            {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3, "loss_type": ["sigmoid", "ipo"]},
            id="alpha_divergence",
        ),  # fmt: skip
        pytest.param({"f_divergence_type": "forward_kl", "loss_type": ["sigmoid_norm"]}, id="forward_kl"),
        pytest.param({"loss_type": ["discopop"], "discopop_tau": 0.2}, id="discopop_tau"),
        pytest.param({"use_weighting": True}, id="wpo"),
    ],
)
def test_dpo_config_options_equal_trl(config, tok, rows, tmp_path):
    policy, reference = models(tok)
    with forced_backend("torch"):
        ours = dpo_trainer(DPOTrainer, tok, rows, tmp_path / "a", copy.deepcopy(policy), copy.deepcopy(reference),
                           **config)  # fmt: skip
        stock = dpo_trainer(trl.DPOTrainer, tok, rows, tmp_path / "b", copy.deepcopy(policy),
                            copy.deepcopy(reference), **config)  # fmt: skip
        # Each trainer's own batch: with precompute_ref_log_probs its reference columns are its own.
        loss, stock_loss = (
            ours.compute_loss(ours.model, first_batch(ours)),
            stock.compute_loss(stock.model, first_batch(stock)),
        )
    assert rel_err(loss, stock_loss) < LOSS_RTOL
    for key in ("rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert ours._metrics["train"][key] == pytest.approx(stock._metrics["train"][key], rel=1e-4, abs=1e-5), key


def test_average_log_prob_compares_per_token_means(tok, rows, tmp_path):
    policy, reference = models(tok)
    trainer = dpo_trainer(DPOTrainer, tok, rows, tmp_path, policy, reference, average_log_prob=True, beta=0.5)
    batch = first_batch(trainer)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    mask = batch["completion_mask"][:, 1:].bool()

    def logps(model):
        with torch.no_grad():
            logits = unpatch_causal_lm(copy.deepcopy(model))(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits[:, :-1]
        return eager_logprobs.token_logprobs(logits.double(), labels[:, 1:]).sum(-1)

    chosen_lengths, rejected_lengths = mask.sum(-1).chunk(2)
    expected, _ = fastalign.dpo_loss(
        *logps(policy).chunk(2), *logps(reference).chunk(2), beta=0.5, average_log_prob=True,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
    )  # fmt: skip
    with forced_backend("torch"), torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    assert rel_err(loss, expected) < 1e-5
    plain = dpo_trainer(DPOTrainer, tok, rows, tmp_path / "sum", policy, reference, beta=0.5)
    with forced_backend("torch"), torch.no_grad():
        assert rel_err(plain.compute_loss(plain.model, batch), loss) > 1e-3  # the option changes the loss


def test_bad_dpo_config_options_raise_before_trl(tok, rows, tmp_path):
    policy, reference = models(tok)
    with pytest.raises(ValueError, match=r"f_divergence_type 'js_divergence' works only with loss_type in"):
        dpo_trainer(DPOTrainer, tok, rows, tmp_path, policy, reference, f_divergence_type="js_divergence",
                    loss_type=["apo_zero"])  # fmt: skip
    with pytest.raises(ValueError, match=r"use_weighting=True cannot be combined with loss_type \['aot'\]"):
        dpo_trainer(DPOTrainer, tok, rows, tmp_path, policy, reference, use_weighting=True, loss_type=["aot"])
    with pytest.raises(ValueError, match="discopop_tau must be a finite number > 0"):
        dpo_trainer(DPOTrainer, tok, rows, tmp_path, policy, reference, discopop_tau=-1.0, loss_type=["discopop"])


@pytest.fixture
def restore_transformers_globals():
    """Liger's layer kernels replace module globals of transformers (modeling_llama's LlamaRMSNorm, LlamaMLP,
    apply_rotary_pos_emb) for every model built afterwards; put back each one this test changed, so that later
    test files build stock Llamas."""
    saved = {name: dict(vars(m)) for name, m in list(sys.modules.items()) if name.startswith("transformers") and m}
    yield
    for name, before in saved.items():
        module = getattr(sys.modules.get(name), "__dict__", {})
        for key, value in before.items():
            if module.get(key) is not value:
                module[key] = value


@pytest.mark.usefixtures("restore_transformers_globals")
def test_use_liger_kernel_keeps_fastalign_head(tok, rows, tmp_path):
    """TRL 1.16 turns use_liger_kernel into Liger's layer kernels only (no fused linear cross-entropy), applied
    when training starts; fastalign's head, installed at construction, is still the one that runs."""
    pytest.importorskip("liger_kernel")
    from transformers.integrations.liger import apply_liger_kernel

    policy, reference = models(tok)
    trainer = dpo_trainer(DPOTrainer, tok, rows, tmp_path, policy, reference, use_liger_kernel=True)
    assert trainer.args.liger_kernel_config["fused_linear_cross_entropy"] is False
    apply_liger_kernel(trainer.model, trainer.args.liger_kernel_config)  # what Trainer.train() does first
    assert is_patched(trainer.model)
    assert trainer.model.model.norm.forward.__func__.__module__.startswith("liger_kernel")  # the layer kernels


def test_liger_layer_kernels_do_not_outlive_their_test():
    """Runs after test_use_liger_kernel_keeps_fastalign_head (file order): a Llama built now is stock."""
    from transformers.models.llama import modeling_llama

    for name in ("LlamaRMSNorm", "LlamaMLP", "apply_rotary_pos_emb"):
        assert getattr(modeling_llama, name).__module__ == modeling_llama.__name__, name
