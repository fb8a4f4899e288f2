"""Reversible chains: training memory that does not grow with depth.

Two passes share the ``reversible`` option:

* ``reversible`` (``"auto"``, the default; training graphs only) finds chains of additive
  couplings written in plain PyTorch, ``y1 = a*x1 + F(x2); y2 = b*x2 + G(y1)`` repeated
  (``a``, ``b`` nonzero constants; ``F``, ``G`` any subgraph; ``-`` for ``+`` and
  ``torch.add``/``torch.sub`` with ``alpha=`` read the same way, the sign and ``alpha``
  becoming part of ``F`` or ``G``), and replaces each chain by
  ``torch.ops.memopt.reversible_chain``. Its autograd keeps only the chain's two final
  outputs; the backward rebuilds every block's inputs from them and recomputes ``F`` and
  ``G`` (``memopt/ops/reversible.py``). The partitioned forward graph then saves nothing per
  block, and once the split is made memopt's partitioner traces the op and its backward
  into the two graphs, so the lowering fuses them (``memopt/reversible_inline.py``).
  Exact: gradients match the ordinary backward up to the rounding of the rebuild.
* ``reversible-convert`` (``"convert"``, opt-in: it changes the architecture) rewrites a
  chain of same-shape residual sublayers ``x <- x + f_k(x)`` into the Reformer's two-stream
  form, ``v_k = v_{k-2} + f_k(v_{k-1})`` with ``v_{-1} = v_0 = x``, merged at the end as
  ``(v_{n-1} + v_n) / 2``, with the same parameters (an inner value read outside the stack,
  a skip connection, reads the same mean at its point); ``reversible`` then applies to it.

Both work on Dynamo's graph (torch IR). In the chain's own terms, with ``v_{-1} = x1`` and
``v_0 = x2``, step ``k`` is ``v_k = scale_k * v_{k-2} + H_k(v_{k-1})`` (a coupling is two
steps). A step is accepted when ``H_k``'s nodes depend on no other chain value, none of its
intermediates is used outside it, it mutates nothing but BatchNorm running statistics, and
shapes and dtypes match; anything else is left alone with the reason in the notes. Stream
values read outside the chain are returned by its op as side outputs.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
import torch.fx
from torch.fx import Node

from memopt._torch_compat import StorageWeakRef
from memopt.estimate import storage_nbytes, tensor_values
from memopt.ops import autocast_state
from memopt.ops import reversible as reversible_ops
from memopt.passes.base import (
    MODE_SWITCHES, GraphPass, PassContext, Write, draws_random, first_write_to, in_place_writes, target_name,
    transformed_nodes, value_storages, written_values,
)
from memopt.report import PassResult

# ``a + b``, ``a - b`` and their ``alpha=`` forms: (function targets, method names, sign of b).
_COMBINE_FUNCTIONS = {operator.add: 1.0, torch.add: 1.0, operator.sub: -1.0, torch.sub: -1.0}
_COMBINE_METHODS = {"add": 1.0, "__add__": 1.0, "sub": -1.0, "__sub__": -1.0}
_MUL_FUNCTIONS = (operator.mul, torch.mul)
_MUL_METHODS = ("mul", "__mul__", "__rmul__")

# The norms that update running statistics, with their arguments (the torch.* builtins have
# no Python signature: theirs is spelled out).
_NORM_SIGNATURES = {
    torch.nn.functional.batch_norm: inspect.signature(torch.nn.functional.batch_norm),
    torch.nn.functional.instance_norm: inspect.signature(torch.nn.functional.instance_norm),
    torch.batch_norm: inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for name in ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                     "cudnn_enabled")
    ]),
    torch.instance_norm: inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for name in ("input", "weight", "bias", "running_mean", "running_var", "use_input_stats", "momentum", "eps",
                     "cudnn_enabled")
    ]),
}
# Gradient hooks registered on an intermediate of H (``Tensor.register_hook``, which Dynamo
# records as a higher-order op with the hook as its body).
_HOOK_REGISTRATIONS = frozenset({"register_hook", "register_post_accumulate_grad_hook"})


def _checkpoint_note(gm: torch.fx.GraphModule, what: str) -> str | None:
    """A note on the activation-checkpoint regions of ``gm`` (``torch.utils.checkpoint``,
    transformers' ``gradient_checkpointing_enable``): each is one opaque node whose body this
    pass does not enter, so ``what`` inside them is left as it is."""
    regions = sum(
        node.op == "call_function" and getattr(node.target, "__name__", "") == "tag_activation_checkpoint"
        for node in gm.graph.nodes
    )
    if not regions:
        return None
    return (
        f"{regions} activation-checkpoint region(s) (torch.utils.checkpoint, gradient_checkpointing_enable) are "
        f"opaque to this pass: {what} inside them left as they are; turn checkpointing off for those blocks to "
        "let memopt rewrite them (reversible chains keep activation memory down themselves)"
    )


class NotReversible(Exception):
    """A candidate the pass cannot prove reversible; the message is the reason."""


# --- Reading the graph -----------------------------------------------------------------


def _value(node: Any) -> torch.Tensor | None:
    if not isinstance(node, Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    return value if isinstance(value, torch.Tensor) else None


def _symint(node: Any) -> torch.SymInt | int | None:
    """The (symbolic) integer a node holds, e.g. a size Dynamo lifted as a graph input."""
    if not isinstance(node, Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    return value if isinstance(value, (torch.SymInt, int)) and not isinstance(value, bool) else None


def _combine_sign(node: Node) -> float | None:
    """The sign times ``alpha`` of the second operand when ``node`` is ``a + alpha*b`` or
    ``a - alpha*b`` (``alpha`` a finite nonzero number, 1 when absent), else ``None``."""
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return None
    if node.op == "call_function":
        sign = _COMBINE_FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        sign = _COMBINE_METHODS.get(node.target)
    else:
        return None
    alpha = node.kwargs.get("alpha", 1.0)
    if sign is None or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None
    if not math.isfinite(alpha) or alpha == 0:
        return None
    return sign * float(alpha)


def _is_add(node: Node) -> bool:
    """Whether ``node`` adds or subtracts two values (possibly with ``alpha``): the shape of a
    coupling's or a residual's output."""
    return _combine_sign(node) is not None


def _scaled_source(node: Node) -> tuple[Node, float]:
    """``(u, c)`` when ``node`` is ``c * u`` for a constant number ``c``, else ``(node, 1.0)``."""
    is_mul = (node.op == "call_function" and node.target in _MUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MUL_METHODS
    )
    if is_mul and not node.kwargs and len(node.args) == 2:
        a, b = node.args
        for source, scale in ((a, b), (b, a)):
            if isinstance(source, Node) and isinstance(scale, (int, float)) and not isinstance(scale, bool):
                return source, float(scale)
    return node, 1.0


class _Reading(NamedTuple):
    """``add`` read as ``scale * source + h_scale * h``; ``skip`` is the node holding
    ``scale * source`` (``source`` itself when the scale is 1)."""

    source: Node
    scale: float
    skip: Node
    h: Node
    h_scale: float = 1.0


def _interpretations(add: Node) -> list[_Reading]:
    """Ways to read ``add`` (``a + c*b`` or ``a - c*b``) as ``scale * source + h_scale * h``:
    ``a`` as the skip term with ``h = b``, or ``b`` as the skip term with ``h = a``."""
    coefficient = _combine_sign(add)
    if coefficient is None:
        return []
    readings = []
    a, b = add.args
    for skip, h, skip_factor, h_scale in ((a, b, 1.0, coefficient), (b, a, coefficient, 1.0)):
        if isinstance(skip, Node) and isinstance(h, Node):
            source, scale = _scaled_source(skip)
            readings.append(_Reading(source, scale * skip_factor, skip, h, h_scale))
    return readings


def _batch_norm_buffers(node: Node) -> list[Node]:
    """Running-statistics buffers a batch or instance norm in training mode updates in place
    (``F.batch_norm``, ``torch.batch_norm``, ``F.instance_norm``, ``torch.instance_norm``)."""
    if node.op != "call_function":
        return []
    signature = _NORM_SIGNATURES.get(node.target)
    if signature is None:
        return []
    try:
        bound = signature.bind(*node.args, **node.kwargs)
    except TypeError:
        return []
    bound.apply_defaults()
    flag = "training" if "training" in bound.arguments else "use_input_stats"
    if bound.arguments[flag] is False:
        return []
    return [n for n in (bound.arguments["running_mean"], bound.arguments["running_var"]) if isinstance(n, Node)]


def _mutated_inputs(node: Node) -> list[Node]:
    """Graph values ``node`` writes in place (see :func:`written_values`)."""
    return [value for value in written_values(node) if isinstance(value, Node)]


class _Graph:
    """Indexes of one graph for the chain search."""

    def __init__(self, gm: torch.fx.GraphModule, deterministic: tuple[str, ...] = ()) -> None:
        self.gm = gm
        # Custom ops declared free of random draws (the ``reversible_deterministic_ops`` option).
        self.deterministic = deterministic
        self.nodes = list(gm.graph.nodes)
        self.index = {node: i for i, node in enumerate(self.nodes)}
        self.transformed = transformed_nodes(gm.graph)
        self._writes: list[Write] | None = None

    def writes(self) -> list[Write]:
        """The nodes that write a value in place (:func:`in_place_writes`)."""
        if self._writes is None:
            self._writes = in_place_writes(self.nodes)
        return self._writes

    def descendants(self, roots: Iterable[Node], limit: int | None = None) -> set[Node]:
        """Nodes reachable from ``roots`` through users (roots included), up to index ``limit``."""
        seen: set[Node] = set()
        stack = list(roots)
        while stack:
            node = stack.pop()
            if node in seen or (limit is not None and self.index[node] > limit):
                continue
            seen.add(node)
            stack.extend(node.users)
        return seen

    def ancestors(self, node: Node) -> set[Node]:
        seen: set[Node] = set()
        stack = [node]
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            stack.extend(current.all_input_nodes)
        return seen


@dataclasses.dataclass
class _Step:
    """One half-coupling found in the graph: ``add = scale * source + h_scale * h(x)``."""

    add: Node
    source: Node
    scale: float
    skip: Node
    """``source`` itself, or the ``scale * source`` node (removed with the chain)."""
    h: Node
    x: Node
    nodes: list[Node]
    """The nodes of ``H`` in graph order (``h`` last)."""
    externals: list[Node]
    """Tensors ``H`` reads besides ``x``: parameters, buffers, masks."""
    random: bool
    mutated: list[Node]
    h_scale: float = 1.0
    """The step adds ``h_scale * h``: -1 for ``source - H(x)``, ``alpha`` for ``add(..., alpha=)``."""
    bodies: list[Node] = dataclasses.field(default_factory=list)
    """``get_attr`` nodes of the subgraphs ``H``'s higher-order ops run (a custom
    ``autograd.Function``'s forward and backward): copied into the step's module."""
    scalars: list[Node] = dataclasses.field(default_factory=list)
    """``t.item()`` nodes ``H`` reads, ``t`` an external: the step's module takes the item."""


def _find_step(graph: _Graph, add: Node, reading: _Reading, x: Node, forbidden: set[Node]) -> _Step:
    """Check that ``add`` reads as ``scale * source + h_scale * H(x)`` for a self-contained ``H``."""
    source, scale, skip, h, h_scale = reading
    if not math.isfinite(scale) or scale == 0:
        raise NotReversible(f"{add.name}: scale {scale} of the skip term is not a finite nonzero constant")
    out, skip_value, h_value = _value(add), _value(source), _value(h)
    if out is None or skip_value is None or h_value is None:
        raise NotReversible(f"{add.name}: operands are not tensors")
    if out.shape != skip_value.shape or out.shape != h_value.shape or out.dtype != skip_value.dtype:
        raise NotReversible(f"{add.name}: broadcasting or dtype change between the skip term and the output")
    stream = _value(x)
    if stream is not None and stream.dtype != out.dtype:
        # The chain's op gives both its streams one dtype.
        raise NotReversible(f"{add.name}: the two streams have different dtypes ({out.dtype} and {stream.dtype})")
    if not out.dtype.is_floating_point:
        raise NotReversible(f"{add.name}: {out.dtype} values cannot be rebuilt by subtraction exactly")
    if torch.finfo(out.dtype).bits < 32:
        # 8 (bfloat16) or 11 (float16) significant bits: each rebuild loses about as much as
        # the value's own precision, and the loss compounds over the chain.
        raise NotReversible(f"{add.name}: {out.dtype} streams are too coarse to rebuild; keep them in float32")
    if len(h.users) != 1:
        raise NotReversible(f"{add.name}: the output of H ({h.name}) is also used outside the block")
    if skip is not source and len(skip.users) != 1:
        raise NotReversible(f"{add.name}: the scaled skip term ({skip.name}) is also used outside the block")
    if h is x:
        raise NotReversible(f"{add.name}: H is the identity")
    reach = graph.descendants([x], limit=graph.index[h])
    if h not in reach:
        raise NotReversible(f"{add.name}: H does not depend on its stream input {x.name}")
    members = graph.ancestors(h) & reach
    members.discard(x)
    nodes = sorted(members, key=graph.index.__getitem__)
    externals: list[Node] = []
    bodies: list[Node] = []
    scalars: list[Node] = []
    seen_externals: set[Node] = set()
    random, mutated = False, []
    for node in nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            raise NotReversible(f"{add.name}: H contains a {node.op} node ({node.name})")
        if node in graph.transformed:
            # Batched or grad-wrapped at run time, between nesting switches the step would not hold.
            raise NotReversible(f"{add.name}: {node.name} in H runs under a torch.func transform (vmap, grad, jvp)")
        if target_name(node) in _HOOK_REGISTRATIONS:
            # The recomputation that makes the gradient runs in the backward, where no hook
            # registered now could act on it.
            raise NotReversible(f"{add.name}: H registers a gradient hook ({node.name})")
        for user in node.users:
            if user not in members and not (node is h and user is add):
                if user.op == "output":
                    # What keeps a transformers model's blocks apart in training: the KV cache.
                    raise NotReversible(
                        f"{add.name}: intermediate {node.name} of H is returned by the graph (a key/value cache, "
                        "say: call transformers models with use_cache=False to train)"
                    )
                raise NotReversible(f"{add.name}: intermediate {node.name} of H is used outside the block ({user.name})")
        for arg in node.all_input_nodes:
            if arg is x or arg in members or arg in seen_externals:
                continue
            if arg in forbidden:
                raise NotReversible(f"{add.name}: H reads {arg.name}, which depends on the other stream")
            body = _submodule(graph.gm, arg)
            if body is not None:
                # A subgraph a higher-order op runs (a custom autograd.Function's forward and
                # backward): the step carries it, and draws random numbers if the body does.
                seen_externals.add(arg)
                bodies.append(arg)
                random = random or any(draws_random(inner, graph.deterministic) for inner in _body_nodes(body))
                written = _body_writes_its_inputs(body)
                if written is not None:
                    raise NotReversible(f"{add.name}: {arg.name} (run by {node.name}) writes {written} in place")
                continue
            scalar_source = _scalar_source(arg)
            if scalar_source is not None and scalar_source not in forbidden:
                # ``t.item()`` of a tensor outside the chain (a module's float attribute, made
                # a graph input under dynamic=True): the step reads ``t`` and takes the item.
                seen_externals.add(arg)
                scalars.append(arg)
                if scalar_source not in seen_externals:
                    seen_externals.add(scalar_source)
                    externals.append(scalar_source)
                continue
            if _value(arg) is None and _symint(arg) is None:
                raise NotReversible(f"{add.name}: H reads a non-tensor value {arg.name}")
            seen_externals.add(arg)
            externals.append(arg)
        buffers = _batch_norm_buffers(node)
        for written in _mutated_inputs(node):
            if written not in members:
                raise NotReversible(f"{add.name}: {node.name} writes {written.name} in place")
        mutated.extend(b for b in buffers if b not in mutated)
        random = random or draws_random(node, graph.deterministic)
    return _Step(add, source, scale, skip, h, x, nodes, externals, random, mutated, h_scale, bodies, scalars)


def _scalar_source(node: Node) -> Node | None:
    """The tensor ``node`` takes ``.item()`` of, when it does (and the tensor is a value), else ``None``."""
    if node.op == "call_method" and node.target == "item" and len(node.args) == 1 and not node.kwargs:
        source = node.args[0]
        if isinstance(source, Node) and _value(source) is not None:
            return source
    return None


def _submodule(gm: torch.fx.GraphModule, node: Node) -> torch.fx.GraphModule | None:
    """The graph module a ``get_attr`` node names (a higher-order op's body), else ``None``."""
    if node.op != "get_attr":
        return None
    try:
        value = gm.get_submodule(str(node.target))
    except AttributeError:
        return None
    return value if isinstance(value, torch.fx.GraphModule) else None


def _body_writes_its_inputs(body: torch.fx.GraphModule) -> str | None:
    """The name of what a higher-order op's body (and the bodies nested in it) writes in place
    among its inputs (a custom ``autograd.Function`` updating a module buffer), or of the
    write whose target it cannot tell; ``None`` when it writes only its own intermediates. A
    step's recomputation runs the body again: it would write twice."""
    for module in body.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        nodes = list(module.graph.nodes)
        inputs = value_storages(node for node in nodes if node.op == "placeholder")
        for _, node, values in in_place_writes(nodes):
            storages = value_storages(values)
            if inputs is None or storages is None or storages & inputs:
                return ", ".join(value.name for value in values if isinstance(value, Node)) or node.name
    return None


def _body_nodes(body: torch.fx.GraphModule) -> list[Node]:
    """The nodes of ``body`` and of the bodies nested in it."""
    return [node for module in body.modules() if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes]


@dataclasses.dataclass
class _Chain:
    x1: Node
    x2: Node
    steps: list[_Step]

    @property
    def values(self) -> list[Node]:
        return [self.x1, self.x2] + [step.add for step in self.steps]

    def members(self) -> set[Node]:
        nodes: set[Node] = set()
        for step in self.steps:
            nodes.update(step.nodes)
            nodes.add(step.add)
            if step.skip is not step.source:
                nodes.add(step.skip)
        return nodes


def _skip_users(node: Node) -> list[tuple[Node, Any]]:
    """Add nodes reading ``node`` as a skip term (directly or scaled), with each reading."""
    found = []
    candidates = [node] + [user for user in node.users if _scaled_source(user)[0] is node and user is not node]
    for skip in candidates:
        for user in skip.users:
            if user.op in ("call_function", "call_method") and _is_add(user):
                for reading in _interpretations(user):
                    if reading.source is node and reading.skip is skip:
                        found.append((user, reading))
    return found


def _find_chains(found: list[_Chain], failures: dict[str, str], refused: dict[str, str]) -> list[_Chain]:
    """The chains of ``found`` (from :func:`_all_chains`, with its ``failures``) that lie in
    no other; ``refused`` collects candidates that failed a check, by output node name, with
    the reason."""
    chains = _outermost(found, failures)
    accepted = {step.add.name for chain in chains for step in chain.steps}
    for reason in failures.values():
        # Reasons start with the node that failed the check; report each node once.
        name = reason.split(":", 1)[0]
        if name not in accepted and name not in refused:
            refused[name] = reason
    return chains


def _all_chains(graph: _Graph, failures: dict[str, str]) -> list[_Chain]:
    """Every coupling chain of at least two steps, in graph order of their first steps, nested
    ones included; ``failures`` collects why candidates failed."""
    chains: list[_Chain] = []
    taken: set[Node] = set()
    outputs: set[Node] = set()
    for first in graph.nodes:
        if first in taken or first.op not in ("call_function", "call_method") or not _is_add(first):
            continue
        chain = _chain_from(graph, first, taken, outputs, failures)
        if chain is not None:
            chains.append(chain)
            # Its steps' sums, not their H: a chain inside a step's H (a transformer's
            # attention/MLP stack in a UNet block's step) is found too, as a nested one.
            taken |= {node for step in chain.steps for node in (step.add, step.skip)}
            outputs |= {step.add for step in chain.steps[-2:]}
    return chains


def _inside(chain: _Chain, other: _Chain) -> bool:
    """Whether ``chain``'s steps lie in the ``H`` of a step of ``other``."""
    adds = {step.add for step in chain.steps}
    return other is not chain and any(adds & set(step.nodes) for step in other.steps)


def _nested_leaves(chains: list[_Chain]) -> list[_Chain]:
    """Chains inside another's ``H`` that hold none themselves, without mutated buffers:
    those that can become ops inside the outer chain's step. One with random steps makes
    that step random: recomputing it replays the op's draws like any other random op's."""
    return [
        chain
        for chain in chains
        if any(_inside(chain, other) for other in chains)
        and not any(_inside(other, chain) for other in chains)
        and not any(step.mutated for step in chain.steps)
    ]


def _outermost(chains: list[_Chain], failures: dict[str, str]) -> list[_Chain]:
    """Drop chains that still lie inside another chain's ``H``.

    A converted UNet nests them: a down block's residual chain (ResNet, transformer) has a
    step whose ``H`` is the whole transformer, itself a chain of residual sublayers. Those
    that can, became ops inside the outer step first (:func:`run_reversible`); one left
    here updates buffers (or ``reversible_nested`` is off). The outer step carries its
    nodes into its module and recomputes them in the backward, so its activations are not
    kept either way; rewriting both would erase nodes the other one still reads.
    """
    kept = []
    for chain in chains:
        outer = next((other for other in chains if _inside(chain, other)), None)
        if outer is None:
            kept.append(chain)
            continue
        for step in chain.steps:
            failures[step.add.name] = (
                f"{step.add.name}: inside H of the chain at {outer.steps[0].add.name}, which recomputes it"
            )
    return kept


def _chain_from(
    graph: _Graph, first: Node, taken: set[Node], outputs: set[Node], failures: dict[str, str]
) -> _Chain | None:
    """The chain whose first step is ``first``, or ``None``. Nodes in ``taken`` belong to
    chains found before; the chain may start from their ``outputs`` (where a read that cannot
    move after it ended one: its op reads them)."""
    for reading in _interpretations(first):
        x1, h1 = reading.source, reading.h
        if (x1 in taken and x1 not in outputs) or h1 in taken:
            continue
        # x2 is the stream input of F: an ancestor of h1 that a later add reads as its skip term
        # while that add's H depends on ``first`` (= y1).
        for x2 in sorted(graph.ancestors(h1), key=graph.index.__getitem__, reverse=True):
            if x2 is first or x2 is h1 or (x2 in taken and x2 not in outputs) or _value(x2) is None:
                continue
            for second, reading2 in _skip_users(x2):
                if second is first or second in taken or graph.index[second] <= graph.index[first]:
                    continue
                if reading2.h is first:
                    continue  # x2 + y1: no H at all (a merge, not a coupling)
                if first not in graph.ancestors(reading2.h):
                    continue
                forbidden = graph.descendants([x1, x2])
                try:
                    step1 = _find_step(graph, first, reading, x2, forbidden - {x2})
                    step2 = _find_step(graph, second, reading2, first, forbidden - {first})
                except NotReversible as reason:
                    if _independent(graph, x1, x2):
                        failures.setdefault(first.name, str(reason))
                    continue
                chain = _Chain(x1, x2, [step1, step2])
                _extend(graph, chain, forbidden, failures)
                reason = _trim(graph, chain)
                if len(chain.steps) >= 2:
                    return chain
                if reason:
                    failures.setdefault(first.name, f"{first.name}: {reason}")
    return None


def _independent(graph: _Graph, x1: Node, x2: Node) -> bool:
    """Whether neither stream is computed from the other: what two halves of a coupling's
    input are. A candidate without it is no coupling the user wrote but an add that happens
    to read an earlier value (GELU's ``x + 0.044715 x^3`` after a layer fed by ``x2``, say),
    and not worth a note."""
    return x2 not in graph.ancestors(x1) and x1 not in graph.ancestors(x2)


def _extend(graph: _Graph, chain: _Chain, forbidden: set[Node], failures: dict[str, str]) -> None:
    while True:
        previous, current = chain.steps[-2].add, chain.steps[-1].add
        extended = False
        for add, reading in _skip_users(previous):
            if graph.index[add] <= graph.index[current] or reading.h is current:
                continue
            if current not in graph.ancestors(reading.h):
                continue
            try:
                step = _find_step(graph, add, reading, current, forbidden - {current})
            except NotReversible as reason:
                failures.setdefault(add.name, str(reason))
                continue
            # ``previous`` becomes internal. Read elsewhere too, it is a side output of the chain
            # (a UNet's skip connection), as long as :func:`_trim` finds those reads after it.
            chain.steps.append(step)
            extended = True
            break
        if not extended:
            return


def _trim(graph: _Graph, chain: _Chain) -> str | None:
    """Drop final steps until every read of the chain's values from outside it can come after
    its last node, where the chain's op returns them (its two final outputs, and side outputs):
    reads placed earlier must be movable there (:func:`_early_readers`); and until no op
    outside the chain writes in place what it must not (:func:`_conflicting_write`). Returns
    the last such write's reason, if one dropped steps."""
    reason = None
    while len(chain.steps) >= 2:
        write = _conflicting_write(graph, chain)
        if write is None and _early_readers(graph.index, chain, graph.deterministic) is not None:
            return reason
        reason = write or reason
        chain.steps.pop()
    return reason


def _conflicting_write(graph: _Graph, chain: _Chain) -> str | None:
    """Why an op outside ``chain`` that writes in place keeps it from becoming one op, or
    ``None``. A Dynamo graph has no edge from a write to the reads after it, and the chain's
    op runs where its last step was:

    * placed among the chain's nodes, a write to a value the chain reads or computes
      (``ctx.mul_(0.5)`` between two couplings whose F reads ``ctx``) would come before
      every step, where eager ran the earlier steps before it;
    * placed after the chain, a write to what the op keeps for the backward (the tensors its
      steps read besides their streams, and its two final outputs, from which it rebuilds
      the rest) would change what the backward recomputes."""
    members = chain.members()
    first = min(graph.index[node] for node in members)
    last = graph.index[chain.steps[-1].add]
    read = [*members, *(arg for node in members for arg in node.all_input_nodes)]
    kept = [external for step in chain.steps for external in step.externals]
    kept += [step.add for step in chain.steps[-2:]]
    for values, start, end, where in (
        (read, first, last, "among its steps"),
        (kept, last, len(graph.nodes), "after it, and the backward recomputes from it"),
    ):
        write = first_write_to(values, graph.writes(), start, end, skip=members)
        if write is not None:
            _, node, written = write
            names = ", ".join(value.name for value in written if isinstance(value, Node))
            return f"{node.name} writes {names} in place {where}"
    return None


def _early_readers(index: dict[Node, int], chain: _Chain, deterministic: tuple[str, ...] = ()) -> list[Node] | None:
    """The nodes outside the chain, placed before its last node, that read its values, with
    what they feed up to there (``index``: each node's position in the graph), in order: the
    rewrite moves them after the chain's op (a skip connection projected as soon as it is
    made, say). ``None`` when one cannot move: it feeds the chain (no accepted step reads
    such a value, but the check is cheap), or draws random numbers or writes in place
    (moving it would reorder draws or effects)."""
    members = chain.members()
    last = index[chain.steps[-1].add]
    stack = [user for step in chain.steps for user in step.add.users if user not in members and index[user] < last]
    found: set[Node] = set()
    while stack:
        node = stack.pop()
        if node in found or index[node] > last:
            continue
        movable = node.op in ("call_function", "call_method", "call_module") and not node.is_impure()
        if node in members or not movable or draws_random(node, deterministic) or _mutated_inputs(node):
            return None
        found.add(node)
        stack.extend(node.users)
    return sorted(found, key=index.__getitem__)


def _side_outputs(chain: _Chain) -> list[int]:
    """Steps, not the last two, whose results are read outside the chain."""
    members = chain.members()
    return [k for k, step in enumerate(chain.steps[:-2]) if any(user not in members for user in step.add.users)]


# --- Rewriting -------------------------------------------------------------------------


def _bytes_of(nodes: Iterable[Node]) -> int:
    storages: dict[Any, int] = {}
    for node in nodes:
        for tensor in tensor_values(node):
            try:
                key = StorageWeakRef(tensor.untyped_storage())
            except (NotImplementedError, RuntimeError):
                key = id(tensor)
            storages[key] = storage_nbytes(tensor)
    return sum(storages.values())


def _fake_mode(nodes: Iterable[Node]):
    for node in nodes:
        value = _value(node)
        if value is not None and hasattr(value, "fake_mode"):
            return value.fake_mode
    raise NotReversible("graph carries no fake tensors to compute metadata with")


def _step_module(gm: torch.fx.GraphModule, step: _Step) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {}
    env[step.x] = graph.placeholder("x")
    env[step.x].meta = dict(step.x.meta)
    for i, external in enumerate(step.externals):
        env[external] = graph.placeholder(f"input_{i}")
        env[external].meta = dict(external.meta)
    for body in step.bodies:
        env[body] = graph.get_attr(str(body.target))  # GraphModule(gm, ...) copies it from gm
    for scalar in step.scalars:
        env[scalar] = graph.call_method("item", (env[scalar.args[0]],))
        env[scalar].meta = dict(scalar.meta)
    for number, node in enumerate(step.nodes):
        # Names by position, not the traced ones (``relu_7``): identical blocks print the same
        # code, so the chain's fingerprint (its registry key) depends on what the steps do.
        args, kwargs = torch.fx.map_arg((node.args, node.kwargs), lambda arg: env[arg])
        env[node] = graph.create_node(node.op, node.target, args, kwargs, name=f"h{number}", type_expr=node.type)
        env[node].meta = dict(node.meta)
    out = env[step.h]
    if step.h_scale != 1.0:
        # ``source - H(x)`` and ``add(source, H(x), alpha=c)``: the op adds what the step returns.
        out = graph.call_function(operator.mul, (out, step.h_scale))
        out.meta = dict(step.h.meta)
    graph.output(out)
    return torch.fx.GraphModule(gm, graph, "ReversibleStep")


def _make_fn(module: torch.fx.GraphModule, order: list[tuple[str, int]]) -> reversible_ops.StepFn:
    # The generated ``forward`` directly, not ``module(...)``: nn.Module's call machinery (hooks,
    # FX's traceback wrapper) costs a few microseconds a call, and the chain calls it twice per
    # step (forward, recomputation).
    forward = module.forward
    pool_of = {"p": 0, "c": 1, "s": 2}
    slots = [(pool_of[kind], i) for kind, i in order]

    def fn(x, params, consts, sizes):
        pools = (params, consts, sizes)
        return forward(x, *[pools[pool][i] for pool, i in slots])

    return fn


def _rewrite(
    gm: torch.fx.GraphModule, chain: _Chain, deterministic: tuple[str, ...] = ()
) -> tuple[str, list[Node], list[Node]]:
    graph = gm.graph
    early = _early_readers({node: i for i, node in enumerate(graph.nodes)}, chain, deterministic)
    if early is None:
        raise NotReversible("a value of the chain is read before its end by a node that cannot move after it")
    params: list[Node] = []
    consts: list[Node] = []
    sizes: list[Node] = []
    op_steps: list[reversible_ops.Step] = []
    fingerprint = []
    for step in chain.steps:
        module = _step_module(gm, step)
        order: list[tuple[str, int]] = []
        indexes: dict[str, list[int]] = {"p": [], "c": [], "s": []}
        for external in step.externals:
            value = _value(external)
            if value is None:
                bucket, kind = sizes, "s"  # a symbolic size (dynamic shapes)
            else:
                bucket, kind = (params, "p") if value.requires_grad else (consts, "c")
            if external not in bucket:
                bucket.append(external)
            indexes[kind].append(bucket.index(external))
            order.append((kind, len(indexes[kind]) - 1))
        op_steps.append(
            reversible_ops.Step(
                _make_fn(module, order), step.scale, indexes["p"], indexes["c"], step.random, indexes["s"]
            )
        )
        bodies = [_submodule(gm, body) for body in step.bodies]
        # The step's code names its bodies; what they compute must be in the key too.
        body_code = "".join(m.code for body in bodies for m in body.modules() if isinstance(m, torch.fx.GraphModule))
        fingerprint.append(f"{step.scale}|{step.random}|{module.code}{body_code}")
    mutated = []
    members = chain.members()
    for step in chain.steps:
        for buffer in step.mutated:
            readers = [user for user in buffer.users if user in members]
            if any(buffer not in _batch_norm_buffers(user) for user in readers):
                # The backward recomputes without running statistics (None), which is only
                # right when nothing but training-mode BatchNorm touches them.
                raise NotReversible(f"buffer {buffer.name} is read by more than training-mode BatchNorm")
            if buffer in consts and consts.index(buffer) not in mutated:
                mutated.append(consts.index(buffer))
    device = _value(chain.x1).device
    autocast = autocast_state.current(device.type)  # see memopt.ops.autocast_state
    sides = _side_outputs(chain)
    op_chain = reversible_ops.Chain(
        op_steps, mutated, reversible_ops.rng_state_bytes(device), autocast, tuple(deterministic), tuple(sides)
    )
    fingerprint.append(repr([(tuple(_value(n).shape), _value(n).dtype) for n in [chain.x1, chain.x2, *params, *consts]]))
    fingerprint.append(repr(autocast))
    fingerprint.append(repr(tuple(deterministic)))
    fingerprint.append(repr(sides))
    key = reversible_ops.register_chain(op_chain, "\n".join(fingerprint))

    fake_mode = _fake_mode([chain.x1, *params])
    args = (key, chain.x1, chain.x2, params, consts, sizes)
    with fake_mode, torch.no_grad():
        fake_out = torch.ops.memopt.reversible_chain.default(
            key,
            _value(chain.x1),
            _value(chain.x2),
            [_value(p) for p in params],
            [_value(c) for c in consts],
            [_symint(n) for n in sizes],
        )

    last = chain.steps[-1].add
    anchor = last.next
    with graph.inserting_before(anchor):
        op = graph.call_function(torch.ops.memopt.reversible_chain.default, args)
        op.meta["val"] = fake_out
        outs = []
        for i, value in enumerate(fake_out):
            item = graph.call_function(operator.getitem, (op, i))
            item.meta["val"] = value
            item.meta["example_value"] = value
            outs.append(item)
        for position, const_position in enumerate(mutated):
            copy = graph.call_method("copy_", (consts[const_position], outs[3 + position]))
            copy.meta["val"] = copy.meta["example_value"] = _value(consts[const_position])
    n = len(chain.steps)
    final1, final2 = (chain.steps[-2].add, last) if n % 2 == 0 else (last, chain.steps[-2].add)
    for node in early:
        anchor.prepend(node)  # after the op, in their order: they read what it returns
    side_values = [chain.steps[k].add for k in sides]
    side_outs = outs[3 + len(mutated) :]
    for old, new in ((final1, outs[0]), (final2, outs[1]), *zip(side_values, side_outs, strict=True)):
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in members)
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in sorted(members, key=order.__getitem__, reverse=True):
        graph.erase_node(node)
    for item in outs:
        if not item.users:
            # Outputs nothing reads (a stream consumed inside the chain only, the RNG states):
            # left in, they would read as uses of the op outside a step that holds it.
            graph.erase_node(item)
    for body in {body for step in chain.steps for body in step.bodies}:
        if not body.users:
            graph.erase_node(body)  # the chain's steps carry it now
    return key, params, consts


