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

Random ops replay in the traced graphs too. The pass marks the steps that draw random
numbers, and in their traces each random op is made one the backward can draw again:

* Under Inductor on a GPU (and on a CPU for small ops, see :func:`_seeded`),
  ``rand``/``randn`` (what decomposed dropout draws) become Inductor's own random prims on
  one seeds tensor per device, in graph order, as it compiles dropout elsewhere: generated
  inside the fused kernels, replayed from the saved seeds (8 bytes per op), with no state on
  the host (which CUDA graphs require). Where the chain holds all of the graph's random ops
  and all are drawn this way, its masks are bit for bit those Inductor draws for the same
  model compiled without the pass.
* Any other random op (an attention kernel's dropout; a large one on a CPU, where
  Inductor's per-element random numbers cost more than a state; under the eager lowering or
  ``fallback_random``) runs through
  AOTAutograd's RNG operators: ``run_and_save_rng_state`` in the forward, whose generator
  state becomes a saved tensor, and ``run_with_rng_state`` in the recomputation. Inductor
  runs those as fallback kernels; the masks are those the op-by-op lowering of the same
  graphs draws (with ``fallback_random``, which leaves dropout undecomposed, eager's).

Either way the gradients are exactly those of the masks the forward drew.

Symbolic sizes (dynamic shapes) are traced too: the sizes the op takes become inputs of
the trace, and its outputs must provably have the op's sizes and layout. A chain stays an
op when a trace fails or does not reproduce the op's output metadata, with a note in
``Report.partition_notes``; under ``strict=True`` a failure raises.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from memopt._torch_compat import (
    detect_fake_mode,
    inductor_decompositions,
    inductor_random_prims,
    known_contiguous,
    known_equal,
    rng_state_operators,
    trace_functional,
)
from memopt.config import Config
from memopt.estimate import storage_nbytes
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
        if report is not None:
            _record(report, {}, {})  # every row: inlined False
        return
    halves: dict[str, dict[str, torch.fx.Node]] = {}
    for half, gm, target in (
        ("forward", forward, torch.ops.memopt.reversible_chain.default),
        ("backward", backward, torch.ops.memopt.reversible_chain_backward.default),
    ):
        for node in gm.graph.find_nodes(op="call_function", target=target):
            halves.setdefault(node.args[0], {})[half] = node
    # Only Inductor lowers its random prims as functions of the seed (run eagerly, they draw
    # from the generator); which random ops take them is _fusable's call.
    fused = inductor_random_prims() if config.lowering == "inductor" else None
    inlined: dict[str, int] = {}
    notes: dict[str, str] = {}
    for key, nodes in halves.items():
        result = _inline_or_reason(key, nodes, {"forward": forward, "backward": backward}, fused, config.strict)
        if isinstance(result, str):
            notes[key] = result
        else:
            inlined[key] = result
    _inline_nested(forward, backward, config, fused, set(halves), inlined, notes)
    if inlined:
        for gm in (forward, backward):
            gm.graph.lint()
            gm.recompile()
    if report is not None:
        _record(report, inlined, notes)


def _inline_nested(
    forward: torch.fx.GraphModule,
    backward: torch.fx.GraphModule,
    config: Config,
    fused: tuple[Any, Any, Any] | None,
    outer: set[str],
    inlined: dict[str, int],
    notes: dict[str, str],
) -> None:
    """Trace in the chains nested in a step of another (``passes/reversible.py`` makes them
    ops inside the outer step), which the outer chain's traces hold as op nodes: in the
    forward graph the inner forward, in the backward graph the inner forward (the
    recomputation) and its backward. Each half is traced on its own, in place; deeper nests
    come up as their outer chain is traced in. An inner chain with random steps stays an
    op: the outer traces run its forward through the RNG-state operators, which replay its
    draws in the recomputation (:func:`_is_random`), and its backward restores the states
    its forward returned. ``outer``: the keys of the chains the partition placed (done, or
    left as ops)."""
    targets = (
        ("forward", torch.ops.memopt.reversible_chain.default),
        ("backward", torch.ops.memopt.reversible_chain_backward.default),
    )
    failed: set[torch.fx.Node] = set()
    while True:
        found = [
            (gm, half, node)
            for gm in (forward, backward)
            for half, target in targets
            for node in gm.graph.find_nodes(op="call_function", target=target)
            if node not in failed and node.args[0] not in outer
        ]
        if not found:
            return
        for gm, half, node in found:
            key = node.args[0]
            if ops._chain(key).random_steps:
                failed.add(node)
                notes[key] = "nested, with random steps: the outer step's recomputation replays its draws through it"
                continue
            result = _inline_or_reason(key, {half: node}, {half: gm}, fused, config.strict)
            if isinstance(result, str):
                failed.add(node)
                notes[key] = result
            else:
                inlined.setdefault(key, 0)


def _inline_or_reason(
    key: str,
    nodes: dict[str, torch.fx.Node],
    graphs: dict[str, torch.fx.GraphModule],
    fused: tuple[Any, Any, Any] | None,
    strict: bool,
) -> str | int:
    """:func:`_inline_chain`, with a failed trace turned into the reason (raised under
    ``strict``)."""
    try:
        return _inline_chain(ops._chain(key), nodes, graphs, fused)
    except Exception as error:
        if strict:
            raise
        first_line = str(error).splitlines()[0] if str(error) else ""
        return f"tracing failed ({type(error).__name__}: {first_line})"


def _inline_chain(
    chain: ops.Chain,
    nodes: dict[str, torch.fx.Node],
    graphs: dict[str, torch.fx.GraphModule],
    fused: tuple[Any, Any, Any] | None,
) -> str | int:
    """Trace both halves of one chain and splice them in, or neither. Returns why not, or by
    how many bytes what the forward saves for the chain's random ops changed (the op saved
    one RNG state per random step; the traced graphs save a seeds tensor, or one state per
    random op)."""
    for node in nodes.values():
        for argument in node.all_input_nodes:
            if not isinstance(argument.meta.get("val"), (torch.Tensor, torch.SymInt)):
                return f"{argument.name} has no tensor or size metadata"
    random = chain.random_steps > 0
    if random and "forward" not in nodes:
        return "its backward has no forward to take the random ops' states from"
    traceable = _traceable(chain)
    traced: dict[str, tuple[torch.fx.GraphModule, list[Any]]] = {}
    draws: dict[tuple[int, int], _Draw] = {}
    saved: list[torch.fx.Node] = []
    for half, trace in (("forward", _forward_trace), ("backward", _backward_trace)):
        if half not in nodes:
            continue
        arguments, fn = trace(traceable, nodes[half])
        values = [argument.meta["val"] for argument in arguments]
        if half == "backward" and random:  # what the forward saved: trailing inputs fn ignores
            values += [value.meta["val"] for value in saved]
        graph = trace_functional(fn, values, _decompositions())
        random_ops = _take_boundaries(graph, half, chain.deterministic_ops)
        if half == "forward" and random:
            draws, saved = _save_randomness(graph, random_ops, chain.rng_bytes, detect_fake_mode(values), fused)
        elif random:
            reason = _replay_randomness(graph, random_ops, draws, len(saved), detect_fake_mode(values), fused)
            if reason:
                return reason
        # The forward's RNG-state output is replaced below (see _save_randomness).
        reason = _output_difference(nodes[half], graph, skip=(2,) if half == "forward" and random else ())
        if reason:
            return reason
        traced[half] = (graph, arguments)

    saved_rng = nodes["backward"].args[5] if random and "backward" in nodes else None
    if saved_rng is not None:
        reason = _why_states_cannot_be_saved(nodes["forward"], saved_rng, graphs)
        if reason:
            return reason
        # The op's one saved tensor (its per-step states) becomes what _save_randomness
        # saves: forward outputs and backward inputs alike, in its place. AOTAutograd counts
        # what the forward saves from the graphs the partitioner returns, as for its own RNG
        # states.
        backward_graph = graphs["backward"].graph
        with backward_graph.inserting_before(saved_rng):
            for number, value in enumerate(saved):
                placeholder = backward_graph.placeholder(f"{saved_rng.name}_saved{number}")
                placeholder.meta["val"] = value.meta["val"]
                traced["backward"][1].append(placeholder)
    spliced = {
        half: _splice(graphs[half], nodes[half], graph, arguments, keep=saved if half == "forward" else ())
        for half, (graph, arguments) in traced.items()
    }
    if saved_rng is None:
        return 0
    output = graphs["forward"].graph.find_nodes(op="output")[0]
    empty_rng = spliced["forward"][_graph_output(traced["forward"][0])[2]]
    results = []
    for value in output.args[0]:
        results.extend([spliced["forward"][each] for each in saved] if value is empty_rng else [value])
    output.args = (results,)
    for gm, node in ((graphs["forward"], empty_rng), (graphs["backward"], saved_rng)):
        if not node.users:
            gm.graph.erase_node(node)
    return sum(storage_nbytes(value.meta["val"]) for value in saved) - storage_nbytes(saved_rng.meta["val"])


def _graph_output(graph: torch.fx.GraphModule) -> list[Any]:
    return list(graph.graph.find_nodes(op="output")[0].args[0])


def _why_states_cannot_be_saved(
    forward_node: torch.fx.Node, saved_rng: Any, graphs: dict[str, torch.fx.GraphModule]
) -> str | None:
    """The op's RNG-state output must go straight from the forward's outputs to one backward
    input read by the chain's backward alone, for what :func:`_save_randomness` saves to take
    its place."""
    output = graphs["forward"].graph.find_nodes(op="output")[0]
    users = [user for user in forward_node.users if user.args[1] == 2]
    if len(users) != 1 or list(users[0].users) != [output] or list(output.args[0]).count(users[0]) != 1:
        return "its RNG states are not saved for the backward as the op returns them"
    if not isinstance(saved_rng, torch.fx.Node) or saved_rng.op != "placeholder" or len(saved_rng.users) != 1:
        return "its backward does not read the RNG states from a graph input of its own"
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
    """The traced function ignores inputs past the op's own arguments: the seeds or RNG states
    :func:`_replay_randomness` wires in."""
    _key, stream1, stream2, grad1, grad2, rng, params, kept_consts, sizes, side_grads = node.args
    num_params, num_kept = len(params), len(kept_consts)
    num_tensors = 5 + num_params + num_kept + len(side_grads)
    size_nodes, with_sizes = _size_inputs(sizes)
    num_sizes = len(size_nodes)

    def backward(*inputs: Any) -> list[torch.Tensor]:
        stream1, stream2, grad1, grad2, rng, *rest = inputs[:num_tensors]
        params, kept, side_grads = rest[:num_params], rest[num_params:][:num_kept], rest[num_params + num_kept :]
        return ops.chain_op_backward(
            chain, stream1, stream2, grad1, grad2, rng, params, kept,
            with_sizes(inputs[num_tensors : num_tensors + num_sizes]), side_grads,
        )

    return [stream1, stream2, grad1, grad2, rng, *params, *kept_consts, *side_grads, *size_nodes], backward


def _size_inputs(sizes: Sequence[Any]) -> tuple[list[torch.fx.Node], Callable[[Sequence[Any]], list[Any]]]:
    """The op's size arguments that are graph values (symbolic sizes), which become inputs of
    the trace, and how to put the traced values back among the constant ones."""
    size_nodes = [size for size in sizes if isinstance(size, torch.fx.Node)]

    def with_sizes(traced: Sequence[Any]) -> list[Any]:
        values = iter(traced)
        return [next(values) if isinstance(size, torch.fx.Node) else size for size in sizes]

    return size_nodes, with_sizes


def _traceable(chain: ops.Chain) -> ops.Chain:
    """``chain`` as traced: random steps marked with boundaries (:func:`_take_boundaries`)
    and no longer random, so that neither the forward records RNG states nor the backward
    restores them (Python-side work a trace cannot hold): the traced graphs save and replay
    each random op's seed or state instead (:func:`_save_randomness`)."""
    if not chain.random_steps:
        return chain
    steps = [
        dataclasses.replace(step, fn=_bounded(step.fn, number), random=False) if step.random else step
        for number, step in enumerate(chain.steps)
    ]
    return dataclasses.replace(chain, steps=steps)


def _bounded(fn: ops.StepFn, number: int) -> ops.StepFn:
    def bounded(x, params, consts, sizes):
        torch.ops.memopt.reversible_trace_boundary(number)
        h = fn(x, params, consts, sizes)
        torch.ops.memopt.reversible_trace_boundary(-1)
        return h

    return bounded


def _take_boundaries(
    graph: torch.fx.GraphModule, half: str, deterministic: tuple[str, ...] = ()
) -> dict[int, list[torch.fx.Node]]:
    """The random ops of a traced chain's steps (the forward's, or the backward's
    recomputations), by step, in order; the boundary markers are removed. Outside the steps
    the backward computes gradients, which are not recomputations and need no replay.
    ``deterministic`` names the custom ops the user declared free of draws, as the pass
    counted them."""
    boundary = torch.ops.memopt.reversible_trace_boundary.default
    step = None
    random_ops: dict[int, list[torch.fx.Node]] = {}
    for node in list(graph.graph.nodes):
        if node.target is boundary:
            step = node.args[0] if node.args[0] >= 0 else None
            graph.graph.erase_node(node)
        elif step is not None and _is_random(node, deterministic):
            random_ops.setdefault(step, []).append(node)
        elif half == "forward" and _is_random(node, deterministic):
            raise RuntimeError(f"random op {node.target} outside the steps the pass found random")
    return random_ops


def _is_random(node: torch.fx.Node, deterministic: tuple[str, ...] = ()) -> bool:
    """Whether ``node`` may draw from the generator (:func:`memopt.ops.reversible.may_draw_random`),
    except attention with ``dropout_p=0`` (its kernels carry the tag whatever ``dropout_p``)
    and the attention backward kernels, which rebuild the forward's mask from the seeds it
    returned."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if ops.chain_draws_random(node):  # a nested chain with random steps, run as an op
        return True
    if not ops.may_draw_random(target, deterministic) or target._schema.name.endswith("_backward"):
        return False
    for index, argument in enumerate(target._schema.arguments):
        if argument.name == "dropout_p":
            if index < len(node.args):
                return node.args[index] != 0
            return node.kwargs.get("dropout_p", argument.default_value) != 0
    return True


@dataclasses.dataclass(frozen=True)
class _Draw:
    """How the backward draws a forward random op's numbers again: from the forward's saved
    tensor number ``saved``, a seeds tensor at index ``seed``, or (``seed`` ``None``) an RNG
    state."""

    target: Any
    saved: int
    seed: int | None = None


def _save_randomness(
    graph: torch.fx.GraphModule,
    random_ops: dict[int, list[torch.fx.Node]],
    rng_bytes: int,
    fake_mode: Any,
    fused: tuple[Any, Any, Any] | None,
) -> tuple[dict[tuple[int, int], _Draw], list[torch.fx.Node]]:
    """In a traced forward, make each random op one the backward can replay. Returns how, by
    (step, position in the step), and the nodes the forward must save for it.

    With ``fused`` (Inductor's random prims), ``rand``/``randn`` on a GPU (:func:`_fusable`)
    draw from one seeds tensor per device, in graph order, as Inductor's own graphs do: fused
    into their consumers' kernels, and saving 8 bytes per op. Any other random op (an
    attention kernel's dropout, a custom op, any random op on a CPU or under the eager
    lowering) runs through ``run_and_save_rng_state``, which saves the generator's state
    (5 KiB on a CPU) and runs the op as a fallback kernel."""
    g = graph.graph
    in_order = [
        ((step, position), node) for step in sorted(random_ops) for position, node in enumerate(random_ops[step])
    ]
    draws: dict[tuple[int, int], _Draw] = {}
    saved: list[torch.fx.Node] = []
    by_device: dict[torch.device, list[tuple[tuple[int, int], torch.fx.Node]]] = {}
    for row, node in in_order:
        if fused is not None and _fusable(node):
            by_device.setdefault(node.meta["val"].device, []).append((row, node))
    for device, entries in by_device.items():
        with g.inserting_before(entries[0][1]):
            seeds = g.call_function(fused[0], (len(entries), device))
        with fake_mode:
            seeds.meta["val"] = torch.empty(len(entries), dtype=torch.int64, device=device)
        for index, (row, node) in enumerate(entries):
            draws[row] = _Draw(node.target, len(saved), index)
            _draw_from_seed(g, node, seeds, index, fused, fake_mode)
        saved.append(seeds)

    run_and_save_rng_state, _ = rng_state_operators()
    for row, node in in_order:
        if row in draws:
            continue
        with fake_mode:  # one per state: the Report counts saved bytes by storage
            state_value = torch.empty(rng_bytes, dtype=torch.uint8)
        with g.inserting_before(node):
            pair = g.call_function(run_and_save_rng_state, (node.target, *node.args), dict(node.kwargs))
            state = g.call_function(operator.getitem, (pair, 0))
            value = g.call_function(operator.getitem, (pair, 1))
        pair.meta["val"] = (state_value, node.meta["val"])
        state.meta["val"] = state_value
        value.meta = dict(node.meta)
        node.replace_all_uses_with(value)
        g.erase_node(node)
        draws[row] = _Draw(node.target, len(saved))
        saved.append(state)
    return draws, saved


def _replay_randomness(
    graph: torch.fx.GraphModule,
    random_ops: dict[int, list[torch.fx.Node]],
    draws: dict[tuple[int, int], _Draw],
    num_saved: int,
    fake_mode: Any,
    fused: tuple[Any, Any, Any] | None,
) -> str | None:
    """In a traced backward, whose last ``num_saved`` inputs are what the forward saved,
    draw each random op of the recomputation as its forward counterpart drew
    (:func:`_save_randomness`)."""
    found = {(step, position): node for step, nodes in random_ops.items() for position, node in enumerate(nodes)}
    if set(found) != set(draws):
        return f"the recomputation runs {len(found)} random ops where the forward ran {len(draws)}"
    if not found:
        return None
    for row, node in found.items():
        if node.target is not draws[row].target:
            return f"the recomputation runs {node.target} where the forward ran {draws[row].target}"
    _, run_with_rng_state = rng_state_operators()
    g = graph.graph
    inputs = g.find_nodes(op="placeholder")[-num_saved:]
    for row, node in found.items():
        draw = draws[row]
        if draw.seed is not None:
            _draw_from_seed(g, node, inputs[draw.saved], draw.seed, fused, fake_mode)
            continue
        with g.inserting_before(node):
            arguments = (inputs[draw.saved], node.target, *node.args)
            value = g.call_function(run_with_rng_state, arguments, dict(node.kwargs))
        value.meta = dict(node.meta)
        node.replace_all_uses_with(value)
        g.erase_node(node)
    return None


_FUSABLE_RANDOM = {torch.ops.aten.rand.default: "rand", torch.ops.aten.randn.default: "randn"}

# Devices whose random numbers come from Inductor's seeds. Its Triton kernels generate them
# in registers (Philox), fused into their consumers, and saved seeds keep the host out of
# the replay (CUDA graphs).
_SEEDED_DEVICES = frozenset({"cuda", "xpu"})

# A CPU draws from seeds only ops this small. Inductor's C++ kernels draw seeded numbers one
# element at a time (``normalized_rand_cpu``, about 11 ns each on the 2-core benchmark VM),
# while a generator state costs about 100 us per draw whatever its size (the RNG-state
# operators run as Python-level fallbacks, saving or restoring 5056 bytes). Measured on
# RevNet-style chains with dropout 0.1 in every branch (benchmarks/results/
# reversible-2026-11-27-cpu.md; rerun with ``benchmarks/reversible.py --draw-sweep``): seeds
# were faster up to 2048 elements per op (0.82-1.25x eager against 1.72-2.31x from states),
# about even at 8192 (1.19-1.21x against 1.18-1.54x) and slower from 16384 (1.11-1.63x
# against 0.83-1.32x). Sizes that are symbolic (dynamic shapes) keep states.
_CPU_SEEDS_MAX_NUMEL = 8192


def _seeded(value: torch.Tensor) -> bool:
    """Whether a random draw into ``value`` should come from Inductor's seeds: on a device
    of :data:`_SEEDED_DEVICES`, or on a CPU up to :data:`_CPU_SEEDS_MAX_NUMEL` elements."""
    if value.device.type in _SEEDED_DEVICES:
        return True
    numel = value.numel()
    return value.device.type == "cpu" and isinstance(numel, int) and numel <= _CPU_SEEDS_MAX_NUMEL


def _fusable(node: torch.fx.Node) -> bool:
    """Whether Inductor's random prim should stand in for ``node``: what decomposed dropout
    draws (``rand``), on the default generator, into a plain strided tensor that
    :func:`_seeded` gives to seeds."""
    value = node.meta.get("val")
    return (
        node.target in _FUSABLE_RANDOM
        and node.kwargs.get("layout") in (None, torch.strided)
        and not node.kwargs.get("pin_memory")
        and isinstance(value, torch.Tensor)
        and _seeded(value)
    )


def _draw_from_seed(
    g: torch.fx.Graph, node: torch.fx.Node, seeds: torch.fx.Node, index: int, fused: Any, fake_mode: Any
) -> None:
    """Replace the ``rand``/``randn`` ``node`` by Inductor's random prim on seed ``index``
    of ``seeds``. The prim draws float32, as Inductor's own replacement does; other dtypes
    are a conversion after it."""
    _, lookup_seed, random = fused
    value = node.meta["val"]
    with g.inserting_before(node):
        seed = g.call_function(lookup_seed, (seeds, index))
        drawn = g.call_function(random, (node.args[0], seed, _FUSABLE_RANDOM[node.target]))
        result = drawn
        if value.dtype != torch.float32:
            result = g.call_function(torch.ops.prims.convert_element_type.default, (drawn, value.dtype))
    with fake_mode:
        seed.meta["val"] = torch.empty((), dtype=torch.int64, device=value.device)
        drawn.meta["val"] = torch.empty(value.shape, dtype=torch.float32, device=value.device)
    result.meta = dict(node.meta)
    node.replace_all_uses_with(result)
    g.erase_node(node)


def _output_difference(node: torch.fx.Node, graph: torch.fx.GraphModule, skip: Sequence[int] = ()) -> str | None:
    """Why ``graph`` cannot stand in for ``node`` (whose users all take one output by index);
    outputs in ``skip`` are not compared."""
    results = graph.graph.find_nodes(op="output")[0].args[0]
    for user in node.users:
        if user.target is not operator.getitem or not isinstance(user.args[1], int):
            return f"{user.name} uses the op's whole output"
        index = user.args[1]
        if not 0 <= index < len(results) or not isinstance(results[index], torch.fx.Node):
            return f"the trace has no output {index}"
        if index in skip:
            continue
        difference = _layout_difference(results[index].meta.get("val"), user.meta.get("val"))
        if difference:
            return f"output {index} of the trace {difference}"
    return None


def _splice(
    gm: torch.fx.GraphModule,
    node: torch.fx.Node,
    graph: torch.fx.GraphModule,
    arguments: Sequence[torch.fx.Node],
    keep: Sequence[torch.fx.Node] = (),
) -> dict[torch.fx.Node, torch.fx.Node]:
    """Put ``graph``'s nodes in place of ``node`` (checked by :func:`_output_difference`);
    returns where each of ``graph``'s nodes went. Copies nothing reads are dropped, except
    those of ``keep`` (the caller's to use)."""
    placeholders = graph.graph.find_nodes(op="placeholder")
    results = graph.graph.find_nodes(op="output")[0].args[0]
    if len(placeholders) != len(arguments):
        raise RuntimeError(f"the trace takes {len(placeholders)} inputs, the op {len(arguments)}")
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
    for user in list(node.users):
        user.replace_all_uses_with(env[results[user.args[1]]])
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    # The trace keeps values nothing reads (BatchNorm's unused inverse std, say): drop them.
    kept = {env[traced] for traced in keep}
    for copied in reversed(added):
        if not copied.users and not copied.is_impure() and copied not in kept:
            gm.graph.erase_node(copied)
    return env


def _layout_difference(traced: Any, expected: Any) -> str | None:
    """How a traced output differs from the op's (``None``: it does not, provably)."""
    if not isinstance(traced, torch.Tensor) or not isinstance(expected, torch.Tensor):
        return "is not a tensor"
    if traced.dtype != expected.dtype or traced.device != expected.device:
        return f"is {traced.dtype} on {traced.device} where the op's is {expected.dtype} on {expected.device}"
    if not known_equal(traced.shape, expected.shape):
        return f"has shape {list(traced.shape)} where the op's has {list(expected.shape)} (not provably equal)"
    if known_equal(traced.stride(), expected.stride()) or known_equal([traced.numel()], [1]):
        return None
    if expected.is_contiguous() and known_contiguous(traced):  # symbolic strides, same layout
        return None
    return f"has strides {traced.stride()} where the op's has {expected.stride()}"


def _free_attribute_name(gm: torch.fx.GraphModule, base: str) -> str:
    name = f"_reversible_{base}"
    suffix = 0
    while hasattr(gm, name):
        suffix += 1
        name = f"_reversible_{base}_{suffix}"
    return name


def _record(report: Report, inlined: dict[str, int], notes: dict[str, str]) -> None:
    """Notes for the chains left as ops; for the traced ones, ``inlined`` on their rows and
    ``chain_saved_bytes`` (measured on the op's graphs) moved by what tracing changed."""
    for key, reason in notes.items():
        report.partition_notes.append(f"reversible chain {key} runs as an op, step by step: {reason}")
    for result in report.passes:
        if result.name != "reversible":
            continue
        for row in result.details:
            if "key" in row:
                row["inlined"] = row["key"] in inlined
                if row["inlined"] and "chain_saved_bytes" in row:
                    row["chain_saved_bytes"] += inlined[row["key"]]
