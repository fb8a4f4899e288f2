"""im2win convolution: the reference, the Triton kernel (TRITON_INTERPRET=1 on CPU), the
``memopt::im2win_conv2d`` op and the ``im2win`` pass, each against ``torch.nn.functional.conv2d``."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
import torch.nn as nn
import torch.nn.functional as F

import memopt
from memopt.config import Config, Im2winOptions
from memopt.triton_kernels import im2win_conv
from memopt.triton_kernels.im2win_conv import (
    ConvGeometry,
    TileConfig,
    im2win_conv2d_reference,
    im2win_conv2d_triton,
    window_transform,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(
    not (INTERPRET or HAS_CUDA), reason="Triton kernels need a GPU or TRITON_INTERPRET=1"
)
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="bf16 tl.dot and autotuning need a GPU")

# max |out - ref| / max |ref|, with ref computed in float64 from the same (rounded) inputs.
# fp32: accumulation error ~ sqrt(K) * eps32 (K <= 363 here) -> ~3e-6; fp16 / bf16: the
# result is rounded once to eps/2 (4.9e-4 / 3.9e-3) per stored value, with some room for the
# Triton kernels' tile orders on a GPU.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
INTERPRETER_CONFIG = TileConfig(16, 16, 16, num_warps=1, num_stages=1)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    x: tuple[int, int, int, int]
    weight: tuple[int, int, int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    activation: str = "none"


CASES = [
    Case("3x3-pad1", (2, 4, 9, 7), (6, 4, 3, 3), padding=(1, 1), activation="relu"),
    Case("odd-strided-dilated", (1, 6, 11, 10), (6, 2, 3, 2), (2, 1), (0, 2), (2, 1), groups=3, activation="silu"),
    Case("depthwise", (2, 5, 8, 9), (5, 1, 3, 3), (1, 2), (1, 1), groups=5, bias=False, activation="gelu"),
    Case("depthwise-multiplier", (1, 3, 7, 7), (6, 1, 5, 5), (2, 2), (2, 2), groups=3),
    Case("1x1", (3, 17, 5, 6), (19, 17, 1, 1), bias=False),  # batch 3: pieces of two samples and one
    Case("11x11-stride4", (1, 3, 23, 25), (5, 3, 11, 11), (4, 4), (2, 2), activation="relu"),
    Case("dilation2-pad2", (2, 3, 10, 9), (4, 3, 3, 3), (1, 1), (2, 2), (2, 2), activation="gelu"),
    Case("wide-k", (1, 40, 6, 5), (33, 40, 3, 3), (1, 1), (1, 1), bias=True, activation="silu"),
]
CASE_IDS = [case.name for case in CASES]


def make_inputs(case: Case, dtype: torch.dtype, channels_last: bool, device: str = "cpu", seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(case.x, generator=generator).to(device=device, dtype=dtype)
    weight = torch.randn(case.weight, generator=generator).to(device=device, dtype=dtype)
    bias = torch.randn(case.weight[0], generator=generator).to(device=device, dtype=dtype) if case.bias else None
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, weight, bias


def conv_args(case: Case) -> tuple:
    return (case.stride, case.padding, case.dilation, case.groups)


def expected(case: Case, x, weight, bias) -> torch.Tensor:
    """F.conv2d + activation in float64 on the same (already rounded) inputs."""
    out = F.conv2d(x.double(), weight.double(), bias.double() if bias is not None else None, *conv_args(case))
    return im2win_conv.apply_activation(out, case.activation)


def assert_close_scaled(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    error = (out.double() - ref).abs().max().item() / ref.abs().max().item()
    assert error <= TOLERANCE[dtype], f"relative error {error:.3g} > {TOLERANCE[dtype]:.3g} ({dtype})"


# --------------------------------------------------------------------------------------
# window transform and workspace
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_window_transform_matches_definition(channels_last):
    x = torch.randn(2, 3, 9, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    kernel_h, stride, padding, dilation = 3, (2, 1), (1, 2), (2, 1)
    win = window_transform(x, kernel_h, stride, padding, dilation)
    x_padded = F.pad(x, (0, 0, padding[0], padding[0]))
    out_height = (9 + 2 * padding[0] - dilation[0] * (kernel_h - 1) - 1) // stride[0] + 1
    assert win.shape == (2, 3, out_height, x_padded.shape[3] * kernel_h)
    assert im2win_conv.is_channels_last(win) == channels_last
    for i in range(out_height):
        for m in range(x_padded.shape[3]):
            for h in range(kernel_h):
                torch.testing.assert_close(
                    win[:, :, i, m * kernel_h + h], x_padded[:, :, i * stride[0] + h * dilation[0], m], rtol=0, atol=0
                )


# The paper's 3x3 stride-1 layers (C_in, H=W, C_out), padded to keep their size: the window
# stores W * K_h values per output row (no padding columns), im2col W * K_h * K_w: 1/3.
PAPER_3X3_LAYERS = [(3, 224, 64), (64, 112, 128), (64, 56, 64), (128, 28, 128), (256, 14, 256), (512, 7, 512)]


@pytest.mark.parametrize("layer", PAPER_3X3_LAYERS, ids=lambda layer: f"c{layer[0]}-hw{layer[1]}")
def test_workspace_3x3_stride1_at_most_0_4_of_im2col(layer):
    channels, size, out_channels = layer
    geo = ConvGeometry(128, channels, size, size, out_channels, 3, 3, (1, 1), (1, 1), (1, 1), 1)
    ratio = geo.window_numel() / geo.im2col_numel()
    assert ratio <= 0.4, ratio
    assert ratio == pytest.approx(1 / 3)


def test_window_numel_matches_transform():
    geo = ConvGeometry(2, 3, 11, 10, 4, 3, 2, (2, 1), (1, 2), (1, 2), 1)
    win = window_transform(torch.randn(2, 3, 11, 10), 3, geo.stride, geo.padding, geo.dilation)
    assert win.numel() == geo.window_numel()


# --------------------------------------------------------------------------------------
# pure-PyTorch reference (also the op's CPU implementation)
# --------------------------------------------------------------------------------------


# How the CPU implementation cuts the output into pieces: as it does (these small layers take
# one piece), a few rows of one sample at a time (no size floor, a 64th of the window tensor
# each), two samples at a time.
@pytest.fixture(params=["whole", "rows", "samples"])
def pieces(request, monkeypatch):
    if request.param == "rows":
        monkeypatch.setattr(im2win_conv, "_MIN_PIECE_BYTES", 0)
        monkeypatch.setattr(im2win_conv, "_PIECE_FRACTION", 64)
    elif request.param == "samples":
        def two_samples(geo, dtype):
            return [(n, min(n + 2, geo.batch), 0, geo.out_height) for n in range(0, geo.batch, 2)]

        monkeypatch.setattr(im2win_conv, "_reference_pieces", two_samples)
    return request.param


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_reference_matches_conv2d(case, channels_last, dtype, pieces):
    x, weight, bias = make_inputs(case, dtype, channels_last)
    if pieces == "rows":
        geo = im2win_conv.geometry(x.shape, weight.shape, *conv_args(case))
        assert len(im2win_conv._reference_pieces(geo, dtype)) > geo.batch
    out = im2win_conv2d_reference(x, weight, bias, *conv_args(case), case.activation)
    aten = F.conv2d(x, weight, bias, *conv_args(case))
    assert out.dtype == dtype and out.shape == aten.shape and out.stride() == aten.stride()
    assert_close_scaled(out, expected(case, x, weight, bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES[:3], ids=CASE_IDS[:3])
def test_reference_low_precision(case, dtype):
    x, weight, bias = make_inputs(case, dtype, channels_last=False, seed=1)
    out = im2win_conv2d_reference(x, weight, bias, *conv_args(case), case.activation)
    assert out.dtype == dtype
    assert_close_scaled(out, expected(case, x, weight, bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reference_rounds_half_precision_once(dtype):
    """Half-precision inputs are multiplied in float32: a kernel column's partial sum past
    float16's range (65504), cancelled by the next column's, leaves aten's finite result, and
    the result is rounded once (aten's own rounding), not once per kernel column."""
    x = torch.full((1, 1, 2, 3), 256.0, dtype=dtype)
    weight = torch.tensor([[[[256.0, -255.0]]]], dtype=dtype)
    out = im2win_conv2d_reference(x, weight)
    torch.testing.assert_close(out, F.conv2d(x, weight), rtol=0, atol=0)
    case = CASES[0]
    x, weight, bias = make_inputs(case, dtype, channels_last=False, seed=2)
    out = im2win_conv2d_reference(x, weight, bias, *conv_args(case), case.activation)
    exact = expected(case, x, weight, bias)
    assert (out.double() - exact).abs().max() <= (exact.to(dtype).double() - exact).abs().max() * 1.01


# --------------------------------------------------------------------------------------
# Triton kernel (TRITON_INTERPRET=1 on CPU, or a GPU)
# --------------------------------------------------------------------------------------

KERNEL_CASES = [CASES[0], CASES[1], CASES[2], CASES[5], CASES[7]]


@needs_triton
@pytest.mark.parametrize("window", im2win_conv.WINDOWS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[case.name for case in KERNEL_CASES])
def test_triton_kernel_fp32(case, channels_last, window):
    device = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
    x, weight, bias = make_inputs(case, torch.float32, channels_last, device)
    out = im2win_conv2d_triton(
        x, weight, bias, *conv_args(case), case.activation, window, config=INTERPRETER_CONFIG, allow_tf32=False
    )
    aten = F.conv2d(x, weight, bias, *conv_args(case))
    assert out.stride() == aten.stride()
    assert_close_scaled(out, expected(case, x, weight, bias), torch.float32)


# Groups with a multiple of 16 input channels take the (tap, channel block) loop over a
# channels-innermost source, NCHW inputs included; none of CASES does. 48 channels with a
# 32-deep K tile leave a masked half block at the end of every tap.
TAP_MAJOR_CASES = [
    Case("tap-major-grouped", (1, 32, 5, 6), (8, 16, 3, 3), (1, 2), (1, 1), (2, 1), groups=2, activation="relu"),
    Case("tap-major-48", (2, 48, 4, 5), (10, 48, 3, 2), (1, 1), (1, 0), activation="silu"),
]


@needs_triton
@pytest.mark.parametrize("block_k", [16, 32])
@pytest.mark.parametrize("window", im2win_conv.WINDOWS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", TAP_MAJOR_CASES, ids=[case.name for case in TAP_MAJOR_CASES])
def test_triton_kernel_tap_major(case, channels_last, window, block_k):
    assert im2win_conv.tap_major(case.weight[1])
    device = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
    x, weight, bias = make_inputs(case, torch.float32, channels_last, device, seed=7)
    config = TileConfig(16, 16, block_k, num_warps=1, num_stages=1)
    out = im2win_conv2d_triton(x, weight, bias, *conv_args(case), case.activation, window, config=config, allow_tf32=False)
    aten = F.conv2d(x, weight, bias, *conv_args(case))
    assert out.stride() == aten.stride()
    assert_close_scaled(out, expected(case, x, weight, bias), torch.float32)


@needs_triton
@pytest.mark.parametrize("window", im2win_conv.WINDOWS)
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[6]], ids=[CASES[0].name, CASES[3].name, CASES[6].name])
def test_triton_kernel_fp16(case, window):
    device = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
    x, weight, bias = make_inputs(case, torch.float16, channels_last=case.groups > 1, device=device, seed=2)
    out = im2win_conv2d_triton(x, weight, bias, *conv_args(case), case.activation, window, config=INTERPRETER_CONFIG)
    assert out.dtype == torch.float16
    # The kernel accumulates in fp32 and rounds once: tighter than the reference's bound.
    assert_close_scaled(out, expected(case, x, weight, bias), torch.float16)


