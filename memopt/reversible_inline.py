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

A chain stays an op when tracing cannot reproduce it: steps that draw random numbers (the
recomputation must replay the forward's RNG state, which only the op-by-op path does:
Inductor draws its random numbers differently in the forward and the backward graph),
symbolic sizes (dynamic shapes), or a trace that fails or does not give the op's output
metadata. Each such chain gets a note in ``Report.partition_notes``; under ``strict=True``
a failure raises.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from memopt._torch_compat import inductor_decompositions, trace_functional
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
    if node.args[-1]:
        return "it reads symbolic sizes (dynamic shapes)"
    for argument in node.all_input_nodes:
        value = argument.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return f"{argument.name} has no tensor metadata"
        if any(isinstance(size, torch.SymInt) for size in (*value.shape, *value.stride())):
            return f"{argument.name} has symbolic sizes (dynamic shapes)"
    return None


def _decompositions() -> dict[Any, Callable[..., Any]]:
    # The table AOTAutograd traced the rest of the graph with, under either lowering.
    return inductor_decompositions()


def _forward_trace(chain: ops.Chain, node: torch.fx.Node) -> tuple[list[torch.fx.Node], Callable[..., Any]]:
    _key, x1, x2, params, consts, _sizes = node.args
    num_params = len(params)

    def forward(x1: torch.Tensor, x2: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return ops.chain_op_forward(chain, x1, x2, tensors[:num_params], tensors[num_params:], ())

    return [x1, x2, *params, *consts], forward


def _backward_trace(chain: ops.Chain, node: torch.fx.Node) -> tuple[list[torch.fx.Node], Callable[..., Any]]:
    _key, stream1, stream2, grad1, grad2, rng, params, kept_consts, _sizes = node.args
    num_params = len(params)

    def backward(*tensors: torch.Tensor) -> list[torch.Tensor]:
        stream1, stream2, grad1, grad2, rng, *rest = tensors
        return ops.chain_op_backward(
            chain, stream1, stream2, grad1, grad2, rng, rest[:num_params], rest[num_params:], ()
        )

    return [stream1, stream2, grad1, grad2, rng, *params, *kept_consts], backward


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
        if not _same_layout(results[index].meta.get("val"), user.meta.get("val")):
            return f"output {index} of the trace differs in shape, stride, dtype or device from the op's"
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


def _same_layout(traced: Any, expected: Any) -> bool:
    if not isinstance(traced, torch.Tensor) or not isinstance(expected, torch.Tensor):
        return False
    return (
        traced.shape == expected.shape
        and traced.dtype == expected.dtype
        and traced.device == expected.device
        and (traced.numel() <= 1 or traced.stride() == expected.stride())
    )


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