MAX_REBUILD_GAIN = reversible_ops.MAX_REBUILD_GAIN


def _segments(steps: list[_Step]) -> list[tuple[int, int]]:
    """``[start, end)`` step ranges of at least two steps within :data:`MAX_REBUILD_GAIN`.

    Step ``k`` rebuilds ``v[k-2] = (v[k] - H_k(v[k-1])) / scale_k``, multiplying the rounding
    in what it reads by ``1/|scale_k|``; ``v[k-2]`` is what step ``k-1`` recomputes its ``H``
    on. A step whose factor alone is over the limit can only be a segment's first step, whose
    rebuilt value (the segment's input) no step of the segment reads; the step before it, if
    that leaves it alone, stays ordinary code. Other first steps count, as a margin: rounding
    also grows with a segment's length."""
    segments, start, gain = [], 0, 1.0
    for i, step in enumerate(steps):
        factor = reversible_ops.rebuild_factor(step.scale)
        if factor > MAX_REBUILD_GAIN:
            if i - start >= 2:
                segments.append((start, i))
            start, gain = i, 1.0
            continue
        if gain * factor > MAX_REBUILD_GAIN and i - start >= 2:
            segments.append((start, i))
            start, gain = i, 1.0
        gain *= factor
    if len(steps) - start >= 2:
        segments.append((start, len(steps)))
    return segments