@needs_triton
def test_triton_autotuned_launch_path():
    """The autotuned wrapper (one config: the interpreter cannot time several)."""
    device = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
    case = CASES[1]
    x, weight, bias = make_inputs(case, torch.float32, channels_last=False, device=device, seed=3)
    out = im2win_conv2d_triton(
        x, weight, bias, *conv_args(case), "relu", "implicit", config=(INTERPRETER_CONFIG,), allow_tf32=False
    )
    ref = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), *conv_args(case)))
    assert_close_scaled(out, ref, torch.float32)


@needs_triton
def test_triton_autotune_prunes_to_the_problem():
    """Depthwise (C_out/g = 1, K = 9): pruning leaves the one 16-wide config, which the
    autotuner then runs without timing -- so this path runs in the interpreter too."""
    device = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
    case = CASES[2]
    x, weight, bias = make_inputs(case, torch.float32, channels_last=False, device=device, seed=6)
    configs = (TileConfig(32, 32, 32, 1, 1), INTERPRETER_CONFIG, TileConfig(16, 32, 16, 1, 1))
    out = im2win_conv2d_triton(x, weight, bias, *conv_args(case), "none", "implicit", config=configs, allow_tf32=False)
    ref = F.conv2d(x.double(), weight.double(), None, *conv_args(case))
    assert_close_scaled(out, ref, torch.float32)


