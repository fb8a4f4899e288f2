"""Reversible chains: run a chain of additive couplings saving only its final outputs.

A chain is a sequence of *steps* over two streams. With ``v[-1] = x1`` and ``v[0] = x2``,
step ``k`` computes ``v[k] = scale_k * v[k-2] + H_k(v[k-1])``; a coupling
``y1 = a*x1 + F(x2); y2 = b*x2 + G(y1)`` is two steps (``H_1 = F``, ``H_2 = G``). Because
``v[k-2] = (v[k] - H_k(v[k-1])) / scale_k``, the backward pass can rebuild every value from
the last two, recompute each ``H_k`` and take its gradient, so nothing per step is kept
between forward and backward (RevNet, Gomez et al. 2017; the Reformer).

Two users share the functions here:

* ``memopt.nn.ReversibleSequential`` in eager mode, through a ``torch.autograd.Function``;
* the ``reversible`` graph pass, which replaces a chain found in a Dynamo graph by
  ``torch.ops.memopt.reversible_chain``. That op's autograd saves only the final stream
  values (and, for steps with random ops, the RNG state before the step), and its backward,
  ``torch.ops.memopt.reversible_chain_backward``, rebuilds and recomputes. AOTAutograd traces
  both into the joint graph as two nodes, so the partitioned forward graph saves nothing
  per step, whatever the partitioner decides elsewhere in the graph.

Random ops replay the same numbers: the RNG state before each random step is recorded in the
forward pass and restored for its recomputation (as ``torch.utils.checkpoint`` does).
Buffers a step mutates (BatchNorm running statistics) are updated once, in the forward pass.
The recomputation never touches them: the op's backward runs it without them (``None``:
training-mode BatchNorm normalizes with the batch's own statistics and, given no running
statistics, updates none), and ``memopt.nn``'s eager path, whose buffers may be anything,
on throw-away copies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Callable, Collection, Sequence

import torch

from memopt._torch_compat import autograd_inside_kernel, vjp_unchecked
from memopt.ops.autocast_state import AutocastState, current, under

Tensor = torch.Tensor

MAX_REBUILD_GAIN = 16.0
"""Largest factor by which a chain may amplify rounding errors in its rebuilt inputs.

