"""patch_trl(): TRL 1.16's stock SFT, DPO, KTO, GRPO and RLOO trainers on fastalign's ops, TRL's loss math.

- The stand-ins equal TRL's own functions (fused head, logits helpers): values, dtypes, gradients.
- Each stock trainer: at step 0 the loss and every gradient equal TRL's own path, whether the trainer was
  built before or after the patch, and a counter shows fastalign's op ran; a short run lowers the loss (or
  raises the reward) step for step as TRL's own path does.
- unpatch_trl() restores every trl module as it was; patch_causal_lm under a stock trainer warns once.

Step-0 checks run the Triton kernels (interpreted on the CPU); training runs use the torch path.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

import trl.trainer.utils as trl_utils  # noqa: E402
from distributed import run_script  # noqa: E402
from utils import rel_err, training_args  # noqa: E402

import fastalign  # noqa: E402
from fastalign._backend import forced_backend  # noqa: E402
from fastalign.integrations import patch_causal_lm, patch_trl, unpatch_trl  # noqa: E402
from fastalign.integrations.tiny import build_tokenizer, load_preferences, tiny_llama  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
datasets.disable_progress_bars()

HIDDEN = 32
FP32_RTOL = 1e-5
GRAD_RTOL = 1e-4
TRL_HEAD = trl_utils._ChunkedLogProbFunction
LOGITS_HELPERS = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")
TRL_HELPERS = {name: getattr(trl_utils, name) for name in LOGITS_HELPERS}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and OpenMP's spinning on a busy CPU slows them tens of times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def unpatched():
    """Every test starts and ends with TRL as shipped."""
    unpatch_trl()
    yield
    unpatch_trl()


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of fastalign's fused-linear and logits ops."""
    counts = {"linear_token_stats": 0, "token_stats": 0}
    for name in counts:
        op = getattr(fastalign, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            counts[_name] += 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(fastalign, name, counted)
    return counts


# ------------------------------------------------------------------------------------- the stand-ins


def head_inputs(N, H, V, dtype, bias):
    hidden = torch.randn(N, H, dtype=dtype, requires_grad=True)
    weight = (0.5 * torch.randn(V, H)).to(dtype).requires_grad_()
    b = torch.randn(V, dtype=dtype, requires_grad=True) if bias else None
    return hidden, weight, b, torch.randint(0, V, (N,))


ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.mark.parametrize(
    "N, H, V, temperature, softcap, scale, bias, outputs",
    [
        pytest.param(37, 16, 101, 1.0, None, 1.0, False, ALL_OUTPUTS, id="plain-all-outputs"),
        pytest.param(5, 24, 257, 0.7, 3.0, 0.5, True, ALL_OUTPUTS, id="temperature-softcap-scale-bias"),
        pytest.param(1, 16, 33, 1.0, None, 0.25, False, ("log_probs",), id="N1-log-probs-only"),
        pytest.param(19, 16, 64, 1.3, None, 1.0, True, ("log_probs", "entropy"), id="grpo-outputs"),
    ],
)
def test_fused_head_equals_trls(N, H, V, temperature, softcap, scale, bias, outputs, backend):
    """The stand-in returns TRL's five outputs (values, dtypes, None where not asked) and gradients."""
    hidden, weight, b, targets = head_inputs(N, H, V, torch.float32, bias)
    args = (temperature, 64, softcap, scale, outputs)
    ours = _stand_in_head().apply(hidden, weight, b, targets, *args)
    theirs = TRL_HEAD.apply(hidden, weight, b, targets, *args)
    assert len(ours) == len(theirs) == 5
    for name, x, y in zip(("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"), ours, theirs):
        if y is None:
            assert x is None, name
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if name == "is_top1":
            assert torch.equal(x, y)
            assert not x.requires_grad
        elif name == "mean_logits":
            # A mean of logits of both signs cancels: compare with the logits' own size, which bounds both fp32 sums'
            # rounding (a plain relative error failed at 1.2e-5 with FASTALIGN_SEED=286320117).
            logits = (hidden.double() @ weight.double().T + (0 if b is None else b.double())) * scale
            logits = logits if softcap is None else softcap * torch.tanh(logits / softcap)
            assert (x - y).abs().max() < FP32_RTOL * (logits / temperature).abs().mean(), name
        else:
            assert rel_err(x, y) < FP32_RTOL, name
    inputs = [t for t in (hidden, weight, b) if t is not None]
    g_logp, g_ent = torch.randn(N), torch.randn(N)  # grad_output != 1

    def loss(out):
        return (out[0] * g_logp).sum() + (0 if out[1] is None else (out[1] * g_ent).sum())

    for x, y in zip(torch.autograd.grad(loss(ours), inputs), torch.autograd.grad(loss(theirs), inputs)):
        assert x.dtype == y.dtype and rel_err(x, y) < GRAD_RTOL


def test_fused_head_top1_is_the_first_maximum():
    """TRL counts a label as top-1 only when no earlier token ties it, as torch.argmax picks."""
    hidden = torch.eye(4)[:3]
    weight = torch.zeros(6, 4)
    weight[1, 0] = weight[4, 0] = 5.0  # row 0: tokens 1 and 4 tie
    weight[2, 1] = 5.0  # row 1: token 2 alone
    targets = torch.tensor([4, 2, 0])  # row 2: every logit is 0, token 0 is the first maximum
    ours = _stand_in_head().apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, ("log_probs", "is_top1"))[4]
    theirs = TRL_HEAD.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, ("log_probs", "is_top1"))[4]
    assert ours.tolist() == theirs.tolist() == [False, True, True]


