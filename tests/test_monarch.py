"""Monarch: projection, MonarchLinear, monarchize, the memopt::monarch_matmul op, the Triton
kernels (TRITON_INTERPRET=1 on CPU), the monarch pass, and a tiny GPT-2 trained with Monarch MLPs."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memopt
import memopt.ops.monarch as monarch_op
from memopt.config import Config, MonarchOptions
from memopt.nn import MonarchLinear, monarchize
from memopt.triton_kernels.monarch import (
    monarch_backward_reference,
    monarch_dense,
    monarch_matmul_reference,
    project,
)

# (in_features, out_features, nblocks): square, rectangular both ways, sizes that need padding,
# and nblocks**2 == n (the paper's case, block rank 1).
LAYER_SHAPES = [(64, 64, 4), (64, 64, 8), (48, 80, 4), (96, 32, 2), (37, 53, 3)]

# (tokens, nblocks, p, r, s): odd block sizes, a single token, block rank 1, and r = 16 (the
# Triton kernels' tile-aligned split addressing; the others take the general path).
OP_SHAPES = [(7, 3, 5, 2, 9), (1, 2, 16, 3, 17), (33, 4, 8, 1, 4), (21, 2, 8, 16, 5)]

# Relative tolerance (max abs error / max abs reference, reference in float64). float32
# accumulates ~p+q products per output: ~1e-6 observed; bfloat16 rounds x, w and the
# intermediate h to 8 mantissa bits (2**-8 = 4e-3 each), so a few 1e-3 relative per output.
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (no graph cached by an earlier test's compile)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max())


def _factors(tokens, nblocks, p, r, s, dtype, seed=0, lead=()):
    gen = torch.Generator().manual_seed(seed)
    q = nblocks * r
    x = torch.randn(*lead, tokens, nblocks * p, generator=gen, dtype=torch.float64)
    w1 = torch.randn(nblocks, q, p, generator=gen, dtype=torch.float64) / p**0.5
    w2 = torch.randn(nblocks, s, q, generator=gen, dtype=torch.float64) / q**0.5
    return x.to(dtype), w1.to(dtype), w2.to(dtype)


# ------------------------------------------------------------------------------- projection


@pytest.mark.parametrize("in_features,out_features,nblocks", LAYER_SHAPES)
def test_projection_of_a_monarch_matrix_returns_it(in_features, out_features, nblocks):
    torch.manual_seed(0)
    layer = MonarchLinear(in_features, out_features, nblocks, dtype=torch.float64)
    dense = layer.to_dense().detach()
    w1, w2, error = project(dense, nblocks, layer.block_rank)
    recovered = monarch_dense(w1, w2)[:out_features, :in_features]
    assert error < 1e-5
    assert float((recovered - dense).norm() / dense.norm()) < 1e-5
    # float32 weights are projected in float32: still well under 1e-5.
    w1, w2, error32 = project(dense.float(), nblocks, layer.block_rank)
    assert error32 < 1e-5
    assert float((monarch_dense(w1, w2)[:out_features, :in_features].double() - dense).norm() / dense.norm()) < 1e-5


@pytest.mark.parametrize("in_features,out_features,nblocks", LAYER_SHAPES)
def test_projection_of_a_random_matrix_is_optimal(in_features, out_features, nblocks):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
    layer = MonarchLinear(in_features, out_features, nblocks, dtype=torch.float64)
    w1, w2, error = project(weight, nblocks, layer.block_rank)
    approx = monarch_dense(w1, w2)[:out_features, :in_features]
    assert abs(float((approx - weight).norm() / weight.norm()) - error) < 1e-12
    # Eckart-Young per block: the squared error is the energy of the dropped singular values.
    p, s = layer.in_block, layer.out_block
    padded = torch.zeros(nblocks * s, nblocks * p, dtype=torch.float64)
    padded[:out_features, :in_features] = weight
    sigma = torch.linalg.svdvals(padded.view(nblocks, s, nblocks, p).permute(0, 2, 1, 3))
    dropped = sigma[..., layer.block_rank :].square().sum().sqrt() / weight.norm()
    assert abs(float(dropped) - error) < 1e-10
    # No random perturbation of the factors does better.
    for scale in (1e-3, 1e-2, 1e-1):
        for _ in range(4):
            pw1 = w1 + scale * torch.randn(w1.shape, generator=gen, dtype=torch.float64)
            pw2 = w2 + scale * torch.randn(w2.shape, generator=gen, dtype=torch.float64)
            perturbed = monarch_dense(pw1, pw2)[:out_features, :in_features]
            assert float((perturbed - weight).norm() / weight.norm()) >= error - 1e-12


# ------------------------------------------------------------------------------ MonarchLinear


@pytest.mark.parametrize("in_features,out_features,nblocks", LAYER_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_monarch_linear_equals_its_dense_product(in_features, out_features, nblocks, bias):
    torch.manual_seed(2)
    layer = MonarchLinear(in_features, out_features, nblocks, bias=bias, dtype=torch.float64)
    x = torch.randn(3, 5, in_features, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 5, out_features, dtype=torch.float64)
    out = layer(x)
    out.backward(grad)
    grads = [x.grad, layer.w1.grad, layer.w2.grad]
    # The same function written with the dense matrix: outputs and gradients agree.
    x2 = x.detach().clone().requires_grad_()
    w1 = layer.w1.detach().clone().requires_grad_()
    w2 = layer.w2.detach().clone().requires_grad_()
    ref = x2 @ monarch_dense(w1, w2)[:out_features, :in_features].T
    if bias:
        ref = ref + layer.bias.detach()
    ref.backward(grad)
    assert out.shape == (3, 5, out_features)
    assert _rel(out, ref) < RTOL[torch.float64]
    for actual, expected in zip(grads, [x2.grad, w1.grad, w2.grad]):
        assert _rel(actual, expected) < 1e-10
    # Parameter count of the square layers: 2 n^2 / nblocks.
    if in_features == out_features and in_features % nblocks**2 == 0:
        assert layer.w1.numel() + layer.w2.numel() == 2 * in_features**2 // nblocks


def test_monarch_linear_init_scale_matches_linear():
    torch.manual_seed(3)
    x = torch.randn(4096, 256)
    with torch.no_grad():
        monarch_std = MonarchLinear(256, 256, 4, bias=False)(x).std()
        dense_std = torch.nn.Linear(256, 256, bias=False)(x).std()
    assert 0.8 < float(monarch_std / dense_std) < 1.25


def test_from_dense_linear_and_error():
    torch.manual_seed(4)
    linear = torch.nn.Linear(40, 24)
    layer = MonarchLinear.from_dense(linear, nblocks=2)
    dense = linear.weight.detach()
    assert abs(float((layer.to_dense().detach() - dense).norm() / dense.norm()) - layer.projection_error) < 1e-5
    assert 0 < layer.projection_error < 1
    torch.testing.assert_close(layer.bias.detach(), linear.bias.detach())


def test_monarchize_replaces_matching_layers():
    torch.manual_seed(5)
    model = torch.nn.Sequential()
    model.add_module("up", torch.nn.Linear(64, 128))
    model.add_module("act", torch.nn.GELU())
    model.add_module("down", torch.nn.Linear(128, 64))
    model.add_module("head", torch.nn.Linear(64, 10))
    x = torch.randn(6, 64)
    with torch.no_grad():
        up_weight = model.up.weight.clone()
    replaced = monarchize(model, nblocks=4, min_features=32, targets=["up", "down"])
    assert [r.name for r in replaced] == ["up", "down"]
    assert isinstance(model.up, MonarchLinear) and isinstance(model.down, MonarchLinear)
    assert isinstance(model.head, torch.nn.Linear)  # not in targets
    first = replaced[0]
    assert first.monarch_params == model.up.w1.numel() + model.up.w2.numel() < first.dense_params == 64 * 128
    assert abs(float((model.up.to_dense().detach() - up_weight).norm() / up_weight.norm()) - first.rel_error) < 1e-5
    assert model(x).shape == (6, 10)
    # min_features keeps small layers dense; already-Monarch layers are not touched again.
    assert monarchize(model, nblocks=4, min_features=65) == []
    with pytest.raises(ValueError, match="nblocks"):
        monarchize(model, nblocks=1)
    with pytest.raises(ValueError, match="non-empty list of name patterns"):
        monarchize(model, targets=[])


# ----------------------------------------------------------------------------------- the op


@pytest.mark.parametrize("shape", OP_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_matches_reference_outputs_and_gradients(shape, dtype):
    x, w1, w2 = _factors(*shape, dtype=torch.float64, lead=(2,))
    grad = torch.randn(*x.shape[:-1], shape[1] * shape[4], dtype=torch.float64)
    expected = monarch_matmul_reference(x, w1, w2)
    expected_grads = monarch_backward_reference(grad, x, w1, w2)
    inputs = [t.to(dtype).requires_grad_() for t in (x, w1, w2)]
    out = torch.ops.memopt.monarch_matmul(*inputs)
    out.backward(grad.to(dtype))
    assert out.dtype == dtype and out.shape == expected.shape
    assert _rel(out, expected) < RTOL[dtype]
    for tensor, expected_grad in zip(inputs, expected_grads):
        assert _rel(tensor.grad, expected_grad) < RTOL[dtype]


def test_reference_backward_matches_autograd():
    x, w1, w2 = _factors(5, 3, 4, 2, 7, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (x, w1, w2)]
    grad = torch.randn(5, 21, dtype=torch.float64)
    monarch_matmul_reference(*inputs).backward(grad)
    for tensor, expected in zip(inputs, monarch_backward_reference(grad, x, w1, w2)):
        assert _rel(tensor.grad, expected) < 1e-12


def test_opcheck():
    x, w1, w2 = _factors(6, 3, 5, 2, 7, dtype=torch.float32)
    torch.library.opcheck(torch.ops.memopt.monarch_matmul, (x, w1.requires_grad_(), w2.requires_grad_()))
    torch.library.opcheck(torch.ops.memopt.monarch_matmul, (x.view(2, 3, 15), w1.detach(), w2.detach()))
    grad = torch.randn(6, 21)
    torch.library.opcheck(torch.ops.memopt.monarch_matmul_backward, (grad, x, w1.detach(), w2.detach()))


def test_op_dtypes_under_autocast():
    # The forward casts like aten's matmuls (to the autocast dtype) and then computes exactly
    # what the op computes on those inputs; the backward op keeps its dtype (autocast would
    # otherwise run the reference's bmm in bfloat16 where the fake implementation says float32).
    x, w1, w2 = _factors(6, 3, 5, 2, 7, dtype=torch.float32)
    grad = torch.randn(6, 21)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.memopt.monarch_matmul(x, w1, w2)
        grads = torch.ops.memopt.monarch_matmul_backward(grad, x, w1, w2)
    assert out.dtype == torch.bfloat16
    by_hand = torch.ops.memopt.monarch_matmul(x.bfloat16(), w1.bfloat16(), w2.bfloat16())
    torch.testing.assert_close(out, by_hand, rtol=0, atol=0)
    assert all(g.dtype == torch.float32 for g in grads)
    reference_grads = monarch_backward_reference(grad.double(), x.double(), w1.double(), w2.double())
    assert all(_rel(g, r) < RTOL[torch.float32] for g, r in zip(grads, reference_grads))


def test_op_rejects_bad_shapes():
    x, w1, w2 = _factors(4, 2, 3, 2, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="features"):
        torch.ops.memopt.monarch_matmul(x[:, :-1], w1, w2)
    with pytest.raises(ValueError, match="w2"):
        torch.ops.memopt.monarch_matmul(x, w1, w2[:, :, :-1])
    with pytest.raises(ValueError, match="0-d"):
        torch.ops.memopt.monarch_matmul(x[0, 0], w1, w2)


def test_monarch_linear_names_its_input_width():
    """Padded inside to a multiple of nblocks, but the error names the layer's own width."""
    layer = MonarchLinear(15, 12, nblocks=4)
    assert layer(torch.randn(2, 15)).shape == (2, 12)
    for x in (torch.randn(2, 14), torch.randn(2, 16), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"MonarchLinear\(15, 12\) takes inputs of shape \(\.\.\., 15\)"):
            layer(x)