Rebuilding ``v[k-2] = (v[k] - H(v[k-1])) / scale`` multiplies the error already in ``v[k]``
by ``1/|scale|``; over a chain the factors multiply. With ``b = 0.5`` in every coupling, 32
couplings amplify float32 rounding by 2**32 and the first blocks' gradients are garbage
(measured: relative error ~1). A scale above 1 amplifies too, relative to the value rebuilt:
``v[k]`` is ``|scale|`` times larger, and its rounding lands on the smaller ``v[k-2]``
(``a = 2`` over 12 couplings: first gradients 8e-5 off, eager's 2e-7). Chains are therefore
cut into segments whose product of :func:`rebuild_factor` stays within this bound (16: at
most 4 bits of float32's 24); each segment keeps its own two outputs."""


def rebuild_factor(scale: float) -> float:
    """How much rebuilding through a step of this scale amplifies relative rounding error:
    ``max(|scale|, 1/|scale|)`` (1 for a plain residual)."""
    return max(abs(scale), 1.0 / abs(scale))


StepFn = Callable[[Tensor, Sequence[Tensor], Sequence[Tensor], Sequence[int]], Tensor]
"""``H(x, params, consts, sizes) -> h``: one step's function of its stream input, its
differentiable external tensors (parameters), its other external tensors (buffers, masks)
and the symbolic sizes it reads (dynamic shapes; empty otherwise)."""


@dataclasses.dataclass
class Step:
    """One additive half-coupling ``v[k] = scale * v[k-2] + fn(v[k-1], params, consts)``."""

    fn: StepFn
    scale: float
    param_index: list[int]
    """Positions in the chain's parameter list of the parameters ``fn`` takes, in order."""
    const_index: list[int]
    """Positions in the chain's constant list of the constants ``fn`` takes, in order."""
    random: bool = False
    """Whether ``fn`` draws random numbers (dropout); its RNG state is then recorded."""
    size_index: list[int] = dataclasses.field(default_factory=list)
    """Positions in the chain's size list of the (symbolic) sizes ``fn`` takes, in order."""


@dataclasses.dataclass
class Chain:
    """Steps plus which constants they mutate (buffers: BatchNorm running statistics)."""

    steps: list[Step]
    mutated_consts: list[int] = dataclasses.field(default_factory=list)
    """Positions in the constant list of buffers the steps update in place."""
    rng_bytes: int = 0
    """Bytes of one RNG state on the chain's device (see :func:`rng_state_bytes`)."""
    autocast: AutocastState | None = None
    """The autocast state the chain was traced under: its forward and its recomputation in
    the backward both run under it (see :mod:`memopt.ops.autocast_state`); ``None`` leaves
    the ambient state alone."""
    deterministic_ops: tuple[str, ...] = ()
    """Custom ops the user declared free of random draws (``reversible_deterministic_ops``):
    tracing the chain must count random ops as the pass did."""
    side_outputs: tuple[int, ...] = ()
    """Steps (ascending, none of the last two) whose results are returned too: values the
    graph reads after the chain besides its two final ones (a UNet's skip connections). They
    are outputs, not saved for the backward, which adds their incoming gradients as it
    rebuilds them."""

    @property
    def random_steps(self) -> int:
        return sum(step.random for step in self.steps)

    def side_stream(self, number: int) -> int:
        """Which stream (1 or 2) side output ``number`` (a position in :attr:`side_outputs`)
        belongs to: step ``k`` updates stream 1 when ``k`` is even."""
        return 1 if self.side_outputs[number] % 2 == 0 else 2


# --- RNG state per random step ------------------------------------------------------------


def _get_rng_state(device: torch.device) -> Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_rng_state(state: Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


# Operator namespaces whose ops declare their random draws with the ``nondeterministic_seeded``
# tag (PyTorch's own, ``prim::device`` included: it runs when a function asks a tensor's
# device), or draw none (memopt's; the functional collectives).
_DECLARED_NAMESPACES = frozenset({
    "aten", "prims", "prim", "mkldnn", "onednn", "quantized", "_quantized", "quantized_decomposed", "memopt",
    "_c10d_functional", "c10d_functional",
})


def may_draw_random(target: object, deterministic: Collection[str] = ()) -> bool:
    """Whether the operator ``target`` may draw from the generator, so that a step running it
    must draw the same numbers again when recomputed: tagged ``nondeterministic_seeded``, or
    a custom op of another library, which may draw without the tag (a fused attention
    kernel's dropout, say) and cannot be seen into, unless the user declared it
    ``deterministic`` (namespaces or qualified names: the ``reversible_deterministic_ops``
    option). Replaying a generator state that nothing draws from costs a few bytes; not
    replaying one that is drawn from would silently give wrong gradients."""
    return _declares_random(target) or assumed_random(target, deterministic)


def assumed_random(target: object, deterministic: Collection[str] = ()) -> bool:
    """Whether ``target`` is a custom op that :func:`may_draw_random` counts as random only
    because it cannot see inside it (no ``nondeterministic_seeded`` tag, another library,
    not named in ``deterministic``)."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        names = (target._qualified_op_name,)
    elif isinstance(target, torch._ops.OpOverload):
        names = (target._schema.name, f"{target._schema.name}.{target._overloadname}")
    else:
        return False
    namespace = names[0].split("::")[0]
    if namespace in _DECLARED_NAMESPACES or _declares_random(target):
        return False
    return not any(name in deterministic for name in (namespace, *names))


def _declares_random(target: object) -> bool:
    if isinstance(target, torch._ops.OpOverloadPacket):
        return any(_declares_random(getattr(target, name)) for name in target.overloads())
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags


def rng_state_bytes(device: torch.device) -> int:
    """Bytes of one recorded RNG state on ``device`` (5056 on CPU, 16 on CUDA)."""
    return _get_rng_state(device).numel()


# --- The chain's forward and backward, shared by the eager Function and the op ------------


def chain_forward(
    chain: Chain,
    x1: Tensor,
    x2: Tensor,
    params: Sequence[Tensor],
    consts: Sequence[Tensor],
    sizes: Sequence[int] = (),
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Run the chain without building an autograd graph.

    Returns the last values of stream 1 (the one ``x1`` starts) and stream 2, the RNG
    states recorded before each random step, stacked (``uint8``, one row per random step;
    zero rows when no step is random), and the results of the steps in
    ``chain.side_outputs``. ``consts`` listed in ``chain.mutated_consts`` are updated in
    place, once.
    """
    device = x1.device
    states = []
    sides = []
    side_steps = set(chain.side_outputs)
    previous, current = x1, x2
    with torch.no_grad(), under(chain.autocast):
        for number, step in enumerate(chain.steps):
            if step.random:
                states.append(_get_rng_state(device).clone())
            h = step.fn(
                current,
                [params[i] for i in step.param_index],
                [consts[i] for i in step.const_index],
                [sizes[i] for i in step.size_index] if step.size_index else (),
            )
            update = previous if step.scale == 1.0 else previous * step.scale
            previous, current = current, update + h
            if number in side_steps:
                sides.append(current)
    if len(chain.steps) % 2 == 0:
        stream1, stream2 = previous, current
    else:
        stream1, stream2 = current, previous
    if states:
        rng = torch.stack(states)
    else:
        rng = torch.empty((0, chain.rng_bytes), dtype=torch.uint8, device=device)  # see _rng_device
    return stream1, stream2, rng, sides


def chain_backward(
    chain: Chain,
    stream1: Tensor,
    stream2: Tensor,
    grad1: Tensor | None,
    grad2: Tensor | None,
    rng: Tensor,
    params: Sequence[Tensor],
    consts: Sequence[Tensor | None],
    params_are_leaves: bool = False,
    sizes: Sequence[int] = (),
    side_grads: Sequence[Tensor | None] = (),
) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    """Gradients of the chain's inputs and parameters from its outputs alone.

    Walks the steps backwards: recompute ``h = H_k(v[k-1])`` (with the recorded RNG state for
    a random step, on copies of mutated buffers), rebuild ``v[k-2] = (v[k] - h) / scale``,
    and back-propagate ``dv[k]`` through ``h``. A mutated buffer given as ``None`` stays
    ``None`` in the recomputation (the graph pass's chains, whose mutated buffers are only
    ever training-mode BatchNorm's running statistics: no copy, no update).
    ``params_are_leaves``: the tensors in ``params`` are already leaves requiring grad (module
    parameters in eager mode); otherwise each is detached into one. ``side_grads``: the
    incoming gradients of ``chain.side_outputs``, in order (``None`` for none), added to
    each value's gradient when the walk rebuilds it. Returns ``(grad_x1, grad_x2,
    grad_params)``; a parameter no step reaches gets ``None``.

    Each step's ``h`` is computed once, with autograd, and serves both the rebuild and the
    gradient. The loop runs under one ``enable_grad`` and calls the autograd engine directly
    (:func:`vjp_unchecked`): in a launch-bound chain the per-step Python around the step's
    own ops is what separates this from an ordinary backward.
    """
    device = stream1.device
    n = len(chain.steps)
    if n % 2 == 0:
        previous, current = stream1.detach(), stream2.detach()
        grad_previous, grad_current = grad1, grad2
    else:
        previous, current = stream2.detach(), stream1.detach()
        grad_previous, grad_current = grad2, grad1
    if grad_previous is None:
        grad_previous = torch.zeros_like(previous)
    if grad_current is None:
        grad_current = torch.zeros_like(current)

    # Inside the op the parameters arrive as plain tensors: make each a leaf of its own.
    leaves = list(params) if params_are_leaves else [p.detach().requires_grad_(True) for p in params]
    # Recomputation must not touch the real buffers: BatchNorm updated them in the forward.
    scratch_consts = list(consts)
    for i in chain.mutated_consts:
        if consts[i] is not None:
            scratch_consts[i] = consts[i].clone()
    param_grads: list[Tensor | None] = [None] * len(leaves)

    rng_row = chain.random_steps
    # Rebuilding with step k gives v[k-2], the result of step k - 2: a side output's gradient
    # joins the skip term's there, before any earlier step reads it.
    side_grad_of = {step + 2: g for step, g in zip(chain.side_outputs, side_grads, strict=True) if g is not None}
    trained_index = [[i for i in step.param_index if leaves[i].requires_grad] for step in chain.steps]
    with torch.enable_grad(), under(chain.autocast):
        for step_number in reversed(range(n)):
            step = chain.steps[step_number]
            step_params = [leaves[i] for i in step.param_index]
            step_consts = [scratch_consts[i] for i in step.const_index]
            step_sizes = [sizes[i] for i in step.size_index] if step.size_index else ()
            # ``previous`` is a tensor of our own, computed without autograd: a leaf already.
            x = previous.requires_grad_(True)
            if step.random:
                rng_row -= 1
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    _set_rng_state(rng[rng_row].clone(), device)
                    h = step.fn(x, step_params, step_consts, step_sizes)
            else:
                h = step.fn(x, step_params, step_consts, step_sizes)
            rebuilt = current - h.detach()
            if step.scale != 1.0:
                rebuilt = rebuilt / step.scale
            trained = trained_index[step_number]
            if h.requires_grad:
                grads = vjp_unchecked(h, grad_current, [x] + [leaves[i] for i in trained])
            else:
                grads = (None,) * (1 + len(trained))
            del h
            grad_x = grads[0]
            grad_rebuilt = grad_current if step.scale == 1.0 else grad_current * step.scale
            if step_number in side_grad_of:
                grad_rebuilt = grad_rebuilt + side_grad_of[step_number]
            new_grad_current = grad_previous if grad_x is None else grad_previous + grad_x
            for i, g in zip(trained, grads[1:]):
                if g is not None:
                    param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
            current, previous = x.detach(), rebuilt
            grad_current, grad_previous = new_grad_current, grad_rebuilt
            del grads
    # Now ``previous`` is v[-1] = x1 and ``current`` is v[0] = x2.
    return grad_previous, grad_current, param_grads


# --- The custom ops the graph pass inserts -------------------------------------------------

_CHAINS: dict[str, Chain] = {}
_counter = itertools.count()


def register_chain(chain: Chain, fingerprint: str) -> str:
    """Keep ``chain`` for the ops to run, under a key the graph carries as a string argument.

    ``fingerprint`` (the steps' code, scales, shapes) goes into the key so that Inductor's
    FX graph cache, which keys on the graph text, never confuses two different chains.
    """
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    key = f"chain{next(_counter)}-{digest}"
    _CHAINS[key] = chain
    return key


def _chain(key: str) -> Chain:
    try:
        return _CHAINS[key]
    except KeyError:
        raise RuntimeError(
            f"memopt reversible chain {key!r} is not registered in this process; graphs holding "
            "memopt::reversible_chain run only where memopt's reversible pass built them"
        ) from None


def chain_draws_random(node: torch.fx.Node) -> bool:
    """Whether ``node`` calls ``memopt::reversible_chain`` on a chain with random steps: run
    again, it draws again (a chain nested in a step of another is recomputed with that step,
    which must replay its draws)."""
    return (
        node.op == "call_function"
        and node.target in (torch.ops.memopt.reversible_chain.default, torch.ops.memopt.reversible_chain)
        and _chain(node.args[0]).random_steps > 0
    )


@torch.library.custom_op("memopt::reversible_chain", mutates_args=())
def reversible_chain(
    key: str, x1: Tensor, x2: Tensor, params: list[Tensor], consts: list[Tensor], sizes: list[int]
) -> list[Tensor]:
    """Run registered chain ``key`` on ``(x1, x2)``.

    Returns ``[stream1, stream2, rng_states, *new_buffers, *side_outputs]``: the final stream
    values, the RNG state recorded before each random step, the updated values of the
    buffers the chain mutates (``consts`` themselves are not modified; the graph copies these
    back), and the results of the steps in ``Chain.side_outputs``.
    """
    return chain_op_forward(_chain(key), x1, x2, params, consts, sizes)


def chain_op_forward(
    chain: Chain, x1: Tensor, x2: Tensor, params: Sequence[Tensor], consts: Sequence[Tensor], sizes: Sequence[int]
) -> list[Tensor]:
    """What ``memopt::reversible_chain`` computes, as a plain function: the op's kernel, and
    what :mod:`memopt.reversible_inline` traces into the forward graph in its place."""
    scratch = list(consts)
    if chain.mutated_consts:
        # One multi-tensor copy instead of a clone per buffer: on a GPU a RevNet's BatchNorm
        # statistics would otherwise cost two tiny kernel launches per block.
        originals = [consts[i] for i in chain.mutated_consts]
        copies = [torch.empty_like(c) for c in originals]
        torch._foreach_copy_(copies, originals)
        for i, copy_ in zip(chain.mutated_consts, copies):
            scratch[i] = copy_
    stream1, stream2, rng, sides = chain_forward(chain, x1, x2, params, scratch, sizes)
    buffers = [scratch[i] for i in chain.mutated_consts]
    return [stream1.contiguous(), stream2.contiguous(), rng] + buffers + [side.contiguous() for side in sides]


def _rng_device(chain: Chain, x1: Tensor) -> torch.device:
    """Where the op's RNG-state output lives: on the CPU for a chain with random steps (RNG
    states are CPU tensors, on CUDA too), else on the chain's own device. An empty tensor costs
    nothing, but one CPU tensor in a CUDA graph makes Inductor skip CUDA graphs for the whole
    graph (and the backward graph, which takes it as an input)."""
    return torch.device("cpu") if chain.random_steps else x1.device


@reversible_chain.register_fake
def _(key: str, x1: Tensor, x2: Tensor, params: list[Tensor], consts: list[Tensor], sizes: list[int]) -> list[Tensor]:
    chain = _chain(key)
    dtype = torch.promote_types(x1.dtype, x2.dtype)
    rng = x1.new_empty((chain.random_steps, chain.rng_bytes), dtype=torch.uint8, device=_rng_device(chain, x1))
    buffers = [torch.empty_like(consts[i]) for i in chain.mutated_consts]
    streams = {1: x1, 2: x2}
    sides = [streams[chain.side_stream(i)] for i in range(len(chain.side_outputs))]
    return [x1.new_empty(x1.shape, dtype=dtype), x2.new_empty(x2.shape, dtype=dtype), rng] + buffers + [
        side.new_empty(side.shape, dtype=dtype) for side in sides
    ]


@torch.library.custom_op("memopt::reversible_chain_backward", mutates_args=())
def reversible_chain_backward(
    key: str,
    stream1: Tensor,
    stream2: Tensor,
    grad1: Tensor,
    grad2: Tensor,
    rng: Tensor,
    params: list[Tensor],
    kept_consts: list[Tensor],
    sizes: list[int],
    side_grads: list[Tensor],
) -> list[Tensor]:
    """Gradients ``[grad_x1, grad_x2, *grad_params]`` of chain ``key`` from its outputs.

    ``kept_consts``: the chain's constants without the buffers it mutates (BatchNorm running
    statistics, which the recomputation runs without: see :func:`_setup_context`).
    ``side_grads``: the gradients of its side outputs (``Chain.side_outputs``)."""
    with autograd_inside_kernel():
        return chain_op_backward(
            _chain(key), stream1, stream2, grad1, grad2, rng, params, kept_consts, sizes, side_grads
        )


def chain_op_backward(
    chain: Chain,
    stream1: Tensor,
    stream2: Tensor,
    grad1: Tensor,
    grad2: Tensor,
    rng: Tensor,
    params: Sequence[Tensor],
    kept_consts: Sequence[Tensor],
    sizes: Sequence[int],
    side_grads: Sequence[Tensor] = (),
) -> list[Tensor]:
    """What ``memopt::reversible_chain_backward`` computes, as a plain function (it needs
    autograd: the op's kernel enables it, tracing has it)."""
    consts = _with_mutated_as_none(chain, kept_consts)
    grad_x1, grad_x2, param_grads = chain_backward(
        chain, stream1, stream2, grad1, grad2, rng, params, consts, sizes=sizes, side_grads=side_grads
    )
    filled = [torch.zeros_like(p) if g is None else g for p, g in zip(params, param_grads)]
    return [grad_x1.contiguous(), grad_x2.contiguous()] + [g.contiguous() for g in filled]


def _with_mutated_as_none(chain: Chain, kept: Sequence[Tensor]) -> list[Tensor | None]:
    """The full constant list of ``chain`` from the kept ones, ``None`` where it mutates."""
    mutated = set(chain.mutated_consts)
    kept_iter = iter(kept)
    consts = [None if i in mutated else next(kept_iter) for i in range(len(kept) + len(mutated))]
    if next(kept_iter, None) is not None:
        raise RuntimeError("memopt::reversible_chain_backward: more constants than the chain has")
    return consts


@reversible_chain_backward.register_fake
def _(key, stream1, stream2, grad1, grad2, rng, params, kept_consts, sizes, side_grads) -> list[Tensor]:
    # Contiguous, as the kernel returns them: ``empty_like`` would copy the strides of a
    # parameter that is a view (a transposed key projection), and the backward graph would
    # then view the real, contiguous gradient with strides it does not have.
    contiguous = torch.contiguous_format
    return [stream1.new_empty(stream1.shape), stream2.new_empty(stream2.shape)] + [
        torch.empty_like(p, memory_format=contiguous) for p in params
    ]


def _setup_context(ctx, inputs, output) -> None:
    key, _x1, _x2, params, consts, sizes = inputs
    chain = _chain(key)
    ctx.key = key
    ctx.num_params = len(params)
    ctx.num_consts = len(consts)
    ctx.sizes = list(sizes)
    # Buffers the chain updates (BatchNorm running statistics) are not kept: the pass only
    # accepts them as the running statistics of training-mode BatchNorm, which normalizes with
    # the batch's own statistics and never reads them, so the recomputation runs without them
    # (``None``), which also spares it their update: no copies, no zeros, no extra kernels.
    mutated = set(chain.mutated_consts)
    kept = [c for i, c in enumerate(consts) if i not in mutated]
    # RNG states and updated buffers carry no gradient (and buffers must not join the graph).
    ctx.mark_non_differentiable(*output[2 : 3 + len(mutated)])
    ctx.side_start = 3 + len(mutated)
    # Only the final stream values and the RNG states: nothing per step (side outputs are
    # the graph's to keep, for what reads them).
    ctx.save_for_backward(output[0], output[1], output[2], *params, *kept)


def _backward(ctx, grads):
    stream1, stream2, rng, *rest = ctx.saved_tensors
    params, kept = rest[: ctx.num_params], rest[ctx.num_params :]
    grad1 = grads[0] if grads[0] is not None else torch.zeros_like(stream1)
    grad2 = grads[1] if grads[1] is not None else torch.zeros_like(stream2)
    chain = _chain(ctx.key)
    streams = {1: stream1, 2: stream2}
    side_grads = [
        g if g is not None else torch.zeros_like(streams[chain.side_stream(i)])
        for i, g in enumerate(grads[ctx.side_start :])
    ]
    out = torch.ops.memopt.reversible_chain_backward(
        ctx.key, stream1, stream2, grad1, grad2, rng, params, kept, ctx.sizes, side_grads
    )
    # torch.library wants None for a non-empty int list and an empty list for an empty one.
    return None, out[0], out[1], list(out[2:]), [None] * ctx.num_consts, (None if ctx.sizes else [])


reversible_chain.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("memopt::reversible_trace_boundary", mutates_args=())
def reversible_trace_boundary(step: int) -> None:
    """Does nothing. In a trace of a chain (``memopt/reversible_inline.py``) it marks where
    random step ``step`` begins (``-1``: where it ends), so that the random ops of the
    forward's trace can be matched with those of the backward's recomputation."""


@reversible_trace_boundary.register_fake
def _(step: int) -> None:
    return None


# --- Eager autograd for memopt.nn --------------------------------------------------------


class ReversibleChainFunction(torch.autograd.Function):
    """Eager autograd of a chain: saves the final streams (and RNG states), nothing per step.

    ``apply(chain, x1, x2, num_params, *params_then_consts)``; the steps' ``fn`` take the
    parameters as arguments (``functional_call``): the backward differentiates detached
    copies and returns their gradients.
    """

    @staticmethod
    def forward(ctx, chain: Chain, x1: Tensor, x2: Tensor, num_params: int, *tensors: Tensor):
        params, consts = list(tensors[:num_params]), list(tensors[num_params:])
        # The recomputation must run under the same autocast state as this forward.
        ctx.autocast = current(x1.device.type)
        stream1, stream2, rng, _sides = chain_forward(chain, x1, x2, params, consts)
        ctx.chain = chain
        ctx.num_params = num_params
        # The parameters too, though the forward keeps them anyway: autograd then checks their
        # version counters, so one changed in place before the backward raises, as in eager.
        ctx.save_for_backward(stream1, stream2, rng, *params)
        ctx.consts = consts
        return stream1, stream2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad1: Tensor | None, grad2: Tensor | None):
        # Once differentiable: the recomputation's graph is gone when this returns, so a
        # double backward (a gradient penalty) raises rather than differentiating nothing.
        stream1, stream2, rng, *params = ctx.saved_tensors
        # Leaves of their own: differentiating with respect to the parameters themselves would
        # run their hooks here and again when autograd accumulates the returned gradients.
        leaves = [p.detach().requires_grad_(p.requires_grad) for p in params]
        with under(ctx.autocast):
            grad_x1, grad_x2, param_grads = chain_backward(
                ctx.chain, stream1, stream2, grad1, grad2, rng, leaves, ctx.consts, params_are_leaves=True
            )
        return (None, grad_x1, grad_x2, None, *param_grads, *([None] * len(ctx.consts)))
