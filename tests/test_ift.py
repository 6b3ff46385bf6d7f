"""ift_loss, IFTLoss and ift_inputs_embeds against the float64 eager reference (the official code's formulas)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from utils import GRAD_RTOL, VALUE_RTOL, rel_err

import fastalign
from fastalign.kernels.ift import ift_inputs_embeds_fwd
from fastalign.reference import ift as ref

IGNORE = -100


def completion_mask(B, T, device, empty_row=True):
    """A prompt prefix of random length, a completion, right padding; optionally one row with no completion."""
    t = torch.arange(T, device=device)
    start = torch.randint(0, max(1, T // 2), (B, 1), device=device)
    end = start + torch.randint(1, T + 1, (B, 1), device=device)
    mask = (t >= start) & (t < end)
    if empty_row and B > 1:
        mask[1] = False
    return mask


def check_ift_against_reference(token_logps, mask, gamma, grad_scale=None):
    x = token_logps.detach().clone().requires_grad_(True)
    loss = fastalign.ift_loss(x, mask, gamma=gamma)
    g = torch.randn((), device=x.device) if grad_scale is None else torch.tensor(grad_scale, device=x.device)
    loss.backward(g)
    x64 = token_logps.detach().double().requires_grad_(True)
    loss64 = ref.ift_loss(x64, mask, gamma=gamma)
    loss64.backward(g.double())
    dtype = token_logps.dtype
    assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss)
    assert rel_err(loss, loss64) < VALUE_RTOL[torch.float32] * 10
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert rel_err(x.grad, x64.grad) < max(GRAD_RTOL[dtype], 1e-5)
    assert (x.grad[~mask.bool()] == 0).all()


@pytest.mark.parametrize(
    "B, T",
    [
        pytest.param(1, 1, id="B1-T1"),
        pytest.param(3, 7, id="B3-T7"),
        pytest.param(2, 257, id="B2-T257"),
        pytest.param(2, 2500, id="B2-T2500-three-blocks"),
    ],
)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.95, 1.0])
def test_matches_float64_reference(B, T, gamma, backend, device):
    token_logps = -torch.rand(B, T, device=device) * 4
    check_ift_against_reference(token_logps, completion_mask(B, T, device), gamma)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_log_probs(dtype, backend, device):
    token_logps = (-torch.rand(3, 40, device=device) * 4).to(dtype)
    check_ift_against_reference(token_logps, completion_mask(3, 40, device), 0.95, grad_scale=0.5)


@pytest.mark.parametrize("layout", ["transposed", "column-slice"])
def test_non_contiguous_log_probs_and_integer_mask(layout, backend, device):
    if layout == "transposed":
        token_logps = (-torch.rand(9, 3, device=device) * 4).t()
    else:
        token_logps = (-torch.rand(3, 20, device=device) * 4)[:, 1::2]
    assert not token_logps.is_contiguous()
    mask = completion_mask(3, token_logps.shape[1], device).long()  # TRL's completion masks are integers
    check_ift_against_reference(token_logps, mask, 0.9)


def test_weights_are_not_detached(backend, device):
    """The gradient includes d w / d logp: it differs from weighting with detached weights."""
    token_logps = -torch.rand(2, 12, device=device) * 4
    mask = torch.ones(2, 12, dtype=torch.bool, device=device)
    x = token_logps.clone().requires_grad_(True)
    fastalign.ift_loss(x, mask, gamma=0.95).backward()
    weights = ref.relation_weights(token_logps.double(), mask, 0.95)
    detached = weights / mask.sum(-1, keepdim=True) / 2  # d/dlogp of mean_b sum_t -logp_t w_t / N, w fixed
    assert rel_err(x.grad, -detached) > 1e-2
    check_ift_against_reference(token_logps, mask, 0.95)


def test_gamma_zero_is_sft_and_gamma_one_is_reverse_cumsum(backend, device):
    token_logps = -torch.rand(3, 10, device=device) * 4
    mask = completion_mask(3, 10, device, empty_row=False)
    nll = torch.where(mask, -token_logps, 0.0)
    n = mask.sum(-1)
    sft = (nll.sum(-1) / n).mean()
    torch.testing.assert_close(fastalign.ift_loss(token_logps, mask, gamma=0.0), sft)
    c = torch.where(mask, nll.flip(-1).cumsum(-1).flip(-1), 0.0)  # undiscounted sum over k >= t
    w = c * n[:, None] / c.sum(-1, keepdim=True)
    torch.testing.assert_close(fastalign.ift_loss(token_logps, mask, gamma=1.0), ((nll * w).sum(-1) / n).mean())


def test_sequences_without_completion_tokens(backend, device):
    x = (-torch.rand(3, 8, device=device) * 4).requires_grad_(True)
    mask = torch.zeros(3, 8, dtype=torch.bool, device=device)
    loss = fastalign.ift_loss(x, mask)
    loss.backward()
    assert loss.item() == 0 and (x.grad == 0).all()
    # Certain tokens (log-prob exactly 0) make sum C = 0: that row falls back to SFT, finite and exact.
    certain = torch.zeros(2, 5, device=device)
    certain[1] = -1.0
    check_ift_against_reference(certain, torch.ones(2, 5, dtype=torch.bool, device=device), 0.95)


def test_empty_input(backend, device):
    # T = 0: sequences without completion tokens, each contributing 0.
    x = torch.zeros(2, 0, device=device, requires_grad=True)
    loss = fastalign.ift_loss(x, torch.ones(2, 0, dtype=torch.bool, device=device))
    loss.backward()
    assert loss.item() == 0 and x.grad.shape == (2, 0)
    logits = torch.randn(2, 0, 7, device=device, requires_grad=True)
    fastalign.IFTLoss()(logits, torch.zeros(2, 0, dtype=torch.long, device=device)).backward()
    assert logits.grad.shape == (2, 0, 7)
    # B = 0: the mean over no sequences has no value; dpo_loss raises on an empty batch too.
    with pytest.raises(ValueError, match=r"token_logps must have shape \[B, T\] with B >= 1; got \(0, 4\)"):
        fastalign.ift_loss(torch.zeros(0, 4, device=device), torch.ones(0, 4, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"logits must have shape \[B, T, V\] with B >= 1; got \(0, 4, 7\)"):
        fastalign.IFTLoss()(torch.zeros(0, 4, 7, device=device), torch.zeros(0, 4, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="with B >= 1"):
        fastalign.dpo_loss(*torch.zeros(4, 0, device=device))
    # ift_inputs_embeds is an embedding lookup, not a mean: empty batches, sequences and rows are fine.
    for B, T, D in ((2, 0, 3), (0, 4, 3), (2, 4, 0)):
        weight = torch.randn(5, D, device=device, requires_grad=True)
        ids = torch.zeros(B, T, dtype=torch.long, device=device)
        out = fastalign.ift_inputs_embeds(weight, ids, ids, ids)
        out.sum().backward()  # D = 0 once failed to reshape the 0-element gradient on the Triton path
        assert out.shape == (B, T, D) and weight.grad.shape == (5, D) and (weight.grad == 0).all()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 4), T=st.integers(1, 1100), gamma=st.floats(0.0, 1.0))
def test_random_shapes(B, T, gamma, device):
    token_logps = -torch.rand(B, T, device=device) * 6
    check_ift_against_reference(token_logps, completion_mask(B, T, device), gamma)


# ----------------------------------------------------------------------------- fused IFTLoss


@pytest.mark.parametrize(
    "B, T, V, dtype",
    [
        pytest.param(2, 9, 301, torch.float32, id="B2-T9-V301-fp32"),
        pytest.param(1, 6, 1000, torch.bfloat16, id="B1-T6-V1000-bf16"),
        pytest.param(3, 5, 129, torch.float16, id="B3-T5-V129-fp16"),
    ],
)
def test_fused_ift_matches_reference_and_composition(B, T, V, dtype, backend, device):
    logits = (torch.randn(B, T, V, device=device) * 2).to(dtype)
    labels = torch.randint(0, V, (B, T), device=device)
    labels[~completion_mask(B, T, device)] = IGNORE
    x = logits.clone().requires_grad_(True)
    loss = fastalign.IFTLoss(gamma=0.9)(x, labels)
    loss.backward(torch.tensor(2.0, device=device))

    y = logits.clone().requires_grad_(True)
    composed = fastalign.ift_loss(fastalign.token_logprobs(y, labels), labels != IGNORE, gamma=0.9)
    composed.backward(torch.tensor(2.0, device=device))
    assert torch.equal(loss, composed) and torch.equal(x.grad, y.grad)

    x64 = logits.detach().double().requires_grad_(True)
    loss64 = ref.ift_loss_from_logits(x64, labels, gamma=0.9)
    loss64.backward(torch.tensor(2.0, dtype=torch.float64, device=device))
    assert rel_err(loss, loss64) < VALUE_RTOL[dtype] * 10
    assert x.grad.dtype == dtype and rel_err(x.grad, x64.grad) < GRAD_RTOL[dtype]
    assert (x.grad[labels == IGNORE] == 0).all()


def test_fused_ift_inplace_backward_on_a_shifted_slice(backend, device):
    B, T, V = 2, 7, 200
    base = torch.randn(B, T + 1, V, device=device, dtype=torch.bfloat16)
    labels = torch.randint(0, V, (B, T), device=device)
    labels[:, :2] = IGNORE
    x = base[:, :-1].clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(fastalign.IFTLoss()(x, labels), x)
    leaf = base.clone().requires_grad_(True)
    logits = (leaf * 1)[:, :-1]
    fastalign.IFTLoss(inplace_backward=True)(logits, labels).backward()
    assert torch.equal(leaf.grad[:, :-1], expected) and (leaf.grad[:, -1] == 0).all()
    assert torch.equal(logits.detach(), expected)


def test_two_pass_temporal_residual_matches_the_official_pipeline(backend, device):
    """Pass 1 argmax from token_stats, ift_inputs_embeds, pass 2 through IFTLoss, on a toy per-position model,
    against the official code's steps in float64 (_get_batch_logps shift, greedy tokens, mixing, weights)."""
    B, T, V, D = 2, 8, 50, 16
    embedding = torch.randn(V, D, device=device)
    head = torch.randn(V, D, device=device, requires_grad=True)
    input_ids = torch.randint(0, V, (B, T), device=device)
    labels = input_ids.masked_fill(torch.arange(T, device=device) < 3, IGNORE)  # aligned with input_ids

    with torch.no_grad():
        stats = fastalign.token_stats(embedding[input_ids] @ head.T, labels, entropy=False)
    predicted = stats.argmax  # pass 1: no log-softmax materialized
    embeds = fastalign.ift_inputs_embeds(embedding, input_ids, predicted, labels, lam=0.2)
    logits = embeds @ head.T
    loss = fastalign.IFTLoss(gamma=0.95)(logits[:, :-1], labels[:, 1:])
    (grad,) = torch.autograd.grad(loss, head)

    head64, embedding64 = head.detach().double().requires_grad_(True), embedding.double()
    logits64 = embedding64[input_ids] @ head64.T
    greedy = logits64.argmax(-1)
    embeds64 = ref.ift_inputs_embeds(embedding64, input_ids, greedy, labels, lam=0.2)
    logits64 = embeds64 @ head64.T
    loss64 = ref.ift_loss_from_logits(logits64[:, :-1], labels[:, 1:], gamma=0.95)
    (grad64,) = torch.autograd.grad(loss64, head64)
    assert torch.equal(predicted, greedy)
    assert rel_err(loss, loss64) < 1e-5 and rel_err(grad, grad64) < GRAD_RTOL[torch.float32]


