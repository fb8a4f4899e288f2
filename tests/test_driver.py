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


def test_an_opt_in_pass_asked_for_on_the_wrong_kind_of_graph_says_so(monkeypatch):
    """An opt-in pass (one that changes results) the user named, on a graph it does not
    apply to: the report says why nothing happened instead of leaving it out."""
    opt_in = GraphPass("opt-in", "lowering", relu_to_clamp, changes_results=True, applies_to="inference")
    monkeypatch.setattr(memopt.driver, "PASSES", (opt_in,))
    memopt.compile(model(), lowering="eager")(torch.randn(5, 6)).sum().backward()
    (result,) = memopt.last_report().passes
    assert (result.name, result.rewrites, result.changes_results) == ("opt-in", 0, False)
    assert result.notes == ["not run: it applies to inference graphs, and this is a training graph"]
    assert "[changes results]" not in memopt.last_report().summary()


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


@torch.library.custom_op("memopt::driver_test_relu", mutates_args=())
def driver_test_relu(x: torch.Tensor) -> torch.Tensor:
    """A memopt op without a batching rule, like every memopt op."""
    return x.clamp(min=0)


@driver_test_relu.register_fake
def _(x):
    return torch.empty_like(x)


def relus_to(op, name):
    """A pass putting ``op`` in place of every relu, wherever it is."""

    def run(gm, ctx):
        result = PassResult(name)
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in RELUS:
                with gm.graph.inserting_after(node):
                    replacement = gm.graph.call_function(op, (node.args[0],))
                replacement.meta = dict(node.meta)
                node.replace_all_uses_with(replacement)
                gm.graph.erase_node(node)
                result.rewrites += 1
        return result

    return GraphPass(name, "lowering", run)


class VmappedRelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 6)

    def forward(self, x):
        return torch.relu(torch.vmap(lambda row: torch.relu(self.linear(row)) * 2)(x))


def test_memopt_ops_under_a_vmap_are_refused(monkeypatch):
    """memopt's ops have no batching rules: a pass that puts one under a ``torch.vmap``
    Dynamo inlined is skipped like a pass that raised, instead of failing the lowering."""
    torch.manual_seed(0)
    net = VmappedRelu()
    x = torch.randn(5, 6)
    # A memopt op in place of every relu, inside the vmap too: the driver must refuse it.
    refused = relus_to(torch.ops.memopt.driver_test_relu.default, "relu-to-memopt-op")
    monkeypatch.setattr(memopt.driver, "PASSES", (refused,))
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="under a torch.func transform"):
        actual = memopt.compile(net, lowering="eager")(x)
    with torch.no_grad():
        assert_close(actual, net(x))
    (result,) = memopt.last_report().passes
    assert result.error is not None and "vmap" in result.error


@torch.library.custom_op("memopt_test::unlowerable_relu", mutates_args=())
def unlowerable_relu(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=0)


@unlowerable_relu.register_fake
def _(x):
    raise RuntimeError("no shape rule for this op")


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_a_rewritten_graph_that_fails_to_lower_compiles_without_the_rewrites(monkeypatch, lowering):
    torch.manual_seed(0)
    net = model()
    x = torch.randn(5, 6)
    # Relus become an op the lowering cannot trace, which the driver cannot tell.
    unlowerable = relus_to(torch.ops.memopt_test.unlowerable_relu.default, "relu-to-unlowerable")
    monkeypatch.setattr(memopt.driver, "PASSES", (unlowerable,))
    with pytest.warns(RuntimeWarning, match="compiling it without memopt's rewrites"):
        out = memopt.compile(net, lowering=lowering)(x)
    reference = model()
    reference.load_state_dict(net.state_dict())
    assert_close(out, reference(x))
    report = memopt.last_report()
    assert "no shape rule for this op" in report.lowering_error
    assert report.nodes_after == report.nodes_before and report.rewrites == 0
    (result,) = report.passes
    assert "2 rewrite(s) dropped" in result.notes[-1]
    assert "FAILED, compiled without the rewrites" in report.summary()

    torch._dynamo.reset()
    with pytest.raises(Exception, match="no shape rule for this op"):
        memopt.compile(net, lowering=lowering, strict=True)(x)


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
