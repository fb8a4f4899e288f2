"""memopt's partition function for training graphs (imported on first compile: it needs Inductor).

AOTAutograd traces the forward and backward into one joint graph and asks a partition
function to split it into a forward graph (which saves some values) and a backward graph
(which uses or recomputes them). memopt's partitioner is where the training-memory
levers act: the min-cut partitioner with ``Config.memory_budget`` today, reversible
reconstruction (rebuilding block inputs from outputs instead of saving them) as it lands.
It also records what the forward graph saves, for the report.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from memopt._torch_compat import (
    StorageWeakRef,
    activation_memory_budget,
    custom_partitioner_base,
    hash_of_files,
    min_cut_rematerialization_partition,
    never_recompute,
)
from memopt.config import Config
from memopt.estimate import storage_nbytes, tensor_values
from memopt.report import Report
from memopt.reversible_inline import inline_reversible_chains


def partition(
    joint: torch.fx.GraphModule,
    joint_inputs: Sequence[Any],
    config: Config,
    report: Report | None = None,
    **kwargs: Any,
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """Split a joint graph into forward and backward graphs under memopt's config."""
    kwargs.setdefault("compiler", "inductor")
    save_reversible_chains(joint)
    with activation_memory_budget(config.memory_budget):
        forward, backward = min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
    if config.memory_budget is not None and saves_a_whole_chain(forward, kwargs["num_fwd_outputs"]):
        # With nothing but chains (and graph inputs) left to recompute, PyTorch's budget
        # solver returns the chain node itself as a saved value, a tuple no graph can save.
        # Nothing else could have been recomputed, so the default partition is as good.
        forward, backward = min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
        if report is not None:
            report.partition_notes.append(
                f"memory_budget={config.memory_budget} not applied: nothing but reversible chains "
                "to recompute, and they are always kept"
            )
    if report is not None:
        record_reversible_saved(forward, kwargs["num_fwd_outputs"], report)
    # Only now, with what the forward saves settled by the opaque chain nodes.
    inline_reversible_chains(forward, backward, config, report)
    if report is not None:  # measured on the graph that runs
        count, nbytes = saved_activations(forward, kwargs["num_fwd_outputs"])
        report.saved_activations = count
        report.saved_activation_bytes = nbytes
    return forward, backward


def save_reversible_chains(joint: torch.fx.GraphModule) -> None:
    """Keep every ``memopt::reversible_chain`` in the forward graph, whatever the budget.

    The chain's outputs are what its backward rebuilds everything else from, and they are
    what it saves instead of per-block activations. Under a small ``memory_budget`` the
    partitioner's knapsack would otherwise recompute the whole chain in the backward (its
    FLOP counter does not look inside custom ops and prices the chain at 1 FLOP): that runs
    every block's forward a second time, draws dropout masks from a later RNG state, and
    reads the BatchNorm running statistics the forward has since updated in place (autograd
    then fails on their version counter under the eager lowering).
    """
    chain_op = torch.ops.memopt.reversible_chain.default
    for node in joint.graph.find_nodes(op="call_function", target=chain_op):
        never_recompute(node)


def saves_a_whole_chain(forward: torch.fx.GraphModule, num_fwd_outputs: int) -> bool:
    """Whether the forward graph saves a ``memopt::reversible_chain`` node (its whole output
    tuple) rather than the tensors taken out of it."""
    chain_op = torch.ops.memopt.reversible_chain.default
    output = forward.graph.find_nodes(op="output")[0]
    return any(
        isinstance(node, torch.fx.Node) and node.target is chain_op
        for node in output.args[0][num_fwd_outputs:]
    )


_PASS_THROUGH = (torch.ops.aten.detach.default, torch.ops.aten.alias.default)


def record_reversible_saved(forward: torch.fx.GraphModule, num_fwd_outputs: int, report: Report) -> None:
    """Attribute the forward graph's saved tensors to the reversible chains they come from.

    Each ``memopt::reversible_chain`` node keeps its final outputs (and RNG states) for the
    backward and nothing else; this measures that on the partitioned graph and writes it into
    the ``reversible`` pass's per-block rows as ``chain_saved_bytes``.
    """
    rows = [row for result in report.passes if result.name == "reversible" for row in result.details if "key" in row]
    if not rows:
        return
    chain_op = torch.ops.memopt.reversible_chain.default
    output = forward.graph.find_nodes(op="output")[0]
    by_key: dict[str, dict[StorageWeakRef, int]] = {}
    for node in output.args[0][num_fwd_outputs:]:
        if not isinstance(node, torch.fx.Node):
            continue
        source = node
        while source.target in _PASS_THROUGH and isinstance(source.args[0], torch.fx.Node):
            source = source.args[0]  # saved outputs come back through detach()
        if source.target is operator.getitem:
            if source.args[1] > 2:
                continue  # a side output: kept for what reads it after the chain, not for the chain
            source = source.args[0]
        if not isinstance(source, torch.fx.Node) or source.target is not chain_op:
            continue
        storages = by_key.setdefault(source.args[0], {})
        for tensor in tensor_values(node):
            storages[StorageWeakRef(tensor.untyped_storage())] = storage_nbytes(tensor)
    for row in rows:
        row["chain_saved_bytes"] = sum(by_key.get(row["key"], {}).values())


def saved_activations(forward: torch.fx.GraphModule, num_fwd_outputs: int) -> tuple[int, int]:
    """How many tensors, and how many bytes, a partitioned forward graph saves for backward.

    Saved values are the forward outputs past the first ``num_fwd_outputs``; graph inputs
    (parameters, user inputs) among them cost nothing extra and are not counted. Bytes are
    per storage, so two saved views of one tensor count once.
    """
    output = forward.graph.find_nodes(op="output")[0]
    saved = [node for node in output.args[0][num_fwd_outputs:] if isinstance(node, torch.fx.Node)]
    storages: dict[StorageWeakRef, int] = {}
    count = 0
    for node in saved:
        if node.op == "placeholder":
            continue
        for tensor in tensor_values(node):
            count += 1
            storages[StorageWeakRef(tensor.untyped_storage())] = storage_nbytes(tensor)
    return count, sum(storages.values())


class InductorPartitioner(custom_partitioner_base()):
    """:func:`partition` in the form Inductor's ``custom_partitioner_fn`` config takes."""

    def __init__(self, config: Config, report: Report | None = None) -> None:
        self.config = config
        self.report = report

    def __call__(
        self, gm: torch.fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any
    ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        return partition(gm, joint_inputs, self.config, self.report, **kwargs)

    def uuid(self) -> Any:
        # Inductor's FX graph cache keys on this: the code and every option it reads.
        from memopt import reversible_inline
        from memopt.ops import reversible

        files = (__file__, reversible_inline.__file__, reversible.__file__)
        options = (self.config.memory_budget, self.config.reversible_inline, self.config.strict)
        seeds = (tuple(sorted(reversible_inline._SEEDED_DEVICES)), reversible_inline._CPU_SEEDS_MAX_NUMEL)
        return (hash_of_files(*files), *options, seeds)

    def __getstate__(self) -> dict[str, Any]:
        # Inductor pickles its whole config into cache keys: only what changes the partition
        # belongs there, not the report this compile writes into.
        return {"uuid": self.uuid()}

    def __deepcopy__(self, memo: dict[int, Any]) -> InductorPartitioner:
        return self
