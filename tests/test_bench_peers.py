"""The bench's peer wrappers compute what their case compares them as: per-token log-probs, the DPO and KTO losses and
the mean cross-entropy, equal to eager's on the same inputs, gradients included. A wrong sign, a dropped ignore_index
or a different reduction would otherwise show up only as a fast (and wrong) peer in the GPU's results.

CCE's kernels have no CPU path (and use libdevice, which Triton's interpreter lacks), so its wrapper is checked on the
same API with CCE's own `torch_compile` reference implementation, run uncompiled."""

from __future__ import annotations

import pytest
import torch

from fastalign.bench import linear as suite
from fastalign.reference import dpo as ref_dpo
from fastalign.reference import linear_logprobs as ref

ROWS, T, H, V = 4, 24, 32, 1001  # 2 DPO pairs
PROMPT = suite._prompt(T)  # the ignored positions at the start of each row, as in the bench


def _inputs(prompt=PROMPT):
    hidden, weight, labels = suite._head(ROWS, T, H, V, torch.float32, torch.device("cpu"), prompt)
    return hidden.requires_grad_(True), weight.requires_grad_(True), labels


def _cce_reference_head(monkeypatch):
    pytest.importorskip("cut_cross_entropy")
    import cut_cross_entropy.torch_compile as cce_torch

    compiled = cce_torch.torch_compile_linear_cross_entropy_apply
    monkeypatch.setattr(cce_torch, "torch_compile_linear_cross_entropy_apply", compiled._torchdynamo_orig_callable)
    return suite._cce_head(cuda=False, impl="torch_compile")


def _trl_head(monkeypatch):
    pytest.importorskip("trl")
    return suite._trl_head()


HEADS = {"trl": _trl_head, "cce": _cce_reference_head}


def _assert_same(got_fn, expected_fn, prompt=PROMPT):
    """got_fn(hidden, weight, labels) and expected_fn(...) agree in value and in both gradients; the first `prompt`
    positions of each row are ignored."""
    hidden, weight, labels = _inputs(prompt)
    got, expected = got_fn(hidden, weight, labels), expected_fn(hidden, weight, labels)
    g = torch.randn_like(expected)
    grads = [torch.autograd.grad((out * g).sum(), (hidden, weight)) for out in (got, expected)]
    # float32 inputs: the peers compute in float32 whatever the inputs' dtype (TRL's head returns float32).
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return got


def test_cce_is_left_out_on_the_cpu():
    pytest.importorskip("cut_cross_entropy")
    assert suite._cce_head(cuda=False) is None  # no CPU path


@pytest.mark.parametrize("peer", HEADS)
def test_peer_heads_give_the_per_token_log_probs(peer, monkeypatch):
    head = HEADS[peer](monkeypatch)
    logps = _assert_same(head, ref.linear_token_logprobs)
    _, _, labels = _inputs()
    assert (logps[labels == suite.IGNORE] == 0).all() and (logps[labels != suite.IGNORE] < 0).all()


@pytest.mark.parametrize("peer", HEADS)
def test_dpo_on_a_peer_head_is_eager_dpo(peer, monkeypatch):
    dpo = suite._dpo_on(HEADS[peer](monkeypatch))
    ref_chosen, ref_rejected = (torch.randn(ROWS, dtype=torch.float32) - 2 * T).chunk(2)

    def with_reference(fn):
        return lambda hidden, weight, labels: fn(hidden, weight, labels, ref_chosen, ref_rejected)

    _assert_same(with_reference(dpo), with_reference(suite._eager_dpo))


@pytest.mark.parametrize("kl", [0.5, -0.5])
def test_the_peers_kto_loss_is_the_reference_kto_loss(kl):
    gen = torch.Generator().manual_seed(0)
    policy = (torch.randn(6, generator=gen, dtype=torch.float64) * 10).requires_grad_(True)
    ref_logps = torch.randn(6, generator=gen, dtype=torch.float64)
    desirable = torch.tensor([True, False, True, True, False, False])
    kl = torch.tensor(kl, dtype=torch.float64)
    got = suite._kto_loss(policy, ref_logps, desirable, kl)
    expected = ref_dpo.kto_loss(policy, ref_logps, desirable, kl, beta=0.1)[0]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    (d_got,), (d_expected,) = (torch.autograd.grad(x, policy) for x in (got, expected))
    torch.testing.assert_close(d_got, d_expected, rtol=1e-12, atol=0)


# KTO's 1 - sigmoid saturates (its gradient 0 in float32, and a flipped sign unseen) unless the policy's log-prob
# sums are within a few 1 / beta of the reference's: one scored token per row (a log-prob near -log V - 2), and a
# reference of 0 there, which is what Liger reads without its reference model.
KTO_PROMPT = T - 1


def _kto_inputs():
    desirable = torch.arange(ROWS) % 2 == 0
    return desirable, torch.zeros(ROWS), torch.tensor(0.5)


@pytest.mark.parametrize("peer", HEADS)
def test_kto_on_a_peer_head_is_eager_kto(peer, monkeypatch):
    kto, eager = suite._kto_on(HEADS[peer](monkeypatch)), suite._kto_on(ref.linear_token_logprobs)
    args = _kto_inputs()
    _assert_same(lambda h, w, y: kto(h, w, y, *args), lambda h, w, y: eager(h, w, y, *args), KTO_PROMPT)


def test_liger_kto_is_eager_kto_with_a_zero_reference():
    pytest.importorskip("liger_kernel")
    args = _kto_inputs()
    eager = suite._kto_on(ref.linear_token_logprobs)
    _assert_same(
        lambda h, w, y: suite._liger_kto(cuda=False)(h, w, y, *args),
        lambda h, w, y: eager(h, w, y, *args),
        KTO_PROMPT,
    )


SFT_LOSSES = {
    "trl": lambda monkeypatch: _trl_head(monkeypatch) and suite._trl_sft(),
    "cce": lambda monkeypatch: suite._mean_of(_cce_reference_head(monkeypatch)),
}


@pytest.mark.parametrize("peer", SFT_LOSSES)
def test_sft_losses_of_the_peers_are_the_mean_cross_entropy(peer, monkeypatch):
    def eager(hidden, weight, labels):
        return ref.linear_cross_entropy(hidden, weight, labels, ignore_index=suite.IGNORE)

    _assert_same(SFT_LOSSES[peer](monkeypatch), eager)


def test_liger_dpo_is_eager_dpo_with_a_zero_reference():
    pytest.importorskip("liger_kernel")
    zeros = torch.zeros(ROWS // 2, dtype=torch.float32)
    _assert_same(
        lambda h, w, y: suite._liger_dpo(cuda=False)(h, w, y, zeros, zeros),
        lambda h, w, y: suite._eager_dpo(h, w, y, zeros, zeros),
    )
