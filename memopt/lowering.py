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

from memopt._torch_compat import aot_autograd, compile_fx, inductor_decompositions, make_boxed_func
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
        return compile_fx(gm, list(example_inputs), config_patches=patches)
    if config.lowering == "eager":
        return _eager_backend(config, report)(gm, list(example_inputs))
    raise AssertionError(f"unvalidated lowering {config.lowering!r}")


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
