"""memopt.measure: peak memory above the starting level, and wall time."""

from __future__ import annotations

import os

import pytest
import torch

import memopt


def test_sees_a_known_allocation_within_5_percent():
    size = 4_000_000  # 16 MB of float32

    def allocate():
        kept = torch.ones(size)
        scratch = torch.ones(size // 2)  # freed before returning: still part of the peak
        del scratch
        return kept

    result = memopt.measure(allocate)
    expected = size * 4 * 1.5
    assert abs(result.peak_bytes - expected) <= 0.05 * expected, result.peak_bytes
    assert result.device == "cpu"
    assert result.time_s > 0
    assert result.result.numel() == size


def test_memory_allocated_before_the_call_is_not_counted():
    existing = torch.ones(2_000_000)

    def small():
        return existing[:10] + 1

    assert memopt.measure(small).peak_bytes < 1_000
    del existing


def test_sees_allocations_of_inductor_compiled_code():
    compiled = torch.compile(lambda x: torch.sin(x) * 2)
    x = torch.randn(1_000_000)
    compiled(x)  # compile outside the measurement
    result = memopt.measure(compiled, x)
    expected = x.numel() * 4  # one fused kernel, one output buffer
    assert abs(result.peak_bytes - expected) <= 0.05 * expected, result.peak_bytes


def test_repeat_and_warmup():
    calls = []
    result = memopt.measure(lambda: calls.append(1), warmup=2, repeat=3)
    assert len(calls) == 5
    assert len(result.times_s) == 2  # the profiled call's time is left out when repeat > 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="repeat"):
        memopt.measure(lambda: None, repeat=0)
    with pytest.raises(ValueError, match="cpu, cuda"):
        memopt.measure(lambda: None, device="tpu")
    with pytest.raises(TypeError, match="repeat must be an int, got 1.5"):
        memopt.measure(lambda: None, repeat=1.5)
    with pytest.raises(TypeError, match="warmup must be an int, got None"):
        memopt.measure(lambda: None, warmup=None)
    assert memopt.measure(lambda: None, device=torch.device("cpu")).device == "cpu"


def test_a_profiler_inside_the_measured_function_is_an_error():
    """On CPU the measurement is the process's one profiler session: a function that opens
    its own (or another measure) would end it, and the peak read 0 without a word."""
    step = lambda: torch.ones(1 << 20).sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="ended the PyTorch profiler session"):
        memopt.measure(lambda: memopt.measure(step))
    assert memopt.measure(step).peak_bytes >= 4 << 20  # and the next measurement works


def test_cpu_measurements_keep_the_profilers_notices_off_stderr(capfd):
    """Kineto writes a line to stderr (from C++) each time the profiler starts or stops."""
    from memopt.measure import _stderr_without

    memopt.measure(lambda x: x * 2, torch.randn(100), repeat=1)
    assert "USDT:" not in capfd.readouterr().err
    with _stderr_without("NOTICE:"):
        os.write(2, b"NOTICE: held back\nan error a user must see\n")
    assert capfd.readouterr().err == "an error a user must see\n"
