"""memopt's options: one frozen, validated dataclass.

Options reach memopt as ``torch.compile(model, backend="memopt", options={...})`` or as
keyword arguments of :func:`memopt.compile`. An unknown key or a bad value fails at once
with a ``ValueError`` naming the valid keys or values, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

LOWERINGS = ("inductor", "eager")
REVERSIBLE_MODES = ("auto", "convert", False)

IM2WIN_MODES = ("auto", True, False)


@dataclasses.dataclass(frozen=True)
class Im2winOptions:
    """The ``im2win`` option in dict form, e.g. ``{"mode": "auto", "cache_path": "/tmp/c.json"}``."""

    mode: str | bool = "auto"
    """``"auto"``, ``True`` or ``False``, as for the plain ``im2win`` option."""
    cache_path: str | None = None
    """JSON file caching ``"auto"``'s measured choices; ``None`` is
    ``~/.cache/memopt/im2win.json`` (see ``docs/passes/im2win.md``)."""
    min_speedup: float = 1.05
    """``"auto"`` picks im2win only when aten's time is at least this multiple of im2win's,
    so measurement noise never swaps in a slower algorithm."""

    def __post_init__(self) -> None:
        _check_choice("im2win.mode", self.mode, IM2WIN_MODES)
        if self.cache_path is not None and not isinstance(self.cache_path, str):
            raise ValueError(f"memopt option 'im2win.cache_path' must be a path string or None, got {self.cache_path!r}")
        speedup = self.min_speedup
        if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not 1 <= speedup < math.inf:
            raise ValueError(f"memopt option 'im2win.min_speedup' must be a finite number >= 1, got {speedup!r}")
        object.__setattr__(self, "min_speedup", float(speedup))

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> Im2winOptions:
        return cls(**_known_keys("im2win", options, cls))


@dataclasses.dataclass(frozen=True)
class Config:
    """How memopt compiles one model.

    Exact passes default to ``"auto"`` (applied where they help on the device at hand);
    passes that change results on purpose stay off until named.
    """

    lowering: str = "inductor"
    """``"inductor"``: lower through Inductor's ``compile_fx`` (with ``config_patches``, never
    by patching global config). ``"eager"``: run the rewritten graphs op by op, for debugging
    and for fast tests."""

    memory_budget: float | None = None
    """Activation-memory budget in (0, 1] of the min-cut partitioner for training graphs:
    1.0 saves what the default partitioner saves, smaller values recompute more in the
    backward pass to keep fewer forward activations. ``None`` keeps PyTorch's default."""

    strict: bool = False
    """A pass that raises is skipped with a warning naming it; with ``strict=True`` the error
    propagates instead."""

    inductor_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Extra Inductor ``config_patches`` for ``lowering="inductor"`` (e.g.
    ``{"max_autotune": True}``); Inductor validates the keys."""

    reversible: str | bool = "auto"
    """Reversible chains in training graphs (``passes/reversible.py``). ``"auto"``: chains of
    additive couplings ``y1 = a*x1 + F(x2); y2 = b*x2 + G(y1)`` keep only their final
    outputs for the backward, which rebuilds each block's inputs and recomputes F and G
    (exact). ``"convert"``: additionally rewrite chains of residual sublayers
    ``x <- x + f(x)`` into that two-stream form first: an architecture change, for training
    from scratch. ``False``: off."""

    reversible_inline: bool = True
    """Trace each reversible chain's forward and backward (the rebuilds, recomputations and
    their gradients) into the partitioned graphs as ordinary aten nodes, which Inductor fuses
    and schedules like the rest (``memopt/reversible_inline.py``). ``False`` keeps each chain
    one opaque op that runs its steps one by one: about a third of the compile time at depth
    16, but 2-3x the training step time where blocks are small, and the only way to draw
    exactly eager's dropout masks (traced chains draw them as compiled graphs do)."""

    reversible_nested: bool = True
    """Run a reversible chain found inside a step of another (a converted transformer's
    attention/MLP stack inside its UNet block's step) as an op inside that step, so that the
    step's recomputation in the backward holds one inner step's activations at a time.
    Inner steps then run forward three times instead of twice. ``False`` leaves the inner
    chain as ordinary code in the outer step, which recomputes it whole. Measured on a
    converted UNet3D (CPU, ``benchmarks/reversible_unet.py``): 74.5 MiB of activations at
    1.29-1.53x Inductor's step time with ``True``, 93.7 MiB at 1.16x with ``False``."""

    reversible_deterministic_ops: tuple[str, ...] = ()
    """Custom operators that draw no random numbers, by namespace (``"torchao"``), name
    (``"mylib::fused_mlp"``) or overload (``"mylib::fused_mlp.default"``). A reversible chain
    must draw the same random numbers again when it recomputes a step in the backward, and
    memopt cannot see inside another library's kernels, so a step calling a custom op not
    tagged ``nondeterministic_seeded`` keeps an RNG state for it (5 KiB on a CPU), and a traced
    chain runs it under AOTAutograd's RNG-state operators, in case it draws (a fused kernel's
    dropout, say). The chain's note names the ops counted this way; naming them here says
    they do not draw. Name only ops you know to be deterministic: one that does draw would
    then get silently wrong gradients."""

    monarch: bool | MonarchOptions = False
    """Opt-in, changes results: replace dense linear layers of inference graphs (weights that
    are parameters) by their optimal Monarch projections, frozen as constants (see
    ``docs/passes/monarch.md``). ``False`` (default): off. ``True``: on with the defaults of
    :class:`MonarchOptions`. A dict with keys ``nblocks``, ``min_features``, ``targets``,
    ``max_rel_error`` sets them. ``memopt.nn.MonarchLinear`` layers need no option: they are
    one ``memopt.monarch_matmul`` op in every graph."""

    im2win: str | bool | Im2winOptions = "auto"
    """Rewrite 2-D convolutions (and a following ReLU/SiLU/GELU) into
    ``memopt::im2win_conv2d`` (``passes/im2win.py``). ``"auto"``: only where im2win measured
    faster than aten's convolution on the device at hand (timed once per layer shape, dtype and
    device; the choice is cached on disk). ``True``: wherever the configuration is supported.
    ``False``: never. A dict ``{"mode": ..., "cache_path": ..., "min_speedup": ...}`` (see
    :class:`Im2winOptions`) sets the cache file and the margin too."""

    slicing: Any = "auto"
    """Feature Slicer + Operator Grouping (``passes/slicing.py``, inference graphs only): runs
    chains of ops that treat one dimension independently (frames, tokens, batch x heads)
    slice by slice into a preallocated output, so peak memory is the chain's input, its
    output and one slice's intermediates. Exact, but it costs time (the sliced ops run one
    slice at a time, outside Inductor's fusion), so ``"auto"`` (default) slices only under
    memory pressure: when the graph's estimated peak of intermediates exceeds half the memory
    free on its device at compile time, and then only the groups it takes to get under that.
    ``True``: slice every group worth it; ``False``: off; or a dict of :class:`SlicingOptions`
    fields (``max_slice_bytes``, ``min_group_bytes``, ``max_slices``, ``compile_body``,
    ``max_peak_bytes``)."""

    step_rehash: Any = None
    """Step Rehash for diffusion denoisers (changes results on purpose, opt-in): reuse the deep
    part of a UNet from the last full denoising step. ``None`` (default): off;
    ``{"interval": N}``: a full step every N steps; ``{"threshold": t}``: rehash when the
    features entering the deep part differ from the last full step's by at most ``t``
    (relative L2); ``depth`` and ``layers`` choose where the reused part begins (see
    :class:`StepRehashOptions`). Applied to the module by :func:`memopt.compile` (or directly with
    ``memopt.diffusion.StepRehash``); a bare ``torch.compile(backend="memopt")`` sees only
    graphs and rejects it."""

    def __post_init__(self) -> None:
        _check_choice("lowering", self.lowering, LOWERINGS)
        if isinstance(self.im2win, Mapping):
            object.__setattr__(self, "im2win", Im2winOptions.from_dict(self.im2win))
        elif not isinstance(self.im2win, Im2winOptions):
            _check_choice("im2win", self.im2win, IM2WIN_MODES)
        if isinstance(self.im2win, Im2winOptions) and self.im2win.mode is False:
            object.__setattr__(self, "im2win", False)
        object.__setattr__(self, "monarch", MonarchOptions.from_option(self.monarch))
        object.__setattr__(self, "slicing", SlicingOptions.from_option(self.slicing))
        object.__setattr__(self, "step_rehash", StepRehashOptions.from_option(self.step_rehash))
        if self.memory_budget is not None:
            budget = self.memory_budget
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
                raise ValueError(
                    f"memopt option 'memory_budget' must be a number in (0, 1] or None, got {budget!r}"
                )
            object.__setattr__(self, "memory_budget", float(budget))
        _check_choice("reversible", self.reversible, REVERSIBLE_MODES)
        deterministic = _op_names("reversible_deterministic_ops", self.reversible_deterministic_ops)
        object.__setattr__(self, "reversible_deterministic_ops", deterministic)
        if not isinstance(self.reversible_inline, bool):
            raise ValueError(f"memopt option 'reversible_inline' must be True or False, got {self.reversible_inline!r}")
        if not isinstance(self.reversible_nested, bool):
            raise ValueError(f"memopt option 'reversible_nested' must be True or False, got {self.reversible_nested!r}")
        if not isinstance(self.strict, bool):
            raise ValueError(f"memopt option 'strict' must be True or False, got {self.strict!r}")
        if not isinstance(self.inductor_config, Mapping) or not all(
            isinstance(key, str) for key in self.inductor_config
        ):
            raise ValueError(
                "memopt option 'inductor_config' must be a dict of Inductor config names to values, "
                f"got {self.inductor_config!r}"
            )
        _check_inductor_config_names(self.inductor_config)
        object.__setattr__(self, "inductor_config", dict(self.inductor_config))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | Config | None = None) -> Config:
        """Build a Config from an options dict (``None`` gives the defaults)."""
        if options is None:
            return cls()
        if isinstance(options, Config):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"memopt options must be a dict, got {type(options).__name__}")
        valid = option_names()
        unknown = sorted(str(key) for key in options if key not in valid)
        if unknown:
            raise ValueError(
                f"unknown memopt option(s) {', '.join(map(repr, unknown))}; "
                f"valid options are: {', '.join(valid)}"
            )
        return cls(**options)

    def replace(self, **changes: Any) -> Config:
        """A copy with some options changed (validated like the original)."""
        valid = option_names()
        unknown = sorted(key for key in changes if key not in valid)
        if unknown:
            raise ValueError(
                f"unknown memopt option(s) {', '.join(map(repr, unknown))}; "
                f"valid options are: {', '.join(valid)}"
            )
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class SlicingOptions:
    """Options of the ``slicing`` pass (``Config.slicing`` given as a dict)."""

    max_slice_bytes: int | None = None
    """Largest estimated intermediate bytes of one slice of a group; the slice count is the
    smallest that meets it. ``None``: a quarter of the bytes the group reads and writes whole
    (its input and outputs), at least 256 KiB, so intermediates stop dominating the peak."""
    min_group_bytes: int = 16 << 20
    """Groups whose estimated saving is below this many bytes are left alone: slicing runs the
    group's ops one slice at a time outside Inductor's fusion, which cost 1.35-2.7x the time
    of small graphs (a 3 MiB MLP, a tiny GPT-2) on CPU. 16 MiB keeps ``True`` and dicts to
    groups whose activations dominate (video UNets); pass ``{"min_group_bytes": 1 << 20}`` to
    slice harder (8.4x instead of 4.1x lower peak on the CPU UNet3D benchmark). ``"auto"``
    uses 1 MiB: its memory budget already decides whether slicing is worth its time."""
    max_slices: int = 64
    """Upper bound on the slice count of one group (bounds the per-slice launch overhead)."""
    compile_body: bool | None = None
    """Run each group's body compiled by Inductor, once per distinct slice shape, instead of
    op by op. Op by op, a GPU runs every slice's ops as separate small kernels (35x
    Inductor's time on a small AnimateDiff step on an H100); compiled, each slice is a few
    fused kernels, at the price of one Inductor compile per group. ``None``: on under
    ``lowering="inductor"`` (on a CPU too: there it measured 0.89-0.97x the op-by-op time and
    a 0.3-1.2 MiB lower peak on the video UNets of ``benchmarks/slicing.py``, for a first call
    about 45 s longer), off under ``lowering="eager"``."""
    max_peak_bytes: int | str | None = None
    """Memory budget for the graph's intermediates: groups are sliced, largest saving at the
    estimated peak first, only until the estimated peak fits in this many bytes (nothing is
    sliced when it already fits). ``None``: slice every group worth it. ``"auto"``: half the
    memory free on the graph's device when it is compiled (what ``slicing="auto"`` uses, here
    with the dict's other options)."""

    def __post_init__(self) -> None:
        if self.max_slice_bytes is not None and (
            isinstance(self.max_slice_bytes, bool) or not isinstance(self.max_slice_bytes, int) or self.max_slice_bytes < 1
        ):
            raise ValueError(f"slicing option 'max_slice_bytes' must be a positive int or None, got {self.max_slice_bytes!r}")
        if isinstance(self.min_group_bytes, bool) or not isinstance(self.min_group_bytes, int) or self.min_group_bytes < 0:
            raise ValueError(f"slicing option 'min_group_bytes' must be an int >= 0, got {self.min_group_bytes!r}")
        if isinstance(self.max_slices, bool) or not isinstance(self.max_slices, int) or self.max_slices < 2:
            raise ValueError(f"slicing option 'max_slices' must be an int >= 2, got {self.max_slices!r}")
        if not any(self.compile_body is value for value in (None, True, False)):
            raise ValueError(f"slicing option 'compile_body' must be True, False or None, got {self.compile_body!r}")
        if self.max_peak_bytes is not None and self.max_peak_bytes != "auto" and (
            isinstance(self.max_peak_bytes, bool) or not isinstance(self.max_peak_bytes, int) or self.max_peak_bytes < 0
        ):
            raise ValueError(
                f"slicing option 'max_peak_bytes' must be an int >= 0, \"auto\" or None, got {self.max_peak_bytes!r}"
            )

    @classmethod
    def from_option(cls, value: Any) -> Any:
        """Validate ``Config.slicing``: ``"auto"`` and ``False`` stay, ``True`` and a dict become
        options."""
        if isinstance(value, cls) or (isinstance(value, str) and value == "auto") or value is False:
            return value
        if value is True:
            return cls()
        if isinstance(value, Mapping):
            return cls(**_known_keys("slicing", value, cls))
        raise ValueError(
            f"memopt option 'slicing' must be 'auto', True, False or a dict with keys "
            f"{', '.join(f.name for f in dataclasses.fields(cls))}; got {value!r}"
        )


