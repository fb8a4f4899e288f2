"""memopt matches eager, outputs and gradients, on a zoo of models (no pass required)."""

from __future__ import annotations

import copy
import importlib.util
import os
import pathlib
import uuid

import pytest
import torch
from torch.utils._pytree import tree_leaves

import memopt
from conftest import assert_close
import zoo

ZOO = ["mlp", "conv_bn", "transformer_block", "gpt2", "bert", "llama", "t5", "vit", "unet2d"]
# Inductor compiles take tens of seconds each on 2 cores: the whole zoo runs with the
# eager lowering (same passes, same AOTAutograd partitioning), and a representative subset
# also through Inductor.
INDUCTOR_ZOO = ["mlp", "conv_bn", "transformer_block"]
CASES = [(name, "eager") for name in ZOO] + [
    pytest.param(name, "inductor", marks=pytest.mark.slow) for name in INDUCTOR_ZOO
]


def make(name: str):
    torch.manual_seed(0)
    model = getattr(zoo, name)()
    inputs = getattr(zoo, f"{name}_inputs")()
    return model, inputs


def float_leaves(value) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]


def training_step(model, inputs, weights=None):
    """One forward + backward with a random (fixed) weighting of every float output."""
    model.zero_grad(set_to_none=True)
    outputs = float_leaves(model(*inputs))
    if weights is None:
        generator = torch.Generator().manual_seed(7)
        weights = [torch.randn(out.shape, generator=generator) for out in outputs]
    loss = sum((out * weight).sum() for out, weight in zip(outputs, weights))
    loss.backward()
    grads = {
        name.removeprefix("_orig_mod."): p.grad.clone()
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    return outputs, grads, weights


@pytest.mark.parametrize(("name", "lowering"), CASES)
def test_inference_matches_eager(name, lowering):
    model, inputs = make(name)
    model.eval()
    with torch.no_grad():
        expected = model(*inputs)
        compiled = memopt.compile(model, lowering=lowering)
        actual = compiled(*inputs)
    assert_close(float_leaves(actual), float_leaves(expected), what=f"{name} outputs")
    report = memopt.last_report()
    assert report is not None and not report.training


def assert_steps_match(model, reference, actual, expected, what: str) -> None:
    """Outputs, every gradient and every buffer of two :func:`training_step` results agree
    (BatchNorm statistics updated exactly once, as in eager)."""
    (actual_out, actual_grads, _), (expected_out, expected_grads, _) = actual, expected
    assert_close(actual_out, expected_out, what=f"{what} outputs")
    assert actual_grads.keys() == expected_grads.keys()
    for key in expected_grads:
        assert_close(actual_grads[key], expected_grads[key], what=f"{what} grad {key}")
    for (key, buffer), (_, expected_buffer) in zip(model.named_buffers(), reference.named_buffers()):
        assert_close(buffer, expected_buffer, what=f"{what} buffer {key}")


@pytest.mark.parametrize(("name", "lowering"), CASES)
def test_training_matches_eager(name, lowering):
    model, inputs = make(name)
    reference = copy.deepcopy(model)
    model.train()
    reference.train()
    expected = training_step(reference, inputs)
    compiled = memopt.compile(model, lowering=lowering)
    actual = training_step(compiled, inputs, expected[2])
    assert_steps_match(model, reference, actual, expected, name)
    report = memopt.last_report()
    assert report.training
    assert report.saved_activations is not None and report.saved_activations > 0


def test_input_gradients_match_eager():
    model, (x,) = make("transformer_block")
    x_eager = x.clone().requires_grad_()
    x_compiled = x.clone().requires_grad_()
    weight = torch.randn(x.shape)
    (model(x_eager) * weight).sum().backward()
    (memopt.compile(model, lowering="eager")(x_compiled) * weight).sum().backward()
    assert_close(x_compiled.grad, x_eager.grad, what="input grad")


def test_torch_compile_mode_becomes_inductor_patches(monkeypatch):
    """``torch.compile(..., mode=...)`` hands the backend ``mode``: memopt lowers with the
    Inductor settings it stands for (it failed with a TypeError at the first call)."""
    import memopt.lowering

    seen = []
    real = memopt.lowering.compile_fx

    def spy(gm, example_inputs, config_patches):
        seen.append(config_patches)
        return real(gm, example_inputs, config_patches=config_patches)

    monkeypatch.setattr(memopt.lowering, "compile_fx", spy)
    model, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    with torch.no_grad():
        assert_close(torch.compile(model, backend="memopt", mode="reduce-overhead")(x), model(x))
    assert seen and seen[0]["triton.cudagraphs"] is True
    options = memopt.backend.with_mode({"inductor_config": {"max_autotune": False}}, "max-autotune")
    assert options["inductor_config"]["max_autotune"] is False  # the user's own setting wins
    assert options["inductor_config"]["coordinate_descent_tuning"] is True
    with pytest.raises(ValueError, match="should be one of: default"):
        memopt.compile(model, mode="fastest")


def test_cpu_unet_training_step_matches_eager():
    """A diffusers UNet2D's training step in memopt's default (Inductor) lowering gets eager's
    gradients. Stock Inductor on PyTorch 2.13's CPU gives 54 of its 84 parameter gradients as
    exactly 0 (an Inductor scheduler bug, fixed by :func:`memopt._torch_compat.inductor_fixes`);
    two UNet levels are enough to hit it."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        mid_block_type=None,
    ).train()
    compiled_model = copy.deepcopy(model)
    x, t, target = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 4, 8, 8)
    for module in (model, memopt.compile(compiled_model)):
        (module(x, t, return_dict=False)[0] - target).square().mean().backward()
    for (name, expected), actual in zip(model.named_parameters(), compiled_model.parameters()):
        assert_close(actual.grad, expected.grad, what=f"{name}.grad")


def _upsampling_backward_graph():
    """The part of that UNet's backward graph that Inductor got wrong, and its inputs: the
    gradient of nearest 2x upsampling (an accumulating ``index_put`` into zeros) between two
    channels-last convolution backwards, through the backward of ``x / 1.0``. Only the bias
    gradient is returned: Inductor's peak-memory ordering of that graph runs the zero fill
    (fused with the division) before the accumulation. It is the PyTorch-only reproduction of
    the upstream report (docs/upstream/scheduler-renames.md), loaded from there so that the
    report's script stays right."""
    path = pathlib.Path(__file__).parents[1] / "docs" / "upstream" / "scheduler_renames_repro.py"
    spec = importlib.util.spec_from_file_location("scheduler_renames_repro", path)
    repro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(repro)
    args = repro.inputs()
    return repro.graph(args), args


def _compiled_by_inductor(graph, args):
    from torch._inductor.compile_fx import compile_fx_inner

    with torch._inductor.config.patch(force_disable_caches=True):  # the key is the same with and without the fix
        return compile_fx_inner(copy.deepcopy(graph), args)(list(args))


def test_inductor_fixes_keep_a_read_after_an_in_place_accumulation():
    from memopt._torch_compat import inductor_fixes

    graph, args = _upsampling_backward_graph()
    with inductor_fixes():
        actual = _compiled_by_inductor(graph, args)
    assert_close(actual[0], graph(*args)[0], what="bias grad")


def test_inductor_fixes_are_installed_only_while_memopt_compiles():
    from torch._inductor.codegen.cpp import CppTile2DKernel
    from torch._inductor.scheduler import SchedulerNode

    from memopt._torch_compat import inductor_fixes

    def methods():
        return SchedulerNode.__dict__["recompute_size_and_body"], CppTile2DKernel.__dict__["store"]

    stock = methods()
    with pytest.raises(RuntimeError, match="a failed compile"):
        with inductor_fixes():
            fixed = methods()
            with inductor_fixes():  # nested compiles
                assert methods() == fixed
            assert methods() == fixed
            raise RuntimeError("a failed compile")
    assert methods() == stock
    assert (fixed[0] is not stock[0]) == _stock_inductor_has("scheduler renames")
    assert (fixed[1] is not stock[1]) == _stock_inductor_has("tile atomic add")


def _stock_inductor_has(bug: str) -> bool:
    from memopt._torch_compat import inductor_fixes_key

    return bug in inductor_fixes_key()


@pytest.mark.xfail(
    condition=_stock_inductor_has("scheduler renames"),
    strict=True,
    reason="upstream Inductor (PyTorch 2.13, CPU): recompute_size_and_body drops mutation renames, so the "
    "upsampling gradient is read before it is accumulated; a pass means it was fixed upstream: drop "
    "the 'scheduler renames' fix of memopt._torch_compat.inductor_fixes",
)
def test_stock_inductor_on_the_upsampling_backward_graph():
    graph, args = _upsampling_backward_graph()
    actual = _compiled_by_inductor(graph, args)
    assert_close(actual[0], graph(*args)[0], what="bias grad")


# One training step of conv2d(x[..., idx]) on two threads, compiled by the backend given as the
# first argument, in a process of its own: with Inductor's 'tile atomic add' bug it aborts.
_GATHER_THEN_CONV = """
import sys, torch, torch.nn.functional as F
import memopt
torch.set_num_threads(2)
torch.manual_seed(0)
idx = torch.tensor([0, 0, 1, 3, 3, 2, 5, 7, 7, 6, 4, 4, 1, 2, 5, 6])
w = torch.randn(16, 16, 3, 3)
def step(x, w, idx):
    return F.conv2d(x[:, :, :, idx], w, padding=1)
x = torch.randn(2, 16, 16, 8, requires_grad=True)
grad = torch.randn(2, 16, 16, 16)
step(x, w, idx).backward(grad)
expected, x.grad = x.grad, None
compiled = memopt.compile(step) if sys.argv[1] == "memopt" else torch.compile(step, backend="inductor")
compiled(x, w, idx).backward(grad)
print("relative error", ((x.grad - expected).abs().max() / expected.abs().max()).item())
"""


def _gather_then_conv_step(backend: str) -> None:
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", _GATHER_THEN_CONV, backend], capture_output=True, text=True, env=env, timeout=600
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 0, f"the step died (exit {done.returncode}): {lines[-3:]}"
    error = float(next(line for line in lines if line.startswith("relative error")).split()[-1])
    assert error < 1e-5, f"x.grad off by {error:.3g} (relative)"


def test_gather_then_conv_training_step_under_memopt():
    """The backward of indexing a spatial dimension with a tensor before a convolution: stock
    Inductor's C++ kernel for it (two threads) adds at wrong places, past its buffer, and the
    process aborts; memopt's 'tile atomic add' fix adds the tile offset once."""
    _gather_then_conv_step("memopt")


@pytest.mark.xfail(
    condition=_stock_inductor_has("tile atomic add"),
    strict=True,
    reason="upstream Inductor (PyTorch 2.13, CPU; pytorch/pytorch#191837): a 2-D tile kernel's threaded atomic "
    "add offsets its index twice (CppTile2DKernel.store, then CppTile2DOverrides.index_expr); a pass means it "
    "was fixed upstream: "
    "drop the 'tile atomic add' fix of memopt._torch_compat.inductor_fixes",
)
def test_stock_inductor_on_the_gather_then_conv_training_step():
    _gather_then_conv_step("inductor")


def test_nested_report_collections_each_get_their_own_graphs():
    """Each ``collect_reports`` block gets the graphs compiled while it is open, nested or
    left by an exception (the inner block's list was once removed by equality: the outer's)."""
    first = memopt.compile(torch.nn.Linear(4, 4), lowering="eager")
    second = memopt.compile(torch.nn.Linear(4, 3), lowering="eager")
    x = torch.randn(2, 4)
    with memopt.collect_reports() as outer:
        with pytest.raises(RuntimeError, match="user code"):
            with memopt.collect_reports() as inner:
                raise RuntimeError("user code")
        first(x)
        with memopt.collect_reports() as inner_again:
            second(x)
    assert inner == [] and len(inner_again) == 1
    assert [report.graph_index for report in outer] == [outer[0].graph_index, inner_again[0].graph_index]


def _conv_bn_net() -> torch.nn.Module:
    conv = lambda cin: torch.nn.Conv2d(cin, 8, 3, padding=1)  # noqa: E731
    return torch.nn.Sequential(
        conv(3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), conv(8), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 4),
    )


