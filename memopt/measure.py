"""Measured peak memory and time of a call, on CPU or CUDA.

CUDA: the device's peak-allocation statistics. CPU: the PyTorch profiler's allocator events,
which see every allocation through PyTorch's CPU allocator, including those made by
Inductor-compiled code. Benchmarks and ``memopt demo`` use this, so their numbers compare.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from memopt._torch_compat import profiler_allocations

DEVICES = ("cpu", "cuda")


@dataclasses.dataclass
class Measurement:
    """Peak bytes allocated above the starting level while ``fn`` ran, and its wall time."""

    peak_bytes: int
    time_s: float
    """Median wall time of the timed calls."""
    times_s: list[float]
    device: str
    result: Any = dataclasses.field(default=None, repr=False)
    """What the last call returned."""


def measure(
    fn: Callable[..., Any],
    *args: Any,
    device: str | None = None,
    warmup: int = 0,
    repeat: int = 1,
    **kwargs: Any,
) -> Measurement:
    """Run ``fn(*args, **kwargs)`` and report its peak memory and time.

    ``fn`` runs ``warmup`` times untimed, then ``repeat`` times timed. ``peak_bytes`` is the
    highest level of allocated bytes above the level at the first timed call, over the timed
    calls (CUDA) or over the first timed call (CPU, where that call runs under the profiler;
    its time is left out of the median when ``repeat > 1`` because profiling slows it).
    ``device`` defaults to ``"cuda"`` when any tensor argument is on CUDA, else ``"cpu"``.
    """
    if repeat < 1 or warmup < 0:
        raise ValueError(f"measure needs repeat >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")
    device = device or _infer_device(args, kwargs)
    if device not in DEVICES:
        raise ValueError(f"measure: device must be one of {', '.join(DEVICES)}, got {device!r}")
    for _ in range(warmup):
        fn(*args, **kwargs)
    if device == "cuda":
        return _measure_cuda(fn, args, kwargs, repeat)
    return _measure_cpu(fn, args, kwargs, repeat)


def _infer_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    if any(isinstance(leaf, torch.Tensor) and leaf.is_cuda for leaf in leaves):
        return "cuda"
    if any(isinstance(leaf, torch.nn.Module) and any(p.is_cuda for p in leaf.parameters()) for leaf in leaves):
        return "cuda"
    return "cpu"


def _measure_cuda(fn: Callable[..., Any], args: tuple, kwargs: dict, repeat: int) -> Measurement:
    torch.cuda.synchronize()
    start_level = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    result = None
    for _ in range(repeat):
        begin = time.perf_counter()
        result = fn(*args, **kwargs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated() - start_level
    return Measurement(max(peak, 0), statistics.median(times), times, "cuda", result)


def _measure_cpu(fn: Callable[..., Any], args: tuple, kwargs: dict, repeat: int) -> Measurement:
    activities = [torch.profiler.ProfilerActivity.CPU]
    prof = torch.profiler.profile(activities=activities, profile_memory=True)
    with _stderr_without(_KINETO_NOTICE):
        prof.start()
    try:
        begin = time.perf_counter()
        result = fn(*args, **kwargs)
        profiled_time = time.perf_counter() - begin
    finally:
        with _stderr_without(_KINETO_NOTICE):
            prof.stop()
    peak = peak_from_profile(prof)
    times = []
    for _ in range(repeat - 1):
        begin = time.perf_counter()
        result = fn(*args, **kwargs)
        times.append(time.perf_counter() - begin)
    return Measurement(peak, statistics.median(times or [profiled_time]), times or [profiled_time], "cpu", result)


# Kineto writes "USDT:<time> ... profiler_start" (and profiler_stop) to stderr, from C++, each
# time a profiler starts or stops: two lines per CPU measurement in a user's terminal.
_KINETO_NOTICE = "USDT:"


@contextlib.contextmanager
def _stderr_without(prefix: str) -> Iterator[None]:
    """Hold back lines starting with ``prefix`` that anything (C++ included: file descriptor
    2 is redirected) writes to stderr inside the block; every other line is passed on after it."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no descriptor 2 (an embedded interpreter)
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            kept = [line for line in lines if not line.startswith(prefix)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def peak_from_profile(prof: torch.profiler.profile) -> int:
    """Highest running sum of CPU allocations minus frees recorded by a memory profile.

    Frees of memory allocated before profiling began count as negative, so the level can dip
    below the start; the peak is measured from the start level (0), never below it.
    """
    level = peak = 0
    for _, delta in sorted(profiler_allocations(prof, device="cpu")):
        level += delta
        peak = max(peak, level)
    return peak
