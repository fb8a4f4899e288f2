"""``torch.ops.memopt.monarch_matmul``: ``y = x · Mᵀ`` for a Monarch matrix ``M = P·L·Pᵀ·R``.

``monarch_matmul(x, w1, w2)`` takes ``x (..., b*p)``, ``w1 (b, q, p)`` and ``w2 (b, s, q)``
(layout in :mod:`memopt.triton_kernels.monarch`) and returns ``(..., b*s)``. CPU: the
PyTorch reference (two batched matmuls and a transpose). CUDA: whichever is faster for the
shape of the Triton grouped-GEMM kernels (the permutation folded into their addressing) and
the same reference on cuBLAS, timed once per shape (:func:`choose_kernel`; force one with
:func:`set_kernel`). The backward is its own op, ``monarch_matmul_backward``, so AOTAutograd
and Inductor see both as single nodes; it recomputes the intermediate, so the forward saves
only its inputs, like ``nn.Linear``.

Why time at all: the winner depends on the shape, the GPU and the Triton version. On an H100
(torch 2.11, Triton 3.6, bfloat16, 8192 tokens) the first Triton kernels lost to the reference
in five of six square shapes, by up to 2.7x; the rewritten ones win in the four measured, by
1.05x (n=8192, nblocks=4) to 1.53x (n=8192, nblocks=16).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping

import torch

from memopt._torch_compat import cast_like_autocast
from memopt.triton_kernels.monarch import (
    monarch_backward_reference,
    monarch_matmul_reference,
    monarch_shapes,
)

__all__ = [
    "KERNELS",
    "choose_kernel",
    "chosen_kernels",
    "get_kernel",
    "monarch_backward_dispatched",
    "monarch_matmul",
    "monarch_matmul_backward",
    "monarch_matmul_dispatched",
    "set_kernel",
    "time_ms",
]

log = logging.getLogger("memopt")

# ---------------------------------------------------------------------------------------------
# Kernel choice on CUDA: Triton or the batched-matmul reference, timed once per shape.
# ---------------------------------------------------------------------------------------------

KERNELS = ("auto", "triton", "torch")
"""Values of :func:`set_kernel`: time both once per shape and keep the faster (``"auto"``),
always the Triton kernels, or always the batched-matmul reference (``"torch"``)."""

_kernel = "auto"

chosen_kernels: dict[tuple, str] = {}
"""The choice ``"auto"`` made per key ``(direction, tokens rounded up to a power of two,
nblocks, q, p, s, dtype, device name)``; in-process only, like cuDNN's benchmark mode."""


def set_kernel(kernel: str) -> None:
    """Which implementation the CUDA ops run: one of :data:`KERNELS` (default ``"auto"``)."""
    global _kernel
    if kernel not in KERNELS:
        raise ValueError(f"monarch kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    _kernel = kernel


def get_kernel() -> str:
    """The setting made by :func:`set_kernel`."""
    return _kernel


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds per call of ``fn`` on the current CUDA device.

    Triton's ``do_bench`` with 5 ms of warm-up and 25 ms of calls, as im2win's autotuning:
    its defaults (25 + 100 ms per candidate) would cost a quarter second per layer shape on a
    model's first call. Its first call of ``fn`` also absorbs Triton's compile and autotune."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def choose_kernel(key: tuple, candidates: Mapping[str, Callable[[], object]], can_time: bool = True) -> str:
    """The name of the candidate to run for ``key``.

    A kernel forced by :func:`set_kernel` wins; otherwise the choice cached in
    :data:`chosen_kernels`; otherwise every candidate is timed now with :func:`time_ms` and
    the fastest is cached. A candidate whose timing raises (a Triton compile error on an
    untested GPU, say) is never chosen. With ``can_time=False`` (inside CUDA graph capture,
    which would record the timing calls instead of running them) an uncached key gets
    ``"torch"``, uncached: cuBLAS's reference is never far off the kernels (at most 1.53x
    slower on the H100), while an untuned kernel on an unknown GPU can be much slower."""
    if _kernel != "auto":
        return _kernel
    choice = chosen_kernels.get(key)
    if choice is not None:
        return choice
    if not can_time:
        return "torch"
    times: dict[str, float] = {}
    for name, fn in candidates.items():
        try:
            times[name] = time_ms(fn)
        except Exception as error:
            failure = error
            log.warning("monarch_matmul: timing the %s kernel for %s failed (%s); not using it", name, key, error)
    if not times:
        raise failure
    choice = chosen_kernels[key] = min(times, key=times.__getitem__)
    log.info("monarch_matmul: %s for %s (ms: %s)", choice, key, times)
    return choice


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _choose(
    direction: str, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, candidates: Mapping[str, Callable[[], object]]
) -> str:
    # Tokens are rounded up to a power of two so that variable-length batches time a handful
    # of shapes, not one per length (each timing costs ~0.1 s on the first call).
    tokens = math.prod(x.shape[:-1])
    bucket = 1 << max(tokens - 1, 0).bit_length()
    key = (direction, bucket, *w1.shape, w2.shape[1], str(x.dtype), _device_name(x.device))
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    return choose_kernel(key, candidates, can_time=not capturing)


def monarch_matmul_dispatched(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The forward by the kernel :func:`choose_kernel` picks: the op's CUDA implementation.

    Works on any device (CPU tensors run the Triton kernels under ``TRITON_INTERPRET=1``),
    so CPU tests cover what CUDA runs."""
    from memopt.triton_kernels.monarch import monarch_matmul_triton

    candidates = {
        "triton": functools.partial(monarch_matmul_triton, x, w1, w2),
        "torch": functools.partial(_forward_reference, x, w1, w2),
    }
    return candidates[_choose("forward", x, w1, w2, candidates)]()


def _forward_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    # Autocast stays on inside an op's implementation; turned off here, or its bmm would return bfloat16
    # for float32 inputs where the fake implementation (and the Triton kernels) give float32.
    # Entered only when on: the context manager alone costs ~8 us a call on CPU.
    if not torch.is_autocast_enabled(x.device.type):
        return monarch_matmul_reference(x, w1, w2)
    with torch.autocast(x.device.type, enabled=False):
        return monarch_matmul_reference(x, w1, w2)


def _backward_reference(
    grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Autocast off as in the forward; contiguous like the fake implementation promises.
    if not torch.is_autocast_enabled(x.device.type):
        return tuple(t.contiguous() for t in monarch_backward_reference(grad, x, w1, w2))
    with torch.autocast(x.device.type, enabled=False):
        return tuple(t.contiguous() for t in monarch_backward_reference(grad, x, w1, w2))


def monarch_backward_dispatched(
    grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward by the kernel :func:`choose_kernel` picks (its own key, apart from the
    forward's): the op's CUDA implementation, on any device like
    :func:`monarch_matmul_dispatched`."""
    from memopt.triton_kernels.monarch import monarch_backward_triton

    candidates = {
        "triton": functools.partial(monarch_backward_triton, grad, x, w1, w2),
        "torch": functools.partial(_backward_reference, grad, x, w1, w2),
    }
    return candidates[_choose("backward", x, w1, w2, candidates)]()


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------


def _check(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int, int, int]:
    if x.dim() == 0:
        raise ValueError("monarch_matmul takes x of shape (..., nblocks*p), got a 0-d tensor")
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
    return monarch_matmul_dispatched(x, w1, w2)


# Under torch.autocast, like nn.Linear: x, w1 and w2 in the autocast dtype.
cast_like_autocast(monarch_matmul, tensor_args=(0, 1, 2))


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
    return monarch_backward_dispatched(grad, x, w1, w2)


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