def test_prune_configs_keeps_what_fits():
    triton = pytest.importorskip("triton", reason="pruning works on triton.Config objects")
    configs = [im2win_conv._triton_config(triton, config) for config in im2win_conv.AUTOTUNE_CONFIGS]
    depthwise = im2win_conv.prune_configs(configs, {"PIXELS": 4096, "OUT_GROUP": 1, "K_TOTAL": 9, "IN_GROUP": 1})
    assert {(c.kwargs["BLOCK_CO"], c.kwargs["BLOCK_K"]) for c in depthwise} == {(16, 16)}
    wide = {"PIXELS": 10**6, "OUT_GROUP": 256, "K_TOTAL": 1152, "IN_GROUP": 128}
    bf16 = im2win_conv.prune_configs(configs, {**wide, "src_ptr": torch.empty(1, dtype=torch.bfloat16)})
    assert len(bf16) == len(configs)
    # float32 128x256x64 in 3 stages is 288 KiB of shared memory: more than an H100 has.
    fp32 = im2win_conv.prune_configs(configs, {**wide, "src_ptr": torch.empty(1)})
    assert len(fp32) == len(configs) - 1
    # A (tap, channel block) layer's K tile is capped by one tap's 16 channels, not K = 144.
    per_tap = im2win_conv.prune_configs(configs, {**wide, "K_TOTAL": 144, "IN_GROUP": 16})
    assert {c.kwargs["BLOCK_K"] for c in per_tap} == {16}
    tiny = im2win_conv.prune_configs(configs, {"PIXELS": 1, "OUT_GROUP": 1, "K_TOTAL": 1, "IN_GROUP": 1})
    assert len(tiny) == 1 and tiny[0].kwargs["BLOCK_P"] == 64


