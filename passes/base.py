"""The contract between the pass driver and a pass (see README.md beside this file)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from memopt.config import Config
from memopt.report import PassResult


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

    def enabled(self, config: Config, training: bool) -> bool:
        value = getattr(config, self.config_field)
        if value is False or value is None:
            return False
        if self.applies_to == "inference" and training:
            return False
        if self.applies_to == "training" and not training:
            return False
        return True