def test_backward_twice_with_retain_graph_after_a_cached_compile():
    """An ordinary step caches a backward that overwrites saved tensors it reads last
    (AOTAutograd's donated buffers). The same graph's backward, compiled again under
    ``retain_graph=True``, must not get that code from Inductor's cache: the second backward
    would read overwritten activations (silently wrong gradients before memopt keyed the cache
    on donated buffers)."""
    torch.manual_seed(0)
    model = _conv_bn_net()
    x, weight = torch.randn(2, 3, 8, 8), torch.randn(2, 4)
    (memopt.compile(copy.deepcopy(model))(x) * weight).sum().backward()  # fills the cache
    torch._dynamo.reset()
    hits = torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]
    reference, compiled = copy.deepcopy(model), copy.deepcopy(model)
    losses = [(reference(x) * weight).sum(), (memopt.compile(compiled)(x) * weight).sum()]
    assert torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"] > hits, "the forward came from the cache"
    for retain in (True, False):
        for loss in losses:
            loss.backward(retain_graph=retain)
        for (name, expected), actual in zip(reference.named_parameters(), compiled.parameters()):
            assert_close(actual.grad, expected.grad, what=f"{name}.grad after backward(retain_graph={retain})")


class _RecordingPass(torch._inductor.custom_graph_pass.CustomInferenceAwareGraphPass):
    def __init__(self) -> None:
        self.calls: list[bool] = []
        self.key = f"test recording pass {uuid.uuid4()}"  # a cache hit would skip the pass

    def __call__(self, graph: torch.fx.Graph, is_inference: bool) -> None:
        self.calls.append(is_inference)

    def uuid(self) -> str:
        return self.key


