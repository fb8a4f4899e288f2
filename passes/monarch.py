"""The ``monarch`` pass: dense linear layers of an inference graph -> Monarch projections.

Two parts (docs/passes/monarch.md):

(a) ``memopt.nn.MonarchLinear`` layers need nothing here: their forward calls
    ``torch.ops.memopt.monarch_matmul``, so Dynamo records one op node per layer in every
    graph (inference and training), which lowers to the Triton kernels on CUDA.
(b) Opt-in (``Config.monarch``), inference graphs only, changes results: each dense layer
    whose weight is a parameter (``linear(x, W, b)``; ``addmm(b, x, W)`` from transformers'
    ``Conv1D``) and that passes the options' filters is replaced by the Frobenius-optimal
    Monarch projection of its weight, frozen as two constant buffers of the graph module.
    A layer whose relative projection error exceeds ``max_rel_error`` stays dense (a note).
    The pass runs the graph once before and once after the rewrite on the example inputs and
    reports per layer the weight error, the layer's output error, the weight bytes and FLOPs
    saved, and the graph's output error.
"""

from __future__ import annotations

import contextlib
import fnmatch
import operator
import re
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

import memopt.ops.monarch  # noqa: F401  (registers torch.ops.memopt.monarch_matmul)
from memopt._torch_compat import fake_tensor_mode, size_hint
from memopt.config import MonarchOptions
from memopt.nn.monarch import monarch_block_rank
from memopt.passes.base import (
    BEFORE_CALL, GraphPass, PassContext, in_place_writes, transformed_nodes, value_storages,
)
from memopt.report import PassResult, format_bytes
from memopt.triton_kernels.monarch import project

_LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
_ADDMM_TARGETS = (torch.addmm,)
# Calls that take a PyTorch layer's weights and run its linear layers inside, out of the
# pass's reach: the fused inference fast paths of nn.TransformerEncoderLayer and
# nn.MultiheadAttention (eval mode, no grad), and the function nn.MultiheadAttention calls
# otherwise, which Dynamo keeps as one call.
_FAST_PATHS = ("_transformer_encoder_layer_fwd", "_native_multi_head_attention")
_OPAQUE_LINEARS = (*_FAST_PATHS, "multi_head_attention_forward")


class _Site:
    """One dense layer found in the graph."""

    def __init__(self, node: torch.fx.Node, x: torch.fx.Node, weight: torch.fx.Node, bias: Any, transposed: bool):
        self.node = node
        self.x = x
        self.weight_node = weight
        self.bias = bias
        self.transposed = transposed  # addmm(b, x, W): W is (in, out)
        self.name = _module_name(node, weight)


def _find_sites(gm: torch.fx.GraphModule) -> list[_Site]:
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _LINEAR_TARGETS:
            args = list(node.args) + [None] * (3 - len(node.args))
            x = node.kwargs.get("input", args[0])
            weight = node.kwargs.get("weight", args[1])
            bias = node.kwargs.get("bias", args[2])
            if isinstance(x, torch.fx.Node) and isinstance(weight, torch.fx.Node):
                sites.append(_Site(node, x, weight, bias, transposed=False))
        elif node.target in _ADDMM_TARGETS and len(node.args) == 3 and not node.kwargs:
            bias, x, weight = node.args
            if isinstance(x, torch.fx.Node) and isinstance(weight, torch.fx.Node):
                sites.append(_Site(node, x, weight, bias, transposed=True))
    return sites


def _opaque_linears(gm: torch.fx.GraphModule) -> list[str]:
    """The names of the calls that hold linear layers out of reach, one per call."""
    return [
        name
        for node in gm.graph.nodes
        if node.op == "call_function"
        for name in [getattr(node.target, "__name__", str(node.target))]
        if name in _OPAQUE_LINEARS
    ]


