"""Every private PyTorch API memopt touches, in one place.

A PyTorch upgrade that moves one of these should be a one-file diff. Import the names
from here, never from ``torch._*`` directly. Inductor and AOTAutograd are imported on
first use, so ``import memopt`` stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = [
    "StorageWeakRef",
    "activation_memory_budget",
    "aot_autograd",
    "autograd_inside_kernel",
    "vjp_unchecked",
    "cast_like_autocast",
    "compile_fx",
    "custom_graph_pass_base",
    "custom_partitioner_base",
    "hash_of_files",
    "inductor_decompositions",
    "inductor_fixes",
    "inductor_fixes_key",
    "inductor_mode_options",
    "detect_fake_mode",
    "donated_buffer_indices",
    "dynamo_explain",
    "fake_tensor_mode",
    "make_boxed_func",
    "min_cut_rematerialization_partition",
    "never_recompute",
    "profiler_allocations",
    "profiler_running",
    "rng_state_operators",
    "size_hint",
    "takes_is_inference",
    "keyed_graph_pass",
    "known_contiguous",
    "known_equal",
    "trace_functional",
]


def compile_fx(gm: torch.fx.GraphModule, example_inputs: list[Any], config_patches: dict[str, Any]) -> Any:
    """Inductor's entry point (handles inference and, through AOTAutograd, training).

    AOTAutograd's whole-graph cache is off for this call: a hit would skip memopt's
    partitioner, and with it the report of what the forward saves. Inductor's per-graph FX
    cache stays on, so the expensive code generation is still cached.
    """
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx as inductor_compile_fx

    with functorch_config.patch(enable_autograd_cache=False):
        return inductor_compile_fx(
            gm, example_inputs, inner_compile=_compile_fx_inner_fixed, config_patches=config_patches
        )


def _compile_fx_inner_fixed(*args: Any, **kwargs: Any) -> Any:
    """Inductor's per-graph compiler (forward, backward or inference graph; a backward is
    compiled at its first call), with :func:`inductor_fixes` in force."""
    from torch._inductor.compile_fx import compile_fx_inner

    with inductor_fixes():
        return compile_fx_inner(*args, **kwargs)


@contextlib.contextmanager
def inductor_fixes() -> Any:
    """Fix, for the graphs memopt compiles, Inductor bugs (PyTorch 2.13, C++/CPU backend) that
    silently give wrong results or corrupt memory. Each is a wrapper of one Inductor method,
    doing what that method does elsewhere in Inductor:

    - ``scheduler renames`` (``SchedulerNode.recompute_size_and_body``): found on a diffusers
      UNet's training step, where every weight gradient upstream of an upsampling layer came
      out as exactly 0. Before fusing, the C++ backend re-derives a node's loop body and
      recomputes its reads from scratch, by the buffers' original names; PyTorch renames them
      to the latest in-place write (``mutation_renames``) only when the node also has
      ordering-only dependencies. A node without them that reads a buffer after an in-place
      write forgets it: the gradient of nearest upsampling is an accumulating ``index_put``
      into zeros, and a pointwise op reading that (the backward of ``x / 1.0``) whose result
      must change layout for a channels-last convolution backward got fused with the zero
      fill, and so ran before the accumulation: it read zeros. The wrapper applies the rename
      in that case too.
    - ``tile atomic add`` (``CppTile2DKernel.store``): the backward of indexing a spatial
      dimension with a tensor before a convolution (``conv2d(x[..., idx])``) in a training
      step aborted the process (``double free or corruption``). That gradient is an
      accumulating ``index_put`` whose source is the channels-last convolution gradient, made
      a 2-D tile kernel; with more than one thread its atomic adds vectorize the index with
      ``ops.index_expr``, which in a tile kernel adds the tile's inner offset, already added
      by the tile's ``store``: the adds landed at the wrong places and past the buffer
      (pytorch/pytorch#191837; aarch64 gets wrong values instead, says its fix, #191861). The
      wrapper hands that path the index without the offset, so it is added once.

    Installed only while memopt compiles a graph (the user's own ``torch.compile`` calls are
    left as they are), and each only where PyTorch's code has the known shape of its bug; a
    PyTorch that changed it is left alone (``tests/test_backend.py`` watches each). Inductor's
    experimental out-of-process compiles (``TORCHINDUCTOR_FX_COMPILE_MODE=subprocess``) run
    without them."""
    fixes = _applicable_fixes()
    state = _fix_state
    if state["depth"] == 0:
        for owner, name, wrap in fixes:
            original = owner.__dict__[name]
            state["originals"].append((owner, name, original))
            setattr(owner, name, wrap(original))
    state["depth"] += 1
    try:
        yield
    finally:
        state["depth"] -= 1
        if state["depth"] == 0:
            for owner, name, original in reversed(state["originals"]):
                setattr(owner, name, original)
            state["originals"].clear()


# The methods inductor_fixes replaced, and how many memopt compiles are in progress (nested
# compiles keep the fixes installed until the outermost one ends).
_fix_state: dict[str, Any] = {"depth": 0, "originals": []}


def inductor_fixes_key() -> tuple[str, ...]:
    """Which of :func:`inductor_fixes` apply on this PyTorch (their names), for cache keys."""
    return tuple(_fix_names())


# A fix: what it wraps (the class, the method's name) and the wrapper, given the original.
_Fix = tuple[type, str, Callable[[Callable[..., Any]], Callable[..., Any]]]


def _applicable_fixes() -> list[_Fix]:
    return [_FIXES[name][1]() for name in _fix_names()]


@functools.cache
def _fix_names() -> list[str]:
    """The fixes whose bug this PyTorch's code has (by the known shape of that code)."""
    return [name for name, (has_bug, _fix) in _FIXES.items() if has_bug()]


def _source(owner: type, name: str) -> str:
    import inspect

    method = owner.__dict__.get(name)
    try:
        return inspect.getsource(method) if method is not None else ""
    except (OSError, TypeError):
        return ""


def _scheduler_drops_renames() -> bool:
    """``recompute_size_and_body`` renames only under ``if fake_deps:``."""
    from torch._inductor.scheduler import SchedulerNode

    source = _source(SchedulerNode, "recompute_size_and_body")
    return "if fake_deps:" in source and source.count("mutation_renames") == 1


def _scheduler_renames() -> _Fix:
    from torch._inductor.dependencies import StarDep, WeakDep
    from torch._inductor.scheduler import SchedulerNode

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def recompute_size_and_body(self: Any, *args: Any, **kwargs: Any) -> Any:
            ordering_only = any(isinstance(dep, (WeakDep, StarDep)) for dep in self.read_writes.reads)
            result = original(self, *args, **kwargs)
            if not ordering_only:  # PyTorch renamed in the other case
                self.set_read_writes(self.read_writes.rename(self.mutation_renames))
            return result

        return recompute_size_and_body

    return SchedulerNode, "recompute_size_and_body", wrap


# The single-threaded atomic add of CppVecKernel.store, which stores at the index as given.
_SINGLE_THREADED = "not config.cpp.dynamic_threads and self.num_threads == 1"


def _tile_atomic_add_offsets_twice() -> bool:
    """A tile kernel's ``store`` offsets the index and hands it to ``CppVecKernel.store``,
    whose threaded atomic add offsets it again through the tile's ``index_expr``."""
    from torch._inductor.codegen.cpp import CppTile2DKernel, CppTile2DOverrides, CppVecKernel

    tile_store = _source(CppTile2DKernel, "store")
    vec_store = _source(CppVecKernel, "store")
    return (
        "new_index = self.transform_indexing(index)" in tile_store
        and "super().store(name, new_index, value, mode)" in tile_store
        and "ops.index_expr(index, torch.int64)" in vec_store
        and _SINGLE_THREADED in vec_store
        and "transform_indexing" in _source(CppTile2DOverrides, "index_expr")
    )


def _tile_atomic_add() -> _Fix:
    from torch._inductor import config
    from torch._inductor.codegen.cpp import CppTile2DKernel, CppVecKernel

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def store(self: Any, name: str, index: Any, value: Any, mode: Any = None) -> Any:
            threaded = config.cpp.dynamic_threads or self.num_threads != 1  # not _SINGLE_THREADED
            if mode == "atomic_add" and threaded and not self.need_vec_transpose(self.rename_indexing(index)):
                return CppVecKernel.store(self, name, index, value, mode)  # its index_expr offsets it once
            return original(self, name, index, value, mode)

        return store

    return CppTile2DKernel, "store", wrap


# Each fix by name (in cache keys): whether this PyTorch has its bug, and the fix.
_FIXES: dict[str, tuple[Callable[[], bool], Callable[[], _Fix]]] = {
    "scheduler renames": (_scheduler_drops_renames, _scheduler_renames),
    "tile atomic add": (_tile_atomic_add_offsets_twice, _tile_atomic_add),
}


def aot_autograd(**kwargs: Any) -> Callable[..., Any]:
    """A Dynamo backend running AOTAutograd with the given compilers and partition function."""
    from torch._dynamo.backends.common import aot_autograd as dynamo_aot_autograd

    return dynamo_aot_autograd(**kwargs)


def inductor_decompositions() -> dict[Any, Callable[..., Any]]:
    """The decompositions Inductor applies while tracing with AOTAutograd."""
    # Some of them consult Inductor's lowerings when they run (max_pool2d with indices asks
    # ``torch._inductor.lowering`` whether it falls back), a module only compile_fx imports:
    # without it, the eager lowering of a model with max pooling failed in a fresh process.
    import torch._inductor.lowering  # noqa: F401
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


def make_boxed_func(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adapt ``fn(*args)`` to AOTAutograd's boxed calling convention (one list argument)."""
    from torch._functorch.aot_autograd import make_boxed_func as functorch_make_boxed_func

    return functorch_make_boxed_func(fn)


def min_cut_rematerialization_partition(
    joint: torch.fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """The min-cut partitioner Inductor uses for training graphs."""
    from torch._functorch.partitioners import min_cut_rematerialization_partition as partition

    return partition(joint, joint_inputs, **kwargs)


def never_recompute(node: torch.fx.Node) -> None:
    """Make the min-cut partitioner save ``node``'s outputs for the backward, never recompute it.

    This is the tag selective activation checkpointing puts on a node (``MUST_SAVE``); the
    partitioner honours it under every ``activation_memory_budget``, including the knapsack
    stage that otherwise may recompute any custom op.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    node.meta["recompute"] = CheckpointPolicy.MUST_SAVE


def custom_partitioner_base() -> type:
    """Inductor's base class for a ``custom_partitioner_fn`` (imports Inductor)."""
    from torch._inductor.custom_graph_pass import CustomPartitionerFn

    return CustomPartitionerFn


def inductor_mode_options(mode: str) -> dict[str, Any]:
    """The Inductor config patches a ``torch.compile`` ``mode`` stands for (``"max-autotune"``:
    ``max_autotune``, ``coordinate_descent_tuning``, CUDA graphs); ``ValueError`` naming the
    modes for an unknown one."""
    from torch._inductor import list_mode_options

    try:
        return dict(list_mode_options(mode))
    except RuntimeError as error:  # "Unrecognized mode=..., should be one of: ..."
        raise ValueError(f"memopt: {error}") from None


def custom_graph_pass_base() -> type:
    """Inductor's base class for a custom FX graph pass whose ``uuid()`` joins its cache key:
    the one called with ``is_inference`` too, where this PyTorch has it."""
    from torch._inductor import custom_graph_pass

    return getattr(custom_graph_pass, "CustomInferenceAwareGraphPass", custom_graph_pass.CustomGraphPass)


def keyed_graph_pass(graph_pass: Any) -> bool:
    """Whether Inductor can key its cache on ``graph_pass`` (a ``CustomGraphPass``)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return isinstance(graph_pass, CustomGraphPass)


def takes_is_inference(graph_pass: Any) -> bool:
    """Whether Inductor calls ``graph_pass`` as ``graph_pass(graph, is_inference)``."""
    from torch._inductor import custom_graph_pass

    aware = getattr(custom_graph_pass, "CustomInferenceAwareGraphPass", None)
    return aware is not None and isinstance(graph_pass, aware)


def donated_buffer_indices() -> tuple[int, ...] | None:
    """The inputs of the graph Inductor is compiling that it may overwrite in place: the saved
    tensors AOTAutograd donates to a backward it expects to run once (``bw_donated_idxs``;
    empty when the backward is compiled under ``retain_graph=True``). ``None`` outside a
    compile or where this PyTorch has no donated buffers."""
    try:
        from torch._inductor.utils import get_donated_idxs
    except ImportError:
        return None
    indices = get_donated_idxs()
    return None if indices is None else tuple(indices)


def hash_of_files(*paths: str) -> bytes:
    """A hash of source files, for cache keys."""
    from torch._inductor.custom_graph_pass import get_hash_for_files

    return get_hash_for_files(paths)


def activation_memory_budget(budget: float | None) -> contextlib.AbstractContextManager[Any]:
    """Scope the min-cut partitioner's activation-memory budget to one partitioning call."""
    if budget is None:
        return contextlib.nullcontext()
    from torch._functorch import config as functorch_config

    return functorch_config.patch(activation_memory_budget=float(budget))


def size_hint(value: Any) -> int:
    """A concrete int for a size that may be symbolic (dynamic shapes use the example's hint)."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        node = value.node
        hint = node.hint if node.has_hint() else None
        if hint is None:
            hint = node.shape_env.size_hint(node.expr, allow_none=True)
        if hint is None:
            raise ValueError(f"size {value} has no concrete hint")
        return int(hint)
    return int(value)


def profiler_running() -> bool:
    """Whether a PyTorch (Kineto) profiler session is active in this process: there is one."""
    return bool(torch._C._autograd._profiler_enabled())


def profiler_allocations(prof: torch.profiler.profile, device: str) -> list[tuple[int, int]]:
    """``(time_ns, bytes)`` of every allocation (positive) and free (negative) on ``device``
    recorded by a ``profile_memory=True`` profile, unaggregated."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            if str(fields.device).split(":")[0] == device:
                events.append((event.start_time_ns, fields.alloc_size))
    return events


def dynamo_explain(model: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch._dynamo.explain``: the graphs and graph breaks (with reasons) of one call."""
    return torch._dynamo.explain(model)(*args, **kwargs)


def trace_functional(
    fn: Callable[..., Any], args: Sequence[Any], decompositions: dict[Any, Callable[..., Any]]
) -> torch.fx.GraphModule:
    """``fn(*args)`` traced to an aten graph with no mutations (``make_fx`` + functionalization).

    ``args`` are fake tensors (graph metadata): the trace runs under their ``FakeTensorMode``.
    ``fn`` may call autograd (``torch.autograd.grad`` and friends), which ``torch.func``'s
    functionalization forbids inside it, so it is traced plainly first, and that aten graph
    (free of autograd by then) is functionalized in a second trace. The second trace also
    removes the in-place updates that decompositions emit (training BatchNorm's
    ``running_mean.copy_(...)``) on tensors ``fn`` creates.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    with detect_fake_mode(args) or contextlib.nullcontext():
        plain = make_fx(fn, decomposition_table=decompositions)(*args)
        if not any(_mutates(node) for node in plain.graph.nodes):
            return plain  # a backward usually: half the tracing time
        functional = torch.func.functionalize(plain, remove="mutations")
        return make_fx(functional, decomposition_table=decompositions)(*args)


def rng_state_operators() -> tuple[Any, Any]:
    """AOTAutograd's higher-order operators for random ops recomputed in a backward graph:
    ``run_and_save_rng_state(op, *args) -> (state, op(*args))`` and
    ``run_with_rng_state(state, op, *args) -> op(*args)`` drawn from ``state``. Inductor runs
    both as fallback kernels (the random op itself, unfused; the rest fuses around it)."""
    from torch._prims import rng_prims

    return rng_prims.run_and_save_rng_state, rng_prims.run_with_rng_state


def inductor_random_prims() -> tuple[Any, Any, Any] | None:
    """Inductor's fusable random prims, ``(seeds, lookup_seed, random)``, or ``None`` where the
    Inductor config in force would not lower them (``fallback_random``, and
    ``align_random_eager``, whose random prim takes an offset pair instead of a seed).

    ``random(size, lookup_seed(seeds, k), mode)`` is a pure function of the seed: Inductor
    generates it inside the fused kernel (Philox on the element index), so replaying it in a
    backward graph from a saved ``seeds`` tensor draws the forward's numbers again, on the
    device, with nothing on the host (which CUDA graphs need). This is how Inductor itself
    recomputes dropout."""
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor import inductor_prims

        prims = inductor_prims.seeds, inductor_prims.lookup_seed, inductor_prims.random
    except (ImportError, AttributeError):  # a torch without them: random ops keep states
        return None
    if inductor_config.fallback_random or getattr(inductor_config, "align_random_eager", False):
        return None
    return prims


def known_equal(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Whether two size tuples (ints or symbolic sizes) are provably equal, without adding a
    guard (one would specialize the compiled graph on sizes that merely happen to match)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def known_contiguous(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is contiguous, ``False`` where its sizes leave that open. Symbolic
    strides such as ``Max(1, s0)`` are compared through the sizes' example values, which may
    add a guard to the compile under way (``s0 >= 1``, say) where :func:`known_equal` would
    give up."""
    from torch._prims_common import is_contiguous_or_false

    return is_contiguous_or_false(tensor)


def _mutates(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def fake_tensor_mode(value: Any) -> Any:
    """The ``FakeTensorMode`` of ``value`` when it is a fake tensor (graph metadata), else None."""
    from torch._subclasses.fake_tensor import FakeTensor

    return value.fake_mode if isinstance(value, FakeTensor) else None


def _autograd_bits() -> int:
    keys = torch._C.DispatchKey
    bits = 0
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        bits |= torch._C.DispatchKeySet(key).raw_repr()
    return bits


@contextlib.contextmanager
def autograd_inside_kernel() -> Any:
    """Let autograd record inside a custom op's kernel (the dispatcher excludes it there).

    ``memopt::reversible_chain_backward`` recomputes a step and differentiates it with
    ``torch.autograd.grad`` inside its kernel; this lifts the autograd keys the dispatcher
    put in the thread-local exclude set on the way down, for the ``with`` block only.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C.DispatchKeySet.from_raw_repr(exclude.raw_repr() & ~_autograd_bits())
    include = include.remove(torch._C.DispatchKey.ADInplaceOrView)
    with torch._C._ForceDispatchKeyGuard(include, exclude):
        yield


def vjp_unchecked(
    output: torch.Tensor, grad_output: torch.Tensor, inputs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(output, inputs, grad_output, allow_unused=True)`` without its checks.

    The reversible chain's backward calls this once per step; ``torch.autograd.grad``'s
    argument normalization and ``grad_output`` validation (``_make_grads``) cost about 9 us
    a call on CPU (26 us against 17 for a one-op graph). The caller guarantees what they check:
    one output that requires grad and a ``grad_output`` of its shape (the engine still casts
    its dtype). Tensor subclasses with ``__torch_function__`` go through ``torch.autograd.grad``.
    """
    from torch.autograd.graph import _engine_run_backward

    if torch._C._has_torch_function((output, grad_output, *inputs)):
        return torch.autograd.grad(output, inputs, grad_output, allow_unused=True)
    return _engine_run_backward((output,), (grad_output,), False, False, tuple(inputs), True, accumulate_grad=False)


_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def cast_like_autocast(op: Any, tensor_args: Sequence[int]) -> None:
    """Give custom op ``op`` the autocast rule of aten's matmuls and convolutions.

    Under ``torch.autocast(device, dtype=...)`` the floating-point tensors at positions
    ``tensor_args`` are cast to that autocast dtype, read when the op is called (bfloat16 or
    float16, whichever the caller chose), and the op runs with autocast off, as
    ``torch.nn.functional.linear`` and ``conv2d`` do. (``torch.library.register_autocast``
    fixes one dtype at registration.) Registered for CPU and CUDA, in eager mode and for
    tracing alike: it is a kernel of the dispatcher's autocast keys.
    """
    library = torch.library.Library(op._namespace, "IMPL")
    _LIBRARIES.append(library)  # a registration lives as long as its Library object
    name = op._name
    for device_type, key in _AUTOCAST_KEYS.items():
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset: Any, *args: Any, device_type: str = device_type, excluded: Any = excluded) -> Any:
            dtype = torch.get_autocast_dtype(device_type)
            cast = list(args)
            for index in tensor_args:
                value = cast[index]
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type == device_type:
                    cast[index] = value.to(dtype)
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return op._opoverload(*cast)

        library.impl(name, kernel, key, with_keyset=True)


_LIBRARIES: list[Any] = []