# ----------------------------------------------------------------------------- ift_inputs_embeds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shifted_predictions", [False, True], ids=["pred-BT", "pred-BTm1"])
def test_inputs_embeds_match_reference(dtype, shifted_predictions, backend, device):
    B, T, V, D = 3, 6, 40, 37
    weight = torch.randn(V, D, device=device).to(dtype)
    input_ids = torch.randint(0, V, (B, T), device=device)
    predicted = torch.randint(0, V, (B, T), device=device)
    labels = input_ids.clone()
    labels[:, :2] = IGNORE  # prompt
    labels[1, -2:] = IGNORE  # padding
    labels[2] = input_ids[2]  # a response from position 0: it keeps its own token there
    w = weight.clone().requires_grad_(True)
    given = predicted[:, :-1] if shifted_predictions else predicted
    out = fastalign.ift_inputs_embeds(w, input_ids, given, labels, lam=0.3)
    g = torch.randn(B, T, D, device=device)
    out.backward(g.to(dtype))

    w64 = weight.double().requires_grad_(True)
    out64 = ref.ift_inputs_embeds(w64, input_ids, predicted, labels, lam=0.3)
    out64.backward(g.to(dtype).double())
    assert out.dtype == dtype and out.shape == (B, T, D)
    assert rel_err(out, out64) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert rel_err(w.grad, w64.grad) < GRAD_RTOL[dtype]
    prompt = labels == IGNORE
    assert torch.equal(out[prompt], weight[input_ids[prompt]])  # ground truth kept bit-exact
    # The mixed row at t uses the prediction made at t - 1, never the one made at t.
    assert rel_err(out[0, 3], (0.7 * weight[input_ids[0, 3]].double() + 0.3 * weight[predicted[0, 2]].double())) < 1e-2