# ---------------------------------------------------------------------------- Triton kernels

_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(
    not (_TRITON and (_INTERPRET or torch.cuda.is_available())),
    reason="Triton kernels need triton and either TRITON_INTERPRET=1 (CPU interpreter) or a CUDA GPU",
)
@pytest.mark.parametrize("shape", OP_SHAPES)
@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float16,
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.skipif(
                _INTERPRET or not torch.cuda.is_available(),
                reason="bfloat16 tl.dot needs a GPU: Triton's interpreter has no bfloat16 dot",
            ),
        ),
    ],
)
def test_triton_kernels_match_reference(shape, dtype):
    from memopt.triton_kernels.monarch import monarch_backward_triton, monarch_matmul_triton

    device = "cpu" if _INTERPRET else "cuda"
    x, w1, w2 = _factors(*shape, dtype=torch.float64)
    grad = torch.randn(x.shape[0], shape[1] * shape[4], dtype=torch.float64)
    expected = monarch_matmul_reference(x, w1, w2)
    expected_grads = monarch_backward_reference(grad, x, w1, w2)
    args = [t.to(device, dtype) for t in (x, w1, w2)]
    out = monarch_matmul_triton(*args)
    grads = monarch_backward_triton(grad.to(device, dtype), *args)
    assert out.dtype == dtype
    assert _rel(out.cpu(), expected) < RTOL[dtype]
    for actual, reference in zip(grads, expected_grads):
        assert actual.shape == reference.shape
        assert _rel(actual.cpu(), reference) < RTOL[dtype]


