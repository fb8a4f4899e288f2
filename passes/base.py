"""The contract between the pass driver and a pass (see README.md beside this file)."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Node
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

from memopt._torch_compat import StorageWeakRef, fake_tensor_mode
from memopt.config import Config
from memopt.ops import reversible as reversible_ops
from memopt.report import PassResult


# ``gm.meta[BEFORE_CALL]``: callables a pass registers to run on each call's inputs before
# the compiled graph does (the backend wraps the compiled function when any are there). The
# monarch pass keeps its frozen factors the projection of the weights the call passes.
BEFORE_CALL = "memopt_before_call"


@dataclasses.dataclass
class PassContext:
    """What a pass may know about the graph it rewrites."""

    config: Config
    example_inputs: Sequence[Any]
    """Dynamo's example inputs: real tensors, parameters and buffers included."""
    training: bool
    """True when the graph will be differentiated (AOTAutograd builds a joint graph)."""
    device: torch.device
    option: Any = None
    """The value of this pass's ``Config`` field (set by the driver before ``run``)."""


@dataclasses.dataclass(frozen=True)
class GraphPass:
    """One rewrite of Dynamo's FX graph (torch IR), switched by one ``Config`` field."""

    name: str
    config_field: str
    """The ``Config`` field that switches the pass; ``False``/``None`` turn it off."""
    run: Callable[[torch.fx.GraphModule, PassContext], PassResult]
    """Rewrite ``gm`` in place and return what was done. The driver hands the pass a copy of
    the graph and keeps it only if ``run`` returns, so a pass that raises changes nothing."""
    changes_results: bool = False
    """True for passes that change results on purpose; they must be opt-in (default off)."""
    applies_to: str = "both"
    """``"inference"``, ``"training"`` or ``"both"``: graphs the pass is run on."""

    def requested(self, config: Config) -> bool:
        """Whether ``config`` switches the pass on, for whichever graphs it applies to."""
        value = getattr(config, self.config_field)
        return value is not False and value is not None

    def enabled(self, config: Config, training: bool) -> bool:
        return self.requested(config) and self.applies_to in ("both", "training" if training else "inference")


