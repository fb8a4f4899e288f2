"""memopt on a GPU, end to end: each pass compiled with Inductor on CUDA tensors, its Triton
kernels really compiled (not interpreted), outputs and gradients against eager PyTorch.

The rest of the suite checks each piece on CPU (the Triton kernels under TRITON_INTERPRET=1);
this module is what a GPU adds: Inductor's CUDA code generation around memopt's ops, the ops'
CUDA dispatch, bfloat16 tensor-core dots, im2win's on-device timing for ``"auto"``, and peak
memory from CUDA's allocator statistics. Skipped without a GPU.

Tolerances are relative to the largest magnitude of the reference. float32 runs with TF32 off
(a reference and a candidate rounded differently by TF32 would differ by ~1e-3), so 1e-4
covers float32 reassociation; bfloat16 stores 8 mantissa bits (relative rounding 2**-9) at
each of a few roundings per output, hence 3e-2.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memopt
import zoo
from memopt.nn import MonarchLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RTOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return ((actual.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def pass_result(report, name: str):
    return next(result for result in report.passes if result.name == name)


class ConvNet(nn.Module):
    """Convolutions im2win handles: 3x3, strided, depthwise, 1x1, with fused activations."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.down = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(64, 64, 5, padding=2, groups=64)
        self.point = nn.Conv2d(64, 48, 1)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.silu(self.down(x))
        x = F.gelu(self.depthwise(x))
        x = self.point(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_im2win_inference_on_cuda(dtype, channels_last):
    torch.manual_seed(0)
    model = ConvNet().eval().cuda().to(dtype)
    x = torch.randn(3, 3, 29, 31, device="cuda", dtype=dtype)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with torch.no_grad():
        out = memopt.compile(model, im2win=True, strict=True)(x)
        expected = model(x)
    result = pass_result(memopt.last_report(), "im2win")
    assert result.rewrites == 4, result
    assert rel_error(out, expected) <= RTOL[dtype]


def test_im2win_training_gradients_on_cuda():
    torch.manual_seed(1)
    model = ConvNet().cuda()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 17, 19, device="cuda")
    torch._dynamo.reset()
    out = memopt.compile(model, im2win=True, strict=True)(x)
    assert pass_result(memopt.last_report(), "im2win").rewrites == 4
    expected = reference(x)
    assert rel_error(out, expected) <= RTOL[torch.float32]
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        assert rel_error(mine.grad, theirs.grad) <= 1e-3, name


