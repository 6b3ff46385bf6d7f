"""linear_token_logprobs / linear_token_stats against a float64 eager reference, on the kernels and the torch path.

The Triton interpreter runs the real kernels with small tiles, so odd H and V (H=67, V=1031) span several tiles
along every dimension, a masked last K block and a partial last vocabulary tile.
"""

from __future__ import annotations

import linear_fsdp_worker
import pytest
import torch
from distributed import run_on_processes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from utils import GRAD_RTOL, VALUE_RTOL, assert_norm_close, rel_err

import fastalign
import fastalign.linear_logprobs as linear_module
from fastalign import kernels as kernels_module
from fastalign._backend import forced_backend
from fastalign.kernels import fused_linear_loss as loss_kernels
from fastalign.kernels import linear_logprobs as linear_kernels
from fastalign.reference import linear_logprobs as ref

IGNORE = -100
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
DTYPES += [pytest.param(torch.float16, id="fp16")]


def make_inputs(shape, H, V, dtype, device, ignore_frac=0.25, bias=True):
    hidden = torch.randn(*shape, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * 2 / H**0.5).to(dtype)  # logits of std ~2
    b = torch.randn(V, device=device).to(dtype) if bias else None
    labels = torch.randint(0, V, shape, device=device)
    labels[torch.rand(shape, device=device) < ignore_frac] = IGNORE
    return hidden, weight, b, labels


