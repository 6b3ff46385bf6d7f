"""token_logprobs / token_stats against a float64 eager reference, on the kernels and the torch path."""

from __future__ import annotations

import logprobs_dtensor_worker
import pytest
import torch
from distributed import run_on_processes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from utils import GRAD_RTOL, VALUE_RTOL, assert_norm_close, rel_err

import fastalign
from fastalign._backend import as_btv
from fastalign.kernels.logprobs import token_logprobs_bwd, token_logprobs_fwd
from fastalign.reference import logprobs as ref

IGNORE = -100


def make_inputs(shape, V, dtype, device, ignore_frac=0.25, scale=3.0):
    logits = (torch.randn(*shape, V, device=device) * scale).to(dtype)
    labels = torch.randint(0, V, shape, device=device)
    labels[torch.rand(shape, device=device) < ignore_frac] = IGNORE
    return logits, labels


def check_against_reference(logits, labels, temperature=1.0, grad_scale=None, entropy_grad=True):
    """Forward and backward of token_stats vs float64, with random upstream gradients."""
    x = logits.detach().requires_grad_(True)  # not a clone: that would make a strided layout contiguous
    stats = fastalign.token_stats(x, labels, temperature=temperature, log_sum_sq_probs=True, mean_logits=True)
    g = torch.randn(labels.shape, device=labels.device) if grad_scale is None else grad_scale
    ge = torch.randn(labels.shape, device=labels.device) if entropy_grad else torch.zeros(labels.shape)
    (stats.logprobs * g + stats.entropy * ge).sum().backward()

    x64 = logits.detach().double().requires_grad_(True)
    logp64 = ref.token_logprobs(x64, labels, IGNORE, temperature)
    ent64 = ref.token_entropy(x64, temperature)
    (logp64 * g + ent64 * ge).sum().backward()

    dtype = logits.dtype
    assert stats.logprobs.dtype == torch.float32 and stats.logprobs.shape == labels.shape
    # Relative to the norm, with a floor of float32 rounding near 1 per row (as the extras below): a row whose label
    # is a dominant maximum has log p = -ln(1 + 4e-5) and entropy 3e-4, both taken from the fp32 sum 1 + e (rounded
    # by 6e-8), and when every counted row is such a row no relative precision is left (test_random_shapes drew V=2,
    # temperature 0.5 and such rows in 2 runs of 31: log p off by 8.8e-4 of itself, entropy by 1.8e-4).
    rows = labels.numel() ** 0.5
    assert_norm_close(stats.logprobs, logp64, VALUE_RTOL[dtype], 1e-6 * rows, "logprobs")
    assert_norm_close(stats.entropy, ent64, VALUE_RTOL[dtype] * 10, 1e-6 * rows, "entropy")
    assert torch.equal(stats.argmax, x64.detach().argmax(-1))
    for extra, expected in (
        (stats.log_sum_sq_probs, ref.token_log_sum_sq_probs(x64.detach(), temperature)),
        (stats.mean_logits, ref.token_mean_logits(x64.detach(), temperature)),
    ):
        assert extra.dtype == torch.float32 and not extra.requires_grad
        finite = torch.isfinite(expected)  # -inf logits give a -inf mean; the extras match there too
        assert torch.equal(extra[~finite], expected[~finite].float())
        # Relative to the norm, with a floor of float32 rounding of a log near 0: log sum p^2 is -1e-7 when one p is
        # 1 - 5e-8, and both ways of summing the p round 1 + 5e-8.
        rows = finite.sum().item() ** 0.5
        assert_norm_close(extra[finite], expected[finite], VALUE_RTOL[dtype] * 10, 1e-6 * rows, "extra")
    assert (stats.logprobs[labels == IGNORE] == 0).all()
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    assert torch.isfinite(x.grad).all()
    # The same floor, in units of each row's upstream gradients (the rounding near 1 is scaled by them and by
    # 1 / temperature), plus a subnormal step of the gradient's dtype per element (fp16 flushes the ~4e-8 gradient of
    # such a row).
    upstream = (torch.as_tensor(g).abs() + ge.abs()).expand(labels.shape).norm().item()
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps * x.grad.numel() ** 0.5
    assert_norm_close(x.grad, x64.grad, GRAD_RTOL[dtype], 1e-6 * upstream / temperature + tiny, "gradient")