def test_inputs_embeds_frozen_weight_and_non_contiguous_ids(backend, device):
    weight = torch.randn(30, 8, device=device)
    input_ids = torch.randint(0, 30, (5, 2), device=device).t()
    predicted = torch.randint(0, 30, (5, 2), device=device).t()
    labels = input_ids.clone().masked_fill(torch.rand(2, 5, device=device) < 0.3, IGNORE)
    out = fastalign.ift_inputs_embeds(weight, input_ids, predicted, labels)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref.ift_inputs_embeds(weight, input_ids, predicted, labels).float())


def test_inputs_embeds_backward_skips_predictions_at_prompt_positions(backend, device):
    """A prediction that feeds a prompt position is never read, so it may be anything: the patched model's argmax
    is -100 where unscored. The backward scattered to it (an out-of-bounds index on the kernel path)."""
    weight = torch.randn(50, 4, device=device, requires_grad=True)
    input_ids = torch.tensor([[3, 4, 5, 6]], device=device)
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6]], device=device)
    predicted = torch.tensor([[IGNORE, 7, 8]], device=device)  # [B, T - 1]: pred[0] would feed position 1, a prompt
    out = fastalign.ift_inputs_embeds(weight, input_ids, predicted, labels, lam=0.2)
    out.backward(torch.ones_like(out))
    expected = torch.zeros(50, device=device)
    expected[[3, 4]] = 4.0  # prompt rows: all of g to the token
    expected[[5, 6]] = 0.8 * 4  # response rows: (1 - lam) g to the token ...
    expected[[7, 8]] = 0.2 * 4  # ... and lam g to the prediction made one position before
    torch.testing.assert_close(weight.grad.sum(1), expected)