def test_im2win_auto_times_each_convolution_on_the_gpu():
    torch.manual_seed(2)
    model = ConvNet().eval().cuda().to(torch.bfloat16)
    x = torch.randn(8, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        out = memopt.compile(model, im2win="auto", strict=True)(x)
        expected = model(x)
    result = pass_result(memopt.last_report(), "im2win")
    rows = [row for row in result.details if row.get("decision") != "unsupported"]
    assert len(rows) == 4
    # "auto" timed both algorithms on this GPU (or found them in its cache) for every conv.
    assert all(row["algorithm"] in ("im2win", "aten") for row in rows), rows
    assert rel_error(out, expected) <= RTOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_monarch_linear_trains_on_cuda(dtype):
    torch.manual_seed(3)
    model = nn.Sequential(MonarchLinear(96, 160, 4), nn.GELU(), MonarchLinear(160, 72, 4, bias=False))
    model = model.cuda().to(dtype)
    reference = copy.deepcopy(model)
    x = torch.randn(5, 37, 96, device="cuda", dtype=dtype)
    torch._dynamo.reset()
    out = memopt.compile(model, strict=True)(x)
    assert memopt.last_report().op_counts["memopt.monarch_matmul"] == 2
    expected = reference(x)
    assert rel_error(out, expected) <= RTOL[dtype]
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        assert rel_error(mine.grad, theirs.grad) <= 10 * RTOL[dtype], name


def test_monarch_cuda_dispatch_times_both_kernels_once_per_shape():
    from memopt.ops import monarch as monarch_ops

    monarch_ops.chosen_kernels.clear()
    layer = MonarchLinear(512, 512, 4, bias=False).cuda().to(torch.bfloat16)
    x = torch.randn(3, 1000, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        expected = x @ layer.to_dense().T
    assert rel_error(out, expected) <= RTOL[torch.bfloat16]
    (key,) = monarch_ops.chosen_kernels  # tokens rounded up: 3000 -> 4096
    assert key[0] == "forward" and key[1] == 4096 and monarch_ops.chosen_kernels[key] in ("triton", "torch")


def test_monarch_inference_pass_on_cuda_stays_within_reported_error():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval().cuda()
    x = torch.randn(64, 256, device="cuda")
    torch._dynamo.reset()
    with torch.no_grad():
        out = memopt.compile(model, monarch={"nblocks": 4, "min_features": 128}, strict=True)(x)
        expected = model(x)
    result = pass_result(memopt.last_report(), "monarch")
    assert result.rewrites == 2 and result.changes_results
    # Random weights project badly (that is what the report says); the output must still be
    # exactly the projected network's, so compare with the dense products of the projections.
    projected = copy.deepcopy(model)
    for index in (0, 2):
        projected[index] = MonarchLinear.from_dense(model[index], 4).cuda()
    with torch.no_grad():
        assert rel_error(out, projected(x)) <= RTOL[torch.float32]
        assert rel_error(out, expected) > 1e-3  # the projection really changed the weights


class Couplings(nn.Module):
    """Reformer-style couplings in plain PyTorch: F = pre-norm MLP, G = pre-norm attention."""

    def __init__(self, depth: int, width: int = 64, heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.f = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(dropout),
                nn.Linear(2 * width, width),
            )
            for _ in range(depth)
        )
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.qkv = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(depth))

    def attention(self, k: int, x):
        batch, tokens, width = x.shape
        q, k_, v = self.qkv[k](self.norm[k](x)).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.dropout(F.scaled_dot_product_attention(q, k_, v).transpose(1, 2).reshape(batch, tokens, width))

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=-1)
        for k, f in enumerate(self.f):
            x1 = x1 + f(x2)
            x2 = x2 + self.attention(k, x1)
        return torch.cat([x1, x2], dim=-1)