@pytest.mark.skipif(
    not (_TRITON and (_INTERPRET or torch.cuda.is_available())),
    reason="Triton kernels need triton and either TRITON_INTERPRET=1 (CPU interpreter) or a CUDA GPU",
)
def test_triton_kernels_with_int64_tile_offsets(monkeypatch):
    # Real inputs take the int64 tile offsets only past ~8M-element strides; a zero limit
    # sends these small ones down that path.
    from memopt.triton_kernels import monarch as kernels

    monkeypatch.setattr(kernels, "_INT32_TILE_LIMIT", 0)
    shape = (21, 2, 8, 16, 5)  # r = 16: the tile-aligned split on the interpreter's 16-wide tiles
    device = "cpu" if _INTERPRET else "cuda"
    x, w1, w2 = _factors(*shape, dtype=torch.float64)
    grad = torch.randn(x.shape[0], shape[1] * shape[4], dtype=torch.float64)
    args = [t.to(device, torch.float32) for t in (x, w1, w2)]
    assert _rel(kernels.monarch_matmul_triton(*args).cpu(), monarch_matmul_reference(x, w1, w2)) < RTOL[torch.float32]
    grads = kernels.monarch_backward_triton(grad.to(device, torch.float32), *args)
    for actual, reference in zip(grads, monarch_backward_reference(grad, x, w1, w2)):
        assert _rel(actual.cpu(), reference) < RTOL[torch.float32]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the op's CUDA implementation needs a GPU")