def _module_name(node: torch.fx.Node, weight: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, module_type = list(stack.values())[-1][:2]
        path = re.sub(r"^L\['[^']*'\]", "", path)
        path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
        path = re.sub(r"\[['\"]?([^]'\"]*)['\"]?\]", r".\1", path)
        # The compiled module itself (torch.compile(nn.Linear(...))) has no path: its class.
        return path.strip(".") or f"<{getattr(module_type, '__name__', weight.name)}>"
    return weight.name


def _meta_value(node: Any) -> Any:
    if isinstance(node, torch.fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    options: MonarchOptions = ctx.option if isinstance(ctx.option, MonarchOptions) else MonarchOptions()
    result = PassResult("monarch")
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    real_value = dict(zip(placeholders, ctx.example_inputs)) if len(placeholders) == len(ctx.example_inputs) else {}
    outside_targets = not_parameters = 0
    plans = []
    transformed = transformed_nodes(gm.graph)
    for site in _find_sites(gm):
        if site.node in transformed:
            result.notes.append(f"{site.name}: runs under a torch.func transform (vmap, grad, jvp); left dense")
            continue
        weight = real_value.get(site.weight_node)
        if site.weight_node.op == "get_attr":
            weight = _attribute(gm, site.weight_node.target)
        if not isinstance(weight, torch.nn.Parameter) or fake_tensor_mode(weight) is not None:
            not_parameters += 1  # a weight computed in the graph, or an input: not a layer's parameter
            continue
        result.matched += 1
        targets = options.targets
        if targets is not None and not any(fnmatch.fnmatchcase(site.name, pattern) for pattern in targets):
            outside_targets += 1
            continue
        if weight.dim() != 2 or not weight.is_floating_point():
            result.notes.append(
                f"{site.name}: weight {tuple(weight.shape)} {weight.dtype} is not a float matrix; left dense"
            )
            continue
        dense = weight.detach().t() if site.transposed else weight.detach()
        out_features, in_features = dense.shape
        x_val = _meta_value(site.x)
        if not isinstance(x_val, torch.Tensor) or not isinstance(_meta_value(site.node), torch.Tensor):
            result.notes.append(f"{site.name}: no tensor metadata on the layer's input or output; left dense")
            continue
        if x_val.dtype != dense.dtype or x_val.device != dense.device:
            result.notes.append(f"{site.name}: input and weight differ in dtype or device (autocast?); left dense")
            continue
        if min(in_features, out_features) < options.min_features:
            result.notes.append(
                f"{site.name}: {in_features}->{out_features} is below min_features={options.min_features}; left dense"
            )
            continue
        rank = monarch_block_rank(in_features, out_features, options.nblocks)
        w1, w2, error = project(dense, options.nblocks, rank)
        dense_params, monarch_params = dense.numel(), w1.numel() + w2.numel()
        if monarch_params >= dense_params:
            result.notes.append(
                f"{site.name}: a Monarch layer with nblocks={options.nblocks} would not be smaller "
                f"({monarch_params} >= {dense_params} weights); left dense"
            )
            continue
        row = {
            "layer": site.name,
            "in_features": in_features,
            "out_features": out_features,
            "nblocks": options.nblocks,
            "rel_error": error,
            "weight_bytes_dense": dense_params * dense.element_size(),
            "weight_bytes_monarch": monarch_params * dense.element_size(),
            "weight_bytes_saved": (dense_params - monarch_params) * dense.element_size(),
            "flops_per_token_dense": 2 * dense_params,
            "flops_per_token_monarch": 2 * monarch_params,
            "rewritten": False,
        }
        if options.max_rel_error is not None and error > options.max_rel_error:
            result.notes.append(
                f"{site.name}: projection error {error:.3g} exceeds max_rel_error={options.max_rel_error:g}; left dense"
            )
            result.details.append(row)
            continue
        plans.append((site, w1, w2, row, weight, rank))
    if outside_targets:
        result.notes.append(f"{outside_targets} dense layer(s) outside targets {list(options.targets)} left dense")
    if not_parameters:
        result.notes.append(
            f"{not_parameters} linear call(s) whose weight is not a parameter seen at compile time (computed in the "
            "graph, a graph input, or fake example inputs) left dense"
        )
    opaque = _opaque_linears(gm)
    if opaque:
        result.matched += len(opaque)
        result.notes.append(
            f"{len(opaque)} call(s) of {', '.join(sorted(set(opaque)))} run their layers' linear weights inside "
            "one call (nn.TransformerEncoderLayer, nn.MultiheadAttention): left dense"
            + (
                "; torch.backends.mha.set_fastpath_enabled(False) before compiling turns off the fused fast path"
                if set(opaque) & set(_FAST_PATHS)
                else ""
            )
        )
    if not plans:
        return result

    measurement = _Measurement.plan(gm, ctx, result)
    recorded = _record_dense_run(gm, measurement, [site for site, *_ in plans], result) if measurement else None
    fake_mode = _fake_mode(gm)
    hooks = gm.meta.setdefault(BEFORE_CALL, [])
    replaced: dict[torch.fx.Node, torch.fx.Node] = {}  # a rewritten layer's node -> its stand-in
    for index, (site, w1, w2, row, weight, rank) in enumerate(plans):
        # A layer that reads another's output (Linear after Linear, B(A(x))) reads the
        # stand-in: the node it was found with is gone.
        site.x = replaced.get(site.x, site.x)
        if isinstance(site.bias, torch.fx.Node):
            site.bias = replaced.get(site.bias, site.bias)
        w1_buffer, w2_buffer, replaced[site.node] = _rewrite(gm, site, w1, w2, index, fake_mode)
        row["rewritten"] = True
        result.rewrites += 1
        result.details.append(row)
        if recorded is not None and site.node in recorded:
            row["output_rel_error"] = _output_error(*recorded[site.node], w1, w2, row["out_features"])
        position = placeholders.index(site.weight_node) if site.weight_node in placeholders else None
        hooks.append(_Reproject(position, weight, site.transposed, rank, w1_buffer, w2_buffer, row, result))
    gm.recompile()
    untracked = [row["layer"] for _, _, _, row, weight, _ in plans if weight.is_inference()]
    if untracked:
        result.notes.append(
            f"{len(untracked)} projected weight(s) are inference tensors (made under torch.inference_mode), which "
            "count no in-place writes: a weight changed in place after compile is not projected again (a "
            "replaced one is); compile again after changing them"
        )

    saved_bytes = sum(row["weight_bytes_saved"] for row in result.details if row["rewritten"])
    saved_flops = sum(
        row["flops_per_token_dense"] - row["flops_per_token_monarch"] for row in result.details if row["rewritten"]
    )
    for row in result.details:
        if row["rewritten"]:
            measured = row.get("output_rel_error")
            result.notes.append(
                f"{row['layer']}: Monarch nblocks={row['nblocks']}, weight rel. error {row['rel_error']:.3g}"
                + (f", output rel. error {measured:.3g}" if measured is not None else "")
                + f", weights {format_bytes(row['weight_bytes_dense'])} -> {format_bytes(row['weight_bytes_monarch'])}"
                f", FLOPs/token {row['flops_per_token_dense']} -> {row['flops_per_token_monarch']}"
            )
    result.notes.append(
        f"changes results: {result.rewrites} layer(s) approximated, {format_bytes(saved_bytes)} of weights and "
        f"{saved_flops} FLOPs per token replaced; the dense parameters stay in the model (graph inputs), so peak "
        "memory drops only where they are freed (memopt.nn.monarchize replaces the modules themselves)"
    )
    if recorded is not None:
        graph_error = _graph_output_error(gm, measurement, recorded)
        if graph_error is not None:
            result.details.append({"layer": "<graph outputs>", "output_rel_error": graph_error, "rewritten": True})
            result.notes.append(
                f"measured relative error of the graph outputs on the example inputs: {graph_error:.3g}"
            )
    return result


def _attribute(gm: torch.fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _fake_mode(gm: torch.fx.GraphModule) -> Any:
    for node in gm.graph.nodes:
        mode = fake_tensor_mode(_meta_value(node))
        if mode is not None:
            return mode
    return None


class _Reproject:
    """Keeps one rewritten layer's Monarch factors the projection of its current weight.

    The factors are buffers of the compiled graph, projected at compile time. A weight
    changed in place afterwards (``load_state_dict``, an EMA update, ``weight.mul_``), or
    replaced by another tensor that Dynamo's guards let through, would otherwise leave the
    compiled model computing with the old one, silently. Before each call (the backend
    runs every ``BEFORE_CALL`` hook on the call's inputs) this compares the weight the call
    passes with the one projected (identity, storage and version counter) and, if it
    changed, projects it again into the same buffers and updates the report's row."""

    def __init__(
        self,
        position: int | None,
        weight: torch.Tensor,
        transposed: bool,
        rank: int,
        w1: torch.Tensor,
        w2: torch.Tensor,
        row: dict[str, Any],
        result: PassResult,
    ) -> None:
        self.position = position
        self.weight = weakref.ref(weight)  # a get_attr weight (not a graph input)
        self.transposed, self.rank = transposed, rank
        self.w1, self.w2 = w1, w2
        self.row, self.result = row, result
        self.seen = self._key(weight)

    @staticmethod
    def _key(weight: torch.Tensor) -> tuple[int, int, int]:
        # Inference tensors (made under torch.inference_mode) have no version counter: only
        # a replaced tensor or storage shows there (the pass notes it).
        return id(weight), weight.data_ptr(), -1 if weight.is_inference() else weight._version

    def __call__(self, inputs: Sequence[Any]) -> None:
        weight = inputs[self.position] if self.position is not None else self.weight()
        if not isinstance(weight, torch.Tensor) or self._key(weight) == self.seen:
            return
        with torch.no_grad():
            dense = weight.detach().t() if self.transposed else weight.detach()
            w1, w2, error = project(dense, self.w1.shape[0], self.rank)
            self.w1.copy_(w1)
            self.w2.copy_(w2)
        self.seen = self._key(weight)
        first = not self.row.get("reprojections")
        self.row["reprojections"] = self.row.get("reprojections", 0) + 1
        self.row["rel_error"] = error
        # Measured on the old weight: so was the graph outputs' error.
        for row in [self.row, *(row for row in self.result.details if row.get("layer") == "<graph outputs>")]:
            row["output_rel_error"] = None
        if first:
            self.result.notes.append(
                f"{self.row['layer']}: weight changed after compile; projected again before the call "
                f"(weight rel. error now {error:.3g}; the row keeps the latest)"
            )


def _rewrite(
    gm: torch.fx.GraphModule, site: _Site, w1: torch.Tensor, w2: torch.Tensor, index: int, fake_mode: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.fx.Node]:
    """Replace ``site.node`` by ``[pad] -> monarch_matmul -> [slice] -> [+ bias] [-> contiguous]``;
    returns the two factor buffers and the node that now stands for the layer's output."""
    graph = gm.graph
    stem = re.sub(r"\W", "_", site.name)
    w1_name, w2_name = f"monarch_{index}_{stem}_w1", f"monarch_{index}_{stem}_w2"
    gm.register_buffer(w1_name, w1.contiguous())
    gm.register_buffer(w2_name, w2.contiguous())
    nblocks, _, in_block = w1.shape
    out_block = w2.shape[1]
    dense_val = _meta_value(site.node)
    out_features = dense_val.shape[-1]
    in_features = _meta_value(site.x).shape[-1]

    def fake(value: torch.Tensor) -> torch.Tensor:
        return fake_mode.from_tensor(value, static_shapes=True) if fake_mode is not None else value

    def emit(kind: str, target: Any, args: tuple, value: Any) -> torch.fx.Node:
        node = graph.get_attr(target) if kind == "get_attr" else graph.call_function(target, args)
        node.meta["val"] = value
        node.meta["example_value"] = value
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in site.node.meta:
                node.meta[key] = site.node.meta[key]
        return node

    with graph.inserting_before(site.node), fake_mode if fake_mode is not None else contextlib.nullcontext():
        w1_fake, w2_fake = fake(gm.get_buffer(w1_name)), fake(gm.get_buffer(w2_name))
        w1_node = emit("get_attr", w1_name, (), w1_fake)
        w2_node = emit("get_attr", w2_name, (), w2_fake)
        x_node, x_val = site.x, _meta_value(site.x)
        pad = nblocks * in_block - in_features
        if pad:
            x_val = F.pad(x_val, (0, pad))
            x_node = emit("call_function", F.pad, (x_node, (0, pad)), x_val)
        y_val = torch.ops.memopt.monarch_matmul.default(x_val, w1_fake, w2_fake)
        y_node = emit("call_function", torch.ops.memopt.monarch_matmul.default, (x_node, w1_node, w2_node), y_val)
        if nblocks * out_block != out_features:
            index_ = (Ellipsis, slice(None, out_features))
            y_val = y_val[index_]
            y_node = emit("call_function", operator.getitem, (y_node, index_), y_val)
        if site.bias is not None:
            bias_val = _meta_value(site.bias)
            y_val = y_val + bias_val
            y_node = emit("call_function", operator.add, (y_node, site.bias), y_val)
        if tuple(y_val.stride()) != tuple(dense_val.stride()):
            # Keep the replaced node's layout (contiguous, like linear's output): later nodes'
            # metadata assume it.
            y_val = y_val.contiguous()
            y_node = emit("call_function", torch.Tensor.contiguous, (y_node,), y_val)
    site.node.replace_all_uses_with(y_node)
    graph.erase_node(site.node)
    return gm.get_buffer(w1_name), gm.get_buffer(w2_name), y_node


class _Measurement:
    """Runs the graph on the example inputs for the error measurement, without side effects
    a user could see: the measurement runs the graph twice more than the user asked, so
    every graph input or attribute the graph writes in place (a buffer counter's ``add_``,
    an input's ``mul_``) is copied first, and the random number generators are restored
    after each run (a ``randn`` in the graph would otherwise shift the user's next draws)."""

    def __init__(self, inputs: list[Any], copied_inputs: set[int], copied_attrs: set[str]):
        self.inputs, self.copied_inputs, self.copied_attrs = inputs, copied_inputs, copied_attrs
        self.devices = sorted({value.device.index or 0 for value in inputs if _is_cuda_tensor(value)})

    @classmethod
    def plan(cls, gm: torch.fx.GraphModule, ctx: PassContext, result: PassResult) -> _Measurement | None:
        """``None`` (with a note) when the graph cannot be run safely on real inputs."""
        if any(fake_tensor_mode(value) is not None for value in ctx.example_inputs):
            result.notes.append("example inputs are fake tensors: the output error is not measured")
            return None
        inputs = _concrete(ctx.example_inputs)
        if inputs is None:
            result.notes.append("a symbolic size has no example value: the output error is not measured")
            return None
        nodes = list(gm.graph.nodes)
        written = value_storages(value for _, _, values in in_place_writes(nodes) for value in values)
        sources = [node for node in nodes if node.op in ("placeholder", "get_attr")] if written != set() else []
        storages = {node: value_storages([node]) for node in sources}
        if written is None or any(value is None for value in storages.values()):
            result.notes.append(
                "the graph writes in place to a tensor it cannot tell: the output error is not measured"
            )
            return None
        hit = {node for node in sources if storages[node] & written}
        placeholders = [node for node in nodes if node.op == "placeholder"]
        copied_inputs = {index for index, node in enumerate(placeholders) if node in hit}
        copied_attrs = {node.target for node in hit if node.op == "get_attr"}
        return cls(inputs, copied_inputs, copied_attrs)

    def run(self, interpreter: torch.fx.Interpreter) -> Any:
        copied_attrs = self.copied_attrs
        fetch_attr = interpreter.fetch_attr

        def fetch_copy(target: str) -> Any:
            value = fetch_attr(target)
            return value.clone() if target in copied_attrs and isinstance(value, torch.Tensor) else value

        interpreter.fetch_attr = fetch_copy
        inputs = [
            value.clone() if index in self.copied_inputs and isinstance(value, torch.Tensor) else value
            for index, value in enumerate(self.inputs)
        ]
        with torch.random.fork_rng(devices=self.devices), torch.no_grad():
            return interpreter.run(*inputs)


def _is_cuda_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_cuda


def _record_dense_run(
    gm: torch.fx.GraphModule, measurement: _Measurement, sites: list[_Site], result: PassResult
) -> dict[Any, Any] | None:
    """Run the graph once (before the rewrite) on the example inputs, keeping each site's input
    and output and the graph outputs; ``None`` (with a note) if that fails."""
    wanted = {site.node for site in sites}
    operands = {site.node: (site.x, site.bias) for site in sites}
    recorded: dict[Any, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            value = super().run_node(node)
            if node in wanted:
                x, bias = operands[node]
                recorded[node] = (self.env[x], self.env[bias] if isinstance(bias, torch.fx.Node) else bias, value)
            return value

    try:
        recorded["<outputs>"] = measurement.run(Recorder(gm))
    except Exception as error:  # measuring is best effort; the rewrite does not depend on it
        result.notes.append(f"could not run the graph to measure errors ({type(error).__name__}: {error})")
        return None
    return recorded


def _concrete(example_inputs: Sequence[Any]) -> list[Any] | None:
    """The example inputs with symbolic sizes (dynamic shapes: ``SymInt`` inputs) replaced by
    their example values. Run on the symbols themselves, an op that needs a concrete size
    would add a guard to the graph's shape environment, specializing it to this one size (a
    recompile per length, as in KV-cache generation). ``None`` when a size has no value."""
    if any(isinstance(value, (torch.SymFloat, torch.SymBool)) for value in example_inputs):
        return None
    try:
        return [size_hint(value) if isinstance(value, torch.SymInt) else value for value in example_inputs]
    except ValueError:
        return None


def _output_error(
    x: torch.Tensor, bias: Any, y_dense: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, out_features: int
) -> float:
    """Relative error of one rewritten layer's output on the input it saw in the dense run."""
    with torch.no_grad():
        pad = w1.shape[0] * w1.shape[2] - x.shape[-1]
        y = torch.ops.memopt.monarch_matmul(F.pad(x, (0, pad)) if pad else x, w1, w2)[..., :out_features]
        if bias is not None:
            y = y + bias
        return _relative(y.float(), y_dense.float())


def _graph_output_error(gm: torch.fx.GraphModule, measurement: _Measurement, recorded: dict[Any, Any]) -> float | None:
    try:
        after = measurement.run(torch.fx.Interpreter(gm))
    except Exception:
        return None
    before = recorded["<outputs>"]
    errors = [
        _relative(a.float(), b.float())
        for a, b in zip(torch.utils._pytree.tree_leaves(after), torch.utils._pytree.tree_leaves(before))
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point()
    ]
    return max(errors) if errors else None


def _relative(approx: torch.Tensor, exact: torch.Tensor) -> float:
    norm = exact.norm()
    return float((approx - exact).norm() / norm) if norm > 0 else float((approx - exact).norm())


MONARCH = GraphPass(
    name="monarch",
    config_field="monarch",
    run=run,
    changes_results=True,
    applies_to="inference",
)