def test_reversible_chain_on_cuda_matches_eager_and_saves_memory():
    torch.manual_seed(5)
    model = Couplings(depth=12).cuda()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 256, 128, device="cuda")

    def step(fn, net):
        inp = x.clone().requires_grad_()
        out = fn(inp)
        out.square().mean().backward()
        return out, inp.grad

    torch._dynamo.reset()
    compiled = memopt.compile(model, fullgraph=True, strict=True)
    out, x_grad = step(compiled, model)
    report = memopt.last_report()
    assert pass_result(report, "reversible").rewrites == 1
    expected, x_ref_grad = step(reference, reference)
    assert rel_error(out, expected) <= 1e-4
    assert rel_error(x_grad, x_ref_grad) <= 1e-3
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        assert rel_error(mine.grad, theirs.grad) <= 1e-3, name
    # The forward graph keeps the chain's two outputs and nothing per block.
    assert report.saved_activation_bytes <= 2 * x.numel() * x.element_size()
    # The chain was traced into the forward and backward graphs, which Inductor compiled.
    rows = [row for row in pass_result(report, "reversible").details if "key" in row]
    assert rows and all(row["inlined"] for row in rows), report.partition_notes

    for p in list(model.parameters()) + list(reference.parameters()):
        p.grad = None
    reversible_peak = memopt.measure(lambda: step(compiled, model), device="cuda", warmup=1).peak_bytes
    torch._dynamo.reset()
    plain = memopt.compile(reference, fullgraph=True, reversible=False)
    plain_peak = memopt.measure(lambda: step(plain, reference), device="cuda", warmup=1).peak_bytes
    # 12 blocks of saved activations against one block's recomputation: measured ~4x; 2x
    # leaves room for the allocator while failing if the chain kept its activations.
    assert plain_peak >= 2 * reversible_peak, (plain_peak, reversible_peak)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_slicing_on_cuda_is_exact_and_lowers_the_measured_peak(dtype):
    torch.manual_seed(6)
    model = zoo.GroupNormConvNet(width=64).eval().cuda().to(dtype)
    x = torch.randn(8, 3, 96, 96, device="cuda", dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        sliced = memopt.compile(model, slicing={"min_group_bytes": 1 << 20}, strict=True)
        out = sliced(x)
        result = pass_result(memopt.last_report(), "slicing")
        assert result.rewrites >= 1
        assert all(row["compiled"] for row in result.details)  # bodies compiled by Inductor on CUDA
        sliced_peak = memopt.measure(sliced, x).peak_bytes
        torch._dynamo.reset()
        plain = torch.compile(model, backend="inductor")
        plain_out = plain(x)
        plain_peak = memopt.measure(plain, x).peak_bytes
    # bfloat16: slicing changes only how sums are blocked, so it is as close to eager as
    # Inductor itself is.
    tolerance = RTOL[dtype] if dtype == torch.float32 else 2 * max(rel_error(plain_out, expected), 1e-2)
    assert rel_error(out, expected) <= tolerance
    assert plain_peak >= 1.5 * sliced_peak, (plain_peak, sliced_peak)


def test_slicing_replayed_as_cuda_graphs_is_exact_and_keeps_the_saving():
    """On a GPU a sliced group's per-slice host work is what slicing costs in time; replaying
    the compiled graph as CUDA graphs removes it. The bodies compile on the warm-up call,
    before capture; the peak is read over the calls that warm up and record (a replay
    allocates nothing)."""
    torch.manual_seed(6)
    model = zoo.GroupNormConvNet(width=64).eval().cuda()
    x = torch.randn(8, 3, 96, 96, device="cuda")
    peaks, outs = {}, {}
    with torch.no_grad():
        expected = model(x)
        for name, options in {
            "sliced": {"slicing": {"min_group_bytes": 1 << 20}},
            "plain": {"slicing": False},
        }.items():
            torch._dynamo.reset()
            compiled = memopt.compile(model, inductor_config={"triton.cudagraphs": True}, strict=True, **options)
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(3):  # warm-up (compiles), record, replay
                out = compiled(x)
            outs[name] = out.clone()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() - start
            if name == "sliced":
                assert pass_result(memopt.last_report(), "slicing").rewrites >= 1
            fresh = torch.randn_like(x)  # a replay on new data computes new results
            torch.testing.assert_close(compiled(fresh).clone(), model(fresh), rtol=1e-4, atol=1e-4)
    assert rel_error(outs["sliced"], expected) <= RTOL[torch.float32]
    assert peaks["plain"] >= 1.5 * peaks["sliced"], peaks


def test_reversible_chain_under_cuda_autocast_matches_eager():
    """Mixed-precision training as usually written: forward in ``torch.autocast``, backward
    after it. The chain must rebuild and recompute in bfloat16 like eager's forward did."""
    torch.manual_seed(7)
    model = Couplings(depth=6).cuda()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 128, 128, device="cuda")

    def step(fn):
        inp = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(inp)
        out.float().square().mean().backward()
        return out, inp.grad

    torch._dynamo.reset()
    out, x_grad = step(memopt.compile(model, fullgraph=True, strict=True))
    assert pass_result(memopt.last_report(), "reversible").rewrites == 1
    expected, x_ref_grad = step(reference)
    # Same bfloat16 ops as eager; Inductor's fusions round differently, hence bfloat16-level
    # tolerances (float32 recomputation instead would be off by ~1e-2 in the gradients).
    assert rel_error(out, expected) <= 1e-2
    assert rel_error(x_grad, x_ref_grad) <= 2e-2
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        assert rel_error(mine.grad, theirs.grad) <= 3e-2, name


