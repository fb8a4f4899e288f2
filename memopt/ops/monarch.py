"""``torch.ops.memopt.monarch_matmul``: ``y = x · Mᵀ`` for a Monarch matrix ``M = P·L·Pᵀ·R``.

``monarch_matmul(x, w1, w2)`` takes ``x (..., b*p)``, ``w1 (b, q, p)`` and ``w2 (b, s, q)``
(layout in :mod:`memopt.triton_kernels.monarch`) and returns ``(..., b*s)``. CPU: the
PyTorch reference (two batched matmuls and a transpose). CUDA: the Triton grouped-GEMM
kernels with the permutation folded into their addressing. The backward is its own op,
``monarch_matmul_backward``, so AOTAutograd and Inductor see both as single nodes; it
recomputes the intermediate, so the forward saves only its inputs, like ``nn.Linear``.
"""

from __future__ import annotations

import torch

from memopt.triton_kernels.monarch import (
    monarch_backward_reference,
    monarch_matmul_reference,
    monarch_shapes,
)

__all__ = ["monarch_matmul", "monarch_matmul_backward"]


def _forward_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    # Autocast stays on inside an op's implementation: off, or its bmm would return bfloat16
    # for float32 inputs where the fake implementation (and the Triton kernels) give float32.
    with torch.autocast(x.device.type, enabled=False):
        return monarch_matmul_reference(x, w1, w2)


def _backward_reference(
    grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Autocast off as in the forward; contiguous like the fake implementation promises.
    with torch.autocast(x.device.type, enabled=False):
        return tuple(t.contiguous() for t in monarch_backward_reference(grad, x, w1, w2))


def _check(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int, int, int]:
    shapes = monarch_shapes(x.shape[-1], w1, w2)
    if not (x.dtype == w1.dtype == w2.dtype):
        raise ValueError(f"monarch_matmul needs one dtype, got x {x.dtype}, w1 {w1.dtype}, w2 {w2.dtype}")
    if not (x.device == w1.device == w2.device):
        raise ValueError(f"monarch_matmul needs one device, got x {x.device}, w1 {w1.device}, w2 {w2.device}")
    return shapes


@torch.library.custom_op("memopt::monarch_matmul", mutates_args=(), device_types=("cpu",))
def monarch_matmul(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``x · Mᵀ`` for the Monarch matrix ``M`` of the block factors ``w1 (b, q, p)`` and
    ``w2 (b, s, q)``; ``x`` is ``(..., b*p)``, the result ``(..., b*s)``."""
    _check(x, w1, w2)
    return _forward_reference(x, w1, w2)


@monarch_matmul.register_kernel("cuda")
def _monarch_matmul_cuda(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    _check(x, w1, w2)
    from memopt.triton_kernels.monarch import monarch_matmul_triton

    return monarch_matmul_triton(x, w1, w2)


@monarch_matmul.register_fake
def _monarch_matmul_fake(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    nblocks, _, _, s, _ = _check(x, w1, w2)
    return x.new_empty((*x.shape[:-1], nblocks * s))


@torch.library.custom_op("memopt::monarch_matmul_backward", mutates_args=(), device_types=("cpu",))
def monarch_matmul_backward(
    grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx, dw1, dw2)`` of :func:`monarch_matmul` for the output gradient ``grad``."""
    _check(x, w1, w2)
    return _backward_reference(grad, x, w1, w2)


@monarch_matmul_backward.register_kernel("cuda")
def _monarch_matmul_backward_cuda(
    grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, w1, w2)
    from memopt.triton_kernels.monarch import monarch_backward_triton

    return monarch_backward_triton(grad, x, w1, w2)


@monarch_matmul_backward.register_fake
def _monarch_matmul_backward_fake(
    grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, w1, w2)
    contiguous = torch.contiguous_format
    return (
        torch.empty_like(x, memory_format=contiguous),
        torch.empty_like(w1, memory_format=contiguous),
        torch.empty_like(w2, memory_format=contiguous),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, w1, w2 = inputs
    ctx.save_for_backward(x, w1, w2)


def _backward(ctx, grad):
    x, w1, w2 = ctx.saved_tensors
    dx, dw1, dw2 = torch.ops.memopt.monarch_matmul_backward(grad.contiguous(), x, w1, w2)
    return dx, dw1, dw2


monarch_matmul.register_autograd(_backward, setup_context=_setup_context)
