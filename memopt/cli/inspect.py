"""``memopt inspect``: what memopt sees in a model and what it does to it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from memopt._torch_compat import dynamo_explain
from memopt.backend import memopt_backend
from memopt.config import Config
from memopt.report import collect_reports, format_bytes, format_report


def inspect_model(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    options: dict[str, Any] | None = None,
    train: bool = False,
) -> dict[str, Any]:
    """Compile ``model`` with memopt on ``inputs`` and gather what a user should see.

    Returns a JSON-ready dict: graphs and graph breaks (with reasons), per-graph op histogram,
    parameter bytes, estimated peak before/after the passes, each pass's result, and for
    ``train=True`` the bytes the forward graphs save for the backward.
    """
    options = dict(options or {})
    # The passes decide the same whatever the lowering; eager keeps inspection quick.
    options.setdefault("lowering", "eager")
    config = Config.from_options(options)
    if config.step_rehash is not None:
        raise ValueError(
            "option 'step_rehash' wraps a denoiser's calls across steps, which one inspected call does "
            "not show: inspect without it (memopt.compile(unet, step_rehash=...) applies it)"
        )
    _run_eagerly_once(model, inputs)
    model.train(train)

    torch._dynamo.reset()
    explanation = dynamo_explain(model, *inputs)
    breaks = [_break_info(reason) for reason in explanation.break_reasons]

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=memopt_backend, options=config)
    with collect_reports() as reports:
        if train:
            outputs = compiled(*inputs)
            loss = sum(leaf.float().sum() for leaf in tree_leaves(outputs) if _differentiable(leaf))
            if isinstance(loss, torch.Tensor):
                loss.backward()
        else:
            with torch.no_grad():
                compiled(*inputs)
    torch._dynamo.reset()

    params = list(model.parameters())
    buffers = list(model.buffers())
    return {
        "mode": "train" if train else "inference",
        "options": {key: value for key, value in options.items()},
        "parameters": len(params),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in buffers),
        "graph_count": len(reports),
        "graph_break_count": len(breaks),
        "graph_breaks": breaks,
        "graphs": [report.to_dict(timelines=True) for report in reports],
        "estimated_peak_before": max((r.peak_before for r in reports), default=0),
        "estimated_peak_after": max((r.peak_after for r in reports), default=0),
        "saved_activation_bytes": (
            sum(r.saved_activation_bytes or 0 for r in reports) if train else None
        ),
    }


class InputError(ValueError):
    """The model does not run on the given inputs, eagerly: the inputs' fault, not memopt's."""


def _run_eagerly_once(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> None:
    """Run ``model`` on ``inputs`` eagerly (evaluation mode, no autograd) so that inputs it
    cannot take fail with PyTorch's own message, not a compiler's wrapping of it."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as error:
        lines = str(error).strip().splitlines()
        message = f"the model does not run on these inputs: {type(error).__name__}: {lines[0] if lines else ''}"
        floats = any(tensor.dtype.is_floating_point for tensor in inputs)
        if floats and any(word in str(error) for word in ("indices", "Long", "Int")):
            message += " (integer inputs such as token ids: give a dtype, e.g. --input 8x128:int64)"
        raise InputError(message) from error
    finally:
        model.train(training)


def _differentiable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad and value.dtype.is_floating_point


def _break_info(reason: Any) -> dict[str, str]:
    location = ""
    stack = getattr(reason, "user_stack", None) or []
    if stack:
        frame = stack[-1]
        location = f"{frame.filename}:{frame.lineno} in {frame.name}"
    text = str(getattr(reason, "reason", reason)).strip().splitlines()
    return {"reason": text[0] if text else "", "location": location}


def format_text(result: dict[str, Any], title: str) -> str:
    """The human-readable form of :func:`inspect_model`'s result."""
    lines = [f"memopt inspect {title}", f"mode: {result['mode']}"]
    if result["options"]:
        lines.append("options: " + json.dumps(result["options"], default=str))
    lines.append(
        f"parameters: {result['parameters']} tensors, {format_bytes(result['parameter_bytes'])}"
        f" (buffers {format_bytes(result['buffer_bytes'])})"
    )
    lines.append(f"graphs: {result['graph_count']}, graph breaks: {result['graph_break_count']}")
    for number, info in enumerate(result["graph_breaks"], 1):
        where = f" at {info['location']}" if info["location"] else ""
        lines.append(f"  break {number}: {info['reason']}{where}")
    lines.append(
        f"estimated peak (largest graph): {format_bytes(result['estimated_peak_before'])} before passes, "
        f"{format_bytes(result['estimated_peak_after'])} after"
    )
    if result["saved_activation_bytes"] is not None:
        lines.append(f"saved for backward (all graphs): {format_bytes(result['saved_activation_bytes'])}")
    for graph in result["graphs"]:
        lines.append("")
        lines.append(format_report(graph, ops=True, details=True))
    return "\n".join(lines)


def plot_timelines(result: dict[str, Any], path: str, title: str) -> None:
    """Write a PNG of live bytes over the node order, before and after the passes, per graph."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graphs = result["graphs"] or []
    rows = max(len(graphs), 1)
    figure, axes = plt.subplots(rows, 1, figsize=(9, 2.8 * rows), squeeze=False)
    for axis, graph in zip(axes[:, 0], graphs):
        mib = 1024 * 1024
        axis.plot(
            [b / mib for b in graph["timeline_before"]], label="before passes", color="tab:gray", linewidth=3, alpha=0.5
        )
        axis.plot([b / mib for b in graph["timeline_after"]], label="after passes", color="tab:blue", linestyle="--")
        kind = "training" if graph["training"] else "inference"
        axis.set_title(f"graph {graph['graph_index']} ({kind})", fontsize=9)
        axis.set_xlabel("node")
        axis.set_ylabel("live MiB")
        axis.legend(fontsize=8)
    if not graphs:
        axes[0, 0].text(0.5, 0.5, "no graph captured", ha="center")
    figure.suptitle(f"memopt inspect {title}: estimated live bytes", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
