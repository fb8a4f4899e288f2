"""``torch.ops.memopt.im2win_conv2d``: a 2-D convolution computed the im2win way.

CPU: the pure-PyTorch reference (window transform + GEMM over windows) from
``memopt.triton_kernels.im2win_conv``. CUDA: the Triton kernel (Triton imported on first
use). Both take the same arguments and return aten's result layout (channels-last when the
input or weight is channels-last), so the op can stand in for ``torch.conv2d`` (followed by
the fused ``activation``) without changing any downstream stride.

Autograd: the gradients come from aten's ``convolution_backward`` (cuDNN on GPUs). The input
gradient is a transposed convolution and the weight gradient a pixel reduction; neither has
the window structure the forward kernel exploits. A fused ReLU is differentiated from the
saved output; a fused SiLU/GELU recomputes the pre-activation with aten's convolution in the
backward pass (the ``im2win`` pass fuses only ReLU into training graphs for that reason).
"""

from __future__ import annotations

import torch

from memopt._torch_compat import cast_like_autocast
from memopt.triton_kernels import im2win_conv

OP_NAME = "memopt::im2win_conv2d"


@torch.library.custom_op(OP_NAME, mutates_args=())
def im2win_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    activation: str,
    window: str,
) -> torch.Tensor:
    """``activation(conv2d(x, weight, bias, stride, padding, dilation, groups))`` via im2win.

    ``padding`` is symmetric zero padding ``[pad_h, pad_w]``; ``activation`` is one of
    ``"none"``, ``"relu"``, ``"silu"``, ``"gelu"`` (exact, erf form); ``window`` picks the
    CUDA kernel's form, ``"implicit"`` or ``"materialized"`` (the CPU implementation always
    materializes the window tensor).
    """
    im2win_conv.check_arguments(x, weight, bias, stride, padding, dilation, groups, activation, window)
    return im2win_conv.im2win_conv2d_reference(x, weight, bias, stride, padding, dilation, groups, activation)


@im2win_conv2d.register_kernel("cuda")
def _im2win_conv2d_cuda(x, weight, bias, stride, padding, dilation, groups, activation, window):
    return im2win_conv.im2win_conv2d_triton(
        x, weight, bias, stride, padding, dilation, groups, activation, window
    )


# Under torch.autocast, like aten's conv2d: input, weight and bias in the autocast dtype.
cast_like_autocast(im2win_conv2d, tensor_args=(0, 1, 2))


@im2win_conv2d.register_fake
def _im2win_conv2d_fake(x, weight, bias, stride, padding, dilation, groups, activation, window):
    im2win_conv.check_arguments(x, weight, bias, stride, padding, dilation, groups, activation, window)
    out_height = (x.shape[2] + 2 * padding[0] - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
    out_width = (x.shape[3] + 2 * padding[1] - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
    return torch.empty(
        (x.shape[0], weight.shape[0], out_height, out_width),
        dtype=x.dtype,
        device=x.device,
        memory_format=im2win_conv.output_memory_format(x, weight),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, activation, _window = inputs
    ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
    ctx.activation = activation
    ctx.has_bias = bias is not None
    saved_output = output if activation == "relu" else None
    saved_bias = bias if activation in ("silu", "gelu") else None
    ctx.save_for_backward(x, weight, saved_output, saved_bias)


def _backward(ctx, grad):
    x, weight, output, bias = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    if ctx.activation == "relu":
        grad = torch.ops.aten.threshold_backward(grad, output, 0)
    elif ctx.activation in ("silu", "gelu"):
        pre = torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)
        if ctx.activation == "silu":
            grad = torch.ops.aten.silu_backward(grad, pre)
        else:
            grad = torch.ops.aten.gelu_backward(grad, pre)
    needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if ctx.has_bias else None,
        stride, padding, dilation, False, [0, 0], groups,
        [needs_x, needs_weight, needs_bias and ctx.has_bias],
    )
    return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


im2win_conv2d.register_autograd(_backward, setup_context=_setup_context)
