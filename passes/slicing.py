"""Feature Slicer + Operator Grouping: run chains of ops slice by slice.

Video diffusion UNets hold every frame's activations at once, and their intermediates
(GroupNorm/SiLU copies, attention projections, 4x-8x wide feed-forward layers) are what
sets the peak. Most of their ops treat one dimension independently: convolutions and
GroupNorm act per sample (frames folded into the batch), linear layers per token,
attention per batch x head, a temporal attention over ``[B*H*W, F, C]`` per spatial
position. This pass finds maximal groups of consecutive ops that share such a dimension
and runs each group slice by slice (``torch.ops.memopt.slicing``), writing into
preallocated outputs, so the peak of a group is its inputs, its outputs and one slice's
intermediates.

1. **Dimension analysis** (``_RULES``): for each op, which dimension of its output a
   sliced input dimension becomes, or ``None`` when the op mixes along it (a reduction, a
   3x3 convolution along a spatial dimension, a reshape that does not keep the slices
   contiguous). Ops without a rule end a group: unknown means "not sliceable".
2. **Grouping**: from a *seed* value (a large activation), grow the set of ops that
   consume it or the group's values, in graph order, as long as each op has a rule; an op
   that fails taints everything downstream of it, so the group stays convex (no path
   leaves it and comes back). Views of the seed (``reshape``/``permute`` of a contiguous
   tensor) stay outside the group and are sliced like the seed, which lets a GroupNorm
   that reduces over the sliced dimension start a group exactly: its statistics are
   computed over the whole input first, then each slice is normalized with them.
3. **Slice count**: from the group's estimated intermediates (a liveness walk over its
   values' ``meta["val"]``): the smallest count whose per-slice intermediates fit
   ``max_slice_bytes``, at most ``max_slices``; groups saving less than
   ``min_group_bytes`` are left alone.
4. **Budget** (``_select_for_budget``): slicing costs time (on a GPU, each slice's ops are
   separate small launches: 35x Inductor's time on a small AnimateDiff step on an H100), so
   under ``max_peak_bytes`` (``"auto"``: half the memory free on the device) groups are
   sliced only until the estimated peak fits, the one saving most at the current peak
   first, and none when the graph already fits.
5. **Lowering**: the group becomes one call of the opaque custom op, so Inductor can
   neither fuse across slices nor rebuild full-size intermediates; the body runs op by op
   per slice. (A higher-order ``map`` would have to be unrolled or fall back; Inductor's
   peak-memory reordering cannot shrink intermediates that a fused kernel needs whole.)
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
import math
import operator
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from memopt._torch_compat import StorageWeakRef
from memopt.config import SlicingOptions
from memopt.estimate import TRANSIENT_BYTES, estimate, tensor_values
from memopt.ops import autocast_state
from memopt.ops.slicing import (
    NormStats,
    SlicedGroup,
    SliceSpec,
    TensorLayout,
    group_norm_with_stats,
    register_group,
)
from memopt.passes.base import (
    GraphPass, PassContext, Write, draws_random, first_write_to, in_place_writes, transformed_nodes,
)
from memopt.report import PassResult, format_bytes

Spec = SliceSpec

# ---------------------------------------------------------------------------------------
# Node helpers


def _value(node: Any) -> Any:
    if not isinstance(node, torch.fx.Node):
        return None
    return node.meta.get("val", node.meta.get("example_value"))


def _tensor(node: Any) -> torch.Tensor | None:
    value = _value(node)
    return value if isinstance(value, torch.Tensor) else None


def _shape(node: Any) -> tuple[int, ...] | None:
    tensor = _tensor(node)
    if tensor is None:
        return None
    if not all(isinstance(size, int) for size in tensor.shape):
        return None
    return tuple(tensor.shape)


def _arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


_NBYTES: weakref.WeakKeyDictionary[torch.fx.Node, int] = weakref.WeakKeyDictionary()


def _nbytes(node: torch.fx.Node) -> int:
    # Grouping asks for the same nodes' sizes millions of times on a UNet-sized graph
    # (_trim tries every tail of every group): memoized per node, forgotten with the graph.
    nbytes = _NBYTES.get(node)
    if nbytes is None:
        nbytes = _NBYTES[node] = sum(tensor.numel() * tensor.element_size() for tensor in tensor_values(node))
    return nbytes


def _dims(value: Any, ndim: int) -> list[int] | None:
    """Normalize a dim argument (int or sequence) to non-negative ints."""
    if isinstance(value, int):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
        return None
    return [v % ndim if ndim else v for v in value]


# ---------------------------------------------------------------------------------------
# Dimension analysis. A rule gets the node and a `_Slicing` view of the group being grown,
# and returns the output's SliceSpec plus how to feed each external tensor argument
# (sliced with a spec, or whole), or None when the node cannot be sliced.

RuleResult = tuple[Spec, dict[torch.fx.Node, Spec | None]]


@dataclasses.dataclass
class _Slicing:
    units: int
    specs: dict[torch.fx.Node, Spec]
    """Spec of every group value: the seed, its hoisted views and the members."""
    seed_views: set[torch.fx.Node]
    """The seed and the views of it computed outside the group (sliced like inputs)."""
    coarser: set[int] = dataclasses.field(default_factory=set)
    """Factors by which coarser slices of the seed would let a reshape that ended the group
    keep whole slices (positions ``H*W`` split back into rows ``[H, W]``: slices of whole
    rows, ``W`` positions each)."""

    def spec(self, node: Any) -> Spec | None:
        return self.specs.get(node) if isinstance(node, torch.fx.Node) else None


def _align_external(arg: torch.fx.Node, out_shape: tuple[int, ...], spec: Spec) -> tuple[bool, Spec | None]:
    """How a broadcast operand that is not a group value meets an output sliced by ``spec``:
    whole when it broadcasts along the sliced dimension, sliced when it spans it."""
    shape = _shape(arg)
    if shape is None:
        return (_tensor(arg) is None and not isinstance(_value(arg), (list, tuple))), None
    dim = spec.dim - (len(out_shape) - len(shape))
    if dim < 0 or shape[dim] == 1:
        return True, None
    if shape[dim] == out_shape[spec.dim]:
        return True, Spec(dim, spec.unit)
    return False, None


def _pointwise(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    """Elementwise ops with broadcasting (add, mul, where, activations, dtype casts)."""
    out_shape = _shape(node)
    if out_shape is None:
        return None
    out_spec = None
    tensor_args = [a for a in node.all_input_nodes]
    for arg in tensor_args:
        spec = s.spec(arg)
        if spec is None:
            continue
        shape = _shape(arg)
        dim = spec.dim + len(out_shape) - len(shape)
        if out_shape[dim] != shape[spec.dim]:
            return None
        candidate = Spec(dim, spec.unit)
        if out_spec is not None and candidate != out_spec:
            return None
        out_spec = candidate
    if out_spec is None:
        return None
    feeds: dict[torch.fx.Node, Spec | None] = {}
    for arg in tensor_args:
        if s.spec(arg) is not None:
            continue
        ok, feed = _align_external(arg, out_shape, out_spec)
        if not ok:
            return None
        feeds[arg] = feed
    return out_spec, feeds


def _unary(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    """Ops that keep the layout of their first argument (other tensor args used whole)."""
    spec = s.spec(node.args[0]) if node.args else None
    if spec is None or _shape(node) != _shape(node.args[0]):
        return None
    if any(s.spec(a) is not None for a in node.all_input_nodes if a is not node.args[0]):
        return None
    return spec, {a: None for a in node.all_input_nodes if a is not node.args[0]}


def _dropout(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    training = _arg(node, 2, "training", True)
    p = _arg(node, 1, "p", 0.5)
    if training and p != 0:
        return None  # random masks per slice would differ from one full mask
    return _unary(node, s)


def _whole_others(node: torch.fx.Node, s: _Slicing, sliced: torch.fx.Node) -> dict | None:
    """Every tensor argument but ``sliced`` must be external, and is read whole."""
    others = [a for a in node.all_input_nodes if a is not sliced]
    if any(s.spec(a) is not None for a in others):
        return None
    return {a: None for a in others}


def _conv(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    x = node.args[0]
    spec = s.spec(x)
    weight = _shape(_arg(node, 1, "weight"))
    shape = _shape(x)
    if spec is None or weight is None or shape is None:
        return None
    # Batched input [N, C, *spatial], or unbatched [C, *spatial] (no batch dim to slice).
    channels = 1 if len(shape) == len(weight) else 0
    if spec.dim == channels:
        return None  # channels are summed over
    if spec.dim > channels:
        # Only a pointwise (size-1, stride-1, unpadded) kernel along the sliced spatial dim:
        # e.g. a (3, 1, 1) temporal conv3d sliced along height.
        spatial = spec.dim - channels - 1
        stride = _arg(node, 3, "stride", 1)
        padding = _arg(node, 4, "padding", 0)
        stride = stride[spatial] if isinstance(stride, (list, tuple)) else stride
        if isinstance(padding, (list, tuple)):
            padding = padding[spatial]
        elif isinstance(padding, str):
            padding = 0
        if weight[2 + spatial] != 1 or stride != 1 or padding != 0:
            return None
    feeds = _whole_others(node, s, x)
    return None if feeds is None else (spec, feeds)


def _group_norm(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    x = node.args[0]
    spec = s.spec(x)
    if spec is None or spec.dim == 1:
        return None
    if spec.dim >= 2 and x not in s.seed_views:
        # The statistics reduce over the sliced dim: they need the whole input, which only
        # exists before the group runs (the seed or a view of it).
        return None
    feeds = _whole_others(node, s, x)
    return None if feeds is None else (spec, feeds)


def _layer_norm(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    x = node.args[0]
    spec = s.spec(x)
    normalized = _arg(node, 1, "normalized_shape")
    shape = _shape(x)
    if spec is None or shape is None or not isinstance(normalized, (list, tuple)):
        return None
    if spec.dim >= len(shape) - len(normalized):
        return None
    feeds = _whole_others(node, s, x)
    return None if feeds is None else (spec, feeds)


def _linear(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    x = node.args[0]
    spec = s.spec(x)
    shape = _shape(x)
    if spec is None or shape is None or spec.dim == len(shape) - 1:
        return None
    feeds = _whole_others(node, s, x)
    return None if feeds is None else (spec, feeds)


def _softmax(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    x = node.args[0]
    spec = s.spec(x)
    shape = _shape(x)
    dim = _arg(node, 1, "dim")
    if spec is None or shape is None or not isinstance(dim, int) or dim % len(shape) == spec.dim:
        return None
    feeds = _whole_others(node, s, x)
    return None if feeds is None else (spec, feeds)


def _batched(node: torch.fx.Node, s: _Slicing, operands: list[torch.fx.Node], row_operand: int | None) -> RuleResult | None:
    """Shared rule of bmm/baddbmm/matmul/attention: leading (batch) dims pair up across
    operands; the rows of ``operands[row_operand]`` (dim -2) are independent when the other
    operands are read whole."""
    out_shape = _shape(node)
    if out_shape is None or any(_shape(o) is None for o in operands):
        return None
    ndim = len(out_shape)
    batch_dims = ndim - 2
    out_spec = None
    for index, operand in enumerate(operands):
        spec = s.spec(operand)
        if spec is None:
            continue
        if len(_shape(operand)) != ndim:
            return None
        if spec.dim < batch_dims:
            candidate = spec
        elif index == row_operand and spec.dim == ndim - 2:
            candidate = spec
        else:
            return None
        if out_spec is not None and candidate != out_spec:
            return None
        out_spec = candidate
    if out_spec is None:
        return None
    feeds: dict[torch.fx.Node, Spec | None] = {}
    for operand in operands:
        if s.spec(operand) is not None:
            continue
        if out_spec.dim >= batch_dims:
            feeds[operand] = None
            continue
        ok, feed = _align_external(operand, out_shape, out_spec)
        if not ok:
            return None
        feeds[operand] = feed
    if out_spec.dim >= batch_dims and any(s.spec(o) is not None for o in operands if o is not operands[row_operand]):
        return None
    return out_spec, feeds


def _bmm(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    operands = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
    if len(operands) != 2 or _shape(operands[0]) is None or _shape(operands[1]) is None:
        return None
    if len(_shape(operands[0])) != len(_shape(operands[1])) or len(_shape(operands[0])) < 3:
        return None
    return _batched(node, s, operands, row_operand=0)


def _baddbmm(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    bias, batch1, batch2 = (node.args + (None, None, None))[:3]
    if not all(isinstance(a, torch.fx.Node) for a in (bias, batch1, batch2)):
        return None
    result = _batched(node, s, [batch1, batch2], row_operand=0)
    if result is None:
        return None
    out_spec, feeds = result
    if s.spec(bias) is not None:
        if _shape(bias) != _shape(node) or s.spec(bias) != out_spec:
            return None
    else:
        ok, feed = _align_external(bias, _shape(node), out_spec)
        if not ok:
            return None
        feeds[bias] = feed
    return out_spec, feeds


def _attention(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    query, key, value = (list(node.args) + [None, None, None])[:3]
    query = query if query is not None else node.kwargs.get("query")
    key = key if key is not None else node.kwargs.get("key")
    value = value if value is not None else node.kwargs.get("value")
    if not all(isinstance(a, torch.fx.Node) for a in (query, key, value)):
        return None
    if _arg(node, 4, "dropout_p", 0.0) not in (0, 0.0) or _arg(node, 5, "is_causal", False):
        return None
    if _arg(node, 7, "enable_gqa", False):
        return None
    result = _batched(node, s, [query, key, value], row_operand=0)
    if result is None:
        return None
    out_spec, feeds = result
    mask = _arg(node, 3, "attn_mask")
    if isinstance(mask, torch.fx.Node):
        scores = (*_shape(node)[:-1], _shape(key)[-2])
        if s.spec(mask) is not None:
            return None
        ok, feed = _align_external(mask, scores, out_spec)
        if not ok:
            return None
        feeds[mask] = feed
    return out_spec, feeds


def _interpolate(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    x = node.args[0]
    spec = s.spec(x)
    if spec is None or spec.dim > 1:
        return None
    feeds = _whole_others(node, s, x)
    return None if feeds is None else (spec, feeds)


def _cat(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    tensors = _arg(node, 0, "tensors")
    out_shape = _shape(node)
    if not isinstance(tensors, (list, tuple)) or out_shape is None:
        return None
    dim = _arg(node, 1, "dim", 0)
    if not isinstance(dim, int):
        return None
    dim %= len(out_shape)
    specs = {s.spec(t) for t in tensors if s.spec(t) is not None}
    if len(specs) != 1:
        return None
    (spec,) = specs
    if spec.dim == dim:
        return None
    feeds: dict[torch.fx.Node, Spec | None] = {}
    for tensor in tensors:
        if not isinstance(tensor, torch.fx.Node):
            return None
        if s.spec(tensor) is None:
            shape = _shape(tensor)
            if shape is None or len(shape) != len(out_shape) or shape[spec.dim] != out_shape[spec.dim]:
                return None
            feeds[tensor] = spec
    return spec, feeds


def _split(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    """chunk/split along another dim: a tuple whose items are sliced like the input."""
    x = node.args[0]
    spec = s.spec(x)
    shape = _shape(x)
    dim = _arg(node, 2, "dim", 0)
    if spec is None or shape is None or not isinstance(dim, int) or dim % len(shape) == spec.dim:
        return None
    feeds = _whole_others(node, s, x)
    return None if feeds is None else (spec, feeds)


def _getitem(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    source, index = node.args
    spec = s.spec(source)
    if spec is None:
        return None
    if isinstance(_value(source), (list, tuple)):
        return (spec, {}) if isinstance(index, int) else None
    shape = _shape(source)
    if shape is None:
        return None
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(item, torch.fx.Node) or not isinstance(item, (int, slice, type(None), type(Ellipsis))) for item in items):
        return None
    if sum(item is Ellipsis for item in items) > 1:
        return None
    consumed = sum(isinstance(item, (int, slice)) for item in items)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at : at + 1] = [slice(None)] * (len(shape) - consumed)
    items += [slice(None)] * (len(shape) - sum(isinstance(item, (int, slice)) for item in items))
    in_dim = out_dim = 0
    for item in items:
        if item is None:
            out_dim += 1
            continue
        if in_dim == spec.dim:
            if not isinstance(item, slice) or item != slice(None):
                return None
            return Spec(out_dim, spec.unit), {}
        out_dim += isinstance(item, slice)
        in_dim += 1
    return None


def _reshape_spec(in_shape: tuple[int, ...], out_shape: tuple[int, ...], spec: Spec) -> Spec | None:
    """Where a slice of ``in_shape`` along ``spec.dim`` lands after a row-major reshape, if
    it stays a contiguous range of one output dimension."""
    before = math.prod(in_shape[: spec.dim])
    size = in_shape[spec.dim]
    candidates = []
    for out_dim in range(len(out_shape)):
        if math.prod(out_shape[:out_dim]) != before:
            continue
        out_size = out_shape[out_dim]
        if out_size == size:
            candidates.append(Spec(out_dim, spec.unit))
        elif out_size > size:
            # Merge: the sliced dim leads a run of input dims folded into this one.
            inner = out_size // size
            for stop in range(spec.dim + 1, len(in_shape) + 1):
                if math.prod(in_shape[spec.dim + 1 : stop]) == inner and out_size == size * inner:
                    candidates.append(Spec(out_dim, spec.unit * inner))
                    break
        else:
            # Split: the sliced dim unfolds into this and later dims; slices must be whole
            # multiples of the later dims' product.
            for stop in range(out_dim + 1, len(out_shape) + 1):
                if math.prod(out_shape[out_dim:stop]) == size:
                    inner = math.prod(out_shape[out_dim + 1 : stop])
                    if spec.unit % inner == 0:
                        candidates.append(Spec(out_dim, spec.unit // inner))
                    break
    candidates.sort(key=lambda c: out_shape[c.dim] == 1)
    return candidates[0] if candidates else None


def _reshape(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    x = node.args[0]
    spec = s.spec(x)
    in_shape, out_shape = _shape(x), _shape(node)
    if spec is None or in_shape is None or out_shape is None:
        return None
    if _tensor(node).dtype != _tensor(x).dtype:
        return None  # view(dtype): a reinterpretation of the bits, not a reshape
    if any(isinstance(a, torch.fx.Node) for a in node.args[1:]):
        return None  # symbolic sizes
    out_spec = _reshape_spec(in_shape, out_shape, spec)
    if out_spec is None:
        inner = _split_inner(in_shape, out_shape, spec)
        if inner is not None:
            s.coarser.add(inner // math.gcd(spec.unit, inner))
    return None if out_spec is None else (out_spec, {})


def _split_inner(in_shape: tuple[int, ...], out_shape: tuple[int, ...], spec: Spec) -> int | None:
    """The product of the later dims a split reshape unfolds the sliced dim into (``W`` for
    ``[.., H*W, ..] -> [.., H, W, ..]``), or ``None`` when the reshape is no such split."""
    before = math.prod(in_shape[: spec.dim])
    size = in_shape[spec.dim]
    for out_dim in range(len(out_shape)):
        if math.prod(out_shape[:out_dim]) != before or out_shape[out_dim] >= size:
            continue
        for stop in range(out_dim + 1, len(out_shape) + 1):
            if math.prod(out_shape[out_dim:stop]) == size:
                return math.prod(out_shape[out_dim + 1 : stop])
    return None


def _permute(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    x = node.args[0]
    spec = s.spec(x)
    shape = _shape(x)
    if spec is None or shape is None:
        return None
    order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    order = node.kwargs.get("dims", order)
    order = _dims(list(order), len(shape))
    if order is None:
        return None
    return Spec(order.index(spec.dim), spec.unit), {}


def _transpose(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    x = node.args[0]
    spec = s.spec(x)
    shape = _shape(x)
    if spec is None or shape is None:
        return None
    if node.target == "t":
        a, b = 0, 1
    else:
        dims = _dims([_arg(node, 1, "dim0"), _arg(node, 2, "dim1")], len(shape))
        if dims is None:
            return None
        a, b = dims
    dim = {a: b, b: a}.get(spec.dim, spec.dim)
    return Spec(dim, spec.unit), {}


def _unsqueeze(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    x = node.args[0]
    spec = s.spec(x)
    shape = _shape(x)
    dim = _arg(node, 1, "dim")
    if spec is None or shape is None or not isinstance(dim, int):
        return None
    dim %= len(shape) + 1
    return Spec(spec.dim + (dim <= spec.dim), spec.unit), {}


def _flatten(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    return _reshape(node, s) if all(not isinstance(a, torch.fx.Node) for a in node.args[1:]) else None


def _expand(node: torch.fx.Node, s: _Slicing) -> RuleResult | None:
    x = node.args[0]
    spec = s.spec(x)
    in_shape, out_shape = _shape(x), _shape(node)
    if spec is None or in_shape is None or out_shape is None:
        return None
    dim = spec.dim + len(out_shape) - len(in_shape)
    if out_shape[dim] != in_shape[spec.dim]:
        return None
    return Spec(dim, spec.unit), {}


_METHOD_RULES: dict[str, Callable[[torch.fx.Node, _Slicing], RuleResult | None]] = {
    "view": _reshape,
    "reshape": _reshape,
    "flatten": _flatten,
    "permute": _permute,
    "transpose": _transpose,
    "t": _transpose,
    "unsqueeze": _unsqueeze,
    "expand": _expand,
    "broadcast_to": _expand,
    "chunk": _split,
    "split": _split,
    "softmax": _softmax,
    **{name: _unary for name in (
        "contiguous", "clone", "to", "float", "half", "bfloat16", "type_as", "sigmoid", "tanh",
        "relu", "exp", "sqrt", "rsqrt", "neg", "abs", "bool",
    )},
    **{name: _pointwise for name in ("add", "sub", "mul", "div", "pow", "__add__", "__mul__")},
}

_FUNCTION_RULES: dict[Any, Callable[[torch.fx.Node, _Slicing], RuleResult | None]] = {
    torch.conv1d: _conv,
    torch.conv2d: _conv,
    torch.conv3d: _conv,
    F.conv1d: _conv,
    F.conv2d: _conv,
    F.conv3d: _conv,
    # memopt's im2win convolution (the im2win pass runs first): the same arguments as conv2d.
    torch.ops.memopt.im2win_conv2d.default: _conv,
    F.group_norm: _group_norm,
    torch.group_norm: _group_norm,
    F.layer_norm: _layer_norm,
    torch.layer_norm: _layer_norm,
    F.linear: _linear,
    F.softmax: _softmax,
    torch.softmax: _softmax,
    F.scaled_dot_product_attention: _attention,
    torch.bmm: _bmm,
    torch.matmul: _bmm,
    operator.matmul: _bmm,
    torch.baddbmm: _baddbmm,
    F.interpolate: _interpolate,
    torch.cat: _cat,
    torch.concat: _cat,
    torch.chunk: _split,
    torch.split: _split,
    operator.getitem: _getitem,
    torch.reshape: _reshape,
    torch.flatten: _flatten,
    torch.permute: _permute,
    torch.transpose: _transpose,
    torch.unsqueeze: _unsqueeze,
    F.dropout: _dropout,
    **{fn: _pointwise for fn in (
        operator.add, operator.sub, operator.mul, operator.truediv, operator.pow,
        torch.add, torch.sub, torch.mul, torch.div, torch.where, torch.pow,
    )},
    **{fn: _unary for fn in (
        operator.neg, F.silu, F.gelu, F.relu, F.mish, torch.relu, torch.sigmoid, torch.tanh,
        torch.exp, torch.sqrt, torch.rsqrt, torch.neg, torch.abs, F.sigmoid, F.tanh,
    )},
}

# Ops whose output is a view of their input: applied to the seed they stay outside the
# group (free when the input's layout allows a view; checked on the fake tensors).
_VIEW_METHODS = {"view", "reshape", "permute", "transpose", "t", "unsqueeze", "flatten", "expand", "contiguous"}
_VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.permute, torch.transpose, torch.unsqueeze, torch.flatten}
# Ops whose size arguments name the full extent: rebuilt per slice with -1 at the sliced dim.
_SIZED_METHODS = {"view", "reshape", "expand", "broadcast_to"}


# Functions that take ``inplace``, at this position. In place, the op writes its input: a
# value the group may also hand out whole, or that ops outside it read before the write.
# That is safe only where the op is the value's one reader (``nn.ReLU(inplace=True)`` right
# after a convolution): nothing else sees the value, before or after.
_INPLACE_POSITION = {F.relu: 1, F.silu: 1, F.mish: 1, F.dropout: 3}


def _rule(node: torch.fx.Node) -> Callable[[torch.fx.Node, _Slicing], RuleResult | None] | None:
    if node.op == "call_method":
        return _METHOD_RULES.get(node.target)  # in-place methods (relu_, add_) have no rule
    if node.op == "call_function":
        try:
            rule = _FUNCTION_RULES.get(node.target)
            position = _INPLACE_POSITION.get(node.target)
        except TypeError:  # unhashable target
            return None
        in_place = _arg(node, position, "inplace", False) if position is not None else node.kwargs.get("inplace")
        if node.kwargs.get("out") is not None or (in_place and not _sole_reader(node)):
            return None
        return rule
    return None


def _sole_reader(node: torch.fx.Node) -> bool:
    """Whether ``node`` is the only reader of its first argument, an intermediate value that
    is not a view (writing a view writes its base, which others may read)."""
    written = node.args[0] if node.args else node.kwargs.get("input")
    if not (
        isinstance(written, torch.fx.Node)
        and written.op in ("call_function", "call_method", "call_module")
        and list(written.users) == [node]
    ):
        return False
    value = _tensor(written)
    if value is None:
        return False
    try:
        storage = StorageWeakRef(value.untyped_storage())
        sources = [_tensor(source) for source in written.all_input_nodes]
        return not any(
            source is not None and StorageWeakRef(source.untyped_storage()) == storage for source in sources
        )
    except (NotImplementedError, RuntimeError):
        return False


def _op_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def _is_view_of(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    is_view_op = (node.op == "call_method" and node.target in _VIEW_METHODS) or (
        node.op == "call_function" and node.target in _VIEW_FUNCTIONS
    )
    out, inp = _tensor(node), _tensor(source)
    if not is_view_op or out is None or inp is None:
        return False
    try:
        return StorageWeakRef(out.untyped_storage()) == StorageWeakRef(inp.untyped_storage())
    except (NotImplementedError, RuntimeError):
        return False


# ---------------------------------------------------------------------------------------
# Grouping


# A group only grows to ops within this many nodes of its latest op. A value read at many
# distant places (the text context feeding every cross-attention, the time embedding)
# would otherwise pull far-apart ops into one group whose outputs all exist from its start,
# raising the peak instead of lowering it. Ops of one block sit within a few dozen nodes of
# each other in Dynamo's graphs.
_MAX_GAP = 48


@dataclasses.dataclass
class _Group:
    seed: torch.fx.Node
    slicing: _Slicing
    members: list[torch.fx.Node]
    feeds: dict[tuple[torch.fx.Node, Spec | None], None]
    """External tensors the members read, with how they are sliced (ordered set)."""
    outputs: list[torch.fx.Node]
    member_feeds: dict[torch.fx.Node, dict[torch.fx.Node, Spec | None]]
    unknown_stops: list[torch.fx.Node] = dataclasses.field(default_factory=list)
    """Ops without a slicing rule that read a group value (they ended the group)."""
    intermediate_bytes: int = 0
    output_bytes: int = 0
    input_bytes: int = 0
    slices: int = 1
    saving: int = 0
    member_saving: dict[torch.fx.Node, int] = dataclasses.field(default_factory=dict)
    """Bytes slicing saves while each member runs (its transient intermediates, less one slice's)."""

    @property
    def dim(self) -> int:
        return self.slicing.specs[self.seed].dim


def _grow(
    seed: torch.fx.Node,
    dim: int,
    position: dict[torch.fx.Node, int],
    claimed: set[torch.fx.Node],
    unit: int = 1,
    coarser: set[int] | None = None,
) -> _Group | None:
    """The group grown from ``seed`` sliced along ``dim`` in slices of whole ``unit``s;
    ``coarser`` collects the units that would let it grow past a reshape it stopped at."""
    shape = _shape(seed)
    slicing = _Slicing(units=shape[dim] // unit, specs={seed: Spec(dim, unit)}, seed_views={seed})
    if coarser is not None:
        slicing.coarser = coarser
    members: list[torch.fx.Node] = []
    member_feeds: dict[torch.fx.Node, dict[torch.fx.Node, Spec | None]] = {}
    feeds: dict[tuple[torch.fx.Node, Spec | None], None] = {}
    tainted: set[torch.fx.Node] = set()
    unknown_stops: list[torch.fx.Node] = []
    heap: list[tuple[int, torch.fx.Node]] = []
    queued: set[torch.fx.Node] = set()
    pending = 0  # queued nodes that read a group value (the rest only carry taint)

    def push_users(node: torch.fx.Node) -> None:
        nonlocal pending
        for user in node.users:
            if user not in queued:
                queued.add(user)
                heapq.heappush(heap, (position[user], user))
                pending += 1

    last_position = position[seed]
    push_users(seed)
    while heap and pending:
        if heap[0][0] - last_position > _MAX_GAP:
            # Nodes are taken in graph order and only a node within _MAX_GAP of the latest
            # member can join, so nothing from here on can: stop (this keeps the pass linear
            # in the graph rather than walking everything downstream of every seed).
            break
        _, node = heapq.heappop(heap)
        pending -= 1
        reads_group = any(a in slicing.specs for a in node.all_input_nodes)
        if not reads_group:
            # Only reached through a tainted node: stays outside, taints its users.
            tainted.add(node)
            for user in node.users:
                if user not in queued:
                    queued.add(user)
                    heapq.heappush(heap, (position[user], user))
                    pending += 1
            continue
        rule = _rule(node)
        result = None
        near = position[node] - last_position <= _MAX_GAP
        if near and node not in claimed and not any(a in tainted for a in node.all_input_nodes) and rule is not None:
            result = rule(node, slicing)
        if result is None:
            if rule is None and node not in claimed and node.op != "output":
                unknown_stops.append(node)
            tainted.add(node)
            for user in node.users:
                if user not in queued:
                    queued.add(user)
                    heapq.heappush(heap, (position[user], user))
                    pending += 1
            continue
        out_spec, node_feeds = result
        covered = set(node_feeds) | set(slicing.specs)
        if any(a not in covered for a in node.all_input_nodes) or any(_tensor(a) is None for a in node_feeds):
            # Every operand must be a group value or a tensor the op hands in (the op's
            # inputs are a list of tensors): anything else ends the group.
            tainted.add(node)
            for user in node.users:
                if user not in queued:
                    queued.add(user)
                    heapq.heappush(heap, (position[user], user))
                    pending += 1
            continue
        last_position = position[node]
        slicing.specs[node] = out_spec
        sources = [a for a in node.all_input_nodes if a in slicing.specs]
        if len(sources) == 1 and sources[0] in slicing.seed_views and not node_feeds and _is_view_of(node, sources[0]):
            slicing.seed_views.add(node)  # a free view of the seed: slice it like the seed
        else:
            members.append(node)
            member_feeds[node] = node_feeds
            for arg, feed in node_feeds.items():
                feeds[(arg, feed)] = None
            for arg in node.all_input_nodes:
                if arg in slicing.seed_views:
                    feeds[(arg, slicing.specs[arg])] = None
        push_users(node)
    if not members:
        return None
    members = _absorb_producers(members, member_feeds, slicing, position, claimed)
    # Views sunk first too: a value read through two views leaves as one output, so _trim
    # weighs the bytes the group will really write (SVD's resnet output, permuted for the
    # temporal resnet and for the AlphaBlender, looked like three outputs, and the whole
    # tail from `/ output_scale_factor` on was cut off).
    members = _sink_views(_trim(_sink_views(members)))
    if not members:
        return None
    outputs = _outputs(members)
    if not outputs:
        return None  # nothing outside reads the group: dead code (Swin's unused reshaped states)
    if any(_tensor(node) is None for node in outputs):
        return None  # a tuple leaving the group whole
    feeds = {}
    for node in members:
        for arg, feed in member_feeds[node].items():
            feeds[(arg, feed)] = None
        for arg in node.all_input_nodes:
            if arg in slicing.seed_views:
                feeds[(arg, slicing.specs[arg])] = None
    member_feeds = {node: member_feeds[node] for node in members}
    return _Group(seed, slicing, members, feeds, outputs, member_feeds, unknown_stops)


def _absorb_producers(
    members: list[torch.fx.Node],
    member_feeds: dict[torch.fx.Node, dict[torch.fx.Node, Spec | None]],
    slicing: _Slicing,
    position: dict[torch.fx.Node, int],
    claimed: set[torch.fx.Node],
) -> list[torch.fx.Node]:
    """Take into the group the elementwise ops that only compute a sliced input of it.

    Growing follows the seed's users, so an operand computed beside the group from other
    tensors stays outside, written whole: SVD's AlphaBlender computes ``alpha * x_spatial``
    apart from the temporal branch that adds ``(1 - alpha) * x_temporal`` to it, a full-size
    tensor live through the whole group. Such an op (pointwise, read only by members, none
    of its inputs computed from the group) runs per slice instead, its inputs sliced the way
    broadcasting lines them up with the slice."""
    while True:
        member_set = set(members)
        candidates = {
            arg: spec
            for node in members
            for arg, spec in member_feeds[node].items()
            if spec is not None and arg not in member_set and arg not in claimed and arg not in slicing.specs
            and _rule(arg) in (_pointwise, _unary) and all(user in member_set for user in arg.users)
        }
        if not candidates:
            return members
        # Nothing a member feeds may flow into an absorbed op (the group would stop being convex).
        horizon = max(position[arg] for arg in candidates)
        downstream = set(member_set)
        stack = list(members)
        while stack:
            for user in stack.pop().users:
                if user not in downstream and position[user] <= horizon:
                    downstream.add(user)
                    stack.append(user)
        absorbed = []
        for arg, spec in candidates.items():
            out_shape = _shape(arg)
            inputs = arg.all_input_nodes
            if out_shape is None or any(a in downstream or a in slicing.specs or _tensor(a) is None for a in inputs):
                continue
            feeds = {}
            for a in inputs:
                ok, feed = _align_external(a, out_shape, spec)
                if not ok:
                    break
                feeds[a] = feed
            else:
                if any(feed is not None for feed in feeds.values()):
                    slicing.specs[arg] = spec
                    member_feeds[arg] = feeds
                    absorbed.append(arg)
        if not absorbed:
            return members
        for node in members:
            for arg in absorbed:
                member_feeds[node].pop(arg, None)
        members = sorted([*members, *absorbed], key=position.__getitem__)


def _outputs(members: list[torch.fx.Node]) -> list[torch.fx.Node]:
    member_set = set(members)
    return [node for node in members if any(user not in member_set for user in node.users)]


def _tail_from(start: torch.fx.Node, members: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """``start`` and every member that depends on it: what a cut before ``start`` moves out."""
    tail = {start}
    stack = [start]
    while stack:
        for user in stack.pop().users:
            if user in members and user not in tail:
                tail.add(user)
                stack.append(user)
    return tail


def _trim(members: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """Cut tails off a group where that shrinks what the group writes whole.

    A group often ends with ops whose results all leave it (the q, k and v projections
    before an attention that mixes the sliced dim): each is a full-size output, together
    more than the one value they were computed from. Dropping the tail that starts at a
    member makes that member (or its inputs) the output instead. A cut is taken when it
    saves at least as many output bytes as the largest op it moves out of the group, so a
    wide intermediate (a feed-forward's 4x hidden layer) stays sliced."""
    while True:
        outputs = set(_outputs(members))
        base = sum(_nbytes(node) for node in outputs)
        member_set = set(members)
        best = None
        for start in members[1:]:
            tail = _tail_from(start, member_set)
            new_outputs = (outputs - tail) | {
                node for node in member_set - tail if any(user in tail for user in node.users)
            }
            new_bytes = sum(_nbytes(node) for node in new_outputs)
            largest = max(_nbytes(node) for node in tail)
            # Among cuts writing equally few bytes, the shortest tail: the ops a longer one
            # would also drop (SVD's resnet `/ output_scale_factor`, read through views by
            # two groups) run whole outside, and Inductor computes such a cheap op into one
            # fresh copy per custom-op input that reads it, 2 MiB each in SVD.
            if base - new_bytes >= max(largest, 1) and (
                best is None or (new_bytes, len(tail)) < (best[0], len(best[1]))
            ):
                best = (new_bytes, tail)
        if best is None:
            return members
        members = [node for node in members if node not in best[1]]


_CONVOLUTIONS = {torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d}


def _workspace_bytes(node: torch.fx.Node) -> int:
    """Bytes an op allocates and frees while it runs, beyond its output (CPU convolutions).

    Measured on torch 2.13's CPU kernels (fp32, 1 thread): a conv3d unfolds its input
    (vol2col: input x kernel volume, 6 MiB for a (3, 1, 1) kernel on a 2 MiB input, plus a
    contiguous copy of a strided input, 8 MiB in all); a conv2d/conv1d reorders its input
    for oneDNN (its size, 2 MiB on 2 MiB; nothing for channels-last). Without this a group
    of a temporal resnet's conv3d looked 1 MiB a slice and measured 6 MiB more."""
    if node.op == "call_function" and node.target is torch.ops.memopt.im2win_conv2d.default:
        return node.meta.get(TRANSIENT_BYTES, 0)  # its window tensor or input copy, set by the im2win pass
    if node.op != "call_function" or node.target not in _CONVOLUTIONS:
        return 0
    x, weight, out = _tensor(node.args[0]), _tensor(_arg(node, 1, "weight")), _tensor(node)
    if x is None or weight is None or out is None or x.device.type != "cpu":
        return 0
    in_bytes = x.numel() * x.element_size()
    if x.dim() == 5:
        kernel = math.prod(weight.shape[2:])
        unfolded = kernel * weight.shape[1] * out.shape[0] * math.prod(out.shape[2:]) * x.element_size() if kernel > 1 else 0
        return unfolded + (0 if x.is_contiguous() else in_bytes)
    return 0 if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4 else in_bytes


def _sink_views(members: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """Move free views at the group's end out of it, so the group writes their base once.

    A value read through two views (SVD's resnet output, permuted once for the temporal
    resnet and once for its AlphaBlender) would otherwise leave the group as two outputs,
    each a full-size copy, where the graph held one tensor. Outside the group the views
    are free again: the op's output keeps the base's traced strides (dense bases only)."""
    while True:
        member_set = set(members)
        outputs = set(_outputs(members))
        sunk = set()
        for node in members:
            sources = node.all_input_nodes
            if len(sources) != 1 or sources[0] not in member_set or any(user in member_set for user in node.users):
                continue
            base = sources[0]
            if not _is_view_of(node, base) or not _dense(_tensor(base)):
                continue
            if base in outputs or _nbytes(node) >= _nbytes(base):
                sunk.add(node)
        if not sunk:
            return members
        members = [node for node in members if node not in sunk]


def _best_group(
    seed: torch.fx.Node,
    position: dict[torch.fx.Node, int],
    claimed: set[torch.fx.Node],
    options: SlicingOptions,
    min_units: int = 1,
) -> _Group | None:
    """The group grown from ``seed`` along the dimension that saves most (ties: the larger
    group, so fewer values are materialized between groups), measured; ``None`` for a seed
    that is no tensor (a ``split``'s tuple)."""
    best = None
    for dim, size in enumerate(_shape(seed) or ()):
        if size < 2:
            continue
        coarser: set[int] = set()
        candidates = [_grow(seed, dim, position, claimed, coarser=coarser)]
        # Slices of whole rows where positions are split back into rows later (SVD's temporal
        # transformer, sliced by position, can then take its proj_out, the reshape to
        # [F, H, W, C] and the residual add instead of writing its output for them).
        candidates += [
            _grow(seed, dim, position, claimed, unit=unit)
            for unit in sorted(coarser) if unit > 1 and size % unit == 0 and size // unit >= 2
        ]
        for group in candidates:
            if group is None or group.slicing.units < min_units:
                continue
            _measure_group(group, options)
            if best is None or _ranks_above(group, best):
                best = group
    return best


# Savings within this fraction of each other count as equal when choosing a seed's group:
# the estimate of one slice's intermediates is no finer than that, and the larger group
# writes fewer values whole between groups (which the saving does not count).
_SAVING_TIE = 1 / 16


def _ranks_above(group: _Group, other: _Group) -> bool:
    """Whether ``group`` saves more than ``other`` or, within ``_SAVING_TIE``, is larger."""
    if abs(group.saving - other.saving) <= _SAVING_TIE * max(group.saving, other.saving):
        return (len(group.members), group.saving) > (len(other.members), other.saving)
    return group.saving > other.saving


def _hand_over_tail(
    group: _Group, position: dict[torch.fx.Node, int], claimed: set[torch.fx.Node], options: SlicingOptions
) -> tuple[_Group, _Group] | None:
    """``group`` without a tail, and the group that takes the tail whole (grown from a value
    at the cut), when that lowers the bytes ``group`` writes; ``None`` when no such tail
    exists.

    ``_trim`` keeps a tail whose ops are wider than the bytes a cut saves, since they would
    run whole outside. But per-token ops at the end of a frame-sliced group are often just as
    sliceable along the dimension the next group uses: SVD's spatial transformer group ends
    with the temporal block's ``norm_in``, ``ff_in`` and residual add, whose result it wrote
    whole for the position-sliced temporal group, beside the spatial branch that group
    reads anyway. Cut there, the temporal group, seeded from the spatial branch, computes
    them per slice of positions, and 2 MiB fewer are live across both groups. A tail is
    handed over only when the group grown from a value at the cut (along its best
    dimension, as the seed loop grows groups) covers every op of the tail; that group is
    taken next."""
    members = group.members
    member_set = set(members)
    outputs = set(group.outputs)
    base = sum(_nbytes(node) for node in outputs)
    # Cuts writing within 1/64 of each other count as equal (a time embedding of a few KiB
    # crossing the cut too must not decide), and then the shortest tail wins.
    quantum = max(base // 64, 1)
    best = None
    for start in members[1:]:
        tail = _tail_from(start, member_set)
        kept = [node for node in members if node not in tail]
        boundary = {node for node in kept if any(user in tail for user in node.users)}
        new_bytes = sum(_nbytes(node) for node in (outputs - tail) | boundary)
        key = (new_bytes // quantum, len(tail))
        if base - new_bytes < quantum or (best is not None and key >= best[0]):
            continue
        for seed in sorted(boundary, key=_nbytes, reverse=True):
            follower = _best_group(seed, position, claimed | set(kept), options)
            if follower is None or not tail <= set(follower.slicing.specs):
                continue
            if follower.saving >= options.min_group_bytes and follower.slices >= 2:
                best = (key, tail, follower)
                break
    if best is None:
        return None
    _, tail, follower = best
    rest = _subgroup(group, [node for node in members if node not in tail])
    _measure_group(rest, options)
    if not _worth_slicing(rest, options) or any(_tensor(node) is None for node in rest.outputs):
        return None
    return rest, follower


def _measure_group(group: _Group, options: SlicingOptions) -> None:
    """Estimate the group's intermediates, pick its slice count and its saving."""
    members = group.members
    index = {node: i for i, node in enumerate(members)}
    outputs = set(group.outputs)
    last_use = {}
    for node in members:
        uses = [index[u] for u in node.users if u in index]
        last_use[node] = len(members) if node in outputs else max(uses, default=index[node])
    live = peak = outputs_live = 0
    dying: dict[int, int] = {}
    transient_at: dict[torch.fx.Node, int] = {}
    for i, node in enumerate(members):
        nbytes = _nbytes(node)
        live += nbytes
        outputs_live += nbytes if node in outputs else 0
        workspace = _workspace_bytes(node)
        peak = max(peak, live + workspace)
        transient_at[node] = live + workspace - outputs_live
        dying[last_use[node]] = dying.get(last_use[node], 0) + nbytes
        live -= dying.pop(i, 0)
    group.intermediate_bytes = peak
    group.output_bytes = sum(_nbytes(node) for node in group.outputs)
    group.input_bytes = sum(_nbytes(node) for node, spec in group.feeds if spec is not None)
    transient = max(peak - group.output_bytes, 0)
    target = options.max_slice_bytes
    if target is None:
        target = max((group.input_bytes + group.output_bytes) // 4, 256 * 1024)
    slices = max(1, math.ceil(transient / max(target, 1)))
    group.slices = min(slices, options.max_slices, group.slicing.units)
    group.saving = transient - math.ceil(transient / group.slices) if group.slices > 1 else 0
    group.member_saving = {
        node: min(group.saving, t - math.ceil(t / group.slices)) if group.slices > 1 else 0
        for node, t in transient_at.items()
    }


def _subgroup(group: _Group, members: list[torch.fx.Node]) -> _Group:
    """The group made of ``members`` (a graph-ordered part of ``group``): values of the rest
    of ``group`` that it reads become sliced inputs, sliced as ``group`` slices them. Free
    views of such inputs leave the piece too (like views of the seed): as members they would
    be written out as copies where the graph had a view (SVD's transformer residual, a
    ``permute`` + ``reshape`` view of the AlphaBlender's output)."""
    specs = group.slicing.specs
    member_set = set(members)
    hoisted: set[torch.fx.Node] = set()
    for node in members:
        sources = node.all_input_nodes
        if (
            len(sources) == 1 and sources[0] in specs and (sources[0] not in member_set or sources[0] in hoisted)
            and not group.member_feeds[node] and _is_view_of(node, sources[0])
        ):
            hoisted.add(node)
    members = [node for node in members if node not in hoisted]
    member_set = set(members)
    member_feeds: dict[torch.fx.Node, dict[torch.fx.Node, Spec | None]] = {}
    feeds: dict[tuple[torch.fx.Node, Spec | None], None] = {}
    for node in members:
        node_feeds = dict(group.member_feeds[node])
        for arg in node.all_input_nodes:
            if arg in specs and arg not in member_set and arg not in group.slicing.seed_views:
                node_feeds[arg] = specs[arg]
        member_feeds[node] = node_feeds
        for arg, feed in node_feeds.items():
            feeds[(arg, feed)] = None
        for arg in node.all_input_nodes:
            if arg in group.slicing.seed_views:
                feeds[(arg, specs[arg])] = None
    return _Group(group.seed, group.slicing, members, feeds, _outputs(members), member_feeds, group.unknown_stops)


def _before_cut(group: _Group, grouping: _Grouping, options: SlicingOptions) -> _Group | None:
    """``group``, or the part of it before the first op outside it that writes in place a
    value it reads or computes, or draws random numbers, and before its first member under
    another autocast state than its first (``None`` if that part is not worth slicing).

    The group runs as one op where its first member was, so each member reads its inputs
    there. An in-place write between two members, by an op that stays outside (``x.mul_(2)``
    on a value a later member reads; ``h.add_(1)`` on a member's result), is data the graph
    does not show as an edge: the later member would read the value from before the write.
    The members before the write read what they always did. A random op between two members
    moves before the op (a value the group reads) or after it (one reading the group's), and
    with another random op on the other side the draws swap: other numbers for the same seed.
    And the op runs its body under one autocast state, its first member's: a
    ``torch.autocast`` block of the model's code starting or ending among the members would
    be ignored (a float32 region run in bfloat16)."""
    members, position, autocast = group.members, grouping.position, grouping.autocast
    first, last = position[members[0]], position[members[-1]]
    touched = [*members, *(arg for node in members for arg in node.all_input_nodes)]
    write = first_write_to(touched, grouping.writes, first, last, skip=members)
    inside = set(members)
    cuts = [
        write[0] if write is not None else None,
        next((position[node] for node in members if autocast[node] != autocast[members[0]]), None),
        next((at for at in range(first + 1, last) if grouping.nodes[at] not in inside and grouping.draws(at)), None),
    ]
    end = min((cut for cut in cuts if cut is not None), default=None)
    if end is None:
        return group
    kept = [node for node in members if position[node] < end]
    if not kept:
        return None
    rest = _subgroup(group, kept)
    if not rest.members or not rest.outputs or any(_tensor(node) is None for node in rest.outputs):
        return None
    _measure_group(rest, options)
    if not _worth_slicing(rest, options):
        return None
    return rest


def _worth_slicing(group: _Group, options: SlicingOptions) -> bool:
    """At least two slices, and an estimated saving of at least ``min_group_bytes``, and of
    something at all (``min_group_bytes=0`` still leaves alone a group that saves nothing:
    slicing it would cost time for no memory)."""
    return group.slices >= 2 and group.saving > 0 and group.saving >= options.min_group_bytes


def _storage_bytes(nodes: Any) -> int:
    """Bytes of the distinct storages behind ``nodes`` (graph inputs excluded: they exist
    anyway); a view and its base count once."""
    seen: dict[Any, int] = {}
    for node in nodes:
        if node.op == "placeholder":
            continue
        for tensor in tensor_values(node):
            try:
                key = StorageWeakRef(tensor.untyped_storage())
            except (NotImplementedError, RuntimeError):
                key = id(tensor)
            seen[key] = max(seen.get(key, 0), tensor.numel() * tensor.element_size())
    return sum(seen.values())


def _per_slice_bytes(group: _Group) -> int:
    return math.ceil(max(group.intermediate_bytes - group.output_bytes, 0) / group.slices)


def _inputs(group: _Group) -> set[torch.fx.Node]:
    return {arg for arg, _ in group.feeds}


def _footprint(group: _Group) -> int:
    """Bytes live while the group runs, as far as the group decides: its inputs (they live
    until its last slice), its outputs (allocated before its first) and one slice."""
    return _storage_bytes(_inputs(group) | set(group.outputs)) + _per_slice_bytes(group)


# A split must lower a group's footprint by at least this fraction: each cut materializes
# the values crossing it and adds a loop, so small gains are not worth the time.
_SPLIT_MIN_GAIN = 1 / 8


def _split(group: _Group, options: SlicingOptions) -> list[_Group]:
    """``group`` cut into graph-ordered pieces where that lowers the memory live while it runs.

    A group holds all its inputs until its last slice and all its outputs from its first.
    When its early ops consume large inputs and its late ops produce large outputs (SVD's
    AlphaBlender reads the spatial and the temporal resnet outputs, then the spatial
    transformer writes its residual, the spatial branch and the temporal input: five
    full-size tensors at once), running the first part as its own group frees the inputs
    before the outputs exist. Pieces keep the group's dimension and units; the values
    crossing a cut are written whole once, then read slice by slice. Order-preserving cuts
    keep both pieces convex: no path runs from a later member back to an earlier one."""
    members = group.members
    if len(members) < 2:
        return [group]
    whole = _footprint(group)
    inputs = _inputs(group)
    outputs = set(group.outputs)
    last = members[-1]
    order = {node: i for i, node in enumerate(last.graph.nodes)}
    best = None
    for cut in range(1, len(members)):
        first, second = _subgroup(group, members[:cut]), _subgroup(group, members[cut:])
        if not first.members or not second.members or not first.outputs or not second.outputs:
            continue
        if any(_tensor(node) is None for node in first.outputs) or not any(spec is not None for _, spec in second.feeds):
            continue
        if not any(spec is not None for _, spec in first.feeds):
            continue
        first_set = set(first.members)
        _measure_group(first, options)
        _measure_group(second, options)
        # While the first piece runs, inputs the second reads from outside already exist; while
        # the second runs, the first's outputs read after the group and its inputs read after
        # the group stay alive.
        during_first = _inputs(first) | set(first.outputs) | (_inputs(second) - first_set)
        after = order[last]
        carried = (set(first.outputs) & outputs) | {
            arg for arg in _inputs(first) & inputs
            if any(user not in first_set and order.get(user, -1) > after for user in arg.users)
        }
        during_second = _inputs(second) | set(second.outputs) | carried
        cost = max(
            _storage_bytes(during_first) + _per_slice_bytes(first),
            _storage_bytes(during_second) + _per_slice_bytes(second),
        )
        if best is None or cost < best[0]:
            best = (cost, first, second)
    if best is None or best[0] > whole * (1 - _SPLIT_MIN_GAIN):
        return [group]
    return _split(best[1], options) + _split(best[2], options)


# "auto" keeps this fraction of the device's free memory for the graph's intermediates; the
# rest is headroom for the allocator's fragmentation, other graphs and the caller's tensors.
AUTO_FREE_FRACTION = 0.5
# Under "auto" the budget decides whether to slice at all, so groups down to 1 MiB may be
# sliced when memory is short (largest saving at the peak first).
AUTO_MIN_GROUP_BYTES = 1 << 20


def _available_host_memory() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def auto_budget(device: torch.device) -> tuple[int | None, str]:
    """``"auto"``'s memory budget on ``device`` and where it comes from (``None``: unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * AUTO_FREE_FRACTION), f"half of the {format_bytes(free)} free on {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        available = _available_host_memory()
        if available is not None:
            return int(available * AUTO_FREE_FRACTION), f"half of the {format_bytes(available)} of available host memory"
    return None, f"free memory on {device.type} is unknown"


def _select_for_budget(
    groups: list[_Group], running_bytes: list[int], position: dict[torch.fx.Node, int], budget: int
) -> tuple[list[_Group], int]:
    """The groups to slice so the estimated peak fits ``budget``, and that estimated peak.

    Greedy on the estimated timeline: while its peak is over budget, slice the group that
    saves most at that point. A group saves, at each of its members, that member's transient
    intermediates less one slice's; at nodes between its members it is credited nothing, so
    the estimate errs towards slicing more, not less.
    """
    remaining = list(running_bytes)
    chosen: set[int] = set()
    while remaining:
        at = max(range(len(remaining)), key=remaining.__getitem__)
        if remaining[at] <= budget:
            break
        covering = [
            (group.member_saving.get(node, 0), index)
            for index, group in enumerate(groups) if index not in chosen
            for node in group.members if position[node] == at
        ]
        covering = [(saving, index) for saving, index in covering if saving > 0]
        if not covering:
            break  # the peak is outside every group: slicing cannot lower it further
        _, best = max(covering)
        chosen.add(best)
        for node, saving in groups[best].member_saving.items():
            remaining[position[node]] -= saving
    return [group for index, group in enumerate(groups) if index in chosen], max(remaining, default=0)


# Groups of fewer units than this are "coarse": they save at most 1 - 1/units of what their
# ops hold (a guidance batch of 2 sliced into its two samples: half). Only these are weighed
# against a finer grouping: with more units (4 frames) the groups as formed were measured
# (tests/test_slicing.py) and the estimate alone does not say which grouping the lowering
# keeps lower.
_FINE_UNITS = 3


@dataclasses.dataclass
class _Grouping:
    """Groups formed over a graph, seed by seed in graph order, and what forming them noted."""

    graph: torch.fx.Graph
    nodes: list[torch.fx.Node]
    position: dict[torch.fx.Node, int]
    parameters: set[torch.fx.Node]
    writes: list[Write]
    autocast: dict[torch.fx.Node, autocast_state.AutocastState]
    options: SlicingOptions
    groups: list[_Group] = dataclasses.field(default_factory=list)
    unit_of: dict[torch.fx.Node, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    matched: int = 0
    skipped_small: int = 0
    split_groups: int = 0
    handed_over: int = 0
    cut_at_writes: int = 0
    _draws: dict[int, bool] = dataclasses.field(default_factory=dict)

    def draws(self, at: int) -> bool:
        """Whether the node at position ``at`` draws random numbers (asked of the few nodes
        between a group's members: :func:`draws_random` may run a node on fake values)."""
        if at not in self._draws:
            self._draws[at] = draws_random(self.nodes[at])
        return self._draws[at]

    def form(self, claimed: set[torch.fx.Node], min_units: int = 1) -> None:
        """Grow groups from every seed whose users are not all ``claimed`` (which grows), of
        at least ``min_units`` units."""
        position, options = self.position, self.options
        for seed in self.nodes:
            shape = _shape(seed)
            # A value a group writes whole (claimed, read outside it) seeds the next group: the
            # LayerNorm after SVD's temporal ff_in, or a GroupNorm over frames reading a resnet
            # group's output, then run sliced too instead of whole between the groups.
            if seed in self.parameters or shape is None or not shape:
                continue
            if all(user in claimed for user in seed.users):
                continue
            best = _best_group(seed, position, claimed, options, min_units)
            if best is None:
                continue
            self.matched += 1
            if not _worth_slicing(best, options):
                self.skipped_small += 1
                continue
            queue = [best]
            while queue:
                best = queue.pop(0)
                follower = None
                handed = _hand_over_tail(best, position, claimed, options)
                if handed is not None:
                    best, follower = handed
                pieces = [piece for piece in _split(best, options) if piece.slices >= 2]
                checked = [_before_cut(piece, self, options) for piece in pieces]
                self.cut_at_writes += sum(piece is not whole for piece, whole in zip(checked, pieces))
                pieces = [piece for piece in checked if piece is not None]
                trial = dict(self.unit_of)
                for offset, piece in enumerate(pieces):
                    for node in piece.members:
                        trial[node] = len(self.groups) + offset
                if not _condensed_acyclic(self.graph, trial):
                    self.notes.append(
                        f"group at {best.seed.name} (dim {best.dim}) would create a cycle with another group: "
                        "left alone"
                    )
                    break
                self.handed_over += follower is not None
                if len(pieces) > 1:
                    self.split_groups += 1
                self.unit_of = trial
                for piece in pieces:
                    claimed.update(piece.members)
                    self.groups.append(piece)
                if follower is not None:
                    queue.append(follower)


def _estimated_peak(groups: list[_Group], running_bytes: list[int], position: dict[torch.fx.Node, int]) -> int:
    """The estimated peak with every group of ``groups`` sliced (as :func:`_select_for_budget`
    credits them)."""
    remaining = list(running_bytes)
    for group in groups:
        for node, saving in group.member_saving.items():
            remaining[position[node]] -= saving
    return max(remaining, default=0)


def _condensed_acyclic(graph: torch.fx.Graph, unit_of: dict[torch.fx.Node, Any]) -> bool:
    """Whether the graph stays acyclic when each group's nodes are one node."""
    edges: dict[Any, set[Any]] = {}
    for node in graph.nodes:
        a = unit_of.get(node, node)
        for user in node.users:
            b = unit_of.get(user, user)
            if a != b:
                edges.setdefault(a, set()).add(b)
    state: dict[Any, int] = {}
    for start in list(edges):
        if state.get(start):
            continue
        stack = [(start, iter(edges.get(start, ())))]
        state[start] = 1
        while stack:
            unit, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[unit] = 2
                stack.pop()
            elif state.get(child) == 1:
                return False
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(edges.get(child, ()))))
    return True


# ---------------------------------------------------------------------------------------
# Rewriting


def _is_two_pass_norm(node: torch.fx.Node, specs: dict[torch.fx.Node, Spec]) -> bool:
    return (
        node.op == "call_function"
        and node.target in (F.group_norm, torch.group_norm)
        and specs[node].dim >= 2
    )


def _body(group: _Group, placeholders: list[tuple[torch.fx.Node, Spec | None]]) -> tuple[torch.fx.GraphModule, list[NormStats]]:
    """The per-slice module: inputs (sliced or whole), then (mean, rstd) per two-pass norm."""
    specs = group.slicing.specs
    graph = torch.fx.Graph()
    env = {key: graph.placeholder(f"input_{i}") for i, key in enumerate(placeholders)}
    norm_nodes = [node for node in group.members if _is_two_pass_norm(node, specs)]
    stats = {node: (graph.placeholder(f"mean_{i}"), graph.placeholder(f"rstd_{i}")) for i, node in enumerate(norm_nodes)}
    norms: list[NormStats] = []
    produced: dict[torch.fx.Node, torch.fx.Node] = {}

    def lookup(arg: torch.fx.Node, feeds: dict) -> torch.fx.Node:
        if arg in produced:
            return produced[arg]
        if arg in group.slicing.seed_views:
            return env[(arg, specs[arg])]
        return env[(arg, feeds.get(arg))]

    for node in group.members:
        feeds = group.member_feeds[node]
        args = torch.fx.map_arg(node.args, lambda a, feeds=feeds: lookup(a, feeds))
        kwargs = torch.fx.map_arg(node.kwargs, lambda a, feeds=feeds: lookup(a, feeds))
        if node.target in _SIZED_METHODS and node.op == "call_method" or node.target is torch.reshape:
            sizes = list(_shape(node))
            sizes[specs[node].dim] = -1
            # `view` becomes `reshape` (the same view wherever a view exists): under the Inductor
            # lowering the op's inputs come in the layout Inductor chose (flexible_layout, see
            # memopt/ops/slicing.py), e.g. a channels-last convolution output traced contiguous.
            target = "reshape" if node.target == "view" else node.target
            new = graph.create_node(node.op, target, (args[0], tuple(sizes)))
        elif node in stats:
            x = node.args[0]
            norms.append(NormStats(placeholders.index((x, specs[x])), _arg(node, 1, "num_groups"), _arg(node, 4, "eps", 1e-5)))
            mean, rstd = stats[node]
            weight, bias = _arg(node, 2, "weight"), _arg(node, 3, "bias")
            new = graph.call_function(
                group_norm_with_stats,
                (lookup(x, feeds), mean, rstd, _arg(node, 1, "num_groups"),
                 lookup(weight, feeds) if isinstance(weight, torch.fx.Node) else weight,
                 lookup(bias, feeds) if isinstance(bias, torch.fx.Node) else bias,
                 _tensor(node).dtype),  # the traced dtype: float32 under autocast, like aten's
            )
        else:
            new = graph.create_node(node.op, node.target, args, kwargs)
        produced[node] = new
    graph.output(tuple(produced[node] for node in group.outputs))
    return torch.fx.GraphModule(torch.nn.Module(), graph, "SlicedGroupBody"), norms


def _dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s elements fill its storage span exactly once (some permutation of
    a contiguous layout)."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(tensor.shape, tensor.stride()) if s != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _layout(tensor: torch.Tensor) -> TensorLayout:
    # Outputs keep the original strides when they are dense (no overlap, no gaps), so what
    # follows sees the layout it was traced with; otherwise they are contiguous.
    stride = tuple(tensor.stride())
    if not _dense(tensor):
        stride = tuple(torch.empty(tensor.shape, device="meta").stride())
    return TensorLayout(tuple(tensor.shape), stride, tensor.dtype)


def _fusible(group: _Group) -> bool:
    """Whether compiling the group's body can fuse anything: at least two ops that are not
    views. A body of one op (a convolution, a matmul, one pointwise op) compiled by Inductor
    runs the same kernel as op by op, after a compile that buys nothing."""
    compute = [
        node for node in group.members
        if not (node.op == "call_method" and node.target in _VIEW_METHODS)
        and not (node.op == "call_function" and node.target in _VIEW_FUNCTIONS)
    ]
    return len(compute) >= 2


def _even_slices(units: int, slices: int, max_slices: int) -> int:
    """The smallest slice count from ``slices`` to ``2 * slices`` that divides ``units``
    (one slice shape, so one compile of the body), or ``slices`` when none does."""
    for count in range(slices, min(2 * slices, max_slices, units) + 1):
        if units % count == 0:
            return count
    return slices


def _prepare(
    group: _Group, compile_body: bool, autocast: autocast_state.AutocastState
) -> tuple[SlicedGroup, list[torch.fx.Node]]:
    """Build the group's body (from the untouched graph) and the op's inputs; registered
    (:func:`_register`) once its slice count is final."""
    placeholders = list(group.feeds)
    body, norms = _body(group, placeholders)
    specs = group.slicing.specs
    sliced = SlicedGroup(
        body=body,
        input_specs=tuple(spec for _, spec in placeholders),
        output_specs=tuple(specs[node] for node in group.outputs),
        output_layouts=tuple(_layout(_tensor(node)) for node in group.outputs),
        units=group.slicing.units,
        slices=group.slices,
        norm_stats=tuple(norms),
        compile_body=compile_body,
        autocast=autocast,
    )
    return sliced, [node for node, _ in placeholders]


def _register(sliced: SlicedGroup) -> str:
    """Register ``sliced`` under a key derived from everything that defines it."""
    fingerprint = repr((
        sliced.body.code, sliced.input_specs, sliced.output_specs, sliced.output_layouts,
        sliced.units, sliced.slices, sliced.norm_stats, sliced.compile_body, sliced.autocast,
    ))
    return register_group("g" + hashlib.sha256(fingerprint.encode()).hexdigest()[:24], sliced)


def _transient(group: _Group, slices: int) -> int:
    """What ``memopt.estimate`` counts while the group's op runs, beyond its inputs and
    preallocated outputs: one slice's intermediates, and the body's results for the slice
    until they are copied into the outputs."""
    return math.ceil(group.intermediate_bytes / slices)


# Fewer slices may raise a group's level up to this fraction of the estimated peak, not to
# the peak itself: the estimate is a model of what the lowered graph keeps alive. On the three
# video UNets of benchmarks/slicing.py (CPU) relaxing up to the peak cut 20-35% of the slices
# but raised the measured peak 3-8%; up to 0.9 of it cut 12-19% with the measured peak unchanged.
_RELAX_TO = 0.9


def _relax_slices(
    gm: torch.fx.GraphModule,
    groups: list[_Group],
    calls: list[torch.fx.Node],
    sliced: list[SlicedGroup],
    options: SlicingOptions,
    budget: int | None,
) -> int:
    """Give each group the fewest slices that keep the graph's estimated peak where it is,
    or, with a memory budget the graph now fits well inside, under the budget.

    Each slice costs time (a body call, its launches, the copies into the outputs), but the
    slice count matters for memory only where the group's one-slice intermediates set the
    peak. Groups run one after another, so a group's transient adds to the live bytes at its
    own node only: read off the rewritten graph's timeline, a group whose level is below the
    peak can drop slices until its level nears it (:data:`_RELAX_TO`). Under a budget
    (``max_peak_bytes``, or ``"auto"``'s share of free memory) the level may rise to near the
    budget instead when that is higher: the budget is what the user asked to fit, and every
    slice beyond it is time spent for nothing. Compiled bodies keep counts that divide the
    units (one slice shape, one compile); an explicit ``max_slice_bytes`` stays a bound.
    Returns how many groups got fewer slices.
    """
    timeline = estimate(gm)
    limit = max(timeline.peak_bytes, budget or 0) * _RELAX_TO
    position = {node: index for index, node in enumerate(gm.graph.nodes)}
    relaxed = 0
    for group, call, op in zip(groups, calls, sliced):
        base = timeline.running_bytes[position[call]] - call.meta.get(TRANSIENT_BYTES, 0)
        fewest = 2
        if options.max_slice_bytes is not None:
            sliceable = max(group.intermediate_bytes - group.output_bytes, 0)
            fewest = max(fewest, math.ceil(sliceable / options.max_slice_bytes))
        for count in range(fewest, group.slices):
            if op.compile_body and group.slicing.units % count:
                continue
            if base + _transient(group, count) <= limit:
                group.slices = op.slices = count
                call.meta[TRANSIENT_BYTES] = _transient(group, count)
                relaxed += 1
                break
    return relaxed


def _rewrite(
    graph: torch.fx.Graph,
    group: _Group,
    sliced: SlicedGroup,
    inputs: list[torch.fx.Node],
    replaced: dict[torch.fx.Node, torch.fx.Node],
) -> torch.fx.Node:
    """Replace the group's members by one ``memopt::slicing`` call and a getitem per output.
    ``replaced`` maps outputs of groups rewritten earlier to their getitems (and grows). The
    call's key is left empty until the group is registered."""
    inputs = [replaced.get(node, node) for node in inputs]
    with graph.inserting_before(group.members[0]):
        call = graph.call_function(torch.ops.memopt.slicing.default, ("", inputs))
    fake = _tensor(group.outputs[0])
    fake_mode = getattr(fake, "fake_mode", None)
    values = []
    for layout in sliced.output_layouts:
        if fake_mode is not None:
            with fake_mode:
                values.append(torch.empty_strided(layout.shape, layout.stride, dtype=layout.dtype, device=fake.device))
        else:
            values.append(torch.empty_strided(layout.shape, layout.stride, dtype=layout.dtype, device="meta"))
    call.meta["val"] = call.meta["example_value"] = values
    # One slice's intermediates exist while the op runs: memopt.estimate adds them there.
    call.meta[TRANSIENT_BYTES] = _transient(group, group.slices)
    anchor = call
    for i, (node, value) in enumerate(zip(group.outputs, values)):
        with graph.inserting_after(anchor):
            item = graph.call_function(operator.getitem, (call, i))
        anchor = item
        item.meta["val"] = item.meta["example_value"] = value
        node.replace_all_uses_with(item)
        replaced[node] = item
    for node in reversed(group.members):
        graph.erase_node(node)
    return call


def _toposort(graph: torch.fx.Graph) -> None:
    """Reorder ``graph`` so every node follows its inputs, keeping the original order where
    it already does (a group call may have been placed before one of its inputs)."""
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    position.update({node: len(nodes) for node in nodes if node.op == "output"})  # always last
    remaining = {node: len(set(node.all_input_nodes)) for node in nodes}
    heap = [(position[n], n) for n in nodes if remaining[n] == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        _, node = heapq.heappop(heap)
        order.append(node)
        for user in node.users:
            remaining[user] -= 1
            if remaining[user] == 0:
                heapq.heappush(heap, (position[user], user))
    if len(order) != len(nodes):
        raise RuntimeError("slicing: graph has a cycle after grouping")
    if order == nodes:
        return
    output = order[-1]
    for prev, node in zip(order, order[1:]):
        if prev.next is not node:
            prev.append(node)
    assert output.op == "output"


# ---------------------------------------------------------------------------------------
# The pass


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult("slicing")
    options = ctx.option if isinstance(ctx.option, SlicingOptions) else SlicingOptions(min_group_bytes=AUTO_MIN_GROUP_BYTES)
    graph = gm.graph
    nodes = list(graph.nodes)
    if any(_tensor(n) is not None and _shape(n) is None for n in nodes):
        result.notes.append("graph has symbolic shapes: left untouched")
        return result
    position = {node: i for i, node in enumerate(nodes)}
    writes = in_place_writes(nodes)
    # The caller's autocast state (see memopt.ops.autocast_state), changed by autocast blocks
    # in the model's code: each group's op runs its body under its members' state.
    autocast = autocast_state.by_node(nodes, autocast_state.current(ctx.device.type))
    parameters = {
        node for node, value in zip((n for n in nodes if n.op == "placeholder"), ctx.example_inputs)
        if isinstance(value, torch.nn.Parameter)
    }
    # Nodes under an inlined torch.func transform see batched tensors at run time, which the
    # slicing op cannot take: they join no group (as if another group had claimed them).
    transformed = transformed_nodes(graph)
    if transformed:
        result.notes.append(f"{len(transformed)} node(s) under a torch.func transform (vmap, grad, jvp) left alone")
    grouping = _Grouping(graph, nodes, position, parameters, writes, autocast, options)
    grouping.form(set(transformed))
    timeline = None
    coarse = [group for group in grouping.groups if group.slicing.units < _FINE_UNITS]
    if coarse:
        timeline = estimate(gm)
        # A group of few units (a guidance batch of 2: the whole UNet, 2 slices) saves at most
        # a fraction 1 - 1/units, and claims ops that finer groups (frames, positions) would
        # slice into many more pieces. Group again, finer groups first, then the rest, and keep
        # whichever leaves the lower estimated peak.
        fine = _Grouping(graph, nodes, position, parameters, writes, autocast, options)
        fine.form(set(transformed), min_units=_FINE_UNITS)
        fine.form(set(transformed) | {node for group in fine.groups for node in group.members})
        before_fine = _estimated_peak(grouping.groups, timeline.running_bytes, position)
        after_fine = _estimated_peak(fine.groups, timeline.running_bytes, position)
        if after_fine < before_fine:
            result.notes.append(
                f"{len(coarse)} group(s) of fewer than {_FINE_UNITS} units (dim {coarse[0].dim} at "
                f"{coarse[0].seed.name}) gave way to finer groups: estimated peak {format_bytes(before_fine)} -> "
                f"{format_bytes(after_fine)}"
            )
            grouping = fine
    groups = grouping.groups
    result.matched += grouping.matched
    result.notes.extend(grouping.notes)
    skipped_small, split_groups = grouping.skipped_small, grouping.split_groups
    handed_over, cut_at_writes = grouping.handed_over, grouping.cut_at_writes
    unknown = collections.Counter(
        _op_name(node) for group in groups for node in group.unknown_stops
    )
    if unknown:
        result.notes.append(
            "ops without a slicing rule ended groups (conservative): "
            + ", ".join(f"{name} x{count}" for name, count in unknown.most_common(6))
        )
    if cut_at_writes:
        result.notes.append(
            f"{cut_at_writes} group(s) cut short (or left alone) before an in-place write by an op outside them "
            "to a value they read or compute, before a random op outside them, or where a torch.autocast block "
            "of the model's code starts or ends: run as one op, they would read the value before the write, "
            "reorder the draws, or run under one autocast state"
        )
    if handed_over:
        result.notes.append(
            f"{handed_over} group(s) left their tail to the next group, which slices it along "
            "another dimension (fewer bytes written whole between the groups)"
        )
    if split_groups:
        result.notes.append(
            f"{split_groups} group(s) split where their inputs die and their outputs are born "
            "(lower estimated footprint than running them as one group)"
        )
    if skipped_small:
        result.notes.append(
            f"{skipped_small} candidate group(s) save less than min_group_bytes="
            f"{format_bytes(options.min_group_bytes)}, or nothing: left alone"
        )
    if not groups:
        result.notes.append("no group worth slicing: graph left untouched")
        return result
    timeline = timeline or estimate(gm)
    before = timeline.peak_bytes
    auto = not isinstance(ctx.option, SlicingOptions) or options.max_peak_bytes == "auto"
    if auto:
        budget, source = auto_budget(ctx.device)
    else:
        budget, source = options.max_peak_bytes, "max_peak_bytes"
    # What slices regardless: "auto" takes groups from AUTO_MIN_GROUP_BYTES (True keeps the
    # larger default); a dict, without its budget.
    force = (
        "max_peak_bytes=None" if isinstance(ctx.option, SlicingOptions)
        else f'slicing={{"min_group_bytes": {AUTO_MIN_GROUP_BYTES}}}'
    )
    if budget is None and auto:
        result.notes.append(f"{source}, so memory pressure cannot be judged: graph left untouched ({force} slices)")
        return result
    if budget is not None:
        candidates = len(groups)
        groups, estimated = _select_for_budget(groups, timeline.running_bytes, position, budget)
        if not groups:
            result.notes.append(
                f"estimated peak of intermediates {format_bytes(before)} fits the budget {format_bytes(budget)} "
                f"({source}): nothing sliced, since slicing costs time ({force} slices anyway)"
            )
            return result
        verdict = "under" if estimated <= budget else "still over"
        result.notes.append(
            f"sliced {len(groups)} of {candidates} candidate group(s): estimated peak {format_bytes(before)} -> "
            f"about {format_bytes(estimated)}, {verdict} the budget {format_bytes(budget)} ({source})"
        )
    compile_body = options.compile_body
    if compile_body is None:
        compile_body = ctx.config.lowering == "inductor"
    compiled = [compile_body and _fusible(group) for group in groups]
    if compile_body:
        for group, compile_it in zip(groups, compiled):
            if compile_it:
                group.slices = _even_slices(group.slicing.units, group.slices, options.max_slices)
        result.notes.append(
            f"group bodies run compiled by Inductor, once per slice shape (compile_body): "
            f"{sum(compiled)} of {len(groups)}; bodies of one op run it directly (nothing to fuse)"
        )
    prepared = [_prepare(group, compile_it, autocast[group.members[0]]) for group, compile_it in zip(groups, compiled)]
    replaced: dict[torch.fx.Node, torch.fx.Node] = {}
    calls = [_rewrite(graph, group, sliced, inputs, replaced) for group, (sliced, inputs) in zip(groups, prepared)]
    _toposort(graph)
    result.rewrites = len(groups)
    relaxed = _relax_slices(gm, groups, calls, [sliced for sliced, _ in prepared], options, budget)
    for call, (sliced, _) in zip(calls, prepared):
        call.args = (_register(sliced), call.args[1])
    after = estimate(gm).peak_bytes
    if relaxed:
        bound = "the estimated peak" if budget is None else f"the budget {format_bytes(budget)}"
        result.notes.append(
            f"{relaxed} group(s) run fewer slices: below {bound}, more slices cost time and save nothing "
            f"(estimated peak now {format_bytes(after)})"
        )
    for index, group in enumerate(groups):
        first, last = group.members[0], group.members[-1]
        result.details.append({
            "group": index,
            "seed": group.seed.name,
            "dim": group.dim,
            "units": group.slicing.units,
            "slices": group.slices,
            "ops": len(group.members),
            "first": first.name,
            "last": last.name,
            "outputs": len(group.outputs),
            "gn_two_pass": sum(
                1 for n in group.members
                if n.op == "call_function" and n.target in (F.group_norm, torch.group_norm) and group.slicing.specs[n].dim >= 2
            ),
            "intermediate_bytes": group.intermediate_bytes,
            "per_slice_bytes": _transient(group, group.slices),
            "compiled": compiled[index],
        })
    result.bytes_saved = max(before - after, 0)
    for row in result.details:
        row["estimated_peak_before"] = before
        row["estimated_peak_after"] = after
    return result


SLICING = GraphPass(name="slicing", config_field="slicing", run=run, applies_to="inference")