@needs_cuda
@pytest.mark.parametrize("window", im2win_conv.WINDOWS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_triton_kernel_bf16_autotuned_gpu(case, channels_last, window):
    x, weight, bias = make_inputs(case, torch.bfloat16, channels_last, "cuda", seed=4)
    out = im2win_conv2d_triton(x, weight, bias, *conv_args(case), case.activation, window)
    assert_close_scaled(out, expected(case, x, weight, bias), torch.bfloat16)


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    nvidia = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(nvidia)


# (dtype, window, channels_last, activation, input_precision, compute capability)
# Between them the variants take each branch of every constexpr switch but the activation,
# on Hopper and on Ampere ("tap_major": channels-last, stepping K by (tap, channel block)).
CUDA_COMPILE_VARIANTS = [
    ("bf16", "materialized", False, "silu", "ieee", 90),
    ("fp16", "implicit", True, "gelu", "ieee", 80),
    ("bf16", "implicit", "tap_major", "relu", "ieee", 90),
]


_COMPILE_SCRIPT = r"""
import importlib.util, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Load the kernel module by path: importing the memopt package would pull in Inductor.
spec = importlib.util.spec_from_file_location("im2win_conv", sys.argv[3])
im2win_conv = sys.modules["im2win_conv"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(im2win_conv)

triton.knobs.cache.dir = sys.argv[1]
kernel = im2win_conv._kernel()
results = []
for dtype, window, channels_last, activation, precision, capability in json.loads(sys.argv[2]):
    constants = dict(
        STRIDE_H=1, STRIDE_W=2, PAD_H=1, PAD_W=1, DIL_H=1, DIL_W=2, K_H=3, K_W=3,
        MATERIALIZED=window == "materialized", CHANNELS_INNER=bool(channels_last),
        TAP_MAJOR=channels_last == "tap_major", HAS_BIAS=True,
        ACTIVATION=im2win_conv.ACTIVATIONS.index(activation), INPUT_PRECISION=precision,
        BLOCK_P=128, BLOCK_CO=64, BLOCK_K=32,
    )
    signature = {
        name: "constexpr" if name in constants else (f"*{dtype}" if name.endswith("_ptr") else "i32")
        for name in kernel.arg_names
    }
    constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": 4, "num_stages": 3},
    )
    ptx = compiled.asm["ptx"]
    results.append({"cubin": bool(compiled.asm.get("cubin")), "mma": "mma" in ptx})
print(json.dumps(results))
"""


@pytest.mark.skipif(not _ptxas_available(), reason="needs Triton's bundled ptxas to compile for CUDA")
def test_triton_kernel_compiles_for_cuda(tmp_path):
    """The compiled (not interpreted) kernel builds to a cubin for Hopper and Ampere without a
    GPU, bf16 included, using tensor-core MMA instructions. Runs in a
    subprocess: under TRITON_INTERPRET=1 this process's Triton only interprets."""
    import json
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    completed = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, str(tmp_path), json.dumps(CUDA_COMPILE_VARIANTS), im2win_conv.__file__],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert len(results) == len(CUDA_COMPILE_VARIANTS)
    for variant, result in zip(CUDA_COMPILE_VARIANTS, results):
        assert result["cubin"], variant
        assert result["mma"], variant  # tensor cores for bf16 / fp16


