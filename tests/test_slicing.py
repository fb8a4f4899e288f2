"""The slicing pass (Feature Slicer + Operator Grouping): exactness against eager, rewrite
counts, exact GroupNorm across slices, graphs left alone, and measured peak memory.

float32 tolerance: slicing changes no arithmetic except the two-pass GroupNorm (statistics
by ``var_mean`` instead of the fused kernel) and the GEMM blocking of smaller batches, both
reassociations of float32 sums: relative error ~1e-6, so 1e-5 (relative to the output's
largest magnitude) has a 10x margin and still catches a wrong slice or a missed offset.
"""

from __future__ import annotations

import contextlib
import json
import operator
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memopt
import zoo
from memopt.config import SlicingOptions
from memopt.ops.slicing import SlicedGroup, SliceSpec, TensorLayout, register_group, registered_groups
from memopt.passes import slicing as slicing_pass

RTOL = 1e-5
SMALL_GROUPS = {"min_group_bytes": 1024, "max_slice_bytes": 16 * 1024}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    scale = expected.abs().max().clamp_min(1e-12)
    error = ((actual - expected).abs().max() / scale).item()
    assert error <= rtol, f"relative error {error:.3g} > {rtol}"


def compile_and_run(model, *args, lowering="eager", slicing=SMALL_GROUPS, im2win=False, **kwargs):
    # im2win off by default: under "auto" its timed choice (a CPU under load can flip it)
    # would fuse a convolution with its activation and change the groups the tests count.
    torch._dynamo.reset()
    compiled = memopt.compile(model, lowering=lowering, slicing=slicing, im2win=im2win, strict=True)
    with torch.no_grad():
        out = compiled(*args, **kwargs)
    report = memopt.last_report()
    result = next((r for r in report.passes if r.name == "slicing"), None)
    return compiled, out, result


ConvNet = zoo.GroupNormConvNet


class TemporalConv(nn.Module):
    """UNet3D-style temporal layer on [B*F, C, H, W]: to [B, C, F, H, W], GroupNorm over
    (channels, frames, height, width), a (3, 1, 1) conv3d, back. Only height or width can be
    sliced (batch is 1, the conv mixes frames), so the GroupNorm statistics span slices."""

    def __init__(self, channels: int = 16, frames: int = 5) -> None:
        super().__init__()
        self.frames = frames
        self.norm = nn.GroupNorm(4, channels)
        self.conv = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        self.proj = nn.Conv3d(channels, channels, 1)

    def forward(self, x):
        bf, c, h, w = x.shape
        v = x[None, :].reshape(-1, self.frames, c, h, w).permute(0, 2, 1, 3, 4)
        y = self.proj(F.silu(self.conv(F.silu(self.norm(v)))))
        y = y.permute(0, 2, 1, 3, 4).reshape(bf, c, h, w)
        return x + y