@pytest.mark.parametrize("kernel", monarch_op.KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_on_cuda_matches_reference_with_each_kernel(dtype, kernel, monkeypatch):
    monkeypatch.setattr(monarch_op, "chosen_kernels", {})
    monkeypatch.setattr(monarch_op, "_kernel", "auto")
    monarch_op.set_kernel(kernel)
    x, w1, w2 = _factors(300, 4, 64, 16, 64, dtype=torch.float64, lead=(2,))
    grad = torch.randn(*x.shape[:-1], 4 * 64, dtype=torch.float64)
    expected = monarch_matmul_reference(x, w1, w2)
    expected_grads = monarch_backward_reference(grad, x, w1, w2)
    inputs = [t.to("cuda", dtype).requires_grad_() for t in (x, w1, w2)]
    out = torch.ops.memopt.monarch_matmul(*inputs)
    out.backward(grad.to("cuda", dtype))
    # float32 on GPU uses TF32 when PyTorch allows it, like cuBLAS: x, w1, h and w2 are each
    # rounded to 10 mantissa bits (2**-11 = 4.9e-4), about 2e-3 compounded over both stages.
    rtol = 5e-3 if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else RTOL[dtype]
    assert _rel(out.cpu(), expected) < rtol
    for tensor, expected_grad in zip(inputs, expected_grads):
        assert _rel(tensor.grad.cpu(), expected_grad) < rtol
    torch.library.opcheck(torch.ops.memopt.monarch_matmul, tuple(t.detach() for t in inputs))
    if kernel == "auto":
        assert sorted(key[0] for key in monarch_op.chosen_kernels) == ["backward", "forward"]
        assert set(monarch_op.chosen_kernels.values()) <= {"triton", "torch"}


# ------------------------------------------------------------------------------ kernel choice

_CANDIDATES = {name: (lambda name=name: name) for name in ("triton", "torch")}  # each returns its name


@pytest.fixture
def kernel_choice(monkeypatch):
    """An empty choice cache and the ``"auto"`` setting, both restored after the test."""
    monkeypatch.setattr(monarch_op, "chosen_kernels", {})
    monkeypatch.setattr(monarch_op, "_kernel", "auto")
    return monarch_op


def test_choose_kernel_times_each_candidate_once_per_key_and_keeps_the_faster(kernel_choice, monkeypatch):
    times = {"triton": 2.0, "torch": 1.0}
    timed = []

    def fake_time_ms(fn):
        timed.append(fn())
        return times[timed[-1]]

    monkeypatch.setattr(kernel_choice, "time_ms", fake_time_ms)
    assert kernel_choice.choose_kernel(("forward", 1), _CANDIDATES) == "torch"
    assert sorted(timed) == ["torch", "triton"]
    times.update(triton=0.5)  # cached: the same key is not timed again
    assert kernel_choice.choose_kernel(("forward", 1), _CANDIDATES) == "torch"
    assert len(timed) == 2
    assert kernel_choice.choose_kernel(("backward", 1), _CANDIDATES) == "triton"
    assert len(timed) == 4
    assert kernel_choice.chosen_kernels == {("forward", 1): "torch", ("backward", 1): "triton"}


def test_choose_kernel_honours_a_forced_kernel_and_rejects_unknown_ones(kernel_choice, monkeypatch):
    def no_timing(fn):
        raise AssertionError("a forced kernel is not timed")

    monkeypatch.setattr(kernel_choice, "time_ms", no_timing)
    assert kernel_choice.get_kernel() == "auto"
    for kernel in ("triton", "torch"):
        kernel_choice.set_kernel(kernel)
        assert kernel_choice.get_kernel() == kernel
        assert kernel_choice.choose_kernel(("forward", 1), _CANDIDATES) == kernel
    assert kernel_choice.chosen_kernels == {}
    for bad in ("cublas", "Triton", None):
        with pytest.raises(ValueError, match="one of auto, triton, torch"):
            kernel_choice.set_kernel(bad)
    assert kernel_choice.get_kernel() == "torch"


def test_choose_kernel_skips_a_candidate_that_fails(kernel_choice, monkeypatch):
    def broken():
        raise RuntimeError("no compiler for this GPU")

    monkeypatch.setattr(kernel_choice, "time_ms", lambda fn: (fn(), 1.0)[1])
    assert kernel_choice.choose_kernel(("forward", 1), {"triton": broken, "torch": lambda: None}) == "torch"
    with pytest.raises(RuntimeError, match="no compiler"):
        kernel_choice.choose_kernel(("forward", 2), {"triton": broken, "torch": broken})
    assert kernel_choice.chosen_kernels == {("forward", 1): "torch"}


def test_choose_kernel_without_timing_takes_the_cache_or_the_reference(kernel_choice, monkeypatch):
    # can_time=False is what a call inside CUDA graph capture gets: nothing is run or cached.
    monkeypatch.setattr(kernel_choice, "time_ms", lambda fn: {"triton": 1.0, "torch": 2.0}[fn()])
    assert kernel_choice.choose_kernel(("forward", 1), _CANDIDATES, can_time=False) == "torch"
    assert kernel_choice.chosen_kernels == {}
    assert kernel_choice.choose_kernel(("forward", 1), _CANDIDATES) == "triton"
    assert kernel_choice.choose_kernel(("forward", 1), _CANDIDATES, can_time=False) == "triton"


_NEEDS_TRITON_ON_CPU = pytest.mark.skipif(
    not (_TRITON and _INTERPRET), reason="the Triton candidate runs on CPU only under TRITON_INTERPRET=1"
)


@pytest.mark.parametrize("kernel", [pytest.param("triton", marks=_NEEDS_TRITON_ON_CPU), "torch"])
@pytest.mark.parametrize("shape", OP_SHAPES)
def test_dispatched_op_matches_reference_with_each_kernel(shape, kernel, kernel_choice):
    kernel_choice.set_kernel(kernel)
    x, w1, w2 = _factors(*shape, dtype=torch.float64, lead=(2,))
    grad = torch.randn(*x.shape[:-1], shape[1] * shape[4], dtype=torch.float64)
    expected = monarch_matmul_reference(x, w1, w2)
    expected_grads = monarch_backward_reference(grad, x, w1, w2)
    args = [t.float() for t in (x, w1, w2)]
    out = kernel_choice.monarch_matmul_dispatched(*args)
    grads = kernel_choice.monarch_backward_dispatched(grad.float(), *args)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert _rel(out, expected) < RTOL[torch.float32]
    for actual, reference in zip(grads, expected_grads):
        assert actual.shape == reference.shape and actual.is_contiguous()
        assert _rel(actual, reference) < RTOL[torch.float32]


@_NEEDS_TRITON_ON_CPU
def test_dispatched_op_keys_forward_and_backward_apart_and_rounds_tokens(kernel_choice, monkeypatch):
    timed = []

    def fake_time_ms(fn):  # runs the real candidate; the later one timed is "faster"
        fn()
        timed.append(fn)
        return 1.0 / len(timed)

    monkeypatch.setattr(kernel_choice, "time_ms", fake_time_ms)
    for tokens in (5, 7, 8, 9):  # 5, 7 and 8 share a key (8 tokens); 9 has its own (16)
        x, w1, w2 = _factors(tokens, 3, 5, 2, 9, dtype=torch.float32)
        grad = torch.randn(tokens, 27)
        out = kernel_choice.monarch_matmul_dispatched(x, w1, w2)
        grads = kernel_choice.monarch_backward_dispatched(grad, x, w1, w2)
        assert _rel(out, monarch_matmul_reference(x.double(), w1.double(), w2.double())) < RTOL[torch.float32]
        for actual, reference in zip(grads, monarch_backward_reference(grad, x, w1, w2)):
            assert _rel(actual, reference) < RTOL[torch.float32]
    keys = sorted(kernel_choice.chosen_kernels)
    assert [(key[0], key[1]) for key in keys] == [("backward", 8), ("backward", 16), ("forward", 8), ("forward", 16)]
    assert keys[0][2:] == (3, 6, 5, 9, "torch.float32", "cpu")  # nblocks, q, p, s, dtype, device
    assert len(timed) == 2 * len(keys)


# ------------------------------------------------------------------------------------ config


def test_monarchize_replaces_a_shared_layer_everywhere():
    shared = torch.nn.Linear(32, 32)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared, torch.nn.ReLU(), shared)
    (record,) = monarchize(model, nblocks=4, min_features=8)
    assert (record.name, record.also_named) == ("0", ("2", "4"))
    assert model[0] is model[2] is model[4] and isinstance(model[0], MonarchLinear)


