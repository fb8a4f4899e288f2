"""Reversible building blocks: couplings whose activations need not be kept for backward.

``RevCoupling(F, G)`` maps two streams ``(x1, x2)`` to ``y1 = a*x1 + F(x2)``,
``y2 = b*x2 + G(y1)``; ``ReversibleSequential(*couplings)`` chains them on the two halves
of its input. In eager mode a ``ReversibleSequential`` runs its chain through its own
``torch.autograd.Function`` that keeps only the final outputs and rebuilds everything else
in the backward. Under ``torch.compile`` it runs the plain coupling code, which memopt's
``reversible`` pass recognizes in the graph (other backends simply see ordinary code).

Dropout replays the same mask in the recomputation (the RNG state before each coupling
branch is recorded, as ``torch.utils.checkpoint`` does), and BatchNorm running statistics are
updated once: the recomputation runs on copies of the buffers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from memopt.ops.reversible import (
    MAX_REBUILD_GAIN,
    Chain,
    ReversibleChainFunction,
    Step,
    rebuild_factor,
    rng_state_bytes,
)


class RevCoupling(nn.Module):
    """One additive coupling ``y1 = a*x1 + F(x2); y2 = b*x2 + G(y1)``.

    ``scale_x1`` (``a``) and ``scale_x2`` (``b``) must be nonzero: the inverse divides by them.
    ``F`` maps stream 2 to stream 1's shape and ``G`` stream 1 to stream 2's.
    """

    def __init__(self, f: nn.Module, g: nn.Module, scale_x1: float = 1.0, scale_x2: float = 1.0) -> None:
        super().__init__()
        for scale in (scale_x1, scale_x2):
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
                raise ValueError(f"RevCoupling scales must be finite nonzero numbers, got {scale_x1} and {scale_x2}")
        self.f, self.g = f, g
        self.scale_x1, self.scale_x2 = float(scale_x1), float(scale_x2)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y1 = (x1 if self.scale_x1 == 1.0 else self.scale_x1 * x1) + self.f(x2)
        y2 = (x2 if self.scale_x2 == 1.0 else self.scale_x2 * x2) + self.g(y1)
        return y1, y2

    @torch.no_grad()
    def inverse(self, y1: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x1, x2)`` from ``(y1, y2)``: ``x2 = (y2 - G(y1))/b``, ``x1 = (y1 - F(x2))/a``."""
        x2 = (y2 - self.g(y1)) / self.scale_x2
        x1 = (y1 - self.f(x2)) / self.scale_x1
        return x1, x2