class TemporalAttention(nn.Module):
    """AnimateDiff-style motion module: [B*F, C, H, W] -> [B*H*W, F, C] attention -> back."""

    def __init__(self, channels: int = 16, frames: int = 5, heads: int = 2) -> None:
        super().__init__()
        self.frames, self.heads = frames, heads
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.ff = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))

    def forward(self, x):
        bf, c, h, w = x.shape
        b = bf // self.frames
        t = x.reshape(b, self.frames, c, h, w).permute(0, 3, 4, 1, 2).reshape(b * h * w, self.frames, c)
        q, k, v = self.qkv(self.norm(t)).chunk(3, dim=-1)
        q, k, v = (z.view(b * h * w, self.frames, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * h * w, self.frames, c)
        t = t + a
        t = t + self.ff(t)
        return t.reshape(b, h, w, self.frames, c).permute(0, 3, 4, 1, 2).reshape(bf, c, h, w)


# ---------------------------------------------------------------------------------------
# Options


def test_config_validates_slicing_options():
    assert memopt.Config().slicing == "auto"
    assert memopt.Config(slicing=False).slicing is False
    options = memopt.Config(slicing={"max_slice_bytes": 4096, "min_group_bytes": 0}).slicing
    assert options.max_slice_bytes == 4096 and options.min_group_bytes == 0 and options.max_slices == 64
    assert memopt.Config(slicing=True).slicing == SlicingOptions()
    assert memopt.Config(slicing={"max_peak_bytes": 1 << 30}).slicing.max_peak_bytes == 1 << 30
    assert memopt.Config(slicing={"max_peak_bytes": "auto"}).slicing.max_peak_bytes == "auto"
    for value in (-1, "half", 8e9):
        with pytest.raises(ValueError, match=r'max_peak_bytes.*int >= 0, "auto" or None'):
            memopt.Config(slicing={"max_peak_bytes": value})
    with pytest.raises(ValueError, match="valid keys are: max_slice_bytes, min_group_bytes, max_slices, compile_body, max_peak_bytes"):
        memopt.Config(slicing={"max_slices_bytes": 1})
    with pytest.raises(ValueError, match="'auto', True, False or a dict"):
        memopt.Config(slicing="yes")
    with pytest.raises(ValueError, match="max_slices"):
        memopt.Config(slicing={"max_slices": 1})


# ---------------------------------------------------------------------------------------
# Exactness and rewrite counts


def test_conv_net_is_one_group_and_exact():
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(6, 3, 29, 31)
    _, out, result = compile_and_run(model, x)
    assert result.rewrites == 1
    (row,) = result.details
    assert row["dim"] == 0 and row["units"] == 6 and row["slices"] >= 2
    assert row["ops"] == 9  # conv_in .. conv_out, all per sample
    with torch.no_grad():
        assert_close_rel(out, model(x))


class UnbatchedConv(nn.Module):
    """A convolution on an unbatched input (``[C, *spatial]``): dim 0 is the channels, which
    the convolution sums over, and the kernel's first spatial extent belongs to dim 1."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return F.silu(self.conv(F.silu(x * 1.5))) * 2.0


@pytest.mark.parametrize("conv, shape, sliced", [
    # (1, 3) kernel: pointwise along dim 1 (height), mixes dim 2 (width).
    (nn.Conv2d(6, 6, (1, 3), padding=(0, 1)), (6, 9, 31), 1),
    (nn.Conv3d(6, 6, (1, 3, 3), padding=(0, 1, 1)), (6, 3, 9, 31), 1),
    (nn.Conv1d(6, 6, 3, padding=1), (6, 40), None),  # nothing but the channels to slice
])
def test_unbatched_convolutions_slice_only_where_the_kernel_is_pointwise(conv, shape, sliced):
    torch.manual_seed(24)
    model, x = UnbatchedConv(conv).eval(), torch.randn(*shape)
    for lowering in ("eager", "inductor"):
        forced = {"min_group_bytes": 0, "max_slice_bytes": 256}
        _, out, result = compile_and_run(model, x, lowering=lowering, slicing=forced)
        with torch.no_grad():
            assert_close_rel(out, model(x))
        with_conv = [row["dim"] for row in result.details if row["ops"] == 5]  # the whole model
        assert with_conv == ([] if sliced is None else [sliced])


def test_groups_run_through_im2win_convolutions():
    """The im2win pass runs first; its convolutions slice by sample like aten's."""
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(6, 3, 29, 31)
    _, out, result = compile_and_run(model, x, im2win=True)
    (im2win,) = [r for r in memopt.last_report().passes if r.name == "im2win"]
    assert im2win.rewrites >= 1
    assert result.rewrites == 1
    (row,) = result.details
    assert row["dim"] == 0 and row["slices"] >= 2
    with torch.no_grad():
        assert_close_rel(out, model(x))


def test_group_norm_across_slices_is_exact():
    torch.manual_seed(1)
    model = TemporalConv().eval()
    x = torch.randn(5, 16, 11, 13) * 3 + 1  # an offset mean catches a missing statistic
    _, out, result = compile_and_run(model, x)
    assert result.rewrites >= 1
    assert sum(row["gn_two_pass"] for row in result.details) == 1
    (row,) = result.details
    assert row["dim"] >= 2 and row["ops"] == 8  # norm .. conv3d .. residual add, sliced by height
    with torch.no_grad():
        assert_close_rel(out, model(x))


def test_temporal_attention_slices_per_spatial_position():
    torch.manual_seed(2)
    model = TemporalAttention().eval()
    x = torch.randn(5, 16, 7, 9)
    _, out, result = compile_and_run(model, x)
    assert result.rewrites >= 1
    biggest = max(result.details, key=lambda row: row["ops"])
    assert biggest["ops"] >= 15  # norm, qkv, attention, feed-forward: one group
    with torch.no_grad():
        assert_close_rel(out, model(x))


def test_attention_rows_sliced_when_keys_are_whole():
    torch.manual_seed(3)

    class CrossAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(24, 24)
            self.out = nn.Linear(24, 24)

        def forward(self, x, context):
            q = self.q(x).view(1, -1, 2, 12).transpose(1, 2)
            k = context.view(1, -1, 2, 12).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, k).transpose(1, 2).reshape(1, -1, 24)
            return self.out(F.gelu(a)) + x

    model = CrossAttention().eval()
    x, context = torch.randn(1, 301, 24), torch.randn(1, 7, 24)
    _, out, result = compile_and_run(model, x, context)
    assert result.rewrites == 1
    assert result.details[0]["dim"] == 1  # the query rows (batch is 1)
    with torch.no_grad():
        assert_close_rel(out, model(x, context))