def test_monarchize_leaves_layers_read_directly_or_tied_dense():
    """PyTorch's attention and encoder layers hand some children's weights to fused kernels,
    and an output layer tied to an embedding would be untied: all stay dense, with a warning
    naming them."""
    torch.manual_seed(19)

    class AttentionAndMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = torch.nn.MultiheadAttention(32, 2, batch_first=True)
            self.encoder = torch.nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
            self.mlp = torch.nn.Linear(32, 32)

        def forward(self, x):
            return self.mlp(self.encoder(self.attention(x, x, x, need_weights=False)[0]))

    model = AttentionAndMLP().eval()
    with pytest.warns(UserWarning) as warned:
        records = monarchize(model, nblocks=4, min_features=8)
    assert [record.name for record in records] == ["mlp"]
    (message,) = [str(warning.message) for warning in warned]
    for name in ("attention.out_proj", "encoder.self_attn.out_proj", "encoder.linear1", "encoder.linear2"):
        assert name in message
    assert model(torch.randn(2, 5, 32)).shape == (2, 5, 32)  # the encoder's fast path (eval) reads the weights

    class TiedLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    model = TiedLM()
    with pytest.warns(UserWarning, match="head \\(its weight is tied to embed's"):
        assert monarchize(model, nblocks=4, min_features=8) == []
    assert model.head.weight is model.embed.weight


def test_config_monarch_option():
    assert Config().monarch is False
    assert Config(monarch=True).monarch == MonarchOptions()
    options = Config.from_options({"monarch": {"nblocks": 2, "targets": ["*.fc"], "max_rel_error": 0.5}}).monarch
    assert options == MonarchOptions(nblocks=2, targets=("*.fc",), max_rel_error=0.5)
    for bad, message in [
        ({"nblock": 2}, "valid keys are: nblocks, min_features, targets, max_rel_error"),
        ({"nblocks": 1}, "nblocks"),
        ({"min_features": 0}, "min_features"),
        ({"targets": [3]}, "targets"),
        ({"targets": []}, r"None \(every layer\) or a non-empty list"),
        ({"max_rel_error": 0}, "max_rel_error"),
        ("yes", "must be False, True or a dict"),
    ]:
        with pytest.raises(ValueError, match=message):
            Config(monarch=bad)


# ------------------------------------------------------------------------------------- pass


class _MLP(torch.nn.Module):
    def __init__(self, width: int = 48, hidden: int = 80, out: int = 12):
        super().__init__()
        self.up = torch.nn.Linear(width, hidden)
        self.down = torch.nn.Linear(hidden, width, bias=False)
        self.head = torch.nn.Linear(width, out)

    def forward(self, x):
        return self.head(self.down(F.gelu(self.up(x))) + x)


def _near_monarch_(linear: torch.nn.Linear, nblocks: int, noise: float) -> None:
    """Set ``linear``'s weight to a Monarch matrix plus ``noise`` (relative) dense noise."""
    with torch.no_grad():
        monarch = MonarchLinear(linear.in_features, linear.out_features, nblocks, bias=False).to_dense()
        linear.weight.copy_(monarch + noise * monarch.std() * torch.randn_like(monarch))


def monarch_results(report):
    """The monarch pass's results in a report (other default passes may report too)."""
    return [result for result in report.passes if result.name == "monarch"]


def _compile_capturing(model, **options):
    graphs = []  # the graphs Dynamo captured, before memopt's passes

    def backend(gm, example_inputs):
        graphs.append(gm)
        return memopt.memopt_backend(gm, example_inputs, options)

    return torch.compile(model, backend=backend), graphs


def test_pass_rewrites_dense_layers_within_reported_error():
    torch.manual_seed(6)
    model = _MLP()
    _near_monarch_(model.up, 4, 0.02)
    _near_monarch_(model.down, 4, 0.02)
    x = torch.randn(3, 7, 48)
    with torch.no_grad():
        expected = model(x)
        with memopt.collect_reports() as reports:
            out = memopt.compile(model, lowering="eager", monarch={"nblocks": 4, "min_features": 40})(x)
    (result,) = monarch_results(reports[0])
    assert result.name == "monarch" and result.changes_results and result.error is None
    assert result.matched == 3 and result.rewrites == 2  # head (48->12) is below min_features
    assert any("head" in note and "min_features" in note for note in result.notes)
    rows = {row["layer"]: row for row in result.details}
    assert rows["up"]["rewritten"] and rows["down"]["rewritten"]
    for name in ("up", "down"):
        assert rows[name]["weight_bytes_monarch"] < rows[name]["weight_bytes_dense"]
        assert rows[name]["flops_per_token_monarch"] < rows[name]["flops_per_token_dense"]
        assert 0.005 < rows[name]["rel_error"] < 0.05  # the 2% noise, most of it off the Monarch class
    measured = float((out - expected).norm() / expected.norm())
    reported = rows["<graph outputs>"]["output_rel_error"]
    assert 0 < measured < 0.05
    assert abs(measured - reported) <= 1e-5 * max(1.0, reported)