def test_users_own_post_grad_pass_still_runs():
    """memopt's cache-key pass shares ``post_grad_custom_pre_pass`` with the user's, which
    is still called as Inductor would call it."""
    user_pass = _RecordingPass()
    model = _conv_bn_net()
    x = torch.randn(2, 3, 8, 8)
    compiled = memopt.compile(copy.deepcopy(model), inductor_config={"post_grad_custom_pre_pass": user_pass})
    compiled(x).sum().backward()
    assert user_pass.calls == [False, False]  # the forward graph and the backward graph
    with torch.no_grad():
        assert_close(compiled(x), model(x))
    assert user_pass.calls == [False, False, True]  # the inference graph


class CountingBackend:
    """Counts the graphs Dynamo hands to a backend."""

    def __init__(self, backend):
        self.backend = backend
        self.graphs = 0

    def __call__(self, gm, example_inputs, **kwargs):
        self.graphs += 1
        return self.backend(gm, example_inputs, **kwargs)


def test_no_graph_breaks_beyond_dynamos_own():
    """memopt sees exactly the graphs any backend sees: it adds no break of its own."""
    model, inputs = make("graph_break_net")
    with torch.no_grad():
        expected = model(*inputs)
        reference = CountingBackend(lambda gm, example_inputs: gm.forward)
        torch.compile(model, backend=reference)(*inputs)
        torch._dynamo.reset()
        with memopt.collect_reports() as reports:
            actual = memopt.compile(model, lowering="eager")(*inputs)
    assert reference.graphs >= 2, "the model breaks its graph on purpose"
    assert len(reports) == reference.graphs
    assert_close(actual, expected)