class TwoViewsOfOneValue(nn.Module):
    """A per-frame stage whose output is read through two views by ops without a slicing
    rule (SVD's spatial resnet output is permuted to ``[B, C, F, H, W]`` twice: for the
    temporal resnet and for the AlphaBlender)."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.stage = nn.Sequential(nn.Conv2d(3, channels, 1), nn.SiLU(), nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        y = self.stage(x)
        a = y[None].permute(0, 2, 1, 3, 4)
        b = y[None].permute(0, 2, 1, 3, 4)
        return torch.cumsum(a, 2) - torch.cumsum(b.flip(2), 2)


def test_views_of_a_group_value_leave_it_once():
    """Both views used to leave the group as separate full-size copies (two outputs, an
    estimated peak above the unsliced graph's); the views now run outside on one output."""
    torch.manual_seed(15)
    model = TwoViewsOfOneValue().eval()
    x = torch.randn(6, 3, 20, 24)
    _, out, result = compile_and_run(model, x)
    with torch.no_grad():
        expected = model(x)
    assert result.rewrites >= 1
    assert all(row["outputs"] == 1 for row in result.details), result.details
    assert result.details[0]["estimated_peak_after"] <= result.details[0]["estimated_peak_before"]
    assert_close_rel(out, expected)


class BlendedResBlock(nn.Module):
    """SVD's spatio-temporal resnet in small: a per-frame resnet whose output
    ``(x + h) / output_scale_factor`` is read through two views, by a temporal GroupNorm +
    ``(3, 1, 1)`` conv3d (sliced by height) and by an AlphaBlender, then a per-frame conv
    with the input as a skip connection."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, channels, 3, padding=1)
        self.norm1, self.conv1 = nn.GroupNorm(4, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(4, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.temporal_norm = nn.GroupNorm(4, channels)
        self.temporal_conv = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        self.mix_factor = nn.Parameter(torch.tensor(0.3))
        self.norm_out, self.conv_out = nn.GroupNorm(4, channels), nn.Conv2d(channels, 4, 3, padding=1)
        self.output_scale_factor = 1.0

    def forward(self, x):
        skip = self.conv_in(x)
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(skip))))))
        spatial = (skip + h) / self.output_scale_factor
        f, c, height, width = spatial.shape
        for_temporal = spatial[None, :].reshape(1, f, c, height, width).permute(0, 2, 1, 3, 4)
        for_blend = spatial[None, :].reshape(1, f, c, height, width).permute(0, 2, 1, 3, 4)
        temporal = self.temporal_conv(F.silu(self.temporal_norm(for_temporal)))
        alpha = torch.sigmoid(self.mix_factor)
        mixed = (alpha * for_blend + (1.0 - alpha) * temporal).permute(0, 2, 1, 3, 4).reshape(f, c, height, width)
        return self.conv_out(F.silu(self.norm_out(mixed + skip)))


BLENDED_OPTIONS = {"min_group_bytes": 1024, "max_slice_bytes": 64 * 1024}


def test_a_value_read_through_two_views_is_computed_in_its_group(monkeypatch):
    """The resnet group used to end before ``/ output_scale_factor``: its tail was trimmed
    while the two views still counted as two outputs, and among equally small cuts the
    longest tail was kept. The division then ran whole between the groups, where Inductor
    computes it into one full-size copy per group that reads a view of it."""
    import memopt.lowering

    graphs = []
    lower = memopt.lowering.lower
    monkeypatch.setattr(memopt.lowering, "lower", lambda gm, *args, **kwargs: graphs.append(gm) or lower(gm, *args, **kwargs))
    torch.manual_seed(17)
    model = BlendedResBlock().eval()
    x = torch.randn(6, 4, 20, 24)
    _, out, result = compile_and_run(model, x, slicing=BLENDED_OPTIONS)
    (gm,) = graphs
    outside = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.truediv]
    assert result.rewrites >= 2 and not outside, (outside, result.details)
    with torch.no_grad():
        assert_close_rel(out, model(x))


@pytest.mark.slow
def test_inductor_lowering_keeps_the_eager_lowered_peak():
    """The saving measured under the eager lowering survives Inductor: no value between
    groups is materialized once per reading group, no input copied into its traced layout
    (on SVD such copies put the Inductor-lowered peak 1.2 MiB above the eager-lowered one,
    on AnimateDiff 1.05 MiB)."""
    torch.manual_seed(18)
    model = BlendedResBlock().eval()
    x = torch.randn(6, 4, 48, 48)
    with torch.no_grad():
        expected = model(x)
        peaks = {}
        for lowering in ("eager", "inductor"):
            compiled, out, result = compile_and_run(model, x, lowering=lowering, slicing=BLENDED_OPTIONS)
            assert result.rewrites >= 2
            assert_close_rel(out, expected)
            peaks[lowering] = memopt.measure(compiled, x).peak_bytes
    assert peaks["inductor"] <= 1.05 * peaks["eager"], peaks


def test_bodies_accept_inputs_in_another_layout(monkeypatch):
    """Under the Inductor lowering the op's inputs come in the layout Inductor chose
    (``flexible_layout``: no copy into the traced one), e.g. a convolution output laid out
    channels-last where the graph traced it contiguous. A body's ``view`` runs as
    ``reshape``: on a channels-last slice ``view`` raises."""
    assert torch.Tag.flexible_layout in torch.ops.memopt.slicing.default.tags

    class RowMlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(8, 1, 1))
            self.linear = nn.Linear(6, 6)

        def forward(self, x):
            f, c, h, w = x.shape
            rows = F.silu(x * self.scale).view(f, c * h, w)  # merges channels and height
            return self.linear(F.gelu(rows)).view(f, c, h, w) + x

    calls = []
    run = SlicedGroup.run
    monkeypatch.setattr(SlicedGroup, "run", lambda group, inputs: calls.append((group, inputs)) or run(group, inputs))
    torch.manual_seed(19)
    model = RowMlp().eval()
    x = torch.randn(16, 8, 5, 6)  # frames the longest dim: one group, sliced by frame
    _, out, result = compile_and_run(model, x, slicing={"min_group_bytes": 0, "max_slice_bytes": 1024})
    assert result.rewrites == 1 and result.details[0]["dim"] == 0
    ((group, inputs),) = calls
    relaid = [value.contiguous(memory_format=torch.channels_last) if value.shape == x.shape else value for value in inputs]
    assert any(value is not original for value, original in zip(relaid, inputs))
    with torch.no_grad():
        for expected, relaid_out in zip(run(group, inputs), run(group, relaid)):
            assert_close_rel(relaid_out, expected)
        assert_close_rel(out, model(x))


class TemporalBackToRows(nn.Module):
    """SVD's temporal transformer in small: attention over frames per position on
    ``[H*W, F, C]``, then back to ``[F, H*W, C]``, ``proj_out``, reshaped to rows
    ``[F, H, W, C]``, permuted to ``[F, C, H, W]`` and added to the residual."""

    def __init__(self, channels: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm, self.qkv = nn.LayerNorm(channels), nn.Linear(channels, 3 * channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, frame_tokens, x):
        f, c, h, w = x.shape  # frame_tokens: [F, H*W, C], a spatial block's output
        tokens = frame_tokens[None].reshape(1, f, h * w, c).permute(0, 2, 1, 3).reshape(h * w, f, c)
        q, k, v = (z.view(h * w, f, self.heads, -1).transpose(1, 2) for z in self.qkv(self.norm(tokens)).chunk(3, dim=-1))
        tokens = tokens + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(h * w, f, c)
        frames = tokens.reshape(1, h * w, f, c).permute(0, 2, 1, 3).reshape(f, h * w, c)
        out = self.proj_out(frames).reshape(f, h, w, c).permute(0, 3, 1, 2).contiguous()
        return out + x


def test_positions_sliced_by_whole_rows_to_take_the_reshape_back():
    """Sliced by single positions, the group stopped at the reshape of ``H*W`` back into
    rows and wrote the attention's output whole for ``proj_out`` and the residual add.
    Slices of whole rows (``W`` positions each) keep them in the group."""
    torch.manual_seed(20)
    model = TemporalBackToRows().eval()
    tokens, x = torch.randn(5, 63, 16), torch.randn(5, 16, 9, 7)
    _, out, result = compile_and_run(model, tokens, x)
    biggest = max(result.details, key=lambda row: row["ops"])
    assert biggest["units"] == 9 and biggest["outputs"] == 1, result.details  # rows, not 63 positions
    assert biggest["last"].startswith("add"), result.details  # through proj_out and the residual add
    with torch.no_grad():
        assert_close_rel(out, model(tokens, x))


def test_transformers_swin_with_dead_values_slices_exactly():
    """Dynamo keeps ops whose results nothing reads (Swin computes ``reshaped_hidden_states``
    and drops it): a group of only such ops has no output to write and is not a group; it
    used to fail the pass with an IndexError."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(21)
    config = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4
    )
    model = transformers.SwinModel(config).eval()
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    options = {"min_group_bytes": 0, "max_slice_bytes": 1024}
    with torch.no_grad():
        out = memopt.compile(model, lowering="eager", strict=True, slicing=options, im2win=False)(x)
        expected = model(x).last_hidden_state
    (result,) = [r for r in memopt.last_report().passes if r.name == "slicing"]
    assert result.rewrites > 0 and result.error is None
    assert all(row["outputs"] >= 1 for row in result.details)
    assert_close_rel(out.last_hidden_state, expected)


