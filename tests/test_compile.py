"""Every op inside torch.compile (dynamo with the aot_eager backend: no C++ compiler needed) gives what it gives
eagerly, gradients included: the ops run as they are, a graph break around them, and the code around them is
compiled. Before, dynamo traced into the launchers and failed on the interpreter's Python."""

from __future__ import annotations

import copy

import pytest
import torch
from utils import rel_err

import fastalign
from fastalign.integrations.causal_lm import patch_causal_lm
from fastalign.integrations.tiny import build_tokenizer, load_preferences, tiny_llama
from fastalign.optim import OnlineMergeAdamW

IGNORE = -100


def compiled(fn):
    torch._dynamo.reset()  # no graph cached from another test's shapes or backend
    return torch.compile(fn, backend="aot_eager", fullgraph=False)


def assert_same_with_grads(fn, *leaves):
    """fn(*leaves) and its gradients, compiled and eager, on fresh copies of the leaves."""
    results = []
    for run in (fn, compiled(fn)):
        copies = [t.detach().clone().requires_grad_(True) for t in leaves]
        out = run(*copies)
        # grad_output != 1, as a weighted loss would give
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
        results.append([out.detach(), *(t.grad for t in copies)])
    for got, want in zip(*reversed(results)):
        assert rel_err(got, want) < 1e-6


def test_ops_compiled_equal_eager(backend, device):
    B, T, H, V = 2, 9, 32, 257
    labels = torch.randint(0, V, (B, T), device=device)
    labels[0, :4] = IGNORE
    logits, hidden = torch.randn(B, T, V, device=device), torch.randn(B, T, H, device=device)
    weight = torch.randn(V, H, device=device) / 4
    stats = fastalign.token_stats

    assert_same_with_grads(lambda x: stats(x, labels, entropy=True).entropy * 2 + stats(x, labels).logprobs, logits)
    assert_same_with_grads(lambda h, w: fastalign.linear_token_logprobs(h, w, labels, softcap=5.0), hidden, weight)
    mask = labels != IGNORE
    assert_same_with_grads(lambda x: fastalign.ift_loss(fastalign.token_logprobs(x, labels), mask)[None], logits)
    embedded = torch.randn(V, H, device=device)
    predicted = torch.randint(0, V, (B, T - 1), device=device)
    assert_same_with_grads(lambda e: fastalign.ift_inputs_embeds(e, labels.clamp(min=0), predicted, labels), embedded)
    refs = torch.randn(B, device=device)
    references = {"ref_chosen_logps": refs[:1], "ref_rejected_logps": refs[1:]}
    for strategy in ("fast", "lean"):
        dpo = fastalign.FusedLinearDPOLoss(strategy=strategy)
        assert_same_with_grads(lambda h, w, loss=dpo: loss(h, w, labels, **references)[0][None], hidden, weight)


def test_optimizer_step_compiled_equals_eager(backend, device):
    """torch.compile(optimizer.step), as torch's compiled optimizers are used: the same parameters after 3 TIES
    steps."""
    model = torch.nn.Linear(48, 40, device=device)
    tau = [0.01 * torch.randn_like(p) for p in model.parameters()]
    batches = [torch.randn(8, 48, device=device) for _ in range(3)]
    results = []
    for compile_step in (False, True):
        policy = copy.deepcopy(model)
        params = list(policy.parameters())
        opt = OnlineMergeAdamW(params, lr=1e-2, method="onties", reserve_p=0.3, alpha=0.2, ref_delta=tau)
        step = compiled(opt.step) if compile_step else opt.step
        for x in batches:
            policy(x).square().mean().backward()
            step()
            opt.zero_grad()
        results.append(torch.cat([p.detach().flatten() for p in params]))
    assert torch.equal(*results)


def test_patched_model_compiled_equals_eager(backend):
    """A patched causal LM compiled whole, as TrainingArguments(torch_compile=True) does: the fused head runs
    between the compiled backbone's graph and the loss; loss and every gradient equal the eager forward's."""
    tok = build_tokenizer(load_preferences())
    model = patch_causal_lm(tiny_llama(tok, hidden_size=32))
    input_ids = torch.randint(3, len(tok), (2, 12))
    labels = input_ids.clone()
    labels[1, :5] = IGNORE
    results = []
    for compile_model in (False, True):
        copied = copy.deepcopy(model)
        run = compiled(copied) if compile_model else copied
        out = run(input_ids=input_ids, labels=labels, return_entropy=True)
        (out.loss + out.entropy.sum() / 10).backward()
        results.append([out.loss.detach(), out.logprobs.detach(), *(p.grad for p in copied.parameters())])
    for got, want in zip(*reversed(results)):
        assert rel_err(got, want) < 1e-6


@pytest.fixture(autouse=True)
def _reset_dynamo():
    yield
    torch._dynamo.reset()
