"""The ``im2win`` pass: 2-D convolutions (with a following activation) -> ``memopt::im2win_conv2d``.

Matches ``torch.conv2d`` / ``torch.nn.functional.conv2d`` call nodes of Dynamo's graph (the
two are one function) and, when the convolution's only user is a ReLU, SiLU or exact GELU,
fuses that activation into the op's epilogue (inference graphs; training graphs fuse only
ReLU, whose derivative comes from the saved output, see ``memopt/ops/im2win_conv2d.py``).

Option ``im2win`` (``Config.im2win``):

* ``"auto"`` (default): a site is rewritten only where im2win measured faster than aten's
  convolution on ``ctx.device``: each (shapes, dtype, layout, activation, device, versions)
  is timed once on random tensors (fastest of 7 interleaved runs) -- aten vs the op's CPU
  implementation on CPU; aten vs the implicit and materialized Triton kernels on CUDA --
  and the choice is cached in a JSON file (``Im2winOptions.cache_path``, default
  ``~/.cache/memopt/im2win.json``). im2win must beat aten by ``min_speedup`` (default 5%)
  to be picked, so noise never swaps in a slower algorithm.
* ``True``: every supported site is rewritten (CUDA uses ``DEFAULT_WINDOW``).
* ``False``: the pass does not run.

Unsupported sites are left to aten with a note: non-4-D input, dtypes other than
fp32/fp16/bf16, devices other than CPU/CUDA, symbolic (dynamic) shapes, padding ``"same"``
that needs asymmetric padding (even effective kernel), non-constant arguments.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from memopt import ops as _ops  # noqa: F401  (registers torch.ops.memopt.im2win_conv2d)
from memopt._torch_compat import detect_fake_mode
from memopt.config import Im2winOptions
from memopt.estimate import TRANSIENT_BYTES, estimate
from memopt.passes.base import GraphPass, PassContext, transformed_nodes
from memopt.report import PassResult, format_bytes
from memopt.triton_kernels import im2win_conv

log = logging.getLogger("memopt")

DEFAULT_CACHE_PATH = os.path.join("~", ".cache", "memopt", "im2win.json")
"""Where ``"auto"`` caches its measured choices unless ``Im2winOptions.cache_path`` says otherwise."""

# torch.nn.functional.conv2d is torch.conv2d, and F.gelu is the builtin Dynamo records.
_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu, F.relu_)
_SILU_FUNCTIONS = (F.silu,)
_GELU_FUNCTIONS = (F.gelu,)


def _conv_signature(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: A002
    """``torch.conv2d``'s signature, to bind a node's args and kwargs by name."""


_CONV_SIGNATURE = inspect.signature(_conv_signature)


class _Skip(Exception):
    """A site the pass leaves to aten; the message is the note."""


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    options = ctx.option if isinstance(ctx.option, Im2winOptions) else Im2winOptions(mode=ctx.option)
    result = PassResult("im2win")
    peak_before = estimate(gm).peak_bytes
    chooser = _Chooser(options)
    graph = gm.graph
    transformed = transformed_nodes(graph)
    for conv in list(graph.find_nodes(op="call_function", target=torch.conv2d)):
        result.matched += 1
        row: dict[str, Any] = {"node": conv.name}
        try:
            if conv in transformed:
                raise _Skip("runs under a torch.func transform (vmap, grad, jvp): the op has no batching rule")
            site = _match(conv, ctx)
            row.update(site.describe())
            algorithm, decision, times = chooser.choose(site, ctx.device)
            row.update(algorithm=algorithm, decision=decision)
            if times:
                row["times_ms"] = times
            if algorithm == "aten":
                result.notes.append(
                    f"{conv.name}: aten's convolution kept ({decision}: im2win not faster on {ctx.device})"
                )
            else:
                window = algorithm.removeprefix("im2win-")
                # What the chosen form allocates beside the output while it runs.
                row["workspace_bytes"] = im2win_conv.workspace_bytes(site.x_val, site.geometry, window)
                _rewrite(graph, site, window, row["workspace_bytes"])
                result.rewrites += 1
        except _Skip as reason:
            row.update(algorithm="aten", decision="unsupported", reason=str(reason))
            result.notes.append(f"{conv.name}: left to aten: {reason}")
        result.details.append(row)
    if result.rewrites:
        peak_after = estimate(gm).peak_bytes
        result.bytes_saved = max(0, peak_before - peak_after)
        if peak_after > peak_before:
            result.notes.append(
                f"estimated peak rises by {format_bytes(peak_after - peak_before)}: the im2win workspace "
                "(window tensors, channels-last copies of NCHW inputs) while a convolution runs"
            )
    return result


IM2WIN = GraphPass(name="im2win", config_field="im2win", run=run)


# --------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------


class _Site:
    """One convolution node, its constant arguments and the activation it may absorb."""

    def __init__(self, conv, x, weight, bias, stride, padding, dilation, groups, activation_node, activation, dtype):
        self.conv = conv
        self.dtype = dtype
        """What the convolution computes in: the graph's dtype, or autocast's."""
        self.x, self.weight, self.bias = x, weight, bias
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.activation_node = activation_node
        self.activation = activation
        self.x_val, self.weight_val = _val(x), _val(weight)
        self.bias_val = _val(bias) if bias is not None else None
        self.geometry = im2win_conv.geometry(
            self.x_val.shape, self.weight_val.shape, stride, padding, dilation, groups
        )

    @property
    def last(self) -> torch.fx.Node:
        return self.activation_node if self.activation_node is not None else self.conv

    def op_args(self, window: str) -> tuple[Any, ...]:
        return (
            self.x, self.weight, self.bias, list(self.stride), list(self.padding),
            list(self.dilation), self.groups, self.activation, window,
        )

    def describe(self) -> dict[str, Any]:
        geo = self.geometry
        element = self.dtype.itemsize
        window_bytes = geo.window_numel() * element
        im2col_bytes = geo.im2col_numel() * element
        return {
            "input": list(self.x_val.shape),
            "weight": list(self.weight_val.shape),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "dtype": str(self.dtype).removeprefix("torch."),
            "channels_last": im2win_conv.is_channels_last(self.x_val),
            "activation": self.activation,
            "im2win_window_bytes": window_bytes,
            "im2col_bytes": im2col_bytes,
            "workspace_ratio": round(window_bytes / im2col_bytes, 4) if im2col_bytes else None,
        }

    def cache_key(self, device: torch.device) -> str:
        parts = [
            _device_name(device), f"torch {torch.__version__}", str(self.dtype),
            "channels_last" if im2win_conv.is_channels_last(self.x_val) else "nchw",
            f"x{list(self.x_val.shape)}", f"w{list(self.weight_val.shape)}",
            f"bias={self.bias is not None}", f"s{list(self.stride)}", f"p{list(self.padding)}",
            f"d{list(self.dilation)}", f"g{self.groups}", self.activation,
        ]
        return "|".join(parts)


def _val(node: Any) -> Any:
    if not isinstance(node, torch.fx.Node):
        return node
    return node.meta.get("val", node.meta.get("example_value"))


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 1 and isinstance(value[0], int):
        return (value[0], value[0])
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(type(v) is int for v in value):
        return (value[0], value[1])
    raise _Skip(f"{name}={value!r} is not a constant int or pair of ints")


def _match(conv: torch.fx.Node, ctx: PassContext) -> _Site:
    try:
        bound = _CONV_SIGNATURE.bind(*conv.args, **conv.kwargs)
    except TypeError as error:
        raise _Skip(f"unrecognised conv2d arguments ({error})") from None
    bound.apply_defaults()
    args = bound.arguments
    x, weight, bias = args["input"], args["weight"], args["bias"]
    for name, node in (("input", x), ("weight", weight), ("bias", bias)):
        if node is not None and not (isinstance(node, torch.fx.Node) and isinstance(_val(node), torch.Tensor)):
            raise _Skip(f"{name} is not a tensor node of the graph")
    x_val, weight_val = _val(x), _val(weight)
    if x_val.dim() != 4:
        raise _Skip(f"{x_val.dim()}-D (unbatched) input; im2win takes NCHW batches")
    if x_val.device.type not in ("cpu", "cuda"):
        raise _Skip(f"device {x_val.device} (im2win runs on CPU and CUDA)")
    device_type = x_val.device.type
    bias_dtype = _val(bias).dtype if bias is not None else x_val.dtype
    if {x_val.dtype, weight_val.dtype, bias_dtype} - set(im2win_conv.DTYPES):
        raise _Skip(f"dtype {x_val.dtype}/{weight_val.dtype} (im2win supports float32, float16, bfloat16)")
    if torch.is_autocast_enabled(device_type):
        # The op casts like aten's conv2d under autocast: it computes in the autocast dtype.
        dtype = torch.get_autocast_dtype(device_type)
    elif weight_val.dtype != x_val.dtype or bias_dtype != x_val.dtype:
        raise _Skip(f"input, weight and bias dtypes differ ({x_val.dtype}/{weight_val.dtype}/{bias_dtype})")
    else:
        dtype = x_val.dtype
    if any(not isinstance(size, int) for size in (*x_val.shape, *weight_val.shape)):
        raise _Skip("dynamic (symbolic) shapes")
    groups = args["groups"]
    if type(groups) is not int:
        raise _Skip(f"groups={groups!r} is not a constant int")
    stride = _pair(args["stride"], "stride")
    dilation = _pair(args["dilation"], "dilation")
    padding = _padding(args["padding"], weight_val.shape[2:], dilation, stride)
    activation_node, activation = _activation(conv, ctx.training)
    return _Site(conv, x, weight, bias, stride, padding, dilation, groups, activation_node, activation, dtype)


def _padding(padding: Any, kernel: Any, dilation: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise _Skip("padding='same' with stride > 1")
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if any(total % 2 for total in totals):
            raise _Skip("padding='same' needs asymmetric padding here (even effective kernel); im2win pads symmetrically")
        return (totals[0] // 2, totals[1] // 2)
    return _pair(padding, "padding")


def _activation(conv: torch.fx.Node, training: bool) -> tuple[torch.fx.Node | None, str]:
    """The activation node fused into the op, if the convolution's only user is one."""
    if len(conv.users) != 1:
        return None, "none"
    user = next(iter(conv.users))
    if not user.args or user.args[0] is not conv or any(arg is conv for arg in user.args[1:]):
        return None, "none"
    name = None
    if user.op == "call_function":
        if user.target in _RELU_FUNCTIONS:
            name = "relu"
        elif user.target in _SILU_FUNCTIONS:
            name = "silu"
        elif user.target in _GELU_FUNCTIONS and user.kwargs.get("approximate", "none") == "none" and len(user.args) == 1:
            name = "gelu"
    elif user.op == "call_method" and user.target in ("relu", "relu_"):
        name = "relu"
    if name is None or (training and name != "relu"):
        # SiLU/GELU in training would recompute the convolution in the backward pass.
        return None, "none"
    return user, name