@dataclasses.dataclass(frozen=True)
class StepRehashOptions:
    """Options of Step Rehash (``Config.step_rehash``): exactly one of ``interval`` and
    ``threshold``."""

    interval: int | None = None
    """Run the whole network every ``interval`` steps (>= 2); reuse the deep part between."""
    threshold: float | None = None
    """Reuse the deep part when the features entering it differ from the last full step's by
    at most this relative L2 distance (> 0)."""
    depth: int = 1
    """How many outer down/up block pairs form the shallow path that always runs (>= 1)."""
    layers: int | None = None
    """Cut inside the innermost shallow pair: at a rehash step only the last ``layers`` layers
    of its up block (and the down-block layers they read) run (>= 1); ``None``: the whole pair."""

    def __post_init__(self) -> None:
        if (self.interval is None) == (self.threshold is None):
            raise ValueError("step_rehash needs exactly one of 'interval' and 'threshold'")
        if self.interval is not None and (
            isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 2
        ):
            raise ValueError(f"step_rehash 'interval' must be an int >= 2, got {self.interval!r}")
        if self.threshold is not None and (
            isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not self.threshold > 0
        ):
            raise ValueError(f"step_rehash 'threshold' must be a number > 0, got {self.threshold!r}")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"step_rehash 'depth' must be an int >= 1, got {self.depth!r}")
        if self.layers is not None and (
            isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1
        ):
            raise ValueError(f"step_rehash 'layers' must be None or an int >= 1, got {self.layers!r}")

    @classmethod
    def from_option(cls, value: Any) -> StepRehashOptions | None:
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls(**_known_keys("step_rehash", value, cls))
        raise ValueError(
            "memopt option 'step_rehash' must be None or a dict such as {'interval': 3} or "
            f"{{'threshold': 0.05}}; got {value!r}"
        )


