"""Minimal reproduction of an Inductor scheduler bug (C++ backend), for an upstream report.

Needs only PyTorch (no memopt). Prints the bias gradient that Inductor computes for a small
backward graph against eager's; on PyTorch 2.13 (CPU) Inductor's is all zeros.

The graph: the gradient of nearest 2x upsampling (an accumulating ``index_put`` into zeros),
between two channels-last convolution backwards, through the backward of ``x / 1.0`` (the
shape of a diffusers UNet ResNet block's backward). Inductor's peak-memory reordering places
the zero fill of the ``index_put`` (fused with the division that reads it) before the
accumulation; see scheduler-renames.md beside this file.

    python docs/upstream/scheduler_renames_repro.py
"""

import torch
from torch._inductor.compile_fx import compile_fx_inner
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx


def backward(grad, upsampled, weight, rows, activation, shortcut_weight):
    conv_args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    grad_upsampled = torch.ops.aten.convolution_backward(
        grad, upsampled, weight, [8], *conv_args, [True, False, False]
    )[0]
    zeros = torch.zeros(2, 8, 4, 4)
    grad_in = torch.ops.aten.index_put(zeros, [None, None, rows[:, None], rows], grad_upsampled, True)
    shortcut_args = ([1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    return torch.ops.aten.convolution_backward(
        grad_in / 1.0, activation, shortcut_weight, [8], *shortcut_args, [False, True, True]
    )[2:]  # the bias gradient


def inputs() -> list[torch.Tensor]:
    torch.manual_seed(0)

    def channels_last(*shape):
        return torch.randn(*shape).contiguous(memory_format=torch.channels_last)

    return [
        channels_last(2, 8, 8, 8), channels_last(2, 8, 8, 8), channels_last(8, 8, 3, 3),
        torch.arange(8) // 2, channels_last(2, 8, 4, 4), torch.randn(8, 8, 1, 1),
    ]


def graph(args: list[torch.Tensor]) -> torch.fx.GraphModule:
    """``backward`` as the aten graph Inductor compiles (its own decompositions applied)."""
    return make_fx(backward, decomposition_table=select_decomp_table())(*args)


def main() -> None:
    args = inputs()
    gm = graph(args)
    expected = gm(*args)[0]
    with torch._inductor.config.patch(force_disable_caches=True):
        actual = compile_fx_inner(gm, args)(list(args))[0]
    print(f"torch {torch.__version__}")
    print("eager:   ", expected)
    print("inductor:", actual)
    wrong = not torch.allclose(actual, expected, rtol=1e-4, atol=1e-4)
    print("BUG: Inductor's result differs from eager" if wrong else "OK: Inductor matches eager")


if __name__ == "__main__":
    main()