def test_a_call_under_inference_mode_leaves_training_calls_working(backend, device):
    """The torch path's scan caches its decay matrix: one built under inference_mode could not be saved for
    backward, so an eval step broke every later training step at the same length."""
    logps = -torch.rand(2, 300, device=device)
    mask = torch.ones(2, 300, dtype=torch.bool, device=device)
    with torch.inference_mode():
        expected = fastalign.ift_loss(logps, mask, gamma=0.77)
    x = logps.clone().requires_grad_(True)
    loss = fastalign.ift_loss(x, mask, gamma=0.77)
    loss.backward()
    assert loss.item() == expected.item() and torch.isfinite(x.grad).all()


def test_inputs_embeds_kernel_gives_nan_for_out_of_range_ids(device):
    weight = torch.randn(11, 4, device=device)
    input_ids = torch.tensor([[3, 12345, 2, 1]], device=device)
    predicted = torch.tensor([[-7, 0, 10**12, 0]], device=device)
    labels = torch.tensor([[3, 12345, IGNORE, 1]], device=device)
    out = ift_inputs_embeds_fwd(weight, input_ids, predicted, labels, IGNORE, 0.2)
    assert torch.isnan(out[0, 1]).all()  # bad token
    assert torch.equal(out[0, 2], weight[2])  # prompt: the prediction (out of range) is never read
    assert torch.isnan(out[0, 3]).all()  # response whose shifted prediction is out of range
    assert torch.isfinite(out[0, 0]).all()


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs(device):
    logps = -torch.rand(2, 5, device=device)
    mask = torch.ones(2, 5, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match=r"gamma must be a number in \[0, 1\]"):
        fastalign.ift_loss(logps, mask, gamma=1.5)
    with pytest.raises(ValueError, match="gamma"):
        fastalign.IFTLoss(gamma=-0.1)
    with pytest.raises(TypeError, match="mask must be a bool"):
        fastalign.ift_loss(logps, mask.float())
    with pytest.raises(ValueError, match="mask must have shape"):
        fastalign.ift_loss(logps, mask[:, :4])
    with pytest.raises(ValueError, match=r"token_logps must have shape \[B, T\]"):
        fastalign.ift_loss(logps[0], mask[0])
    with pytest.raises(TypeError, match="token_logps must be float32"):
        fastalign.ift_loss(logps.double(), mask)
    with pytest.raises(ValueError, match=r"logits must have shape \[B, T, V\]"):
        fastalign.IFTLoss()(logps, mask.long())

    weight = torch.randn(10, 4, device=device)
    ids = torch.randint(0, 10, (2, 5), device=device)
    with pytest.raises(ValueError, match="predicted_ids must have shape"):
        fastalign.ift_inputs_embeds(weight, ids, ids[:, :3], ids)
    with pytest.raises(ValueError, match="labels must have shape"):
        fastalign.ift_inputs_embeds(weight, ids, ids, ids[:1])
    with pytest.raises(TypeError, match="input_ids must be an integer"):
        fastalign.ift_inputs_embeds(weight, ids.float(), ids, ids)
    with pytest.raises(ValueError, match=r"lam must be a number in \[0, 1\]"):
        fastalign.ift_inputs_embeds(weight, ids, ids, ids, lam=2.0)
    with pytest.raises(ValueError, match=r"embedding_weight must have shape \[V, D\]"):
        fastalign.ift_inputs_embeds(weight[0], ids, ids, ids)
    with pytest.raises(ValueError, match=r"input_ids must be on the same device as embedding_weight \(meta\)"):
        fastalign.ift_inputs_embeds(weight.to("meta"), ids, ids, ids)


