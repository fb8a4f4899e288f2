"""memopt's options: one frozen, validated dataclass.

Options reach memopt as ``torch.compile(model, backend="memopt", options={...})`` or as
keyword arguments of :func:`memopt.compile`. An unknown key or a bad value fails at once
with a ``ValueError`` naming the valid keys or values, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

LOWERINGS = ("inductor", "eager")
REVERSIBLE_MODES = ("auto", "convert", False)


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

    reversible: str | bool = "auto"
    """Reversible chains in training graphs (``passes/reversible.py``). ``"auto"``: chains of
    additive couplings ``y1 = a*x1 + F(x2); y2 = b*x2 + G(y1)`` keep only their final
    outputs for the backward, which rebuilds each block's inputs and recomputes F and G
    (exact). ``"convert"``: additionally rewrite chains of residual sublayers
    ``x <- x + f(x)`` into that two-stream form first: an architecture change, for training
    from scratch. ``False``: off."""

    inductor_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Extra Inductor ``config_patches`` for ``lowering="inductor"`` (e.g.
    ``{"max_autotune": True}``); Inductor validates the keys."""

    def __post_init__(self) -> None:
        _check_choice("lowering", self.lowering, LOWERINGS)
        if self.memory_budget is not None:
            budget = self.memory_budget
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
                raise ValueError(
                    f"memopt option 'memory_budget' must be a number in (0, 1] or None, got {budget!r}"
                )
            object.__setattr__(self, "memory_budget", float(budget))
        _check_choice("reversible", self.reversible, REVERSIBLE_MODES)
        if not isinstance(self.strict, bool):
            raise ValueError(f"memopt option 'strict' must be True or False, got {self.strict!r}")
        if not isinstance(self.inductor_config, Mapping) or not all(
            isinstance(key, str) for key in self.inductor_config
        ):
            raise ValueError(
                "memopt option 'inductor_config' must be a dict of Inductor config names to values, "
                f"got {self.inductor_config!r}"
            )
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


def option_names() -> tuple[str, ...]:
    """The names ``Config`` accepts, in declaration order."""
    return tuple(field.name for field in dataclasses.fields(Config))


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    # `True in ("auto", ...)` style comparisons would let 1 pass for True: compare by type too.
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        raise ValueError(
            f"memopt option {name!r} must be one of {', '.join(map(repr, choices))}, got {value!r}"
        )