class VmappedRows(nn.Module):
    """A conv net with a ``torch.vmap`` in the middle (transformers' Mamba vmaps its scan):
    Dynamo inlines the vmap, whose ops see batched tensors the slicing op cannot take."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.vmap(lambda image: torch.tanh(image * 2).cumsum(-1) + 1)(h)
        return self.out(torch.relu(h))


def test_ops_under_a_vmap_join_no_group():
    torch.manual_seed(22)
    model = VmappedRows().eval()
    x = torch.randn(4, 4, 24, 24)
    _, out, result = compile_and_run(model, x, slicing={"min_group_bytes": 0, "max_slice_bytes": 1024})
    assert result.rewrites > 0 and result.error is None
    assert any("under a torch.func transform" in note for note in result.notes), result.notes
    with torch.no_grad():
        assert_close_rel(out, model(x))


class ReadBeforeInPlace(nn.Module):
    """An in-place ReLU on a value also read before it: sliced with the value's producer,
    the write would reach the whole value the earlier reader gets."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        h = self.up(x)
        before = h.sum(-1)
        return self.down(F.relu(h, inplace=True)), before


def test_in_place_activations_slice_only_where_nothing_else_reads_the_value():
    torch.manual_seed(23)
    forced = {"min_group_bytes": 0, "max_slice_bytes": 1024}
    model, x = ReadBeforeInPlace().eval(), torch.randn(3, 8, 16)
    with torch.no_grad():
        expected = model(x)
    for lowering in ("eager", "inductor"):
        _, out, _ = compile_and_run(model, x, lowering=lowering, slicing=forced)
        assert_close_rel(out[0], expected[0])
        assert_close_rel(out[1], expected[1])
    # nn.ReLU(inplace=True) right after a convolution is its value's one reader: still sliced.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 3, 3, padding=1)).eval()
    x = torch.randn(4, 3, 20, 20)
    _, out, result = compile_and_run(model, x, slicing=forced)
    assert [row["ops"] for row in result.details] == [3]
    with torch.no_grad():
        assert_close_rel(out, model(x))


class WriteBetweenMembers(nn.Module):
    """Convolutions read ``x`` before and after an in-place write that no group can hold (for
    ``mul_`` and ``setitem`` a Dynamo graph records no edge from the write to the later read);
    or the write goes to a convolution's result that a later convolution reads."""

    def __init__(self, write: str) -> None:
        super().__init__()
        self.write = write
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = x * 1.0
        h = self.c1(x)
        if self.write == "mul_":
            x.mul_(2)
        elif self.write == "+=":
            x += 1
        elif self.write == "setitem":
            x[:, 0] = 0
        else:  # a member's result
            h.add_(1)
        return self.c2(F.silu(h)) + x


# With `x += 1` and `h.add_(1)`, Dynamo's graph reads the write's result afterwards (an
# ordinary edge), so groups need no cut to be right (one may be cut all the same: the check
# does not tell the two apart); the results must be right either way.
@pytest.mark.parametrize("write, needs_cut", [("mul_", True), ("setitem", True), ("+=", False), ("result add_", False)])
def test_groups_do_not_span_an_in_place_write_outside_them(write, needs_cut):
    torch.manual_seed(25)
    model, x = WriteBetweenMembers(write).eval(), torch.randn(4, 8, 17, 19)
    with torch.no_grad():
        expected = model(x.clone())
    for lowering in ("eager", "inductor"):
        forced = {"min_group_bytes": 0, "max_slice_bytes": 1024}
        _, out, result = compile_and_run(model, x.clone(), lowering=lowering, slicing=forced)
        assert_close_rel(out, expected)
        assert result.rewrites >= 1  # the parts before and after the write still slice
        if needs_cut:
            assert any("before an in-place write" in note for note in result.notes), result.notes


