"""Step Rehash: reuse a denoiser's deep features across adjacent denoising steps.

Adjacent steps of a diffusion sampler see nearly the same latents, and a UNet's deep
blocks (low resolution, most of the compute in video UNets' attention and temporal layers)
change least between them. :class:`StepRehash` wraps a diffusers-style UNet (one with
``down_blocks``, ``mid_block`` and ``up_blocks``):

* at a **full step** it runs the whole network and keeps the outputs of the deep blocks
  (``down_blocks[depth:]``, ``mid_block``, ``up_blocks[:-depth]``) and the features that
  enter the deep part (the input of ``down_blocks[depth]``);
* at a **rehash step** it runs only the shallow path (``conv_in``, the outer ``depth``
  down/up blocks, ``conv_out``) on the new latents and takes the deep blocks' outputs from
  the last full step.

``interval=N`` makes every N-th step (counted from the start of a generation) a full step;
``threshold=t`` rehashes when the features entering the deep part differ from the last
full step's by at most ``t`` (relative L2 distance), so reuse happens only where measured
features say it is safe. A new generation starts (caches dropped, first step full) when
the timestep goes up again. Calls at the same timestep (a pipeline that runs the
conditional and unconditional passes separately) keep separate caches.

This changes results on purpose: report the difference of the final latents against the
full loop (``benchmarks/slicing.py`` does).

The wrapper takes the UNet's own calling convention (``unet(sample, timestep,
encoder_hidden_states, ..., return_dict=...)``) and returns what the UNet returns, and it
forwards attribute reads (``config``, ``dtype``, ...) to the UNet, so it can stand in for
``pipe.unet``. During a call, it puts light stand-ins for the UNet's blocks in their
places (restored before the call returns, also on errors), so the UNet's state dict and
modules are unchanged between calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from memopt.config import StepRehashOptions

__all__ = ["StepRehash", "StepRecord"]


@dataclasses.dataclass
class StepRecord:
    """What one call of the wrapper did."""

    timestep: float
    full: bool
    distance: float | None
    """Relative L2 distance of the features entering the deep part to the last full step's
    (``None`` on a full step forced by the interval or a new generation)."""


class _Block(nn.Module):
    """Stands in for one block of the UNet during a call: runs it (possibly compiled) or
    returns its output from the last full step."""

    def __init__(self, owner: StepRehash, name: str, block: nn.Module, deep: bool, first_deep: bool) -> None:
        super().__init__()
        self.__dict__["_owner"] = owner
        self.__dict__["_block"] = block
        self.__dict__["_name"] = name
        self.__dict__["_deep"] = deep
        self.__dict__["_first_deep"] = first_deep

    def __getattr__(self, name: str) -> Any:
        # The UNet reads block attributes (``resnets``, ``has_cross_attention``).
        return getattr(self.__dict__["_block"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        owner = self._owner
        if not self._deep:
            return owner._run_block(self._name, self._block, args, kwargs)
        if self._first_deep:
            features = kwargs.get("hidden_states", args[0] if args else None)
            owner._decide(features)
        if owner._rehashing:
            return owner._cache()[self._name]
        output = owner._run_block(self._name, self._block, args, kwargs)
        owner._cache()[self._name] = output
        return output


class StepRehash(nn.Module):
    """Wrap a diffusers UNet so that rehash steps reuse the deep blocks' outputs.

    Args:
        unet: a module with ``down_blocks``, ``mid_block`` and ``up_blocks`` (diffusers'
            ``UNet2DConditionModel``, ``UNet3DConditionModel``, ``UNetMotionModel``,
            ``UNetSpatioTemporalConditionModel``, ...).
        interval: a full step every ``interval`` steps (>= 2).
        threshold: rehash when the features entering the deep part are within this relative
            L2 distance of the last full step's (> 0). Exactly one of the two.
        depth: the outer down/up block pairs that always run (>= 1, fewer than the down
            blocks).
        compile_options: when given, each block runs ``torch.compile``-d with memopt and
            these options (what :func:`memopt.compile` passes with ``step_rehash=``).
    """

    def __init__(
        self,
        unet: nn.Module,
        interval: int | None = None,
        threshold: float | None = None,
        depth: int = 1,
        compile_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.options = StepRehashOptions(interval=interval, threshold=threshold, depth=depth)
        for name in ("down_blocks", "up_blocks", "mid_block"):
            if getattr(unet, name, None) is None:
                raise ValueError(
                    f"StepRehash needs a UNet with down_blocks, mid_block and up_blocks; "
                    f"{type(unet).__name__} has no {name!r}"
                )
        if not 1 <= depth < len(unet.down_blocks) or depth > len(unet.up_blocks):
            raise ValueError(
                f"StepRehash depth must be in [1, {len(unet.down_blocks) - 1}] for this UNet "
                f"({len(unet.down_blocks)} down blocks), got {depth}"
            )
        self.unet = unet
        self._compiled: dict[str, Callable[..., Any]] = {}
        if compile_options is not None:
            from memopt.backend import memopt_backend

            options = dict(compile_options) or None
            for name, block in self._blocks():
                self._compiled[name] = torch.compile(
                    block, backend=memopt_backend, options=options
                )
        self.history: list[StepRecord] = []
        """One record per call since construction (or :meth:`reset`)."""
        self.generations = 0
        self._caches: dict[int, dict[str, Any]] = {}
        self._features: dict[int, torch.Tensor] = {}
        self._last_timestep: float | None = None
        self._step = -1
        self._call_in_step = 0
        self._rehashing = False
        self._decided = False
        self._distance: float | None = None

    # -- what the pipeline sees ---------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    def reset(self) -> None:
        """Forget cached features; the next call is a full step of a new generation."""
        self._caches.clear()
        self._features.clear()
        self._last_timestep = None
        self._step = -1

    @property
    def full_steps(self) -> int:
        return sum(record.full for record in self.history)

    @property
    def rehash_steps(self) -> int:
        return sum(not record.full for record in self.history)

    def forward(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        self._advance(_as_float(timestep))
        self._decided = False
        self._rehashing = False
        self._distance = None
        swapped = self._install()
        try:
            output = self.unet(sample, timestep, *args, **kwargs)
        finally:
            self._restore(swapped)
        self.history.append(StepRecord(_as_float(timestep), not self._rehashing, self._distance))
        return output

    # -- bookkeeping --------------------------------------------------------------------

    def _advance(self, timestep: float) -> None:
        last = self._last_timestep
        if last is None or timestep > last:
            self.reset()
            self.generations += 1
            self._step, self._call_in_step = 0, 0
        elif timestep == last:
            self._call_in_step += 1
        else:
            self._step += 1
            self._call_in_step = 0
        self._last_timestep = timestep

    def _cache(self) -> dict[str, Any]:
        return self._caches.setdefault(self._call_in_step, {})

    def _decide(self, features: torch.Tensor | None) -> None:
        """Choose full or rehash for this call, when the deep part is entered."""
        if self._decided:
            return
        self._decided = True
        cached = self._features.get(self._call_in_step)
        has_cache = bool(self._caches.get(self._call_in_step)) and cached is not None
        if not has_cache or not isinstance(features, torch.Tensor):
            rehash = False
        elif self.options.interval is not None:
            rehash = self._step % self.options.interval != 0
        else:
            diff = torch.linalg.vector_norm((features - cached).float())
            self._distance = float(diff / torch.linalg.vector_norm(cached.float()).clamp_min(1e-12))
            rehash = self._distance <= self.options.threshold
        self._rehashing = rehash
        if not rehash and isinstance(features, torch.Tensor):
            self._features[self._call_in_step] = features.detach()

    def _run_block(self, name: str, block: nn.Module, args: tuple, kwargs: dict) -> Any:
        fn = self._compiled.get(name, block)
        return fn(*args, **kwargs)

    def _blocks(self) -> list[tuple[str, nn.Module]]:
        unet = self.unet
        blocks = [(f"down.{i}", b) for i, b in enumerate(unet.down_blocks)]
        blocks.append(("mid", unet.mid_block))
        blocks += [(f"up.{i}", b) for i, b in enumerate(unet.up_blocks)]
        return blocks

    def _install(self) -> list[tuple[Any, Any, nn.Module]]:
        unet, depth = self.unet, self.options.depth
        deep_up = len(unet.up_blocks) - depth
        swapped = []

        def put(container: Any, key: Any, name: str, deep: bool, first: bool = False) -> None:
            block = container[key] if isinstance(container, nn.ModuleList) else getattr(container, key)
            stand_in = _Block(self, name, block, deep, first)
            if isinstance(container, nn.ModuleList):
                container[key] = stand_in
            else:
                setattr(container, key, stand_in)
            swapped.append((container, key, block))

        for i in range(len(unet.down_blocks)):
            put(unet.down_blocks, i, f"down.{i}", deep=i >= depth, first=i == depth)
        put(unet, "mid_block", "mid", deep=True)
        for i in range(len(unet.up_blocks)):
            put(unet.up_blocks, i, f"up.{i}", deep=i < deep_up)
        return swapped

    @staticmethod
    def _restore(swapped: list[tuple[Any, Any, nn.Module]]) -> None:
        for container, key, block in reversed(swapped):
            if isinstance(container, nn.ModuleList):
                container[key] = block
            else:
                setattr(container, key, block)


def _as_float(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().flatten()[0])
    return float(timestep)
