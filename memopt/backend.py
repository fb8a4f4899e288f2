"""The ``memopt`` torch.compile backend.

``torch.compile(model, backend="memopt", options={...})`` finds :func:`memopt_backend`
through the ``torch_dynamo_backends`` entry point. For each graph Dynamo captures it
validates the options, runs memopt's graph passes, estimates memory before and after,
records a :class:`memopt.Report`, and lowers the result.
"""

from __future__ import annotations

import dataclasses

import itertools
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from memopt._torch_compat import inductor_mode_options
from memopt.config import Config
from memopt.driver import run_passes
from memopt.estimate import estimate
from memopt.passes import PassContext
from memopt.passes.base import BEFORE_CALL
from memopt.report import Report, discard, record

log = logging.getLogger("memopt")
_graph_counter = itertools.count()


def memopt_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | Config | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """Compile one Dynamo graph with memopt (the function behind ``backend="memopt"``).

    ``mode`` (what ``torch.compile(..., mode=...)`` passes) stands for Inductor config
    patches, applied to memopt's Inductor lowering under the user's own ``inductor_config``."""
    config = Config.from_options(with_mode(options, mode))
    if config.step_rehash is not None:
        raise ValueError(
            "memopt option 'step_rehash' wraps the denoiser module, which a torch.compile backend "
            "never sees: use memopt.compile(unet, step_rehash=...) or memopt.diffusion.StepRehash(unet, ...)"
        )
    training = torch.is_grad_enabled() and any(
        isinstance(value, torch.Tensor) and value.requires_grad for value in example_inputs
    )
    device = _graph_device(example_inputs)
    before = estimate(gm)
    report = Report(
        graph_index=next(_graph_counter),
        training=training,
        device=str(device),
        nodes_before=len(gm.graph.nodes),
        op_counts=op_counts(gm),
        peak_before=before.peak_bytes,
        timeline_before=before.live_bytes,
    )
    ctx = PassContext(config=config, example_inputs=example_inputs, training=training, device=device)
    original = gm  # the passes work on copies
    gm, report.passes = run_passes(gm, ctx)
    _set_after(report, gm)
    record(report)
    from memopt.lowering import lower  # imports Inductor: only once something is compiled

    try:
        compiled = lower(gm, example_inputs, config, report)
    except Exception as error:
        if isinstance(error, _DYNAMO_SIGNALS):
            discard(report)  # this graph is traced again, and reported then
            raise
        if config.strict or report.rewrites == 0:
            raise
        reason = f"{type(error).__name__}: {error}"
        if config.reversible_inline and any(
            node.target is torch.ops.memopt.reversible_chain.default for node in gm.graph.nodes
        ):
            # Reversible chains traced into the graphs are the rewrite Inductor most often
            # cannot take (a traced GroupNorm backward with symbolic sizes): keep them as ops.
            report.partition_notes = []
            try:
                compiled = lower(gm, example_inputs, dataclasses.replace(config, reversible_inline=False), report)
            except Exception as retry_error:
                if isinstance(retry_error, _DYNAMO_SIGNALS):
                    discard(report)
                    raise
            else:
                report.partition_notes.append(
                    f"reversible chains run as ops (reversible_inline=False): lowering them traced failed ({reason})"
                )
                return _logged(_with_hooks(compiled, gm.meta.get(BEFORE_CALL, ())), report)
        # Whatever a pass left that the lowering cannot take, the user's model still compiles:
        # without memopt's rewrites, as the strict=False contract promises for passes.
        message = f"memopt: lowering the rewritten graph failed, compiling it without memopt's rewrites: {reason}"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        log.warning(message)
        report.lowering_error = reason
        report.saved_activation_bytes = report.saved_activations = None
        report.partition_notes = []
        for result in report.passes:
            if result.rewrites:
                result.notes.append(f"{result.rewrites} rewrite(s) dropped: the rewritten graph failed to lower")
                result.rewrites, result.bytes_saved = 0, 0
        _set_after(report, original)
        return _logged(lower(original, example_inputs, config, report), report)
    return _logged(_with_hooks(compiled, gm.meta.get(BEFORE_CALL, ())), report)