def test_pass_max_rel_error_keeps_layers_dense():
    torch.manual_seed(7)
    model = _MLP()
    _near_monarch_(model.up, 4, 0.01)  # `down` keeps its random weight: large projection error
    x = torch.randn(5, 48)
    with torch.no_grad():
        expected = model(x)
        options = {"nblocks": 4, "min_features": 40, "max_rel_error": 0.1}
        out = memopt.compile(model, lowering="eager", monarch=options)(x)
    (result,) = monarch_results(memopt.last_report())
    assert result.rewrites == 1
    rows = {row["layer"]: row for row in result.details}
    assert rows["up"]["rewritten"] and not rows["down"]["rewritten"] and rows["down"]["rel_error"] > 0.1
    assert any("down" in note and "max_rel_error" in note for note in result.notes)
    measured = float((out - expected).norm() / expected.norm())
    assert abs(measured - rows["<graph outputs>"]["output_rel_error"]) <= 1e-5


def test_pass_targets_and_inductor_lowering():
    torch.manual_seed(8)
    model = _MLP()
    _near_monarch_(model.up, 2, 0.0)  # exactly Monarch: the rewrite is exact
    x = torch.randn(4, 48)
    with torch.no_grad():
        expected = model(x)
        options = {"nblocks": 2, "min_features": 8, "targets": ["up"]}
        out = memopt.compile(model, monarch=options)(x)  # default lowering: Inductor
    (result,) = monarch_results(memopt.last_report())
    assert result.rewrites == 1 and result.details[0]["layer"] == "up"
    assert result.details[0]["rel_error"] < 1e-5
    assert any("outside targets" in note for note in result.notes)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


class _CountingNoisyMLP(_MLP):
    """Side effects in the graph: a buffer counter, an input written in place, a random draw."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x, scale):
        self.calls.add_(1)
        scale.mul_(2)
        return super().forward(x) * scale + torch.randn(x.shape[0], 1) * 0.1


def test_pass_measures_errors_without_side_effects():
    """Measuring the output error runs the graph twice more than the user asked: what the
    graph writes in place is written once, and the random stream is where eager leaves it."""
    torch.manual_seed(11)
    model = _CountingNoisyMLP()
    _near_monarch_(model.up, 4, 0.02)
    _near_monarch_(model.down, 4, 0.02)
    x = torch.randn(3, 48)
    scale, scale_eager = torch.ones(3, 1), torch.ones(3, 1)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.manual_seed(0)
        expected = copy.deepcopy(model)(x, scale_eager)
        after_eager = torch.rand(4)
        torch.manual_seed(0)
        out = memopt.compile(model, lowering="eager", monarch={"nblocks": 4, "min_features": 40})(x, scale)
        after = torch.rand(4)
    (result,) = monarch_results(memopt.last_report())
    assert result.rewrites == 2
    rows = {row["layer"]: row for row in result.details}
    assert rows["<graph outputs>"]["output_rel_error"] < 0.05
    assert model.calls.item() == 1 and torch.equal(scale, scale_eager)
    torch.testing.assert_close(after, after_eager, rtol=0, atol=0)
    measured = float((out - expected).norm() / expected.norm())
    assert 0 < measured < 0.05


class _VmappedMLP(_MLP):
    """``up`` runs under ``torch.vmap`` (per row), ``down`` outside it."""

    def forward(self, x):
        return self.down(torch.vmap(lambda row: F.gelu(self.up(row)))(x))


def test_pass_leaves_layers_under_a_vmap_dense():
    torch.manual_seed(10)
    model = _VmappedMLP()
    _near_monarch_(model.down, 2, 0.0)  # exactly Monarch: the rewrite is exact
    x = torch.randn(4, 48)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(x)
        out = memopt.compile(model, lowering="eager", strict=True, monarch={"nblocks": 2, "min_features": 8})(x)
    (result,) = monarch_results(memopt.last_report())
    assert result.rewrites == 1 and result.error is None
    assert any("up" in note and "torch.func transform" in note for note in result.notes), result.notes
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lowering", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_pass_follows_weights_changed_after_compile(lowering):
    """The factors are projected at compile time; a weight changed afterwards (in place, or
    by ``load_state_dict``) is projected again before the next call of the same compiled
    graph (no recompile), so it computes what the model's Monarch projection computes now
    (``monarchize`` of a copy, eager), and the report's rows say so."""
    torch.manual_seed(13)
    model = _MLP().eval()
    x = torch.randn(4, 48)

    def projected() -> torch.Tensor:
        reference = copy.deepcopy(model)
        assert len(monarchize(reference, nblocks=4, min_features=8)) == 3
        return reference(x)

    torch._dynamo.reset()
    compiled = memopt.compile(model, lowering=lowering, strict=True, monarch={"nblocks": 4, "min_features": 8})
    with torch.no_grad():
        before = compiled(x)
        (result,) = monarch_results(memopt.last_report())
        torch.testing.assert_close(before, projected(), rtol=1e-5, atol=1e-5)
        model.down.weight.mul_(2.0)  # in place
        model.up.bias.zero_()  # dense everywhere: nothing to project
        after = compiled(x)
        assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(after, projected(), rtol=1e-5, atol=1e-5)
        model.load_state_dict(_MLP().state_dict())  # new weights altogether
        torch.testing.assert_close(compiled(x), projected(), rtol=1e-5, atol=1e-5)
    assert len(monarch_results(memopt.last_report())) == 1 and memopt.last_report().passes[0] is result  # one compile
    rows = [row for row in result.details if "rel_error" in row]
    assert [row["reprojections"] for row in rows] == [1, 2, 1], rows  # up, down, head
    assert all(row["output_rel_error"] is None for row in rows)
    (graph_row,) = [row for row in result.details if row["layer"] == "<graph outputs>"]
    assert graph_row["output_rel_error"] is None  # it was measured on the old weights
    assert sum("weight changed after compile" in note for note in result.notes) == 3


