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

``layers=k`` cuts finer, inside the innermost shallow pair (``down_blocks[depth - 1]``,
``up_blocks[-depth]``), at a skip connection between layers (as DeepCache does): at a rehash
step that up block runs only its last ``k`` layers, and the down block only the first
``k - 1`` layers whose outputs those consume; the rest of the pair comes from the cache with
the deep part. ``depth=1, layers=1`` is the cheapest rehash step: ``conv_in``, the last layer
of the outermost up block and ``conv_out``. Its layers are found generically: a diffusers
block keeps one module list per kind of layer (``resnets``, ``attentions``,
``temp_convs``, ``motion_modules``, ...), aligned by index, plus ``downsamplers`` or
``upsamplers``; a block laid out otherwise is refused with the reason.

Between steps only the deep outputs that a rehash step feeds into the shallow path stay
cached (the rest become zero-size stand-ins of the same shape), after a check, once, that a
rehash step from that cache reproduces a full step (:meth:`StepRehash._shrink_cache`).

``interval=N`` makes every N-th step (counted from the start of a generation) a full step;
``threshold=t`` rehashes when the features entering the deep part (the first module whose
output is reused) differ from the last full step's by at most ``t`` (relative L2 distance), so reuse happens only where measured
features say it is safe. A new generation starts (caches dropped, first step full) when
the timestep goes up again. Calls at the same timestep (a pipeline that runs the
conditional and unconditional passes separately) keep separate caches.

This changes results on purpose: report the difference of the final latents against the
full loop (``benchmarks/slicing.py`` does).

The wrapper takes the UNet's own calling convention (``unet(sample, timestep,
encoder_hidden_states, ..., return_dict=...)``) and returns what the UNet returns, and it
forwards attribute reads (``config``, ``dtype``, ...) to the UNet, so it can stand in for
``pipe.unet``. During a call, it puts light stand-ins for the UNet's blocks (and, with
``layers``, for the layers of the cut pair) in their places (restored before the call
returns, also on errors), so the UNet's state dict and
modules are unchanged between calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

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