class DrawsBetweenMembers(nn.Module):
    """Two random ops between a group's members: a dropout of a group value (runs after the
    group's op) and a randn the group reads (runs before it)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        g = F.silu(self.c1(x))
        kept = F.dropout(g[:, :1] * 2, 0.5, training=True)
        noise = torch.randn(4, 16, 12, 12)
        return self.c2(F.silu(g * noise)) * kept


def test_groups_do_not_reorder_random_draws():
    """A group is cut before a random op outside it between its members: the same seed draws
    the same numbers sliced or not (before, the two draws swapped: 1.4 relative apart)."""
    torch.manual_seed(28)
    model, x = DrawsBetweenMembers().eval(), torch.randn(4, 8, 12, 12)
    outs = {}
    for slicing in (False, {"min_group_bytes": 0, "max_slice_bytes": 1024}):
        torch.manual_seed(123)
        _, outs[bool(slicing)], result = compile_and_run(model, x, slicing=slicing)
    assert result.rewrites >= 1 and any("before a random op" in note for note in result.notes), result.notes
    assert_close_rel(outs[True], outs[False])


class AutocastRegions(nn.Module):
    """A chain of convolutions in a ``torch.autocast`` block of the model's own code: a float32
    region (``enabled=False``, as diffusers upcasts norms) or a bfloat16 one, between
    convolutions outside it."""

    def __init__(self, region: str) -> None:
        super().__init__()
        self.region = region
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 1) for c_in, c_out in ((8, 32), (32, 32), (32, 32), (32, 8)))

    def forward(self, x):
        h = F.silu(self.convs[0](x))
        if self.region == "float32":
            inside = torch.autocast("cpu", enabled=False)
        else:
            inside = torch.autocast("cpu", dtype=torch.bfloat16)
        with inside:  # what such blocks do: cast in, compute, cast out
            h = F.silu(self.convs[2](F.silu(self.convs[1](h.float()))))
        return self.convs[3](h.to(x.dtype) if self.region == "bfloat16" else h)


@pytest.mark.parametrize("region, caller", [("float32", torch.bfloat16), ("bfloat16", None)])
def test_groups_run_under_the_autocast_state_of_the_models_own_blocks(region, caller):
    """Each group's op runs its body under its members' autocast state: a group is cut where
    a block of the model's code starts or ends (before, bodies ran under the caller's state:
    a float32 region computed in bfloat16, 4.9e-3 off eager, or a bfloat16 one in float32)."""
    torch.manual_seed(27)
    model, x = AutocastRegions(region).eval(), torch.randn(4, 8, 12, 12)

    def outer():
        return torch.autocast("cpu", dtype=caller) if caller else contextlib.nullcontext()

    with torch.no_grad(), outer():
        expected = model(x).float()
    forced = {"min_group_bytes": 0, "max_slice_bytes": 1024}
    with outer():
        _, out, result = compile_and_run(model, x, slicing=forced)
    assert result.rewrites >= 1
    assert any("torch.autocast block" in note for note in result.notes), result.notes
    assert_close_rel(out.float(), expected)  # op by op: eager's very numbers
    # Inductor computes bfloat16 ops its own way (stock torch.compile is 5e-3 off eager on the
    # float32-region model): sliced, no further off than unsliced.
    with outer():
        _, whole, _ = compile_and_run(model, x, lowering="inductor", slicing=False)
        _, out, _ = compile_and_run(model, x, lowering="inductor", slicing=forced)
    error = lambda y: ((y.float() - expected).abs().max() / expected.abs().max()).item()  # noqa: E731
    assert error(out) <= max(error(whole), 1e-5)


class BitsView(nn.Module):
    """``view(torch.int32)`` between two convolutions: same shape, another reading of the bits."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        h = F.silu(self.c1(x)) + 1
        return self.c2(h.view(torch.int32).float() * 1e-9)


def test_a_view_as_another_dtype_is_no_reshape():
    torch.manual_seed(26)
    model, x = BitsView().eval(), torch.randn(4, 4, 9, 11)
    _, out, _ = compile_and_run(model, x, slicing={"min_group_bytes": 0, "max_slice_bytes": 512})
    with torch.no_grad():
        assert_close_rel(out, model(x))


class SplitThenAttention(nn.Module):
    """Two attention blocks after ``split`` + ``cat``, two outputs: a cut of the first group
    has the ``split`` (a tuple) among its boundary values, which the hand-over tried to grow
    a group from."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv1, self.proj1 = nn.Linear(12, 36), nn.Linear(12, 12)
        self.qkv2, self.proj2 = nn.Linear(12, 36), nn.Linear(12, 12)

    @staticmethod
    def attend(x, qkv, proj):
        q, k, v = (t.reshape(-1, 14, 3, 4).transpose(1, 2) for t in qkv(x).chunk(3, -1))
        weights = F.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)
        return x + proj((weights @ v).transpose(1, 2).reshape(-1, 14, 12))

    def forward(self, x):
        a, b = torch.split(x, [4, 8], dim=2)
        h = torch.cat([F.silu(a), b], dim=2)
        return self.attend(self.attend(h, self.qkv1, self.proj1), self.qkv2, self.proj2), h


def test_a_tuple_at_a_groups_cut_seeds_no_group():
    torch.manual_seed(27)
    model, x = SplitThenAttention().eval(), torch.randn(3, 14, 12)
    _, out, result = compile_and_run(model, x, slicing={"min_group_bytes": 0, "max_slice_bytes": 256})  # strict
    assert result.rewrites >= 1
    with torch.no_grad():
        expected = model(x)
    assert_close_rel(out[0], expected[0])
    assert_close_rel(out[1], expected[1])


def test_unsliceable_graph_is_left_untouched():
    torch.manual_seed(4)

    def mixes_everything(x):
        return torch.cumsum(x.flatten(), 0).sort().values.view_as(x) * 2

    x = torch.randn(8, 64, 33)
    torch._dynamo.reset()
    compiled = memopt.compile(mixes_everything, lowering="eager", slicing={"min_group_bytes": 0}, strict=True)
    out = compiled(x)
    report = memopt.last_report()
    (result,) = [r for r in report.passes if r.name == "slicing"]
    assert result.rewrites == 0
    assert report.nodes_after == report.nodes_before
    assert any("left untouched" in note for note in result.notes)
    torch.testing.assert_close(out, mixes_everything(x), rtol=0, atol=0)


def test_bodies_run_in_the_callers_autocast_precision():
    """Inside a compiled graph the op runs with autocast off; the body must still compute in
    bfloat16 where eager under ``torch.autocast`` does (not silently in float32)."""
    torch.manual_seed(14)
    model = ConvNet(width=16).eval()
    x = torch.randn(4, 3, 24, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
        _, out, result = compile_and_run(model, x)
    assert result.rewrites >= 1 and out.dtype == expected.dtype == torch.bfloat16
    # Same ops in the same precision, one slice at a time: equal to eager's up to bfloat16's
    # last bit (float32 would differ by ~5e-3 of the output's scale).
    assert_close_rel(out.float(), expected.float(), rtol=1e-3)


def test_two_pass_group_norm_returns_the_traced_dtype():
    """Under CUDA autocast group_norm runs in float32 on bfloat16 input and returns float32;
    the two-pass norm of a slice returns the dtype the traced node had, not its input's."""
    from memopt.ops.slicing import group_norm_stats, group_norm_with_stats

    x = (torch.randn(2, 8, 6, 5) * 3 + 1).to(torch.bfloat16)
    weight, bias = torch.randn(8), torch.randn(8)
    mean, rstd = group_norm_stats(x, 4, 1e-5)
    out = group_norm_with_stats(x[:, :, 2:4], mean, rstd, 4, weight, bias, torch.float32)
    assert out.dtype == torch.float32
    expected = F.group_norm(x.float(), 4, weight, bias, 1e-5)[:, :, 2:4]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert group_norm_with_stats(x[:, :, 2:4], mean, rstd, 4, weight, bias).dtype == torch.bfloat16