def test_tile_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(block_pixels=24)
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(block_k=8)


# --------------------------------------------------------------------------------------
# the op: opcheck, outputs and gradients
# --------------------------------------------------------------------------------------

op = torch.ops.memopt.im2win_conv2d


def op_call_args(case: Case, x, weight, bias, window="implicit"):
    return (x, weight, bias, list(case.stride), list(case.padding), list(case.dilation), case.groups,
            case.activation, window)


OPCHECK_CASES = [(CASES[0], False), (CASES[0], True), (CASES[1], False), (CASES[2], True)]


@pytest.mark.parametrize(
    ("case", "channels_last"), OPCHECK_CASES, ids=[f"{c.name}-{'cl' if cl else 'nchw'}" for c, cl in OPCHECK_CASES]
)
def test_op_opcheck(case, channels_last):
    x, weight, bias = make_inputs(case, torch.float32, channels_last)
    x.requires_grad_()
    weight.requires_grad_()
    torch.library.opcheck(op, op_call_args(case, x, weight, bias))


@pytest.mark.parametrize("activation", im2win_conv.ACTIVATIONS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_op_gradients_match_conv2d(activation, channels_last):
    case = dataclasses.replace(CASES[1], activation=activation)
    x, weight, bias = make_inputs(case, torch.float64, channels_last, seed=5)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    ours = op(*op_call_args(case, *leaves))
    grad_out = torch.randn_like(ours)
    ours.backward(grad_out)
    reference_leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    theirs = im2win_conv.apply_activation(F.conv2d(*reference_leaves, *conv_args(case)), activation)
    theirs.backward(grad_out)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    for mine, reference in zip(leaves, reference_leaves):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-10, atol=1e-10)


def test_op_rejects_bad_arguments():
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="groups"):
        op(x, weight, None, [1, 1], [0, 0], [1, 1], 1, "none", "implicit")
    with pytest.raises(ValueError, match="activation"):
        op(x, weight, None, [1, 1], [0, 0], [1, 1], 2, "tanh", "implicit")
    with pytest.raises(ValueError, match="window"):
        op(x, weight, None, [1, 1], [0, 0], [1, 1], 2, "none", "column")
    # What aten refuses, the op refuses too (the pass never sends it these; direct calls may).
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    for bias in (torch.randn(1), torch.randn(6, 1, 1)):
        with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
            op(x, weight, bias, [1, 1], [0, 0], [1, 1], 1, "none", "implicit")
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        op(x.to(torch.complex64), weight.to(torch.complex64), None, [1, 1], [0, 0], [1, 1], 1, "none", "implicit")
    with pytest.raises(ValueError, match="kernel spans 9 x 9"):
        op(x, torch.randn(6, 4, 9, 9), None, [1, 1], [1, 1], [1, 1], 1, "none", "implicit")
    with pytest.raises(ValueError, match="kernel spans 7 x 3"):
        op(x, weight, None, [1, 1], [0, 0], [3, 1], 1, "none", "implicit")


@needs_triton
@pytest.mark.parametrize("window", im2win_conv.WINDOWS)
def test_triton_kernel_reads_a_strided_bias(window):
    """A bias that is a view with a stride (a slice of a fused parameter) reads right."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3), torch.randn(12)[::2]
    out = im2win_conv2d_triton(x, weight, bias, [1, 1], [1, 1], [1, 1], 1, "none", window, config=INTERPRETER_CONFIG)
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, 1, 1), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# the pass
# --------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """Every form the pass handles, plus two it must leave to aten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)  # + ReLU(inplace=True)
        self.grouped = nn.Conv2d(8, 8, 3, padding="same", groups=4, bias=False)  # + SiLU
        self.strided = nn.Conv2d(8, 12, 3, stride=2, dilation=(1, 2), padding="valid")  # + GELU
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12)  # two users: no fusion
        self.even_same = nn.Conv2d(12, 6, 2, padding="same")  # asymmetric padding: left to aten
        self.line = nn.Conv1d(6, 6, 3)  # not 2-D: never matched

    def forward(self, x):
        x = F.relu(self.stem(x), inplace=True)
        x = F.silu(self.grouped(x))
        x = F.gelu(self.strided(x))
        y = self.depthwise(x)
        x = y + torch.sigmoid(y)
        x = self.even_same(x)
        return self.line(x.flatten(2)).sum(-1)