@pytest.mark.parametrize(
    ("ignore_index", "error", "message"),
    [
        (None, TypeError, "ignore_index must be an int; got NoneType"),
        ("x", TypeError, "ignore_index must be an int; got str"),
        (True, TypeError, "ignore_index must be an int; got bool"),  # would treat label 1 as prompt
        (1.5, TypeError, "ignore_index must be an int; got float"),
        (2**64, ValueError, "ignore_index must fit in int64"),
    ],
)
def test_inputs_embeds_checks_ignore_index(ignore_index, error, message, backend):
    weight, ids = torch.randn(10, 4), torch.randint(0, 10, (2, 5))
    with pytest.raises(error, match=message):
        fastalign.ift_inputs_embeds(weight, ids, ids, ids, ignore_index=ignore_index)


def test_inputs_embeds_empty_weight_and_numpy_options(backend):
    """An empty weight gave index_select's RuntimeError on the torch path; a NumPy ignore_index crashed the kernel."""
    np = pytest.importorskip("numpy")
    weight, ids = torch.randn(10, 4), torch.randint(0, 10, (2, 5))
    with pytest.raises(ValueError, match=r"embedding_weight must have shape \[V, D\] with V > 0; got \(0, 4\)"):
        fastalign.ift_inputs_embeds(weight[:0], ids, ids, ids)
    labels = ids.masked_fill(ids < 5, IGNORE)
    expected = fastalign.ift_inputs_embeds(weight, ids, ids, labels, lam=0.25)
    got = fastalign.ift_inputs_embeds(weight, ids, ids, labels, lam=np.float32(0.25), ignore_index=np.int64(IGNORE))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["input_ids", "predicted_ids"])
def test_out_of_range_ids_raise_on_cpu(name, backend):
    weight = torch.randn(10, 4)
    ids = {"input_ids": torch.randint(0, 10, (2, 5)), "predicted_ids": torch.randint(0, 10, (2, 5))}
    ids[name][1, 3] = 10
    with pytest.raises(ValueError, match=rf"{name} holds 10, outside \[0, 10\)"):
        fastalign.ift_inputs_embeds(weight, ids["input_ids"], ids["predicted_ids"], ids["input_ids"])
    if name == "predicted_ids":  # the prediction made at t = 3 is mixed in at t = 4: on a prompt position it is unread
        labels = ids["input_ids"].clone()
        labels[1, 4] = IGNORE
        out = fastalign.ift_inputs_embeds(weight, ids["input_ids"], ids["predicted_ids"], labels)
        assert torch.equal(out[1, 4], weight[ids["input_ids"][1, 4]])


def test_reference_matches_a_direct_transcription():
    """The oracle itself, checked on one hand-sized case: gamma = 0.5, N = 3, l = (1, 2, 4) after a prompt token."""
    logps = -torch.tensor([[9.0, 1.0, 2.0, 4.0]], dtype=torch.float64)
    mask = torch.tensor([[False, True, True, True]])
    # item = l / 3; C = (1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4) / 3 = (3, 4, 4) / 3; w = C * 3 / (11 / 3)
    w = torch.tensor([3.0, 4.0, 4.0]) * 3 / 11
    expected = (torch.tensor([1.0, 2.0, 4.0]) * w).sum() / 3
    torch.testing.assert_close(ref.ift_loss(logps, mask, gamma=0.5), expected.double())
    torch.testing.assert_close(fastalign.ift_loss(logps.float(), mask, gamma=0.5), expected.float())