def test_fullgraph_model_is_one_graph():
    model, inputs = make("transformer_block")
    with torch.no_grad(), memopt.collect_reports() as reports:
        memopt.compile(model, fullgraph=True, lowering="eager")(*inputs)
    assert len(reports) == 1
    assert reports[0].op_counts.get("scaled_dot_product_attention") == 1


def test_memory_budget_saves_fewer_activations():
    """memory_budget is a real lever: a smaller budget makes the forward save fewer bytes."""
    model, inputs = make("transformer_block")
    model.train()
    saved = {}
    grads = {}
    for budget in (None, 0.05):
        torch._dynamo.reset()
        compiled = memopt.compile(copy.deepcopy(model), lowering="eager", memory_budget=budget)
        _, grads[budget], _ = training_step(compiled, inputs)
        saved[budget] = memopt.last_report().saved_activation_bytes
    assert saved[0.05] < saved[None], saved
    for key in grads[None]:
        assert_close(grads[0.05][key], grads[None][key], what=f"grad {key} under memory_budget")


def test_torch_compile_by_name_reads_options():
    model, inputs = make("mlp")
    with torch.no_grad():
        compiled = torch.compile(model, backend="memopt", options={"lowering": "eager"})
        assert_close(compiled(*inputs), model(*inputs))
    assert memopt.last_report() is not None