def im2win_result(report) -> memopt.PassResult:
    (result,) = [result for result in report.passes if result.name == "im2win"]
    return result


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_pass_inference_eager(channels_last):
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(2, 3, 13, 12)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = memopt.compile(model, lowering="eager", im2win=True, strict=True)
    with torch.no_grad():
        out = compiled(x)
        expected_out = model(x)
    result = im2win_result(memopt.last_report())
    assert result.matched == 5 and result.rewrites == 4, result
    by_node = {row["node"]: row for row in result.details}
    activations = sorted(row["activation"] for row in result.details if row["algorithm"] != "aten")
    assert activations == ["gelu", "none", "relu", "silu"]
    unsupported = [row for row in result.details if row["decision"] == "unsupported"]
    assert len(unsupported) == 1 and "asymmetric" in unsupported[0]["reason"]
    assert any("asymmetric" in note for note in result.notes)
    for row in by_node.values():
        if row["algorithm"] != "aten":
            assert row["im2win_window_bytes"] > 0 and row["im2col_bytes"] > 0
    assert by_node["conv2d"]["workspace_ratio"] <= 0.4  # 3x3 stride 1
    # On CPU the op runs its PyTorch implementation whichever form was chosen: its pieces'
    # workspace (the CUDA launcher's is tested on fake CUDA tensors below).
    for row in by_node.values():
        if row["algorithm"] != "aten":
            geo = im2win_conv.geometry(
                row["input"], row["weight"], row["stride"], row["padding"], row["dilation"], row["groups"]
            )
            assert row["workspace_bytes"] == im2win_conv.reference_workspace_bytes(x, geo) > 0, row
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)


def test_workspace_bytes_name_what_each_form_allocates():
    # The CUDA launcher's workspace, asked of fake CUDA tensors (no GPU needed).
    with FakeTensorMode():
        x = torch.empty(2, 32, 9, 10, device="cuda")
    weight = torch.randn(16, 32, 3, 3)
    geo = im2win_conv.geometry(x.shape, weight.shape, (1, 1), (1, 1), (1, 1), 1)
    x_bytes = x.numel() * x.element_size()
    # 32 channels per group: the (tap, channel block) loop reads a channels-last copy of NCHW x.
    assert im2win_conv.workspace_bytes(x, geo, "implicit") == x_bytes
    assert im2win_conv.workspace_bytes(x.to(memory_format=torch.channels_last), geo, "implicit") == 0
    assert im2win_conv.workspace_bytes(x, geo, "materialized") == geo.window_numel() * 4
    # 8 channels per group (groups=4): the flat K loop reads contiguous NCHW x in place.
    grouped = im2win_conv.geometry(x.shape, (16, 8, 3, 3), (1, 1), (1, 1), (1, 1), 4)
    assert im2win_conv.workspace_bytes(x, grouped, "implicit") == 0
    with FakeTensorMode():
        strided = torch.empty_strided((2, 32, 9, 5), (2880, 90, 10, 2), device="cuda")  # x[..., ::2]
    assert im2win_conv.workspace_bytes(strided, grouped, "implicit") == strided.numel() * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("batch", "channels", "size", "kernel", "stride", "padding"),
    [(4, 32, 32, 3, 1, 1), (1, 16, 40, 3, 1, 1), (2, 8, 23, 5, 2, 2), (3, 4, 9, 1, 1, 0)],
)
def test_cpu_implementation_workspace_is_a_fraction_of_im2win_window(
    batch, channels, size, kernel, stride, padding, dtype, monkeypatch
):
    """The CPU implementation works a piece of the output at a time: its measured peak beside
    the output stays within what ``workspace_bytes`` reports, and that is a fraction of the
    whole window tensor wherever the output has more than a few rows (it was about im2col's
    size: the window, a kernel column's GEMM operand and product, and an accumulator, each of
    the whole batch)."""
    monkeypatch.setattr(im2win_conv, "_MIN_PIECE_BYTES", 0)  # these layers are small: no 4 MiB floor
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, dtype=dtype)
    weight = torch.randn(24, channels, kernel, kernel, dtype=dtype)
    args = ([stride, stride], [padding, padding], [1, 1], 1, "relu", "materialized")
    geo = im2win_conv.geometry(x.shape, weight.shape, *args[:4])
    reported = im2win_conv.workspace_bytes(x, geo, "materialized")
    out = torch.ops.memopt.im2win_conv2d(x, weight, None, *args)
    out_bytes = out.numel() * out.element_size()
    measured = memopt.measure(lambda: torch.ops.memopt.im2win_conv2d(x, weight, None, *args)).peak_bytes
    assert measured - out_bytes <= reported, (measured, out_bytes, reported)
    if geo.out_height >= 16:
        assert reported <= geo.window_numel() * x.element_size() / 2