def _logged(compiled: Callable[..., Any], report: Report) -> Callable[..., Any]:
    log.info("%s", report.summary())
    return compiled


def _with_hooks(compiled: Callable[..., Any], hooks: Sequence[Callable[[Sequence[Any]], None]]) -> Callable[..., Any]:
    """``compiled``, running each pass's ``BEFORE_CALL`` hook on a call's inputs first. Dynamo
    calls it with the inputs as arguments; a caller that knows it as a boxed function (its
    ``_boxed_call``, which the wrapper keeps) passes them as one list."""
    if not hooks:
        return compiled
    boxed = getattr(compiled, "_boxed_call", False)

    def run(*args: Any) -> Any:
        inputs = args[0] if boxed and len(args) == 1 and isinstance(args[0], list) else args
        for hook in hooks:
            hook(inputs)
        return compiled(*args)

    run._boxed_call = boxed  # type: ignore[attr-defined]
    return run


# Not failures but Dynamo's requests to trace the frame again (with a scalar specialized,
# say): they must reach Dynamo.
_DYNAMO_SIGNALS = (torch._dynamo.exc.RestartAnalysis, torch._dynamo.exc.SkipFrame)


def _set_after(report: Report, gm: torch.fx.GraphModule) -> None:
    after = estimate(gm)
    report.nodes_after = len(gm.graph.nodes)
    report.peak_after = after.peak_bytes
    report.timeline_after = after.live_bytes


def op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    """How many times each function, method or module is called in ``gm``, most common first."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            name = op_name(node)
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def op_name(node: torch.fx.Node) -> str:
    """A short readable name for what a node calls (``conv2d``, ``Tensor.view``, ``aten.mm``)."""
    target = node.target
    if node.op == "call_method":
        return f"Tensor.{target}"
    if node.op == "call_module":
        return str(target)
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    name = getattr(target, "__name__", str(target))
    module = getattr(target, "__module__", "") or ""
    if module.startswith("_operator") or module == "operator":
        return f"operator.{name}"
    return name


def _graph_device(example_inputs: Sequence[Any]) -> torch.device:
    for value in example_inputs:
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            return value.device
    return torch.device("cpu")


def with_mode(options: Mapping[str, Any] | Config | None, mode: str | None) -> Mapping[str, Any] | Config | None:
    """``options`` with the Inductor patches of a ``torch.compile`` ``mode`` added under their
    ``inductor_config`` (whose own entries win)."""
    if mode is None or mode == "default":
        return options
    patches = inductor_mode_options(mode)
    if isinstance(options, Config):
        return options.replace(inductor_config={**patches, **options.inductor_config})
    options = dict(options or {})
    options["inductor_config"] = {**patches, **dict(options.get("inductor_config") or {})}
    return options


def compile(
    model: Callable[..., Any],
    *,
    fullgraph: bool = False,
    dynamic: bool | None = None,
    mode: str | None = None,
    **options: Any,
):
    """Shorthand for ``torch.compile(model, backend="memopt", options=options)``.

    Options are validated here, so a typo fails at once rather than at the first call.
    ``mode`` is ``torch.compile``'s (``"max-autotune"``, ``"reduce-overhead"``, ...): the
    Inductor settings it stands for join ``inductor_config``. With ``step_rehash`` the model
    is wrapped in :class:`memopt.diffusion.StepRehash`, whose blocks are compiled with the
    other options (and ``fullgraph``, ``dynamic``).
    """
    options = dict(with_mode(options, mode))
    config = Config.from_options(options)
    if config.step_rehash is not None:
        from memopt.diffusion import StepRehash

        rest = {key: value for key, value in options.items() if key != "step_rehash"}
        rehash = config.step_rehash
        return StepRehash(
            model, interval=rehash.interval, threshold=rehash.threshold, depth=rehash.depth,
            layers=rehash.layers, compile_options=rest, fullgraph=fullgraph, dynamic=dynamic,
        )
    return torch.compile(
        model, backend=memopt_backend, fullgraph=fullgraph, dynamic=dynamic, options=options or None
    )