@pytest.mark.parametrize(
    "shape, V",
    [
        pytest.param((3,), 32001, id="N3-V32001"),
        pytest.param((2, 2), 50257, id="B2-T2-V50257"),
        pytest.param((2,), 128256, id="N2-V128256"),
        pytest.param((4, 1), 1000, id="B4-T1-V1000"),
        pytest.param((1, 257), 515, id="B1-T257-V515"),
        pytest.param((1,), 7, id="N1-V7"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_matches_float64_reference(shape, V, dtype, backend, device):
    logits, labels = make_inputs(shape, V, dtype, device)
    check_against_reference(logits, labels)


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_temperature_and_grad_output(temperature, backend, device):
    logits, labels = make_inputs((3, 5), 333, torch.float32, device)
    check_against_reference(logits, labels, temperature=temperature)
    check_against_reference(logits, labels, temperature=temperature, grad_scale=2.5, entropy_grad=False)


@pytest.mark.parametrize(
    "layout",
    ["shifted-slice", "transposed", "vocab-stride-2", "three-leading-dims", "expanded"],
)
def test_non_contiguous_logits(layout, backend, device):
    V = 300
    if layout == "shifted-slice":  # logits[:, :-1]: row stride != V and not viewable as [N, V]
        logits = torch.randn(2, 6, V, device=device)[:, :-1]
    elif layout == "transposed":
        logits = torch.randn(5, 2, V, device=device).transpose(0, 1)
    elif layout == "vocab-stride-2":
        logits = torch.randn(2, 5, 2 * V, device=device)[..., ::2]
    elif layout == "three-leading-dims":
        logits = torch.randn(2, 3, 5, V, device=device).permute(1, 0, 2, 3)
    else:
        logits = torch.randn(1, 1, V, device=device).expand(2, 5, V)
    labels = torch.randint(0, V, logits.shape[:-1], device=device)
    labels[0, 0] = IGNORE
    assert not logits.is_contiguous()
    check_against_reference(logits, labels)


@pytest.mark.parametrize(
    "V",
    [pytest.param(16384, id="V16384-whole-tiles"), pytest.param(16400, id="V16400"), pytest.param(8201, id="V8201")],
)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_kernel_tiles_and_alignment(V, offset, dtype, device):
    """The kernels at every layout they specialize on: rows 16-byte aligned (128-bit loads; 16-bit logits as 32-bit
    word pairs when V is even) or not, whole tiles only or a partial last one; forward, backward and in place."""
    base, labels = make_inputs((3,), -(-V // 16) * 16 + 16, dtype, device)  # row stride a multiple of 16 logits
    labels = labels.clamp(max=V - 1)
    check_against_reference(base[:, offset : offset + V], labels, temperature=0.9)
    g = torch.randn(3, device=device)
    # The in-place call's layout (a clone would be contiguous: rows aligned otherwise, another specialization,
    # whose sums may round differently in the last bit).
    x = base.clone()[:, offset : offset + V].detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(fastalign.token_logprobs(x, labels), x, g)
    leaf = base.clone().requires_grad_(True)
    logits = (leaf * 1)[:, offset : offset + V]
    fastalign.token_logprobs(logits, labels, inplace_backward=True).backward(g)
    assert torch.equal(logits.detach(), expected) and torch.equal(leaf.grad[:, offset : offset + V], expected)


@pytest.mark.parametrize("rows", [1, 3, 8], ids=["rows1", "rows3", "rows8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path_chunks(rows, dtype, monkeypatch):
    """The torch path's chunks of `rows` rows: pieces of a sequence (T > rows) and several whole sequences with a
    short last chunk (T <= rows), on a shifted slice, with temperature, extras and every gradient."""
    from fastalign import logprobs

    monkeypatch.setattr(logprobs, "_TORCH_BUFFER_BYTES", rows * 4 * 300)
    base, labels = make_inputs((5, 5), 300, dtype, "cpu")
    with fastalign._backend.forced_backend("torch"):
        check_against_reference(base[:, :-1], labels[:, :-1], temperature=0.8)
        check_against_reference(base[:, :-1], labels[:, :-1], entropy_grad=False)


def test_fully_ignored_rows_are_zero(backend, device):
    logits, labels = make_inputs((3, 4), 129, torch.bfloat16, device)
    labels[1] = IGNORE
    x = logits.clone().requires_grad_(True)
    out = fastalign.token_logprobs(x, labels)
    out.backward(torch.randn_like(out))
    assert (out[1] == 0).all() and (x.grad[1] == 0).all()
    all_ignored = torch.full_like(labels, IGNORE)
    x.grad = None
    out = fastalign.token_logprobs(x, all_ignored)
    out.sum().backward()
    assert (out == 0).all() and (x.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inplace_backward_overwrites_logits_with_the_gradient(dtype, backend, device):
    base, labels = make_inputs((2, 7), 500, dtype, device)
    labels = labels[:, :-1]
    g = torch.randn(labels.shape, device=device)
    x = base.clone()[:, :-1].detach().requires_grad_(True)  # the in-place call's layout, as above
    (expected,) = torch.autograd.grad(fastalign.token_logprobs(x, labels), x, g)

    leaf = base.clone().requires_grad_(True)
    logits = (leaf * 1)[:, :-1]  # a strided non-leaf, as a shifted lm_head output is
    out = fastalign.token_logprobs(logits, labels, inplace_backward=True)
    out.backward(g)
    assert torch.equal(logits.detach(), expected)  # the buffer now holds the gradient
    assert torch.equal(leaf.grad[:, :-1], expected) and (leaf.grad[:, -1] == 0).all()


def test_ignored_rows_of_neg_inf_logits_have_a_zero_gradient(backend, device):
    """A fully masked padding row (every logit -inf) whose label is ignored: log-prob 0 and gradient 0, not the
    NaN of its softmax times 0."""
    logits = torch.randn(3, 40, device=device)
    logits[1] = float("-inf")
    x = logits.requires_grad_(True)
    out = fastalign.token_logprobs(x, torch.tensor([3, IGNORE, 7], device=device))
    out.backward(torch.tensor([0.5, 2.0, -1.0], device=device))
    assert out[1] == 0 and (x.grad[1] == 0).all() and torch.isfinite(x.grad).all()


def test_inplace_backward_over_rows_that_share_memory_writes_a_fresh_buffer(backend, device):
    """An expanded [B, 1, V] -> [B, T, V] prior: written in place, every row would take every row's gradient."""
    base = torch.randn(2, 1, 50, device=device, requires_grad=True)
    labels = torch.randint(0, 50, (2, 3), device=device)
    g = torch.randn(2, 3, device=device)
    (expected,) = torch.autograd.grad(fastalign.token_logprobs(base.expand(2, 3, 50), labels), base, g)
    logits = (base * 1).expand(2, 3, 50)
    (got,) = torch.autograd.grad(fastalign.token_logprobs(logits, labels, inplace_backward=True), base, g)
    torch.testing.assert_close(got, expected)


def test_a_second_backward_after_inplace_backward_raises(backend, device):
    """The kernels' in-place write is marked for autograd, as the torch path's in-place ops are, so reusing the
    graph cannot read gradients as logits."""
    leaf = torch.randn(2, 6, 32, device=device, requires_grad=True)
    out = fastalign.token_logprobs(leaf * 1, torch.randint(0, 32, (2, 6), device=device), inplace_backward=True)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.uint16])
def test_narrow_integer_labels(dtype, backend):
    """Labels in any integer dtype are checked as the ids they hold: in int8 or uint8, V = 300 would wrap to 44 and
    ignore_index -100 to 156, so valid ids were refused and a uint8 156 passed as ignored."""
    logits = torch.randn(2, 3, 300)
    labels = torch.tensor([[100, 3, 0], [7, 119, 5]])
    expected = fastalign.token_logprobs(logits, labels)
    torch.testing.assert_close(fastalign.token_logprobs(logits, labels.to(dtype)), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="labels holds 100, outside \\[0, 50\\)"):
        fastalign.token_logprobs(logits[..., :50], labels.to(dtype))
    if dtype == torch.uint8:
        with pytest.raises(ValueError, match="labels holds 156, outside"):
            fastalign.token_logprobs(logits[..., :150], torch.full((2, 3), 156, dtype=dtype))
    if dtype.is_signed:
        ignored = labels.clone()
        ignored[0, 0] = IGNORE
        torch.testing.assert_close(
            fastalign.token_logprobs(logits, ignored.to(dtype)), fastalign.token_logprobs(logits, ignored)
        )


def test_numpy_scalar_options(backend):
    """A temperature, softcap, logit scale or budget read from a numpy config is a number like any other."""
    np = pytest.importorskip("numpy")
    logits, labels = torch.randn(2, 5, 64), torch.randint(0, 64, (2, 5))
    expected = fastalign.token_logprobs(logits, labels, temperature=0.7)
    torch.testing.assert_close(fastalign.token_logprobs(logits, labels, temperature=np.float32(0.7)), expected)
    hidden, weight = torch.randn(2, 5, 8), torch.randn(64, 8)
    options = dict(temperature=0.7, softcap=30.0, logit_scale=0.5, memory_budget=2**20)
    expected = fastalign.linear_token_logprobs(hidden, weight, labels, **options)
    as_numpy = {name: np.float32(v) if isinstance(v, float) else np.int64(v) for name, v in options.items()}
    torch.testing.assert_close(fastalign.linear_token_logprobs(hidden, weight, labels, **as_numpy), expected)


def test_argmax_takes_the_first_maximum(backend, device):
    logits = torch.zeros(2, 9000, device=device)
    logits[0, [17, 8500]] = 5.0  # a tie across two blocks
    logits[1, [4000, 4001]] = 5.0  # a tie inside one block
    stats = fastalign.token_stats(logits, torch.zeros(2, dtype=torch.int64, device=device))
    assert stats.argmax.tolist() == [17, 4000]


def test_neg_inf_logits(backend, device):
    logits = torch.randn(3, 64, device=device)
    logits[:, 10:20] = float("-inf")  # a banned-token mask, as logits processors write
    labels = torch.tensor([0, 5, IGNORE], device=device)
    check_against_reference(logits, labels, entropy_grad=False)
    assert torch.isfinite(fastalign.token_stats(logits, labels).entropy).all()


def test_nan_logits_give_nan_outputs(backend, device):
    """A row holding NaN gives NaN log-prob (0 where ignored), lse, entropy and extras on every path, and the
    argmax of its non-NaN logits (index 0 when every logit is NaN): compiled Triton's max skips NaN. The
    interpreter's tl.argmax used to raise on an all-NaN row."""
    V = 9000  # three fp32 blocks
    logits = torch.randn(4, V, device=device)
    logits[0] = float("nan")  # all NaN, labelled
    logits[1] = float("nan")  # all NaN, ignored
    logits[2, [5, 8999]] = float("nan")  # some NaN, in the first and the last block
    logits[2, 4500] = 50.0
    labels = torch.tensor([3, IGNORE, 7, 9], device=device)
    x = logits.clone().requires_grad_(True)
    stats = fastalign.token_stats(x, labels, log_sum_sq_probs=True, mean_logits=True)
    assert torch.isnan(stats.logprobs[[0, 2]]).all() and stats.logprobs[1] == 0
    for field in (stats.entropy, stats.log_sum_sq_probs, stats.mean_logits):
        assert torch.isnan(field[:3]).all() and torch.isfinite(field[3])
    assert stats.argmax.tolist() == [0, 0, 4500, logits[3].argmax().item()]
    clean = logits[3:].double()
    assert rel_err(stats.logprobs[3:], ref.token_logprobs(clean, labels[3:])) < VALUE_RTOL[torch.float32]
    assert rel_err(stats.entropy[3:], ref.token_entropy(clean)) < VALUE_RTOL[torch.float32] * 10
    stats.logprobs.sum().backward()
    assert torch.isnan(x.grad[[0, 2]]).all() and torch.isfinite(x.grad[3]).all()


@pytest.mark.parametrize("entropy_grad", [False, True], ids=["logp", "logp+entropy"])
def test_gradient_of_a_near_certain_label_is_shift_invariant(entropy_grad, backend, device):
    """A log-prob near 0 and the label's g (1 - p) at p ~ 0.997, logits shifted by 100: taken relative to the row max,
    both stay within float32 rounding of 1 (through lse ~ 110 they would carry lse's rounding, 4e-6)."""
    logits = torch.tensor([[-0.8, 1.9, -2.2, -2.0, -1.5, 1.2, 10.3], [0.3, -1.0, 8.0, 0.2, 1.1, -0.4, 0.0]])
    logits = logits.to(device) + 100.0
    labels = logits.argmax(-1)
    g, ge = torch.tensor([0.7, -1.3], device=device), torch.tensor([0.9, 0.4], device=device) * entropy_grad
    x = logits.clone().requires_grad_(True)
    stats = fastalign.token_stats(x, labels)
    (stats.logprobs * g + stats.entropy * ge).sum().backward()
    x64 = logits.double().requires_grad_(True)
    (ref.token_logprobs(x64, labels) * g + ref.token_entropy(x64) * ge).sum().backward()
    rows = torch.arange(2, device=device)
    assert ((stats.logprobs.double() - ref.token_logprobs(logits.double(), labels)).abs() < 1e-6).all()
    assert ((x.grad[rows, labels].double() - x64.grad[rows, labels]).abs() < 1e-6 * g.abs()).all()


def test_empty_input(backend, device):
    x = torch.randn(0, 5, 11, device=device, requires_grad=True)
    out = fastalign.token_logprobs(x, torch.zeros(0, 5, dtype=torch.int64, device=device))
    out.sum().backward()
    assert out.shape == (0, 5) and x.grad.shape == x.shape


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 9),
    V=st.integers(1, 4100),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_random_shapes(B, T, V, temperature, dtype, device):
    logits, labels = make_inputs((B, T), V, dtype, device)
    check_against_reference(logits, labels, temperature=temperature)


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_logits(world, backend, device):
    """Shard(-1) DTensor logits on 2 and 4 gloo processes match the op on the whole logits in one process: every
    output and d logits (also in place), fp32 and bf16, uneven slices, labels in every slice, ignored rows, a slice
    of -inf logits only; replicated logits and an out-of-range label raise. See tests/logprobs_dtensor_worker.py."""
    if device.type != "cpu":
        pytest.skip("gloo on the CPU")
    run_on_processes(logprobs_dtensor_worker.main, backend, world, world=world)


# ----------------------------------------------------------------------------- bad input


def test_bad_shapes_dtypes_devices(device):
    logits = torch.randn(2, 3, 11, device=device)
    labels = torch.zeros(2, 3, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="labels must have shape"):
        fastalign.token_logprobs(logits, labels[:, :2])
    with pytest.raises(TypeError, match="labels must be an integer"):
        fastalign.token_logprobs(logits, labels.float())
    with pytest.raises(TypeError, match="labels must be an integer"):
        fastalign.token_logprobs(logits, labels.bool())
    with pytest.raises(TypeError, match="logits must be float32"):
        fastalign.token_logprobs(logits.double(), labels)
    with pytest.raises(TypeError, match="logits must be float32"):
        fastalign.token_logprobs(labels, labels)
    with pytest.raises(ValueError, match="labels must be on the same device"):
        fastalign.token_logprobs(logits, labels.to("meta"))
    with pytest.raises(ValueError, match="temperature"):
        fastalign.token_logprobs(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        fastalign.token_logprobs(logits, labels, temperature=float("inf"))
    for flag in ("entropy", "argmax", "log_sum_sq_probs", "mean_logits", "inplace_backward", "strict"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False; got 'no'"):  # "no" is truthy
            fastalign.token_stats(logits, labels, **{flag: "no"})
    with pytest.raises(TypeError, match="ignore_index must be an int; got bool"):
        fastalign.token_logprobs(logits, labels, ignore_index=True)
    for bad in (2**64, -(2**63) - 1):  # OverflowError before
        with pytest.raises(ValueError, match=f"ignore_index must fit in int64, as the labels; got {bad}"):
            fastalign.token_logprobs(logits, labels, ignore_index=bad)
    with pytest.raises(TypeError, match="temperature must be a finite number > 0; got bool True"):
        fastalign.token_logprobs(logits, labels, temperature=True)
    with pytest.raises(ValueError, match="temperature must be at least float32's smallest normal number"):
        fastalign.token_logprobs(logits, labels, temperature=1e-39)  # 1 / 1e-39 overflows float32: NaN before


def test_numpy_scalar_options_are_python_numbers(backend, device):
    np = pytest.importorskip("numpy")
    logits = torch.randn(2, 3, 11, device=device)
    labels = torch.tensor([[0, IGNORE, 4], [10, 2, IGNORE]], device=device)
    expected = fastalign.token_logprobs(logits, labels, temperature=0.5)
    got = fastalign.token_logprobs(logits, labels, temperature=np.float32(0.5), ignore_index=np.int64(IGNORE))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [11, 12345, -1, -101])
def test_out_of_range_label_raises_on_cpu(bad, backend):
    logits = torch.randn(2, 3, 11)
    labels = torch.zeros(2, 3, dtype=torch.int64)
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=f"labels holds {bad}, outside \\[0, 11\\)"):
        fastalign.token_logprobs(logits, labels)


@pytest.mark.parametrize("bad", [11, 10**12, -1, -(10**12)])
def test_kernel_gives_nan_for_out_of_range_label_without_reading_out_of_bounds(bad, device):
    """What CUDA callers get without strict=True: NaN for that token, its gradient NaN, others exact.

    A label of 10**12 would read a terabyte past the buffer if it were not masked; the interpreter
    would fault or return garbage instead of NaN.
    """
    x = torch.randn(1, 4, 11, device=device)
    labels = torch.tensor([3, bad, IGNORE, 0], device=device)
    logp, lse, *_ = token_logprobs_fwd(x, labels, IGNORE, 1.0, False, False)
    assert torch.isnan(logp[1])
    assert logp[2] == 0
    expected = ref.token_logprobs(x[0].double(), labels.masked_fill(labels != 3, 0))
    torch.testing.assert_close(logp[[0, 3]].double(), expected[[0, 3]], rtol=1e-5, atol=1e-6)
    dx = torch.empty_like(x)
    token_logprobs_bwd(x, dx, labels, lse, logp, torch.ones(4, device=device), None, None, IGNORE, 1.0)
    assert torch.isnan(dx[0, 1]).all() and (dx[0, 2] == 0).all() and torch.isfinite(dx[0, [0, 3]]).all()


def test_strict_raises(device):
    logits = torch.randn(3, 11, device=device)
    with pytest.raises(ValueError, match="outside"):
        fastalign.token_logprobs(logits, torch.tensor([0, 11, 2], device=device), strict=True)


# ----------------------------------------------------------------------------- layout helper


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(4, 7),
        lambda: torch.randn(3, 5, 7)[:, 1:],
        lambda: torch.randn(3, 1, 5, 7)[:, :, ::2],
        lambda: torch.randn(7),
        lambda: torch.randn(2, 3, 4, 7).transpose(1, 2),
    ],
)
def test_as_btv_is_a_view_of_the_same_rows(make):
    x = make()
    v = as_btv(x)
    assert v.dim() == 3 and v.stride(-1) == 1
    assert torch.equal(v.reshape(-1, x.shape[-1]), x.reshape(-1, x.shape[-1]))