def test_pass_training_gradients_eager():
    torch.manual_seed(1)
    model = ConvNet()
    reference = ConvNet()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 11, 13)
    torch._dynamo.reset()
    compiled = memopt.compile(model, lowering="eager", im2win=True, strict=True)
    out = compiled(x)
    result = im2win_result(memopt.last_report())
    assert memopt.last_report().training
    assert result.rewrites == 4
    # Training fuses only ReLU (SiLU/GELU would recompute the convolution in the backward).
    assert sorted(row["activation"] for row in result.details if "activation" in row) == [
        "none", "none", "none", "relu"
    ]
    expected_out = reference(x)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected_out.backward(grad)
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_pass_inductor_channels_last():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, groups=8), nn.SiLU()
    ).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 11, 10).to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = memopt.compile(model, im2win=True, strict=True)
    with torch.no_grad():
        out = compiled(x)
        expected_out = model(x)
    assert im2win_result(memopt.last_report()).rewrites == 2
    assert out.stride() == expected_out.stride()
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)


class VmappedConv(nn.Module):
    """One convolution per image under ``torch.vmap`` (Dynamo inlines it) and one outside."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.first(x))
        return torch.vmap(lambda image: self.second(image.unsqueeze(0)).squeeze(0))(h)


def test_pass_leaves_convolutions_under_a_vmap_to_aten():
    torch.manual_seed(3)
    model = VmappedConv()
    x = torch.randn(2, 3, 9, 7)
    torch._dynamo.reset()
    with torch.no_grad():
        out = memopt.compile(model, lowering="eager", im2win=True, strict=True)(x)
        expected = model(x)
    result = im2win_result(memopt.last_report())
    assert result.rewrites == 1 and result.error is None
    assert any("torch.func transform" in note for note in result.notes), result.notes
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def small_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3))


def test_pass_auto_measures_and_caches(tmp_path):
    cache = tmp_path / "im2win.json"
    cache.write_text("{not json")  # a damaged cache is ignored and rewritten
    model, x = small_net(), torch.randn(1, 3, 9, 9)
    options = {"mode": "auto", "cache_path": str(cache)}
    torch._dynamo.reset()
    with torch.no_grad():
        out = memopt.compile(model, lowering="eager", im2win=options)(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    result = im2win_result(memopt.last_report())
    assert result.matched == 2
    assert [row["decision"] for row in result.details] == ["measured", "measured"]
    for row in result.details:
        times = row["times_ms"]
        faster = times["aten"] >= 1.05 * times["im2win-materialized"]
        assert row["algorithm"] == ("im2win-materialized" if faster else "aten")
    entries = json.loads(cache.read_text())
    assert len(entries) == 2 and all(key.startswith("cpu ") for key in entries)

    torch._dynamo.reset()
    with torch.no_grad():
        memopt.compile(model, lowering="eager", im2win=options)(x)
    assert [row["decision"] for row in im2win_result(memopt.last_report()).details] == ["cached", "cached"]


def test_pass_auto_keeps_what_another_process_saved_meanwhile(tmp_path, monkeypatch):
    """Processes sharing a cache each read it once, then measure (seconds per shape on a GPU):
    a save merges into the file as it is then, so neither loses the other's entries."""
    from memopt.passes import im2win as im2win_pass

    cache = tmp_path / "im2win.json"
    foreign = {"cuda other-process-shape": {"algorithm": "aten", "times_ms": {"aten": 1.0}}}
    real = im2win_pass._time_candidates

    def another_process_saves_first(*args, **kwargs):
        cache.write_text(json.dumps(foreign))  # after this process read the (missing) cache
        return real(*args, **kwargs)

    monkeypatch.setattr(im2win_pass, "_time_candidates", another_process_saves_first)
    model, x = small_net(), torch.randn(1, 3, 9, 9)
    torch._dynamo.reset()
    with torch.no_grad():
        memopt.compile(model, lowering="eager", im2win={"mode": "auto", "cache_path": str(cache)})(x)
    entries = json.loads(cache.read_text())
    assert len(entries) == 3 and entries["cuda other-process-shape"] == foreign["cuda other-process-shape"]
    # A cache path that cannot be written (here a folder) leaves no temporary file behind.
    folder = tmp_path / "a-folder"
    folder.mkdir()
    torch._dynamo.reset()
    with torch.no_grad():
        memopt.compile(model, lowering="eager", im2win={"mode": "auto", "cache_path": str(folder)})(x)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-folder", "im2win.json"]


