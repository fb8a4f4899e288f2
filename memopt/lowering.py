"""Lowering a rewritten graph: Inductor (default) or op-by-op eager (``lowering="eager"``).

Both go through AOTAutograd with Inductor's decompositions, so training graphs are traced
and partitioned the same way in either case; only the compiler of the resulting
forward/backward graphs differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from memopt._torch_compat import (
    aot_autograd,
    compile_fx,
    custom_graph_pass_base,
    donated_buffer_indices,
    inductor_decompositions,
    inductor_fixes_key,
    keyed_graph_pass,
    make_boxed_func,
    takes_is_inference,
)
from memopt.config import Config
from memopt.partition import InductorPartitioner, partition
from memopt.report import Report


def lower(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: Config,
    report: Report | None = None,
) -> Callable[..., Any]:
    """Compile ``gm`` for ``example_inputs`` with the lowering ``config`` names."""
    if config.lowering == "inductor":
        patches = {"custom_partitioner_fn": InductorPartitioner(config, report)}
        patches.update(config.inductor_config)
        patches[KEYED_SLOT] = CacheKey(patches.get(KEYED_SLOT))
        # AOTAutograd compiles a backward at its first call, or, with symbolic sizes saved, now
        # but ignoring a failure until that call. For a graph memopt rewrote, compile it now and
        # let a failure raise here, where the backend can still compile the graph without the
        # rewrites (a traced reversible chain's backward with symbolic sizes Inductor cannot
        # lower); at the first backward nothing can be done but fail the user's step.
        eager_backward = report is not None and report.training and report.rewrites > 0
        with torch._functorch.config.patch(force_non_lazy_backward_lowering=eager_backward):
            return compile_fx(gm, list(example_inputs), config_patches=patches)
    if config.lowering == "eager":
        return _eager_backend(config, report)(gm, list(example_inputs))
    raise AssertionError(f"unvalidated lowering {config.lowering!r}")


# The Inductor config entry that carries CacheKey (its pass runs after the user's own).
KEYED_SLOT = "post_grad_custom_pre_pass"


class CacheKey(custom_graph_pass_base()):
    """A post-grad pass that changes nothing but puts into Inductor's FX graph cache key two
    things it lacks: which saved tensors the graph's code may overwrite in place
    (AOTAutograd's donated buffers), and which of :func:`memopt._torch_compat.inductor_fixes`
    generated the code (code cached without them, by an earlier memopt, may be wrong).

    Donated buffers are missing from the key. A backward is compiled at its first call: one
    that runs once donates the saved tensors it reads last, so Inductor may reuse their memory;
    one first called with ``retain_graph=True`` donates none, since a second backward reads
    them again.
    With the same graph and key, a backward compiled under ``retain_graph=True`` was given the
    cached code of the other kind (from an earlier training step, in this process or an earlier
    one), and the second backward read saved tensors the first had overwritten: silently wrong
    gradients. Stock ``torch.compile`` raises a clear error there instead: AOTAutograd's own
    cache, which memopt turns off (:func:`memopt._torch_compat.compile_fx`), hands back the
    donating backward with its check that refuses ``retain_graph``.

    ``inner`` is the user's own pass for the same config entry (``inductor_config``), run
    first; a pass Inductor cannot key (no ``uuid()``) keeps Inductor's cache off, as it would
    alone."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = tuple(inner) if isinstance(inner, (list, tuple)) else (inner,) if inner else ()

    def __call__(self, graph: torch.fx.Graph, is_inference: bool = False) -> None:
        for user_pass in self.inner:
            if takes_is_inference(user_pass):
                user_pass(graph, is_inference)
            else:
                user_pass(graph)

    def uuid(self) -> Any:
        inner = tuple(p.uuid() if keyed_graph_pass(p) else None for p in self.inner)
        if not all(inner):
            return None  # Inductor bypasses its cache: an unkeyed pass could change the code
        return ("memopt donated buffers", donated_buffer_indices(), inner, inductor_fixes_key())


def _run_eagerly(gm: torch.fx.GraphModule, _example_inputs: Any) -> Callable[..., Any]:
    return make_boxed_func(gm)


def _eager_backend(config: Config, report: Report | None) -> Callable[..., Any]:
    def partition_fn(joint: torch.fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any):
        return partition(joint, joint_inputs, config, report, **kwargs)

    # Inductor's decompositions make the eager lowering trace and partition the same graphs
    # as the Inductor lowering (it mirrors it for debugging); undecomposed training-mode
    # batch_norm would also let the min-cut partitioner recompute it from running statistics
    # the forward has already updated in place.
    return aot_autograd(
        fw_compiler=_run_eagerly,
        bw_compiler=_run_eagerly,
        partition_fn=partition_fn,
        decompositions=inductor_decompositions(),
    )