class _Shared(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(40, 40)

    def forward(self, x):
        return self.lin(self.lin(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.nn.Sequential(torch.nn.Linear(48, 48), torch.nn.Linear(48, 48)),
        lambda: torch.nn.Sequential(torch.nn.Linear(37, 50, bias=False), torch.nn.Linear(50, 23)),  # padded, sliced
        _Shared,  # one layer applied twice in a row
    ],
    ids=["back-to-back", "odd-sizes", "shared"],
)
def test_pass_rewrites_layers_that_read_each_others_output(make):
    """A layer whose input is another rewritten layer's output (low-rank B(A(x)), LoRA, heads)
    reads the other's stand-in: every layer is projected, the output is the monarchized model's."""
    torch.manual_seed(17)
    model = make().eval()
    x = torch.randn(5, _in_features(model))
    reference = copy.deepcopy(model)
    monarchize(reference, nblocks=4, min_features=8)
    torch._dynamo.reset()
    with torch.no_grad():
        out = memopt.compile(model, lowering="eager", strict=True, monarch={"nblocks": 4, "min_features": 8})(x)
        (result,) = monarch_results(memopt.last_report())
        assert result.rewrites == 2
        torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)


class _Positions(torch.nn.Module):
    """Positions from a past length, as a KV-cache decoder computes them: an op that needs a
    concrete size."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(32, 32)

    def forward(self, x, past):
        positions = torch.arange(past.shape[1] + x.shape[1], dtype=x.dtype)[past.shape[1]:]
        return self.lin(x + positions[None, :, None])


def test_pass_keeps_dynamic_graphs_dynamic():
    """The pass measures its error by running the graph on the example inputs; run on their
    symbolic sizes, it specialized the graph: a recompile per length (per generated token),
    until Dynamo's recompile limit left the rest to the dense eager model."""
    torch.manual_seed(18)
    model = _Positions().eval()
    reference = copy.deepcopy(model)
    monarchize(reference, nblocks=4, min_features=16)
    torch._dynamo.reset()
    compiled = memopt.compile(model, lowering="eager", dynamic=True, monarch={"nblocks": 4, "min_features": 16})
    with torch.no_grad(), memopt.collect_reports() as reports:
        for length in (3, 4, 5, 9, 10):
            x, past = torch.randn(2, 1, 32), torch.randn(2, length, 32)
            torch.testing.assert_close(compiled(x, past), reference(x, past), rtol=1e-5, atol=1e-5)
    assert len(reports) == 1
    (result,) = monarch_results(reports[0])
    assert result.rewrites == 1 and result.details[0]["output_rel_error"] is not None


def _in_features(model: torch.nn.Module) -> int:
    return next(module for module in model.modules() if isinstance(module, torch.nn.Linear)).in_features


def test_pass_on_weights_made_under_inference_mode():
    """Inference tensors count no in-place writes: the pass still rewrites (equal to the
    projection) and says that in-place changes after compile go unseen."""
    with torch.inference_mode():
        torch.manual_seed(14)
        model = _MLP().eval()
        x = torch.randn(4, 48)
        torch._dynamo.reset()
        out = memopt.compile(model, lowering="eager", strict=True, monarch={"nblocks": 4, "min_features": 8})(x)
        (result,) = monarch_results(memopt.last_report())
    reference = copy.deepcopy(model)
    monarchize(reference, nblocks=4, min_features=8)
    with torch.inference_mode():
        torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
    assert result.rewrites == 3
    assert any(note.startswith("3 projected weight(s) are inference tensors") for note in result.notes), result.notes


def test_pass_names_a_compiled_linear_by_its_class():
    """``torch.compile(nn.Linear(...))``: the layer is the compiled module itself, which has
    no path; the notes name it by its class, not by Dynamo's placeholder."""
    torch._dynamo.reset()
    with torch.no_grad():
        memopt.compile(torch.nn.Linear(64, 64), lowering="eager", monarch={"min_features": 8})(torch.randn(3, 64))
    (result,) = monarch_results(memopt.last_report())
    assert result.rewrites == 1 and result.notes[0].startswith("<Linear>: Monarch nblocks=4"), result.notes


class _ComputedWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(64, 48))

    def forward(self, x):
        return F.linear(x, self.w * 2.0)


