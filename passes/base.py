"""The contract between the pass driver and a pass (see README.md beside this file)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from memopt.config import Config
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