def _known_keys(option: str, value: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """``value`` as keyword arguments of the options dataclass ``cls``; unknown keys fail,
    naming the valid ones."""
    valid = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(str(key) for key in value if key not in valid)
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in memopt option {option!r}; "
            f"valid keys are: {', '.join(valid)}"
        )
    return dict(value)


_OP_NAME = re.compile(r"[A-Za-z_]\w*(::[A-Za-z_]\w*(\.[A-Za-z_]\w*)?)?")


def _op_names(option: str, value: Any) -> tuple[str, ...]:
    """``value`` as a tuple of operator namespaces or qualified names (``"ns"``, ``"ns::op"``,
    ``"ns::op.overload"``); anything else fails, naming the forms."""
    items = (value,) if isinstance(value, str) else value
    if isinstance(items, (list, tuple)) and all(isinstance(item, str) and _OP_NAME.fullmatch(item) for item in items):
        return tuple(items)
    raise ValueError(
        f"memopt option {option!r} must be a list of operator namespaces or names such as 'mylib', "
        f"'mylib::fused_mlp' or 'mylib::fused_mlp.default'; got {value!r}"
    )


def option_names() -> tuple[str, ...]:
    """The names ``Config`` accepts, in declaration order."""
    return tuple(field.name for field in dataclasses.fields(Config))


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    # `True in ("auto", ...)` style comparisons would let 1 pass for True: compare by type too.
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        raise ValueError(
            f"memopt option {name!r} must be one of {', '.join(map(repr, choices))}, got {value!r}"
        )


