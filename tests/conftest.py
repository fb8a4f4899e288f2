"""Shared fixtures and comparison helpers for memopt's tests."""

from __future__ import annotations

import pytest
import torch

# float32 results of a compiled graph differ from eager only by reassociation (fused
# reductions, decomposed norms): ~1e-6 relative per op, a few ulps compounded over a small
# model. 1e-4 relative leaves headroom for that and still catches any real rewrite bug.
TOLERANCES = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.float64: {"rtol": 1e-7, "atol": 1e-9},
}


@pytest.fixture(autouse=True, scope="session")
def im2win_choices_in_a_temporary_cache(tmp_path_factory):
    """`im2win="auto"` caches its measured choices on disk: never in the user's home."""
    import memopt.passes.im2win as im2win

    original = im2win.DEFAULT_CACHE_PATH
    im2win.DEFAULT_CACHE_PATH = str(tmp_path_factory.mktemp("memopt-cache") / "im2win.json")
    yield
    im2win.DEFAULT_CACHE_PATH = original


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: no cached graph from an earlier test."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def assert_close(actual, expected, dtype: torch.dtype = torch.float32, what: str = "") -> None:
    """Compare two tensors (or pytrees of tensors) with the tolerance for ``dtype``."""
    actual_leaves = torch.utils._pytree.tree_leaves(actual)
    expected_leaves = torch.utils._pytree.tree_leaves(expected)
    assert len(actual_leaves) == len(expected_leaves), f"{what}: {len(actual_leaves)} vs {len(expected_leaves)} values"
    for index, (a, e) in enumerate(zip(actual_leaves, expected_leaves)):
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(a, e, **TOLERANCES[dtype], msg=lambda m: f"{what}[{index}]: {m}")