# --------------------------------------------------------------------------------------
# Rewriting
# --------------------------------------------------------------------------------------


def _rewrite(graph: torch.fx.Graph, site: _Site, window: str, workspace: int) -> None:
    op = torch.ops.memopt.im2win_conv2d.default
    original = _val(site.last)
    # The fake mode of the values themselves: Dynamo's example values belong to its tracing
    # mode, which is not the mode detect_fake_mode() finds first while the backend runs.
    fake_mode = getattr(site.x_val, "fake_mode", None) or detect_fake_mode([site.x_val, site.weight_val])
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        val = op(site.x_val, site.weight_val, site.bias_val, list(site.stride), list(site.padding),
                 list(site.dilation), site.groups, site.activation, window)
    if isinstance(original, torch.Tensor) and (
        tuple(val.shape) != tuple(original.shape) or val.stride() != original.stride()
    ):
        raise _Skip(
            f"output layout {tuple(val.shape)}/{val.stride()} differs from aten's "
            f"{tuple(original.shape)}/{original.stride()}"
        )
    with graph.inserting_before(site.last):
        node = graph.call_function(op, site.op_args(window))
    # Dynamo's nodes carry "example_value"; memopt's rules ask for "val": keep both true.
    node.meta["val"] = val
    node.meta[TRANSIENT_BYTES] = workspace  # memopt.estimate counts it while the op runs
    if "example_value" in site.last.meta:
        node.meta["example_value"] = val
    node.meta.update({key: site.last.meta[key] for key in ("stack_trace", "nn_module_stack") if key in site.last.meta})
    site.last.replace_all_uses_with(node)
    if site.activation_node is not None:
        graph.erase_node(site.activation_node)
    graph.erase_node(site.conv)


