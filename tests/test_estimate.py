"""memopt.estimate: the liveness timeline of a graph, from node metadata."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import ShapeProp

import memopt


def traced(fn, *inputs):
    return make_fx(fn, tracing_mode="fake")(*inputs)


def test_chain_peak_is_two_live_intermediates():
    n = 1000

    def chain(x):
        a = x * 2  # 4000 B
        b = a + 1  # a and b alive together: 8000 B
        c = b.relu()  # a dead; b and c: 8000 B
        return c.sum()

    timeline = memopt.estimate(traced(chain, torch.randn(n)))
    assert timeline.input_bytes == 4 * n
    assert timeline.peak_bytes == 2 * 4 * n
    # The scalar output stays live to the end; everything else is gone.
    assert timeline.live_bytes[-1] == 4
    assert len(timeline.live_bytes) == len(timeline.node_names)


def test_views_cost_nothing_extra():
    def with_views(x):
        a = x * 2
        v = a.view(10, 100).t()
        return (v + 1).sum()

    timeline = memopt.estimate(traced(with_views, torch.randn(1000)))
    # a (4000 B) and v + 1 (4000 B) at most; the views add nothing.
    assert timeline.peak_bytes == 8000


def test_outputs_stay_live():
    def two_outputs(x):
        a = x + 1
        b = x * 2
        return a, b

    timeline = memopt.estimate(traced(two_outputs, torch.randn(250)))
    assert timeline.peak_bytes == 2000
    assert timeline.live_bytes[-1] == 2000


def test_dtype_sizes_counted():
    def cast(x):
        return (x.to(torch.float16) * 2).sum()

    timeline = memopt.estimate(traced(cast, torch.randn(64)))
    assert timeline.peak_bytes == 2 * 64 * 2  # two fp16 intermediates
    assert timeline.input_bytes == 64 * 4


def test_report_carries_estimates_of_the_dynamo_graph():
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    with torch.no_grad():
        memopt.compile(model, lowering="eager")(torch.randn(16, 32))
    report = memopt.last_report()
    # linear1 output (16x256 fp32) and relu output are both alive at the relu.
    assert report.peak_before == 2 * 16 * 256 * 4
    assert report.peak_after == report.peak_before  # no pass rewrote anything
    assert len(report.timeline_before) == report.nodes_before


def test_transient_bytes_of_an_opaque_op_count_while_it_runs():
    from memopt.estimate import TRANSIENT_BYTES

    def chain(x):
        return (x * 2).relu() + 1

    gm = traced(chain, torch.randn(1000))
    plain = memopt.estimate(gm)
    relu = next(node for node in gm.graph.nodes if "relu" in str(node.target))
    relu.meta[TRANSIENT_BYTES] = 10_000
    with_transient = memopt.estimate(gm)
    index = with_transient.node_names.index(relu.name)
    assert with_transient.running_bytes[index] == plain.running_bytes[index] + 10_000
    assert with_transient.peak_bytes == plain.running_bytes[index] + 10_000 > plain.peak_bytes
    assert with_transient.peak_node == relu.name
    assert with_transient.live_bytes == plain.live_bytes  # nothing outlives the op


def test_graphs_without_metadata_and_other_objects_are_named():
    def chain(x):
        return (x * 2).relu()

    with pytest.warns(UserWarning, match=r"no node of this graph carries meta\['val'\].*FakeTensorProp"):
        assert memopt.estimate(torch.fx.symbolic_trace(chain)).peak_bytes == 0
    gm = torch.fx.symbolic_trace(chain)
    ShapeProp(gm).propagate(torch.randn(100))
    with pytest.warns(UserWarning, match=r"ShapeProp's meta\['tensor_meta'\] does not say .*FakeTensorProp"):
        assert memopt.estimate(gm).peak_bytes == 0
    FakeTensorProp(gm).propagate(torch.randn(100))
    assert memopt.estimate(gm).peak_bytes == 2 * 400  # what the warning suggests works
    with pytest.raises(TypeError, match="takes a torch.fx.GraphModule or torch.fx.Graph, got Linear"):
        memopt.estimate(torch.nn.Linear(2, 2))