class ReversibleSequential(nn.Module):
    """A chain of :class:`RevCoupling` on the two halves of its input along ``dim``.

    ``forward(x)`` splits ``x`` into two equal halves along ``dim`` (channels: ``dim=1``,
    features: ``dim=-1``), runs the couplings and concatenates the two streams again;
    ``forward_streams(x1, x2)`` takes and returns the streams. Activation memory of the
    backward does not grow with the number of couplings, in eager mode and when compiled
    with memopt. ``preserve_rng_state=False`` skips recording the RNG state of each branch
    (5056 bytes on CPU, 16 on CUDA) when the branches draw no random numbers.

    ``segment_length``: in eager mode, rebuild at most this many couplings from one pair of
    kept outputs (each segment keeps its own two outputs). Rounding in the rebuilt inputs
    accumulates along a segment; deep stacks of BatchNorm + ReLU6 branches on tiny batches
    drift measurably at 32 couplings (docs/passes/reversible.md), 8 keeps them as accurate as
    the ordinary backward. ``None``: one segment, except where scales other than 1 would
    amplify rounding by more than 16x (as in the compiled pass).
    """

    def __init__(
        self,
        *couplings: RevCoupling,
        dim: int = 1,
        preserve_rng_state: bool = True,
        segment_length: int | None = None,
    ) -> None:
        super().__init__()
        if segment_length is not None and not _positive_int(segment_length):
            raise ValueError(f"segment_length must be a positive number of couplings or None, got {segment_length!r}")
        self.segment_length = segment_length
        for coupling in couplings:
            if not isinstance(coupling, RevCoupling):
                raise TypeError(f"ReversibleSequential takes RevCoupling modules, got {type(coupling).__name__}")
        self.couplings = nn.ModuleList(couplings)
        self.dim = dim
        self.preserve_rng_state = preserve_rng_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.chunk(x, 2, dim=self.dim)
        y1, y2 = self.forward_streams(x1, x2)
        return torch.cat([y1, y2], dim=self.dim)

    def forward_streams(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        needs_grad = torch.is_grad_enabled() and (
            x1.requires_grad or x2.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if torch.compiler.is_compiling() or not needs_grad or len(self.couplings) == 0:
            # Plain code: memopt's reversible pass finds these couplings in the graph.
            for coupling in self.couplings:
                x1, x2 = coupling(x1, x2)
            return x1, x2
        for segment, rebuildable in self._segments():
            if not rebuildable:
                (coupling,) = segment
                x1, x2 = coupling(x1, x2)  # ordinary autograd
                continue
            chain, params, consts = self._chain(segment, x1.device)
            x1, x2 = ReversibleChainFunction.apply(chain, x1, x2, len(params), *params, *consts)
        return x1, x2

    def _segments(self) -> list[tuple[list[RevCoupling], bool]]:
        """Runs of couplings rebuilt from one pair of kept outputs (``True``), each within
        :data:`MAX_REBUILD_GAIN` (the product of :func:`rebuild_factor` over its scales).

        Rebuilding ``x2 = (y2 - G(y1)) / scale_x2`` amplifies the rounding in ``y2`` by
        ``rebuild_factor(scale_x2)``, and F is recomputed on ``x2``: a coupling whose
        ``scale_x2`` alone is over the limit runs as ordinary code, alone (``False``).
        Rebuilding ``x1`` feeds the previous coupling's G, so a ``scale_x1`` alone over the
        limit is only allowed on a segment's first coupling (its ``x1`` is the segment's
        input), where it does not count."""
        segments: list[tuple[list[RevCoupling], bool]] = []
        current: list[RevCoupling] = []
        gain = 1.0
        for coupling in self.couplings:
            outer = rebuild_factor(coupling.scale_x1)
            inner = rebuild_factor(coupling.scale_x2)
            full = self.segment_length is not None and len(current) >= self.segment_length
            if current and (
                full or inner > MAX_REBUILD_GAIN or outer > MAX_REBUILD_GAIN or gain * outer * inner > MAX_REBUILD_GAIN
            ):
                segments.append((current, True))
                current = []
            if inner > MAX_REBUILD_GAIN:
                segments.append(([coupling], False))
                continue
            gain = gain * outer * inner if current else (outer if outer <= MAX_REBUILD_GAIN else 1.0) * inner
            current.append(coupling)
        if current:
            segments.append((current, True))
        return segments

    def _chain(self, couplings, device: torch.device) -> tuple[Chain, list[torch.Tensor], list[torch.Tensor]]:
        params: list[torch.Tensor] = []
        consts: list[torch.Tensor] = []
        steps = []
        for coupling in couplings:
            for branch, scale in ((coupling.f, coupling.scale_x1), (coupling.g, coupling.scale_x2)):
                steps.append(self._step(branch, scale, params, consts))
        # Every buffer is recomputed on a copy: BatchNorm's running statistics and
        # num_batches_tracked were updated by the forward already.
        return Chain(steps, list(range(len(consts))), rng_state_bytes(device)), params, consts

    def _step(self, branch: nn.Module, scale: float, params: list, consts: list) -> Step:
        param_names, param_index = _pooled(branch.named_parameters(), params)
        buffer_names, const_index = _pooled(branch.named_buffers(), consts)

        def fn(x, step_params, step_consts, _sizes=()):
            state = dict(zip(param_names, step_params))
            state.update(zip(buffer_names, step_consts))
            if torch.is_grad_enabled():  # the backward's recomputation
                return torch.func.functional_call(branch, state, (x,))
            with _ReadsNothingElseNeedingGrad((x, *step_params, *step_consts)):  # the forward, under no_grad
                return torch.func.functional_call(branch, state, (x,))

        # In eval mode too: MC dropout (F.dropout(..., training=True)) or injected noise
        # draws whatever the module's mode, as torch.utils.checkpoint assumes.
        return Step(fn, scale, param_index, const_index, self.preserve_rng_state)


class _ReadsNothingElseNeedingGrad(TorchFunctionMode):
    """Raises when a branch, run in the chain's forward (under no_grad: what it computes needs
    no gradient), reads a tensor that requires grad other than its input and its own
    parameters and buffers: a conditioning embedding set as an attribute of the branch, say.
    The chain's backward differentiates the branches with respect to those only, so that
    tensor's gradient would be lost without a word. One identity test per tensor argument of
    each torch function the branch calls."""

    def __init__(self, allowed: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.allowed = {id(tensor) for tensor in allowed}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in (*args, *kwargs.values()):
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad and id(tensor) not in self.allowed:
                    raise ValueError(
                        f"ReversibleSequential: a coupling branch reads a tensor of shape {tuple(tensor.shape)} that "
                        "requires grad but is neither a parameter or buffer of the branch nor a stream: the "
                        "reversible backward would drop its gradient. Make it a parameter or buffer of the branch, "
                        "detach it, or run these couplings as plain modules"
                    )
        return func(*args, **kwargs)


def _pooled(named: Iterable[tuple[str, torch.Tensor]], pool: list) -> tuple[list[str], list[int]]:
    """The names of ``named``'s tensors and their positions in ``pool``, appending those not
    in it yet (by identity: F and G may share a tensor)."""
    names, indices = [], []
    for name, tensor in named:
        index = next((i for i, pooled in enumerate(pool) if pooled is tensor), None)
        if index is None:
            index = len(pool)
            pool.append(tensor)
        names.append(name)
        indices.append(index)
    return names, indices


def _mbconv_branch(conv: type, norm: type, channels: int, expansion: int, kernel_size: int, dropout: float) -> nn.Module:
    hidden = channels * expansion
    layers = [
        conv(channels, hidden, 1, bias=False),
        norm(hidden),
        nn.ReLU6(),
        conv(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=False),
        norm(hidden),
        nn.ReLU6(),
    ]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [conv(hidden, channels, 1, bias=False), norm(channels)]
    return nn.Sequential(*layers)


class ReversibleMBConv2d(ReversibleSequential):
    """Reversible mobile inverted bottlenecks on ``channels`` (even) 2-D feature maps.

    ``depth`` couplings whose F and G are each an MBConv on ``channels // 2`` channels:
    1x1 expansion by ``expansion`` -> BatchNorm -> ReLU6 -> depthwise ``kernel_size`` conv ->
    BatchNorm -> ReLU6 -> (dropout) -> 1x1 projection -> BatchNorm (Pendse et al., "Memory
    Efficient 3D U-Net with Reversible Mobile Inverted Bottlenecks", 2020). Shape-preserving.
    """

    _conv: type = nn.Conv2d
    _norm: type = nn.BatchNorm2d
    _layout = ("N", "C", "H", "W")

    def __init__(
        self,
        channels: int,
        depth: int = 1,
        expansion: int = 4,
        kernel_size: int = 3,
        dropout: float = 0.0,
        segment_length: int | None = None,
    ) -> None:
        name = type(self).__name__
        if not _positive_int(channels) or channels % 2:
            raise ValueError(f"{name} needs an even, positive number of channels, got {channels!r}")
        for argument, value in (("depth", depth), ("expansion", expansion)):
            if not _positive_int(value):
                raise ValueError(f"{name} {argument} must be an int >= 1, got {value!r}")
        if not _positive_int(kernel_size) or kernel_size % 2 == 0:
            raise ValueError(
                f"{name} kernel_size must be odd (the depthwise convolution keeps the size), got {kernel_size!r}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"{name} dropout must be a probability in [0, 1), got {dropout!r}")
        half = channels // 2
        couplings = [
            RevCoupling(
                _mbconv_branch(self._conv, self._norm, half, expansion, kernel_size, dropout),
                _mbconv_branch(self._conv, self._norm, half, expansion, kernel_size, dropout),
            )
            for _ in range(depth)
        ]
        super().__init__(*couplings, dim=1, segment_length=segment_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != len(self._layout):  # an unbatched input would pass the convolutions, misread
            layout = ", ".join(self._layout)
            raise ValueError(f"{type(self).__name__} takes [{layout}] inputs, got shape {list(x.shape)}")
        return super().forward(x)


class ReversibleMBConv3d(ReversibleMBConv2d):
    """:class:`ReversibleMBConv2d` for 3-D (volumetric) feature maps."""

    _conv = nn.Conv3d
    _norm = nn.BatchNorm3d
    _layout = ("N", "C", "D", "H", "W")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