def test_reversible_dropout_chain_replays_as_cuda_graphs_with_inductors_masks():
    """Under Inductor a traced chain draws its dropout from Inductor's seeds, on the device:
    bit for bit the masks Inductor draws for the model compiled without the pass, and no
    host-side RNG state to keep the graphs from being replayed as CUDA graphs. Three steps:
    warm-up, record, replay, each from its own seed."""
    from torch._dynamo.utils import counters

    torch.manual_seed(9)
    model = Couplings(depth=4, dropout=0.1).cuda()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 64, 128, device="cuda")
    steps = {}
    for name, net, options in (("memopt", model, {}), ("inductor", reference, {"reversible": False})):
        torch._dynamo.reset()
        counters.clear()
        compiled = memopt.compile(
            net, fullgraph=True, strict=True, inductor_config={"triton.cudagraphs": True}, **options
        )
        steps[name] = []
        for seed in range(3):
            torch.manual_seed(seed)
            inp = x.clone().requires_grad_()
            out = compiled(inp)
            out.square().mean().backward()
            steps[name].append([out.detach().clone(), inp.grad.clone(), *(p.grad.clone() for p in net.parameters())])
            for p in net.parameters():
                p.grad = None
        if name == "memopt":
            rows = [row for row in pass_result(memopt.last_report(), "reversible").details if "key" in row]
            assert rows and all(row["inlined"] for row in rows), memopt.last_report().partition_notes
        assert counters["inductor"]["cudagraph_skips"] == 0, (name, dict(counters["inductor"]))
    for mine, theirs in zip(steps["memopt"], steps["inductor"]):
        for a, b in zip(mine, theirs):
            assert rel_error(a, b) <= 1e-4
    assert rel_error(steps["memopt"][0][0], steps["memopt"][1][0]) > 1e-3  # new seed, new masks


def test_slicing_under_cuda_autocast_keeps_eager_precision():
    torch.manual_seed(8)
    model = zoo.GroupNormConvNet(width=64).eval().cuda()
    x = torch.randn(8, 3, 64, 64, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = model(x)
        torch._dynamo.reset()
        out = memopt.compile(model, slicing={"min_group_bytes": 1 << 20}, strict=True)(x)
    assert pass_result(memopt.last_report(), "slicing").rewrites >= 1
    assert out.dtype == expected.dtype
    assert rel_error(out, expected) <= 2e-2


def test_im2win_and_monarch_under_cuda_autocast():
    """Under torch.autocast on CUDA both ops cast to the autocast dtype like aten's, so the
    bf16 Triton kernels (or cuBLAS, for Monarch's dispatch) run, and results match eager's."""
    torch.manual_seed(9)
    conv = ConvNet().eval().cuda()
    x = torch.randn(4, 3, 33, 31, device="cuda")
    layer = MonarchLinear(256, 192, 4).cuda()
    tokens = torch.randn(3, 100, 256, device="cuda")
    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = memopt.compile(conv, im2win=True, strict=True)(x)
        assert pass_result(memopt.last_report(), "im2win").rewrites == 4
        expected = conv(x)
        monarch_out = layer(tokens)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert rel_error(out, expected) <= RTOL[torch.bfloat16]
    assert monarch_out.dtype == torch.bfloat16
    assert rel_error(monarch_out, tokens @ layer.to_dense().T + layer.bias) <= RTOL[torch.bfloat16]


def test_nested_chain_with_dropout_replays_its_draws_on_cuda(monkeypatch):
    """A converted block whose transformer stack has dropout: the inner chain nests as an op
    with random steps, and the outer step's recomputation replays its CUDA draws through
    the RNG-state operators. Gradients equal the same converted model without chains, which
    draws the same masks (dropout undecomposed: ``fallback_random``)."""
    import memopt.passes.reversible as reversible_pass
    from test_reversible import NestedResidual

    torch.manual_seed(12)
    model = NestedResidual(width=64, context_width=32, dropout=0.2).cuda()
    reference = copy.deepcopy(model)
    x, context = torch.randn(4, 33, 64, device="cuda"), torch.randn(4, 7, 32, device="cuda")
    grads = {}
    for name, net in (("memopt", model), ("reference", reference)):
        torch._dynamo.reset()
        if name == "reference":
            monkeypatch.setattr(reversible_pass, "_all_chains", lambda graph, failures: [])
        compiled = memopt.compile(net, strict=True, reversible="convert")
        inp = x.clone().requires_grad_()
        torch.manual_seed(5)
        with torch._inductor.config.patch(fallback_random=True):
            out = compiled(inp, context)
            out.square().mean().backward()
        grads[name] = [out.detach(), inp.grad, *(p.grad for p in net.parameters())]
        if name == "memopt":
            result = pass_result(memopt.last_report(), "reversible")
            assert result.rewrites == 2 and any("nested" in note for note in result.notes), result.notes
    for mine, theirs in zip(grads["memopt"], grads["reference"], strict=True):
        assert rel_error(mine, theirs) <= 1e-4