# --------------------------------------------------------------------------------------
# "auto": measure once, cache on disk
# --------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        import triton

        return f"{torch.cuda.get_device_name(device)} triton {triton.__version__}"
    return f"cpu {platform.machine()} {torch.backends.cpu.get_cpu_capability()} threads={torch.get_num_threads()}"


def cache_path(options: Im2winOptions) -> str:
    """The JSON file ``"auto"`` reads and writes its choices from."""
    return os.path.expanduser(options.cache_path or DEFAULT_CACHE_PATH)


_ALGORITHMS = ("aten", *(f"im2win-{window}" for window in im2win_conv.WINDOWS))


class _Chooser:
    """Picks aten or im2win for a site: forced, from the cache, or by timing both once."""

    def __init__(self, options: Im2winOptions) -> None:
        self.options = options
        self.path = cache_path(options)
        self._entries: dict[str, Any] | None = None

    def choose(self, site: _Site, device: torch.device) -> tuple[str, str, dict[str, float] | None]:
        if self.options.mode is True:
            window = im2win_conv.DEFAULT_WINDOW if device.type == "cuda" else "materialized"
            return f"im2win-{window}", "forced", None
        key = site.cache_key(device)
        entries = self._load()
        entry = entries.get(key)
        if isinstance(entry, dict) and entry.get("algorithm") in _ALGORITHMS:
            return entry["algorithm"], "cached", entry.get("times_ms")
        try:
            times = _time_candidates(site, device)
        except Exception as error:  # aten itself failed to run on random inputs (out of memory?)
            raise _Skip(f"could not time aten's convolution ({type(error).__name__}: {error})") from None
        viable = [name for name, ms in times.items() if name != "aten" and ms is not None]
        best = min(viable, key=times.__getitem__, default=None)
        if best is not None and times["aten"] >= self.options.min_speedup * times[best]:
            algorithm = best
        else:
            algorithm = "aten"
        entries[key] = {"algorithm": algorithm, "times_ms": times}
        self._save(entries)
        return algorithm, "measured", times

    def _load(self) -> dict[str, Any]:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path) as file:
                entries = json.load(file)
        except (OSError, ValueError):  # missing, unreadable or corrupt: measured again
            return {}
        return entries if isinstance(entries, dict) else {}

    def _save(self, entries: dict[str, Any]) -> None:
        # Merged into what the file holds now: another process sharing the cache may have
        # saved its own measurements since this one read it. Write-then-rename, so a
        # concurrent reader never sees half a file. A read-only location only costs
        # re-measuring next time.
        entries.update({key: value for key, value in self._read().items() if key not in entries})
        directory = os.path.dirname(self.path) or "."
        temporary = None
        try:
            os.makedirs(directory, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=directory, prefix=".im2win-", suffix=".json")
            with os.fdopen(fd, "w") as file:
                json.dump(entries, file, indent=1, sort_keys=True)
            os.replace(temporary, self.path)
        except OSError:
            if temporary is not None and os.path.exists(temporary):
                os.remove(temporary)