@pytest.mark.parametrize("case", ["autocast-bf16", "fp32-hidden-bf16-weight"])
def test_fused_head_compute_dtype_is_trls(case, backend):
    """Under autocast both compute in the autocast dtype; without it, in hidden's (TRL's cast_lm_head_to_fp32 passes
    fp32 hidden states with a bf16 head). Output and gradient dtypes are TRL's."""
    N, H, V = 23, 32, 97
    hidden = torch.randn(N, H, requires_grad=True)
    weight_dtype = torch.float32 if case == "autocast-bf16" else torch.bfloat16
    weight = (0.5 * torch.randn(V, H)).to(weight_dtype).requires_grad_()
    targets = torch.randint(0, V, (N,))
    args = (hidden, weight, None, targets, 1.0, 64, None, 1.0, ALL_OUTPUTS)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast-bf16")
    with autocast:
        ours = _stand_in_head().apply(*args)
    with autocast:
        theirs = TRL_HEAD.apply(*args)
    # TRL rounds each bf16 logits tile to bf16; fastalign accumulates the product in fp32.
    tol = 2e-2 if case == "autocast-bf16" else FP32_RTOL
    for x, y in zip(ours[:2], theirs[:2]):
        assert x.dtype == y.dtype == torch.float32 and rel_err(x, y) < tol
    g_ours = torch.autograd.grad(ours[0].sum() + ours[1].sum(), [hidden, weight])
    g_trl = torch.autograd.grad(theirs[0].sum() + theirs[1].sum(), [hidden, weight])
    for x, y in zip(g_ours, g_trl):
        assert x.dtype == y.dtype and rel_err(x, y) < (3e-2 if case == "autocast-bf16" else 1e-2)


def _stand_in_head():
    patch_trl()
    head = trl_utils._ChunkedLogProbFunction
    assert head is not TRL_HEAD
    return head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 5), (4,)], ids=["2d", "3d", "1d"])
