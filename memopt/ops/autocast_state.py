"""The autocast state a graph was traced under, for ops that run traced code later.

``reversible_chain`` and ``slicing`` run subgraphs of the user's model inside one opaque
call. Inside a compiled graph that call runs with autocast off, and a chain's recomputation
runs in the backward, usually after the caller's ``torch.autocast`` block has closed. Both
record the state their graph was traced under (Dynamo guards on it, so another state
recompiles) and run their subgraphs under it, computing in the precision eager would.
"""

from __future__ import annotations

import contextlib

import torch

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