@pytest.mark.parametrize("budget", [0.05, 0.5])
def test_memory_budget_with_batchnorm_matches_eager(budget):
    """Recomputation under a small budget must not read BatchNorm statistics the forward
    already updated in place (a bug of undecomposed batch_norm under the eager lowering)."""
    model, inputs = make("conv_bn")
    reference = copy.deepcopy(model)
    expected_out, expected_grads, weights = training_step(reference, inputs)
    compiled = memopt.compile(model, lowering="eager", memory_budget=budget)
    actual_out, actual_grads, _ = training_step(compiled, inputs, weights)
    assert_close(actual_out, expected_out)
    for key in expected_grads:
        assert_close(actual_grads[key], expected_grads[key], what=f"grad {key}")
    for (key, buffer), (_, expected_buffer) in zip(model.named_buffers(), reference.named_buffers()):
        assert_close(buffer, expected_buffer, what=f"buffer {key}")


@pytest.mark.parametrize(
    ("budget", "reversible", "lowering"),
    [
        (None, False, "eager"),
        (0.1, False, "eager"),
        (None, "auto", "eager"),
        (0.1, "auto", "eager"),
        pytest.param(0.1, "auto", "inductor", marks=pytest.mark.slow),
    ],
)
def test_memory_budget_with_reversible_batchnorm_matches_eager(budget, reversible, lowering):
    """RevNet couplings with BatchNorm under a small budget: the partitioner must keep each
    reversible chain in the forward. Recomputed in the backward, it read running statistics
    the forward had updated in place, and the eager lowering failed with "modified by an
    inplace operation"."""
    model, inputs = make("revnet")
    reference = copy.deepcopy(model)
    compiled = memopt.compile(model, lowering=lowering, reversible=reversible, memory_budget=budget)
    for step in range(2):  # the second step starts from statistics the first one updated
        expected = training_step(reference, inputs)
        actual = training_step(compiled, inputs, expected[2])
        assert_steps_match(model, reference, actual, expected, f"step {step}")
    if reversible:
        report = memopt.last_report()
        (result,) = [result for result in report.passes if result.name == "reversible"]
        assert result.rewrites == 1
        # The forward saves the chain's two final streams (batch 3, 5 channels, 11x9 each):
        # the chain ran once, in the forward, and is not recomputed in the backward.
        streams_bytes = 2 * 3 * 5 * 11 * 9 * torch.float32.itemsize
        assert {row["chain_saved_bytes"] for row in result.details} == {streams_bytes}


def test_dynamic_shapes_recompile_exactly():
    """A second batch size makes Dynamo recompile with symbolic sizes; estimates use hints."""
    model, _ = make("transformer_block")
    compiled = memopt.compile(model, lowering="eager")
    with torch.no_grad(), memopt.collect_reports() as reports:
        for batch, tokens in ((2, 11), (3, 7), (5, 9)):
            x = torch.randn(batch, tokens, 48)
            assert_close(compiled(x), model(x), what=f"batch {batch} tokens {tokens}")
    assert len(reports) == 2  # the static graph, then one dynamic graph for both later calls
    assert all(report.peak_before > 0 for report in reports)