def run_reversible(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replace each reversible coupling chain of a training graph by ``memopt::reversible_chain``.

    ``details`` gets one row per coupling (two steps): ``chain``, ``block``, ``nodes`` (the
    block's output nodes), ``reversible`` and ``reason``, ``activation_bytes_before`` (bytes of
    every tensor the block computes: the most an ordinary backward could keep for it),
    ``saved_bytes_after`` (what the forward keeps for it now: its RNG states, plus the
    segment's two outputs on the segment's last block), ``segment`` and ``key``; the
    partitioner adds ``chain_saved_bytes``, measured on the partitioned forward graph.
    """
    result = PassResult("reversible")
    note = _checkpoint_note(gm, "coupling chains")
    if note:
        result.notes.append(note)
    graph = _Graph(gm, ctx.config.reversible_deterministic_ops)
    modes = [node.name for node in graph.nodes if node.op == "call_function" and target_name(node) in MODE_SWITCHES]
    if modes:
        # The chain op runs its steps eagerly inside a kernel, outside these regions: leave
        # the graph as it is rather than recompute under another precision or grad mode.
        result.notes.append(f"left alone: the graph switches autocast/grad mode ({', '.join(modes[:3])}); chains not rewritten")
        return result
    number = 0
    # Chains nested in a step of another (a converted UNet block's transformer holds its own
    # attention/MLP stack) become ops first, innermost first: the step that holds one then
    # recomputes it through the op, keeping one inner step's activations at a time instead
    # of the whole step's. Chains with buffers do not nest; one with random steps makes the
    # outer step random, so that its recomputation replays the op's draws.
    tried: set[str] = set()
    failures: dict[str, str] = {}
    found = _all_chains(graph, failures)
    while ctx.config.reversible_nested:
        nested = [chain for chain in _nested_leaves(found) if chain.steps[0].add.name not in tried]
        if not nested:
            break
        tried.update(chain.steps[0].add.name for chain in nested)  # a chain that failed stays code
        number = _rewrite_chains(gm, graph, nested, number, result, nested=True)
        graph = _Graph(gm, ctx.config.reversible_deterministic_ops)
        failures = {}
        found = _all_chains(graph, failures)
    refused: dict[str, str] = {}
    chains = _find_chains(found, failures, refused)
    result.matched = number + len(chains) + len(refused)
    for name, reason in refused.items():
        result.notes.append(f"left alone: {reason}")
        # A candidate coupling that failed a check: a row so per-block reports show why.
        result.details.append(
            {"chain": None, "block": None, "nodes": [name], "reversible": False, "reason": reason,
             "activation_bytes_before": None, "saved_bytes_after": None, "rng_state_bytes": 0}
        )
    _rewrite_chains(gm, graph, chains, number, result)
    return result


def _rewrite_chains(
    gm: torch.fx.GraphModule, graph: _Graph, chains: list[_Chain], first: int, result: PassResult, nested: bool = False
) -> int:
    """Rewrite ``chains`` (numbered from ``first`` in the notes and rows) into ops, adding
    notes and rows to ``result``; returns the next chain number."""
    done: list[tuple[list[str], list[dict[str, Any]]]] = []
    # Rewrite the last chain first, as the last segment of a chain below: a chain may start
    # from an earlier one's outputs (see _find_chains), and rewriting the earlier one then
    # redirects those reads to its op's outputs.
    for number, chain in reversed(list(enumerate(chains, start=first))):
        notes: list[str] = []
        rows = []
        for block_start in range(0, len(chain.steps), 2):
            block = chain.steps[block_start : block_start + 2]
            nodes = [n for step in block for n in (*step.nodes, step.add)]
            rows.append(
                {
                    "chain": number,
                    "block": block_start // 2,
                    "nodes": [step.add.name for step in block],
                    "reversible": False,
                    "reason": "",
                    "activation_bytes_before": _bytes_of(nodes),
                    "saved_bytes_after": _bytes_of(nodes),
                    "rng_state_bytes": 0,
                }
            )
        segments = _segments(chain.steps)
        covered = {i for start, end in segments for i in range(start, end)}

        def steps_of(row: dict[str, Any]) -> range:
            return range(2 * row["block"], min(2 * row["block"] + 2, len(chain.steps)))

        for row in rows:
            if not all(i in covered for i in steps_of(row)):
                row["reason"] = f"rebuild would amplify rounding by more than {MAX_REBUILD_GAIN:g}x"
        rewritten: set[int] = set()  # steps in a rewritten segment
        final_bytes: dict[int, int] = {}  # per row: the kept final outputs of segments ending in it
        # Rewrite the last segment first: an earlier segment's outputs are the later one's inputs,
        # and rewriting the earlier one redirects those uses to its op's outputs.
        for segment_number in reversed(range(len(segments))):
            start, end = segments[segment_number]
            values = chain.values  # [x1, x2, v1, v2, ...]: step i reads values[i] and values[i + 1]
            segment = _Chain(values[start], values[start + 1], chain.steps[start:end])
            finals = [segment.steps[-1].add, segment.steps[-2].add]
            segment_final_bytes = _bytes_of(finals)
            try:
                key, _params, _consts = _rewrite(gm, segment, graph.deterministic)
            except NotReversible as reason:
                notes.append(f"chain at {segment.steps[0].add.name} left alone: {reason}")
                for row in rows:
                    if any(start <= i < end for i in steps_of(row)):
                        row["reason"] = str(reason)
                continue
            rng_bytes = reversible_ops._CHAINS[key].rng_bytes
            sides = [segment.steps[k].add.name for k in reversible_ops._CHAINS[key].side_outputs]
            # A block half in this segment (segments start wherever a scale allows) counts as
            # reversible once rewritten segments hold each of its steps.
            rewritten.update(range(start, end))
            for row in rows:
                steps = steps_of(row)
                if row["reversible"] or not any(start <= i < end for i in steps) or not rewritten.issuperset(steps):
                    continue
                row.update(reversible=True, reason="", segment=segment_number, key=key, nested=nested)
                row["rng_state_bytes"] = rng_bytes * sum(chain.steps[i].random for i in steps)
                row["saved_bytes_after"] = row["rng_state_bytes"]
            final_bytes[(end - 1) // 2] = final_bytes.get((end - 1) // 2, 0) + segment_final_bytes
            result.rewrites += 1
            random_steps = sum(step.random for step in segment.steps)
            notes.append(
                f"chain {number}"
                + (f" segment {segment_number}" if len(segments) > 1 else "")
                + f": {len(segment.steps)} steps ({segment.steps[0].add.name} .. {segment.steps[-1].add.name}) "
                "keep only their 2 final outputs for the backward; inputs are rebuilt and F/G recomputed"
                + (f"; {random_steps} random steps keep their RNG state" if random_steps else "")
                + (f"; {len(sides)} values read after the chain are side outputs ({', '.join(sides)})" if sides else "")
                + _assumed_random_note(segment.steps, graph.deterministic)
                + ("; nested in a step of another chain, which runs it" if nested else "")
            )
        if len(segments) > 1:
            notes.append(
                f"chain {number} cut into {len(segments)} segments: its scales would amplify rebuild "
                f"rounding by more than {MAX_REBUILD_GAIN:g}x in one piece"
            )
        for index, row in enumerate(rows):
            if row["reversible"]:
                row["saved_bytes_after"] += final_bytes.get(index, 0)
        done.append((notes, rows))
        result.bytes_saved += sum(row["activation_bytes_before"] - row["saved_bytes_after"] for row in rows)
    for notes, rows in reversed(done):
        result.notes.extend(notes)
        result.details.extend(rows)
    return first + len(chains)


# --- Conversion: residual chains to the two-stream form --------------------------------


def _assumed_random_note(steps: list[_Step], deterministic: tuple[str, ...]) -> str:
    """Which custom ops made steps random only because memopt cannot see inside them, and
    how to declare them deterministic."""
    names = sorted(
        {
            str(node.target)
            for step in steps
            for node in step.nodes
            if reversible_ops.assumed_random(node.target, deterministic)
        }
    )
    if not names:
        return ""
    return (
        f" (counting custom ops that may draw random numbers without declaring it: {', '.join(names)}; "
        "name those that do not in the reversible_deterministic_ops option)"
    )


def _residual_chains(graph: _Graph, refused: dict[Node, str] | None = None) -> list[list[_Step]]:
    """Chains of at least two residual adds ``x_{k+1} = x_k + f_k(x_k)``, each ``f_k`` self-contained.

    ``refused`` collects, per residual add whose ``f_k`` has weights, why it could not be a
    step (the adds inside activations, GELU's ``x + 0.044715 x^3`` say, have none and are not
    worth a note)."""
    chains: list[list[_Step]] = []
    taken: set[Node] = set()
    for add in graph.nodes:
        if add in taken or add.op not in ("call_function", "call_method") or not _is_add(add):
            continue
        steps: list[_Step] = []
        start = None
        candidates = [add]
        while True:
            found = None
            for current in candidates:
                found = _residual_step(graph, current, steps, start, refused)
                if found is not None:
                    break
            if found is None:
                break
            if start is None:
                start = found.source
            steps.append(found)
            # Only the add is taken: a stack inside a sublayer (a transformer's attention/MLP
            # stack inside a UNet block's) converts too, and becomes a chain nested in a step.
            taken.add(found.add)
            # The next residual add reads this step's output as its skip term, directly or
            # through one node; other reads of it are taps (a UNet's skip connections), which
            # the conversion gives the mean of the two streams.
            nxt = [u for u in found.add.users if _is_add(u) and u.op in ("call_function", "call_method")]
            nxt += [v for u in found.add.users for v in u.users if _is_add(v) and v.op in ("call_function", "call_method")]
            candidates = [c for c in dict.fromkeys(nxt) if c not in taken]
            if not candidates:
                break
        if len(steps) >= 2:
            chains.append(steps)
        elif steps:
            taken.discard(steps[0].add)
    return chains


def _residual_step(
    graph: _Graph, add: Node, steps: list[_Step], start: Node | None, refused: dict[Node, str] | None
) -> _Step | None:
    """``add`` as the residual step after ``steps`` (``x + f(x)``, ``x`` the last step's
    output; any ``x`` for the first step), or ``None``."""
    for reading in _interpretations(add):
        source = reading.source
        if reading.scale != 1.0 or reading.skip is not source:
            continue
        if steps and source is not steps[-1].add:
            continue
        forbidden = graph.descendants([start if start is not None else source]) - {source}
        try:
            return _find_step(graph, add, reading, source, forbidden)
        except NotReversible as reason:
            if refused is not None and _depends_with_weights(graph, source, reading.h):
                refused.setdefault(add, str(reason))
    return None


def _depends_with_weights(graph: _Graph, source: Node, h: Node) -> bool:
    """Whether ``h`` is computed from ``source`` by a subgraph that reads a trainable tensor
    (a parameter): a residual branch worth a note when it cannot convert."""
    if not isinstance(h, Node) or source not in graph.ancestors(h):
        return False
    body = graph.ancestors(h) & graph.descendants([source], limit=graph.index[h])
    for node in body | {h}:
        for arg in node.all_input_nodes:
            value = _value(arg)
            if arg.op == "placeholder" and value is not None and value.requires_grad:
                return True
    return False


MAX_REFUSED_NOTES = 5
_NORMALIZATIONS = frozenset({"layer_norm", "group_norm", "rms_norm", "batch_norm", "instance_norm"})


def _post_norm_adds(graph: _Graph) -> list[tuple[Node, str]]:
    """Residual adds ``x + f(x)`` (``f`` reads ``x``; same shape in and out) read by
    normalizations alone: the post-norm blocks ``x <- norm(x + f(x))``, with the
    normalization's name."""
    found = []
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method") or not _is_add(node) or not node.users:
            continue
        names = {target_name(user) for user in node.users}
        value = _value(node)
        if not names <= _NORMALIZATIONS or value is None:
            continue
        for source, scale, _skip, h, _h_scale in _interpretations(node):
            skip_value = _value(source)
            same_shape = skip_value is not None and skip_value.shape == value.shape
            if scale == 1.0 and same_shape and source in graph.ancestors(h):  # f reads x
                found.append((node, sorted(names)[0]))
                break
    return found


# Ops that rearrange elements without changing them: a chain of these applied to the stream
# and then undone (proved by :func:`_undoes`) is what :func:`_fold_stream_views` folds.
_VIEW_METHODS = frozenset(
    {"view", "reshape", "permute", "transpose", "unsqueeze", "squeeze", "flatten", "unflatten", "movedim",
     "contiguous"}
)
_VIEW_FUNCTIONS = frozenset(
    {torch.reshape, torch.permute, torch.transpose, torch.unsqueeze, torch.squeeze, torch.flatten, torch.movedim}
)


def _is_view_call(node: Node) -> bool:
    if not node.args or not isinstance(node.args[0], Node):
        return False
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        # ``x[None, :]``, ``x[..., None]``: new axes and whole dimensions only.
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return all(i is None or i is Ellipsis or i == slice(None) for i in index)
    return node.target in _VIEW_FUNCTIONS


def _view_target(node: Node, reshape: bool) -> Any:
    """``node``'s target; with ``reshape``, ``Tensor.reshape`` for ``Tensor.view``."""
    return "reshape" if reshape and node.op == "call_method" and node.target == "view" else node.target


def _apply_view(node: Node, tensor: torch.Tensor, reshape: bool = False) -> torch.Tensor | None:
    """``node``'s view op applied to ``tensor`` (``view`` as ``reshape`` with ``reshape``), or
    ``None`` when its other arguments are not all constants (a symbolic size)."""
    rest: list[Node] = []
    torch.fx.map_arg((node.args[1:], node.kwargs), rest.append)
    if rest:
        return None
    target = _view_target(node, reshape)
    if node.op == "call_method":
        return getattr(tensor, target)(*node.args[1:], **node.kwargs)
    return target(tensor, *node.args[1:], **node.kwargs)


def _undoes(stream: torch.Tensor, views: list[Node]) -> bool:
    """Whether applying ``views`` in order to ``stream`` gives back ``stream``, element for
    element. Proved on a meta tensor of the stream's shape: while every op stays a view of it,
    the result's strides and offset say where each element comes from, and the identity has
    the stream's own shape, contiguous strides and offset 0. An op that would copy (a reshape
    of a permuted view), or a symbolic size, proves nothing: ``False``."""
    if not all(isinstance(size, int) for size in stream.shape):
        return False
    base = torch.empty(tuple(stream.shape), device="meta")
    tensor = base
    for node in views:
        try:
            tensor = _apply_view(node, tensor)
        except (RuntimeError, TypeError, ValueError, IndexError):
            return False
        if tensor is None or (tensor is not base and tensor._base is not base):
            return False
    if tensor.shape != base.shape or tensor.storage_offset() != 0:
        return False
    return all(a == b for a, b, size in zip(tensor.stride(), base.stride(), base.shape) if size > 1)


def _fold_stream_views(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``B(A(x) + h)``, where the view ops ``B`` undo the view ops ``A``, into
    ``x + B(h)``: the same sums, element for element, with the residual stream kept in one
    shape. OPT adds its MLP residual on a 2-D reshape of the stream and views the sum back; a
    diffusers temporal convolution adds its residual on a ``[batch, channels, frames, ...]``
    permutation of the ``[batch * frames, channels, ...]`` stream and permutes it back. Both hid
    the chain. Returns how many sums were folded."""
    folded = 0
    for add in list(gm.graph.nodes):
        if add.op not in ("call_function", "call_method") or not _is_add(add):
            continue
        # B: the add's single-user chain of views (the longest that undoes A wins).
        after: list[Node] = []
        node = add
        while len(node.users) == 1:
            user = next(iter(node.users))
            if not _is_view_call(user) or user.args[0] is not node:
                break
            after.append(user)
            node = user
        if not after:
            continue
        add_value = _value(add)
        for position in (0, 1):
            operand, other = add.args[position], add.args[1 - position]
            if not (isinstance(operand, Node) and isinstance(other, Node)):
                continue
            other_value = _value(other)
            if add_value is None or other_value is None or other_value.shape != add_value.shape:
                continue  # a broadcast operand: B(h) would not be h's view
            before: list[Node] = []  # A, innermost first
            while _is_view_call(operand):
                before.insert(0, operand)
                operand = operand.args[0]
            found = _fold_candidate(before, after, operand)
            if found is None or not _fold(gm, add, position, *found):
                continue
            folded += 1
            break
    return folded


_UNIT_SCALINGS = {operator.truediv: "/", torch.div: "/", operator.mul: "*", torch.mul: "*"}
_UNIT_SCALING_METHODS = {"div": "/", "__truediv__": "/", "mul": "*", "__mul__": "*"}


def _drop_unit_scalings(gm: torch.fx.GraphModule) -> int:
    """Replace ``x / 1.0`` and ``x * 1.0`` (``x`` a floating-point tensor) by ``x``: the same
    values, bit for bit. A diffusers ResNet ends in ``(x + h) / output_scale_factor``, which
    is 1 in every UNet config, and the division hid the residual stream from the next
    sublayer. A result that is written in place or returned stays a copy (dropping it would
    make the write reach ``x``, or the output alias it). Returns how many were dropped."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function":
            kind = _UNIT_SCALINGS.get(node.target)
        elif node.op == "call_method":
            kind = _UNIT_SCALING_METHODS.get(node.target)
        else:
            kind = None
        if kind is None or len(node.args) != 2 or node.kwargs:
            continue
        tensor, factor = node.args
        if kind == "*" and not isinstance(tensor, Node):
            tensor, factor = factor, tensor
        if not isinstance(tensor, Node) or isinstance(factor, bool) or factor != 1.0:
            continue
        value, out = _value(tensor), _value(node)
        same = value is not None and out is not None and (value.dtype, value.shape) == (out.dtype, out.shape)
        if not same or not value.dtype.is_floating_point:
            continue
        if any(user.op == "output" or node in _mutated_inputs(user) for user in node.users):
            continue
        node.replace_all_uses_with(tensor)
        gm.graph.erase_node(node)
        dropped += 1
    return dropped


def _fold_candidate(before: list[Node], after: list[Node], root: Node) -> tuple[Node, list[Node]] | None:
    """The stream ``x`` (``root`` or one of the views ``before``, which lead from ``root`` to
    the sum) and the views ``B`` after the sum such that ``B`` undoes the views from ``x``
    and ``B(sum)`` has the stream's dtype: the earliest stream and the longest ``B`` first."""
    for start in range(len(before)):
        stream = before[start - 1] if start else root
        stream_value = _value(stream)
        if stream_value is None:
            continue
        for end in range(len(after), 0, -1):
            out = _value(after[end - 1])
            if out is None or out.dtype != stream_value.dtype or out.shape != stream_value.shape:
                continue
            if _undoes(stream_value, before[start:] + after[:end]):
                return stream, after[:end]
    return None


def _fold(gm: torch.fx.GraphModule, add: Node, position: int, stream: Node, views_after: list[Node]) -> bool:
    """Replace ``views_after[-1]`` (``B(A(x) + h)``) by ``x + B(h)``, ``x`` at ``position``.
    ``B`` applies to ``h`` with ``reshape`` for ``view``: ``h``'s strides need not be the
    sum's. ``False``, the graph untouched, if ``B`` does not apply to ``h``."""
    graph = gm.graph
    other = add.args[1 - position]
    last = views_after[-1]
    fake_mode = _fake_mode([stream, other])
    try:
        with fake_mode:
            value = _value(other)
            for view in views_after:
                value = None if value is None else _apply_view(view, value, reshape=True)
    except (RuntimeError, TypeError, ValueError, IndexError):
        return False
    if value is None:
        return False
    created = []
    with graph.inserting_before(last):
        viewed = other
        for view in views_after:
            target = _view_target(view, reshape=True)
            viewed = graph.create_node(view.op, target, (viewed, *view.args[1:]), dict(view.kwargs))
            created.append(viewed)
        args = list(add.args)
        args[position], args[1 - position] = stream, viewed
        new_add = graph.create_node(add.op, add.target, tuple(args), dict(add.kwargs))
        created.append(new_add)
    with fake_mode:
        for node in created:
            node.meta["val"] = _call_on_values(node)
            node.meta["example_value"] = node.meta["val"]
    last.replace_all_uses_with(new_add)
    dead = [*reversed(views_after), add]
    operand = add.args[position]
    for node in dead:
        graph.erase_node(node)
    # A's views of the stream, when nothing else reads them.
    while isinstance(operand, Node) and operand is not stream and not operand.users and _is_view_call(operand):
        parent = operand.args[0]
        graph.erase_node(operand)
        operand = parent
    return True


def _call_on_values(node: Node) -> torch.Tensor:
    """``node``'s function or method applied to its arguments' values (under their fake mode)."""
    def value(arg: Node) -> Any:
        tensor = _value(arg)
        return tensor if tensor is not None else _symint(arg)

    args, kwargs = torch.fx.map_arg((node.args, node.kwargs), value)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def run_convert(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Rewrite residual chains ``x <- x + f_k(x)`` into the two-stream reversible form."""
    result = PassResult("reversible-convert")
    note = _checkpoint_note(gm, "residual blocks")
    if note:
        result.notes.append(note)
    dropped = _drop_unit_scalings(gm)
    if dropped:
        result.notes.append(f"{dropped} divisions or multiplications by 1.0 dropped (same values)")
    folded = _fold_stream_views(gm)
    if folded:
        result.notes.append(
            f"{folded} residual sum(s) of a reshaped or permuted stream viewed back to its shape folded into "
            "sums in the stream's shape (same values): B(A(x) + h) -> x + B(h), where the views B undo A"
        )
    graph = _Graph(gm)
    refused: dict[Node, str] = {}
    chains = _residual_chains(graph, refused)
    converted = {step.add for steps in chains for step in steps}
    post_norm = [(add, norm) for add, norm in _post_norm_adds(graph) if add not in converted]
    if len(post_norm) >= 2:
        (add, norm), *_ = post_norm
        result.notes.append(
            f"left alone: {len(post_norm)} post-norm residual blocks ({add.name} goes through {norm} before the "
            "next sublayer, as in BERT): x <- norm(x + f(x)) carries no residual stream across blocks; only pre-norm "
            "stacks x <- x + f(norm(x)) convert"
        )
    reasons = [reason for add, reason in refused.items() if add not in converted]
    for reason in list(dict.fromkeys(reasons))[:MAX_REFUSED_NOTES]:
        result.notes.append(f"left alone: residual {reason}")
    result.matched = len(chains)
    for steps in chains:
        values = [steps[0].source] + [step.add for step in steps]
        # Reads of an inner value x_k from outside the chain (taps: a UNet's skip connections),
        # found before the rewiring below adds reads of its own.
        taps = {
            k: [user for user in values[k].users if user not in steps[k].nodes and user is not steps[k].add]
            for k in range(1, len(steps))
        }
        taps = {k: users for k, users in taps.items() if users}
        # v_k = v_{k-2} + f_k(v_{k-1}): the skip term of step k >= 2 becomes the value two back.
        for k in range(1, len(steps)):
            steps[k].add.replace_input_with(values[k], values[k - 1])
        last = values[-1]
        after_chain = last.next
        merged = _merge_streams(gm, values[-2], last, after_chain)
        last.replace_all_uses_with(merged, delete_user_cb=lambda user: user not in (merged, merged.args[0]))
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        for k, users in taps.items():
            # As soon as the chain has run (the reversible pass puts its op there), or where
            # the tap is first read, if earlier.
            anchor = min([after_chain, *users], key=order.__getitem__)
            tap = _merge_streams(gm, values[k - 1], values[k], anchor)
            for user in users:
                user.replace_input_with(values[k], tap)
        result.rewrites += 1
        result.details.append(
            {"sublayers": len(steps), "first": steps[0].add.name, "last": steps[-1].add.name, "merge": "mean",
             "taps": [values[k].name for k in taps]}
        )
        result.notes.append(
            f"ARCHITECTURE CHANGED: residual chain of {len(steps)} sublayers ({steps[0].add.name} .. "
            f"{steps[-1].add.name}) rewritten to the two-stream reversible form "
            "v_k = v_{k-2} + f_k(v_{k-1}), v_-1 = v_0 = x, output (v_{n-1} + v_n)/2"
            + (
                f"; {len(taps)} inner values read outside the chain ({', '.join(values[k].name for k in taps)}) "
                "read (v_{k-1} + v_k)/2 in their place"
                if taps else ""
            )
            + "; same parameters, different function: train from scratch"
        )
    return result


def _merge_streams(gm: torch.fx.GraphModule, first: Node, second: Node, anchor: Node) -> Node:
    """``(first + second) * 0.5`` inserted before ``anchor``: the two streams merged."""
    with gm.graph.inserting_before(anchor):
        total = gm.graph.call_function(operator.add, (first, second))
        merged = gm.graph.call_function(operator.mul, (total, 0.5))
    with _fake_mode([second]):
        total.meta["val"] = total.meta["example_value"] = _value(first) + _value(second)
        merged.meta["val"] = merged.meta["example_value"] = total.meta["val"] * 0.5
    return merged


class _ConvertPass(GraphPass):
    """``reversible-convert`` runs only when ``reversible="convert"`` is named."""

    def requested(self, config) -> bool:
        return getattr(config, self.config_field) == "convert"


REVERSIBLE_CONVERT = _ConvertPass(
    "reversible-convert", "reversible", run_convert, changes_results=True, applies_to="training"
)
REVERSIBLE = GraphPass("reversible", "reversible", run_reversible, applies_to="training")