def test_pass_auto_follows_cached_choice(tmp_path):
    """A cached choice of im2win is used without measuring (and rewrites the site)."""
    cache = tmp_path / "choices.json"
    model, x = small_net(), torch.randn(1, 3, 9, 9)
    options = {"mode": "auto", "cache_path": str(cache)}
    torch._dynamo.reset()
    with torch.no_grad():
        memopt.compile(model, lowering="eager", im2win=options)(x)
    entries = json.loads(cache.read_text())
    for entry in entries.values():
        entry["algorithm"] = "im2win-materialized"
    cache.write_text(json.dumps(entries))
    torch._dynamo.reset()
    with torch.no_grad():
        out = memopt.compile(model, lowering="eager", im2win=options)(x)
    result = im2win_result(memopt.last_report())
    assert result.rewrites == 2
    assert [row["decision"] for row in result.details] == ["cached", "cached"]
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_pass_under_autocast_computes_in_the_autocast_dtype():
    """Under torch.autocast the op casts input, weight and bias like aten's conv2d: the
    rewritten network returns bfloat16 and matches eager's autocast result."""
    torch.manual_seed(3)
    model = small_net().eval()
    x = torch.randn(2, 3, 9, 9)
    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = memopt.compile(model, lowering="eager", im2win=True, strict=True)(x)
        expected = model(x)
    result = im2win_result(memopt.last_report())
    assert result.rewrites == 2 and {row["dtype"] for row in result.details} == {"bfloat16"}
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_close_scaled(out, expected.double(), torch.bfloat16)


def test_pass_off_and_unsupported_dtype():
    model, x = small_net().double(), torch.randn(1, 3, 9, 9, dtype=torch.float64)
    torch._dynamo.reset()
    with torch.no_grad():
        memopt.compile(model, lowering="eager", im2win=False)(x)
    assert not [result for result in memopt.last_report().passes if result.name == "im2win"]
    torch._dynamo.reset()
    with torch.no_grad():
        out = memopt.compile(model, lowering="eager", im2win=True, strict=True)(x)
    result = im2win_result(memopt.last_report())
    assert result.matched == 2 and result.rewrites == 0
    assert all("dtype torch.float64" in note for note in result.notes)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_config_validation():
    assert Config().im2win == "auto"
    assert Config(im2win=True).im2win is True
    with pytest.raises(ValueError, match="'auto', True, False"):
        Config(im2win="yes")
    with pytest.raises(ValueError, match="'auto', True, False"):
        Config(im2win=1)
    with pytest.raises(ValueError, match="valid keys are: mode, cache_path, min_speedup"):
        Config(im2win={"mode": "auto", "cache": "x.json"})
    with pytest.raises(ValueError, match="min_speedup"):
        Config(im2win={"min_speedup": 0.5})
    with pytest.raises(ValueError, match="finite number >= 1"):
        Config(im2win={"min_speedup": float("inf")})
    options = Config(im2win={"cache_path": "/tmp/x.json"}).im2win
    assert options == Im2winOptions(mode="auto", cache_path="/tmp/x.json")
    assert Config(im2win={"mode": False}).im2win is False


def test_pass_auto_failed_candidate_keeps_aten(tmp_path, monkeypatch):
    """An im2win form that fails while being timed (say a Triton compile error) is never chosen."""
    from memopt.passes import im2win as im2win_pass

    real_run_ms = im2win_pass._run_ms

    def failing_for_im2win(fn, device):
        if getattr(fn, "func", None) is torch.ops.memopt.im2win_conv2d:
            raise RuntimeError("simulated kernel failure")
        return real_run_ms(fn, device)

    monkeypatch.setattr(im2win_pass, "_run_ms", failing_for_im2win)
    model, x = small_net(), torch.randn(1, 3, 9, 9)
    torch._dynamo.reset()
    with torch.no_grad():
        out = memopt.compile(model, lowering="eager", im2win={"cache_path": str(tmp_path / "c.json")})(x)
    result = im2win_result(memopt.last_report())
    assert result.rewrites == 0 and result.error is None
    assert all(row["times_ms"]["im2win-materialized"] is None for row in result.details)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