def _time_candidates(site: _Site, device: torch.device, rounds: int = 7) -> dict[str, float | None]:
    """Fastest of ``rounds`` runs, in milliseconds, of aten and of each im2win form on fresh
    random tensors.

    The candidates run interleaved, one call each per round, so a burst of load from other
    processes slows all of them alike; and the fastest run is compared, not the median,
    because interference only ever adds time (on a shared CPU, a multi-threaded oneDNN call
    can take 100x longer in a bad moment). A candidate that fails (a Triton compile error on
    an untested GPU, out of memory) gets ``None`` and is never chosen. One whose first run
    is over four times aten's is not run again: it cannot win.
    """
    x = _random_like(site.x_val, site.dtype)
    weight = _random_like(site.weight_val, site.dtype)
    bias = _random_like(site.bias_val, site.dtype) if site.bias_val is not None else None
    stride, padding, dilation, groups = list(site.stride), list(site.padding), list(site.dilation), site.groups
    activation = site.activation

    def aten() -> torch.Tensor:
        return im2win_conv.apply_activation(F.conv2d(x, weight, bias, stride, padding, dilation, groups), activation)

    candidates: dict[str, Callable[[], torch.Tensor]] = {"aten": aten}
    windows = im2win_conv.WINDOWS if device.type == "cuda" else ("materialized",)
    for window in windows:
        candidates[f"im2win-{window}"] = functools.partial(
            torch.ops.memopt.im2win_conv2d, x, weight, bias, stride, padding, dilation, groups, activation, window
        )
    samples: dict[str, list[float] | None] = {name: [] for name in candidates}
    active = list(candidates)
    with torch.no_grad():
        for round_index in range(-1, rounds):  # round -1: warm-up (and Triton autotuning)
            for name in list(active):
                try:
                    elapsed = _run_ms(candidates[name], device)
                except Exception as error:
                    if name == "aten":
                        raise
                    log.warning("im2win: running the %s form failed (%s); not using it", name, error)
                    samples[name] = None
                    active.remove(name)
                    continue
                if round_index >= 0:
                    samples[name].append(elapsed)
            if round_index == 0:
                aten_first = samples["aten"][0]
                active = [name for name in active if name == "aten" or samples[name][0] <= 4 * aten_first]
    return {name: round(min(runs), 4) if runs else None for name, runs in samples.items()}


def _run_ms(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - begin) * 1e3


def _random_like(val: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    memory_format = torch.channels_last if im2win_conv.is_channels_last(val) else torch.contiguous_format
    return torch.randn(tuple(val.shape), dtype=dtype, device=val.device).contiguous(memory_format=memory_format)
