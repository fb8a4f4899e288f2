"""The autocast state a graph was traced under, for ops that run traced code later.

``reversible_chain`` and ``slicing`` run subgraphs of the user's model inside one opaque
call. Inside a compiled graph that call runs with autocast off, and a chain's recomputation
runs in the backward, usually after the caller's ``torch.autocast`` block has closed. Both
record the state their graph was traced under (Dynamo guards on it, so another state
recompiles) and run their subgraphs under it, computing in the precision eager would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.fx

AutocastState = tuple[str, bool, torch.dtype]
"""``(device_type, enabled, dtype)``."""


def current(device_type: str) -> AutocastState:
    """The autocast state in effect now for ``device_type``."""
    return (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))


def under(state: AutocastState | None) -> contextlib.AbstractContextManager[object]:
    """A context that restores ``state`` (``None``: leave the ambient state alone)."""
    if state is None:
        return contextlib.nullcontext()
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def by_node(nodes: Iterable[torch.fx.Node], outer: AutocastState) -> dict[torch.fx.Node, AutocastState]:
    """The autocast state each of ``nodes`` (a Dynamo graph, in order) runs under: ``outer``
    (the caller's, the graph's traced state) changed by the ``torch.autocast`` blocks of the
    model's own code, which Dynamo keeps as ``_enter_autocast``/``_exit_autocast`` calls (a
    float32 region for a norm or an attention softmax under a caller's bfloat16). A block for
    another device type leaves ``outer``'s device alone."""
    states: dict[torch.fx.Node, AutocastState] = {}
    stack = [outer]
    for node in nodes:
        name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
        if name == "_enter_autocast":
            device_type, dtype, enabled = (list(node.args) + [None, None, None])[:3]
            top = stack[-1]
            if device_type == top[0]:
                stack.append((top[0], bool(enabled) if enabled is not None else True, dtype or top[2]))
            else:
                stack.append(top)
        elif name == "_exit_autocast" and len(stack) > 1:
            stack.pop()
        states[node] = stack[-1]
    return states
