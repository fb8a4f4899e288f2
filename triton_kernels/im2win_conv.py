"""im2win convolution: the window transform, a Triton GEMM over windows, and a PyTorch reference.

im2win ("Im2win: An Efficient Convolution Paradigm on GPU") reorders a convolution's input
``x[N, C, H, W]`` into windows, one per output row::

    win[n, c, i, m * K_h + h] = x_rows_padded[n, c, i * stride_h + h * dilation_h, m]

so ``win`` is ``[N, C, H_out, W * K_h]``. For output pixel ``(i, j)`` every tap ``(h, w)``
of channel ``c`` lies in one contiguous run of ``win[n, c, i]`` starting at
``(j * stride_w - pad_w) * K_h`` (with dilation 1), and the convolution is a GEMM with
``M = N * H_out * W_out`` (pixels), ``N = C_out`` and ``K = C * K_h * K_w`` whose K-slices
are those runs. The window tensor holds ``W * K_h`` values per output row where im2col holds
``W_out * K_h * K_w``: about ``stride_w / K_w`` of im2col's workspace (one third for 3x3,
stride 1, padding 1). Vertical zero padding is stored (it costs no extra rows: there are
``H_out`` window rows either way) but horizontal padding is not: the paper's layout with
padded columns would be ``(W + 2) / 3W`` of im2col, 0.43x on a 7-wide layer, while masking
the ``pad_w`` columns at the edges keeps every 3x3 stride-1 layer at 1/3.

Two ways to feed the GEMM are implemented and tested, chosen by the ``window`` argument:

* ``"materialized"`` (the paper): ``window_transform`` builds ``win`` (one strided copy),
  and the kernel reads the runs from it, masking only the ``pad_w`` edge columns.
* ``"implicit"``: the kernel reads the same ``(c, h, w)`` taps straight from ``x`` with
  masked loads for the padding; no workspace beyond a channels-last copy of an NCHW ``x``
  (see below).

Which one is faster depends on the layer (the implicit form moves fewer bytes; the
materialized form reads each run contiguously and masks columns only, not rows). On an H100
(bf16, batch 128, the im2win paper's layers) the implicit form was faster on every layer with
32 or more input channels, by up to 2.5x, and the materialized one on three of the four
3-channel stems, by at most 9%. Both stay: the ``im2win`` pass's ``"auto"`` mode times aten,
implicit and materialized per layer on CUDA and keeps the fastest. ``DEFAULT_WINDOW``, the form
used when nothing was measured, is ``"implicit"``: the faster one where it matters, and no
workspace beyond the copy below.

NCHW and channels-last inputs are both supported: the K index is decomposed so that its
fastest-varying part follows the source's contiguous dimension (``h`` of the window for NCHW,
``c`` for channels-last), and the weight matrix is laid out to match. When a group has a
multiple of 16 input channels (``tap_major``: every layer but the 3-channel stems and
depthwise ones in practice) the kernel always reads a channels-innermost source and steps
through K as (tap, channel block): one tap's channels are contiguous, so its tiles load as
16-byte vectors and feed Hopper's wgmma from a software-pipelined loop with no per-element
div/mod. An NCHW input then gets its window tensor built channels-last (same size), and the
implicit form reads a channels-last copy of ``x`` (the size of ``x``: its only workspace).
On sm_90 this took the NCHW bf16 layers from 2-byte scalar loads of A at 223-255 registers
to 16-byte ``cp.async`` at 128-160 (``benchmarks/im2win_aot.py`` compiles and counts).

The backward pass (``memopt::im2win_conv2d``'s autograd) uses aten's
``convolution_backward``: the input gradient is a transposed convolution and the weight
gradient a reduction over pixels, neither of which has the window structure this kernel
exploits, and cuDNN's backward algorithms are strong.

Only ``torch`` is imported at module level; Triton is imported when a kernel is first
launched, so the PyTorch reference works (and ``import memopt`` stays fast) without Triton.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "relu", "silu", "gelu")
WINDOWS = ("implicit", "materialized")
DEFAULT_WINDOW = "implicit"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------
# Geometry shared by the reference, the launcher, the op and the pass
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Sizes of one 2-D convolution (symmetric zero padding)."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @property
    def out_height(self) -> int:
        return _out_size(self.height, self.kernel_h, self.stride[0], self.padding[0], self.dilation[0])

    @property
    def out_width(self) -> int:
        return _out_size(self.width, self.kernel_w, self.stride[1], self.padding[1], self.dilation[1])

    def window_numel(self) -> int:
        """Elements of im2win's window tensor ``[N, C, H_out, W * K_h]``."""
        return self.batch * self.in_channels * self.out_height * self.width * self.kernel_h

    def im2col_numel(self) -> int:
        """Elements of im2col's column matrix ``[N, C * K_h * K_w, H_out * W_out]``."""
        return (
            self.batch * self.in_channels * self.kernel_h * self.kernel_w * self.out_height * self.out_width
        )

    def flops(self) -> int:
        """Multiply-adds times two of the convolution."""
        per_output = 2 * (self.in_channels // self.groups) * self.kernel_h * self.kernel_w
        return per_output * self.batch * self.out_channels * self.out_height * self.out_width


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def geometry(
    x_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> ConvGeometry:
    batch, channels, height, width = (int(size) for size in x_shape)
    out_channels, _, kernel_h, kernel_w = (int(size) for size in weight_shape)
    return ConvGeometry(
        batch, channels, height, width, out_channels, kernel_h, kernel_w,
        (int(stride[0]), int(stride[1])), (int(padding[0]), int(padding[1])),
        (int(dilation[0]), int(dilation[1])), int(groups),
    )


def is_channels_last(x: torch.Tensor) -> bool:
    """True when ``x`` is laid out channels-last (and not also plain contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def output_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The layout of the result: channels-last when the input or weight is, as aten's
    convolution does, so swapping one for the other keeps every downstream stride."""
    if is_channels_last(x) or is_channels_last(weight):
        return torch.channels_last
    return torch.contiguous_format


def check_arguments(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    activation: str,
    window: str,
) -> None:
    """Raise ``ValueError`` for anything the op does not support."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"im2win_conv2d takes 4-D input and weight, got {x.dim()}-D and {weight.dim()}-D")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError("im2win_conv2d needs input, weight and bias of one dtype")
    if x.dtype not in (*DTYPES, torch.float64):
        raise ValueError(f"im2win_conv2d supports float32, float16, bfloat16 (and float64 on CPU), got {x.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"im2win_conv2d: bias must have shape ({weight.shape[0]},) (one per output channel), "
                         f"got {tuple(bias.shape)}")
    if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        raise ValueError("im2win_conv2d takes stride, padding and dilation as two ints each")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0 or groups < 1:
        raise ValueError(f"bad stride/padding/dilation/groups: {stride}, {padding}, {dilation}, {groups}")
    if x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(
            f"im2win_conv2d: input channels {x.shape[1]} and weight {tuple(weight.shape)} do not match groups={groups}"
        )
    spans = [dilation[i] * (weight.shape[2 + i] - 1) + 1 for i in range(2)]
    padded = [x.shape[2 + i] + 2 * padding[i] for i in range(2)]
    if spans[0] > padded[0] or spans[1] > padded[1]:
        raise ValueError(
            f"im2win_conv2d: the kernel spans {spans[0]} x {spans[1]} (size and dilation), more than the padded "
            f"input's {padded[0]} x {padded[1]}: no output pixel"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")


# --------------------------------------------------------------------------------------
# Pure-PyTorch reference: explicit window transform + GEMM over the windows
# --------------------------------------------------------------------------------------


def window_transform(
    x: torch.Tensor,
    kernel_h: int,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    channels_last: bool | None = None,
) -> torch.Tensor:
    """im2win's window tensor ``win[N, C, H_out, W * K_h]`` of ``x`` (one strided copy).

    ``win[n, c, i, m * K_h + h] = x_rows_padded[n, c, i * stride_h + h * dilation_h, m]``
    where ``x_rows_padded`` has ``padding[0]`` zero rows above and below (horizontal padding
    is left to the GEMM's edge masks, see the module docstring). A channels-last ``x`` gives
    a channels-last window tensor (``C`` innermost), so each ``(w, h)`` run holds all
    channels of a group contiguously; ``channels_last`` overrides that choice (the Triton
    launcher asks for it with NCHW inputs too, see ``tap_major``).
    """
    batch, channels, _, width = x.shape
    x_padded = F.pad(x, (0, 0, padding[0], padding[0])) if padding[0] else x
    span = dilation[0] * (kernel_h - 1) + 1
    rows = x_padded.unfold(2, span, stride[0])[..., :: dilation[0]]  # [N, C, H_out, W, K_h]
    out_height = rows.shape[2]
    shape = (batch, channels, out_height, width * kernel_h)
    if channels_last is None:
        channels_last = is_channels_last(x)
    if channels_last:
        win = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    else:
        win = torch.empty(shape, dtype=x.dtype, device=x.device)
    win.unflatten(3, (width, kernel_h)).copy_(rows)
    return win


def valid_columns(geo: ConvGeometry, w: int) -> tuple[int, int]:
    """Output columns ``[first, stop)`` whose tap ``w`` falls inside the (unpadded) input."""
    stride, padding, dilation = geo.stride[1], geo.padding[1], geo.dilation[1]
    first = max(0, -((w * dilation - padding) // stride))  # ceil((padding - w*d) / stride)
    stop = min(geo.out_width, (geo.width - 1 + padding - w * dilation) // stride + 1)
    return first, max(first, stop)


def window_run(win: torch.Tensor, geo: ConvGeometry, w: int, first: int, stop: int) -> torch.Tensor:
    """The runs tap column ``w`` reads for output columns ``[first, stop)``, as a view
    ``[N, C, H_out, stop - first, K_h]`` of ``win`` (no copy; ``N`` and ``H_out`` are
    ``win``'s, which may hold some samples and output rows only)::

        run[n, c, i, j - first, h] = win[n, c, i, (j*stride_w - pad_w + w*dilation_w) * K_h + h]
    """
    s_n, s_c, s_i, s_m = win.stride()
    k_h = geo.kernel_h
    column = first * geo.stride[1] - geo.padding[1] + w * geo.dilation[1]
    return win.as_strided(
        (win.shape[0], geo.in_channels, win.shape[2], stop - first, k_h),
        (s_n, s_c, s_i, geo.stride[1] * k_h * s_m, s_m),
        win.storage_offset() + column * k_h * s_m,
    )


def apply_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)
    return y


# The CPU implementation works on a piece of the output at a time (some samples, or some
# rows of one sample), each piece's workspace at most an eighth of the whole window tensor's
# bytes, or 4 MiB where that is more (smaller pieces make GEMMs too small to run well): its
# workspace is a fraction of im2win's window tensor rather than a multiple of it (the window,
# one kernel column's GEMM operand and product, and a float32 accumulator for half precision,
# all of the whole batch, were about im2col's size).
_PIECE_FRACTION = 8
_MIN_PIECE_BYTES = 4 << 20


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _piece_bytes(geo: ConvGeometry, dtype: torch.dtype, samples: int, rows: int) -> int:
    """Workspace bytes of :func:`im2win_conv2d_reference` for a piece of ``samples`` samples
    by ``rows`` output rows: the rows of ``x`` it reads (copied where they take vertical
    padding), their window rows, one kernel column's GEMM operand and product, the
    accumulator when the output is of lower precision, and an activation's result."""
    element, accumulate = dtype.itemsize, _accumulate_dtype(dtype).itemsize
    x_rows = (rows - 1) * geo.stride[0] + geo.dilation[0] * (geo.kernel_h - 1) + 1
    columns = max(stop - first for first, stop in (valid_columns(geo, w) for w in range(geo.kernel_w)))
    per_row = (
        geo.in_channels * geo.width * geo.kernel_h * element  # window row
        + (geo.in_channels * geo.kernel_h + geo.out_channels) * columns * accumulate  # GEMM operand, product
        + geo.out_channels * geo.out_width * accumulate * (2 if accumulate != element else 1)
    )
    return samples * (rows * per_row + x_rows * geo.in_channels * geo.width * element)


def _reference_pieces(geo: ConvGeometry, dtype: torch.dtype) -> list[tuple[int, int, int, int]]:
    """The pieces ``(n0, n1, i0, i1)`` (samples, output rows) :func:`im2win_conv2d_reference`
    computes one after another: whole samples while they fit the budget, else row blocks of
    one sample (at least one row)."""
    budget = max(geo.window_numel() * dtype.itemsize // _PIECE_FRACTION, _MIN_PIECE_BYTES)
    height = geo.out_height
    sample = _piece_bytes(geo, dtype, 1, height)
    if sample <= budget:
        samples = max(1, budget // max(1, sample))
        return [(n, min(n + samples, geo.batch), 0, height) for n in range(0, geo.batch, samples)]
    rows = 1
    while rows < height and _piece_bytes(geo, dtype, 1, 2 * rows) <= budget:
        rows *= 2
    return [(n, n + 1, i, min(i + rows, height)) for n in range(geo.batch) for i in range(0, height, rows)]


def reference_workspace_bytes(x: torch.Tensor, geo: ConvGeometry) -> int:
    """Bytes :func:`im2win_conv2d_reference` (the op's CPU implementation) allocates beside
    its output: the largest of its pieces' workspace, plus one kernel column of the weight
    (in the accumulation dtype)."""
    pieces = _reference_pieces(geo, x.dtype)
    largest = max((_piece_bytes(geo, x.dtype, n1 - n0, i1 - i0) for n0, n1, i0, i1 in pieces), default=0)
    weight_column = geo.out_channels * (geo.in_channels // geo.groups) * geo.kernel_h
    return largest + weight_column * _accumulate_dtype(x.dtype).itemsize


def _window_piece(x: torch.Tensor, geo: ConvGeometry, n0: int, n1: int, i0: int, i1: int) -> torch.Tensor:
    """Rows ``[i0, i1)`` of samples ``[n0, n1)`` of the window tensor: built from the rows of
    ``x`` they read, with the vertical zero padding they need."""
    stride, padding, dilation = geo.stride[0], geo.padding[0], geo.dilation[0]
    top = i0 * stride - padding  # the first row read, in x's coordinates (negative: padding)
    bottom = (i1 - 1) * stride - padding + dilation * (geo.kernel_h - 1) + 1
    rows = x[n0:n1, :, max(top, 0) : min(bottom, geo.height)]
    above, below = max(-top, 0), max(bottom - geo.height, 0)
    if above or below:
        rows = F.pad(rows, (0, 0, above, below))
    return window_transform(rows, geo.kernel_h, geo.stride, (0, 0), geo.dilation)


def im2win_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    activation: str = "none",
) -> torch.Tensor:
    """The convolution in plain PyTorch, the im2win way: window transform, then for each kernel
    column ``w`` one batched GEMM ``[pixels, C/g * K_h] @ [C/g * K_h, C_out/g]`` over the
    windows, accumulated in float32 (float64 stays float64; half-precision operands are
    converted before the GEMM, whose product would otherwise be rounded, or overflow, in
    half precision). The result has aten's layout.

    This is also the op's CPU implementation. It computes the output a piece at a time (some
    samples, or some rows of one sample: :func:`_reference_pieces`), so its workspace
    (:func:`reference_workspace_bytes`: the piece's window tensor and one kernel column's GEMM
    operand and product) stays a fraction of the whole window tensor, never the im2col matrix.
    """
    geo = geometry(x.shape, weight.shape, stride, padding, dilation, groups)
    accumulate = _accumulate_dtype(x.dtype)
    g = groups
    in_group, out_group = geo.in_channels // g, geo.out_channels // g
    out = torch.empty(
        (geo.batch, geo.out_channels, geo.out_height, geo.out_width),
        dtype=x.dtype, device=x.device, memory_format=output_memory_format(x, weight),
    )
    # [G, N, H_out, W_out, C_out/g]: the output seen in the GEMMs' order (a view).
    out_view = out.unflatten(1, (g, out_group)).permute(1, 0, 3, 4, 2)
    grouped_weight = weight.unflatten(0, (g, out_group))  # [G, C_out/g, C/g, K_h, K_w]
    bias_view = bias.to(accumulate).view(g, 1, 1, 1, out_group) if bias is not None else None
    for n0, n1, i0, i1 in _reference_pieces(geo, x.dtype):
        win = _window_piece(x, geo, n0, n1, i0, i1)
        piece = out_view[:, n0:n1, i0:i1]
        acc = piece if accumulate == x.dtype else torch.empty(piece.shape, dtype=accumulate, device=x.device)
        acc.zero_()
        for w in range(geo.kernel_w):
            first, stop = valid_columns(geo, w)
            if first == stop:
                continue  # tap column w only ever reads horizontal padding
            run = window_run(win, geo, w, first, stop)  # [n, C, rows, J, K_h]
            # [G, n, rows, J, K_h, C/g]: pixels major, (h, c) contiguous, in the accumulation dtype.
            columns = run.unflatten(1, (g, in_group)).permute(1, 0, 3, 4, 5, 2)
            columns = columns.to(accumulate, memory_format=torch.contiguous_format).flatten(1, 3).flatten(2)
            # Kernel column w of the weight, [G, K_h * C/g, C_out/g] (made again per piece: a
            # copy of 1/K_w of the weight, against a GEMM of 2 * pixels times as many FLOPs).
            weight_column = grouped_weight[..., w].permute(0, 3, 2, 1).reshape(g, geo.kernel_h * in_group, out_group)
            partial = torch.bmm(columns, weight_column.to(accumulate))
            acc[:, :, :, first:stop] += partial.view(g, n1 - n0, i1 - i0, stop - first, out_group)
            del columns, partial, weight_column
        del win
        if bias_view is not None:
            acc += bias_view
        if activation != "none":
            acc.copy_(apply_activation(acc, activation))
        if acc is not piece:
            piece.copy_(acc)
    return out


# --------------------------------------------------------------------------------------
# Triton kernel and launcher
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One tile configuration of the Triton kernel: pixels x output channels x reduction."""

    block_pixels: int = 64
    block_channels: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_pixels", "block_channels", "block_k"):
            value = getattr(self, name)
            # tl.dot needs every tile side >= 16 and a power of two.
            if value < 16 or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {value}")


# The autotuned set on GPUs. Hopper-shaped tiles first: 128 pixels by 128-256 channels by
# 64 of K with 8 warps (two warpgroups, each a 64-row wgmma) and 3 stages is 96-144 KiB of
# shared memory in 16-bit types, Triton's best shape for large bf16 GEMMs on an H100; 128x64
# and 64x128 with 4 warps and 4 stages for C_out = 64 and the stems; 32-deep K tiles for
# float32 (no tensor cores with TF32 off, and a 64-deep fp32 tile would double the shared
# memory); 16-wide channel tiles for depthwise/grouped layers whose per-group C_out is tiny.
# ``prune_configs`` drops what does not fit the layer or the shared memory.
AUTOTUNE_CONFIGS: tuple[TileConfig, ...] = (
    TileConfig(128, 256, 64, 8, 3),
    TileConfig(128, 128, 64, 8, 3),
    TileConfig(128, 64, 64, 4, 4),
    TileConfig(128, 128, 32, 8, 3),
    TileConfig(128, 64, 32, 4, 4),
    TileConfig(64, 128, 32, 4, 4),
    TileConfig(128, 32, 32, 4, 4),
    TileConfig(128, 16, 16, 4, 3),
    TileConfig(64, 16, 16, 2, 3),
)

# Shared memory the pipelined A and B tiles may take: an H100 has 227 KiB per block, less a
# little Triton keeps for itself; an A100 has 163 KiB, where the launch fails and the
# autotuner skips the config.
SHARED_MEMORY_LIMIT = 200 * 1024

_ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


@functools.cache
def _kernel() -> Any:
    """Build the Triton kernel on first use (Triton is imported here, not at module import)."""
    import triton
    import triton.language as tl

    @triton.jit
    def im2win_conv_kernel(
        src_ptr, w_ptr, bias_ptr, out_ptr,
        PIXELS, OUT_HW, OUT_W, SRC_H, SRC_W,
        IN_GROUP, OUT_GROUP, K_TOTAL,
        src_sn, src_sc, src_srow, src_scol,
        out_sn, out_sc, out_sh, out_sw,
        STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
        PAD_H: tl.constexpr, PAD_W: tl.constexpr,
        DIL_H: tl.constexpr, DIL_W: tl.constexpr,
        K_H: tl.constexpr, K_W: tl.constexpr,
        MATERIALIZED: tl.constexpr, CHANNELS_INNER: tl.constexpr, TAP_MAJOR: tl.constexpr,
        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_p = tl.program_id(0)
        pid_co = tl.program_id(1)
        group = tl.program_id(2)

        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
        mask_p = offs_p < PIXELS
        mask_co = offs_co < OUT_GROUP
        n = offs_p // OUT_HW
        rest = offs_p - n * OUT_HW  # i * OUT_W + j
        i = rest // OUT_W
        j = rest % OUT_W

        # Address of tap (c, h, w) for pixel p splits into a pixel part and a K part, so each
        # tile is one outer sum. int64 pixel offsets: batch-128 layers pass 2**31 elements.
        channel0 = group * IN_GROUP
        col0 = j * STRIDE_W - PAD_W
        if MATERIALIZED:
            # win[n, c, i, (j*S_W - P_W + w*D_W)*K_H + h]; vertical padding is in the window.
            base_p = n.to(tl.int64) * src_sn + i.to(tl.int64) * src_srow + (col0 * K_H).to(tl.int64) * src_scol
        else:
            row0 = i * STRIDE_H - PAD_H
            base_p = n.to(tl.int64) * src_sn + row0.to(tl.int64) * src_srow + col0.to(tl.int64) * src_scol
        base_p += channel0.to(tl.int64) * src_sc

        acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
        w_rows = (group * OUT_GROUP + offs_co).to(tl.int64) * K_TOTAL
        if TAP_MAJOR:
            # Channels innermost and IN_GROUP a multiple of 16: step through K as (tap,
            # channel block). A tap's channels are one contiguous run per pixel, so the only
            # per-element index is an arange: the tile is 16-byte loads (cp.async on sm_80+)
            # feeding wgmma on sm_90, the padding mask is one bit per pixel and tap, and the
            # div/mod that splits K is done once per step on scalars, not per element.
            # One flat loop (not tap x block) so Triton's software pipeliner sees all of K.
            channel_blocks = tl.cdiv(IN_GROUP, BLOCK_K)
            offs_c = tl.arange(0, BLOCK_K)
            for step in range(0, K_H * K_W * channel_blocks):
                tap = step // channel_blocks
                c = (step - tap * channel_blocks) * BLOCK_K + offs_c
                w = tap // K_H
                h = tap - w * K_H
                col = col0 + w * DIL_W
                inside = mask_p & (col >= 0) & (col < SRC_W)
                if MATERIALIZED:
                    tap_off = ((w * DIL_W) * K_H + h) * src_scol
                else:
                    row = row0 + h * DIL_H
                    inside = inside & (row >= 0) & (row < SRC_H)
                    tap_off = (h * DIL_H) * src_srow + (w * DIL_W) * src_scol
                mask_c = c < IN_GROUP
                a = tl.load(
                    src_ptr + (base_p + tap_off)[:, None] + (c * src_sc)[None, :],
                    mask=inside[:, None] & mask_c[None, :],
                    other=0.0,
                )
                b = tl.load(
                    w_ptr + w_rows[None, :] + (tap * IN_GROUP + c)[:, None],
                    mask=mask_c[:, None] & mask_co[None, :],
                    other=0.0,
                )
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        else:
            for k0 in range(0, K_TOTAL, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K_TOTAL
                # Fastest-varying part of K follows the source's contiguous dimension.
                if CHANNELS_INNER:
                    c = offs_k % IN_GROUP
                    tap = offs_k // IN_GROUP
                    w = tap // K_H
                    h = tap % K_H
                else:
                    h = offs_k % K_H
                    tap = offs_k // K_H
                    w = tap % K_W
                    c = tap // K_W
                col = col0[:, None] + (w * DIL_W)[None, :]
                if MATERIALIZED:
                    off_k = c * src_sc + ((w * DIL_W) * K_H + h) * src_scol
                    inside = (col >= 0) & (col < SRC_W)
                    a_mask = mask_p[:, None] & mask_k[None, :] & inside
                else:
                    off_k = c * src_sc + (h * DIL_H) * src_srow + (w * DIL_W) * src_scol
                    row = row0[:, None] + (h * DIL_H)[None, :]
                    inside = (row >= 0) & (row < SRC_H) & (col >= 0) & (col < SRC_W)
                    a_mask = mask_p[:, None] & mask_k[None, :] & inside
                a = tl.load(src_ptr + base_p[:, None] + off_k[None, :], mask=a_mask, other=0.0)
                b = tl.load(
                    w_ptr + w_rows[None, :] + offs_k[:, None],
                    mask=mask_k[:, None] & mask_co[None, :],
                    other=0.0,
                )
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

        if HAS_BIAS:
            bias = tl.load(bias_ptr + group * OUT_GROUP + offs_co, mask=mask_co, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        if ACTIVATION == 1:
            acc = tl.maximum(acc, 0.0)
        elif ACTIVATION == 2:
            acc = acc / (1.0 + tl.exp(-acc))
        elif ACTIVATION == 3:
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))

        # The launcher's output is NCHW or channels-last, so out_sh == OUT_W * out_sw and
        # (i, j) is rest * out_sw: Triton recomputes the pixel index in the accumulator's
        # layout, and this leaves one division per element there where i and j took four
        # (about 128 div.s32 per thread for a 128x128 NCHW tile on sm_90).
        channel = group * OUT_GROUP + offs_co
        out_off = (
            n.to(tl.int64)[:, None] * out_sn
            + channel.to(tl.int64)[None, :] * out_sc
            + rest.to(tl.int64)[:, None] * out_sw
        )
        tl.store(
            out_ptr + out_off,
            acc.to(out_ptr.dtype.element_ty),
            mask=mask_p[:, None] & mask_co[None, :],
        )

    return im2win_conv_kernel


@functools.cache
def _autotuned(configs: tuple[TileConfig, ...]) -> Any:
    """The kernel autotuned over ``configs`` (one wrapper, and one tuning cache, per set)."""
    import triton

    return triton.autotune(
        configs=[_triton_config(triton, config) for config in configs],
        key=["PIXELS", "OUT_HW", "IN_GROUP", "OUT_GROUP", "K_TOTAL", "MATERIALIZED", "CHANNELS_INNER"],
        prune_configs_by={"early_config_prune": prune_configs},
        do_bench=_bench_candidate,
    )(_kernel())


def _bench_candidate(fn: Callable[[], Any], quantiles: Sequence[float]) -> Any:
    """Time one autotuning candidate: 25 ms of calls instead of Triton's default 100 ms.

    A convolution of a real layer takes 0.1-10 ms, so 25 ms is still several calls, and with
    up to nine candidates per (shape, dtype, window) the default would make tuning, not the
    network, the slow part of a model's first call.
    """
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def prune_configs(configs: list[Any], named_args: dict[str, Any], **_kwargs: Any) -> list[Any]:
    """Drop tile configs wider than the problem before timing them: a depthwise layer
    (C_out/g = 1, K = 9) gains nothing from 128-wide channel or 64-deep K tiles, and timing
    them only lengthens autotuning. A (tap, channel block) layer's K tile is capped by the
    channels of one tap, not all of K. Also drops configs whose pipelined tiles exceed
    ``SHARED_MEMORY_LIMIT`` (a float32 128x256x64 tile), which could never launch.
    Keeps the smallest config when none fits."""

    def cap(size: int) -> int:
        return max(16, 1 << max(0, int(size) - 1).bit_length())

    in_group = int(named_args["IN_GROUP"])
    limits = {
        "BLOCK_P": cap(named_args["PIXELS"]),
        "BLOCK_CO": cap(named_args["OUT_GROUP"]),
        "BLOCK_K": cap(in_group if tap_major(in_group) else named_args["K_TOTAL"]),
    }
    element = named_args["src_ptr"].element_size() if hasattr(named_args.get("src_ptr"), "element_size") else 4

    def shared_bytes(config: Any) -> int:
        tile = config.kwargs["BLOCK_K"] * (config.kwargs["BLOCK_P"] + config.kwargs["BLOCK_CO"])
        return tile * element * max(1, config.num_stages)

    kept = [
        config for config in configs
        if all(config.kwargs[name] <= limit for name, limit in limits.items())
        and shared_bytes(config) <= SHARED_MEMORY_LIMIT
    ]
    if kept:
        return kept
    return [min(configs, key=lambda config: tuple(config.kwargs[name] for name in limits))]


def _triton_config(triton: Any, config: TileConfig) -> Any:
    return triton.Config(
        {"BLOCK_P": config.block_pixels, "BLOCK_CO": config.block_channels, "BLOCK_K": config.block_k},
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def weight_matrix(weight: torch.Tensor, groups: int, channels_inner: bool) -> torch.Tensor:
    """``weight [C_out, C/g, K_h, K_w]`` as the kernel's ``[C_out, K]`` matrix, K ordered like
    the source reads: ``(w, h, c)`` for channels-last, ``(c, w, h)`` for NCHW."""
    if channels_inner:
        return weight.permute(0, 3, 2, 1).reshape(weight.shape[0], -1).contiguous()
    return weight.permute(0, 1, 3, 2).reshape(weight.shape[0], -1).contiguous()


def tap_major(in_group: int) -> bool:
    """Whether the kernel steps through K as (tap, channel block) over a channels-innermost
    source: when a group has a multiple of 16 input channels, so every block of a tap's
    channels is a whole number of 16-byte vectors (32 bytes in 16-bit types).

    Such layers get a channels-innermost source even from an NCHW input (the window tensor
    is built channels-last, or the implicit form reads a channels-last copy of ``x``): on an
    NCHW source K runs along ``h`` (stride ``W``) and each element of a tile is its own
    2-byte load with its own div/mod. Narrow stems (3 input channels) and depthwise layers
    keep the flat K loop, which packs several taps into one ``BLOCK_K`` instead of padding
    each tap's few channels to 16.
    """
    return in_group % 16 == 0


def workspace_bytes(x: torch.Tensor, geo: ConvGeometry, window: str) -> int:
    """Bytes the op allocates beside the output for input ``x`` (or its fake). On CUDA, the
    kernel's launcher: the window tensor (materialized form), or the channels-innermost copy
    of an NCHW ``x`` (implicit form with :func:`tap_major` groups), else nothing. Elsewhere
    the CPU implementation's (:func:`reference_workspace_bytes`), whatever ``window``."""
    if x.device.type != "cuda":
        return reference_workspace_bytes(x, geo)
    if window == "materialized":
        return geo.window_numel() * x.element_size()
    channels_last = is_channels_last(x)
    if (tap_major(geo.in_channels // geo.groups) and not channels_last) or not (channels_last or x.is_contiguous()):
        return x.numel() * x.element_size()
    return 0


def _launch_arguments(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    activation: str,
    window: str,
    allow_tf32: bool | None,
) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]:
    """The kernel's runtime arguments and constexprs, and the (empty) output tensor.

    Works on meta tensors too, which is how the sm_90 kernel is compiled ahead of time
    without a GPU (see ``benchmarks/im2win_aot.py``).
    """
    check_arguments(x, weight, bias, stride, padding, dilation, groups, activation, window)
    if x.dtype not in DTYPES:
        raise ValueError(f"im2win Triton kernel supports {DTYPES}, got {x.dtype}")
    geo = geometry(x.shape, weight.shape, stride, padding, dilation, groups)
    in_group, out_group = geo.in_channels // groups, geo.out_channels // groups
    by_tap = tap_major(in_group)
    channels_inner = is_channels_last(x) or by_tap
    if window == "materialized":
        src = window_transform(x, geo.kernel_h, geo.stride, geo.padding, geo.dilation, channels_last=channels_inner)
    elif channels_inner:
        # An NCHW x costs one channels-last copy here: the size of x, 1/K_h of the window.
        src = x.contiguous(memory_format=torch.channels_last)
    else:
        src = x.contiguous()
    weights = weight_matrix(weight, groups, channels_inner)
    out = torch.empty(
        (geo.batch, geo.out_channels, geo.out_height, geo.out_width),
        dtype=x.dtype, device=x.device, memory_format=output_memory_format(x, weight),
    )
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cudnn.allow_tf32
    precision = "tf32" if (allow_tf32 and x.dtype == torch.float32 and x.device.type == "cuda") else "ieee"
    pixels = geo.batch * geo.out_height * geo.out_width
    args = (
        # The kernel reads the bias with unit stride: a strided one (b[::2]) is copied.
        src, weights, bias.contiguous() if bias is not None else weights, out,
        pixels, geo.out_height * geo.out_width, geo.out_width, geo.height, geo.width,
        in_group, out_group, in_group * geo.kernel_h * geo.kernel_w,
        *src.stride(), *out.stride(),
    )
    constants = dict(
        STRIDE_H=geo.stride[0], STRIDE_W=geo.stride[1],
        PAD_H=geo.padding[0], PAD_W=geo.padding[1],
        DIL_H=geo.dilation[0], DIL_W=geo.dilation[1],
        K_H=geo.kernel_h, K_W=geo.kernel_w,
        MATERIALIZED=window == "materialized", CHANNELS_INNER=channels_inner, TAP_MAJOR=by_tap,
        HAS_BIAS=bias is not None, ACTIVATION=_ACTIVATION_CODES[activation],
        INPUT_PRECISION=precision,
    )
    return args, constants, out


def im2win_conv2d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    activation: str = "none",
    window: str = DEFAULT_WINDOW,
    config: TileConfig | Sequence[TileConfig] | None = None,
    allow_tf32: bool | None = None,
) -> torch.Tensor:
    """Launch the im2win Triton kernel.

    ``window``: ``"implicit"`` (taps read from ``x`` by addressing) or ``"materialized"``
    (``window_transform`` first, as in the paper). ``config``: one fixed ``TileConfig``
    (what the CPU tests use under ``TRITON_INTERPRET=1``, where autotuning would time every
    config in the interpreter), a sequence of them to autotune over, or ``None`` to
    autotune over ``AUTOTUNE_CONFIGS``.
    ``allow_tf32``: float32 inputs use TF32 tensor cores when true; ``None`` follows
    ``torch.backends.cudnn.allow_tf32``, the flag that governs the convolution this replaces.
    """
    args, constants, out = _launch_arguments(
        x, weight, bias, stride, padding, dilation, groups, activation, window, allow_tf32
    )
    if out.numel() == 0:
        return out
    pixels, out_group = args[4], args[10]

    def grid(meta: dict[str, Any]) -> tuple[int, int, int]:
        return (math.ceil(pixels / meta["BLOCK_P"]), math.ceil(out_group / meta["BLOCK_CO"]), groups)

    if config is None or not isinstance(config, TileConfig):
        _autotuned(tuple(config or AUTOTUNE_CONFIGS))[grid](*args, **constants)
    else:
        _kernel()[grid](
            *args, **constants,
            BLOCK_P=config.block_pixels, BLOCK_CO=config.block_channels, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return out