class _StandIn(nn.Module):
    """Stands in for one block (or one layer module of the cut pair) of the UNet during a
    call: runs it (possibly compiled), or, if it belongs to the deep part, returns its output
    from the last full step."""

    def __init__(self, owner: StepRehash, name: str, module: nn.Module, deep: bool) -> None:
        super().__init__()
        # Kept out of ``_modules``: the stand-in must not change the UNet's module tree.
        self.__dict__["_owner"] = owner
        self.__dict__["_module"] = module
        self.__dict__["_name"] = name
        self.__dict__["_deep"] = deep

    def __getattr__(self, name: str) -> Any:
        # The UNet reads block attributes (``resnets``, ``has_cross_attention``).
        return getattr(self.__dict__["_module"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        owner = self._owner
        if not self._deep:
            owner._order.append(None)
            if owner._rehashing:
                owner._check_inputs(self._name, args, kwargs)
            else:
                owner._note_inputs(args, kwargs)
            return owner._run(self._name, self._module, args, kwargs)
        # The first deep module entered decides the step, from the features it receives.
        owner._decide(_features(args, kwargs))
        key = owner._call_key(self._name)
        cache = owner._cache()
        if owner._rehashing:
            if key not in cache:
                raise RuntimeError(
                    f"StepRehash: {key} was not run at the last full step (the UNet's control flow "
                    "changed between steps); call reset() before changing how the UNet is called"
                )
            return cache[key]
        output = owner._run(self._name, self._module, args, kwargs)
        cache[key] = output
        owner._order.append(key)
        return output


class StepRehash(nn.Module):
    """Wrap a diffusers UNet so that rehash steps reuse the deep part's outputs.

    Args:
        unet: a module with ``down_blocks``, ``mid_block`` and ``up_blocks`` (diffusers'
            ``UNet2DConditionModel``, ``UNet3DConditionModel``, ``UNetMotionModel``,
            ``UNetSpatioTemporalConditionModel``, ...).
        interval: a full step every ``interval`` steps (>= 2).
        threshold: rehash when the features entering the deep part are within this relative
            L2 distance of the last full step's (> 0). Exactly one of the two.
        depth: the outer down/up block pairs that always run (>= 1, fewer than the down
            blocks).
        layers: when given (>= 1), of the innermost of those pairs only the last ``layers``
            layers of the up block (and the down-block layers they read) run at a rehash
            step; ``None`` runs the whole pair.
        compile_options: when given, each block (each layer module of the cut pair, with
            ``layers``) runs ``torch.compile``-d with memopt and these options (what
            :func:`memopt.compile` passes with ``step_rehash=``).
        fullgraph, dynamic: ``torch.compile``'s, for those blocks.
    """

    def __init__(
        self,
        unet: nn.Module,
        interval: int | None = None,
        threshold: float | None = None,
        depth: int = 1,
        layers: int | None = None,
        compile_options: Mapping[str, Any] | None = None,
        fullgraph: bool = False,
        dynamic: bool | None = None,
    ) -> None:
        super().__init__()
        self.options = StepRehashOptions(interval=interval, threshold=threshold, depth=depth, layers=layers)
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
        if layers is not None:
            _check_cut(unet.down_blocks[depth - 1], unet.up_blocks[-depth], depth, layers)
        self.unet = unet
        self._compiled: dict[str, Callable[..., Any]] = {}
        if compile_options is not None:
            from memopt.backend import memopt_backend
            from memopt.config import Config

            # Checked now, not at the first call from inside a UNet block (the backend's check).
            options = Config.from_options(dict(compile_options)) if compile_options else None
            for _, _, name, module, _ in self._plan():
                self._compiled[name] = torch.compile(
                    module, backend=memopt_backend, fullgraph=fullgraph, dynamic=dynamic, options=options
                )
        self.history: list[StepRecord] = []
        """One record per call since construction, across generations."""
        self.generations = 0
        self._caches: dict[int, dict[str, Any]] = {}
        self._features: dict[int, torch.Tensor] = {}
        self._conditions: dict[int, list[torch.Tensor]] = {}
        """Per call index: the conditioning (every tensor argument but the latents) its cache
        was made with. A rehash step reuses the cache only under the same conditioning."""
        self._condition: list[torch.Tensor] = []
        """This call's conditioning."""
        self._step_calls: list[tuple[Any, list[torch.Tensor]]] = []
        """The first step's calls so far: (latents, conditioning) of each, copied."""
        self._last_timestep: float | None = None
        self._step = -1
        self._call_in_step = 0
        self._calls: dict[str, int] = {}
        self._rehashing = False
        self._decided = False
        self._distance: float | None = None
        self._order: list[str | None] = []
        """This call's stand-ins in the order they ran: a deep one's cache key, or ``None``."""
        self._shrinks: dict[int, bool] = {}
        """Per call index: whether a rehash step from the shrunk cache reproduced a full step
        (see :meth:`_shrink_cache`); kept across generations."""
        self._shallow_reads: set[int] = set()
        """Storages (data pointers) of the tensors handed to shallow modules in this call."""
        self._dropped: dict[int, dict[int, tuple[str, torch.Tensor]]] = {}
        """Per call of a step, ``id`` of each placeholder in its cache -> (the key whose output
        it replaced, the placeholder itself: held so that the ``id`` stays its own)."""

    # -- what the pipeline sees ---------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    def reset(self) -> None:
        """Forget cached features; the next call is a full step of a new generation."""
        self._caches.clear()
        self._dropped.clear()
        self._features.clear()
        self._conditions.clear()
        self._step_calls = []
        self._last_timestep = None
        self._step = -1

    @property
    def full_steps(self) -> int:
        return sum(record.full for record in self.history)

    @property
    def rehash_steps(self) -> int:
        return sum(not record.full for record in self.history)

    def forward(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        conditioning = {key: value for key, value in kwargs.items() if key not in PER_STEP_INPUTS}
        self._condition = [leaf for leaf in tree_leaves((args, conditioning)) if isinstance(leaf, torch.Tensor)]
        self._advance(_as_float(timestep), sample)
        self._decided = False
        self._rehashing = False
        self._distance = None
        self._calls = {}
        self._order = []
        self._shallow_reads = set()
        # The shrink check replays this call: it needs the lists that the UNet pops from
        # (a T2I-Adapter's residuals) as they are now.
        replay = {key: list(value) if isinstance(value, list) else value for key, value in kwargs.items()}
        swapped = self._install()
        try:
            output = self.unet(sample, timestep, *args, **kwargs)
        finally:
            self._restore(swapped)
        full = not self._rehashing
        if full:
            self._shrink_cache(output, sample, timestep, args, replay)
        self.history.append(StepRecord(_as_float(timestep), full, self._distance))
        return output

    # -- bookkeeping --------------------------------------------------------------------

    def _advance(self, timestep: float, sample: torch.Tensor) -> None:
        """Place this call: the next call of the same step, the next step (a lower timestep),
        or the first call of a new generation (a higher timestep).

        At a timestep equal to the last call's, later steps take the call as the step's next
        (the guidance passes of a pipeline that makes one call each, a second-order
        sampler's second evaluation). At the first step it is ambiguous: schedules whose
        every generation starts at one timestep begin the next generation there after a
        one-step generation. There it is the step's next call only on the same latents
        under conditioning no earlier call of the step had (a guidance pass); on other
        latents, or repeating an earlier call, a new generation."""
        last = self._last_timestep
        if timestep == last and self._step == 0:
            same_step = isinstance(sample, torch.Tensor) and all(
                _same_tensors(sample, latents) and not _same_tensors(self._condition, condition)
                for latents, condition in self._step_calls
            )
        else:
            same_step = timestep == last
        if last is None or timestep > last or not same_step and timestep == last:
            self.reset()
            self.generations += 1
            self._step, self._call_in_step = 0, 0
        elif same_step:
            self._call_in_step += 1
        else:
            self._step += 1
            self._call_in_step = 0
        self._last_timestep = timestep
        if self._step == 0 and isinstance(sample, torch.Tensor):
            # Copies: a pipeline may update its latents in place before the next call.
            self._step_calls.append((sample.detach().clone(), [t.detach().clone() for t in self._condition]))
        else:
            self._step_calls = []

    def _cache(self) -> dict[str, Any]:
        return self._caches.setdefault(self._call_in_step, {})

    def _shrink_cache(self, output: Any, sample: torch.Tensor, timestep: Any, args: tuple, kwargs: dict) -> None:
        """After a full step, drop the cached outputs no rehash step reads
        (:meth:`_keep_what_rehash_steps_read`), once checked on this UNet.

        The check, on the first full step of each call index: run a rehash step at once, on
        the same latents and timestep, from the shrunk cache. With everything it reads kept,
        that reproduces the full step bit for bit (the cache holds exactly what the skipped
        modules just computed); if the UNet's own code computed a shallow input from a
        dropped output (an operation between blocks), it does not, and this wrapper keeps
        every output for the rest of its life. It costs one shallow pass, once."""
        call = self._call_in_step
        if self._shrinks.get(call) is False:
            return
        cache = self._caches.get(call)
        if not cache:
            return
        kept_all = dict(cache)
        self._keep_what_rehash_steps_read()
        if call in self._shrinks:
            return
        self._rehashing = self._decided = True
        self._calls, self._order = {}, []
        swapped = self._install()
        try:
            again = self.unet(sample, timestep, *args, **kwargs)
            same = _same_tensors(output, again)
        except RuntimeError:  # a shallow module handed a dropped output (_check_inputs)
            same = False
        finally:
            self._restore(swapped)
            self._rehashing = False
        self._shrinks[call] = same
        if not same:
            cache.update(kept_all)
            self._dropped.pop(call, None)

    def _keep_what_rehash_steps_read(self) -> None:
        """After a full step, keep real tensors only for the deep outputs a rehash step feeds
        into the shallow path.

        At a rehash step the UNet's own code still runs between the stand-ins, so every deep
        module still "returns" its cached output, but most of them feed only other deep
        modules, whose outputs come from the cache anyway. Kept: the output of a deep module
        that ran right before a shallow one (the hidden states entering the outer up layers,
        which the UNet's code may concatenate with a skip first), and any deep output (or a
        view of it) that was handed to a shallow module at this full step (a skip connection
        from a deep down layer into an outer up layer). The rest become zero-size stand-ins of
        the same shape and dtype (an expanded scalar). With ``layers=1`` this took the cache of
        a small AnimateDiff UNet (channels 64-128, 16 frames, 32x32 latents) from 38.5 to 4.0
        MiB, and UNet3D's from 46.5 to 4.0 MiB. A shallow module that is handed one of them at
        a rehash step raises instead of computing with it (:meth:`_check_inputs`)."""
        cache = self._caches.get(self._call_in_step)
        if not cache:
            return
        dropped = self._dropped[self._call_in_step] = {}
        order = self._order
        kept = {key for key, following in zip(order, order[1:]) if key is not None and following is None}
        for key, value in cache.items():
            if key in kept or any(
                isinstance(leaf, torch.Tensor) and _storage(leaf) in self._shallow_reads
                for leaf in torch.utils._pytree.tree_leaves(value)
            ):
                continue
            cache[key] = torch.utils._pytree.tree_map_only(torch.Tensor, _placeholder(key, dropped), value)

    def _note_inputs(self, args: tuple, kwargs: dict) -> None:
        """At a full step, remember what a shallow module is handed (see above)."""
        for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                self._shallow_reads.add(_storage(leaf))

    def _check_inputs(self, name: str, args: tuple, kwargs: dict) -> None:
        """Refuse to run a shallow module on a deep output this wrapper did not keep."""
        dropped = self._dropped.get(self._call_in_step)
        if not dropped:
            return
        for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and id(leaf) in dropped:
                raise RuntimeError(
                    f"StepRehash: {name} reads the output of {dropped[id(leaf)][0]} at a rehash step, "
                    "which this wrapper keeps only for modules that run right after the deep part; "
                    "this UNet's layout is not supported (report it with the UNet's class)"
                )

    def _call_key(self, name: str) -> str:
        """``name`` and how often it ran before in this call: a module run twice in one
        call gets two cache entries."""
        count = self._calls.get(name, 0)
        self._calls[name] = count + 1
        return f"{name}#{count}"

    def _decide(self, features: torch.Tensor | None) -> None:
        """Choose full or rehash for this call, when the deep part is entered."""
        if self._decided:
            return
        self._decided = True
        cached = self._features.get(self._call_in_step)
        reshaped = isinstance(features, torch.Tensor) and cached is not None and features.shape != cached.shape
        condition = self._conditions.get(self._call_in_step)
        if not self._caches.get(self._call_in_step) or reshaped or not _same_tensors(self._condition, condition):
            # Nothing cached, or cached for inputs of another shape (a pipeline that stops
            # classifier-free guidance halves its batch) or under other conditioning (another
            # prompt, another guidance pass): only a full step fits.
            rehash = False
        elif self.options.interval is not None:
            rehash = self._step % self.options.interval != 0
        elif cached is None or not isinstance(features, torch.Tensor):
            rehash = False
        else:
            diff = torch.linalg.vector_norm((features - cached).float())
            self._distance = float(diff / torch.linalg.vector_norm(cached.float()).clamp_min(1e-12))
            rehash = self._distance <= self.options.threshold
        self._rehashing = rehash
        if not rehash:
            self._conditions[self._call_in_step] = [t.detach().clone() for t in self._condition]
            if isinstance(features, torch.Tensor):
                self._features[self._call_in_step] = features.detach()

    def _run(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        fn = self._compiled.get(name, module)
        return fn(*args, **kwargs)

    def _plan(self) -> list[tuple[Any, Any, str, nn.Module, bool]]:
        """Every module that gets a stand-in, as ``(container, key, name, module, deep)``:
        whole blocks, and with ``layers`` the layer modules of the cut pair instead of it."""
        unet, depth, layers = self.unet, self.options.depth, self.options.layers
        plan = []

        def add(container: Any, key: Any, name: str, deep: bool) -> None:
            module = container[key] if isinstance(container, nn.ModuleList) else getattr(container, key)
            plan.append((container, key, name, module, deep))

        def add_layers(block: nn.Module, name: str, deep_layer: Callable[[int], bool], sampler_deep: bool) -> None:
            for attr, modules in _layer_lists(block):
                for i in range(len(modules)):
                    add(modules, i, f"{name}.{attr}.{i}", deep_layer(i))
            for attr in ("downsamplers", "upsamplers"):
                for i, _ in enumerate(getattr(block, attr, None) or ()):
                    add(getattr(block, attr), i, f"{name}.{attr}.{i}", sampler_deep)

        for i, block in enumerate(unet.down_blocks):
            if layers is not None and i == depth - 1:
                add_layers(block, f"down.{i}", lambda j: j >= layers - 1, sampler_deep=True)
            else:
                add(unet.down_blocks, i, f"down.{i}", deep=i >= depth)
        add(unet, "mid_block", "mid", deep=True)
        deep_up = len(unet.up_blocks) - depth
        for i, block in enumerate(unet.up_blocks):
            if layers is not None and i == deep_up:
                count = len(block.resnets)
                add_layers(block, f"up.{i}", lambda j, count=count: j < count - layers, sampler_deep=False)
            else:
                add(unet.up_blocks, i, f"up.{i}", deep=i < deep_up)
        return plan

    def _install(self) -> list[tuple[Any, Any, nn.Module]]:
        swapped = []
        for container, key, name, module, deep in self._plan():
            stand_in = _StandIn(self, name, module, deep)
            if isinstance(container, nn.ModuleList):
                container[key] = stand_in
            else:
                setattr(container, key, stand_in)
            swapped.append((container, key, module))
        return swapped

    @staticmethod
    def _restore(swapped: list[tuple[Any, Any, nn.Module]]) -> None:
        for container, key, module in reversed(swapped):
            if isinstance(container, nn.ModuleList):
                container[key] = module
            else:
                setattr(container, key, module)


_SAMPLERS = ("downsamplers", "upsamplers")

PER_STEP_INPUTS = frozenset(
    {"down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals"}
)
"""Keyword arguments that are per-step inputs, as the latents are, not conditioning: the
residuals that a ControlNet computes from its control image and the step's latents (new at
every step), and a T2I-Adapter's. The UNet's own code adds them to the blocks' outputs and skip
connections, so at a rehash step the shallow path gets this step's residuals and the reused
deep outputs are those of the last full step (as DeepCache does)."""


def _layer_lists(block: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The per-layer module lists of a diffusers block: its module lists as long as
    ``resnets`` (``resnets``, ``attentions``, ``temp_convs``, ``motion_modules``, ...)."""
    count = len(block.resnets)
    return [
        (attr, child)
        for attr, child in block.named_children()
        if attr not in _SAMPLERS and isinstance(child, nn.ModuleList) and len(child) == count
    ]


def _check_cut(down: nn.Module, up: nn.Module, depth: int, layers: int) -> None:
    """Refuse ``layers`` where the cut pair is not laid out as diffusers' blocks are."""
    for role, block in (("down", down), ("up", up)):
        where = f"{role} block {type(block).__name__} (the pair at depth {depth})"
        if not isinstance(getattr(block, "resnets", None), nn.ModuleList):
            raise ValueError(f"StepRehash layers needs per-layer module lists; {where} has no 'resnets' list")
        lists = {attr for attr, _ in _layer_lists(block)}
        other = [attr for attr, _ in block.named_children() if attr not in lists and attr not in _SAMPLERS]
        if other:
            # A module outside the aligned layer lists would run on reused features unnoticed.
            raise ValueError(
                f"StepRehash layers can cut only blocks made of aligned layer lists and samplers; "
                f"{where} also has {', '.join(other)}: use layers=None"
            )
    if len(up.resnets) != len(down.resnets) + 1:
        raise ValueError(
            f"StepRehash layers expects the up block to have one layer more than its down block "
            f"(diffusers' layout), got {len(up.resnets)} and {len(down.resnets)} at depth {depth}: use layers=None"
        )
    if layers > len(up.resnets):
        raise ValueError(
            f"StepRehash layers must be in [1, {len(up.resnets)}] for the up block at depth {depth}, got {layers}"
        )


def _same_tensors(a: Any, b: Any) -> bool:
    """Whether two UNet outputs or inputs (tensors, lists and tuples of them, diffusers output
    dataclasses) are equal."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):  # diffusers' BaseOutput is an OrderedDict
        return a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_tensors(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return a == b


def _placeholder(key: str, dropped: dict[int, tuple[str, torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Makes zero-size stand-ins (an expanded scalar zero) for ``key``'s output tensors,
    recording each in ``dropped``."""

    def make(tensor: torch.Tensor) -> torch.Tensor:
        stand_in = torch.zeros((), dtype=tensor.dtype, device=tensor.device).expand(tensor.shape)
        dropped[id(stand_in)] = (key, stand_in)
        return stand_in

    return make


def _storage(tensor: torch.Tensor) -> int:
    """Where ``tensor``'s data lives: views of one tensor share it."""
    return tensor.untyped_storage().data_ptr()


def _features(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The features a module receives: ``hidden_states`` (diffusers' name), else its first
    tensor argument (resnets take ``input_tensor``)."""
    features = kwargs.get("hidden_states")
    if isinstance(features, torch.Tensor):
        return features
    return next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)


def _as_float(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().flatten()[0])
    return float(timestep)
