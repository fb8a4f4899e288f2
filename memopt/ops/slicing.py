"""``memopt::slicing``: run a group of ops slice by slice into preallocated outputs.

The slicing pass (``passes/slicing.py``) moves a chain of ops that treat one dimension
independently into a small FX module (the *body*) and replaces the chain by one call of this
op. The op allocates each output once, then for each slice narrows the sliced inputs (views,
no copy), runs the body on them and copies the body's results into their part of the
outputs. Peak memory is the inputs, the outputs and one slice's intermediates.

The op is opaque to Inductor on purpose: Inductor may fuse or reorder the ops of a chain
across slices (and so rebuild the full-size intermediates), but it never looks inside a
custom op. Bodies are kept in a registry keyed by a hash of their code and layout, so the
key in a cached compiled graph names the same body in every process that ran the pass.

GroupNorm over the sliced dimension is exact: the op computes each such norm's statistics
over the whole input first, and the body normalizes each slice with them.

The body runs op by op (PyTorch's kernels) or, with ``compile_body``, compiled by Inductor
once per distinct slice shape (fused Triton kernels on a GPU): op by op, a GPU runs each
slice's ops as separate small kernels, and a small AnimateDiff step on an H100 took 35x
Inductor's time that way.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from memopt.ops.autocast_state import AutocastState, under


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def empty(self, device: torch.device) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=device)


@dataclasses.dataclass(frozen=True)
class SliceSpec:
    """Dimension ``dim`` of a tensor holds ``units`` slice units of ``unit`` indices each."""

    dim: int
    unit: int


@dataclasses.dataclass(frozen=True)
class NormStats:
    """Statistics a body needs for one GroupNorm over the sliced dimension."""

    input_index: int
    """Which op input the norm reads (whole, before slicing)."""
    num_groups: int
    eps: float


@dataclasses.dataclass
class SlicedGroup:
    """One group the slicing pass made: its body and how to slice around it."""

    body: torch.fx.GraphModule
    """Takes the (sliced or whole) inputs, then ``(mean, rstd)`` per entry of ``norm_stats``."""
    input_specs: tuple[SliceSpec | None, ...]
    """Per op input: how it is sliced, or ``None`` when every slice reads it whole."""
    output_specs: tuple[SliceSpec, ...]
    output_layouts: tuple[TensorLayout, ...]
    units: int
    """Slice units along the sliced dimension (its extent in the group's first input)."""
    slices: int
    norm_stats: tuple[NormStats, ...] = ()
    compile_body: bool = False
    """Run the body compiled by Inductor (see :func:`compile_body`) instead of op by op."""
    autocast: AutocastState | None = None
    """The autocast state the graph was traced under; the body runs, and is compiled, under
    it (see :mod:`memopt.ops.autocast_state`)."""
    compiled: dict[tuple, Callable[..., Any]] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    """Compiled bodies by the layouts of their arguments (one per distinct slice shape)."""

    def bounds(self) -> list[tuple[int, int]]:
        """``(first, stop)`` unit ranges of the slices: near-equal, covering all units."""
        edges = [round(i * self.units / self.slices) for i in range(self.slices + 1)]
        return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]

    def device(self, inputs: Sequence[torch.Tensor]) -> torch.device:
        """The device of the sliced inputs (whole ones may be CPU scalars)."""
        return next(value.device for value, spec in zip(inputs, self.input_specs) if spec is not None)

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        device = self.device(inputs)
        outputs = [layout.empty(device) for layout in self.output_layouts]
        stats: list[torch.Tensor] = []
        for norm in self.norm_stats:
            stats.extend(group_norm_stats(inputs[norm.input_index], norm.num_groups, norm.eps))
        # A slice's argument layouts follow from the whole inputs' and the slice's length, so
        # the compiled body is looked up by those, computed once per call, not per slice: on a
        # launch-bound GPU the per-slice host work is the cost of slicing.
        layouts = (
            tuple((tuple(a.shape), a.stride(), a.dtype, a.device) for a in (*inputs, *stats)) if self.compile_body else ()
        )
        with under(self.autocast):
            for first, stop in self.bounds():
                args = [
                    value if spec is None else value.narrow(spec.dim, first * spec.unit, (stop - first) * spec.unit)
                    for value, spec in zip(inputs, self.input_specs)
                ]
                results = self._body_for((layouts, stop - first), [*args, *stats])(*args, *stats)
                for output, result, spec in zip(outputs, results, self.output_specs):
                    output.narrow(spec.dim, first * spec.unit, (stop - first) * spec.unit).copy_(result)
                del results, args
        return outputs

    def _body_for(self, key: tuple, args: Sequence[Any]) -> Callable[..., Any]:
        """The body to run on ``args``, whose layouts ``key`` determines."""
        if not self.compile_body:
            return self.body
        function = self.compiled.get(key)
        if function is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                return self.body  # a compile inside CUDA graph capture would be captured too
            try:
                function = compile_body(self.body, args)
            except Exception as error:  # same results either way: fall back, never fail the model
                warnings.warn(
                    f"memopt::slicing: compiling a group body with Inductor failed ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}); running it op by op",
                    RuntimeWarning,
                    stacklevel=2,
                )
                function = self.body
            self.compiled[key] = function
        return function