def test_pass_notes_linears_whose_weight_is_not_a_parameter():
    """A weight computed in the graph is no layer's parameter: left dense, with a note."""
    model = _ComputedWeight()
    x = torch.randn(4, 48)
    torch._dynamo.reset()
    with torch.no_grad():
        out = memopt.compile(model, lowering="eager", strict=True, monarch={"min_features": 8})(x)
    (result,) = monarch_results(memopt.last_report())
    assert result.rewrites == 0
    note = "1 linear call(s) whose weight is not a parameter"
    assert any(each.startswith(note) for each in result.notes), result.notes
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("fastpath", [True, False], ids=["fast-path", "no-fast-path"])
def test_pass_names_the_pytorch_layers_whose_linears_it_cannot_reach(fastpath):
    """nn.TransformerEncoder in eval mode without grad runs each layer as one fused op (and
    nn.MultiheadAttention's projections always run inside one call): the pass says so and
    how to turn the fast path off, instead of reporting nothing. With it off, the encoder's
    MLP layers are plain linears and are rewritten."""
    torch.manual_seed(11)
    layer = nn.TransformerEncoderLayer(32, 2, 48, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 7, 32)
    torch._dynamo.reset()
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        with torch.no_grad():
            expected = model(x)
            out = memopt.compile(model, lowering="eager", strict=True, monarch={"nblocks": 4, "min_features": 32})(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    (result,) = monarch_results(memopt.last_report())
    if fastpath:
        assert result.rewrites == 0 and result.matched == 2, result.notes
        (note,) = result.notes
        assert "2 call(s) of _transformer_encoder_layer_fwd" in note and "set_fastpath_enabled(False)" in note
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:
        assert result.rewrites == 4, result.notes  # linear1 and linear2 of both layers
        assert any("2 call(s) of multi_head_attention_forward" in note for note in result.notes), result.notes
        assert not any("set_fastpath_enabled" in note for note in result.notes)


def test_pass_is_inference_only_and_off_by_default():
    torch.manual_seed(9)
    model = _MLP()
    x = torch.randn(4, 48)
    memopt.compile(model, lowering="eager", monarch={"min_features": 8})(x).sum().backward()
    report = memopt.last_report()
    (result,) = monarch_results(report)  # asked for, so the report says why nothing happened
    assert report.training and result.rewrites == 0 and result.matched == 0
    assert result.notes == ["not run: it applies to inference graphs, and this is a training graph"]
    torch._dynamo.reset()  # the same model again, now for inference
    with torch.no_grad():
        memopt.compile(model, lowering="eager")(x)
    assert monarch_results(memopt.last_report()) == []


def test_monarch_linear_is_one_op_in_compiled_training_graphs():
    torch.manual_seed(10)
    model = torch.nn.Sequential(MonarchLinear(30, 44, 3), torch.nn.ReLU(), MonarchLinear(44, 20, 2, bias=False))
    x = torch.randn(6, 30)
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    compiled, graphs = _compile_capturing(model, lowering="eager")
    compiled(x).square().sum().backward()
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.memopt.monarch_matmul.default) + targets.count(torch.ops.memopt.monarch_matmul) == 2
    # Gradients agree with the same network written with dense matrices.
    w1a, w2a, bias_a, w1b, w2b = reference
    hidden = torch.relu(x @ monarch_dense(w1a, w2a)[:44, :30].T + bias_a)
    (hidden @ monarch_dense(w1b, w2b)[:20, :44].T).square().sum().backward()
    for param, ref in zip(model.parameters(), reference):
        torch.testing.assert_close(param.grad, ref.grad, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ tiny GPT-2 (transformers)


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers", reason="the GPT-2 tests need transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(11)
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=32, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _permutation_batches(steps: int, vocab: int = 32, batch: int = 8, seq: int = 16):
    """Sequences that follow a fixed random permutation of the vocabulary (learnable)."""
    gen = torch.Generator().manual_seed(12)
    successor = torch.randperm(vocab, generator=gen)
    for _ in range(steps):
        tokens = torch.empty(batch, seq, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        for t in range(1, seq):
            tokens[:, t] = successor[tokens[:, t - 1]]
        yield tokens


def _train(model, steps: int = 40) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for tokens in _permutation_batches(steps):
        loss = model(tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_gpt2_with_monarch_mlps_trains_like_dense():
    dense = _tiny_gpt2()
    dense_losses = _train(dense)
    model = _tiny_gpt2()
    replaced = monarchize(model, nblocks=4, min_features=32, targets=["*.mlp.*"])
    # transformers' Conv1D (GPT-2's MLP) is handled: 2 layers x (c_fc, c_proj).
    assert sorted(r.name for r in replaced) == sorted(
        f"transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")
    )
    assert all(isinstance(model.get_submodule(r.name), MonarchLinear) for r in replaced)
    assert sum(r.monarch_params for r in replaced) < 0.35 * sum(r.dense_params for r in replaced)
    monarch_losses = _train(model)
    start = monarch_losses[0]
    dense_end = sum(dense_losses[-5:]) / 5
    monarch_end = sum(monarch_losses[-5:]) / 5
    assert dense_end < 0.3 * dense_losses[0]
    assert monarch_end < 0.3 * start
    assert start - monarch_end >= 0.75 * (dense_losses[0] - dense_end)


def test_gpt2_inference_pass_rewrites_conv1d_mlps():
    model = _tiny_gpt2().eval()
    for block in model.transformer.h:
        for conv in (block.mlp.c_fc, block.mlp.c_proj):
            with torch.no_grad():  # Conv1D stores W transposed: (in, out)
                monarch = MonarchLinear(conv.weight.shape[0], conv.weight.shape[1], 4, bias=False).to_dense()
                conv.weight.copy_(monarch.T + 0.01 * monarch.std() * torch.randn_like(monarch.T))
    tokens = torch.randint(0, 32, (2, 12))
    with torch.no_grad():
        expected = model(tokens).logits
        options = {"nblocks": 4, "min_features": 32, "targets": ["*.mlp.*"]}
        out = memopt.compile(model, lowering="eager", monarch=options)(tokens).logits
    (result,) = monarch_results(memopt.last_report())
    assert result.rewrites == 4
    assert any("outside targets" in note for note in result.notes)  # the attention projections
    measured = float((out - expected).norm() / expected.norm())
    reported = next(row for row in result.details if row["layer"] == "<graph outputs>")["output_rel_error"]
    assert 0 < measured < 0.05
    assert abs(measured - reported) <= 1e-5 * max(1.0, reported)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_monarch_linear_under_autocast_computes_like_nn_linear(dtype):
    """Under torch.autocast the op casts x, w1, w2 to the autocast dtype (whichever the caller
    chose) and the bias is added in it, as nn.Linear does; compiled graphs do the same."""
    torch.manual_seed(13)
    layer = MonarchLinear(40, 30, 4)
    x = torch.randn(6, 40)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x)
    assert out.dtype == dtype
    padded = torch.nn.functional.pad(x, (0, 4 * layer.w1.shape[2] - 40)).to(dtype)
    by_hand = monarch_matmul_reference(padded, layer.w1.to(dtype), layer.w2.to(dtype))[..., :30] + layer.bias.to(dtype)
    torch.testing.assert_close(out, by_hand, rtol=0, atol=0)
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
    torch._dynamo.reset()
    compiled = copy.deepcopy(layer)
    with torch.autocast("cpu", dtype=dtype):
        compiled_out = memopt.compile(compiled, lowering="eager")(x)
    torch.testing.assert_close(compiled_out, out, rtol=0, atol=0)
    with torch.no_grad():
        assert layer(x).dtype == torch.float32  # outside autocast nothing changes