def test_logits_helpers_equal_trls(dtype, shape, calls):
    """Values, dtypes and gradients of the three helpers, with temperature and row masks, and entropy without grad."""
    V = 53
    logits = (3 * torch.randn(*shape, V)).to(dtype).requires_grad_()
    index = torch.randint(0, V, shape)
    row_mask = torch.rand(shape) > 0.3
    # TRL's CPU path computes a bf16 log_softmax in bf16: it and ours differ by bf16 rounding (seen up to 1e-2).
    tol, grad_tol = (FP32_RTOL, GRAD_RTOL) if dtype == torch.float32 else (1.5e-2, 2.5e-2)
    cases = [
        ("selective_log_softmax", (logits, index), {}),
        ("selective_log_softmax", (logits, index), {"temperature": 0.7, "row_mask": row_mask}),
        ("entropy_from_logits", (logits,), {}),
        ("selective_log_softmax_and_entropy", (logits, index), {"temperature": 1.5, "row_mask": row_mask}),
        ("selective_log_softmax_and_entropy", (logits, index), {"entropy_requires_grad": False}),
    ]

    def run(name, args, kwargs):
        """Outputs and the gradient of a fixed random weighting of them (grad_output != 1)."""
        out = getattr(trl_utils, name)(*args, **kwargs)
        out = out if isinstance(out, tuple) else (out,)
        gen = torch.Generator().manual_seed(len(kwargs))
        loss = sum((x.float() * torch.randn(shape, generator=gen)).sum() for x in out if x.requires_grad)
        return out, torch.autograd.grad(loss, logits)[0]

    theirs = [run(*case) for case in cases]  # TRL's helpers call each other: all of them unpatched
    patch_trl()
    for case, (outputs, grad) in zip(cases, theirs):
        ours, our_grad = run(*case)
        for x, y in zip(ours, outputs, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape and x.requires_grad == y.requires_grad, case[0]
            assert rel_err(x, y) < tol, case
        assert our_grad.dtype == grad.dtype and rel_err(our_grad, grad) < grad_tol, case
    assert calls["token_stats"] == len(cases)


def test_logits_helpers_leave_what_fastalign_does_not_take_to_trl(calls):
    """Top-K indices [..., K] and float64 logits run TRL's own code, with its results."""
    patch_trl()
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    topk = torch.randint(0, 11, (2, 5, 3))
    assert torch.equal(
        trl_utils.selective_log_softmax(logits.float(), topk),
        TRL_HELPERS["selective_log_softmax"](logits.float(), topk),
    )
    assert torch.equal(trl_utils.entropy_from_logits(logits), TRL_HELPERS["entropy_from_logits"](logits))
    assert calls["token_stats"] == 0
    with pytest.raises(ValueError, match="temperature"):
        trl_utils.selective_log_softmax(logits.float(), topk[..., 0], temperature=0.0)


@pytest.mark.parametrize("shifted", [False, True], ids=["labels", "shift_labels"])
def test_fused_head_model_call_with_labels_or_shift_labels(shifted, tok):
    """`model(..., fused_lm_head=True)` as TRL's trainers call it (context parallelism passes pre-shifted
    shift_labels): every output field and every gradient equal TRL's head. Runs the Triton kernels."""
    rows = load_preferences()[:3]
    enc = tok([r["prompt"] + r["chosen"] for r in rows], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    labels[:, :4] = -100
    model = tiny_llama(tok, hidden_size=HIDDEN)
    trl_utils.add_fused_lm_head(model, temperature=0.9, outputs=ALL_OUTPUTS)
    if shifted:
        kwargs = {"shift_labels": torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)}
    else:
        kwargs = {"labels": labels}

    def run():
        out = model(**enc, **kwargs, fused_lm_head=True, num_items_in_batch=7)
        (out.loss + out.entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        return out, grads

    expected, expected_grads = run()
    patch_trl()
    out, grads = run()
    for field in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert rel_err(getattr(out, field), getattr(expected, field)) < FP32_RTOL, field
    assert torch.equal(out.is_top1, expected.is_top1) and torch.equal(out.label_mask, expected.label_mask)
    for name, grad in expected_grads.items():
        assert rel_err(grads[name], grad) < GRAD_RTOL, name


def trl_bindings() -> dict[tuple[str, str], int]:
    """id of every attribute of every loaded trl module."""
    return {
        (name, attr): id(value)
        for name, module in list(sys.modules.items())
        if module is not None and (name == "trl" or name.startswith("trl."))
        for attr, value in list(vars(module).items())
    }


def test_patch_rebinds_names_where_trainers_look_them_up_and_unpatch_restores_them():
    import trl.experimental.cpo.cpo_trainer as cpo  # imported before the patch: holds its own binding

    before = trl_bindings()
    patch_trl()
    patch_trl()  # idempotent
    head = trl_utils._ChunkedLogProbFunction
    assert head is not TRL_HEAD and trl.kernels.ChunkedLogProbFunction is TRL_HEAD  # only the name the head reads
    # The class the forward's gather check reads: vocab-parallel weights are not gathered (tests/test_vocab_parallel).
    assert trl_utils.DTensor is not torch.distributed.tensor.DTensor
    assert not isinstance(torch.ones(1), trl_utils.DTensor)
    assert cpo.selective_log_softmax is trl_utils.selective_log_softmax is not TRL_HELPERS["selective_log_softmax"]
    assert trl_utils.selective_log_softmax.__wrapped__ is TRL_HELPERS["selective_log_softmax"]  # TRL's signature
    sys.modules.pop("trl.experimental.orpo.orpo_trainer", None)
    import trl.experimental.orpo.orpo_trainer as orpo  # imported while patched

    assert orpo.selective_log_softmax is trl_utils.selective_log_softmax
    unpatch_trl()
    assert orpo.selective_log_softmax is TRL_HELPERS["selective_log_softmax"]
    after = trl_bindings()
    assert {k: v for k, v in after.items() if k in before} == before
    unpatch_trl()  # idempotent


# ------------------------------------------------------------------------------------- stock trainers


@pytest.fixture(scope="module")
def rows():
    return load_preferences()


@pytest.fixture(scope="module")
def tok(rows):
    return build_tokenizer(rows)


def even_token_reward(completion_ids, **kwargs):
    """A toy reward a tiny model can learn in a few steps: the share of even token ids in the completion."""
    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def sft(tok, rows, tmp_path, steps=1, lr=1e-2, model=None):
    data = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows[:64]]
    return trl.SFTTrainer(
        model=tiny_llama(tok, hidden_size=HIDDEN) if model is None else model,
        args=training_args(trl.SFTConfig, tmp_path, steps, lr, 8),
        train_dataset=datasets.Dataset.from_list(data),
        processing_class=tok,
    )


def dpo(tok, rows, tmp_path, steps=1, lr=5e-3, **extra):
    reference = tiny_llama(tok, hidden_size=HIDDEN)
    lora = extra.pop("lora", False)
    return trl.DPOTrainer(
        model=_perturbed(reference),
        ref_model=None if lora else reference,
        args=training_args(trl.DPOConfig, tmp_path, steps, lr, 4, beta=0.5, **extra),
        train_dataset=datasets.Dataset.from_list(rows[:32]),
        processing_class=tok,
        peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        if lora
        else None,
    )


def small_model(arch, tok):
    common = dict(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    if arch == "gemma2":
        config = transformers.Gemma2Config(**common, head_dim=16, final_logit_softcapping=3.0)
    else:
        config = transformers.CohereConfig(**common, logit_scale=0.5)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def kto(tok, rows, tmp_path, steps=1, lr=5e-3):
    data = [
        {"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
        for r in rows[:16]
        for key in ("chosen", "rejected")
    ]
    reference = tiny_llama(tok, hidden_size=HIDDEN)
    return trl.KTOTrainer(
        model=_perturbed(reference),
        ref_model=reference,
        args=training_args(trl.KTOConfig, tmp_path, steps, lr, 8, beta=0.5),
        train_dataset=datasets.Dataset.from_list(data),
        processing_class=tok,
    )


def _online_rl(trainer_cls, config_cls, tok, rows, tmp_path, steps, lr, **extra):
    path = tmp_path / "tiny"  # a path, so that TRL builds the KL reference model (beta > 0) from it
    if not path.exists():
        tiny_llama(tok, hidden_size=HIDDEN).save_pretrained(path)
    args = training_args(
        config_cls,
        tmp_path,
        steps,
        lr,
        16,
        num_generations=4,
        max_completion_length=8,
        beta=0.04,
        temperature=0.8,
        model_init_kwargs={"dtype": torch.float32},
        **extra,
    )
    return trainer_cls(
        model=str(path),
        reward_funcs=even_token_reward,
        args=args,
        train_dataset=datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in rows[:64]]),
        processing_class=tok,
    )


def grpo(tok, rows, tmp_path, steps=1, lr=2e-2):
    return _online_rl(trl.GRPOTrainer, trl.GRPOConfig, tok, rows, tmp_path, steps, lr, entropy_coef=0.01)


def rloo(tok, rows, tmp_path, steps=1, lr=2e-2):
    return _online_rl(trl.RLOOTrainer, trl.RLOOConfig, tok, rows, tmp_path, steps, lr)


def experimental(name: str):
    """TRL's experimental CPO and ORPO trainers, which score their logits with selective_log_softmax."""

    def make(tok, rows, tmp_path, steps=1, lr=5e-3):
        module = importlib.import_module(f"trl.experimental.{name}")
        trainer_cls, config_cls = getattr(module, f"{name.upper()}Trainer"), getattr(module, f"{name.upper()}Config")
        return trainer_cls(
            model=tiny_llama(tok, hidden_size=HIDDEN),
            args=training_args(config_cls, tmp_path, steps, lr, 4),
            train_dataset=datasets.Dataset.from_list(rows[:16]),
            processing_class=tok,
        )

    return make


def _perturbed(model, scale=0.02):
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return out


TRAINERS = {"sft": sft, "dpo": dpo, "kto": kto, "grpo": grpo, "rloo": rloo}
STEP_ZERO = {
    **TRAINERS,
    "sft-gemma2-softcap": lambda tok, rows, path: sft(tok, rows, path, model=small_model("gemma2", tok)),
    "sft-cohere-logit-scale": lambda tok, rows, path: sft(tok, rows, path, model=small_model("cohere", tok)),
    "dpo-lora": lambda tok, rows, path: dpo(tok, rows, path, lora=True),
    "dpo-wpo": lambda tok, rows, path: dpo(tok, rows, path, use_weighting=True),  # asks for log_sum_sq_probs
    "cpo-logits": experimental("cpo"),
    "orpo-logits": experimental("orpo"),
}
LOGITS_PATH = {"cpo-logits", "orpo-logits"}  # fastalign.token_stats runs instead of linear_token_stats
ONLINE = {"grpo", "rloo"}


def first_inputs(trainer):
    """The trainer's first training batch, as its training step sees it (generated and scored for GRPO/RLOO)."""
    _training_mode(trainer)
    torch.manual_seed(0)
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _training_mode(trainer):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()


def loss_and_grads(trainer, inputs):
    """The training loss of `inputs`, every gradient, and the metrics TRL logged while computing them."""
    _training_mode(trainer)
    trainer.model.zero_grad()
    metrics = (trainer._metrics if hasattr(trainer, "_metrics") else trainer._stored_metrics)["train"]  # CPO, ORPO
    metrics.clear()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    return loss.detach(), grads, {k: list(v) for k, v in metrics.items()}


def assert_same(actual, expected):
    (loss, grads, metrics), (expected_loss, expected_grads, expected_metrics) = actual, expected
    assert torch.allclose(loss, expected_loss, rtol=FP32_RTOL, atol=1e-7), (loss, expected_loss)
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        assert rel_err(grads[name], expected_grads[name]) < GRAD_RTOL, name
    assert metrics.keys() == expected_metrics.keys() and metrics
    for key, values in expected_metrics.items():
        if key not in ("step_time", "num_tokens"):  # a timing, and a running count over the calls
            assert metrics[key] == pytest.approx(values, rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("kind", STEP_ZERO)
def test_step_zero_equals_trls_own_path(kind, tok, rows, tmp_path, calls):
    """The same batch through TRL's head, then through fastalign's: on a trainer built before the patch and on
    one built after it; logit softcapping and scaling from the config; a PEFT model; TRL's experimental CPO and
    ORPO on the logits helpers. Runs the Triton kernels (interpreted)."""
    op = "token_stats" if kind in LOGITS_PATH else "linear_token_stats"
    before = STEP_ZERO[kind](tok, rows, tmp_path)
    inputs = first_inputs(before)
    expected = loss_and_grads(before, inputs)
    assert calls[op] == 0
    patch_trl()
    assert_same(loss_and_grads(before, inputs), expected)
    assert calls[op] > 0
    runs = calls[op]
    after = STEP_ZERO[kind](tok, rows, tmp_path)
    assert_same(loss_and_grads(after, inputs), expected)
    assert calls[op] > runs


TRAINING = {  # steps, and the least drop of the loss on the first batch (SFT, DPO, KTO) or rise of the reward
    "sft": (6, 0.5),
    "dpo": (6, 0.05),
    "kto": (6, 0.02),
    "grpo": (12, 0.05),
    "rloo": (12, 0.05),
}


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


@pytest.mark.parametrize("kind", TRAINERS)
def test_training_follows_trls_own_path(kind, tok, rows, tmp_path, calls):
    """A few steps with fastalign's ops log what TRL's own path logs, step for step, and improve the objective:
    the loss on the first batch falls (SFT, DPO, KTO), the reward of the generations rises (GRPO, RLOO)."""
    steps, least = TRAINING[kind]
    runs = []
    for patched in (False, True):
        if patched:
            patch_trl()
        trainer = TRAINERS[kind](tok, rows, tmp_path / str(patched), steps=steps)
        with forced_backend("torch"):
            if kind not in ONLINE:
                inputs = first_inputs(trainer)
                before = loss_and_grads(trainer, inputs)[0].item()
            trainer.train()
            after = None if kind in ONLINE else loss_and_grads(trainer, inputs)[0].item()
        runs.append((logged(trainer, "loss"), logged(trainer, "reward"), after))
    (trl_losses, trl_rewards, trl_after), (losses, rewards, after) = runs
    assert calls["linear_token_stats"] > 0
    assert len(losses) == steps and losses == pytest.approx(trl_losses, rel=1e-3, abs=1e-5)
    assert rewards == pytest.approx(trl_rewards, rel=1e-3, abs=1e-5)
    if kind in ONLINE:
        k = steps // 3
        assert sum(rewards[-k:]) / k > sum(rewards[:k]) / k + least, rewards
    else:
        assert after == pytest.approx(trl_after, rel=1e-3) and after < before - least, (before, after)


# ------------------------------------------------------------------------------------- patch_causal_lm


def test_patch_causal_lm_under_a_stock_trainer_warns_once_and_names_patch_trl(tok, rows, tmp_path, calls):
    """Patched before the trainer, TRL's head wraps the patch and bypasses it; patched after, TRL's calls reach it
    with fused_lm_head=True. Either way TRL's head trains, and one warning names patch_trl."""
    for order in ("patch-then-trainer", "trainer-then-patch"):
        trainer = sft(tok, rows, tmp_path / order, steps=2)
        if order == "patch-then-trainer":
            trainer = trl.SFTTrainer(
                model=patch_causal_lm(tiny_llama(tok, hidden_size=HIDDEN)),
                args=trainer.args,
                train_dataset=trainer.train_dataset,
                processing_class=tok,
            )
        else:
            patch_causal_lm(trainer.model)
        with warnings.catch_warnings(record=True) as caught, forced_backend("torch"):
            warnings.simplefilter("always")
            trainer.train()
        ours = [w for w in caught if "patch_trl()" in str(w.message)]
        assert len(ours) == 1, (order, [str(w.message) for w in caught])
        assert len(logged(trainer, "loss")) == 2
    assert calls["linear_token_stats"] == 0


def test_fastalign_trainers_do_not_warn(tok, rows, tmp_path):
    """fastalign's own DPOTrainer calls the patched forward with labels: no bypass warning."""
    from fastalign.integrations import DPOTrainer

    reference = tiny_llama(tok, hidden_size=HIDDEN)
    trainer = DPOTrainer(
        model=_perturbed(reference),
        ref_model=reference,
        args=training_args(trl.DPOConfig, tmp_path, 2, 1e-3, 4),
        train_dataset=datasets.Dataset.from_list(rows[:16]),
        processing_class=tok,
    )
    with warnings.catch_warnings(record=True) as caught, forced_backend("torch"):
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "patch_trl()" in str(w.message)]


# ------------------------------------------------------------------------------------- tensor parallel


TP_WORKER = Path(__file__).resolve().parent / "trl_tp_worker.py"
TP_STEPS = 3  # trl_tp_worker.STEPS (not imported: the worker edits the environment)


def _run_tp_worker(out: Path, kind: str, *args: str, ranks: int = 1) -> dict:
    result = run_script(TP_WORKER, [kind, str(out), *args], cwd=out.parent, ranks=ranks)
    assert result.returncode == 0, result.stderr[-4000:]
    return [
        (json.loads((out / f"result-rank{r}.json").read_text()), torch.load(out / f"params-rank{r}.pt"))
        for r in range(ranks)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "dpo", "kto"])
