"""Static memory estimate of an FX graph: a liveness timeline from ``meta["val"]``.

Bytes are counted per storage, so a view costs nothing beyond its base and an in-place op
adds nothing. A value is live from the node that creates it until its last user has run;
graph outputs stay live to the end. Graph inputs (placeholders: user inputs, parameters,
buffers) exist before the graph runs and are reported separately as ``input_bytes``; the
timeline counts only what the graph itself allocates.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from torch.utils._pytree import tree_leaves

from memopt._torch_compat import StorageWeakRef, size_hint


@dataclasses.dataclass
class MemoryTimeline:
    """Bytes live after each node of a graph (intermediates only) and their peak."""

    node_names: list[str]
    live_bytes: list[int]
    """``live_bytes[i]``: bytes of intermediates alive right after node ``i`` ran."""
    peak_bytes: int
    peak_node: str | None
    input_bytes: int
    """Bytes of the graph's inputs (placeholders), alive throughout and not in the timeline."""
    running_bytes: list[int] = dataclasses.field(default_factory=list)
    """``running_bytes[i]``: bytes of intermediates live while node ``i`` runs (its outputs
    exist before its inputs die); their maximum is ``peak_bytes``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TRANSIENT_BYTES = "memopt_transient_bytes"
"""``node.meta`` key: bytes an opaque op allocates and frees while it runs (a sliced group's
one slice of intermediates), counted at that node on top of what is live."""


def tensor_values(node: torch.fx.Node) -> Iterator[torch.Tensor]:
    """The tensors a node produces, from its ``meta["val"]`` (or Dynamo's ``example_value``)."""
    value = node.meta.get("val", node.meta.get("example_value"))
    for leaf in tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            yield leaf


def storage_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of the storage behind ``tensor`` (what freeing it would give back)."""
    try:
        return size_hint(tensor.untyped_storage().nbytes())
    except (NotImplementedError, RuntimeError):
        # Tensors without a storage (some subclasses): fall back to their own size.
        return size_hint(tensor.numel()) * tensor.element_size()


def _storage_key(tensor: torch.Tensor) -> Any:
    try:
        return StorageWeakRef(tensor.untyped_storage())
    except (NotImplementedError, RuntimeError):
        return id(tensor)


def estimate(gm: torch.fx.GraphModule | torch.fx.Graph) -> MemoryTimeline:
    """Liveness timeline of ``gm``: bytes of intermediates live after each node, and the peak.

    Needs ``meta["val"]`` (or Dynamo's ``meta["example_value"]``) on the nodes; nodes without
    one count as zero bytes. Symbolic sizes are evaluated at their example hints.
    """
    if not isinstance(gm, (torch.fx.GraphModule, torch.fx.Graph)):
        raise TypeError(f"memopt.estimate takes a torch.fx.GraphModule or torch.fx.Graph, got {type(gm).__name__}")
    graph = gm.graph if isinstance(gm, torch.fx.GraphModule) else gm
    nodes = list(graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    computing = [node for node in nodes if node.op not in ("placeholder", "output", "get_attr")]
    if computing and not any("val" in node.meta or "example_value" in node.meta for node in computing):
        # ShapeProp's meta["tensor_meta"] has sizes but not which values share a storage (a view
        # would count as a copy), so it is not read.
        shape_prop = any("tensor_meta" in node.meta for node in computing)
        warnings.warn(
            "memopt.estimate: no node of this graph carries meta['val'], so every value counts 0 bytes "
            + (
                "(ShapeProp's meta['tensor_meta'] does not say which values are views of others; "
                if shape_prop
                else "(graphs from Dynamo, AOTAutograd or make_fx have it; "
            )
            + "for a symbolic_trace graph, torch.fx.passes.fake_tensor_prop.FakeTensorProp(gm).propagate(*inputs) "
            "adds it)",
            stacklevel=2,
        )

    # Which storages each node produces, and the bytes of each storage.
    storage_bytes: dict[Any, int] = {}
    produced: dict[torch.fx.Node, list[Any]] = {}
    input_storages: set[Any] = set()
    for node in nodes:
        keys = []
        for tensor in tensor_values(node):
            key = _storage_key(tensor)
            storage_bytes.setdefault(key, storage_nbytes(tensor))
            keys.append(key)
        produced[node] = keys
        if node.op == "placeholder":
            input_storages.update(keys)

    # A storage dies after the last use of any node that refers to it.
    last_use: dict[Any, int] = {}
    first_def: dict[Any, int] = {}
    end = len(nodes)
    for node in nodes:
        for key in produced[node]:
            first_def.setdefault(key, position[node])
            uses = [position[user] for user in node.users]
            if node.op == "output" or any(user.op == "output" for user in node.users):
                uses.append(end)
            last_use[key] = max([last_use.get(key, position[node]), *uses])

    born: dict[int, list[Any]] = {}
    dies: dict[int, list[Any]] = {}
    for key, start in first_def.items():
        if key in input_storages:
            continue
        born.setdefault(start, []).append(key)
        dies.setdefault(last_use[key], []).append(key)

    live = 0
    live_bytes: list[int] = []
    running_bytes: list[int] = []
    peak, peak_node = 0, None
    for index, node in enumerate(nodes):
        live += sum(storage_bytes[key] for key in born.get(index, ()))
        # The peak is reached while the node runs: its outputs exist before its inputs die,
        # and so do the transients of an opaque op.
        running = live + node.meta.get(TRANSIENT_BYTES, 0)
        running_bytes.append(running)
        if running > peak:
            peak, peak_node = running, node.name
        live -= sum(storage_bytes[key] for key in dies.get(index, ()))
        live_bytes.append(live)

    input_bytes = sum(storage_bytes[key] for key in input_storages)
    return MemoryTimeline(
        node_names=[node.name for node in nodes],
        live_bytes=live_bytes,
        peak_bytes=peak,
        peak_node=peak_node,
        input_bytes=input_bytes,
        running_bytes=running_bytes,
    )