def transformed_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes that run under a ``torch.func`` transform Dynamo inlined into the graph: from a
    ``_vmap_increment_nesting`` (or ``_grad_``/``_jvp_``) call to its matching decrement.

    Their tensors are batched or grad-wrapped at run time, and memopt's custom ops have no
    batching or transform rules (transformers' Mamba vmaps its associative scan: a sliced
    group there failed the lowering). Passes leave these nodes alone; the driver rejects a
    pass that puts a memopt op among them."""
    inside: set[torch.fx.Node] = set()
    depth = 0
    for node in graph.nodes:
        name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
        if name.endswith("_increment_nesting"):
            depth += 1
        if depth > 0:
            inside.add(node)
        if name.endswith("_decrement_nesting"):
            depth = max(depth - 1, 0)
    return inside


# In-place operators as Dynamo records them (``x += y``, ``x[i] = v``), as functions and as
# methods: they write their first argument.
_IN_PLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.setitem,
})
_IN_PLACE_DUNDERS = frozenset(f"__{op.__name__}__" for op in _IN_PLACE_OPERATORS)
# Functional ops that take ``inplace`` positionally, and where (F.relu(x, True)).
_INPLACE_ARGUMENT = {
    "relu": 1, "relu6": 1, "selu": 1, "silu": 1, "hardswish": 1, "hardsigmoid": 1, "mish": 1,
    "elu": 2, "celu": 2, "leaky_relu": 2, "hardtanh": 3, "threshold": 3, "rrelu": 4,
    "dropout": 3, "dropout1d": 3, "dropout2d": 3, "dropout3d": 3, "alpha_dropout": 3, "feature_alpha_dropout": 3,
}


def written_values(node: torch.fx.Node) -> list[Any]:
    """The values ``node`` writes in place: the first argument of an in-place method
    (``mul_``), operator (``+=``, ``x[i] = v``) or function (``torch.relu_``,
    ``inplace=True``), the arguments an aten op's schema marks written, its ``out=``
    tensors; nothing for an op that writes only its own result.

    A Dynamo graph is not functionalized: a write there is no edge to the reads after it,
    so a pass that moves ops must not move a read across a write to what it reads."""
    if node.op not in ("call_function", "call_method"):
        return []
    first = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op == "call_function":
        out = node.kwargs.get("out")
        if out is not None:
            return list(out) if isinstance(out, (list, tuple)) else [out]
        try:
            if node.target in _IN_PLACE_OPERATORS:
                return [first]
        except TypeError:  # unhashable target
            pass
        schema = getattr(node.target, "_schema", None)
        if isinstance(schema, torch.FunctionSchema):
            return [
                node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
                for i, argument in enumerate(schema.arguments)
                if argument.alias_info is not None and argument.alias_info.is_write
            ]
        position = _INPLACE_ARGUMENT.get(name)
        if position is not None and len(node.args) > position and node.args[position] is True:
            return [first]
    if name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("_")):
        return [first]
    if node.kwargs.get("inplace") is True:
        return [first]
    return []


def value_storages(values: Iterable[Any]) -> set[Any] | None:
    """The storages behind the tensors of ``values`` (graph nodes, by their fake values: a view
    shares its base's), or ``None`` where a node's is unknown (no tensor metadata). Python
    numbers have none."""
    storages = set()
    for value in values:
        if not isinstance(value, torch.fx.Node):
            continue
        meta = value.meta.get("val", value.meta.get("example_value"))
        if meta is None:
            return None
        leaves = tree_leaves(meta)
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        numbers = (int, float, bool, torch.SymInt, torch.SymFloat)
        if not all(isinstance(leaf, (torch.Tensor, *numbers)) for leaf in leaves):
            return None  # something else, which might hold a tensor
        try:
            storages.update(StorageWeakRef(tensor.untyped_storage()) for tensor in tensors)
        except (NotImplementedError, RuntimeError):
            return None
    return storages


# A write in place: (position in the graph, the node, the values it writes).
Write = tuple[int, torch.fx.Node, list[Any]]


def in_place_writes(nodes: Sequence[torch.fx.Node]) -> list[Write]:
    """Every node of ``nodes`` (a graph in order) that writes a value in place."""
    return [(at, node, written) for at, node in enumerate(nodes) if (written := written_values(node))]


def first_write_to(
    values: Iterable[torch.fx.Node], writes: Sequence[Write], start: int, end: int, skip: Iterable[torch.fx.Node] = ()
) -> Write | None:
    """The first of ``writes`` placed strictly between positions ``start`` and ``end``, by a
    node not in ``skip``, to the storage of one of ``values`` (or to a storage it cannot tell:
    a value without tensor metadata on either side counts as hit).

    A pass that runs a set of ops as one op at one place uses it: that op reads its inputs
    there, and a Dynamo graph has no edge from an in-place write to the reads after it."""
    skip = set(skip)
    candidates = [write for write in writes if start < write[0] < end and write[1] not in skip]
    if not candidates:
        return None
    storages = value_storages(values)
    for write in candidates:
        written = value_storages(write[2])
        if storages is None or written is None or written & storages:
            return write
    return None


# ---------------------------------------------------------------------------------------------
# Random draws: a pass that recomputes ops (reversible) must replay their draws; one that moves
# ops (slicing) must not reorder them.
# ---------------------------------------------------------------------------------------------

# Functions that draw random numbers, by name.
_RANDOM_NAMES = frozenset(
    {
        "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
        "feature_dropout", "native_dropout", "rand", "randn", "rand_like", "randn_like", "randint",
        "randint_like", "randperm", "bernoulli", "bernoulli_", "normal", "normal_", "uniform_",
        "multinomial", "exponential_", "poisson", "cauchy_", "geometric_", "log_normal_",
        "random_", "rrelu",
    }
)
# Calls that switch autocast or grad mode for the ops after them (Dynamo keeps
# ``torch.autocast`` and ``torch.no_grad`` blocks as such calls).
MODE_SWITCHES = frozenset({"_enter_autocast", "_exit_autocast", "_set_grad_enabled"})


def target_name(node: Node) -> str:
    """The name of what ``node`` calls: a method's name, a function's ``__name__``."""
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def draws_random(node: Node, deterministic: tuple[str, ...] = ()) -> bool:
    """Whether ``node`` may draw random numbers: a random function by name (dropout only with
    ``p > 0`` in training), attention with ``dropout_p > 0``, an operator that
    :func:`memopt.ops.reversible.may_draw_random` counts (``deterministic``: custom ops the
    user declared free of draws), a memopt chain op with random steps, or a call that reaches
    one of those when run on its fake values (:func:`_runs_random_ops`)."""
    if reversible_ops.may_draw_random(node.target, deterministic) or reversible_ops.chain_draws_random(node):
        return True
    name = target_name(node)
    if "dropout" in name and node.op == "call_function":
        # F.dropout(input, p, training, inplace): p == 0 or training=False draws nothing.
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        if (isinstance(p, (int, float)) and p == 0) or training is False:
            return False
    if name in _RANDOM_NAMES:
        return True
    if name == "scaled_dot_product_attention":
        p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        return not (isinstance(p, (int, float)) and p == 0)
    # Kept on the node: passes ask again of the same nodes (the reversible pass once per chain
    # search, about twice per node on a converted UNet), and a run costs about a millisecond.
    cache = node.meta.setdefault("memopt_runs_random_ops", {})
    if deterministic not in cache:
        cache[deterministic] = _runs_random_ops(node, deterministic)
    return cache[deterministic]


class _DrawRecorder(TorchDispatchMode):
    """Notes whether an operator that may draw random numbers runs beneath it."""

    def __init__(self, deterministic: tuple[str, ...]) -> None:
        super().__init__()
        self.deterministic = deterministic
        self.draws = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.draws = self.draws or reversible_ops.may_draw_random(func, self.deterministic)
        return func(*args, **(kwargs or {}))


def _runs_random_ops(node: Node, deterministic: tuple[str, ...] = ()) -> bool:
    """Whether ``node``'s call, run on its fake values, reaches an aten or custom op that may
    draw random numbers (:func:`memopt.ops.reversible.may_draw_random`). Names do not tell:
    Dynamo keeps ``F.gumbel_softmax`` as one call, and ``torch.binomial``,
    ``torch._standard_gamma`` (``Gamma.rsample``), ``torch._sample_dirichlet`` or
    ``torch.rrelu_`` name no list; the ops they run carry the ``nondeterministic_seeded`` tag.
    A call that cannot be run so counts as drawing: replaying an RNG state nothing draws from
    costs a few bytes, not replaying one that is drawn from gives wrong gradients. Calls
    without a tensor input are not run (random factories are known by name; a grad-mode
    switch would switch this process's mode)."""
    target = node.target
    if node.op not in ("call_function", "call_method") or isinstance(target, torch._ops.HigherOrderOperator):
        return False  # a higher-order op's bodies are looked at node by node
    if getattr(target, "__module__", None) == "_operator":
        return False  # Python's operators: tensor arithmetic, indexing
    if target_name(node) in MODE_SWITCHES:
        return False  # switches global state, draws nothing
    values = [_meta_value(arg) for arg in node.all_input_nodes]
    if any(value is None for value in values):
        return True
    if not any(isinstance(value, torch.Tensor) for value in tree_leaves(values)):
        return False  # no tensor in: a random factory (torch.randn(shape)) is known by name
    modes = [mode for value in tree_leaves(values) if (mode := fake_tensor_mode(value)) is not None]
    grad_enabled = torch.is_grad_enabled()
    try:
        with modes[0] if modes else FakeTensorMode() as fake_mode, _DrawRecorder(deterministic) as recorder:
            # Copies: an in-place op must not write the graph's metadata.
            def copy(tensor: torch.Tensor) -> torch.Tensor:
                return (tensor if fake_tensor_mode(tensor) is not None else fake_mode.from_tensor(tensor)).clone()

            copies = {arg: tree_map_only(torch.Tensor, copy, value) for arg, value in zip(node.all_input_nodes, values)}
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), copies.__getitem__)
            if node.op == "call_method":
                getattr(args[0], target)(*args[1:], **kwargs)
            else:
                target(*args, **kwargs)
    except Exception:
        return True
    finally:
        torch.set_grad_enabled(grad_enabled)
    return recorder.draws


def _meta_value(node: Node) -> Any:
    return node.meta.get("val", node.meta.get("example_value"))
