"""Reversible chains traced into the partitioned graphs, so that the lowering fuses them.

The ``reversible`` pass replaces a chain by one ``memopt::reversible_chain`` node, whose
autograd is ``memopt::reversible_chain_backward``. As two opaque nodes in the joint graph
they make the partition come out right whatever the partitioner decides elsewhere: the
forward graph keeps the chain's two final outputs and nothing per block, and the backward
graph rebuilds and recomputes everything else.

Run as opaque ops, though, the chain goes step by step in Python: each step's ops one by
one, one autograd-engine call per step in the backward. Where blocks are small (a GPU's
launch-bound blocks, measured on a CPU by blocks too small for the ops' own work to count)
that host work dominates: 2.4x eager's training step on such a RevNet, 1.6-3.2x on an
H100. So once the partition is fixed, each node is replaced by the aten graph of what it
computes (:func:`memopt.ops.reversible.chain_op_forward` and ``chain_op_backward``,
traced on the nodes' fake values with the lowering's decompositions): the forward's
steps, and the backward's rebuilds, recomputations and their gradients, become ordinary
nodes that Inductor fuses and schedules with the rest of the graph, and that CUDA graphs
can replay. What the forward graph saves is unchanged: the partition was made before.

Symbolic sizes (dynamic shapes) are traced too: the sizes the op takes become inputs of
the trace, and its output sizes must be provably those of the op. A chain stays an op when
tracing cannot reproduce it: steps that draw random numbers (the recomputation must replay
the forward's RNG state, which only the op-by-op path does: Inductor draws its random
numbers differently in the forward and the backward graph), or a trace that fails or does
not give the op's output metadata. Each such chain gets a note in
``Report.partition_notes``; under ``strict=True`` a failure raises.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from memopt._torch_compat import inductor_decompositions, known_equal, trace_functional
from memopt.config import Config
from memopt.ops import reversible as ops
from memopt.report import Report


def inline_reversible_chains(
    forward: torch.fx.GraphModule,
    backward: torch.fx.GraphModule,
    config: Config,
    report: Report | None = None,
) -> None:
    """Replace every reversible-chain op node of a partitioned pair of graphs, in place, by
    the aten graph it runs (see the module docstring); chains that cannot be are noted."""
    if not config.reversible_inline:
        return
    inlined: dict[str, list[str]] = {}
    notes: dict[str, str] = {}
    for gm, target, trace in (
        (forward, torch.ops.memopt.reversible_chain.default, _forward_trace),
        (backward, torch.ops.memopt.reversible_chain_backward.default, _backward_trace),
    ):
        changed = False
        for node in list(gm.graph.find_nodes(op="call_function", target=target)):
            key = node.args[0]
            chain = ops._chain(key)
            reason = _why_not(chain, node)
            if reason is None:
                try:
                    arguments, fn = trace(chain, node)
                    graph = trace_functional(fn, [argument.meta["val"] for argument in arguments], _decompositions())
                    reason = _splice(gm, node, graph, arguments)
                except Exception as error:
                    if config.strict:
                        raise
                    first_line = str(error).splitlines()[0] if str(error) else ""
                    reason = f"tracing failed ({type(error).__name__}: {first_line})"
            if reason is None:
                inlined.setdefault(key, []).append("forward" if gm is forward else "backward")
                changed = True
            else:
                notes.setdefault(key, reason)
        if changed:
            gm.graph.lint()
            gm.recompile()
    if report is not None:
        _record(report, inlined, notes)


def _why_not(chain: ops.Chain, node: torch.fx.Node) -> str | None:
    if chain.random_steps:
        return (
            f"{chain.random_steps} random step(s): their recomputation replays the forward's RNG "
            "state, which only the op-by-op path does"
        )
    for argument in node.all_input_nodes:
        if not isinstance(argument.meta.get("val"), (torch.Tensor, torch.SymInt)):
            return f"{argument.name} has no tensor or size metadata"
    return None


def _decompositions() -> dict[Any, Callable[..., Any]]:
    # The table AOTAutograd traced the rest of the graph with, under either lowering.
    return inductor_decompositions()


def _forward_trace(chain: ops.Chain, node: torch.fx.Node) -> tuple[list[torch.fx.Node], Callable[..., Any]]:
    _key, x1, x2, params, consts, sizes = node.args
    num_params, num_tensors = len(params), 2 + len(params) + len(consts)
    size_nodes, with_sizes = _size_inputs(sizes)

    def forward(*inputs: Any) -> list[torch.Tensor]:
        x1, x2, *tensors = inputs[:num_tensors]
        return ops.chain_op_forward(
            chain, x1, x2, tensors[:num_params], tensors[num_params:], with_sizes(inputs[num_tensors:])
        )

    return [x1, x2, *params, *consts, *size_nodes], forward


def _backward_trace(chain: ops.Chain, node: torch.fx.Node) -> tuple[list[torch.fx.Node], Callable[..., Any]]:
    _key, stream1, stream2, grad1, grad2, rng, params, kept_consts, sizes = node.args
    num_params, num_tensors = len(params), 5 + len(params) + len(kept_consts)
    size_nodes, with_sizes = _size_inputs(sizes)

    def backward(*inputs: Any) -> list[torch.Tensor]:
        stream1, stream2, grad1, grad2, rng, *rest = inputs[:num_tensors]
        return ops.chain_op_backward(
            chain, stream1, stream2, grad1, grad2, rng, rest[:num_params], rest[num_params:],
            with_sizes(inputs[num_tensors:]),
        )

    return [stream1, stream2, grad1, grad2, rng, *params, *kept_consts, *size_nodes], backward


def _size_inputs(sizes: Sequence[Any]) -> tuple[list[torch.fx.Node], Callable[[Sequence[Any]], list[Any]]]:
    """The op's size arguments that are graph values (symbolic sizes), which become inputs of
    the trace, and how to put the traced values back among the constant ones."""
    size_nodes = [size for size in sizes if isinstance(size, torch.fx.Node)]

    def with_sizes(traced: Sequence[Any]) -> list[Any]:
        values = iter(traced)
        return [next(values) if isinstance(size, torch.fx.Node) else size for size in sizes]

    return size_nodes, with_sizes


def _splice(
    gm: torch.fx.GraphModule, node: torch.fx.Node, graph: torch.fx.GraphModule, arguments: Sequence[torch.fx.Node]
) -> str | None:
    """Put ``graph``'s nodes in place of ``node`` (whose users all take one output by index),
    or return why not, leaving ``gm`` untouched."""
    placeholders = graph.graph.find_nodes(op="placeholder")
    output = graph.graph.find_nodes(op="output")[0]
    results = output.args[0]
    users = list(node.users)
    for user in users:
        if user.target is not operator.getitem or not isinstance(user.args[1], int):
            return f"{user.name} uses the op's whole output"
        index = user.args[1]
        if not 0 <= index < len(results) or not isinstance(results[index], torch.fx.Node):
            return f"the trace has no output {index}"
        difference = _layout_difference(results[index].meta.get("val"), user.meta.get("val"))
        if difference:
            return f"output {index} of the trace {difference}"
    if len(placeholders) != len(arguments):
        return f"the trace takes {len(placeholders)} inputs, the op {len(arguments)}"

    env: dict[torch.fx.Node, torch.fx.Node] = dict(zip(placeholders, arguments))
    added: list[torch.fx.Node] = []
    try:
        with gm.graph.inserting_before(node):
            for traced in graph.graph.nodes:
                if traced.op in ("placeholder", "output"):
                    continue
                if traced.op == "get_attr":  # a constant the trace made (a small tensor)
                    name = _free_attribute_name(gm, traced.target)
                    setattr(gm, name, getattr(graph, traced.target))
                    copied = gm.graph.get_attr(name)
                else:
                    copied = gm.graph.node_copy(traced, lambda value: env[value])
                copied.meta = dict(traced.meta)
                env[traced] = copied
                added.append(copied)
    except Exception:
        for copied in reversed(added):  # leave the graph as it was: the op still runs
            gm.graph.erase_node(copied)
        raise
    for user in users:
        user.replace_all_uses_with(env[results[user.args[1]]])
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    # The trace keeps values nothing reads (BatchNorm's unused inverse std, say): drop them.
    for copied in reversed(added):
        if not copied.users and not copied.is_impure():
            gm.graph.erase_node(copied)
    return None


def _layout_difference(traced: Any, expected: Any) -> str | None:
    """How a traced output differs from the op's (``None``: it does not, provably)."""
    if not isinstance(traced, torch.Tensor) or not isinstance(expected, torch.Tensor):
        return "is not a tensor"
    if traced.dtype != expected.dtype or traced.device != expected.device:
        return f"is {traced.dtype} on {traced.device} where the op's is {expected.dtype} on {expected.device}"
    if not known_equal(traced.shape, expected.shape):
        return f"has shape {list(traced.shape)} where the op's has {list(expected.shape)} (not provably equal)"
    if not known_equal(traced.stride(), expected.stride()) and not known_equal([traced.numel()], [1]):
        return f"has strides {traced.stride()} where the op's has {expected.stride()}"
    return None


def _free_attribute_name(gm: torch.fx.GraphModule, base: str) -> str:
    name = f"_reversible_{base}"
    suffix = 0
    while hasattr(gm, name):
        suffix += 1
        name = f"_reversible_{base}_{suffix}"
    return name


def _record(report: Report, inlined: dict[str, list[str]], notes: dict[str, str]) -> None:
    for key, reason in notes.items():
        where = "" if key not in inlined else f" (its {' and '.join(inlined[key])} graph traced)"
        report.partition_notes.append(f"reversible chain {key} runs as an op, step by step{where}: {reason}")
    for result in report.passes:
        if result.name != "reversible":
            continue
        for row in result.details:
            if "key" in row:
                row["inlined"] = row["key"] in inlined and row["key"] not in notes