def test_small_groups_are_left_alone_under_auto():
    torch.manual_seed(5)
    model = ConvNet(width=8).eval()
    x = torch.randn(2, 3, 9, 9)
    _, out, result = compile_and_run(model, x, slicing="auto")
    assert result.rewrites == 0 and result.matched >= 1
    assert any("min_group_bytes" in note for note in result.notes)
    # Untouched: bit for bit what the same lowering gives with slicing off.
    _, unsliced, _ = compile_and_run(model, x, slicing=False)
    torch.testing.assert_close(out, unsliced, rtol=0, atol=0)


class TwoStages(nn.Module):
    """Two activation-heavy stages of 1x1 convolutions joined by a 3x3 one. With batch 1 only
    height or width can be sliced, and the 3x3 convolution mixes both, so each stage is its
    own group; the second stage is twice as wide, so its intermediates set the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(3, 16, 1), nn.SiLU(), nn.Conv2d(16, 16, 1), nn.SiLU())
        self.mix = nn.Conv2d(16, 8, 3, padding=1)
        self.second = nn.Sequential(nn.Conv2d(8, 32, 1), nn.SiLU(), nn.Conv2d(32, 32, 1), nn.SiLU(), nn.Conv2d(32, 3, 1))

    def forward(self, x):
        return self.second(self.mix(self.first(x)))


def test_budget_slices_only_the_groups_it_takes_to_fit():
    torch.manual_seed(9)
    model = TwoStages().eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        expected = model(x)
    common = {"min_group_bytes": 1024, "max_slice_bytes": 16 * 1024}
    _, out, everything = compile_and_run(model, x, slicing=common)
    assert everything.rewrites >= 2
    before = everything.details[0]["estimated_peak_before"]

    # A budget the graph already fits: nothing is sliced, and the note says why.
    _, out_fit, fits = compile_and_run(model, x, slicing={**common, "max_peak_bytes": before})
    assert fits.rewrites == 0 and any("fits the budget" in note for note in fits.notes), fits.notes
    torch.testing.assert_close(out_fit, expected, rtol=1e-5, atol=1e-6)

    # Just under the peak: the group at the peak is enough; the other stays whole.
    _, out_some, some = compile_and_run(model, x, slicing={**common, "max_peak_bytes": before - 1})
    assert 1 <= some.rewrites < everything.rewrites, (some.rewrites, everything.rewrites)
    assert any("under the budget" in note for note in some.notes), some.notes
    assert some.details[0]["estimated_peak_after"] <= before - 1
    assert_close_rel(out_some, expected)

    # A budget between the sliced and the unsliced peak, no max_slice_bytes: the groups keep
    # only the slices it takes to stay under it, fewer than at full strength.
    _, _, full = compile_and_run(model, x, slicing={"min_group_bytes": 1024})
    lowest = full.details[0]["estimated_peak_after"]
    budget = (lowest + before) // 2
    _, out_mid, mid = compile_and_run(model, x, slicing={"min_group_bytes": 1024, "max_peak_bytes": budget})
    assert mid.details[0]["estimated_peak_after"] <= budget
    assert sum(row["slices"] for row in mid.details) < sum(row["slices"] for row in full.details), (mid.details, full.details)
    assert any("below the budget" in note for note in mid.notes), mid.notes
    assert_close_rel(out_mid, expected)

    # An impossible budget: every group that lowers the peak is sliced, and the note says
    # the estimate is still over.
    _, _, tight = compile_and_run(model, x, slicing={**common, "max_peak_bytes": 0})
    assert tight.rewrites >= 1 and any("still over the budget" in note for note in tight.notes), tight.notes


def test_auto_slices_only_under_memory_pressure(monkeypatch):
    torch.manual_seed(10)
    model = ConvNet().eval()
    x = torch.randn(8, 3, 40, 40)
    # Plenty of free memory: "auto" leaves the graph alone although its groups qualify.
    monkeypatch.setattr(slicing_pass, "auto_budget", lambda device: (1 << 40, "a test's 1 TiB"))
    _, _, relaxed = compile_and_run(model, x, slicing="auto")
    assert relaxed.rewrites == 0 and any("fits the budget" in note for note in relaxed.notes), relaxed.notes
    # The note names the option that slices what "auto" found (slicing=True keeps larger groups only).
    (hint,) = re.findall(r"\((slicing=.*) slices anyway\)", " ".join(relaxed.notes))
    assert hint == f'slicing={{"min_group_bytes": {slicing_pass.AUTO_MIN_GROUP_BYTES}}}'
    _, _, hinted = compile_and_run(model, x, slicing=json.loads(hint.removeprefix("slicing=")))
    assert hinted.rewrites >= 1
    # The same budget within a dict of options: {"max_peak_bytes": "auto"}.
    _, _, relaxed = compile_and_run(model, x, slicing={"max_peak_bytes": "auto", "min_group_bytes": 0})
    assert relaxed.rewrites == 0 and any("max_peak_bytes=None slices anyway" in note for note in relaxed.notes)
    # Little free memory: "auto" slices, exactly.
    monkeypatch.setattr(slicing_pass, "auto_budget", lambda device: (1 << 20, "a test's 1 MiB"))
    _, out, pressed = compile_and_run(model, x, slicing="auto")
    assert pressed.rewrites >= 1 and any("a test's 1 MiB" in note for note in pressed.notes), pressed.notes
    _, _, pressed = compile_and_run(model, x, slicing={"max_peak_bytes": "auto", "min_group_bytes": 0})
    assert pressed.rewrites >= 1 and any("a test's 1 MiB" in note for note in pressed.notes), pressed.notes
    with torch.no_grad():
        assert_close_rel(out, model(x))
    # Unknown free memory: left alone.
    monkeypatch.setattr(slicing_pass, "auto_budget", lambda device: (None, "free memory on meta is unknown"))
    _, _, unknown = compile_and_run(model, x, slicing="auto")
    assert unknown.rewrites == 0 and any("cannot be judged" in note for note in unknown.notes)


def test_auto_budget_reads_the_host_memory():
    budget, source = slicing_pass.auto_budget(torch.device("cpu"))
    assert budget is not None and 0 < budget and "available host memory" in source


def test_training_graphs_are_not_sliced():
    model = ConvNet(width=8)
    x = torch.randn(2, 3, 9, 9)
    torch._dynamo.reset()
    memopt.compile(model, lowering="eager", slicing=SMALL_GROUPS)(x).sum().backward()
    report = memopt.last_report()
    assert report.training and all(result.name != "slicing" for result in report.passes)


# ---------------------------------------------------------------------------------------
# The op


def test_slicing_op_passes_opcheck():
    def body(x, w):
        return (torch.relu(x) * w, x.sum(-1))

    group = SlicedGroup(
        body=torch.fx.symbolic_trace(body),
        input_specs=(SliceSpec(0, 1), None),
        output_specs=(SliceSpec(0, 1), SliceSpec(0, 1)),
        output_layouts=(TensorLayout((7, 5), (5, 1), torch.float32), TensorLayout((7,), (1,), torch.float32)),
        units=7,
        slices=3,
    )
    key = register_group("test-opcheck-relu-mul", group)
    x, w = torch.randn(7, 5), torch.randn(5)
    torch.library.opcheck(torch.ops.memopt.slicing.default, (key, [x, w]))
    out, total = torch.ops.memopt.slicing(key, [x, w])
    torch.testing.assert_close(out, torch.relu(x) * w)
    torch.testing.assert_close(total, x.sum(-1))
    assert group.bounds() == [(0, 2), (2, 5), (5, 7)]


# ---------------------------------------------------------------------------------------
# Memory: measured on the compiled model (CPU allocator events), not only estimated


@pytest.mark.parametrize("lowering", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_measured_peak_drops_on_a_conv_net(lowering):
    torch.manual_seed(6)
    model = ConvNet().eval()
    x = torch.randn(8, 3, 40, 40)
    with torch.no_grad():
        expected = model(x)
        sliced, out, result = compile_and_run(model, x, lowering=lowering)
        assert result.rewrites == 1
        assert_close_rel(out, expected)
        plain, _, _ = compile_and_run(model, x, lowering=lowering, slicing=False)
        peak_sliced = memopt.measure(sliced, x).peak_bytes
        peak_plain = memopt.measure(plain, x).peak_bytes
    # One sample's intermediates instead of eight: ~4x measured; 1.5x leaves room for
    # allocator noise while still failing if Inductor rebuilt the full intermediates.
    assert peak_plain >= 1.5 * peak_sliced, (peak_plain, peak_sliced)
    assert result.bytes_saved > 0


@pytest.mark.slow
def test_compiled_bodies_are_exact_compile_once_and_keep_the_saving():
    torch.manual_seed(11)
    model = ConvNet().eval()
    x = torch.randn(8, 3, 40, 40)
    options = {"min_group_bytes": 1024, "max_slice_bytes": 256 * 1024, "compile_body": True}
    with torch.no_grad():
        expected = model(x)
        sliced, out, result = compile_and_run(model, x, slicing=options)
        assert result.rewrites == 1 and result.details[0]["compiled"]
        # The slice count divides the 8 samples: one slice shape, one Inductor compile.
        assert 8 % result.details[0]["slices"] == 0
        (group,) = [g for g in registered_groups() if g.compile_body and g.units == 8 and g.compiled]
        assert len(group.compiled) == 1
        assert_close_rel(out, expected)
        plain, _, _ = compile_and_run(model, x, slicing=False)
        peak_sliced = memopt.measure(sliced, x).peak_bytes
        peak_plain = memopt.measure(plain, x).peak_bytes
    assert peak_plain >= 1.5 * peak_sliced, (peak_plain, peak_sliced)


def test_a_body_that_fails_to_compile_runs_op_by_op(monkeypatch):
    import memopt.ops.slicing as slicing_ops

    def broken(body, args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(slicing_ops, "compile_body", broken)
    torch.manual_seed(13)
    model = ConvNet(width=16).eval()
    x = torch.randn(4, 3, 24, 24)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        _, out, result = compile_and_run(model, x, slicing={**SMALL_GROUPS, "compile_body": True})
    assert result.rewrites >= 1
    with torch.no_grad():
        assert_close_rel(out, model(x))


class OneConv(nn.Module):
    """A graph whose only sliceable chain is one convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_compile_body_follows_the_lowering_and_is_validated():
    torch.manual_seed(12)
    model, x = ConvNet(width=16).eval(), torch.randn(4, 3, 24, 24)
    _, _, result = compile_and_run(model, x)
    assert result.rewrites >= 1 and not any(row["compiled"] for row in result.details)
    _, out, result = compile_and_run(model, x, lowering="inductor")
    assert result.rewrites >= 1 and any(row["compiled"] for row in result.details)
    with torch.no_grad():
        assert_close_rel(out, model(x))
    # A body of one op has nothing to fuse: it runs directly, without a compile.
    _, out, result = compile_and_run(
        OneConv().eval(), x, lowering="inductor", slicing={**SMALL_GROUPS, "compile_body": True}
    )
    assert result.rewrites == 1 and not result.details[0]["compiled"]
    assert "1 of 1" not in " ".join(result.notes) and "0 of 1" in " ".join(result.notes)
    for value in ("yes", 1, 0):  # 1 == True, but not a choice of the three
        with pytest.raises(ValueError, match="compile_body"):
            memopt.Config(slicing={"compile_body": value})