def compile_body(body: torch.fx.GraphModule, example_args: Sequence[Any]) -> Callable[..., Any]:
    """``body`` compiled by Inductor for arguments laid out like ``example_args``.

    The slices' near-equal bounds give at most two distinct shapes per group, so a group
    compiles once or twice; Inductor's FX graph cache makes later processes' compiles cheap.
    The body is copied first: the op-by-op body stays as it was for every other use.
    """
    from torch._inductor import config as inductor_config

    from memopt._torch_compat import compile_fx
    from memopt.lowering import KEYED_SLOT, CacheKey

    graph_copy = torch.fx.GraphModule(body, copy.deepcopy(body.graph))
    # The op looks bodies up by their arguments' exact sizes and strides, so the compiled
    # code's own check of them on every call (one per argument per slice) is redundant.
    patches = {"size_asserts": False} if hasattr(inductor_config, "size_asserts") else {}
    patches[KEYED_SLOT] = CacheKey()  # keys the code on memopt's Inductor fixes, as lower() does
    with torch.no_grad():
        return compile_fx(graph_copy, list(example_args), config_patches=patches)


_GROUPS: dict[str, SlicedGroup] = {}


def register_group(key: str, group: SlicedGroup) -> str:
    """Make ``group`` callable as ``torch.ops.memopt.slicing(key, inputs)``."""
    _GROUPS.setdefault(key, group)
    return key


def registered_groups() -> list[SlicedGroup]:
    """Every group registered in this process (for tests and ``memopt inspect``)."""
    return list(_GROUPS.values())


def registered_group(key: str) -> SlicedGroup:
    try:
        return _GROUPS[key]
    except KeyError:
        raise RuntimeError(f"memopt::slicing: no group registered under {key!r}") from None


# flexible_layout: Inductor hands the inputs over in the layout it chose for them, instead of
# copying each into the layout it was traced with (its default for custom ops). Inductor lays
# CPU convolution outputs out channels-last; traced contiguous, a value read by several groups
# (a UNet's conv_in skip) became one full-size copy per group, all made at its producer: 4 MiB
# above the eager-lowered peak on AnimateDiff. Slices are narrowed views of any layout, bodies
# use `reshape` where the graph had `view`, and outputs keep their traced layout.
@torch.library.custom_op("memopt::slicing", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def slicing(key: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run the registered group ``key`` slice by slice on ``inputs``."""
    return registered_group(key).run(inputs)


@slicing.register_fake
def _slicing_fake(key: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    group = registered_group(key)
    device = group.device(inputs)
    return [layout.empty(device) for layout in group.output_layouts]


def group_norm_stats(x: torch.Tensor, num_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 1/std of ``group_norm``'s groups of ``x`` (``[N, C, *]``), each ``[N, G]``,
    in float32 or wider. ``unflatten`` is a view for any strides, so no copy of ``x``."""
    grouped = x.unflatten(1, (num_groups, x.shape[1] // num_groups))
    if grouped.dtype in (torch.float16, torch.bfloat16):
        grouped = grouped.float()
    var, mean = torch.var_mean(grouped, dim=tuple(range(2, grouped.dim())), correction=0)
    return mean, torch.rsqrt(var + eps)


def group_norm_with_stats(
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``group_norm`` of a slice of a tensor (sliced along a dimension >= 2), with the
    statistics of the whole tensor from :func:`group_norm_stats`. ``out_dtype`` (default:
    ``x``'s) is what ``group_norm`` returned when traced: autocast runs it in float32."""
    channels = x.shape[1]
    grouped = x.unflatten(1, (num_groups, channels // num_groups))
    stat_shape = (*mean.shape, *([1] * (grouped.dim() - 2)))
    normalized = ((grouped.to(mean.dtype) - mean.view(stat_shape)) * rstd.view(stat_shape)).flatten(1, 2)
    affine_shape = (channels, *([1] * (x.dim() - 2)))
    if weight is not None:
        normalized = normalized * weight.view(affine_shape)
    if bias is not None:
        normalized = normalized + bias.view(affine_shape)
    return normalized.to(out_dtype or x.dtype)
