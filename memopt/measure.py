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

from memopt._torch_compat import profiler_allocations, profiler_running

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
    device: str | torch.device | None = None,
    warmup: int = 0,
    repeat: int = 1,
    **kwargs: Any,
) -> Measurement:
    """Run ``fn(*args, **kwargs)`` and report its peak memory and time.

    ``fn`` runs ``warmup`` times untimed, then ``repeat`` times timed. ``peak_bytes`` is the
    highest level of allocated bytes above the level at the first timed call, over the timed
    calls (CUDA) or over the first timed call (CPU, where that call runs under the profiler;
    its time is left out of the median when ``repeat > 1`` because profiling slows it).
    ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``) defaults to
    ``"cuda"`` when any tensor argument is on CUDA, else ``"cpu"``. On CPU the measurement
    is a PyTorch profiler session, of which a process has one: ``fn`` must not run one.
    """
    for name, value in (("repeat", repeat), ("warmup", warmup)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"measure: {name} must be an int, got {value!r}")
    if repeat < 1 or warmup < 0:
        raise ValueError(f"measure needs repeat >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")
    kind, index = _device(device) if device is not None else (_infer_device(args, kwargs), None)
    for _ in range(warmup):
        fn(*args, **kwargs)
    if kind == "cuda":
        with torch.cuda.device(index) if index is not None else contextlib.nullcontext():
            return _measure_cuda(fn, args, kwargs, repeat)
    return _measure_cpu(fn, args, kwargs, repeat)


def _device(device: str | torch.device) -> tuple[str, int | None]:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICES:
        raise ValueError(f"measure: device must be one of {', '.join(DEVICES)} (or 'cuda:N'), got {device!r}")
    return parsed.type, parsed.index


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
        running = profiler_running()
        if running:
            with _stderr_without(_KINETO_NOTICE):
                prof.stop()
    if not running:  # the process has one profiler session, and something in fn ended it
        raise RuntimeError(
            "memopt.measure: the measured function ended the PyTorch profiler session that measures CPU "
            "memory (it runs a profiler of its own, or another memopt.measure): measure outside it"
        )
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