# ---------------------------------------------------------------------------------------
# diffusers video UNets (tiny random configs, nothing downloaded)

diffusers = pytest.importorskip("diffusers")


def test_unet3d_sliced_matches_eager():
    torch.manual_seed(7)
    unet = zoo.unet3d().eval()
    sample, context = torch.randn(1, 4, 4, 16, 16), torch.randn(1, 5, 16)
    timestep = torch.tensor(17)
    _, out, result = compile_and_run(unet, sample, timestep, context, return_dict=False)
    assert result.rewrites >= 10
    assert sum(row["gn_two_pass"] for row in result.details) >= 1  # a temporal conv's norm
    assert {row["dim"] for row in result.details} >= {0, 2}  # frames and height
    with torch.no_grad():
        assert_close_rel(out[0], unet(sample, timestep, context, return_dict=False)[0])


def test_a_guidance_batch_of_two_gives_way_to_finer_groups():
    """Under classifier-free guidance a pipeline calls the UNet on a batch of 2. Every op is
    per sample, so one group along the batch takes the whole UNet, and it saves at most half
    (on the benchmark's UNet3D, 16 frames: 77.4 MiB against Inductor's 125.8). Grouped finer
    first (frames, positions), the estimated peak is lower, and that grouping is kept
    (21.3 MiB there; batch 1: 10.8)."""
    torch.manual_seed(7)
    unet = zoo.unet3d().eval()
    sample, context = torch.randn(2, 4, 4, 16, 16), torch.randn(2, 5, 16)
    timestep = torch.tensor(17)
    _, out, result = compile_and_run(unet, sample, timestep, context, return_dict=False)
    assert result.rewrites >= 10, result.notes
    assert any("gave way to finer groups" in note for note in result.notes), result.notes
    assert max(row["ops"] for row in result.details) < 200  # no group holds the whole UNet
    with torch.no_grad():
        assert_close_rel(out[0], unet(sample, timestep, context, return_dict=False)[0])