@dataclasses.dataclass(frozen=True)
class MonarchOptions:
    """Options of the ``monarch`` pass (``Config.monarch``)."""

    nblocks: int = 4
    """Blocks per Monarch factor (>= 2): weight bytes and FLOPs become about ``2/nblocks``
    of a square dense layer's."""

    min_features: int = 512
    """Layers with ``min(in_features, out_features)`` below this stay dense."""

    targets: tuple[str, ...] | None = None
    """``fnmatch`` patterns over module names (e.g. ``("*.mlp.*",)``); ``None``: every layer."""

    max_rel_error: float | None = None
    """Layers whose relative projection error ``||W - M||/||W||`` exceeds this stay dense
    (with a note); ``None``: no limit."""

    def __post_init__(self) -> None:
        nblocks = self.nblocks
        if isinstance(nblocks, bool) or not isinstance(nblocks, int) or nblocks < 2:
            raise ValueError(f"memopt option 'monarch': 'nblocks' must be an int >= 2, got {nblocks!r}")
        min_features = self.min_features
        if isinstance(min_features, bool) or not isinstance(min_features, int) or min_features < 1:
            raise ValueError(f"memopt option 'monarch': 'min_features' must be an int >= 1, got {min_features!r}")
        targets = self.targets
        if targets is not None:
            if isinstance(targets, str):
                targets = (targets,)
            if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
                raise ValueError(
                    "memopt option 'monarch': 'targets' must be None (every layer) or a non-empty list of name "
                    f"patterns, got {targets!r}"
                )
            object.__setattr__(self, "targets", tuple(targets))
        limit = self.max_rel_error
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
                raise ValueError(
                    f"memopt option 'monarch': 'max_rel_error' must be None or a number > 0, got {limit!r}"
                )
            object.__setattr__(self, "max_rel_error", float(limit))

    @classmethod
    def from_option(cls, value: Any) -> MonarchOptions | bool:
        """``False``/``None`` -> ``False``; ``True`` -> defaults; a dict -> validated options."""
        if value is False or value is None:
            return False
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls(**_known_keys("monarch", value, cls))
        raise ValueError(
            "memopt option 'monarch' must be False, True or a dict with keys nblocks, min_features, "
            f"targets, max_rel_error; got {value!r}"
        )


