"""Monarch layers: ``MonarchLinear`` and ``monarchize``.

A Monarch matrix ``M = P·L·Pᵀ·R`` (Dao et al., 2022) with ``nblocks = b`` block-diagonal
factors holds ``2n²/b`` parameters instead of ``n²`` for a square ``n x n`` layer and costs
``2n²/b`` multiply-adds per token, so at ``b = 4`` it halves the work of a dense layer. Every
block of its ``b x b`` block grid has rank ``<= r`` (``r = n/b²``; the layout is documented in
:mod:`memopt.triton_kernels.monarch`), which makes the projection of a trained dense layer a
truncated SVD per block.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import sys
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import memopt.ops.monarch  # noqa: F401  (registers torch.ops.memopt.monarch_matmul)
from memopt.triton_kernels.monarch import monarch_dense, project

__all__ = ["MonarchLinear", "MonarchReplacement", "monarch_block_rank", "monarchize"]


def monarch_block_rank(in_features: int, out_features: int, nblocks: int) -> int:
    """Rank of each block of the ``nblocks x nblocks`` grid: ``ceil(min(p, s) / nblocks)``
    for input/output block sizes ``p`` and ``s``. For a square layer this gives ``2n²/nblocks``
    parameters (the paper's count); ``r = 1`` when ``nblocks² = n``."""
    p = -(-in_features // nblocks)
    s = -(-out_features // nblocks)
    return max(1, -(-min(p, s) // nblocks))


class MonarchLinear(nn.Module):
    """A drop-in ``nn.Linear`` whose weight is a Monarch matrix ``P·L·Pᵀ·R``.

    Args:
        in_features, out_features: any sizes; they are padded up to multiples of ``nblocks``
            inside the layer (zeros in, extra outputs sliced off), so rectangular and odd
            sizes work.
        nblocks: blocks per factor (``b``). Parameters and FLOPs are about
            ``(in + out) * min(in, out) / b`` against ``in * out`` for the dense layer.
        bias: add a learnable bias, like ``nn.Linear``.

    Parameters: ``w1 (b, q, p)`` (the block-diagonal R), ``w2 (b, s, q)`` (L) and ``bias``.
    The forward calls ``torch.ops.memopt.monarch_matmul``, so a compiled graph holds one op
    per layer: two batched matmuls on CPU; on CUDA the faster of the Triton kernels and those
    batched matmuls, timed once per shape (``memopt.ops.monarch.set_kernel`` forces one).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int = 4,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(nblocks, int) or isinstance(nblocks, bool) or nblocks < 1:
            raise ValueError(f"nblocks must be a positive int, got {nblocks!r}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"features must be positive, got in={in_features}, out={out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.nblocks = nblocks
        self.in_block = -(-in_features // nblocks)
        self.out_block = -(-out_features // nblocks)
        self.block_rank = monarch_block_rank(in_features, out_features, nblocks)
        mid = nblocks * self.block_rank
        factory = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(nblocks, mid, self.in_block, **factory))
        self.w2 = nn.Parameter(torch.empty(nblocks, self.out_block, mid, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.projection_error: float | None = None
        """Relative error ``||W - M|| / ||W||`` when built by :meth:`from_dense`."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialize so the output has ``nn.Linear``'s scale: ``w1`` uniform in
        ``±1/sqrt(p)`` (``h`` gets variance ``var(x)/3``, as a Kaiming-uniform dense layer
        gives its output) and ``w2`` uniform in ``±sqrt(3/q)`` (variance kept through ``L``)."""
        with torch.no_grad():
            bound1 = 1.0 / math.sqrt(self.in_block)
            bound2 = math.sqrt(3.0 / self.w2.shape[2])
            self.w1.uniform_(-bound1, bound1)
            self.w2.uniform_(-bound2, bound2)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"MonarchLinear({self.in_features}, {self.out_features}) takes inputs of shape (..., "
                f"{self.in_features}), got {tuple(x.shape)}"
            )
        padded_in = self.nblocks * self.in_block
        if padded_in != self.in_features:
            x = F.pad(x, (0, padded_in - self.in_features))
        y = torch.ops.memopt.monarch_matmul(x, self.w1, self.w2)
        if self.nblocks * self.out_block != self.out_features:
            y = y[..., : self.out_features]
        if self.bias is not None:
            # Under autocast the op returns the autocast dtype; add the bias in it, as
            # nn.Linear does (a no-op cast otherwise).
            y = y + self.bias.to(y.dtype)
        return y

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight of the equivalent ``nn.Linear``."""
        return monarch_dense(self.w1, self.w2)[: self.out_features, : self.in_features]

    @classmethod
    def from_dense(
        cls, linear: nn.Module | torch.Tensor, nblocks: int = 4, bias: torch.Tensor | None = None
    ) -> MonarchLinear:
        """The Frobenius-optimal Monarch approximation of a dense layer.

        ``linear`` is an ``nn.Linear``, a transformers ``Conv1D`` (weight stored transposed)
        or an ``(out, in)`` weight tensor (then ``bias`` is optional). The relative error
        ``||W - M|| / ||W||`` is kept in ``.projection_error``.
        """
        weight, bias = _dense_weight(linear, bias)
        out_features, in_features = weight.shape
        layer = cls(
            in_features, out_features, nblocks, bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        w1, w2, error = project(weight, nblocks, layer.block_rank)
        with torch.no_grad():
            layer.w1.copy_(w1)
            layer.w2.copy_(w2)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        layer.projection_error = error
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
            f"block_rank={self.block_rank}, bias={self.bias is not None}"
        )


@dataclasses.dataclass
class MonarchReplacement:
    """One layer :func:`monarchize` replaced."""

    name: str
    in_features: int
    out_features: int
    nblocks: int
    rel_error: float
    """Relative Frobenius error ``||W - M|| / ||W||`` of the projected weight."""
    dense_params: int
    monarch_params: int
    also_named: tuple[str, ...] = ()
    """Other names of the same module (one layer registered in several places, as ALBERT-style
    weight sharing does): every one now holds the same Monarch layer."""


def monarchize(
    model: nn.Module,
    nblocks: int = 4,
    min_features: int = 512,
    targets: Sequence[str] | None = None,
) -> list[MonarchReplacement]:
    """Replace dense layers of ``model`` in place by their Monarch projections, for training.

    A layer is replaced when it is an ``nn.Linear`` (or a transformers ``Conv1D``, the
    transposed linear of GPT-2), its name matches one of the ``fnmatch`` patterns
    ``targets`` (``None``: every name; e.g. ``["*.mlp.*"]``), ``min(in, out) >= min_features``
    and the Monarch layer is smaller than the dense one. The new layer starts from the
    optimal projection of the old weights (so a trained model keeps what it learned, up to
    the reported error), on the same device and dtype, and trains like any module.

    A layer registered under several names is one layer: replaced everywhere when any of its
    names matches. Left dense, with a warning naming them: ``nn.MultiheadAttention``'s
    ``out_proj`` and ``nn.TransformerEncoderLayer``'s ``linear1``/``linear2`` (those layers
    hand the weights to fused kernels themselves), and layers whose weight is tied to another
    module's (a language model's output layer and its token embedding).

    Returns one :class:`MonarchReplacement` per replaced layer, in module order.
    """
    if not isinstance(nblocks, int) or isinstance(nblocks, bool) or nblocks < 2:
        raise ValueError(f"monarchize: nblocks must be an int >= 2, got {nblocks!r}")
    if isinstance(targets, str):
        targets = [targets]
    if targets is not None and (not targets or not all(isinstance(pattern, str) for pattern in targets)):
        raise ValueError(
            f"monarchize: targets must be None (every layer) or a non-empty list of name patterns, got {targets!r}"
        )
    names: dict[int, list[str]] = {}  # a module registered in several places: all its names
    modules: dict[int, nn.Module] = {}
    holders: dict[int, list[tuple[str, nn.Module]]] = {}  # a parameter: the modules holding it
    for name, module in model.named_modules(remove_duplicate=False):
        for parameter in module.parameters(recurse=False):
            holders.setdefault(id(parameter), []).append((name, module))
        if _is_dense(module) and not isinstance(module, MonarchLinear):
            names.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    unsafe = _unsafe_to_replace(model)
    replaced: list[MonarchReplacement] = []
    left_dense: list[str] = []
    for key, module in modules.items():
        aliases = names[key]
        if targets is not None and not any(fnmatch.fnmatchcase(n, p) for n in aliases for p in targets):
            continue
        weight, _ = _dense_weight(module, None)
        out_features, in_features = weight.shape
        if min(in_features, out_features) < min_features:
            continue
        reason = next((unsafe[n] for n in aliases if n in unsafe), None) or _tied_elsewhere(model, module, holders)
        if reason:
            left_dense.append(f"{aliases[0]} ({reason})")
            continue
        layer = MonarchLinear.from_dense(module, nblocks)
        dense_params = weight.numel()
        monarch_params = layer.w1.numel() + layer.w2.numel()
        if monarch_params >= dense_params:
            continue  # too small for the structure to save anything
        layer.train(module.training)
        for name in aliases:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        replaced.append(
            MonarchReplacement(
                aliases[0], in_features, out_features, nblocks, layer.projection_error, dense_params, monarch_params,
                tuple(aliases[1:]),
            )
        )
    if left_dense:
        warnings.warn(f"monarchize left these layers dense: {'; '.join(left_dense)}", stacklevel=2)
    return replaced


def _unsafe_to_replace(model: nn.Module) -> dict[str, str]:
    """Dense layers whose owner reads their weight directly, by name, with why."""
    owners = {  # PyTorch layers that pass these children's weights to fused kernels
        nn.MultiheadAttention: ("out_proj",),
        nn.TransformerEncoderLayer: ("linear1", "linear2"),  # its fast path, in evaluation mode
    }
    unsafe = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for owner, children in owners.items():
            if isinstance(module, owner):
                for child in children:
                    unsafe[f"{name}.{child}" if name else child] = f"{owner.__name__} reads {child}.weight itself"
    return unsafe


def _tied_elsewhere(model: nn.Module, layer: nn.Module, holders: dict[int, list[tuple[str, nn.Module]]]) -> str | None:
    """Why ``layer``'s weight is not its own: a parameter another module holds too (a language
    model's output layer tied to its token embedding), which a replacement would untie.
    ``holders``: the modules holding each parameter, by the parameter's ``id``."""
    others = [name for name, holder in holders.get(id(getattr(layer, "weight", None)), []) if holder is not layer]
    if not others:
        return None
    return f"its weight is tied to {others[0] or type(model).__name__}'s; replacing it would untie them"


def _conv1d_type() -> type | None:
    # transformers' GPT-2 MLP uses Conv1D (y = x @ W + b, W stored (in, out)). Look it up only
    # when transformers is already imported: memopt never imports it itself.
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


def _is_dense(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _dense_weight(
    linear: nn.Module | torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (out, in), bias)`` of a dense layer or a bare weight."""
    if isinstance(linear, torch.Tensor):
        if linear.dim() != 2:
            raise ValueError(f"a dense weight must be 2-D (out, in), got {tuple(linear.shape)}")
        return linear.detach(), bias
    if isinstance(linear, nn.Linear):
        return linear.weight.detach(), linear.bias
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(linear, conv1d):
        return linear.weight.detach().t(), linear.bias
    raise TypeError(f"expected nn.Linear, transformers Conv1D or a weight tensor, got {type(linear).__name__}")