def test_groups_below_the_peak_run_fewer_slices(monkeypatch):
    """Slices cost time and matter for memory only where a group's transient sets the peak:
    groups whose level lies below it get fewer, the estimated peak stays, results exact."""
    from memopt.passes import slicing as slicing_pass

    torch.manual_seed(7)
    unet = zoo.unet3d().eval()
    sample, context = torch.randn(1, 4, 4, 16, 16), torch.randn(1, 5, 16)
    timestep = torch.tensor(17)
    runs = {}
    for relax_to in (0.0, slicing_pass._RELAX_TO):  # 0: no group may lower its count
        monkeypatch.setattr(slicing_pass, "_RELAX_TO", relax_to)
        # No max_slice_bytes: an explicit one stays a bound on the slices.
        _, out, result = compile_and_run(
            unet, sample, timestep, context, slicing={"min_group_bytes": 1024}, return_dict=False
        )
        runs[relax_to] = (out[0], result)
    (_, full), (out, relaxed) = runs.values()
    assert [row["seed"] for row in relaxed.details] == [row["seed"] for row in full.details]
    fewer = [(a["slices"], b["slices"]) for a, b in zip(full.details, relaxed.details) if b["slices"] < a["slices"]]
    assert fewer and all(b >= 2 for _, b in fewer), fewer
    assert any("fewer slices" in note for note in relaxed.notes), relaxed.notes
    peak = full.details[0]["estimated_peak_after"]
    assert relaxed.details[0]["estimated_peak_after"] == peak
    for row in relaxed.details:  # no group's transient comes near the peak it left alone
        assert row["per_slice_bytes"] <= peak
    with torch.no_grad():
        assert_close_rel(out, unet(sample, timestep, context, return_dict=False)[0])


def test_animatediff_motion_unet_sliced_matches_eager():
    torch.manual_seed(8)
    frames = 4
    unet = zoo.unet_motion(frames).eval()
    sample, context = torch.randn(1, 4, frames, 16, 16), torch.randn(frames, 5, 16)
    timestep = torch.tensor(17)
    _, out, result = compile_and_run(unet, sample, timestep, context, return_dict=False)
    assert result.rewrites >= 5
    with torch.no_grad():
        assert_close_rel(out[0], unet(sample, timestep, context, return_dict=False)[0])


def test_svd_spatio_temporal_unet_sliced_matches_eager():
    """SVD mixes a frame-sliced spatial branch and a position-sliced temporal branch with
    AlphaBlenders. Its groups used to hold the blender's two inputs and the spatial
    transformer's three outputs at once, with ``alpha * x_spatial`` and the transformer's
    residual view written whole beside them: the estimated peak fell only 1.90x. Split
    groups, absorbed blender operands and hoisted views gave 2.35x on this config. The
    spatial transformer group then still wrote the temporal block's input (after its
    per-token ``norm_in``/``ff_in``) whole beside the spatial branch; handing that tail to
    the position-sliced temporal group gives 2.75x, and 2.6x fails without it."""
    torch.manual_seed(16)
    unet = zoo.unet_svd(frames=4).eval()
    sample, context, added = torch.randn(1, 4, 8, 16, 16), torch.randn(1, 1, 32), torch.randn(1, 3)
    timestep = torch.tensor(17)
    _, out, result = compile_and_run(unet, sample, timestep, context, added_time_ids=added, return_dict=False)
    out = out[0]
    with torch.no_grad():
        expected = unet(sample, timestep, context, added_time_ids=added, return_dict=False)[0]
    assert result.rewrites >= 20
    assert any("split" in note for note in result.notes), result.notes
    assert any("left their tail" in note for note in result.notes), result.notes
    row = result.details[0]
    assert row["estimated_peak_before"] >= 2.6 * row["estimated_peak_after"], row
    assert_close_rel(out, expected)
