"""The pass driver: fixed order, counts, all-or-nothing passes, warnings and strict mode."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import memopt
import memopt.driver
from conftest import assert_close
from memopt import PassResult
from memopt.passes import GraphPass, PassContext

RELUS = (torch.relu, F.relu)


def relu_to_clamp(gm, ctx):
    """A toy exact pass: relu(x) -> clamp(x, min=0), counted."""
    result = PassResult("relu-to-clamp")
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in RELUS:
            result.matched += 1
            with gm.graph.inserting_after(node):
                clamp = gm.graph.call_function(torch.clamp, (node.args[0],), {"min": 0.0})
            clamp.meta = dict(node.meta)
            node.replace_all_uses_with(clamp)
            gm.graph.erase_node(node)
            result.rewrites += 1
    return result


def breaks_halfway(gm, ctx):
    """Mutates the graph, then raises: the driver must discard the half-done rewrite."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in RELUS:
            node.target = torch.sigmoid  # would silently change results if kept
    raise RuntimeError("cannot handle this graph")


# Test passes are switched by `lowering`, a field that is always truthy.
CLAMP = GraphPass("relu-to-clamp", "lowering", relu_to_clamp)
BROKEN = GraphPass("broken", "lowering", breaks_halfway)
INFERENCE_ONLY = GraphPass("inference-only", "lowering", relu_to_clamp, applies_to="inference")
DISABLED = GraphPass("disabled", "memory_budget", relu_to_clamp)  # memory_budget defaults to None


def model():
    return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 6), torch.nn.ReLU())



def test_pass_rewrites_are_counted_and_exact(monkeypatch):
    torch.manual_seed(0)
    net = model()
    x = torch.randn(5, 6)
    monkeypatch.setattr(memopt.driver, "PASSES", (CLAMP,))
    with torch.no_grad():
        actual = memopt.compile(net, lowering="eager")(x)
        expected = net(x)
    assert_close(actual, expected)
    (result,) = memopt.last_report().passes
    assert (result.name, result.matched, result.rewrites, result.error) == ("relu-to-clamp", 2, 2, None)


def test_failing_pass_is_skipped_with_a_warning_and_leaves_graph_unchanged(monkeypatch):
    torch.manual_seed(0)
    net = model()
    x = torch.randn(5, 6)
    monkeypatch.setattr(memopt.driver, "PASSES", (BROKEN, CLAMP))
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="'broken' failed and was skipped"):
        actual = memopt.compile(net, lowering="eager")(x)
    with torch.no_grad():
        assert_close(actual, net(x))  # the half-done sigmoid rewrite was discarded
    broken, clamp = memopt.last_report().passes
    assert broken.error == "RuntimeError: cannot handle this graph"
    assert broken.rewrites == 0
    assert clamp.rewrites == 2  # later passes still run


def test_strict_reraises(monkeypatch):
    monkeypatch.setattr(memopt.driver, "PASSES", (BROKEN,))
    compiled = memopt.compile(model(), lowering="eager", strict=True)
    with torch.no_grad(), pytest.raises(Exception, match="cannot handle this graph"):
        compiled(torch.randn(5, 6))


def test_disabled_and_inapplicable_passes_do_not_run(monkeypatch):
    monkeypatch.setattr(memopt.driver, "PASSES", (DISABLED, INFERENCE_ONLY))
    net = model()
    x = torch.randn(5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        memopt.compile(net, lowering="eager")(x).sum().backward()  # a training graph
    assert memopt.last_report().training
    assert memopt.last_report().passes == []
    torch._dynamo.reset()
    with torch.no_grad():
        memopt.compile(net, lowering="eager")(x)
    assert [r.name for r in memopt.last_report().passes] == ["inference-only"]


def test_pass_runs_on_training_graphs_and_gradients_stay_exact(monkeypatch):
    torch.manual_seed(0)
    net = model()
    x = torch.randn(5, 6)
    net(x).sum().backward()
    expected = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    monkeypatch.setattr(memopt.driver, "PASSES", (CLAMP,))
    memopt.compile(net, lowering="eager")(x).sum().backward()
    assert memopt.last_report().passes[0].rewrites == 2
    for grad, reference in zip((p.grad for p in net.parameters()), expected):
        assert_close(grad, reference)


def test_run_passes_keeps_metadata_and_original_graph():
    """run_passes works on copies: the input module is never modified."""
    captured = {}

    def capture(gm, example_inputs):
        captured["gm"] = gm
        captured["inputs"] = example_inputs
        return gm.forward

    torch.compile(model(), backend=capture)(torch.randn(5, 6))
    gm = captured["gm"]
    original_code = gm.code
    ctx = PassContext(memopt.Config(), captured["inputs"], False, torch.device("cpu"))
    rewritten, results = memopt.driver.run_passes(gm, ctx, passes=(CLAMP,))
    assert gm.code == original_code
    assert rewritten is not gm and results[0].rewrites == 2
    for node in rewritten.graph.nodes:
        if node.op not in ("output",):
            assert "example_value" in node.meta or "val" in node.meta, node