def test_stock_trainer_trains_under_tensor_parallelism(kind, tmp_path):
    """trl.SFTTrainer / trl.DPOTrainer / trl.KTOTrainer end to end on 2 gloo processes (torchrun), the model loaded with
    transformers' own `tp_plan="auto"` (lm_head Shard(0) on "tp", odd V), `patch_trl()`: the run completes, the
    fused head ran fastalign's op on the sharded weight every call (policy and reference) and nothing V x H was
    gathered; the logged losses equal TRL's own path on one unsharded process (step 0 included) and the two ranks
    agree exactly, and so do the final parameters. One accelerate check is shimmed: see tests/trl_tp_worker.py."""
    [(reference, reference_params)] = _run_tp_worker(tmp_path / "one", kind, "--trl-own")
    ranks = _run_tp_worker(tmp_path / "tp", kind, ranks=2)
    assert reference["op_calls"] == 0 and reference["lm_head"]["type"] == "Parameter"
    # DPO: the policy's and the reference's forward; KTO: each on the completions and on the KL's mismatched pairs.
    calls = TP_STEPS * {"sft": 1, "dpo": 2, "kto": 4}[kind]
    V, H = reference_params["lm_head.weight"].shape
    assert V % 2 == 1  # the slices differ in size
    for rank, (record, _) in enumerate(ranks):
        assert record["lm_head"] == {"type": "DTensor", "placements": "(Shard(dim=0),)"}
        assert "tp_size=2" in record["parallelism"] and "dp_shard_size=1" in record["parallelism"]
        assert record["op_calls"] == record["op_calls_on_tp_shard"] == calls
        assert record["weight_local_shape"] == [(V + 1) // 2 - rank, H]
        assert all(shape == [] for shape in record["full_tensor_shapes"])  # the grad norm only, never the weight
        assert len(record["losses"]) == TP_STEPS
        assert record["losses"] == pytest.approx(reference["losses"], rel=1e-5), (record["losses"], reference)
        first_log = reference["first_log"]
        assert {"loss", "grad_norm", "entropy"} <= first_log.keys() == record["first_log"].keys()
        for key, value in first_log.items():  # DPO's step-0 loss is log 2 whatever the head: its log-probs are not
            if key not in ("step_time", "num_tokens"):
                assert record["first_log"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    (first, first_params), (second, second_params) = ranks
    assert first["losses"] == second["losses"]
    assert first_params.keys() == second_params.keys() == reference_params.keys()
    for name, value in first_params.items():
        assert torch.equal(value, second_params[name]), name
        assert rel_err(value, reference_params[name]) < GRAD_RTOL, name


@pytest.mark.slow
def test_grpo_under_tensor_parallelism_refuses_rows_that_differ_across_the_group(tmp_path):
    """trl.GRPOTrainer on 2 gloo processes with a tp_plan="auto" model: TRL 1.16 hands the two ranks of the TP group
    different completions, so a vocab-parallel head would combine statistics of different tokens. Under patch_trl()
    every rank raises fastalign's ValueError naming the cause, instead of training on a silently wrong loss."""
    _run_tp_worker(tmp_path / "one", "grpo", "--trl-own")  # writes the model
    result = run_script(TP_WORKER, ["grpo", str(tmp_path / "tp")], cwd=tmp_path, ranks=2)
    assert result.returncode != 0
    assert "labels differ across the tensor-parallel group" in result.stderr, result.stderr[-4000:]