def check_against_reference(
    hidden, weight, bias, labels, grad_scale=None, entropy_grad=True, memory_budget=None, extras=False, **head
):
    """Forward and backward of linear_token_stats vs float64, with random upstream gradients; with `extras`, the
    log(sum p^2) and mean logit outputs too."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight)]
    leaves.append(None if bias is None else bias.detach().clone().requires_grad_(True))
    stats = fastalign.linear_token_stats(
        *leaves[:2], labels, leaves[2], memory_budget=memory_budget, log_sum_sq_probs=extras, mean_logits=extras, **head
    )
    g = torch.randn(labels.shape, device=labels.device) if grad_scale is None else grad_scale
    ge = torch.randn(labels.shape, device=labels.device) if entropy_grad else torch.zeros(labels.shape)
    (stats.logprobs * g + stats.entropy * ge).sum().backward()

    leaves64 = [None if t is None else t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    logp64 = ref.linear_token_logprobs(leaves64[0], leaves64[1], labels, leaves64[2], IGNORE, **head)
    ent64 = ref.linear_token_entropy(leaves64[0], leaves64[1], leaves64[2], **head)
    (logp64 * g + ent64 * ge).sum().backward()
    z64 = ref.linear_logits(*[t.detach() if t is not None else None for t in leaves64], **head)

    dtype = hidden.dtype
    assert stats.logprobs.dtype == torch.float32 and stats.logprobs.shape == labels.shape
    assert rel_err(stats.logprobs, logp64) < VALUE_RTOL[dtype] * 10
    assert rel_err(stats.entropy, ent64) < VALUE_RTOL[dtype] * 10
    # The greedy token is the first maximum; a near tie (closer than fp32 accumulation) may pick either.
    picked = z64.gather(-1, stats.argmax.unsqueeze(-1)).squeeze(-1)
    assert (picked >= z64.max(-1).values - 1e-5).all()
    assert (stats.logprobs[labels == IGNORE] == 0).all()
    if extras:
        for got, expected in zip(stats[3:], ref.linear_token_extras(*leaves64, **head)):
            assert rel_err(got, expected) < VALUE_RTOL[dtype] * 10
    # Each gradient is a sum over rows (weight, bias) or the vocabulary (hidden) of terms in d loss / d u, u = hidden
    # weight^T + bias, each rounded (bf16 d u) before the sum: the rounding is relative to the terms' root sum of
    # squares, which a sum of terms of both signs can exceed many times (V=2, bf16: the bias gradient is (a, -a), a
    # sum over rows 1/25 of its terms' magnitudes, in two draws of the shapes test_random_shapes draws was 1.3e-2 and
    # 1.9e-2 of itself off). Without such cancellation that root sum of squares is about the gradient's own norm.
    h64, w64 = leaves64[0].detach(), leaves64[1].detach()
    rows = torch.zeros(*labels.shape, w64.shape[0], dtype=w64.dtype, device=w64.device)  # a bias per row: d u
    rows = (rows if bias is None else rows + leaves64[2].detach()).requires_grad_(True)
    of_u = ref.linear_token_logprobs(h64, w64, labels, rows, IGNORE, **head) * g
    (du,) = torch.autograd.grad((of_u + ref.linear_token_entropy(h64, w64, rows, **head) * ge).sum(), rows)
    du2 = du.reshape(-1, w64.shape[0]).square()
    terms = (du2 @ w64.square(), du2.T @ h64.square().reshape(du2.shape[0], -1), du2.sum(0))  # squares, summed
    for leaf, leaf64, squares, name in zip(leaves, leaves64, terms, ("hidden", "weight", "bias")):
        if leaf is None:
            continue
        assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape, name
        assert torch.isfinite(leaf.grad).all(), name
        bound = GRAD_RTOL[dtype] * max(leaf64.grad.norm().item(), squares.sum().sqrt().item())
        assert_norm_close(leaf.grad, leaf64.grad, 0.0, bound, name)


@pytest.mark.parametrize(
    "shape, H, V",
    [
        pytest.param((3, 37), 67, 1031, id="B3-T37-H67-V1031"),
        pytest.param((2, 5), 128, 300, id="B2-T5-H128-V300"),  # H % BLOCK_K == 0: the unmasked, aligned loads
        pytest.param((1,), 16, 7, id="N1-H16-V7"),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64_reference(shape, H, V, dtype, backend, device):
    check_against_reference(*make_inputs(shape, H, V, dtype, device))


@pytest.mark.parametrize(
    "head",
    [
        pytest.param({"temperature": 0.7}, id="temperature"),
        pytest.param({"softcap": 3.0, "logit_scale": 1.7}, id="softcap-logit_scale"),
        pytest.param({"temperature": 2.0, "softcap": 30.0, "logit_scale": 0.25}, id="all"),
    ],
)
def test_logit_chain_and_grad_output(head, backend, device):
    hidden, weight, bias, labels = make_inputs((2, 9), 67, 515, torch.float32, device)
    check_against_reference(hidden, weight, bias, labels, **head)
    check_against_reference(hidden, weight, None, labels, grad_scale=2.5, entropy_grad=False, **head)


@pytest.mark.parametrize(
    "head",
    [
        pytest.param({}, id="plain"),
        pytest.param({"temperature": 0.7, "softcap": 3.0, "logit_scale": 1.7}, id="all"),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extras_match_float64_at_every_position(head, dtype, backend, device):
    """log(sum p^2) and the mean logit, from the forward's one pass: float32 at every position (ignored rows too),
    not differentiable; asking for them changes neither the log-probs nor any gradient."""
    hidden, weight, bias, labels = make_inputs((3, 37), 67, 1031, dtype, device)
    labels[1] = IGNORE
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    stats = fastalign.linear_token_stats(
        *leaves[:2], labels, leaves[2], entropy=False, argmax=False, log_sum_sq_probs=True, mean_logits=True, **head
    )
    lssp64, mean64 = ref.linear_token_extras(*[t.double() for t in (hidden, weight, bias)], **head)
    for got, expected in ((stats.log_sum_sq_probs, lssp64), (stats.mean_logits, mean64)):
        assert got.dtype == torch.float32 and got.shape == labels.shape and not got.requires_grad
        assert rel_err(got, expected) < VALUE_RTOL[dtype] * 10
    assert stats.entropy is None and stats.argmax is None

    g = torch.randn(labels.shape, device=device)
    (stats.logprobs * g).sum().backward()
    plain = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logp = fastalign.linear_token_logprobs(*plain[:2], labels, plain[2], **head)
    (logp * g).sum().backward()
    torch.testing.assert_close(stats.logprobs, logp)
    for leaf, leaf_plain in zip(leaves, plain):
        torch.testing.assert_close(leaf.grad, leaf_plain.grad)

    only_one = fastalign.linear_token_stats(hidden, weight, labels, bias, entropy=False, argmax=False, mean_logits=True)
    assert only_one.log_sum_sq_probs is None and rel_err(only_one.mean_logits, ref.linear_token_extras(
        hidden.double(), weight.double(), bias.double())[1]) < VALUE_RTOL[dtype] * 10  # fmt: skip


def test_extras_agree_with_trls_fused_head(backend, device):
    """TRL 1.16's ChunkedLogProbFunction defines the same two outputs (log_sum_sq_probs, mean_logits)."""
    chunked = pytest.importorskip("trl.kernels.chunked_logprob")
    hidden, weight, bias, labels = make_inputs((50,), 64, 777, torch.float32, device, ignore_frac=0.0)
    head = {"temperature": 0.8, "softcap": 5.0, "logit_scale": 1.3}
    ours = fastalign.linear_token_stats(hidden, weight, labels, bias, log_sum_sq_probs=True, mean_logits=True, **head)
    outputs = ("log_sum_sq_probs", "mean_logits")
    trl = chunked.ChunkedLogProbFunction.apply(hidden, weight, bias, labels, 0.8, 256, 5.0, 1.3, outputs)
    torch.testing.assert_close(ours.log_sum_sq_probs, trl[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.mean_logits, trl[3], rtol=1e-5, atol=1e-5)


GPU_TILES = sorted({tiles for candidates in linear_kernels._TILES.values() for tiles in candidates})


@pytest.mark.parametrize("tiles", GPU_TILES, ids=lambda t: "x".join(map(str, t[:3])) + f"-w{t[3]}-s{t[4]}")
def test_every_gpu_tile_candidate_matches_reference(tiles, device, monkeypatch):
    """Each launch tile the GPU tuner may pick, forced for both kernels: rows span two row tiles and the
    vocabulary several column tiles, the last one ragged; H a multiple of every BLOCK_K (the aligned loads)."""
    monkeypatch.setattr(linear_kernels, "tile_candidates", lambda kernel, dtype, aligned=True: (tiles,))
    V = 2 * tiles.block_v + 77
    check_against_reference(*make_inputs((2, tiles.block_m - 3), 128, V, torch.bfloat16, device), extras=True)
    check_against_reference(*make_inputs((1, 9), 128, V, torch.float32, device), memory_budget=2**16)


def test_pick_fastest_times_each_candidate_once_per_key(monkeypatch):
    timed = []
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    monkeypatch.setattr(kernels_module, "_can_time", lambda: True)
    monkeypatch.setattr(kernels_module, "_time_ms", lambda launch, config: timed.append(config) or times[config])
    monkeypatch.setattr(kernels_module, "_CHOSEN", {})
    assert kernels_module.pick_fastest(("op", 1), ["a", "b", "c"], None) == "b"
    assert kernels_module.pick_fastest(("op", 1), ["a", "b", "c"], None) == "b"
    assert timed == ["a", "b", "c"]  # the second call reuses the choice
    assert kernels_module.pick_fastest(("op", 2), ["a", "c"], None) == "c"
    assert kernels_module.pick_fastest(("op", 3), ["a"], None) == "a" and len(timed) == 5
    monkeypatch.setattr(kernels_module, "_can_time", lambda: False)
    assert kernels_module.pick_fastest(("op", 4), ["c", "b"], None) == "c" and len(timed) == 5


def test_a_candidate_over_the_devices_shared_memory_is_never_picked():
    def launch(config):
        raise kernels_module.triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")

    assert kernels_module._time_ms(launch, "too big") == float("inf")


def test_memory_budget_bounds_every_chunk(backend, device, monkeypatch):
    """A small budget splits the vocabulary into many chunks, each within budget (which holds at least one
    vocabulary tile here); the same result as one chunk."""
    hidden, weight, bias, labels = make_inputs((4, 8), 64, 1031, torch.bfloat16, device)
    chunks = []
    real = linear_module._vocab_chunk

    def spy(V, budget, bytes_per_column, multiple):
        columns = real(V, budget, bytes_per_column, multiple)
        chunks.append((columns, columns * bytes_per_column, budget))
        return columns

    monkeypatch.setattr(linear_module, "_vocab_chunk", spy)
    budget = 128 * 1024
    check_against_reference(hidden, weight, bias, labels, memory_budget=budget)
    assert chunks and all(nbytes <= budget for _, nbytes, _ in chunks)
    assert max(columns for columns, _, _ in chunks) < 1031 // 2  # several chunks
    check_against_reference(hidden, weight, bias, labels, memory_budget=2**30)


def test_only_valid_rows_are_scored(device, monkeypatch):
    """The kernels see the rows whose label counts, and every row only when entropy or argmax is asked for."""
    hidden, weight, _, labels = make_inputs((3, 11), 32, 200, torch.float32, device, ignore_frac=0.5)
    seen = []
    real = linear_module.linear_logprobs_fwd

    def spy(x, w, b, rows, *args):
        seen.append(rows.clone())
        return real(x, w, b, rows, *args)

    monkeypatch.setattr(linear_module, "linear_logprobs_fwd", spy)
    fastalign.linear_token_logprobs(hidden, weight, labels)
    valid = (labels.reshape(-1) != IGNORE).nonzero().squeeze(1)
    assert torch.equal(seen[-1], valid)
    fastalign.linear_token_stats(hidden, weight, labels, entropy=False, argmax=True)
    assert seen[-1].numel() == labels.numel()


@pytest.mark.parametrize("layout", ["shifted-slice", "transposed", "weight-transposed"])
def test_non_contiguous_inputs(layout, backend, device):
    H, V = 40, 333
    hidden = torch.randn(2, 7, H, device=device)[:, :-1]  # hidden[:, :-1], as a causal LM shifts
    weight = torch.randn(V, H, device=device) / H**0.5
    if layout == "transposed":
        hidden = torch.randn(6, 2, H, device=device).transpose(0, 1)
    elif layout == "weight-transposed":
        weight = (torch.randn(H, V, device=device) / H**0.5).T
    labels = torch.randint(0, V, hidden.shape[:-1], device=device)
    labels[0, 0] = IGNORE
    assert not (hidden.is_contiguous() and weight.is_contiguous())
    check_against_reference(hidden, weight, None, labels)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("layout", ["bias-every-other", "padded-rows"])
def test_strided_views_read_and_get_the_right_elements(layout, dtype, backend, device):
    """Issue 16.1: views of larger tensors (a bias big[::2]; hidden and weight rows padded past H) must be read at
    their own strides, and their gradients land on those elements of the base tensor, and nowhere else."""
    H, V = 40, 333
    pad = 0 if layout == "bias-every-other" else 3
    bases = [
        torch.randn(3, 7, H + pad, device=device),
        torch.randn(V, H + 5 * (pad > 0), device=device) * 2 / H**0.5,
        torch.randn(2 * V, device=device),
    ]
    bases = [b.to(dtype).requires_grad_(True) for b in bases]
    views = (bases[0][..., :H], bases[1][:, :H], bases[2][::2])
    assert not views[2].is_contiguous() and (pad == 0 or not views[1].is_contiguous())
    labels = torch.randint(0, V, (3, 7), device=device)
    labels[0, :2] = IGNORE
    stats = fastalign.linear_token_stats(*views[:2], labels, views[2], argmax=False)
    g, ge = torch.randn(labels.shape, device=device), torch.randn(labels.shape, device=device)
    (stats.logprobs * g + stats.entropy * ge).sum().backward()

    leaves64 = [v.detach().double().requires_grad_(True) for v in views]
    logp64 = ref.linear_token_logprobs(leaves64[0], leaves64[1], labels, leaves64[2], IGNORE)
    ent64 = ref.linear_token_entropy(*leaves64)
    (logp64 * g + ent64 * ge).sum().backward()
    assert rel_err(stats.logprobs, logp64) < 1e-5 and rel_err(stats.entropy, ent64) < 1e-5
    grads = (bases[0].grad[..., :H], bases[1].grad[:, :H], bases[2].grad[::2])
    for grad, leaf64, name in zip(grads, leaves64, ("hidden", "weight", "bias")):
        assert rel_err(grad, leaf64.grad) < GRAD_RTOL[dtype], name
    assert (bases[0].grad[..., H:] == 0).all() and (bases[1].grad[:, H:] == 0).all()
    assert (bases[2].grad[1::2] == 0).all()


def test_every_position_masked(backend, device):
    hidden, weight, bias, labels = make_inputs((3, 4), 24, 129, torch.bfloat16, device)
    labels[1] = IGNORE  # one fully masked sequence
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = fastalign.linear_token_logprobs(*leaves[:2], labels, leaves[2])
    out.backward(torch.randn_like(out))
    assert (out[1] == 0).all() and (leaves[0].grad[1] == 0).all()

    for leaf in leaves:
        leaf.grad = None
    out = fastalign.linear_token_logprobs(*leaves[:2], torch.full_like(labels, IGNORE), leaves[2])
    out.sum().backward()
    assert (out == 0).all()
    assert all(torch.equal(leaf.grad, torch.zeros_like(leaf)) for leaf in leaves)


def test_tied_embeddings(backend, device):
    """The lm_head is the input embedding: its gradient sums both uses."""
    V, H = 211, 32
    embedding = torch.randn(V, H, device=device, dtype=torch.float64)
    ids = torch.randint(0, V, (2, 9), device=device)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE

    def loss(weight, fused):
        hidden = torch.tanh(torch.nn.functional.embedding(ids, weight))
        if fused:
            logp = fastalign.linear_token_logprobs(hidden.float(), weight.float(), labels)
        else:
            logp = ref.linear_token_logprobs(hidden, weight, labels, ignore_index=IGNORE)
        return -logp.sum()

    (expected,) = torch.autograd.grad(loss(embedding.requires_grad_(True), False), embedding)
    weight = embedding.detach().float().requires_grad_(True)
    loss(weight, True).backward()
    assert rel_err(weight.grad, expected) < GRAD_RTOL[torch.float32]


def test_autocast_computes_in_the_autocast_dtype(backend, device):
    hidden, weight, bias, labels = make_inputs((2, 6), 32, 200, torch.float32, device)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = fastalign.linear_token_logprobs(*leaves[:2], labels, leaves[2])
    out.sum().backward()
    expected = fastalign.linear_token_logprobs(hidden.bfloat16(), weight.bfloat16(), labels, bias.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    assert all(leaf.grad.dtype == torch.float32 and torch.isfinite(leaf.grad).all() for leaf in leaves)


def test_argmax_takes_the_first_maximum(backend, device):
    V, H = 900, 16
    hidden = torch.eye(2, H, device=device)  # orthogonal rows: each row's maxima are only its own
    weight = torch.randn(V, H, device=device) * 0.01
    weight[[17, 800]] = hidden[0] * 10  # a tie across tiles for row 0
    weight[[300, 301]] = hidden[1] * 20  # a tie inside one tile for row 1
    stats = fastalign.linear_token_stats(hidden, weight, torch.zeros(2, dtype=torch.int64, device=device))
    assert stats.argmax.tolist() == [17, 300]


def test_empty_input(backend, device):
    hidden = torch.randn(0, 5, 8, device=device, requires_grad=True)
    weight = torch.randn(11, 8, device=device, requires_grad=True)
    out = fastalign.linear_token_logprobs(hidden, weight, torch.zeros(0, 5, dtype=torch.int64, device=device))
    out.sum().backward()
    assert out.shape == (0, 5) and hidden.grad.shape == hidden.shape and (weight.grad == 0).all()


@pytest.mark.parametrize(
    "backend_name, N, H, V",
    [pytest.param("interpret", 2048, 64, 515, id="interpreter"), pytest.param("torch", 3000, 64, 1031, id="torch")],
)
def test_thousands_of_tokens_within_budget(backend_name, N, H, V, device):
    if device.type != "cpu":
        pytest.skip("the CPU backends")
    hidden, weight, bias, labels = make_inputs((N,), H, V, torch.bfloat16, device)
    with forced_backend(backend_name):
        check_against_reference(hidden, weight, bias, labels, memory_budget=256 * 1024)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    T=st.integers(1, 40),
    H=st.integers(1, 80),
    V=st.integers(1, 700),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_random_shapes(T, H, V, bias, dtype, device):
    check_against_reference(*make_inputs((T,), H, V, dtype, device, bias=bias), temperature=1.5)


def test_fsdp2(device):
    """The lm_head weight as an FSDP2 DTensor (gathered once per call) and tied to the embedding under FSDP2,
    on 2 gloo processes: see tests/linear_fsdp_worker.py."""
    if device.type != "cpu":
        pytest.skip("gloo on the CPU")
    run_on_processes(linear_fsdp_worker.main, "kernel")


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_argument(device):
    hidden = torch.randn(2, 3, 8, device=device)
    weight = torch.randn(11, 8, device=device)
    labels = torch.zeros(2, 3, dtype=torch.int64, device=device)
    f = fastalign.linear_token_logprobs
    with pytest.raises(ValueError, match="labels must have shape"):
        f(hidden, weight, labels[:, :2])
    with pytest.raises(TypeError, match="labels must be an integer"):
        f(hidden, weight, labels.float())
    with pytest.raises(TypeError, match="hidden must be float32"):
        f(hidden.double(), weight, labels)
    with pytest.raises(TypeError, match="weight must be float32"):
        f(hidden, weight.long(), labels)
    with pytest.raises(ValueError, match=r"weight must have shape \[V, H\] = \[V, 8\]"):
        f(hidden, weight[:, :7], labels)
    with pytest.raises(ValueError, match="weight must have shape"):
        f(hidden, weight[0], labels)
    with pytest.raises(ValueError, match="weight must be on hidden's device"):
        f(hidden, weight.to("meta"), labels)
    with pytest.raises(ValueError, match=r"bias must have shape \[V\]"):
        f(hidden, weight, labels, torch.zeros(10, device=device))
    with pytest.raises(TypeError, match="bias must be float32"):
        f(hidden, weight, labels, torch.zeros(11, dtype=torch.int64, device=device))
    for name, value in (("temperature", 0.0), ("softcap", -1.0), ("logit_scale", float("inf"))):
        with pytest.raises(ValueError, match=name):
            f(hidden, weight, labels, **{name: value})
    with pytest.raises(ValueError, match="memory_budget"):
        f(hidden, weight, labels, memory_budget=0)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        f(hidden, weight, labels, ignore_index=-100.0)
    with pytest.raises(ValueError, match="temperature must be at least float32's smallest normal number"):
        f(hidden, weight, labels, temperature=1e-45)  # NaN before
    with pytest.raises(TypeError, match="logit_scale must be a finite number > 0; got bool True"):
        f(hidden, weight, labels, logit_scale=True)
    for flag in ("entropy", "argmax", "log_sum_sq_probs", "mean_logits"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False; got 'no'"):  # "no" is truthy
            fastalign.linear_token_stats(hidden, weight, labels, **{flag: "no"})


def test_meta_tensors_infer_shapes(backend):
    """As token_logprobs: the autocast query raised 'unknown device type for autocast' on meta tensors."""
    hidden = torch.empty(2, 3, 8, device="meta", requires_grad=True)
    labels = torch.empty(2, 3, dtype=torch.int64, device="meta")
    stats = fastalign.linear_token_stats(hidden, torch.empty(11, 8, device="meta"), labels)
    assert stats.logprobs.shape == stats.argmax.shape == (2, 3) and stats.logprobs.device.type == "meta"
    (stats.logprobs.sum() + stats.entropy.sum()).backward()
    assert hidden.grad.shape == hidden.shape


@pytest.mark.parametrize("bad", [11, 12345, -1])
def test_out_of_range_label_raises(bad, backend, device):
    labels = torch.zeros(2, 3, dtype=torch.int64, device=device)
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=f"labels holds {bad}, outside \\[0, 11\\)"):
        fastalign.linear_token_logprobs(torch.randn(2, 3, 8, device=device), torch.randn(11, 8, device=device), labels)


# ----------------------------------------------------------------------------- the fused-linear losses' kernels


def _padded(M, V, dtype, device):
    """[M, V] view of NaN-filled rows padded_width(V) long, as the fast fused-linear path allocates its buffers."""
    width = loss_kernels.padded_width(V)
    return torch.full((M, width), float("nan"), device=device, dtype=dtype)[:, :V]


@pytest.mark.parametrize("V", [1031, 1040])
def test_loss_kernels_on_padded_rows_match_float64(V, device):
    """logits_stats and logits_grad (the fast fused-linear losses' elementwise kernels) at an odd V (the interpreter's
    256-column tiles: a partial last tile whose loads stop at the padded width 1040) and at V = 1040 (no padding), on
    padded rows and bias with NaN in the padding (the kernels read it and must drop it) and on contiguous ones, with
    softcap, temperature, logit_scale and every extra; d logits in bf16 into a padded buffer of its own and in place
    over fp32 logits; every output against float64."""
    M, head = 6, {"temperature": 0.7, "softcap": 3.0, "logit_scale": 1.3}
    a = torch.randn(M, V, device=device) * 4
    bias = torch.randn(V, device=device)
    labels = torch.randint(0, V, (M,), device=device)
    labels[0] = V - 1  # in the last, partial tile
    coef, coef_mean = torch.randn(M, device=device), torch.randn(M, device=device)

    a64 = a.double().requires_grad_(True)
    z64 = ref.linear_logits(a64, torch.eye(V, dtype=torch.float64, device=device), bias.double(), **head)  # a's chain
    logp64 = z64.log_softmax(1)
    loss64 = (coef.double() * logp64.gather(1, labels[:, None])[:, 0] + coef_mean.double() * logp64.mean(1)).sum()
    (da64,) = torch.autograd.grad(loss64, a64)
    p64 = logp64.exp()
    expected = (
        torch.logsumexp(z64, 1),
        z64.gather(1, labels[:, None])[:, 0],
        -(p64 * logp64).sum(1),
        z64.argmax(1),
        torch.log((p64 * p64).sum(1)),
        z64.mean(1),
    )
    args = (head["temperature"], head["softcap"], head["logit_scale"])
    padded = _padded(M, V, torch.float32, device).copy_(a)
    assert loss_kernels._width(V, padded) == loss_kernels.padded_width(V)
    nan_padded_bias = torch.full((loss_kernels.padded_width(V),), float("nan"), device=device)[:V].copy_(bias)
    for layout, rows, b in (("padded", padded, nan_padded_bias), ("contiguous", a.clone(), bias)):
        stats = loss_kernels.logits_stats(rows, b, labels, *args, linear_kernels.Outputs(*[True] * 4))
        for name, got, want in zip(("lse", "z_label", "entropy", "argmax", "log_sum_sq", "mean"), stats, expected):
            if name == "argmax":  # softcap's tanh saturates: fp32 ties logits that float64 tells apart
                z = z64.detach()
                assert (z.gather(1, got[:, None])[:, 0] >= z.max(1).values - 1e-5).all(), layout
            else:
                assert rel_err(got, want) < 1e-5, (layout, name)
        lse = stats[0]
        out = (
            _padded(M, V, torch.bfloat16, device)
            if layout == "padded"
            else torch.empty_like(rows, dtype=torch.bfloat16)
        )
        loss_kernels.logits_grad(rows, out, b, labels, lse, coef, coef_mean, *args)
        assert rel_err(out, da64) < GRAD_RTOL[torch.bfloat16], layout
        loss_kernels.logits_grad(rows, rows, b, labels, lse, coef, coef_mean, *args)  # in place, fp32
        assert rel_err(rows, da64) < 1e-5, layout


def test_loss_grad_kernel_on_a_vocabulary_slice_matches_float64(device):
    """logits_grad on a vocab-parallel rank's slice: `vocab` is the whole vocabulary's size, lse the whole one's, and
    labels -1 where another slice holds them; d a of the slice equals the whole vocabulary's d a restricted to it
    (label smoothing's mean term over the whole vocabulary). A vocab smaller than the slice is refused."""
    M, V, start, width = 6, 1300, 300, 517
    a = torch.randn(M, V, device=device) * 3
    labels = torch.randint(0, V, (M,), device=device)
    labels[:2] = torch.tensor([start, start + width - 1])  # the slice's first and last columns; the rest anywhere
    coef, coef_mean = torch.randn(M, device=device), torch.randn(M, device=device)
    a64 = a.double().requires_grad_(True)
    logp64 = (a64 / 0.7).log_softmax(1)
    loss64 = (coef.double() * logp64.gather(1, labels[:, None])[:, 0] + coef_mean.double() * logp64.mean(1)).sum()
    (da64,) = torch.autograd.grad(loss64, a64)
    local = labels - start
    local = torch.where((local >= 0) & (local < width), local, -1)
    lse = torch.logsumexp(a.double() / 0.7, 1).float()
    rows = a[:, start : start + width].clone()
    out = torch.empty_like(rows)
    loss_kernels.logits_grad(rows, out, None, local, lse, coef, coef_mean, 0.7, None, 1.0, vocab=V)
    assert rel_err(out, da64[:, start : start + width]) < 1e-5
    with pytest.raises(ValueError, match="vocab must be an int >= a.shape"):
        loss_kernels.logits_grad(rows, out, None, local, lse, coef, coef_mean, 0.7, None, 1.0, vocab=width - 1)


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("head", [{}, {"temperature": 0.7, "softcap": 3.0, "logit_scale": 1.3}], ids=["plain", "chain"])
def test_row_lse_output_and_its_gradient_match_float64(dtype, head, backend, device):
    """The op's log-sum-exp output (what a vocab-parallel rank combines; its gradient, the softmax, is folded into the
    backward as the log-prob gradient minus it plus a term at the label column) against float64: its values, and
    every gradient of sum(g * logp + g_lse * lse + g_ent * entropy), with several
    vocabulary chunks (a small memory budget), a bias, ignored rows and NaN-poisoned upstream gradients at them."""
    hidden, weight, bias, labels = make_inputs((3, 37), 40, 1031, dtype, device)
    labels[1] = IGNORE  # a fully ignored row
    full = {"temperature": 1.0, "softcap": None, "logit_scale": 1.0, **head}
    spec = linear_module._Head(IGNORE, full["temperature"], full["softcap"], full["logit_scale"], 2**16)
    outputs = linear_kernels.Outputs(entropy=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logp, entropy, _, _, _, lse = linear_module._LinearTokenLogprobs.apply(
        leaves[0], leaves[1], leaves[2], labels, spec, outputs, True
    )
    g, g_lse, g_ent = (torch.randn(labels.shape, device=device) for _ in range(3))
    ignored = labels == IGNORE
    g_lse[ignored] = float("nan")  # the gradient at rows without a label is never read
    (g * logp + g_lse * lse + g_ent * entropy).sum().backward()

    leaves64 = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    z64 = ref.linear_logits(*leaves64, **full)
    lse64 = torch.logsumexp(z64, -1)
    logp64 = ref.linear_token_logprobs(*leaves64[:2], labels, leaves64[2], IGNORE, **full)
    ent64 = ref.linear_token_entropy(*leaves64, **full)
    (g * logp64 + torch.where(ignored, 0.0, g_lse) * lse64 + g_ent * ent64).sum().backward()
    assert rel_err(lse, lse64) < VALUE_RTOL[dtype] * 10  # every row: the entropy scores the ignored ones too
    assert rel_err(logp, logp64) < VALUE_RTOL[dtype] * 10
    for leaf, leaf64, name in zip(leaves, leaves64, ("hidden", "weight", "bias")):
        assert torch.isfinite(leaf.grad).all(), name
        assert rel_err(leaf.grad, leaf64.grad) < GRAD_RTOL[dtype], name


def test_loss_kernels_read_padding_only_where_the_rows_own_it(device):
    """The kernels' loads stop at padded_width(V) only for views whose every row, the last included, owns that many
    elements; otherwise at V, so nothing past the allocation is read."""
    V = 1031
    width = loss_kernels.padded_width(V)
    assert width == 1040 and loss_kernels.padded_width(1040) == 1040
    rows = _padded(4, V, torch.float32, device)
    assert loss_kernels._width(V, rows) == width
    assert loss_kernels._width(V, rows[1:3]) == width
    assert loss_kernels._width(V, rows, _padded(4, V, torch.bfloat16, device)) == width
    assert loss_kernels._width(V, torch.empty(4, V, device=device)) == V  # contiguous: the next row's head
    assert loss_kernels._width(V, rows, torch.empty(4, V, device=device)) == V  # every buffer must be padded
    short = torch.empty(3 * width + V, device=device).as_strided(
        (4, V), (width, 1)
    )  # the last row's padding is missing
    assert loss_kernels._width(V, short) == V
    # The bias: its padded copy is read up to the padded width, a plain [V] bias only to V; None is no buffer.
    bias = torch.randn(V, device=device)
    padded = loss_kernels.padded_bias(bias)
    assert torch.equal(padded, bias) and padded.untyped_storage().nbytes() == 4 * width
    assert loss_kernels._width(V, rows, padded) == width and loss_kernels._width(V, rows, None) == width
    assert loss_kernels._width(V, rows, bias) == V


def test_fast_path_gemms_write_the_padded_views_in_place(device):
    """The fast path's GEMMs take the [:, :V] views of padded rows as they are: no copy of the logits or d logits."""
    if device.type != "cpu":
        pytest.skip("the profiler's CPU op list; cuBLAS takes a row stride >= V as its leading dimension")
    from torch.profiler import ProfilerActivity, profile

    from fastalign import linear_losses

    n, H, V = 37, 64, 1031
    h, weight = torch.randn(n, H, device=device), torch.randn(V, H, device=device)
    a, d = _padded(n, V, torch.float32, device), _padded(n, V, torch.float32, device).normal_()
    acc = torch.empty(V, H, device=device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        linear_losses._logits_into(a, h, weight)
        dh = linear_losses._dlogits_times_weight(d, weight)
        linear_losses._accumulate_dweight(acc, d, h, first=True)
    ops = {event.name for event in prof.events()}
    assert not ops & {"aten::copy_", "aten::clone", "aten::contiguous", "aten::empty_like"}, ops
    assert rel_err(a, h @ weight.T) < 1e-6 and torch.isnan(a.as_strided((n, 9), (a.stride(0), 1), V)).all()
    assert rel_err(dh, d @ weight) < 1e-6 and rel_err(acc, d.T @ h) < 1e-6


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_fast_path_hands_the_kernels_padded_rows(dtype, device, monkeypatch):
    """At an odd V the fast fused-linear path's buffers (the fp32 logits, and d logits in bf16) have rows of
    padded_width(V), so the kernels move 16 bytes per access; the loss still matches float64."""
    from fastalign import linear_losses

    V, strides = 1031, []

    def spying(launcher):
        def spy(*args, **kwargs):
            strides.extend(t.stride(0) for t in args[:2] if t.dim() == 2)  # the logits, and logits_grad's out
            return launcher(*args, **kwargs)

        return spy

    for name in ("logits_stats", "logits_grad"):
        monkeypatch.setattr(linear_losses, name, spying(getattr(linear_losses, name)))
    hidden, weight, bias, labels = make_inputs((2, 9), 24, V, dtype, device)
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = linear_losses.cross_entropy_from_hidden(*leaves[:2], labels, leaves[2], strategy="fast")[0]
    loss.backward()
    assert len(strides) >= 3 and set(strides) == {loss_kernels.padded_width(V)}, strides
    leaves64 = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    loss64 = ref.linear_cross_entropy(*leaves64[:2], labels, leaves64[2], IGNORE)
    loss64.backward()
    assert abs(loss.item() - loss64.item()) <= (1e-5 if dtype == torch.float32 else 1e-3) * max(1.0, abs(loss64.item()))
    for leaf, leaf64 in zip(leaves, leaves64):
        assert rel_err(leaf.grad, leaf64.grad) < (1e-4 if dtype == torch.float32 else GRAD_RTOL[dtype])
