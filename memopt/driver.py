"""The pass driver: runs memopt's graph passes in their fixed order and reports on each."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
import torch.fx

from memopt.passes import PASSES, GraphPass, PassContext
from memopt.passes.base import transformed_nodes
from memopt.report import PassResult

log = logging.getLogger("memopt")


def run_passes(
    gm: torch.fx.GraphModule,
    ctx: PassContext,
    passes: Sequence[GraphPass] | None = None,
) -> tuple[torch.fx.GraphModule, list[PassResult]]:
    """Run each enabled pass of ``passes`` (default: ``memopt.passes.PASSES``) on ``gm``.

    Every pass works on a copy of the current graph, kept only if the pass returns: a pass
    that raises leaves the graph exactly as it was, is reported with its error, and warns
    (or re-raises under ``Config.strict``). Returns the rewritten module and one
    ``PassResult`` per enabled pass.
    """
    results: list[PassResult] = []
    for graph_pass in PASSES if passes is None else passes:
        if not graph_pass.enabled(ctx.config, ctx.training):
            if graph_pass.changes_results and graph_pass.requested(ctx.config):
                # Opt-in, asked for, but not for this kind of graph: say so rather than nothing.
                kind = "a training" if ctx.training else "an inference"
                skipped = PassResult(graph_pass.name)
                skipped.notes.append(f"not run: it applies to {graph_pass.applies_to} graphs, and this is {kind} graph")
                results.append(skipped)
            continue
        ctx.option = getattr(ctx.config, graph_pass.config_field)
        candidate = _copy_module(gm)
        try:
            result = graph_pass.run(candidate, ctx)
            candidate.graph.lint()
            _check_no_memopt_ops_under_transforms(candidate.graph)
            candidate.recompile()
        except Exception as error:
            if ctx.config.strict:
                raise
            message = f"memopt pass {graph_pass.name!r} failed and was skipped: {type(error).__name__}: {error}"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            log.warning(message)
            result = PassResult(graph_pass.name, error=f"{type(error).__name__}: {error}")
            result.notes.append("pass raised; graph left unchanged")
        else:
            gm = candidate
        result.name = graph_pass.name
        result.changes_results = graph_pass.changes_results
        log.info(
            "pass %s: %d matched, %d rewritten, ~%d bytes saved%s",
            graph_pass.name,
            result.matched,
            result.rewrites,
            result.bytes_saved,
            "".join(f"\n  - {note}" for note in result.notes),
        )
        results.append(result)
    return gm, results


def _check_no_memopt_ops_under_transforms(graph: torch.fx.Graph) -> None:
    """Raise if a memopt op runs under a ``torch.func`` transform inlined in ``graph``: it
    has no batching or transform rules, so the lowering would fail (a pass that put it there
    is then skipped like one that raised)."""
    placed = [
        node.name
        for node in transformed_nodes(graph)
        if isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
        and _namespace(node.target) == "memopt"
    ]
    if placed:
        raise RuntimeError(
            f"memopt ops placed under a torch.func transform (vmap, grad or jvp), which they have no rules for: "
            f"{', '.join(placed[:3])}"
        )


def _namespace(target: torch._ops.OpOverload | torch._ops.OpOverloadPacket) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace
    return target._qualified_op_name.split("::")[0]


def _copy_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A module sharing ``gm``'s parameters and submodules with a copy of its graph.

    ``Graph.graph_copy`` copies each node's ``meta`` (``val`` included), so the copy is
    exactly as informative as the original.
    """
    graph = torch.fx.Graph(owning_module=gm, tracer_cls=gm.graph._tracer_cls)
    value_map: dict[torch.fx.Node, torch.fx.Node] = {}
    output = graph.graph_copy(gm.graph, value_map)
    graph.output(output)
    graph._codegen = gm.graph._codegen
    copy = torch.fx.GraphModule(gm, graph, gm.__class__.__name__)
    copy.meta = dict(getattr(gm, "meta", {}))
    return copy