def _check_inductor_config_names(options: Mapping[str, Any]) -> None:
    """Raise on a name ``torch._inductor.config`` does not have (``"triton.cudagraphs"``
    style for nested ones), with the closest names: a typo fails here, not at the first
    call's compile."""
    if not options:
        return
    import difflib

    from torch._inductor import config as inductor_config

    # Every option the module declares ("cpp.threads" for nested ones); an attribute is not
    # one (the "cpp" namespace, a module it imports such as "os").
    known = list(getattr(inductor_config, "_config", None) or inductor_config.get_config_copy())
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise ValueError(
                f"memopt option 'inductor_config': torch._inductor.config has no option {name!r}"
                + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")
            )
        expected = _inductor_value_mismatch(getattr(inductor_config, "_config", {}).get(name), options[name])
        if expected:
            raise ValueError(
                f"memopt option 'inductor_config': {name!r} must be {expected}; got {options[name]!r}"
            )


# Declared Inductor config types the check knows: how to name them, and what fits.
_PLAIN_TYPES: dict[type, tuple[str, Any]] = {
    bool: ("True or False", lambda value: isinstance(value, bool)),
    int: ("an int", lambda value: isinstance(value, int) and not isinstance(value, bool)),
    float: ("a number", lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)),
    str: ("a string", lambda value: isinstance(value, str)),
}


def _inductor_value_mismatch(entry: Any, value: Any) -> str | None:
    """What an Inductor config entry takes, when its declared type is a plain one (bool,
    int, float, str, a ``Literal``, or one of those or ``None``) that ``value`` is not;
    ``None`` when it fits or the type is one this does not check. A string ``"false"``
    would be true to Inductor."""
    import types
    import typing

    declared = getattr(entry, "value_type", None)
    if declared is None:
        return None
    union = typing.get_origin(declared) in (typing.Union, types.UnionType)  # X | None, Optional[X]
    choices = typing.get_args(declared) if union else (declared,)
    optional = type(None) in choices
    if optional and value is None:
        return None
    descriptions = []
    for choice in choices:
        if choice is type(None):
            continue
        if typing.get_origin(choice) is typing.Literal:
            allowed = typing.get_args(choice)
            description, fits = "one of " + ", ".join(map(repr, allowed)), value in allowed
        elif choice in _PLAIN_TYPES:
            description, check = _PLAIN_TYPES[choice]
            fits = check(value)
        else:
            return None  # a type this does not check
        if fits:
            return None
        descriptions.append(description)
    return " or ".join(descriptions + ["None"] * optional) or None
